"""Virtual adversarial perturbations (VAP) of a classifier's predictions, one vector per pool example (DESIGN §7).

For an example with logits z = W·h + b and p = softmax(z), VAT's power iteration draws d ~ N(0, I) at the
perturbed point and repeats `power_iters` times

    d ← ∇_d KL(p ‖ softmax(z(x + ξ·d̂)))          (d̂ = d / ‖d‖)

then r_vadv = ε·d̂. At the pooled representation (the default point) the head is linear and the gradient is closed
form, batched, with no autograd graph: ∇_d KL = ξ·Wᵀ(softmax(z + ξ·W·d̂) − softmax(z)).

Numerics. At ξ = 1e-6 the two softmaxes agree to ~1e-6 relative, so their fp32 difference is rounding noise (or
0/0). `softmax_shift` computes it without subtracting them: with δ = ξ·W·d̂, centred c = δ − pᵀδ,

    KL(p ‖ q) = log1p(Σ p·(expm1(c) − c))       q − p = p·expm1(c − KL)

(from log q − log p = c − KL and Σ p·c = 0), exact for any ξ, and every quantity is computed relative to its own
size: no cancellation at small ξ (expm1(c) − c uses its series for small |c|). In the ξ → 0 limit this is the
Hessian-vector product ξ²·Wᵀ(diag p − ppᵀ)W·d̂, so power iteration converges to the top eigenvector of the Fisher
matrix of the head. The head math runs in fp32 whatever the model's dtype.

At the token embeddings (`point="embeddings"`) the encoder is not linear. At ξ = 1e-6 a fp32 forward at x + ξ·d̂
differs from the one at x by rounding noise, so the direction uses the ξ → 0 limit, exact to first order in ξ:
u = J·d̂ by forward-mode AD (a Jacobian-vector product of the encoder, run with the math SDPA kernel, which
supports it), the closed-form head gradient above at δ = ξ·W·u, then Jᵀ by backward. The result per example is
the perturbation averaged over the real tokens, [E], so the vector stays small (a [T·E] flattening would not be
comparable across lengths). Memory: O(pool × dim) for the result, never O(pool × C × dim).

Sign. d̂ and −d̂ are equally adversarial to second order, so power iteration returns either, by the sign of the
random start. The canonical sign is the one under which the predicted class's log-probability drops more, so
identical examples get identical vectors whatever the seed.

Representation. With two classes the head's Fisher matrix Wᵀ(diag p − ppᵀ)W has rank 1: every pooled direction is
±(w₁ − w₀), and clustering such vectors sees one magnitude, no diversity. The default representation is therefore
the logit shift the perturbation causes, δ = z(x + ε·d̂) − z(x) [C], times the example's own pooled representation
h [H], flattened: vec(δ ⊗ h) [C·H], the way BADGE combines its loss gradient with the embedding. It keeps the VAP
(direction and strength of the adversarial change of the prediction) and adds the example's position, so examples
differ for any class count. `representation="direction"` returns ε·d̂ itself (the earlier default).

The vector returned per example is multiplied by KL(p ‖ p(x + ε·d̂)) (the divergence the adversarial perturbation
causes) when `scale_by_kl`.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from epa_kernels._validation import check_choice, check_positive_finite, check_positive_int
from epa_kernels.active.model import ClassifierParts, autocast_off, classifier_parts, eval_mode, model_device
from epa_kernels.active.pool import pool_batches, pool_size, progress_bar

POINTS = ("pooled", "embeddings")
REPRESENTATIONS = ("outer", "direction")
# Below this |c| the series of expm1(c) − c replaces the subtraction (relative error of the 3-term series < 2e-8).
_SERIES_BELOW = 1e-2


# ---------------------------------------------------------------------------------------------------- head math
def _expm1_minus_identity(c: torch.Tensor) -> torch.Tensor:
    """expm1(c) − c, without the cancellation at small |c|."""
    series = c * c * (0.5 + c * (1.0 / 6.0 + c / 24.0))
    return torch.where(c.abs() < _SERIES_BELOW, series, torch.expm1(c) - c)


@autocast_off
def softmax_shift(logits: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q − p, KL(p ‖ q)) for p = softmax(logits), q = softmax(logits + delta), [b, C] → ([b, C], [b]).

    Sound for arbitrarily small delta (see the module docstring); rows with a large shift (|c| > 1, where the
    direct formula has no cancellation and expm1 could overflow) use log-softmax directly. Computes in fp32,
    or fp64 for fp64 inputs.
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits, delta = logits.to(dtype), delta.to(dtype)
    log_p = torch.log_softmax(logits, dim=-1)
    p = log_p.exp()
    centred = delta - (p * delta).sum(-1, keepdim=True)
    large = centred.abs().amax(-1) > 1.0
    small_centred = torch.where(large[:, None], torch.zeros_like(centred), centred)
    kl = torch.log1p((p * _expm1_minus_identity(small_centred)).sum(-1))
    diff = p * torch.expm1(small_centred - kl[:, None])
    if bool(large.any()):
        log_q = torch.log_softmax(logits + delta, dim=-1)
        kl_direct = (p * (log_p - log_q)).sum(-1)
        kl = torch.where(large, kl_direct, kl)
        diff = torch.where(large[:, None], log_q.exp() - p, diff)
    return diff, kl.clamp(min=0.0)


def kl_divergence(logits: torch.Tensor, perturbed_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(logits) ‖ softmax(perturbed_logits)) per row [b], sound when the two are very close."""
    return softmax_shift(logits, perturbed_logits.to(logits.dtype) - logits)[1]


