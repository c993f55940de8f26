"""`linear_logprobs`: per-token and per-sequence log-probs straight from hidden states and the LM head.

The kernels run as `torch.library` custom ops (`epa_kernels/ops/library.py`): their autograd formula stores
O(N) floats (the log-sum-exp, optionally the entropy) and the backward recomputes the logits tile by tile;
no [N, V] tensor exists in any backend, except that `gemm` keeps the forward's logits for the backward when they
fit its `memory_budget` (`epa_kernels/ops/gemm_plan.py`). Layout (packed with `cu_seqlens` or padded [B, T]),
ignore_index and the per-sequence reduction are plain differentiable PyTorch around the op, so any upstream gradient —
per token, per sequence, through the log-sum-exp or the entropy — reaches the kernels as three per-token
coefficients.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from epa_kernels._validation import (
    REDUCTIONS,
    check_bool,
    check_bytes,
    check_choice,
    check_linear_inputs,
    check_positive_finite,
    compiling,
)
from epa_kernels.dispatch import backend_name
from epa_kernels.ops.gemm_plan import CHUNKINGS
from epa_kernels.ops.library import gemm_logprobs_forward, linear_logprobs_forward


class LogProbs(NamedTuple):
    """Returned instead of a tensor when `return_lse` or `return_entropy` is set.

    logps: per sequence [S] / [B] (reduction "sum" / "mean") or per token (reduction "none"), fp32.
    lse, entropy: per token, shaped like `targets`, fp32, 0 at ignored positions; None unless asked.
    """

    logps: torch.Tensor
    lse: torch.Tensor | None
    entropy: torch.Tensor | None


FILTERING_BACKENDS = ("triton", "native")  # backends whose backward implements filter_eps


def check_logit_options(temperature, softcap, filter_eps, chosen: str, backend: str):
    """Validated (temperature, softcap, filter_eps) of the logit transform and the gradient filter, which only the
    FILTERING_BACKENDS implement (the `chosen` backend, from the user's `backend`, must be one of them)."""
    temperature = check_positive_finite("temperature", temperature)
    if softcap is not None:
        softcap = check_positive_finite("softcap", softcap)
    if filter_eps is not None and filter_eps != 0:
        filter_eps = check_positive_finite("filter_eps", filter_eps)
        if chosen not in FILTERING_BACKENDS:  # never accept an approximation and silently not make it
            raise ValueError(f"filter_eps is implemented by the {' and '.join(FILTERING_BACKENDS)} backends only; "
                             f"backend {chosen!r} (from backend={backend!r}) computes the exact gradient: drop "
                             "filter_eps or pass backend='triton' (CUDA) or 'native' (CPU)")
    return temperature, softcap, filter_eps or None


class GemmOptions(NamedTuple):
    """The `gemm` backend's memory options (`epa_kernels/ops/gemm_plan.py`): bytes of extra memory (None: its
    default, 512 MiB), "auto" / "tokens" / "vocab" chunks, d weight summed over token chunks in fp32. Other
    backends take only these defaults."""

    memory_budget: int | None = None
    chunking: str = "auto"
    fp32_accumulation: bool = False


DEFAULT_GEMM_OPTIONS = GemmOptions()


def check_gemm_options(memory_budget, chunking, fp32_accumulation, chosen: str, backend: str) -> GemmOptions:
    """Validated GemmOptions; any other value than a default is refused unless the `chosen` backend is gemm."""
    options = GemmOptions(check_bytes("memory_budget", memory_budget), check_choice("chunking", chunking, CHUNKINGS),
                          check_bool("fp32_accumulation", fp32_accumulation))
    changed = [name for name, value, default in zip(GemmOptions._fields, options, DEFAULT_GEMM_OPTIONS, strict=True)
               if value != default]
    if changed and chosen != "gemm":  # never accept a memory setting and silently not honour it
        given = ", ".join(f"{name}={getattr(options, name)!r}" for name in changed)
        raise ValueError(f"{given}: implemented by the gemm backend only; backend {chosen!r} (from backend="
                         f"{backend!r}) does not take it: drop {' and '.join(changed)} or pass backend='gemm'")
    return options


class Tokens(NamedTuple):
    """The tokens that reach the kernels: ignored ones dropped (they cost nothing, get exactly zero gradient)."""

    hidden: torch.Tensor  # [M, D] contiguous
    targets: torch.Tensor  # [M] int64
    seq_ids: torch.Tensor  # [M] sequence of each token
    index: torch.Tensor | None  # [M] positions among all N tokens; None when none was ignored
    mask: torch.Tensor | None = None  # [M] bool, under torch.compile only: the tokens that count (none dropped)


def prepare_tokens(hidden, targets, layout, ignore_index) -> Tokens:
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).to(torch.int64)
    valid = flat_targets != ignore_index
    if compiling():  # shapes must not depend on data: keep every token, score ignored ones as token 0, mask later
        return Tokens(flat_hidden.contiguous(), torch.where(valid, flat_targets, 0), layout.seq_ids, None, valid)
    if bool(valid.all()):
        return Tokens(flat_hidden.contiguous(), flat_targets, layout.seq_ids, None)
    index = valid.nonzero().squeeze(1)
    return Tokens(flat_hidden[index].contiguous(), flat_targets[index], layout.seq_ids[index], index)


