"""fused_linear_preference_loss vs the unfused path (reference log-probs + preference_loss), every backend."""
import math

import pytest
import torch
from conftest import BACKEND_PARAMS, DEVICE, assert_matches_reference, fresh_seed

import epa_kernels
from epa_kernels import (
    FusedLinearDPOLoss,
    FusedLinearEPALoss,
    fused_linear_preference_loss,
    make_groups,
    preference_loss,
    reference,
)

VOCAB, DIM = 500, 40
PROMPTS, STRONG, WEAK = 2, 2, 2
SEQS = PROMPTS * (1 + STRONG + WEAK)


def make_batch(dtype=torch.float32, *, bias=True, seed=None):
    """Packed ragged sequences (one with a prompt run, one fully ignored) and groups with a shared weak negative."""
    gen = torch.Generator().manual_seed(seed if seed is not None else fresh_seed())
    lengths = torch.randint(1, 9, (SEQS,), generator=gen)
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    total = int(cu_seqlens[-1])
    targets = torch.randint(0, VOCAB, (total,), generator=gen)
    targets[cu_seqlens[1] : cu_seqlens[1] + 1] = -100
    targets[cu_seqlens[4] : cu_seqlens[5]] = -100  # a weak negative with no counted token
    groups = make_groups(PROMPTS, STRONG, WEAK)
    groups[1, -1] = 3  # prompt 1 shares prompt 0's weak negative
    groups[0, 2] = -1  # padding
    batch = {
        "hidden": torch.randn(total, DIM, generator=gen).to(DEVICE, dtype).requires_grad_(),
        "weight": (torch.randn(VOCAB, DIM, generator=gen) / DIM**0.5).to(DEVICE, dtype).requires_grad_(),
        "bias": (torch.randn(VOCAB, generator=gen) * 0.3).to(DEVICE, dtype).requires_grad_() if bias else None,
        "targets": targets.to(DEVICE),
        "cu_seqlens": cu_seqlens.to(DEVICE),
        "groups": groups.to(DEVICE),
        "ref_logps": (torch.randn(SEQS, generator=gen) * 3 - 15).to(DEVICE),
        "scores": torch.randn(PROMPTS, 1 + STRONG + WEAK, generator=gen).to(DEVICE),
    }
    return batch


def loss_kwargs(loss):
    kwargs = {"loss": loss, "beta": 0.5, "num_strong": STRONG}
    if loss == "infonca":
        kwargs["scores"] = None  # filled from the batch by with_scores
    if loss == "epa":
        kwargs.update(weak_weight=0.3, margin=0.1)
    if loss == "plackett_luce":
        kwargs.pop("num_strong")
    return kwargs


def with_scores(batch, kwargs):
    """loss_kwargs marks scores as needed; this batch's scores fill them in."""
    return {**kwargs, "scores": batch["scores"]} if "scores" in kwargs else kwargs


def unfused(batch, reduction, kwargs, leaves):
    hidden, weight, bias = leaves
    logps = reference.linear_logprobs(hidden, weight, batch["targets"], bias, cu_seqlens=batch["cu_seqlens"],
                                      reduction=reduction)
    ref = None if kwargs["loss"] == "simpo" else batch["ref_logps"].to(logps.dtype)
    return preference_loss(logps, ref, batch["groups"], **with_scores(batch, kwargs))


def fused(batch, reduction, kwargs, backend):
    ref = None if kwargs["loss"] == "simpo" else batch["ref_logps"]
    return fused_linear_preference_loss(batch["hidden"], batch["weight"], batch["targets"], batch["groups"],
                                        bias=batch["bias"], cu_seqlens=batch["cu_seqlens"], ref_logps=ref,
                                        reduction=reduction, backend=backend, **with_scores(batch, kwargs))


def leaves(batch):
    return [batch[k] for k in ("hidden", "weight", "bias")]


def fp64_leaves(batch):
    return [batch[k].detach().double().cpu().requires_grad_() for k in ("hidden", "weight", "bias")]


