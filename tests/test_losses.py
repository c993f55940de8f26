"""The preference-loss family against independent per-prompt formulas, identities, and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import fresh_seed

from epa_kernels import make_groups, preference_loss

BETA = 0.3


def random_batch(num_prompts=4, num_strong=2, num_weak=3, *, seed=None, shared_weak=False, pad=True):
    """Log-probs for S sequences and groups with padding and (optionally) weak negatives shared by prompts."""
    gen = torch.Generator().manual_seed(seed if seed is not None else fresh_seed())
    groups = make_groups(num_prompts, num_strong, num_weak)
    if shared_weak:  # every prompt's weak negatives are the next prompt's positive and strong responses
        size = groups.shape[1]
        for p in range(num_prompts):
            other = (p + 1) % num_prompts
            first = other * size  # the other prompt's positive and strong responses, cycled
            groups[p, 1 + num_strong :] = first + torch.arange(num_weak) % (1 + num_strong)
    if pad:
        groups[0, -1] = -1  # a padded weak slot
        if num_strong > 1:
            groups[1, num_strong] = -1  # a padded strong slot
    num_seqs = num_prompts * groups.shape[1]
    policy = (torch.randn(num_seqs, generator=gen, dtype=torch.float64) * 3 - 20).requires_grad_()
    ref = torch.randn(num_seqs, generator=gen, dtype=torch.float64) * 3 - 20
    return policy, ref, groups


def per_prompt(groups, num_strong):
    """Yield (p, positive, strong list, weak list) of sequence indices, padding dropped."""
    for p, row in enumerate(groups.tolist()):
        yield p, row[0], [s for s in row[1 : 1 + num_strong] if s >= 0], [s for s in row[1 + num_strong :] if s >= 0]


def direct_loss(name, policy, ref, groups, num_strong, *, weak_weight=1.0, positive_weight=1.0, margin=0.0,
                label_smoothing=0.0, scores=None):
    """Plain formulas, one prompt at a time, straight from the papers' definitions."""
    r = BETA * (policy - ref) if ref is not None else BETA * policy
    total = 0.0
    for p, pos, strong, weak in per_prompt(groups, num_strong):
        negs = strong + weak
        neg_w = [1.0] * len(strong) + [weak_weight] * len(weak)
        rp = r[pos] - margin
        if name == "epa":
            negatives = sum(w * torch.exp(r[j]) for j, w in zip(negs, neg_w, strict=True))
            inside = positive_weight * torch.exp(rp) + negatives
            loss = torch.log(inside) - rp
        elif name in ("dpo", "simpo"):
            pairs = [-(1 - label_smoothing) * F.logsigmoid(rp - r[j]) - label_smoothing * F.logsigmoid(r[j] - rp)
                     for j in negs]
            loss = sum(w * x for w, x in zip(neg_w, pairs, strict=True)) / sum(neg_w)
        elif name == "ipo":
            pairs = [((r[pos] - r[j]) / BETA - 1 / (2 * BETA)) ** 2 for j in negs]
            loss = sum(w * x for w, x in zip(neg_w, pairs, strict=True)) / sum(neg_w)
        elif name == "sdpo":
            loss = -F.logsigmoid(-torch.log(sum(torch.exp(r[j] - rp) for j in strong)))
        elif name in ("infonca", "nca"):
            members = [pos] + negs
            if scores is None:
                t = [1.0] + [0.0] * len(negs)
            else:
                row = [scores[p, c].item() for c, s in enumerate(groups[p].tolist()) if s >= 0]
                z = sum(math.exp(x) for x in row)
                t = [math.exp(x) / z for x in row]
            if name == "infonca":
                log_z = torch.log(sum(torch.exp(r[j]) for j in members))
                loss = -sum(tj * (r[j] - log_z) for tj, j in zip(t, members, strict=True))
            else:
                n = len(members)
                loss = -sum(tj * F.logsigmoid(r[j]) + F.logsigmoid(-r[j]) / n for tj, j in zip(t, members, strict=True))
        elif name == "plackett_luce":
            ranked = [pos] + negs
            loss = -sum(r[ranked[k]] - torch.log(sum(torch.exp(r[j]) for j in ranked[k:])) for k in range(len(ranked)))
        total = total + loss
    return total / groups.shape[0]


def compare(name, policy, ref, groups, num_strong, **kwargs):
    loss, metrics = preference_loss(policy, ref, groups, loss=name, beta=BETA, num_strong=num_strong, **kwargs)
    direct_kwargs = {k: v for k, v in kwargs.items() if k != "score_temperature"}
    expected = direct_loss(name, policy, ref, groups, num_strong, **direct_kwargs)
    (grad,) = torch.autograd.grad(loss, policy)
    (expected_grad,) = torch.autograd.grad(expected, policy)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)  # float64 in, float64 throughout
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    assert loss.dtype == torch.float64 and all(not v.requires_grad for v in metrics.values())
    return loss, metrics


