"""LoRA adapters (PEFT) for the EPA trainer: the options, their checks before anything loads, and the PEFT model.

With `--use-peft` only the adapters train; the reference is the same model with its adapters disabled (no second
model, as TRL's `DPOTrainer` with a `peft_config`), and the LM head stays frozen unless targeted, so the fused
head's backward skips its weight gradient. `--disable-dropout` (on by default, as in TRL) switches LoRA's own
dropout off with the model's, exactly as TRL's `disable_dropout_in_model` does after wrapping: a `--lora-dropout`
above 0 therefore needs `--no-disable-dropout`, and is refused otherwise rather than silently ignored.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

ALL_LINEAR = "all-linear"  # PEFT's name for every linear layer but the output layer
DEFAULTS = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "lora_target_modules": [ALL_LINEAR],
            "lora_modules_to_save": None, "use_rslora": False}
TRL_NAMES = {"--use-peft": [], "--lora-r": [], "--lora-alpha": [], "--lora-dropout": [],
             "--lora-target-modules": [], "--lora-modules-to-save": [], "--use-rslora": []}


def add_options(parser, group) -> None:
    """The adapter options, in this program's spelling (TRL's is the underscore one every option also takes)."""
    parser.add_option(group, "--use-peft", flag=True, help="train LoRA adapters instead of the full weights "
                      "(needs peft: pip install 'epa-kernels[train]'); the reference is the model with its "
                      "adapters disabled")
    parser.add_option(group, "--lora-r", type=int, default=DEFAULTS["lora_r"], help="the adapters' rank")
    parser.add_option(group, "--lora-alpha", type=int, default=DEFAULTS["lora_alpha"],
                      help="scaling numerator: the update is (alpha / r) · B·A (alpha / √r with --use-rslora)")
    parser.add_option(group, "--lora-dropout", type=float, default=DEFAULTS["lora_dropout"],
                      help="dropout on the adapters' input; above 0 it needs --no-disable-dropout (--disable-dropout "
                           "switches it off, as TRL's does)")
    parser.add_option(group, "--lora-target-modules", nargs="+", default=DEFAULTS["lora_target_modules"],
                      metavar="NAME", help=f"module names (suffixes) that get adapters; '{ALL_LINEAR}': every "
                      "linear layer but the LM head")
    parser.add_option(group, "--lora-modules-to-save", nargs="+", default=None, metavar="NAME",
                      help="modules trained in full beside the adapters and saved with them (e.g. lm_head)")
    parser.add_option(group, "--use-rslora", flag=True, help="rank-stabilized scaling alpha / √r")
    parser.add_option(group, "--merge-adapter", flag=True,
                      help="also write the base model with the adapters merged in, to OUTPUT_DIR/merged-model")


def check_options(args, check) -> None:
    """The adapter options' own checks (check(condition, message) raises the program's one-line error)."""
    if not args.use_peft:
        given = ["--" + name.replace("_", "-") for name, default in DEFAULTS.items() if getattr(args, name) != default]
        check(not given, f"{', '.join(given)} configure LoRA adapters: add --use-peft, or drop them")
        check(not args.merge_adapter, "--merge-adapter merges LoRA adapters, and this run trains none: add --use-peft "
                                      "or drop --merge-adapter")
        return
    check(importlib.util.find_spec("peft") is not None,
          "--use-peft needs the peft package: pip install 'epa-kernels[train]' (or pip install peft)")
    check(args.lora_r >= 1, f"--lora-r must be ≥ 1, got {args.lora_r}")
    check(args.lora_alpha > 0, f"--lora-alpha must be > 0, got {args.lora_alpha}")
    check(0 <= args.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    check(args.lora_dropout == 0 or not args.disable_dropout,
          f"--lora-dropout {args.lora_dropout} would be switched off by --disable-dropout (on by default, as in "
          "TRL): add --no-disable-dropout to keep dropout, or leave --lora-dropout at 0")
    check(ALL_LINEAR not in args.lora_target_modules or len(args.lora_target_modules) == 1,
          f"--lora-target-modules {ALL_LINEAR} stands alone (got {' '.join(args.lora_target_modules)})")


def module_names(config) -> dict[str, str]:
    """Every module of the model `config` describes, name → class name, read from a weightless (meta-device)
    instance."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name: type(module).__name__ for name, module in model.named_modules() if name}


def check_targets(config, args) -> None:
    """Refuse target or saved modules the model does not have, naming those it does have (before it loads)."""
    modules = module_names(config)

    def leaves(kind=None):  # the last part of each name (what PEFT matches), layer indices left out
        return sorted({n.rsplit(".", 1)[-1] for n, k in modules.items() if kind in (None, k)
                       if not n.rsplit(".", 1)[-1].isdigit()})

    for option, wanted, known in (("--lora-target-modules", args.lora_target_modules,
                                   f"its linear layers are {', '.join(leaves('Linear'))}"),
                                  ("--lora-modules-to-save", args.lora_modules_to_save or [],
                                   f"its modules include {', '.join(leaves()[:16])}")):
        missing = [w for w in wanted if w != ALL_LINEAR and not any(n == w or n.endswith("." + w) for n in modules)]
        if missing:
            raise ValueError(f"{option}: {', '.join(missing)} not in this model; {known}")


def base_model_spec(model: str, gguf_file: str | None) -> str:
    """What `training.models.load_causal_lm` loads the base from, for the adapter's config: a folder or a .gguf."""
    from training.models import resolve_model

    path, gguf = resolve_model(model, gguf_file)
    return str(Path(path, gguf).resolve() if gguf else Path(path).resolve())


def apply(model, args):
    """`model` (a transformers causal LM) with LoRA adapters as the options say: a peft model whose adapters and
    modules_to_save alone train."""
    from peft import LoraConfig, get_peft_model

    target = args.lora_target_modules
    config = LoraConfig(task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=args.lora_alpha,
                        lora_dropout=args.lora_dropout, target_modules=target[0] if target == [ALL_LINEAR] else target,
                        modules_to_save=args.lora_modules_to_save, use_rslora=args.use_rslora)
    model = get_peft_model(model, config)
    # After wrapping: peft sets it from the model's own (relative, GGUF-less) name_or_path.
    model.peft_config["default"].base_model_name_or_path = base_model_spec(args.model, args.gguf_file)
    return model
