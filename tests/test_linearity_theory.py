"""python -m benchmarks.linearity_theory: the world and its data, the closed forms the argument rests on (softmax MLE =
log counts, Bradley–Terry MLE = log odds, EPA 1+1 = DPO), non-uniqueness at a tiny size, determinism, the CLI.

Every test uses fixed seeds and prints them."""
import json
import math
import re
from itertools import permutations

import numpy as np
import pytest
import torch

from benchmarks import linearity_theory as theory
from benchmarks.linearity_world import (
    NetworkPolicy,
    Preferences,
    TabularPolicy,
    WorldConfig,
    centred,
    draw_preferences,
    implicit_spread,
    make_world,
    objective,
    train,
)

BETA = 0.1


def tiny_world(seed, prompts=2, responses=5, reward_std=0.7):
    print(f"seed {seed}")
    return make_world(WorldConfig(num_prompts=prompts, num_responses=responses, feature_dim=3, reward_std=reward_std),
                      seed)


def pair_data(world, spec):
    """Preferences from (prompt, winner, loser, times) tuples: rows [winner, loser] into the flat [X·Y] table."""
    Y = world.config.num_responses
    rows = [[x * Y + a, x * Y + b] for x, a, b, times in spec for _ in range(times)]
    return Preferences(torch.tensor(rows), 1, world.config.num_prompts, Y)


def restarts(world, prefs, loss, runs=4, noise=1.0, seed=0):
    """L-BFGS trainings from `runs` noisy tabular initialisations on the same data."""
    return [train(TabularPolicy(world, BETA, init_noise=noise, seed=seed, purpose=f"restart/{r}"), world, prefs,
                  loss=loss, beta=BETA, steps=300, optimizer="lbfgs") for r in range(runs)]


# ---------------------------------------------------------------------------------------------------------------
# The world and its data


def test_world_reward_scale_reference_and_the_weak_negative_premise():
    world = tiny_world(3, prompts=16, responses=64, reward_std=1.5)
    assert world.true_reward.std(1).mean() == pytest.approx(1.5, rel=1e-12)
    np.testing.assert_allclose(np.exp(world.ref_logps).sum(1), 1.0, rtol=1e-12)
    probs, r = np.exp(world.ref_logps), world.true_reward
    others = [np.delete(probs, x, axis=0).mean(0) for x in range(16)]  # a response written for another prompt
    np.testing.assert_allclose(world.other_prompt_mixture(), others, rtol=1e-12)
    gap = np.mean([probs[x] @ r[x] - others[x] @ r[x] for x in range(16)])
    assert world.own_vs_other_gap() == pytest.approx(gap, rel=1e-12)
    assert gap > 0.5  # own-prompt samples are better for their prompt
    flat = make_world(WorldConfig(num_prompts=16, num_responses=64, ref_sharpness=0.0, ref_noise=0.0), 3)
    assert flat.own_vs_other_gap() == pytest.approx(0.0, abs=1e-12)  # a uniform reference has no such gap


