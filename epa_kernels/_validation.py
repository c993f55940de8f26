"""Argument checks shared by the public entry points: clear errors that name the argument."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REDUCTIONS = ("sum", "mean", "none")


def check_tensor(name: str, value, *, dims=None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dims is not None and value.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(value.shape)}")
    return value


def check_positive_finite(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def check_finite(name: str, value, *, low=None, high=None) -> float:
    """A finite number in [low, high) (either bound optional)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value >= high):
        raise ValueError(f"{name} must be in [{low}, {high}), got {value}")
    return float(value)


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")
    return value


def check_bytes(name: str, value) -> int | None:
    """None or a positive integer number of bytes."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be None or a positive integer number of bytes, got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def compiling() -> bool:
    """Whether torch.compile is tracing: value checks then become in-graph asserts instead of Python branches."""
    return torch.compiler.is_compiling()


def require(condition: torch.Tensor, message, summary: str = "invalid input") -> None:
    """A check on tensor values: raises ValueError(message()) in eager mode (message is a callable, so the
    details are read only on failure); under torch.compile an in-graph async assert saying `summary`, with no
    host sync."""
    if compiling():
        torch._assert_async(condition, f"epa_kernels: {summary} (run eagerly for the details)")
    elif not bool(condition):
        raise ValueError(message())


@dataclass(frozen=True)
class TokenLayout:
    """How the flattened tokens [N] map to sequences.

    `seq_ids` [N] int64 (sequence of each token) and `num_seqs` S; `shape` is targets' original
    shape, so per-token outputs can be returned in the caller's layout.
    """

    shape: torch.Size
    seq_ids: torch.Tensor
    num_seqs: int


def check_linear_inputs(hidden, weight, targets, bias, cu_seqlens, ignore_index, *,
                        dtypes=FLOAT_DTYPES) -> TokenLayout:
    """Validate the (hidden, weight, targets, bias, cu_seqlens) of an LM-head op; return the layout."""
    check_tensor("hidden", hidden, dims=(2, 3))
    check_tensor("weight", weight, dims=(2,))
    check_tensor("targets", targets)
    if hidden.dtype not in dtypes:
        names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"hidden must be one of {names}; got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V, D] with D = hidden.shape[-1] = {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0 or hidden.shape[-1] == 0:
        raise ValueError(f"weight must have V > 0 and D > 0, got {tuple(weight.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"targets must be int64 (or int32) token ids, got {targets.dtype}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}"
        )
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")
    if hidden.shape[:-1].numel() == 0:
        raise ValueError(f"hidden has no tokens: shape {tuple(hidden.shape)}")
    if bias is not None:
        check_tensor("bias", bias, dims=(1,))
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"bias dtype {bias.dtype} does not match weight dtype {weight.dtype}")
        if bias.device != weight.device:
            raise ValueError(f"bias is on {bias.device} but weight is on {weight.device}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")

    vocab = weight.shape[0]
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    rule = f"targets must be in [0, {vocab}) or equal ignore_index={ignore_index}"
    require(~bad.any(), lambda: f"{rule}; found {targets[bad][0].item()}", summary=rule)

    num_tokens = targets.numel()
    if hidden.dim() == 3:
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens is only for packed hidden [N, D]; hidden is padded [B, T, D]")
        batch, length = targets.shape
        seq_ids = torch.arange(batch, device=hidden.device).repeat_interleave(length)
        return TokenLayout(targets.shape, seq_ids, batch)
    if cu_seqlens is None:
        # Packed tokens without boundaries form one sequence.
        return TokenLayout(targets.shape, torch.zeros(num_tokens, dtype=torch.int64, device=hidden.device), 1)
    check_tensor("cu_seqlens", cu_seqlens, dims=(1,))
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.device != hidden.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but hidden is on {hidden.device}")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold S+1 >= 2 offsets, got {cu_seqlens.numel()}")
    bounds = cu_seqlens.to(torch.int64)
    lengths = bounds[1:] - bounds[:-1]
    ends = f"cu_seqlens must start at 0 and end at N = {num_tokens}"
    require((bounds[0] == 0) & (bounds[-1] == num_tokens),
            lambda: f"{ends}, got {int(bounds[0])} … {int(bounds[-1])}", summary=ends)
    monotone = "cu_seqlens must be non-decreasing"
    require((lengths >= 0).all(), lambda: monotone, summary=monotone)
    # The sequence of token t: how many sequences end at or before t (empty sequences included); no host sync.
    positions = torch.arange(num_tokens, device=hidden.device)
    seq_ids = torch.searchsorted(bounds[1:].contiguous(), positions, right=True)
    return TokenLayout(targets.shape, seq_ids, lengths.numel())
