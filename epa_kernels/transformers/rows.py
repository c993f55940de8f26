"""Packed sequences folded into rows of equal width, for attention without varlen kernels (DESIGN §9).

A dense mask over one packed row of N tokens costs N² in attention however short its sequences are; rows as long
as the longest sequence cost about N·T. Used for packed sequences (document-causal masks built by transformers
from restarting position_ids) and for prefix-shared segments (masks from `prefix_sharing.py`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowLayout:
    """Packed sequences folded into R rows of T tokens for attention without varlen kernels.

    input_index [R, T]: the packed token at each row position (-1: padding); position_ids [R, T] restart per
    sequence (padding forms its own short run, so it never joins a real sequence); token_index [N]: where each
    packed token sits in the flattened rows, to bring the hidden states back into packed order.
    """

    input_index: torch.Tensor
    position_ids: torch.Tensor
    token_index: torch.Tensor


def fold_into_rows(cu_seqlens: torch.Tensor, multiple: int = 1) -> RowLayout:
    """First-fit-decreasing bin packing of the sequences into rows as long as the longest one (rounded up to a
    multiple of `multiple`, then every row padded to that width).

    With a dense (document-causal) mask, attention over one packed row of N tokens costs N² however short its
    sequences; rows of the longest sequence's length T cost about N·T, and padding stays small.
    """
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    capacity = -(-max(lengths) // multiple) * multiple
    rows, fill = [], []
    for seq in sorted(range(len(lengths)), key=lambda s: -lengths[s]):
        row = next((r for r, used in enumerate(fill) if used + lengths[seq] <= capacity), None)
        if row is None:
            rows.append([])
            fill.append(0)
            row = len(rows) - 1
        rows[row].append(seq)
        fill[row] += lengths[seq]
    width = max(fill) if multiple == 1 else capacity
    input_index = torch.full((len(rows), width), -1, dtype=torch.int64)
    position_ids = torch.zeros(len(rows), width, dtype=torch.int64)
    token_index = torch.empty(bounds[-1], dtype=torch.int64)
    for r, seqs in enumerate(rows):
        offset = 0
        for seq in seqs:
            length = lengths[seq]
            packed = torch.arange(bounds[seq], bounds[seq] + length)
            input_index[r, offset : offset + length] = packed
            position_ids[r, offset : offset + length] = torch.arange(length)
            token_index[packed] = r * width + offset + torch.arange(length)
            offset += length
        position_ids[r, offset:] = torch.arange(width - offset)
    device = cu_seqlens.device
    return RowLayout(input_index.to(device), position_ids.to(device), token_index.to(device))
