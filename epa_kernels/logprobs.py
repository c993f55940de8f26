"""`linear_logprobs`: per-token and per-sequence log-probs straight from hidden states and the LM head.

The autograd Function stores O(N) floats (the log-sum-exp, optionally Σ p·z) and recomputes the
logits tile by tile in backward; no [N, V] tensor exists in any backend. Layout (packed with
`cu_seqlens` or padded [B, T]), ignore_index and the per-sequence reduction are plain differentiable
PyTorch around the Function, so any upstream gradient — per token, per sequence, through the
log-sum-exp or the entropy — reaches the kernels as three per-token coefficients.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from epa_kernels._validation import REDUCTIONS, check_choice, check_linear_inputs, check_positive_finite
from epa_kernels.dispatch import resolve_backend


class LogProbs(NamedTuple):
    """Returned instead of a tensor when `return_lse` or `return_entropy` is set.

    logps: per sequence [S] / [B] (reduction "sum" / "mean") or per token (reduction "none"), fp32.
    lse, entropy: per token, shaped like `targets`, fp32, 0 at ignored positions; None unless asked.
    """

    logps: torch.Tensor
    lse: torch.Tensor | None
    entropy: torch.Tensor | None


class LinearLogProbsFunction(torch.autograd.Function):
    """(hidden [M, D], weight [V, D], bias [V] | None, targets [M]) → (logp, lse, entropy) [M] fp32.

    Targets are all valid here (ignored tokens were removed by the caller). `entropy` is None unless
    `with_entropy`.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, kernels, temperature, softcap, with_entropy, filter_eps):
        logp, lse, ez = kernels.forward(
            hidden, weight, bias, targets, temperature=temperature, softcap=softcap, with_entropy=with_entropy
        )
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ez)
        ctx.kernels, ctx.temperature, ctx.softcap, ctx.filter_eps = kernels, temperature, softcap, filter_eps
        ctx.set_materialize_grads(False)
        entropy = lse - ez if with_entropy else None
        return logp, lse, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_lse, grad_entropy):
        hidden, weight, bias, targets, lse, ez = ctx.saved_tensors
        if grad_logp is None and grad_lse is None and grad_entropy is None:
            return (None,) * 9
        zeros = torch.zeros_like(lse)
        grad_logp = zeros if grad_logp is None else grad_logp.float()
        grad_lse = zeros if grad_lse is None else grad_lse.float()
        # dz = g_logp·onehot + p·(g_lse − g_logp + g_entropy·(Σp·z − z)): see ops/torch_logprobs.py.
        coef_a = grad_logp.contiguous()
        coef_b = grad_lse - grad_logp
        coef_c = None
        if grad_entropy is not None:
            coef_b = coef_b + grad_entropy.float() * ez
            coef_c = (-grad_entropy.float()).contiguous()
        d_hidden, d_weight, d_bias = ctx.kernels.backward(
            hidden, weight, bias, targets, lse, coef_a, coef_b.contiguous(), coef_c,
            temperature=ctx.temperature, softcap=ctx.softcap,
            need_hidden=ctx.needs_input_grad[0], need_weight=ctx.needs_input_grad[1],
            need_bias=bias is not None and ctx.needs_input_grad[2], filter_eps=ctx.filter_eps,
        )
        return d_hidden, d_weight, d_bias, None, None, None, None, None, None


FILTERING_BACKENDS = ("triton",)  # backends whose backward implements filter_eps


def check_logit_options(temperature, softcap, filter_eps):
    """Validated (temperature, softcap, filter_eps) of the logit transform and the gradient filter."""
    temperature = check_positive_finite("temperature", temperature)
    if softcap is not None:
        softcap = check_positive_finite("softcap", softcap)
    if filter_eps is not None and filter_eps != 0:
        filter_eps = check_positive_finite("filter_eps", filter_eps)
    return temperature, softcap, filter_eps


