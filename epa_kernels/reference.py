"""Plain PyTorch references that materialise the [N, V] logits.

Ground truth for the tests (run in float64 on the CPU) and the baseline of the benchmarks. It shares
only input validation with the fused path: the math, the layout and the reduction are written out
independently, and gradients come from autograd.
"""
from __future__ import annotations

import torch

from epa_kernels._validation import FLOAT_DTYPES, REDUCTIONS, check_choice, check_linear_inputs, check_positive_finite
from epa_kernels.logprobs import LogProbs


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
):
    """Same contract as `epa_kernels.linear_logprobs`, computed the obvious way.

    Accepts float64 inputs too (the test ground truth). Logits are computed in the input dtype, as a
    model's LM head would, then upcast to at least fp32 for the softmax.
    """
    check_linear_inputs(hidden, weight, targets, bias, cu_seqlens, ignore_index, dtypes=FLOAT_DTYPES + (torch.float64,))
    check_choice("reduction", reduction, REDUCTIONS)
    temperature = check_positive_finite("temperature", temperature)

    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if softcap is not None:
        softcap = check_positive_finite("softcap", softcap)
        logits = softcap * torch.tanh(logits / softcap)
    log_probs = torch.log_softmax(logits, dim=-1)
    valid = targets != ignore_index
    token_logp = log_probs.gather(-1, torch.where(valid, targets, 0).long().unsqueeze(-1)).squeeze(-1)
    token_logp = token_logp * valid
    lse = torch.logsumexp(logits, dim=-1) * valid
    entropy = -(log_probs.exp() * log_probs).sum(-1) * valid

    if reduction == "none":
        logps = token_logp
    elif hidden.dim() == 3:
        logps = token_logp.sum(-1)
        if reduction == "mean":
            logps = logps / valid.sum(-1).clamp(min=1)
    else:
        bounds = [0, targets.numel()] if cu_seqlens is None else cu_seqlens.tolist()
        sums, counts = [], []
        for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
            sums.append(token_logp[start:stop].sum())
            counts.append(max(int(valid[start:stop].sum()), 1))
        logps = torch.stack(sums)
        if reduction == "mean":
            logps = logps / torch.tensor(counts, dtype=logps.dtype, device=logps.device)
    if not (return_lse or return_entropy):
        return logps
    return LogProbs(logps, lse if return_lse else None, entropy if return_entropy else None)