def check(backend, batch, reduction, kwargs):
    loss, metrics = fused(batch, reduction, kwargs, backend)
    grads = torch.autograd.grad(loss, leaves(batch))
    ref_loss, ref_metrics = unfused(batch, reduction, kwargs, leaves(batch))
    ref_grads = torch.autograd.grad(ref_loss, leaves(batch))
    cpu_batch = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    truth_leaves = fp64_leaves(batch)
    truth_loss, _ = unfused(cpu_batch, reduction, kwargs, truth_leaves)
    truth_grads = torch.autograd.grad(truth_loss, truth_leaves)
    assert_matches_reference("loss", loss.reshape(1), ref_loss.reshape(1), truth_loss.reshape(1))
    for name, got, ref, truth in zip(("d_hidden", "d_weight", "d_bias"), grads, ref_grads, truth_grads, strict=True):
        assert_matches_reference(name, got, ref, truth)
    assert set(ref_metrics) <= set(metrics) and metrics["policy_logps"].shape == (SEQS,)
    return loss, grads


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("loss", epa_kernels.LOSSES)
def test_fused_matches_unfused(backend, loss):
    batch = make_batch()
    if loss == "plackett_luce":
        batch["groups"] = torch.tensor([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]], device=DEVICE)
    if loss in ("dpo", "ipo", "simpo"):
        batch["groups"][0, 2] = 2  # pairwise losses: no padding needed here, keep full groups
    check(backend, batch, "mean" if loss == "simpo" else "sum", loss_kwargs(loss))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_fused_mean_reduction_and_bf16(backend):
    check(backend, make_batch(), "mean", loss_kwargs("epa"))
    check(backend, make_batch(torch.bfloat16), "sum", loss_kwargs("epa"))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_loss_need_not_be_the_last_op(backend):
    """Upstream gradients other than 1 reach the kernels: 3·loss + loss² differentiates correctly."""
    batch = make_batch()
    kwargs = loss_kwargs("epa")
    loss, _ = fused(batch, "sum", kwargs, backend)
    grads = torch.autograd.grad(3 * loss + loss**2, leaves(batch))
    ref_loss, _ = unfused(batch, "sum", kwargs, leaves(batch))
    ref_grads = torch.autograd.grad(3 * ref_loss + ref_loss**2, leaves(batch))
    for got, expected in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_reference_model_hidden_states(backend):
    batch = make_batch()
    ref_hidden = batch["hidden"].detach() + 0.1 * torch.randn_like(batch["hidden"])
    ref_weight = batch["weight"].detach() * 0.9
    args = (batch["hidden"], batch["weight"], batch["targets"], batch["groups"])
    common = {"cu_seqlens": batch["cu_seqlens"], "backend": backend, "beta": 0.5}
    via_hidden, _ = fused_linear_preference_loss(*args, ref_hidden=ref_hidden, ref_weight=ref_weight, **common)
    ref_logps = reference.linear_logprobs(ref_hidden, ref_weight, batch["targets"], cu_seqlens=batch["cu_seqlens"])
    via_logps, _ = fused_linear_preference_loss(*args, ref_logps=ref_logps, **common)
    torch.testing.assert_close(via_hidden, via_logps, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_dpo_module_chosen_first_layout(backend):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 5, DIM, generator=gen).to(DEVICE).requires_grad_()  # B = 3 pairs, T = 5
    weight = (torch.randn(VOCAB, DIM, generator=gen) / DIM**0.5).to(DEVICE).requires_grad_()
    targets = torch.randint(0, VOCAB, (6, 5), generator=gen).to(DEVICE)
    targets[:, :2] = -100  # prompt
    ref_logps = torch.randn(6, generator=gen).to(DEVICE) - 10
    loss, metrics = FusedLinearDPOLoss(beta=0.2, backend=backend)(hidden, weight, targets, ref_logps=ref_logps)
    logps = reference.linear_logprobs(hidden, weight, targets)
    margin = 0.2 * ((logps[:3] - ref_logps[:3]) - (logps[3:] - ref_logps[3:]))
    expected = -torch.nn.functional.logsigmoid(margin).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    g, e = torch.autograd.grad(loss, hidden)[0], torch.autograd.grad(expected, hidden)[0]
    torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    assert 0 <= metrics["accuracy"].item() <= 1


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_epa_module(backend):
    batch = make_batch()
    criterion = FusedLinearEPALoss(beta=0.5, num_strong=STRONG, weak_weight=0.3, margin=0.1, backend=backend)
    loss, _ = criterion(batch["hidden"], batch["weight"], batch["targets"], batch["groups"], batch["ref_logps"],
                        batch["cu_seqlens"], batch["bias"])
    expected, _ = unfused(batch, "sum", loss_kwargs("epa"), leaves(batch))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


