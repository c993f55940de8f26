"""The fused log-prob kernels registered with `torch.library`, so `torch.compile` traces through them.

Two custom ops, `epa_kernels::linear_logprobs_forward` and `epa_kernels::linear_logprobs_backward`, wrap
whichever backend (`triton`, `native`, `torch`) the caller resolved. Each has a fake (meta) implementation
that gives output shapes without running a kernel, and the forward's autograd formula calls the backward op,
so a compiled graph holds both ops and no Python in between. Optional outputs travel as empty tensors
(custom ops return tensors only) and become None again at the edges.

The `gemm` backend has its own pair, `epa_kernels::gemm_logprobs_forward` / `gemm_logprobs_backward`: its forward
also returns the logits [M, V] it keeps for the backward when they fit the memory budget ([0] otherwise), and its
backward overwrites them with the logits' gradient, a mutation the op declares (so autograd refuses a second
backward through the same graph instead of reading a gradient as logits, and torch.compile orders it).

Math of the backward (per token, z the logits, p = softmax(z), ez = Σ p·z, entropy H = lse − ez):
dz = g_logp · onehot(target) + p · (g_lse − g_logp + g_H · (ez − z)), passed to the kernels as the per-token
coefficients a = g_logp, b = g_lse − g_logp + g_H · ez, c = −g_H (see ops/torch_logprobs.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from epa_kernels.dispatch import backend_module
from epa_kernels.ops.gemm_plan import plan_chunks


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


def _coefficients(grad_logp, grad_lse, grad_entropy, lse, entropy, with_entropy):
    """The per-token coefficients (a, b, c | None) of the backward from the upstream gradients."""
    coef_a = grad_logp.float().contiguous()
    coef_b = grad_lse.float() - coef_a
    coef_c = None
    if with_entropy:
        g_entropy = grad_entropy.float()
        coef_b = coef_b + g_entropy * (lse - entropy)  # + g_H · ez
        coef_c = (-g_entropy).contiguous()
    return coef_a, coef_b.contiguous(), coef_c


def _backward(ctx, grad_logp, grad_lse, grad_entropy):
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    backend, temperature, softcap, with_entropy, filter_eps = ctx.options
    coef_a, coef_b, coef_c = _coefficients(grad_logp, grad_lse, grad_entropy, lse, entropy, with_entropy)
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    d_hidden, d_weight, d_bias = linear_logprobs_backward(
        hidden, weight, bias, targets, lse, coef_a, coef_b, coef_c, backend, temperature, softcap,
        need_hidden, need_weight, need_bias and bias is not None, filter_eps)
    return (d_hidden if need_hidden else None, d_weight if need_weight else None,
            d_bias if need_bias and bias is not None else None) + (None,) * 6


linear_logprobs_forward.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("epa_kernels::gemm_logprobs_forward", mutates_args=())
def gemm_logprobs_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, temperature: float,
                          softcap: float | None, with_entropy: bool, memory_budget: int | None, chunking: str,
                          fp32_accumulation: bool, keep_logits: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(logp [M], lse [M], entropy [M] or [0]) fp32 and the kept logits [M, V] in the input dtype or [0].
    keep_logits: a backward will follow (the logits are kept when they fit memory_budget). fp32_accumulation only
    reaches the backward (it is here so the autograd formula sees it)."""
    logp, lse, ez, logits = backend_module("gemm").forward(
        hidden, weight, bias, targets, temperature=temperature, softcap=softcap, with_entropy=with_entropy,
        memory_budget=memory_budget, chunking=chunking, keep_logits=keep_logits)
    return logp, lse, (lse - ez) if with_entropy else lse.new_empty(0), _or_empty(logits, hidden)


@gemm_logprobs_forward.register_fake
def _gemm_forward_fake(hidden, weight, bias, targets, temperature, softcap, with_entropy, memory_budget, chunking,
                       fp32_accumulation, keep_logits):
    logp, lse, entropy = _forward_fake(hidden, weight, bias, targets, "gemm", temperature, softcap, with_entropy, None)
    plan = plan_chunks(hidden.shape[0], weight.shape[0], hidden.element_size(), memory_budget, chunking, keep_logits)
    return logp, lse, entropy, hidden.new_empty((hidden.shape[0], weight.shape[0]) if plan.keep else (0,))


@torch.library.custom_op("epa_kernels::gemm_logprobs_backward", mutates_args=("logits",))
def gemm_logprobs_backward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, lse: Tensor,
                           coef_a: Tensor, coef_b: Tensor, coef_c: Tensor | None, logits: Tensor, temperature: float,
                           softcap: float | None, need_hidden: bool, need_weight: bool, need_bias: bool,
                           memory_budget: int | None, chunking: str,
                           fp32_accumulation: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(d hidden [M, D], d weight [V, D], d bias [V]) in the input dtypes; [0] for a gradient not needed.
    logits: the forward's kept logits [M, V], overwritten with their gradient, or [0] to recompute them."""
    d_hidden, d_weight, d_bias = backend_module("gemm").backward(
        hidden, weight, bias, targets, lse, coef_a, coef_b, coef_c, temperature=temperature, softcap=softcap,
        need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias and bias is not None,
        logits=logits if logits.numel() else None, memory_budget=memory_budget, chunking=chunking,
        fp32_accumulation=fp32_accumulation)
    return _or_empty(d_hidden, hidden), _or_empty(d_weight, weight), _or_empty(d_bias, weight)


@gemm_logprobs_backward.register_fake
def _gemm_backward_fake(hidden, weight, bias, targets, lse, coef_a, coef_b, coef_c, logits, temperature, softcap,
                        need_hidden, need_weight, need_bias, memory_budget, chunking, fp32_accumulation):
    return _backward_fake(hidden, weight, bias, targets, lse, coef_a, coef_b, coef_c, "gemm", temperature, softcap,
                          need_hidden, need_weight, need_bias, None)


def _gemm_setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, softcap, with_entropy, memory_budget, chunking, fp32_accumulation, \
        _ = inputs
    _, lse, entropy, logits = output
    ctx.mark_non_differentiable(logits)
    ctx.set_materialize_grads(False)  # else autograd would make an [M, V] zero gradient for the kept logits
    ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy, logits)
    ctx.options = (temperature, softcap, with_entropy, memory_budget, chunking, fp32_accumulation)


def _gemm_backward(ctx, grad_logp, grad_lse, grad_entropy, _grad_logits):
    hidden, weight, bias, targets, lse, entropy, logits = ctx.saved_tensors
    temperature, softcap, with_entropy, memory_budget, chunking, fp32_accumulation = ctx.options
    zero = torch.zeros_like(lse)  # the gradient of an output nobody used (None: materialize_grads is off)
    grad_logp = zero if grad_logp is None else grad_logp
    grad_lse = zero if grad_lse is None else grad_lse
    grad_entropy = zero if grad_entropy is None and with_entropy else grad_entropy
    coef_a, coef_b, coef_c = _coefficients(grad_logp, grad_lse, grad_entropy, lse, entropy, with_entropy)
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    d_hidden, d_weight, d_bias = gemm_logprobs_backward(
        hidden, weight, bias, targets, lse, coef_a, coef_b, coef_c, logits, temperature, softcap, need_hidden,
        need_weight, need_bias and bias is not None, memory_budget, chunking, fp32_accumulation)
    return (d_hidden if need_hidden else None, d_weight if need_weight else None,
            d_bias if need_bias and bias is not None else None) + (None,) * 8


gemm_logprobs_forward.register_autograd(_gemm_backward, setup_context=_gemm_setup_context)