def token_logprobs(tokens: Tokens, hidden, weight, bias, backend: str, temperature, softcap, with_entropy=False,
                   filter_eps=None, gemm_options: GemmOptions = DEFAULT_GEMM_OPTIONS):
    """(logp, lse, entropy | None) [M] fp32 of the prepared tokens through the custom op; 0 (with zero gradient)
    at ignored tokens that were kept; empty but connected to the inputs when every token was dropped."""
    if tokens.targets.numel() == 0:
        anchor = sum(t.sum() for t in (hidden, weight, bias) if t is not None) * 0.0
        empty = anchor.float().expand(0)
        return empty, empty, empty if with_entropy else None
    weight, bias = weight.contiguous(), None if bias is None else bias.contiguous()
    if backend == "gemm":
        # Logits are worth keeping only for a backward: none follows without grad (a reference model's pass).
        keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (tokens.hidden, weight, bias))
        logp, lse, entropy, _ = gemm_logprobs_forward(
            tokens.hidden, weight, bias, tokens.targets, temperature, softcap, with_entropy,
            gemm_options.memory_budget, gemm_options.chunking, gemm_options.fp32_accumulation, keep)
    else:
        logp, lse, entropy = linear_logprobs_forward(tokens.hidden, weight, bias, tokens.targets, backend,
                                                     temperature, softcap, with_entropy, filter_eps)
    entropy = entropy if with_entropy else None
    if tokens.mask is not None:  # ignored tokens were scored (compiled path): zero them and their gradients
        logp, lse = logp * tokens.mask, lse * tokens.mask
        entropy = None if entropy is None else entropy * tokens.mask
    return logp, lse, entropy


def sequence_sums(values, seq_ids, num_seqs):
    """Per-sequence sums [S] in float64: a sequential fp32 sum of hundreds of log-probs near −10 loses ~1e-2,
    which differences of sequence log-probs (every preference loss) would expose."""
    return torch.zeros(num_seqs, dtype=torch.float64, device=values.device).index_add(0, seq_ids, values.double())


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    cu_seqlens: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "sum",
    temperature: float = 1.0,
    softcap: float | None = None,
    return_lse: bool = False,
    return_entropy: bool = False,
    backend: str = "auto",
    filter_eps: float | None = None,
    memory_budget: int | None = None,
    chunking: str = "auto",
    fp32_accumulation: bool = False,
):
    """Log-probs of `targets` under `softmax((hidden · weightᵀ + bias) / temperature)`, never materialising logits.

    hidden [N, D] packed (sequences given by `cu_seqlens` [S+1]; without it all N tokens form one
    sequence) or [B, T, D] padded; targets [N] / [B, T] already shifted, `ignore_index` marks
    positions that do not count; weight [V, D]; bias [V].
    reduction: "sum" or "mean" → one fp32 value per sequence ([S] / [B]; a sequence with no counted
    token gives 0); "none" → fp32 per token, shaped like targets (0 at ignored positions).
    softcap c applies z ← c·tanh(z / c) after the temperature. `filter_eps` (triton, native) drops the backward
    contributions of probabilities below it (triton: whole tiles without a target; native: single entries, their
    sum kept through the mean row): faster, approximate; None (default) is exact.
    `memory_budget`, `chunking`, `fp32_accumulation` (gemm only; see epa_kernels/ops/gemm_plan.py): bytes of
    extra memory for logits (None: 512 MiB; logits that fit are kept from the forward for the backward), chunks
    of "tokens" or "vocab" ("auto": the one expected to move fewer bytes), d weight summed over token chunks in
    fp32 instead of the input dtype.
    Returns a tensor, or `LogProbs(logps, lse, entropy)` with `return_lse` / `return_entropy`.
    Differentiable w.r.t. hidden, weight and bias under any upstream gradient.
    """
    layout = check_linear_inputs(hidden, weight, targets, bias, cu_seqlens, ignore_index)
    check_choice("reduction", reduction, REDUCTIONS)
    name = backend_name(backend, hidden.device)
    temperature, softcap, filter_eps = check_logit_options(temperature, softcap, filter_eps, name, backend)
    gemm_options = check_gemm_options(memory_budget, chunking, fp32_accumulation, name, backend)
    tokens = prepare_tokens(hidden, targets, layout, ignore_index)
    index, seq_ids, num_tokens = tokens.index, tokens.seq_ids, layout.seq_ids.numel()

    logp, lse, entropy = token_logprobs(tokens, hidden, weight, bias, name, temperature, softcap, return_entropy,
                                        filter_eps, gemm_options)

    def per_token(values):
        if index is not None:
            values = values.new_zeros(num_tokens).index_copy(0, index, values)
        return values.reshape(layout.shape)

    if reduction == "none":
        logps = per_token(logp)
    else:
        logps = sequence_sums(logp, seq_ids, layout.num_seqs)
        if reduction == "mean":
            counted = torch.ones_like(logp) if tokens.mask is None else tokens.mask.to(logp.dtype)
            logps = logps / sequence_sums(counted, seq_ids, layout.num_seqs).clamp_(min=1)
        logps = logps.float()
    if not (return_lse or return_entropy):
        return logps
    return LogProbs(logps, per_token(lse) if return_lse else None, per_token(entropy) if return_entropy else None)
