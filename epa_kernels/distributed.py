"""Global negatives: all-gather per-sequence scalars across ranks, with autograd (DESIGN §3).

Only S floats per rank cross the network, never hidden states. Ranks may hold different numbers of
sequences. The backward all-reduces the gathered gradient and keeps this rank's slice, so a rank's
sequences receive the gradient of every rank's loss — the collective every backend supports (gloo
has no reduce-scatter).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def exchange_counts(count: int, device, group=None, error: BaseException | None = None) -> list[int]:
    """Every rank's number of sequences, in rank order, gathered once per call together with whether the rank's
    inputs failed its local checks (`error`). If any rank failed, every rank raises here, so none is left waiting
    in a later collective that the failed rank never reaches."""
    rows = _all_gather_ints([count, int(error is not None)], device, group)
    _raise_together(error, [failed for _, failed in rows])
    return [count for count, _ in rows]


def collective_device(group, like) -> torch.device:
    """Where this rank's collectives run: its CUDA device under NCCL, else `like`'s device (CPU if not a tensor)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return like.device if isinstance(like, torch.Tensor) else torch.device("cpu")


def agree(error: BaseException | None, device, group=None) -> None:
    """Raise on every rank if any rank's check failed: this rank's own error, or one naming the failed ranks."""
    _raise_together(error, [failed for (failed,) in _all_gather_ints([int(error is not None)], device, group)])


def _all_gather_ints(values: list[int], device, group) -> list[list[int]]:
    """Every rank's small list of ints, in rank order (one collective)."""
    _check_initialised()
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    parts = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, mine, group=group)
    return [part.tolist() for part in parts]


def _raise_together(error, failed: list[int]) -> None:
    if error is not None:
        raise error
    if any(failed):
        ranks = [rank for rank, bad in enumerate(failed) if bad]
        raise ValueError(f"rank(s) {ranks} of the process group rejected their inputs (their errors say why); "
                         "this rank stops with them")


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, group, sizes):
        width = max(sizes)
        padded = values.new_zeros(width)
        padded[: values.shape[0]] = values
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous(), group=group)
        ctx.group, ctx.sizes, ctx.rank = group, sizes, dist.get_rank(group)
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def _check_initialised():
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialised")


def all_gather_sequences(values: torch.Tensor, group=None, sizes: list[int] | None = None) -> torch.Tensor:
    """Concatenate every rank's [S_r] values in rank order → [Σ S_r], differentiable w.r.t. this rank's.
    sizes: every rank's S_r when already known (from `exchange_counts`), else gathered here."""
    _check_initialised()
    if values.dim() != 1:
        raise ValueError(f"expected per-sequence values [S], got shape {tuple(values.shape)}")
    if sizes is None:
        sizes = exchange_counts(values.shape[0], values.device, group)
    elif sizes[dist.get_rank(group)] != values.shape[0]:
        raise ValueError(f"sizes[{dist.get_rank(group)}] = {sizes[dist.get_rank(group)]} but this rank holds "
                         f"{values.shape[0]} values")
    if values.requires_grad:
        return _AllGatherRows.apply(values, group, sizes)
    with torch.no_grad():
        return _AllGatherRows.apply(values, group, sizes)
