"""VAP through an LM head: which prompts to send for preference annotation (DESIGN §7, extension).

For a prompt whose final hidden state (at its last token) is h [D], the next-token distribution is
p = softmax(W·h + b) over the vocabulary (W [V, D]). As in `vap.py`, power iteration d ← ∇_d KL(p ‖ p(h + ξ·d̂))
gives the direction in which the next-token distribution is least smooth; the prompts are then picked by k-means++
seeding on ε·d̂ (× KL). Everything goes through the fused kernel (`epa_kernels.linear_logprobs`), never an [n, V]
tensor, using

    lse(h) = log Σ_v exp(W_v·h + b_v),   ∂lse/∂h = Wᵀ·softmax(W·h + b)   (autograd of the fused lse)
    ∇_d KL(p ‖ p(h + ξ·d̂)) = ξ·(∂lse/∂h(h + ξ·d̂) − ∂lse/∂h(h))
    KL(p ‖ p(h + r)) = lse(h + r) − lse(h) − rᵀ·∂lse/∂h(h).

Numerics. The kernel computes in fp32 (it has no fp64 path), and at ξ = 1e-6 the two gradients agree to ~1e-6
relative: their difference is rounding noise. The kernel's backward is not itself differentiable, so the exact
Hessian-vector product Wᵀ(diag p − ppᵀ)W·d̂ (the ξ → 0 limit of the gradient above, divided by ξ²) cannot come from
double backward. Instead, when ξ is too small for fp32 — ξ < t = LOGIT_STEP / max_v ‖W_v‖, i.e. the perturbation
moves no logit by more than LOGIT_STEP — the limit is taken by a central difference at step t:

    Wᵀ(diag p − ppᵀ)W·d̂ ≈ (∂lse/∂h(h + t·d̂) − ∂lse/∂h(h − t·d̂)) / 2t

whose error is O(t²) relative (every logit moves by ≤ LOGIT_STEP, so ≲ LOGIT_STEP²/6), far above fp32 rounding,
while the finite-ξ direction differs from the limit by O(ξ). For ξ ≥ t the exact finite-ξ gradient is used. The
KL for `scale_by_kl` comes from lse values (cancellation-free enough at ε ≥ t; below, the quadratic form
½ε²·d̂ᵀ(Hd̂)). Hidden states and W are cast to fp32 (a bf16 W is copied once: V·D·4 bytes).
"""
from __future__ import annotations

import inspect

import numpy as np
import torch

from epa_kernels._validation import check_choice, check_positive_int
from epa_kernels.active.model import autocast_off, eval_mode, model_device
from epa_kernels.active.pool import progress_bar
from epa_kernels.active.strategies import CLUSTERINGS, check_k, cluster_select
from epa_kernels.active.vap import _normalize, check_vap_options

# Largest logit change (in nats) of the central-difference step; error O(LOGIT_STEP²), SNR ∝ LOGIT_STEP / 1e-7.
LOGIT_STEP = 0.05


def _lse_and_gradient(x, weight, bias, backend):
    """(lse(x) [m], ∂lse/∂x [m, D]) through the fused kernel: no [m, V] tensor."""
    from epa_kernels import linear_logprobs

    x = x.detach().requires_grad_(True)
    targets = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    with torch.enable_grad():
        out = linear_logprobs(x, weight, targets, bias, reduction="none", return_lse=True, backend=backend)
        (gradient,) = torch.autograd.grad(out.lse.sum(), x)
    return out.lse.detach(), gradient


@autocast_off
def lm_vap_embeddings(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    *,
    lm_head_bias: torch.Tensor | None = None,
    xi: float = 1e-6,
    eps: float = 1.0,
    power_iters: int = 1,
    scale_by_kl: bool = False,
    seed: int = 0,
    backend: str = "auto",
    chunk: int = 1024,
) -> torch.Tensor:
    """VAP vectors [n, D] (fp32, on hidden's device) of next-token distributions softmax(W·h + b).

    hidden [n, D]: final hidden states (one per prompt, at its last token); lm_head_weight [V, D]; bias [V].
    Each row is ε·d̂ after `power_iters` power-iteration steps from d ~ N(0, I) (drawn from a CPU generator
    seeded with `seed`, so results do not depend on `chunk`), times KL(p ‖ p(h + ε·d̂)) when `scale_by_kl`.
    `chunk` rows go through the kernel at a time. See the module docstring for how ξ = 1e-6 stays sound.
    """
    check_vap_options("pooled", xi, eps, power_iters)
    if hidden.dim() != 2 or lm_head_weight.dim() != 2 or hidden.shape[1] != lm_head_weight.shape[1]:
        raise ValueError(
            f"hidden must be [n, D] and lm_head_weight [V, D]; got {tuple(hidden.shape)} and "
            f"{tuple(lm_head_weight.shape)}"
        )
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an integer ≥ 1, got {chunk!r}")
    device = hidden.device
    weight = lm_head_weight.detach().to(device, torch.float32).contiguous()
    bias = None if lm_head_bias is None else lm_head_bias.detach().to(device, torch.float32).contiguous()
    step = LOGIT_STEP / weight.norm(dim=1).max().clamp(min=1e-30).item()
    directions = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    out = torch.empty(hidden.shape, dtype=torch.float32, device=device)
    for start in range(0, hidden.shape[0], chunk):
        h = hidden[start : start + chunk].detach().float()
        lse, gradient = _lse_and_gradient(h, weight, bias, backend)
        unit = _normalize(directions[start : start + chunk])
        for _ in range(power_iters):
            if xi >= step:  # the exact finite-ξ gradient is resolvable in fp32
                direction = xi * (_lse_and_gradient(h + xi * unit, weight, bias, backend)[1] - gradient)
            else:  # the ξ → 0 limit, H·d̂ by a central difference (module docstring)
                plus = _lse_and_gradient(h + step * unit, weight, bias, backend)[1]
                minus = _lse_and_gradient(h - step * unit, weight, bias, backend)[1]
                direction = (plus - minus) / (2 * step)
            unit = _normalize(direction, unit)
        vectors = eps * unit
        if scale_by_kl:
            if eps >= step:
                shifted_lse = _lse_and_gradient(h + eps * unit, weight, bias, backend)[0]
                kl = shifted_lse - lse - eps * (unit * gradient).sum(1)
            else:
                plus = _lse_and_gradient(h + step * unit, weight, bias, backend)[1]
                minus = _lse_and_gradient(h - step * unit, weight, bias, backend)[1]
                hessian_unit = (plus - minus) / (2 * step)
                kl = 0.5 * eps * eps * (unit * hessian_unit).sum(1)
            vectors = vectors * kl.clamp(min=0.0)[:, None]
        out[start : start + chunk] = vectors
    return out


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position [b] of each row's last real token, for left or right padding (the last 1 of the mask)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * (attention_mask != 0)).argmax(dim=1)


