"""The fused log-prob kernels registered with `torch.library`, so `torch.compile` traces through them.

Two custom ops, `epa_kernels::linear_logprobs_forward` and `epa_kernels::linear_logprobs_backward`, wrap
whichever backend (`triton`, `native`, `torch`) the caller resolved. Each has a fake (meta) implementation
that gives output shapes without running a kernel, and the forward's autograd formula calls the backward op,
so a compiled graph holds both ops and no Python in between. Optional outputs travel as empty tensors
(custom ops return tensors only) and become None again at the edges.

Math of the backward (per token, z the logits, p = softmax(z), ez = Σ p·z, entropy H = lse − ez):
dz = g_logp · onehot(target) + p · (g_lse − g_logp + g_H · (ez − z)), passed to the kernels as the per-token
coefficients a = g_logp, b = g_lse − g_logp + g_H · ez, c = −g_H (see ops/torch_logprobs.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from epa_kernels.dispatch import backend_module


def _or_empty(tensor: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if tensor is None else tensor


@torch.library.custom_op("epa_kernels::linear_logprobs_forward", mutates_args=())
def linear_logprobs_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, backend: str,
                            temperature: float, softcap: float | None, with_entropy: bool,
                            filter_eps: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """(logp [M], lse [M], entropy [M] or [0]) fp32 for hidden [M, D], targets [M] all in [0, V).
    filter_eps only reaches the backward (it is here so the autograd formula sees it)."""
    logp, lse, ez = backend_module(backend).forward(hidden, weight, bias, targets, temperature=temperature,
                                                    softcap=softcap, with_entropy=with_entropy)
    return logp, lse, (lse - ez) if with_entropy else lse.new_empty(0)


@linear_logprobs_forward.register_fake
def _forward_fake(hidden, weight, bias, targets, backend, temperature, softcap, with_entropy, filter_eps):
    tokens = hidden.shape[0]
    logp = hidden.new_empty(tokens, dtype=torch.float32)
    return logp, torch.empty_like(logp), hidden.new_empty(tokens if with_entropy else 0, dtype=torch.float32)


@torch.library.custom_op("epa_kernels::linear_logprobs_backward", mutates_args=())
def linear_logprobs_backward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, lse: Tensor,
                             coef_a: Tensor, coef_b: Tensor, coef_c: Tensor | None, backend: str,
                             temperature: float, softcap: float | None, need_hidden: bool, need_weight: bool,
                             need_bias: bool, filter_eps: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """(d hidden [M, D], d weight [V, D], d bias [V]) in the input dtypes; [0] for a gradient not needed."""
    d_hidden, d_weight, d_bias = backend_module(backend).backward(
        hidden, weight, bias, targets, lse, coef_a, coef_b, coef_c, temperature=temperature, softcap=softcap,
        need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias and bias is not None,
        filter_eps=filter_eps)
    return _or_empty(d_hidden, hidden), _or_empty(d_weight, weight), _or_empty(d_bias, weight)


@linear_logprobs_backward.register_fake
def _backward_fake(hidden, weight, bias, targets, lse, coef_a, coef_b, coef_c, backend, temperature, softcap,
                   need_hidden, need_weight, need_bias, filter_eps):
    d_hidden = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    d_weight = torch.empty_like(weight) if need_weight else weight.new_empty(0)
    d_bias = torch.empty_like(bias) if need_bias and bias is not None else weight.new_empty(0)
    return d_hidden, d_weight, d_bias


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, backend, temperature, softcap, with_entropy, filter_eps = inputs
    _, lse, entropy = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
    ctx.options = (backend, temperature, softcap, with_entropy, filter_eps)


def _backward(ctx, grad_logp, grad_lse, grad_entropy):
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    backend, temperature, softcap, with_entropy, filter_eps = ctx.options
    coef_a = grad_logp.float().contiguous()
    coef_b = grad_lse.float() - coef_a
    coef_c = None
    if with_entropy:
        g_entropy = grad_entropy.float()
        coef_b = coef_b + g_entropy * (lse - entropy)  # + g_H · ez
        coef_c = (-g_entropy).contiguous()
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    d_hidden, d_weight, d_bias = linear_logprobs_backward(
        hidden, weight, bias, targets, lse, coef_a, coef_b.contiguous(), coef_c, backend, temperature, softcap,
        need_hidden, need_weight, need_bias and bias is not None, filter_eps)
    return (d_hidden if need_hidden else None, d_weight if need_weight else None,
            d_bias if need_bias and bias is not None else None) + (None,) * 6


linear_logprobs_forward.register_autograd(_backward, setup_context=_setup_context)