class Tokens(NamedTuple):
    """The tokens that reach the kernels: ignored ones dropped (they cost nothing, get exactly zero gradient)."""

    hidden: torch.Tensor  # [M, D] contiguous
    targets: torch.Tensor  # [M] int64
    seq_ids: torch.Tensor  # [M] sequence of each token
    index: torch.Tensor | None  # [M] positions among all N tokens; None when none was ignored


def prepare_tokens(hidden, targets, layout, ignore_index) -> Tokens:
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1).to(torch.int64)
    valid = flat_targets != ignore_index
    if bool(valid.all()):
        return Tokens(flat_hidden.contiguous(), flat_targets, layout.seq_ids, None)
    index = valid.nonzero().squeeze(1)
    return Tokens(flat_hidden[index].contiguous(), flat_targets[index], layout.seq_ids[index], index)


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
):
    """Log-probs of `targets` under `softmax((hidden · weightᵀ + bias) / temperature)`, never materialising logits.

    hidden [N, D] packed (sequences given by `cu_seqlens` [S+1]; without it all N tokens form one
    sequence) or [B, T, D] padded; targets [N] / [B, T] already shifted, `ignore_index` marks
    positions that do not count; weight [V, D]; bias [V].
    reduction: "sum" or "mean" → one fp32 value per sequence ([S] / [B]; a sequence with no counted
    token gives 0); "none" → fp32 per token, shaped like targets (0 at ignored positions).
    softcap c applies z ← c·tanh(z / c) after the temperature. `filter_eps` (Triton backend) skips
    backward tiles whose every |∂logit| is below it: faster, approximate; None (default) is exact.
    Returns a tensor, or `LogProbs(logps, lse, entropy)` with `return_lse` / `return_entropy`.
    Differentiable w.r.t. hidden, weight and bias under any upstream gradient.
    """
    layout = check_linear_inputs(hidden, weight, targets, bias, cu_seqlens, ignore_index)
    check_choice("reduction", reduction, REDUCTIONS)
    temperature, softcap, filter_eps = check_logit_options(temperature, softcap, filter_eps)
    name, kernels = resolve_backend(backend, hidden.device)
    if filter_eps and name not in FILTERING_BACKENDS:  # never accept an approximation and silently not make it
        raise ValueError(f"filter_eps is implemented by the {', '.join(FILTERING_BACKENDS)} backend only; backend "
                         f"{name!r} (from backend={backend!r}) computes the exact gradient: drop filter_eps or pass "
                         "backend='triton'")
    tokens = prepare_tokens(hidden, targets, layout, ignore_index)
    index, seq_ids, num_tokens = tokens.index, tokens.seq_ids, layout.seq_ids.numel()

    if tokens.targets.numel() > 0:
        logp, lse, entropy = LinearLogProbsFunction.apply(
            tokens.hidden, weight.contiguous(), None if bias is None else bias.contiguous(),
            tokens.targets, kernels, temperature, softcap, return_entropy, filter_eps,
        )
    else:  # every token ignored: an empty result still connected to the inputs (zero gradients)
        anchor = sum(t.sum() for t in (hidden, weight, bias) if t is not None) * 0.0
        logp = lse = anchor.float().expand(0)
        entropy = lse if return_entropy else None

    def per_token(values):
        if index is not None:
            values = values.new_zeros(num_tokens).index_copy(0, index, values)
        return values.reshape(layout.shape)

    if reduction == "none":
        logps = per_token(logp)
    else:
        logps = sequence_sums(logp, seq_ids, layout.num_seqs)
        if reduction == "mean":
            counts = torch.bincount(seq_ids, minlength=layout.num_seqs).clamp_(min=1)
            logps = logps / counts
        logps = logps.float()
    if not (return_lse or return_entropy):
        return logps
    return LogProbs(logps, per_token(lse) if return_lse else None, per_token(entropy) if return_entropy else None)