def _pad(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def prompt_hidden_states(model, tokenizer, prompts, *, batch_size=16, max_length=None, device=None, progress=True):
    """Final hidden states [n, D] of a causal LM at each prompt's last token (after the final norm).

    Prompts are padded on the tokenizer's padding side; position ids follow the attention mask, so left
    padding does not shift positions. Runs the base model only (no [b, T, V] logits).
    """
    device = model_device(model) if device is None else torch.device(device)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    side = getattr(tokenizer, "padding_side", "right")
    body = model.base_model if getattr(model, "base_model", model) is not model else None
    runner = body if body is not None else model
    takes_positions = "position_ids" in inspect.signature(runner.forward).parameters
    states = []
    with eval_mode(model), torch.no_grad(), progress_bar(len(prompts), "prompts", progress) as bar:
        for start in range(0, len(prompts), batch_size):
            texts = list(prompts[start : start + batch_size])
            encoded = tokenizer(texts, truncation=max_length is not None, max_length=max_length)["input_ids"]
            if any(len(row) == 0 for row in encoded):
                raise ValueError("a prompt tokenizes to no tokens; every prompt needs at least one")
            ids, mask = _pad(encoded, pad_id, side)
            ids, mask = ids.to(device), mask.to(device)
            inputs = {"input_ids": ids, "attention_mask": mask}
            if takes_positions:
                inputs["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
            if body is not None:
                last_states = body(**inputs).last_hidden_state
            else:
                last_states = model(**inputs, output_hidden_states=True).hidden_states[-1]
            rows = torch.arange(ids.shape[0], device=device)
            states.append(last_states[rows, last_token_index(mask)])
            bar.update(len(texts))
    return torch.cat(states)


def select_prompts(
    model,
    tokenizer,
    prompts: list[str],
    k: int,
    *,
    xi: float = 1e-6,
    eps: float = 1.0,
    power_iters: int = 1,
    scale_by_kl: bool = True,
    clustering: str = "kmeans++",
    batch_size: int = 16,
    max_length: int | None = None,
    seed: int = 0,
    backend: str = "auto",
    device=None,
    progress: bool = True,
) -> list[int]:
    """k distinct indices into `prompts` to send for preference annotation, chosen by VAP through the LM head.

    model: a transformers causal LM (its `get_output_embeddings()` is the LM head); each prompt is represented
    by the VAP of its next-token distribution at the last prompt token (`lm_vap_embeddings`), and the vectors
    are clustered as in `VAPAL` (k-means++ seeding by default, or "kmeans" nearest-to-centroid). Logit
    transforms other than the head's bias (e.g. final-logit softcapping) are not applied.
    """
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: nothing to select from")
    check_k(k, len(prompts))
    check_vap_options("pooled", xi, eps, power_iters)
    check_choice("clustering", clustering, CLUSTERINGS)
    check_positive_int("batch_size", batch_size)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or getattr(head, "weight", None) is None:
        raise ValueError(
            f"model has no reachable head: {type(model).__name__}.get_output_embeddings() gave no LM head weight"
        )
    hidden = prompt_hidden_states(model, tokenizer, prompts, batch_size=batch_size, max_length=max_length,
                                  device=device, progress=progress)
    vectors = lm_vap_embeddings(
        hidden, head.weight, lm_head_bias=getattr(head, "bias", None), xi=xi, eps=eps, power_iters=power_iters,
        scale_by_kl=scale_by_kl, seed=seed, backend=backend,
    )
    picked = cluster_select(vectors.cpu(), int(k), clustering, seed)
    return [int(i) for i in np.asarray(picked)]

