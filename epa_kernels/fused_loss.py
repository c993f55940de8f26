"""Preference losses fused with the LM head: hidden states in, group loss out, no [N, V] logits (DESIGN §3).

Per-token log-probs come from the fused kernel op (`epa_kernels/ops/library.py`), per-sequence sums are taken
in float64, and `preference_loss` runs on the tiny [P, G] rewards. Autograd does the rest: the loss's gradient
with respect to each sequence log-prob reaches every token of that sequence as one coefficient, and the
kernel's backward recomputes the logits tile by tile with it. Stored state: the per-token log-sum-exp (O(N)
floats). A separate autograd Function used to do this by hand; it bought nothing the op's own autograd formula
does not give, and kept torch.compile out.

With a process group, sequence log-probs are all-gathered (S floats per rank, autograd-aware) so groups may use
any rank's sequences as weak negatives; the gather's backward all-reduces the per-sequence gradient so each
rank's sequences receive the gradient of every rank's loss.
"""
from __future__ import annotations

import torch
from torch import nn

from epa_kernels import distributed
from epa_kernels._validation import check_choice, check_linear_inputs
from epa_kernels.dispatch import backend_name
from epa_kernels.logprobs import (
    check_gemm_options,
    check_logit_options,
    linear_logprobs,
    prepare_tokens,
    sequence_sums,
    token_logprobs,
)
from epa_kernels.losses import LOSSES, group_rewards, preference_loss

SEQUENCE_REDUCTIONS = ("sum", "mean")


def _check_local(hidden, weight, targets, bias, cu_seqlens, ignore_index, reduction, loss, temperature, softcap,
                 filter_eps, backend, ref_logps, ref_hidden, ref_weight, ref_bias, memory_options):
    """The checks of one rank's own inputs → (layout, backend name, temperature, softcap, filter_eps, GemmOptions,
    this rank's ref_logps). memory_options: (memory_budget, chunking, fp32_accumulation) as given."""
    layout = check_linear_inputs(hidden, weight, targets, bias, cu_seqlens, ignore_index)
    check_choice("reduction", reduction, SEQUENCE_REDUCTIONS)
    check_choice("loss", loss, LOSSES)
    name = backend_name(backend, hidden.device)
    temperature, softcap, filter_eps = check_logit_options(temperature, softcap, filter_eps, name, backend)
    gemm_options = check_gemm_options(*memory_options, name, backend)
    if ref_hidden is not None:
        if ref_logps is not None:
            raise ValueError("pass ref_logps or ref_hidden, not both")
        if ref_weight is None:  # the policy's head would silently stop being the reference once it trains
            raise ValueError("ref_hidden needs ref_weight, the reference model's LM head weight [V, D] (to mean the "
                             "policy's current head, pass weight.detach() explicitly)")
        with torch.no_grad():
            ref_logps = linear_logprobs(
                ref_hidden, ref_weight, targets, ref_bias,
                cu_seqlens=cu_seqlens, ignore_index=ignore_index, reduction=reduction, temperature=temperature,
                softcap=softcap, backend=backend, **gemm_options._asdict(),
            )
    elif ref_weight is not None or ref_bias is not None:
        raise ValueError("ref_weight/ref_bias need ref_hidden")
    if ref_logps is not None:
        if not isinstance(ref_logps, torch.Tensor) or ref_logps.shape != (layout.num_seqs,):
            raise ValueError(f"ref_logps must have one value per sequence [S] = [{layout.num_seqs}], "
                             f"got {tuple(getattr(ref_logps, 'shape', ()))}")
        ref_logps = ref_logps.detach()
    return layout, name, temperature, softcap, filter_eps, gemm_options, ref_logps


