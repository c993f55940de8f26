"""torch.library registration and torch.compile: the ops pass opcheck, and functions calling `linear_logprobs`
or the fused preference loss compile whole (fullgraph=True: no graph break) and match eager execution."""
import pytest
import torch
from conftest import fresh_seed

import epa_kernels
from epa_kernels import fused_linear_preference_loss, make_groups

CPU_BACKENDS = [b for b in ("native", "torch") if epa_kernels.backends()[b].available]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def inputs(tokens=24, dim=16, vocab=50, dtype=torch.float32):
    gen = torch.Generator().manual_seed(fresh_seed())
    hidden = torch.randn(tokens, dim, generator=gen, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) / dim**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    targets[[0, 1, 9]] = -100  # prompt tokens and an ignored position mid-sequence
    return hidden, weight, targets


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_ops_pass_opcheck(backend):
    hidden, weight, targets = inputs()
    targets = targets.clamp(min=0)
    bias = torch.randn(weight.shape[0], requires_grad=True)
    forward = torch.ops.epa_kernels.linear_logprobs_forward.default
    for args in [(hidden, weight, bias, targets, backend, 1.0, None, True, None),
                 (hidden, weight, None, targets, backend, 0.7, 30.0, False, None)]:
        torch.library.opcheck(forward, args)
    _, lse, _ = forward(hidden.detach(), weight.detach(), None, targets, backend, 1.0, None, False, None)
    coef = torch.randn(hidden.shape[0])
    backward = torch.ops.epa_kernels.linear_logprobs_backward.default
    torch.library.opcheck(backward, (hidden.detach(), weight.detach(), None, targets, lse, coef, -coef, None, backend,
                                     1.0, None, True, True, False, None))


def grads(out, *tensors):
    return torch.autograd.grad(out.sum() if out.dim() else out, tensors)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_linear_logprobs_compiles_whole_and_matches_eager(backend, reduction):
    hidden, weight, targets = inputs()
    cu_seqlens = torch.tensor([0, 6, 6, 15, 24])  # an empty sequence too

    def f(hidden, weight, targets, cu_seqlens):
        out = epa_kernels.linear_logprobs(hidden, weight, targets, cu_seqlens=cu_seqlens, reduction=reduction,
                                          backend=backend, return_entropy=True)
        return out.logps.sum() + 0.1 * out.entropy.sum()

    compiled = torch.compile(f, fullgraph=True)
    got, expected = compiled(hidden, weight, targets, cu_seqlens), f(hidden, weight, targets, cu_seqlens)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads(got, hidden, weight), grads(expected, hidden, weight), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fused_preference_loss_compiles_whole_and_matches_eager(backend):
    hidden, weight, targets = inputs(tokens=40)
    cu_seqlens = torch.arange(0, 41, 5)  # 8 sequences: 2 prompts × (1 + 2 strong + 1 weak)
    groups = make_groups(2, 2, 1)
    ref_logps = torch.randn(8, generator=torch.Generator().manual_seed(fresh_seed())) - 20

    def f(hidden, weight, targets, cu_seqlens, groups, ref_logps):
        loss, metrics = fused_linear_preference_loss(hidden, weight, targets, groups, cu_seqlens=cu_seqlens,
                                                     ref_logps=ref_logps, backend=backend, num_strong=2,
                                                     weak_weight=0.5)
        return loss, metrics["accuracy"]

    compiled = torch.compile(f, fullgraph=True)
    (got, accuracy), (expected, expected_accuracy) = (compiled(hidden, weight, targets, cu_seqlens, groups, ref_logps),
                                                      f(hidden, weight, targets, cu_seqlens, groups, ref_logps))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(accuracy, expected_accuracy)
    for a, b in zip(grads(got, hidden, weight), grads(expected, hidden, weight), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_graph_keeps_the_input_checks():
    """Value checks become in-graph asserts: a target outside [0, V) still fails, it does not compute garbage."""
    hidden, weight, targets = inputs()
    targets[5] = weight.shape[0]
    compiled = torch.compile(lambda h, w, t: epa_kernels.linear_logprobs(h, w, t, backend="torch"), fullgraph=True,
                             backend="aot_eager")
    with pytest.raises(RuntimeError, match="targets must be in"):
        compiled(hidden, weight, targets)