BAD = [
    ({"groups": torch.tensor([[0, 99]])}, ValueError, "groups must index sequences"),
    ({"groups": torch.tensor([[-1, 1]])}, ValueError, "no positive"),
    ({"ref_logps": torch.zeros(3)}, ValueError, "ref_logps"),
    ({"loss": "orpo"}, ValueError, "loss"),
    ({"loss": "infonca"}, ValueError, "scores"),
    ({"beta": math.nan}, ValueError, "beta"),
    ({"reduction": "none"}, ValueError, "reduction"),
    ({"ref_weight": torch.zeros(VOCAB, DIM)}, ValueError, "ref_hidden"),
    ({"ref_hidden": torch.zeros(7, DIM), "ref_logps": None}, ValueError, "ref_hidden needs ref_weight"),
]


@pytest.mark.parametrize("overrides, error, text", BAD, ids=[f"{i}-{b[2][:16]}" for i, b in enumerate(BAD)])
def test_bad_input_fails_before_the_kernels(overrides, error, text, monkeypatch):
    batch = make_batch()
    overrides = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in overrides.items()}
    groups = overrides.pop("groups", batch["groups"])
    kwargs = {"cu_seqlens": batch["cu_seqlens"], "ref_logps": batch["ref_logps"], "backend": "torch", **overrides}
    from epa_kernels.ops import torch_logprobs

    monkeypatch.setattr(torch_logprobs, "forward", lambda *a, **k: pytest.fail("kernel ran on bad input"))
    with pytest.raises(error) as info:
        fused_linear_preference_loss(batch["hidden"], batch["weight"], batch["targets"], groups, **kwargs)
    assert text in str(info.value), str(info.value)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_long_sequences_keep_precision(backend):
    """Sequence log-probs near −3000 whose differences drive the loss: summed in float64, so DPO on 512-token
    responses stays within 2× the materialised fp32 reference's error (a sequential fp32 sum fails this)."""
    gen = torch.Generator().manual_seed(fresh_seed())
    vocab, dim, length = 256, 16, 512
    hidden = torch.randn(4 * length, dim, generator=gen).to(DEVICE).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) / dim**0.5).to(DEVICE).requires_grad_()
    targets = torch.randint(0, vocab, (4 * length,), generator=gen).to(DEVICE)
    cu_seqlens = torch.arange(0, 5 * length, length, device=DEVICE)
    groups = torch.tensor([[0, 1], [2, 3]], device=DEVICE)
    with torch.no_grad():  # a reference close to the policy, so rewards are differences of large numbers
        ref_logps = reference.linear_logprobs(hidden, weight, targets, cu_seqlens=cu_seqlens)
        ref_logps += torch.randn(4, generator=gen).to(DEVICE)
    loss, _ = fused_linear_preference_loss(hidden, weight, targets, groups, cu_seqlens=cu_seqlens,
                                           ref_logps=ref_logps, loss="dpo", beta=1.0, backend=backend)
    fp32 = preference_loss(reference.linear_logprobs(hidden, weight, targets, cu_seqlens=cu_seqlens), ref_logps,
                           groups, loss="dpo", beta=1.0)[0]
    h64, w64 = hidden.detach().double().cpu(), weight.detach().double().cpu()
    truth = preference_loss(reference.linear_logprobs(h64, w64, targets.cpu(), cu_seqlens=cu_seqlens.cpu()),
                            ref_logps.double().cpu(), groups.cpu(), loss="dpo", beta=1.0)[0]
    assert_matches_reference("loss", loss.reshape(1), fp32.reshape(1), truth.reshape(1))
