"""Kernel backends of the fused LM-head log-prob op, one file per family, each with its launcher.

`torch_logprobs` documents the contract all of them implement (`forward`, `backward`). The `gemm` backend is four
files: `gemm_logprobs` (its launcher: library GEMMs per chunk), `gemm_plan` (the chunks a memory budget allows),
`triton_rows` (the row kernels) and `torch_rows` (their reference and CPU twin). This package sits below
`epa_kernels.dispatch`, which chooses among them: a backend module never imports the dispatcher.
"""
import os


def triton_interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter: Triton's own reading of TRITON_INTERPRET (1, true, yes or
    on, any case), the one rule for this whole package."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")