@pytest.mark.parametrize("name", ["epa", "dpo", "ipo", "sdpo", "infonca", "nca"])
@pytest.mark.parametrize("shared_weak", [False, True], ids=["own-weak", "shared-weak"])
def test_loss_matches_direct_formula(name, shared_weak):
    policy, ref, groups = random_batch(shared_weak=shared_weak)
    kwargs = {"scores": torch.randn(groups.shape, dtype=torch.float64)} if name == "infonca" else {}
    compare(name, policy, ref, groups, num_strong=2, **kwargs)


def test_simpo_is_reference_free_with_margin():
    policy, _, groups = random_batch()
    compare("simpo", policy, None, groups, num_strong=2, margin=0.5)


def test_plackett_luce_ranked_lists():
    policy, ref, groups = random_batch(num_strong=4, num_weak=0, pad=False)
    groups[0, -2:] = -1  # trailing padding: a shorter ranked list
    compare("plackett_luce", policy, ref, groups, num_strong=4)


def test_epa_knobs_weights_margin():
    policy, ref, groups = random_batch()
    compare("epa", policy, ref, groups, num_strong=2, weak_weight=0.25, positive_weight=2.0, margin=0.3)
    compare("dpo", policy, ref, groups, num_strong=2, weak_weight=0.5, label_smoothing=0.1, margin=0.2)


def test_nca_with_scores_and_temperature():
    policy, ref, groups = random_batch()
    scores = torch.randn(groups.shape, dtype=torch.float64)
    loss_t, _ = preference_loss(policy, ref, groups, loss="nca", beta=BETA, scores=scores * 2, score_temperature=2.0)
    loss_1, _ = preference_loss(policy, ref, groups, loss="nca", beta=BETA, scores=scores)
    torch.testing.assert_close(loss_t, loss_1)
    compare("nca", policy, ref, groups, num_strong=2, scores=scores)


