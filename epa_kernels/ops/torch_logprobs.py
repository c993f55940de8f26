"""Chunked pure-PyTorch backend of the fused LM-head log-prob op (any device).

This file is also the executable specification of the *kernel contract* that every backend
(`triton`, `native`, `torch`) implements. The public `linear_logprobs` validates inputs, drops
ignored tokens and calls a backend's `forward`/`backward` on M valid tokens:

    a_t = h_t · Wᵀ + b                      raw logits, accumulated in fp32
    u_t = a_t / temperature
    z_t = c · tanh(u_t / c)                 only with softcap c, else z_t = u_t
    lse_t = logsumexp_v z_t[v]
    logp_t = z_t[y_t] − lse_t
    ez_t = Σ_v softmax(z_t)[v] · z_t[v]     only with entropy (entropy_t = lse_t − ez_t)

`backward` receives three per-token coefficients, built by the caller from the upstream gradients
of (logp, lse, entropy), and forms the gradient with respect to the logits

    dz_t[v] = coef_a_t · 1[v = y_t] + p_t[v] · (coef_b_t + coef_c_t · z_t[v]),  p_t = softmax(z_t)

(coef_a = g_logp, coef_b = g_lse − g_logp + g_entropy · ez, coef_c = −g_entropy), then chains it
through the softcap (·(1 − (z/c)²)) and the temperature (·1/temperature) into
d hidden = da · W, d weight = daᵀ · h, d bias = Σ_t da. Logits exist one chunk at a time, so memory
is O(chunk · V) on top of the gradients, never O(M · V).
"""
from __future__ import annotations

import torch

# Chunks are chosen by tokens: each chunk re-reads the whole head W [V, D], so a chunk of a few tokens at a large
# vocabulary (16 at V = 128256 under a plain byte cap) re-reads it hundreds of times and runs thin GEMMs. A chunk
# holds at least MIN_CHUNK_TOKENS tokens, more while its fp32 logits fit CHUNK_BYTES; a few [chunk, V] buffers
# are live at once (256 tokens at V = 128256: 125 MiB each).
MIN_CHUNK_TOKENS = 256
CHUNK_BYTES = 16 * 1024 * 1024


def _chunk_size(num_tokens: int, vocab: int) -> int:
    return max(1, min(num_tokens, max(MIN_CHUNK_TOKENS, CHUNK_BYTES // (4 * vocab))))


def _logits(h, weight, bias, temperature, softcap):
    """fp32 logits z [m, V] of one chunk of hidden states h [m, D], transformed in place (one buffer)."""
    z = torch.mm(h, weight.t())
    if bias is not None:
        z.add_(bias)
    z = z.float()
    if temperature != 1.0:
        z.div_(temperature)
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def forward(hidden, weight, bias, targets, *, temperature=1.0, softcap=None, with_entropy=False):
    """hidden [M, D], weight [V, D], bias [V] | None, targets [M] int64 in [0, V).

    Returns (logp [M], lse [M], ez [M] | None), all fp32.
    """
    num_tokens = hidden.shape[0]
    logp = torch.empty(num_tokens, device=hidden.device, dtype=torch.float32)
    lse = torch.empty_like(logp)
    ez = torch.empty_like(logp) if with_entropy else None
    step = _chunk_size(num_tokens, weight.shape[0])
    for start in range(0, num_tokens, step):
        stop = min(start + step, num_tokens)
        z = _logits(hidden[start:stop], weight, bias, temperature, softcap)
        chunk_lse = torch.logsumexp(z, dim=-1)
        lse[start:stop] = chunk_lse
        logp[start:stop] = z.gather(1, targets[start:stop, None]).squeeze(1) - chunk_lse
        if with_entropy:
            p = torch.exp(z - chunk_lse[:, None])
            ez[start:stop] = (p * z).sum(-1)
    return logp, lse, ez


def backward(hidden, weight, bias, targets, lse, coef_a, coef_b, coef_c=None, *, temperature=1.0,
             softcap=None, need_hidden=True, need_weight=True, need_bias=True, filter_eps=None):
    """Gradients (d hidden [M, D] | None, d weight [V, D] | None, d bias [V] | None) in the input dtypes.

    lse, coef_a, coef_b, coef_c: [M] fp32 (coef_c None when no entropy gradient).
    `filter_eps` is accepted for interface parity; this backend always computes the exact gradient.
    """
    del filter_eps
    num_tokens = hidden.shape[0]
    need_bias = need_bias and bias is not None
    d_hidden = torch.empty_like(hidden) if need_hidden else None
    d_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_weight else None
    d_bias = torch.zeros(weight.shape[0], device=weight.device, dtype=torch.float32) if need_bias else None
    step = _chunk_size(num_tokens, weight.shape[0])
    rows = torch.arange(step, device=hidden.device)
    for start in range(0, num_tokens, step):
        stop = min(start + step, num_tokens)
        h = hidden[start:stop]
        z = _logits(h, weight, bias, temperature, softcap)
        dz = z.sub(lse[start:stop, None]).exp_()  # p; at most two [chunk, V] buffers are live
        if coef_c is None:
            dz.mul_(coef_b[start:stop, None])
        else:
            dz.mul_(torch.addcmul(coef_b[start:stop, None], coef_c[start:stop, None], z))
        dz[rows[: stop - start], targets[start:stop]] += coef_a[start:stop]
        if softcap is not None:
            dz.mul_(z.div_(softcap).square_().neg_().add_(1.0))
        if temperature != 1.0:
            dz.div_(temperature)
        del z
        da = dz.to(hidden.dtype)
        if need_hidden:
            torch.mm(da, weight, out=d_hidden[start:stop])
        if need_weight:
            if da.dtype == torch.float32:
                d_weight.addmm_(da.t(), h)
            else:
                d_weight.add_(torch.mm(da.t(), h))
        if need_bias:
            d_bias.add_(dz.sum(0))
    if d_weight is not None:
        d_weight = d_weight.to(weight.dtype)
    if d_bias is not None:
        d_bias = d_bias.to(bias.dtype)
    return d_hidden, d_weight, d_bias