def fused_linear_preference_loss(hidden, weight, targets, groups, *, bias=None, cu_seqlens=None, ref_logps=None,
                                 ref_hidden=None, ref_weight=None, ref_bias=None, loss="epa", reduction="sum",
                                 ignore_index=-100, temperature=1.0, softcap=None, filter_eps=None, backend="auto",
                                 memory_budget=None, chunking="auto", fp32_accumulation=False, process_group=None,
                                 **loss_kw):
    """Group preference loss straight from hidden states → (loss, metrics).

    hidden [N, D] packed with cu_seqlens [S+1] (or [B, T, D] padded, S = B), weight [V, D], targets
    [N] / [B, T] already shifted with ignore_index, groups [P, G] over the S sequences (see
    `make_groups`; global indices with `process_group`). reduction: "sum" or "mean" (SimPO-style)
    per-sequence log-prob. The reference: `ref_logps` [S], or a reference model's `ref_hidden` with its own
    head `ref_weight` (required) and `ref_bias`, run through the same kernel without grad, or neither
    (reference-free). `loss` and `**loss_kw` (beta, num_strong, weak_weight, positive_weight,
    weights, scores, score_temperature, margin, label_smoothing) are those of `preference_loss`.
    `filter_eps` approximates the policy's gradient as in `linear_logprobs` (triton, native); `memory_budget`,
    `chunking` and `fp32_accumulation` set the gemm backend's memory use as in `linear_logprobs`.
    metrics also holds "policy_logps" [S] (detached) for logging.
    """
    # With a process group every rank checks its inputs and the ranks agree before any rank goes on, so a bad
    # input raises on every rank instead of leaving the others waiting in a collective.
    distributed_error = None
    try:
        layout, name, temperature, softcap, filter_eps, gemm_options, ref_logps = _check_local(
            hidden, weight, targets, bias, cu_seqlens, ignore_index, reduction, loss, temperature, softcap,
            filter_eps, backend, ref_logps, ref_hidden, ref_weight, ref_bias,
            (memory_budget, chunking, fp32_accumulation))
    except (ValueError, TypeError) as error:
        if process_group is None:
            raise
        layout, distributed_error = None, error
    counts = None
    if process_group is not None:
        device = distributed.collective_device(process_group, hidden)
        counts = distributed.exchange_counts(layout.num_seqs if layout else 0, device, process_group,
                                             distributed_error)
    total = layout.num_seqs if counts is None else sum(counts)
    try:  # groups and loss options against the global sequence count; no loss is computed
        group_rewards(torch.zeros(total, device=hidden.device),
                      None if ref_logps is None else torch.zeros(total, device=hidden.device),
                      groups, loss=loss, **loss_kw)
    except (ValueError, TypeError) as error:
        if process_group is None:
            raise
        distributed_error = error
    if process_group is not None:
        distributed.agree(distributed_error, device, process_group)
        if ref_logps is not None:
            ref_logps = distributed.all_gather_sequences(ref_logps, process_group, counts)

    tokens = prepare_tokens(hidden, targets, layout, ignore_index)
    # A token's weight in its sequence's log-prob: 1 (sum) or 1 / its sequence's count (mean); 0 for an ignored
    # token that was kept (torch.compile keeps every token: see prepare_tokens).
    counted = (torch.ones(tokens.seq_ids.shape, device=hidden.device) if tokens.mask is None
               else tokens.mask.float())
    token_scale = counted
    if reduction == "mean":
        per_sequence = sequence_sums(counted, tokens.seq_ids, layout.num_seqs).clamp(min=1)
        token_scale = counted / per_sequence[tokens.seq_ids].float()
    logp, _, _ = token_logprobs(tokens, hidden, weight, bias, name, temperature, softcap, filter_eps=filter_eps,
                                gemm_options=gemm_options)
    policy_logps = sequence_sums(logp * token_scale, tokens.seq_ids, layout.num_seqs)  # float64 into the loss
    local = policy_logps
    if process_group is not None:
        policy_logps = distributed.all_gather_sequences(policy_logps, process_group, counts)
    value, metrics = preference_loss(policy_logps, ref_logps, groups, loss=loss, **loss_kw)
    return value.float(), {**metrics, "policy_logps": local.detach().float()}


class FusedLinearEPALoss(nn.Module):
    """`fused_linear_preference_loss` as a module: options at construction, tensors in forward.

    >>> criterion = FusedLinearEPALoss(beta=0.1, num_strong=3, weak_weight=0.5)
    >>> loss, metrics = criterion(hidden, lm_head.weight, targets, groups, ref_logps, cu_seqlens)
    """

    def __init__(self, loss="epa", *, reduction="sum", ignore_index=-100, temperature=1.0, softcap=None,
                 filter_eps=None, backend="auto", memory_budget=None, chunking="auto", fp32_accumulation=False,
                 process_group=None, **loss_kw):
        super().__init__()
        check_choice("loss", loss, LOSSES)
        check_choice("reduction", reduction, SEQUENCE_REDUCTIONS)
        self.config = dict(loss=loss, reduction=reduction, ignore_index=ignore_index, temperature=temperature,
                           softcap=softcap, filter_eps=filter_eps, backend=backend, memory_budget=memory_budget,
                           chunking=chunking, fp32_accumulation=fp32_accumulation, process_group=process_group,
                           **loss_kw)

    def forward(self, hidden, weight, targets, groups, ref_logps=None, cu_seqlens=None, bias=None, **extra):
        """extra: weights, scores, ref_hidden, ref_weight, ref_bias."""
        return fused_linear_preference_loss(hidden, weight, targets, groups, bias=bias, cu_seqlens=cu_seqlens,
                                            ref_logps=ref_logps, **self.config, **extra)


class FusedLinearDPOLoss(FusedLinearEPALoss):
    """Pairwise losses on Liger's chosen-first layout, hidden before weight.

    hidden [2B, T, D] (or packed [N, D] with cu_seqlens over 2B sequences): sequences 0…B−1 are the
    chosen responses, B…2B−1 the rejected ones. loss: "dpo" (default), "ipo", "simpo", "epa".
    forward(hidden, weight, targets, bias=None, ref_logps=None [2B], cu_seqlens=None, ref_hidden=…).
    """

    def __init__(self, loss="dpo", **config):
        super().__init__(loss, **config)

    def forward(self, hidden, weight, targets, bias=None, ref_logps=None, cu_seqlens=None, **extra):
        num_seqs = hidden.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
        if num_seqs % 2 or (hidden.dim() == 2 and cu_seqlens is None):
            raise ValueError(f"hidden must hold 2B sequences (chosen then rejected), got {num_seqs}")
        half = num_seqs // 2
        chosen = torch.arange(half, device=hidden.device)
        groups = torch.stack([chosen, chosen + half], dim=1)
        return super().forward(hidden, weight, targets, groups, ref_logps=ref_logps, cu_seqlens=cu_seqlens,
                               bias=bias, **extra)