@pytest.mark.parametrize("choice", ["strong", "all"])
def test_groups_hold_distinct_responses_of_their_own_prompt(choice):
    world = tiny_world(5, prompts=4, responses=12)
    K, W, n = 3, 5, 9
    prefs = draw_preferences(world, 5, n, K, W, choice)
    groups = prefs.groups.numpy()
    assert groups.shape == (4 * n, 1 + K + W + (choice == "all"))
    prompt = np.repeat(np.arange(4), n)
    real = groups >= 0
    assert ((groups // 12 == prompt[:, None]) | ~real).all()  # every column is scored under the row's prompt
    assert all(len(set(row[row >= 0])) == real[i].sum() == 1 + K + W for i, row in enumerate(groups))
    if choice == "strong":
        assert prefs.num_strong == K and real.all()
    else:  # one slot left empty where the positive came from
        assert prefs.num_strong == K + 1 and ((~real).sum(1) == 1).all()


def test_weak_sets_nest_and_strong_sets_do_not_depend_on_w():
    world = tiny_world(6, prompts=3, responses=20)
    small, large = (draw_preferences(world, 6, 5, 2, W).groups for W in (3, 10))
    assert torch.equal(small[:, :3], large[:, :3])  # the positive and strong negatives
    assert torch.equal(small[:, 3:], large[:, 3:6])  # W = 3's weak negatives are W = 10's first three


def test_bradley_terry_pairs_are_drawn_as_the_model_assumes():
    """K = 1: the pair is two draws without replacement from π_ref and the winner wins with σ(r*_a − r*_b)."""
    world = tiny_world(7, prompts=2, responses=3, reward_std=1.0)
    n = 20000
    groups = draw_preferences(world, 7, n, 1).groups.numpy() % 3
    for x in range(2):
        rows, p, r = groups[x * n:(x + 1) * n], np.exp(world.ref_logps[x]), world.true_reward[x]
        for a, b in ((0, 1), (0, 2), (1, 2)):
            both = ((rows[:, 0] == a) & (rows[:, 1] == b)) | ((rows[:, 0] == b) & (rows[:, 1] == a))
            expected_pair = p[a] * p[b] / (1 - p[a]) + p[b] * p[a] / (1 - p[b])
            assert both.mean() == pytest.approx(expected_pair, abs=4 * math.sqrt(expected_pair / n))
            wins, expected = (rows[both, 0] == a).mean(), 1 / (1 + math.exp(r[b] - r[a]))
            assert wins == pytest.approx(expected, abs=4 * math.sqrt(expected * (1 - expected) / both.sum()))


@pytest.mark.parametrize("choice, K, W", [("strong", 3, 0), ("all", 1, 2)])
def test_the_positive_is_drawn_by_the_energy_model_over_the_choice_set(choice, K, W):
    """With a choice set of all 4 responses, the positive's law is softmax(r*(x, ·))."""
    world = tiny_world(10, prompts=2, responses=4, reward_std=1.0)
    n = 20000
    counts = draw_preferences(world, 10, n, K, W, choice).counts() / n
    expected = np.exp(world.true_reward) / np.exp(world.true_reward).sum(1, keepdims=True)
    np.testing.assert_allclose(counts, expected, atol=4 * math.sqrt(0.25 / n))


def test_weak_negatives_follow_the_other_prompt_mixture_outside_the_strong_set():
    world = tiny_world(8, prompts=3, responses=4, reward_std=1.0)
    n = 20000
    groups = draw_preferences(world, 8, n, 1, 1).groups.numpy() % 4
    p, m = np.exp(world.ref_logps), world.other_prompt_mixture()
    for x in range(3):
        expected = np.zeros(4)
        for a, b in permutations(range(4), 2):  # the ordered strong draw, then the weak one among the rest
            rest = [y for y in range(4) if y not in (a, b)]
            expected[rest] += p[x, a] * p[x, b] / (1 - p[x, a]) * m[x, rest] / m[x, rest].sum()
        observed = np.bincount(groups[x * n:(x + 1) * n, 2], minlength=4) / n
        np.testing.assert_allclose(observed, expected, atol=4 * math.sqrt(0.25 / n))


def test_both_policy_families_start_at_the_reference():
    world = tiny_world(9)
    ref = torch.tensor(world.ref_logps, dtype=torch.float64)
    for policy in (TabularPolicy(world, BETA), NetworkPolicy(world, BETA, seed=1), NetworkPolicy(world, BETA, seed=2)):
        torch.testing.assert_close(policy().detach(), ref, rtol=0, atol=1e-12)
    one, two = NetworkPolicy(world, BETA, seed=1), NetworkPolicy(world, BETA, seed=2)
    assert not torch.equal(one.hidden.weight, two.hidden.weight)  # restarts differ, in the hidden layer only


# ---------------------------------------------------------------------------------------------------------------
# Closed forms


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_epa_over_every_response_is_the_softmax_mle_log_counts(beta):
    """Group = the positive and every other response (K + 1 + W = |Y|, choice set `all`), α = 1: the loss is the
    multinomial-logit likelihood, whose maximiser is r(x, y) = log(count(x, y) / n_x) + c(x)."""
    world = tiny_world(11)
    prefs = draw_preferences(world, 11, 300, 1, 3, "all")
    assert ((prefs.groups >= 0).sum(1) == 5).all()
    counts = prefs.counts()
    assert counts.min() > 0, "the closed form needs every response chosen at least once"
    fit = train(TabularPolicy(world, beta, init_noise=0.5, seed=11), world, prefs, loss="epa", beta=beta, steps=300,
                optimizer="lbfgs")
    np.testing.assert_allclose(centred(fit.implicit), centred(np.log(counts)), atol=1e-4)
    assert fit.grad_norm < 1e-6
    # A weak weight α ≠ 1 is a different model (the positive was drawn without it): not the log counts.
    other = train(TabularPolicy(world, beta), world, prefs, loss="epa", beta=beta, weak_weight=0.5, steps=300,
                  optimizer="lbfgs")
    assert np.abs(centred(other.implicit) - centred(np.log(counts))).max() > 0.05


def test_dpo_on_one_pair_per_prompt_recovers_the_log_odds_and_leaves_the_rest_at_init():
    world = tiny_world(12, prompts=3, responses=4)
    spec = [(0, 0, 1, 7), (0, 1, 0, 2), (1, 2, 3, 1), (1, 3, 2, 5), (2, 1, 3, 4), (2, 3, 1, 4)]  # n_ab, n_ba > 0
    policy = TabularPolicy(world, BETA, init_noise=0.5, seed=12)
    start = policy.change.detach().clone().numpy()
    fit = train(policy, world, pair_data(world, spec), loss="dpo", beta=BETA, steps=300, optimizer="lbfgs")
    for x, a, b, n_ab, n_ba in ((0, 0, 1, 7, 2), (1, 2, 3, 1, 5), (2, 1, 3, 4, 4)):
        assert fit.implicit[x, a] - fit.implicit[x, b] == pytest.approx(math.log(n_ab / n_ba), abs=1e-6)
    # the two responses of prompt 0 that no pair compares keep their initial difference
    assert fit.implicit[0, 2] - fit.implicit[0, 3] == pytest.approx(start[0, 2] - start[0, 3], abs=1e-12)
    assert abs(start[0, 2] - start[0, 3]) > 1e-3


def test_epa_with_one_strong_negative_is_dpo_in_loss_and_gradient():
    world = tiny_world(13, prompts=3, responses=6)
    policy = TabularPolicy(world, BETA, init_noise=1.0, seed=13)
    for K, same in ((1, True), (3, False)):
        prefs = draw_preferences(world, 13, 10, K)
        values, grads = [], []
        for loss in ("epa", "dpo"):
            value = objective(policy, world, prefs, loss=loss, beta=BETA)
            values.append(value.item())
            grads.append(torch.autograd.grad(value, policy.change)[0])
        if same:
            assert values[0] == pytest.approx(values[1], rel=1e-12)
            torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-14)
        else:  # with 3 negatives, the log-sum-exp and the mean pairwise loss differ
            assert abs(values[0] - values[1]) > 1e-2


def test_dpo_minimisers_are_many_and_epa_over_every_response_has_one():
    """Pairs that connect {0, 1, 2} and {3, 4} (each with wins both ways, so the MLE is finite) and never response 5:
    DPO's optimum is unique inside each component only; the offsets between components and response 5 stay where the
    initialisation put them, at the same loss. EPA over every response with every count > 0 pins all of them."""
    world = tiny_world(14, prompts=2, responses=6)
    spec = [(x, a, b, t) for x in range(2) for a, b, t in ((0, 1, 2), (1, 0, 1), (1, 2, 2), (2, 1, 1), (3, 4, 1),
                                                           (4, 3, 2))]
    dpo = restarts(world, pair_data(world, spec), "dpo", seed=14)
    losses = [f.loss for f in dpo]
    print("DPO losses", losses, "spread", implicit_spread([f.implicit for f in dpo]))
    assert max(losses) - min(losses) < 1e-6
    assert implicit_spread([f.implicit for f in dpo]) > 0.3
    inside = [f.implicit[:, 0] - f.implicit[:, 2] for f in dpo]  # within a component: pinned
    assert np.ptp(inside, axis=0).max() < 1e-5

    prefs = draw_preferences(world, 14, 300, 1, 4, "all")
    assert prefs.counts().min() > 0
    epa = restarts(world, prefs, "epa", seed=14)
    losses = [f.loss for f in epa]
    print("EPA losses", losses, "spread", implicit_spread([f.implicit for f in epa]))
    assert max(losses) - min(losses) < 1e-6
    assert implicit_spread([f.implicit for f in epa]) < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# The program


def quick_args(*extra):
    return theory.parse_args(["--quick", *extra])


def test_a_cell_is_deterministic_given_its_seed():
    args = quick_args()
    cell = theory.Cell("kw-tabular", "tabular", "epa", 3, 4, 1.0, 8)
    first, again, other = (theory.run_cell(cell, args, seed) for seed in (21, 21, 22))
    print("seeds 21, 21, 22")
    for key in theory.METRICS:
        assert first[key] == again[key] or (math.isnan(first[key]) and math.isnan(again[key])), key
    assert first["error"] != other["error"]
    network = theory.Cell("kw-network", "network", "dpo-pairs", 1, 0, 1.0, 8)
    assert theory.run_cell(network, args, 21)["error"] == theory.run_cell(network, args, 21)["error"]


def test_quick_run_writes_table_json_and_plot_and_records(tmp_path, capsys):
    threads = torch.get_num_threads()
    assert theory.main(["--quick", "--out", str(tmp_path / "out"), "--record", str(tmp_path / "results")]) == 0
    assert torch.get_num_threads() == threads  # --threads 1 held for the sweep only
    out = tmp_path / "out"
    summary = (out / "summary.md").read_text()
    for heading in ("K strong × W weak", "Weak weight α", "Data size", "Non-uniqueness", "Budget check"):
        assert heading in summary
    assert "| DPO pairs | 1 | 0 |" in summary
    record = json.loads((out / "results.json").read_text())
    assert record["options"]["quick"] and record["environment"]["device"]
    assert len(record["cells"]) == len(theory.plan(quick_args()))
    assert {c["arm"] for c in record["cells"]} == {"dpo-pairs", "dpo-avg", "epa"}
    assert all(len(c["per_seed"]) == 2 for c in record["cells"])
    assert len(record["restarts"]) == 10 and all(r["loss_spread"][0] >= 0 for r in record["restarts"])
    assert (out / "linearity_theory.png").read_bytes()[:4] == b"\x89PNG"
    folders = list((tmp_path / "results").iterdir())
    assert len(folders) == 1 and re.fullmatch(r"\d{4}-\d{2}-\d{2}_cpu_linearity-theory", folders[0].name)
    assert sorted(p.name for p in folders[0].iterdir()) == ["linearity_theory.png", "results.json", "summary.md"]


@pytest.mark.parametrize("argv, option", [
    (["--num-responses", "1"], "--num-responses"),
    (["--strong", "7", "--weak", "56", "--num-responses", "32"], "--num-responses"),
    (["--sweep-strong", "3", "--sweep-weak", "13"], "--sweep-weak"),
    (["--weak-weights", "0.5,-0.25"], "--weak-weights"),
    (["--strong", "1,x"], "--strong"),
    (["--strong", "0"], "--strong"),
    (["--families", "tabular,transformer"], "--families"),
    (["--restarts", "1"], "--restarts"),
    (["--beta", "0"], "--beta"),
    (["--lr", "nan"], "--lr"),
])
def test_bad_options_fail_naming_the_option(argv, option, capsys):
    with pytest.raises(SystemExit) as error:
        quick_args(*argv)
    assert error.value.code == 2
    assert option in capsys.readouterr().err
