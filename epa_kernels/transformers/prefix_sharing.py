"""Prefix sharing: a prompt encoded once for all the responses scored under it (DESIGN §9).

The usual layout repeats the prompt in every sequence: 1 + K + W responses cost (1 + K + W)·|prompt| prompt
tokens. Here a prompt and its responses form one *segment*: the prompt's tokens but its last, then one *branch*
per response. A branch is [last prompt token, response[:-1]] at positions |prompt| − 1 … and predicts
response[0], …, response[-1]; it sees the shared prompt and the earlier tokens of its own branch only. Each
branch carries its own copy of the last prompt token because every response's first token is predicted there:
one target per position. The response's last token predicts nothing and attends to nothing later, so it is
dropped from the input (its log-prob is the target of the position before). A segment therefore costs
|prompt| − 1 + Σ |response| tokens, and each branch's hidden states equal those of prompt ⊕ response run alone.

Attention mask between a query q and a key k of one row: same segment, k ≤ q, and k in the shared prompt or in
q's branch. `prefix_attention` builds it as a FlexAttention `BlockMask` or a dense 4D mask (boolean for SDPA,
additive for eager). transformers passes either through untouched; without one, the non-monotone position_ids
would be read as packed sequences.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from epa_kernels.transformers.rows import fold_into_rows

IGNORE_INDEX = -100
FLEX_BLOCK = 128  # FlexAttention's block size: rows are padded to a multiple, so one compiled kernel serves a bucket
# SDPA's memory-efficient CUDA kernel indexes an explicit mask with 32-bit offsets and silently reads wrong rows
# once queries × keys pass 2**32 (pytorch#162588; seen here as a NaN loss at 67,583 tokens on an H200).
SDPA_CUDA_MAX_ROW = 2**16

PREFIX_SHARING_MODES = ("auto", "on", "off")


def pack_prefix_shared(segments: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], device=None) -> dict:
    """Pack (prompt ids, [response ids, …]) segments into one row of the prefix-shared layout.

    Returns input_ids / position_ids [1, N], targets [N], cu_seqlens [S+1] int32 (S = all responses, in order;
    a segment's shared prompt tokens belong to its first response's span and carry no targets), cu_segments
    [G+1] int32, branch_ids [N] (0: shared prompt, b ≥ 1: the segment's b-th response), max_seqlen (longest
    segment).
    """
    input_ids, position_ids, targets, branch_ids, lengths, segment_lengths = [], [], [], [], [], []
    for prompt, responses in segments:
        if len(prompt) < 1 or not responses or any(len(r) < 1 for r in responses):
            raise ValueError("each segment needs a prompt of ≥ 1 token and responses of ≥ 1 token each")
        shared = list(prompt[:-1])
        input_ids += shared
        position_ids += range(len(shared))
        targets += [IGNORE_INDEX] * len(shared)
        branch_ids += [0] * len(shared)
        for b, response in enumerate(responses, start=1):
            input_ids += [prompt[-1], *response[:-1]]
            position_ids += range(len(shared), len(shared) + len(response))
            targets += list(response)
            branch_ids += [b] * len(response)
            lengths.append(len(response) + (len(shared) if b == 1 else 0))
        segment_lengths.append(len(shared) + sum(len(r) for r in responses))

    def cumulative(values):
        cu = torch.zeros(len(values) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(values).cumsum(0)
        return cu.to(device)

    return {
        "input_ids": torch.tensor(input_ids, device=device).unsqueeze(0),
        "position_ids": torch.tensor(position_ids, device=device).unsqueeze(0),
        "targets": torch.tensor(targets, device=device),
        "cu_seqlens": cumulative(lengths),
        "cu_segments": cumulative(segment_lengths),
        "branch_ids": torch.tensor(branch_ids, device=device),
        "max_seqlen": max(segment_lengths),
    }


@dataclass(frozen=True)
class PrefixAttention:
    """Decoder inputs for a prefix-shared batch folded into R rows of T tokens.

    input_ids / position_ids [R, T]; attention_mask: a BlockMask or [R, 1, T, T] (bool: True attends; or
    additive in the model's dtype), or {layer type: mask} for models mixing full and sliding-window layers;
    token_index [N]: where each packed token sits in the flattened rows.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: object
    token_index: torch.Tensor


def attention_windows(config) -> dict[str | None, int | None]:
    """{layer type: sliding window or None} the masks must reproduce; key None: one mask for every layer."""
    config = getattr(config, "text_config", None) or config
    if getattr(config, "use_bidirectional_attention", False):  # e.g. Gemma-3 embedding variants: not causal
        raise ValueError("prefix sharing masks causal attention; this model attends bidirectionally")
    window = getattr(config, "sliding_window", None)
    layer_types = set(getattr(config, "layer_types", None) or ())
    unknown = layer_types - {"full_attention", "sliding_attention"}
    if unknown:
        raise ValueError(f"prefix sharing cannot mask layers of type {sorted(unknown)}; use --prefix-sharing off")
    if "sliding_attention" in layer_types:
        return {t: (window if t == "sliding_attention" else None) for t in layer_types}
    if layer_types:  # only full-attention layers, whatever sliding_window says (e.g. Qwen2's unused window)
        return {None: None}
    return {None: window}  # no layer types: a set sliding_window applies to every layer (Mistral)


def prefix_attention(batch: dict, config, dtype: torch.dtype = torch.float32) -> PrefixAttention:
    """Fold the batch's segments into rows (first-fit decreasing) and build the masks the model's attention
    (config._attn_implementation) needs: "flex_attention" → BlockMask (rows padded to a multiple of 128),
    "sdpa" → bool, "eager" → additive `dtype`; one per layer type when layers differ in sliding window."""
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if implementation not in ("flex_attention", "sdpa", "eager"):
        raise ValueError(f"prefix sharing needs attention that takes a mask (flex_attention, sdpa or eager); the "
                         f"model uses {implementation!r} — turn prefix sharing off for it")
    windows = attention_windows(config)
    cu_segments, branch_ids = batch["cu_segments"], batch["branch_ids"]
    layout = fold_into_rows(cu_segments, multiple=FLEX_BLOCK if implementation == "flex_attention" else 1)
    index = layout.input_index
    real = index >= 0
    rows, width = index.shape
    check_mask_width(implementation, width, index.device)
    # Segment of every row position; padding gets ids past the real ones, one run per row, so it attends only to
    # itself and earlier padding (no empty softmax rows).
    segment_of_token = torch.repeat_interleave(
        torch.arange(cu_segments.numel() - 1, device=index.device), (cu_segments[1:] - cu_segments[:-1]).long())
    pad_segment = cu_segments.numel() + torch.arange(rows, device=index.device).unsqueeze(1).expand(rows, width)
    segment = torch.where(real, segment_of_token[index.clamp(min=0)], pad_segment)
    branch = torch.where(real, branch_ids[index.clamp(min=0)], torch.zeros_like(index))
    input_ids = batch["input_ids"].reshape(-1)[index.clamp(min=0)]
    positions = torch.where(real, batch["position_ids"].reshape(-1)[index.clamp(min=0)], layout.position_ids)

    def mask(window):
        if implementation == "flex_attention":
            return flex_prefix_mask(segment, branch, positions, window)
        dense = dense_prefix_mask(segment, branch, positions, window)
        if implementation == "sdpa":
            return dense
        return torch.zeros(dense.shape, dtype=dtype, device=dense.device).masked_fill_(~dense, torch.finfo(dtype).min)

    masks = {layer_type: mask(window) for layer_type, window in windows.items()}
    return PrefixAttention(input_ids, positions, masks.pop(None) if None in masks else masks, layout.token_index)


def check_mask_width(implementation: str, width: int, device: torch.device) -> None:
    """Refuse a dense mask that SDPA's CUDA kernels would apply wrongly (see SDPA_CUDA_MAX_ROW)."""
    if implementation == "sdpa" and torch.device(device).type == "cuda" and width > SDPA_CUDA_MAX_ROW:
        raise ValueError(f"a prefix-shared row of {width} tokens is past what SDPA's CUDA kernels mask correctly "
                         f"({SDPA_CUDA_MAX_ROW}; pytorch#162588): load the model with attn_implementation="
                         "'flex_attention' (training: --attn flex_attention), or lower max_tokens_per_batch")


def dense_prefix_mask(segment: torch.Tensor, branch: torch.Tensor, positions: torch.Tensor,
                      window: int | None = None) -> torch.Tensor:
    """[R, 1, T, T] bool from segment / branch ids and positions [R, T] (query i, key j): j ≤ i, same segment,
    j shared or in i's branch, and within the sliding window if any. The reference for the BlockMask."""
    width = segment.shape[1]
    allowed = torch.ones(width, width, dtype=torch.bool, device=segment.device).tril_()
    allowed = allowed & (segment.unsqueeze(2) == segment.unsqueeze(1))
    allowed &= (branch.unsqueeze(1) == 0) | (branch.unsqueeze(2) == branch.unsqueeze(1))
    if window is not None:
        allowed &= positions.unsqueeze(2) - positions.unsqueeze(1) < window
    return allowed.unsqueeze(1)


def flex_prefix_mask(segment: torch.Tensor, branch: torch.Tensor, positions: torch.Tensor,
                     window: int | None = None):
    """The same mask as `dense_prefix_mask`, as a FlexAttention BlockMask (never materialised densely)."""
    def mask_mod(b, h, q, k):
        allowed = (k <= q) & (segment[b, q] == segment[b, k]) & ((branch[b, k] == 0) | (branch[b, k] == branch[b, q]))
        if window is not None:
            allowed = allowed & (positions[b, q] - positions[b, k] < window)
        return allowed

    rows, width = segment.shape
    return _compiled_create_block_mask()(mask_mod, rows, None, width, width, device=segment.device)


@functools.cache
def _compiled_create_block_mask():
    """create_block_mask compiled once: uncompiled, it evaluates the mask densely (T² memory)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)
