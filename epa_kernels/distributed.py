"""Global negatives: all-gather per-sequence scalars across ranks, with autograd (DESIGN §3).

Only S floats per rank cross the network, never hidden states. Ranks may hold different numbers of
sequences. The backward all-reduces the gathered gradient and keeps this rank's slice, so a rank's
sequences receive the gradient of every rank's loss — the collective every backend supports (gloo
has no reduce-scatter).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def sequence_counts(count: int, device, group=None) -> list[int]:
    """Every rank's number of sequences, in rank order."""
    _check_initialised()
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, torch.tensor([count], dtype=torch.int64, device=device), group=group)
    return [int(s) for s in sizes]


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, group):
        sizes = sequence_counts(values.shape[0], values.device, group)
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
        return grad[start : start + ctx.sizes[ctx.rank]], None


def _check_initialised():
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialised")


def all_gather_sequences(values: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate every rank's [S_r] values in rank order → [Σ S_r], differentiable w.r.t. this rank's."""
    _check_initialised()
    if values.dim() != 1:
        raise ValueError(f"expected per-sequence values [S], got shape {tuple(values.shape)}")
    if values.requires_grad:
        return _AllGatherRows.apply(values, group)
    with torch.no_grad():
        return _AllGatherRows.apply(values, group)