def test_epa_with_one_strong_negative_is_dpo():
    policy, ref, groups = random_batch(num_strong=1, num_weak=0, pad=False)
    epa, _ = preference_loss(policy, ref, groups, loss="epa", beta=BETA)
    dpo, _ = preference_loss(policy, ref, groups, loss="dpo", beta=BETA)
    r = BETA * (policy - ref)
    by_hand = -F.logsigmoid(r[groups[:, 0]] - r[groups[:, 1]]).mean()
    torch.testing.assert_close(epa.double(), dpo.double(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(epa.double(), by_hand, rtol=1e-6, atol=1e-7)


def test_epa_strong_only_is_sdpo():
    policy, ref, groups = random_batch(num_strong=3, num_weak=0)
    epa, _ = preference_loss(policy, ref, groups, loss="epa", beta=BETA)
    sdpo, _ = preference_loss(policy, ref, groups, loss="sdpo", beta=BETA)
    torch.testing.assert_close(epa, sdpo, rtol=1e-6, atol=1e-6)


def test_infonca_with_one_hot_scores_is_epa():
    policy, ref, groups = random_batch()
    one_hot = torch.full(groups.shape, -math.inf, dtype=torch.float64)
    one_hot[:, 0] = 0.0
    infonca, _ = preference_loss(policy, ref, groups, loss="infonca", beta=BETA, scores=one_hot)
    epa, _ = preference_loss(policy, ref, groups, loss="epa", beta=BETA)
    torch.testing.assert_close(infonca, epa)


def test_epa_gradient_is_softmax_minus_onehot():
    """∂ℓ_p/∂r_j = q_j − 1[j = positive], q the weighted softmax over the group (DESIGN §3)."""
    policy, ref, groups = random_batch(num_prompts=1, pad=False)
    loss, _ = preference_loss(policy, ref, groups, loss="epa", beta=1.0, weak_weight=0.5, num_strong=2)
    (grad,) = torch.autograd.grad(loss, policy)
    r = (policy - ref).detach()[groups[0]]
    c = torch.tensor([1, 1, 1, 0.5, 0.5, 0.5], dtype=torch.float64)
    q = c * r.exp() / (c * r.exp()).sum()
    q[0] -= 1
    torch.testing.assert_close(grad[groups[0]].double(), q, rtol=1e-4, atol=1e-6)


def test_metrics():
    policy = torch.tensor([0.0, -1.0, -2.0, -3.0, -0.5, -0.2, 0.3, -1.0])
    groups = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    _, m = preference_loss(policy, None, groups, loss="epa", beta=1.0, num_strong=1)
    assert m["accuracy"].item() == 0.5  # prompt 0's positive beats all; prompt 1's loses to 0.3
    torch.testing.assert_close(m["reward_positive"], torch.tensor(-0.25))
    torch.testing.assert_close(m["reward_strong"], torch.tensor(-0.6))
    torch.testing.assert_close(m["reward_weak"], torch.tensor((-2 - 3 + 0.3 - 1.0) / 4))
    torch.testing.assert_close(m["margin"], torch.tensor(((0 + 2) + (-0.5 + 0.3)) / 2))
    assert 0 < m["positive_prob"].item() < 1


def test_padding_never_makes_nan():
    policy, ref, groups = random_batch(num_prompts=3, num_strong=2, num_weak=2)
    groups[2, 1:] = -1  # a prompt with only its positive
    for name in ("epa", "infonca", "nca"):
        kwargs = {"scores": torch.randn(groups.shape, dtype=torch.float64)} if name == "infonca" else {}
        loss, _ = preference_loss(policy, ref, groups, loss=name, **kwargs)
        (grad,) = torch.autograd.grad(loss, policy)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), name


BAD = [
    ({"groups": torch.tensor([[0, 9]])}, ValueError, "[0, 8)"),
    ({"groups": torch.tensor([[-1, 1]])}, ValueError, "no positive"),
    ({"groups": torch.tensor([[0, -2]])}, ValueError, "-1 padding"),
    ({"groups": torch.tensor([0, 1])}, ValueError, "groups"),
    ({"groups": torch.tensor([[0.0, 1.0]])}, TypeError, "groups"),
    ({"ref_logps": torch.zeros(7)}, ValueError, "ref_logps"),
    ({"loss": "kto"}, ValueError, "loss"),
    ({"loss": "infonca"}, ValueError, "scores"),
    ({"beta": float("nan")}, ValueError, "beta"),
    ({"beta": float("inf")}, ValueError, "beta"),
    ({"beta": 0.0}, ValueError, "beta"),
    ({"loss": "simpo"}, ValueError, "reference-free"),
    ({"num_strong": 5}, ValueError, "num_strong"),
    ({"label_smoothing": 0.5}, ValueError, "label_smoothing"),
    ({"loss": "nca", "margin": 1.0}, ValueError, "margin"),
    ({"loss": "dpo", "groups": torch.tensor([[0, -1], [2, 3]])}, ValueError, "no negative"),
    ({"loss": "dpo", "num_strong": 1, "weak_weight": 0.0, "groups": torch.tensor([[0, -1, 2, 3], [4, 5, 6, 7]])},
     ValueError, "every negative has weight 0"),
    ({"loss": "ipo", "weights": torch.tensor([[1.0, 1, 1, 1], [1, 0, 0, 0]])}, ValueError, "groups row 1"),
    ({"loss": "simpo", "ref_logps": None, "weights": torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1]])}, ValueError,
     "weight 0"),
    ({"loss": "nca", "weights": torch.ones(2, 4)}, ValueError, "weights is not used by loss='nca'"),
    ({"loss": "plackett_luce", "weak_weight": 0.5}, ValueError, "weak_weight is not used by loss='plackett_luce'"),
    ({"loss": "nca", "positive_weight": 2.0}, ValueError, "positive_weight is not used by loss='nca'"),
    ({"loss": "dpo", "positive_weight": 3.0}, ValueError, "positive_weight is not used by loss='dpo'"),
    ({"loss": "sdpo", "positive_weight": 3.0}, ValueError, "positive_weight is not used by loss='sdpo'"),
    ({"loss": "epa", "score_temperature": 2.0}, ValueError, "score_temperature is not used by loss='epa'"),
    ({"loss": "sdpo", "weak_weight": 0.5}, ValueError, "weak_weight is not used by loss='sdpo'"),
    ({"weights": torch.ones(2, 3)}, ValueError, "weights"),
    ({"weights": -torch.ones(2, 4)}, ValueError, "weights"),
    ({"loss": "plackett_luce", "groups": torch.tensor([[0, -1, 2, 3]])}, ValueError, "ordered"),
    ({"policy_logps": torch.zeros(8, 1)}, ValueError, "policy_logps"),
]


@pytest.mark.parametrize("overrides, error, text", BAD, ids=[f"{i}-{b[2][:16]}" for i, b in enumerate(BAD)])
def test_bad_input(overrides, error, text):
    args = {"policy_logps": torch.randn(8), "ref_logps": torch.randn(8), "groups": make_groups(2, 1, 2)}
    args.update(overrides)
    positional = [args.pop("policy_logps"), args.pop("ref_logps"), args.pop("groups")]
    with pytest.raises(error) as info:
        preference_loss(*positional, **args)
    assert text in str(info.value), str(info.value)


def test_make_groups():
    torch.testing.assert_close(make_groups(2, 1, 2), torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]))
    with pytest.raises(ValueError, match="num_prompts"):
        make_groups(0, 1)
    with pytest.raises(TypeError, match="num_weak"):
        make_groups(1, 1, 2.0)