def _normalize(d: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of d (flattened beyond dim 0) scaled to unit norm; a zero row keeps `previous` (or stays 0)."""
    norm = d.flatten(1).norm(dim=1).view(-1, *([1] * (d.dim() - 1)))
    unit = d / norm.clamp(min=torch.finfo(d.dtype).tiny)
    if previous is not None:
        unit = torch.where(norm > 0, unit, previous)
    return unit


def _drop_of_predicted(logits: torch.Tensor, shifted: torch.Tensor) -> torch.Tensor:
    """log p_ŷ(shifted) − log p_ŷ(logits) per row [b], ŷ the predicted class at `logits`."""
    predicted = logits.argmax(-1, keepdim=True)
    before = torch.log_softmax(logits.float(), -1).gather(-1, predicted)
    after = torch.log_softmax(shifted.float(), -1).gather(-1, predicted)
    return (after - before).squeeze(-1)


def canonical_sign(logits: torch.Tensor, plus: torch.Tensor, minus: torch.Tensor) -> torch.Tensor:
    """+1 or −1 per row [b]: the sign of the perturbation (logits `plus` at x + r, `minus` at x − r) under which the
    predicted class's log-probability drops more (+1 on a tie)."""
    return torch.where(_drop_of_predicted(logits, minus) < _drop_of_predicted(logits, plus), -1.0, 1.0)


@autocast_off
def pooled_vap(
    pooled: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor | None,
    d: torch.Tensor,
    *,
    xi: float = 1e-6,
    eps: float = 1.0,
    power_iters: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """VAP at pooled representations [b, H] under a linear head: (r_vadv = ε·d̂ [b, H], KL(p ‖ p(h + r_vadv)) [b]).

    `d` [b, H] is the initial direction; the result has the canonical sign. fp32 (fp64 if `pooled` is fp64); no
    autograd.
    """
    dtype = torch.float64 if pooled.dtype == torch.float64 else torch.float32
    weight = head_weight.detach().to(dtype)
    logits = pooled.detach().to(dtype) @ weight.t()
    if head_bias is not None:
        logits = logits + head_bias.detach().to(dtype)
    unit = _normalize(d.to(dtype))
    for _ in range(power_iters):
        diff, _ = softmax_shift(logits, xi * (unit @ weight.t()))
        gradient = xi * (diff @ weight)  # ∇_d KL(p ‖ softmax(z + ξ·W·d̂))
        unit = _normalize(gradient, unit)
    shift = eps * (unit @ weight.t())
    unit = unit * canonical_sign(logits, logits + shift, logits - shift).to(dtype)[:, None]
    _, kl = softmax_shift(logits, eps * (unit @ weight.t()))
    return eps * unit, kl


def outer_representation(logit_shift: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """vec(δ ⊗ h): [b, C] × [b, H] → [b, C·H] (fp32)."""
    return (logit_shift.float()[:, :, None] * pooled.float()[:, None, :]).flatten(1)


# ---------------------------------------------------------------------------------------------------- embeddings
def _encoder_jvp(parts: ClassifierParts, embeddings, batch, tangent):
    """J·tangent of the pooled representation w.r.t. the token embeddings (forward-mode AD)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def encode(x):
        return parts.encode_from_embeddings(x, batch)

    try:
        with sdpa_kernel(SDPBackend.MATH):  # the fused SDPA kernels have no forward-mode derivative
            return torch.func.jvp(encode, (embeddings,), (tangent,))[1]
    except NotImplementedError:
        # Some op without forward AD (e.g. a flash-attention extension): central difference at a step relative
        # to each example's embedding norm, large enough to be far above fp32 rounding (error O(step²)).
        norm = embeddings.float().flatten(1).norm(dim=1).clamp(min=1e-6)
        step = (1e-2 * norm).to(embeddings.dtype).view(-1, *([1] * (embeddings.dim() - 1)))
        plus, minus = encode(embeddings + step * tangent), encode(embeddings - step * tangent)
        return (plus.float() - minus.float()) / (2 * step.float().flatten(1))


@autocast_off
def _head_round_trip(tangent, logits, weight, xi):
    """(q − p, ξ·Wᵀ(q − p)) for q = softmax(z + ξ·W·tangent): the head half of one power-iteration step, fp32."""
    diff, _ = softmax_shift(logits, xi * (tangent @ weight.t()))
    return diff, xi * (diff @ weight)


def embeddings_vap(parts: ClassifierParts, batch: dict, generator: torch.Generator, *, xi, eps, power_iters):
    """VAP at the token embeddings of one batch: (perturbation averaged over real tokens [b, E], KL [b], logit shift
    δ [b, C], pooled representation [b, H]), with the canonical sign.

    The initial direction d ~ N(0, I) [b, T, E] (zero at padding) is drawn from the CPU `generator`.
    """
    if parts.embed is None or parts.encode_from_embeddings is None:
        raise ValueError("point='embeddings' needs a model whose ClassifierParts has embed and encode_from_embeddings")
    weight = parts.head_weight.detach().float()
    with torch.no_grad():
        embeddings = parts.embed(batch).detach()
    mask = batch["attention_mask"].unsqueeze(-1).to(torch.float32)
    d = torch.randn(embeddings.shape, generator=generator).to(embeddings.device)
    unit = _normalize(d * mask)
    with torch.enable_grad():
        leaf = embeddings.detach().requires_grad_(True)
        pooled = parts.encode_from_embeddings(leaf, batch)
        logits = parts.logits(pooled.detach())
        for _ in range(power_iters):
            tangent = _encoder_jvp(parts, embeddings, batch, unit.to(embeddings.dtype)).float()
            _, cotangent = _head_round_trip(tangent, logits, weight, xi)
            (gradient,) = torch.autograd.grad(pooled, leaf, cotangent.to(pooled.dtype), retain_graph=True)
            unit = _normalize(gradient.float() * mask, unit)
    del leaf
    perturbation = eps * unit
    with torch.no_grad():
        plus, minus = (parts.logits(parts.encode_from_embeddings(embeddings + s * perturbation.to(embeddings.dtype),
                                                                 batch)) for s in (1, -1))
    sign = canonical_sign(logits, plus, minus)
    adversarial = torch.where(sign[:, None] > 0, plus, minus)
    perturbation = perturbation * sign[:, None, None]
    kl = kl_divergence(logits, adversarial)
    mean = (perturbation * mask).sum(1) / mask.sum(1).clamp(min=1)
    return mean, kl, (adversarial.float() - logits.float()), pooled.detach()


# ---------------------------------------------------------------------------------------------------- public
def check_vap_options(point, xi, eps, power_iters, representation="outer"):
    check_choice("point", point, POINTS)
    check_choice("representation", representation, REPRESENTATIONS)
    check_positive_finite("xi", xi)
    check_positive_finite("eps", eps)
    check_positive_int("power_iters", power_iters)


def vap_embeddings(
    model,
    pool,
    *,
    point: str = "pooled",
    representation: str = "outer",
    xi: float = 1e-6,
    eps: float = 1.0,
    power_iters: int = 1,
    scale_by_kl: bool = False,
    batch_size: int = 64,
    seed: int = 0,
    device=None,
    progress: bool = True,
    indices: Sequence[int] | None = None,
) -> torch.Tensor:
    """One VAP vector per pool example: fp32 CPU tensor [n, C·H] (`representation="outer"`: vec(δ ⊗ h), the logit
    shift the perturbation causes times the pooled representation), or the perturbation itself
    (`representation="direction"`): [n, H] at `point="pooled"`, [n, E] at `"embeddings"`.

    model: a classifier `classifier_parts` understands (run in eval mode; its training flag is restored).
    pool: dict of tensors (`input_ids`, `attention_mask`, optional `token_type_ids`) or a tokenized
    datasets.Dataset with those columns (ragged rows are padded per batch). `indices`: only these pool rows,
    in this order (default: all).
    point: "pooled" (closed form at the head's input, no autograd) or "embeddings" (token embeddings, through
    the encoder; as a direction, the per-token perturbation is averaged over the real tokens, [E]).
    The perturbation is ε·d̂ after `power_iters` steps from d ~ N(0, I) with finite-difference scale ξ, with the
    canonical sign; each vector is multiplied by the KL it causes when `scale_by_kl`. Deterministic for a given
    seed, batch_size and indices (d is drawn per batch from one CPU generator). Runs on `device` (default: the
    model's).
    """
    check_vap_options(point, xi, eps, power_iters, representation)
    check_positive_int("batch_size", batch_size)
    parts = classifier_parts(model)
    n = pool_size(pool)
    rows = np.arange(n) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    device = model_device(model) if device is None else torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    out = None
    with eval_mode(model), progress_bar(len(rows), f"VAP ({point})", progress) as bar:
        written = 0
        for batch in pool_batches(pool, rows, batch_size, device):
            if point == "pooled":
                with torch.no_grad():
                    pooled = parts.encode(batch)
                d = torch.randn(pooled.shape, generator=generator).to(device)
                vectors, kl = pooled_vap(
                    pooled, parts.head_weight, parts.head_bias, d, xi=xi, eps=eps, power_iters=power_iters
                )
                shift = vectors @ parts.head_weight.detach().to(vectors.dtype).t()  # linear head: δ = W·r
            else:
                vectors, kl, shift, pooled = embeddings_vap(parts, batch, generator, xi=xi, eps=eps,
                                                            power_iters=power_iters)
            if representation == "outer":
                vectors = outer_representation(shift, pooled)
            if scale_by_kl:
                vectors = vectors * kl[:, None]
            if out is None:
                out = torch.empty(len(rows), vectors.shape[1], dtype=torch.float32)
            out[written : written + len(vectors)] = vectors.float().cpu()
            written += len(vectors)
            bar.update(len(vectors))
    if out is None:
        raise ValueError("pool is empty: no examples to compute VAP vectors for")
    return out
