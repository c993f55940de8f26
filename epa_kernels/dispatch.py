"""Which kernel backends this installation can run, and the `backend="auto"` choice (DESIGN §4).

Every backend module exposes the same `forward` / `backward` pair (the contract is documented in
`epa_kernels/ops/torch_logprobs.py`); `gemm`'s also take its memory options and pass kept logits from the forward
to the backward, through custom ops of their own (`epa_kernels/ops/library.py`).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType
from typing import NamedTuple

import torch

from epa_kernels.ops import triton_interpreting

BACKENDS = ("auto", "triton", "native", "torch", "gemm")


class BackendInfo(NamedTuple):
    available: bool
    detail: str


@functools.cache
def _load(name: str) -> tuple[ModuleType | None, str]:
    """Import a backend module once; on failure remember why."""
    try:
        if name == "triton":
            import triton

            module = importlib.import_module("epa_kernels.ops.triton_logprobs")
            return module, f"Triton {triton.__version__}"
        if name == "native":
            from epa_kernels import _C  # noqa: F401  (built from csrc/ by setup.py)

            module = importlib.import_module("epa_kernels.ops.native_logprobs")
            return module, f"C++ extension epa_kernels._C, {torch.get_num_threads()} threads"
        if name == "gemm":
            module = importlib.import_module("epa_kernels.ops.gemm_logprobs")
            rows = "Triton" if importlib.util.find_spec("triton") else "torch (Triton not installed)"
            return module, (f"PyTorch {torch.__version__} GEMMs in the input dtype, memory-budgeted chunks; row "
                            f"kernels: {rows} on CUDA, torch elsewhere")
        module = importlib.import_module("epa_kernels.ops.torch_logprobs")
        return module, f"chunked PyTorch {torch.__version__}"
    except ImportError as error:  # a missing optional piece: report it, don't fail the package
        return None, f"{type(error).__name__}: {error}"


def backend_module(name: str) -> ModuleType:
    """The kernels module of an available backend (`forward` / `backward`), by name."""
    module, detail = _load(name)
    if module is None:
        raise ValueError(f"backend={name!r} is not available: {detail}")
    return module


def backends() -> dict[str, BackendInfo]:
    """Each backend's availability with a one-line detail (version, or why it is missing).

    >>> epa_kernels.backends()["native"]
    BackendInfo(available=True, detail='C++ extension epa_kernels._C, 2 threads')
    """
    info = {}
    for name in BACKENDS[1:]:
        module, detail = _load(name)
        if name == "triton" and module is not None and not torch.cuda.is_available():
            detail += "; no CUDA device: CPU tensors run only under TRITON_INTERPRET=1"
        info[name] = BackendInfo(module is not None, detail)
    return info


@torch.compiler.assume_constant_result
def backend_name(backend: str, device: torch.device) -> str:
    """`resolve_backend`'s name only: a constant for torch.compile, which does not trace the module lookup."""
    return resolve_backend(backend, device)[0]


def resolve_backend(backend: str, device: torch.device) -> tuple[str, ModuleType]:
    """The backend name and module to run on tensors of `device`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    if backend == "auto":
        # `gemm` is not chosen here: the default changes only when a GPU measurement shows it faster.
        if device.type == "cuda" and _load("triton")[0] is not None:
            backend = "triton"
        elif device.type == "cpu" and _load("native")[0] is not None:
            backend = "native"
        else:
            backend = "torch"
    module, detail = _load(backend)
    if module is None:
        raise ValueError(f"backend={backend!r} is not available: {detail}")
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
        raise ValueError(
            f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); got {device}"
        )
    if backend == "native" and device.type != "cpu":
        raise ValueError(f"backend='native' runs on CPU tensors; got {device}")
    return backend, module
