"""The linearity test (epa_kernels.transformers.linearity) and its program, python -m training.evaluate."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from scipy import stats
from tiny_models import tiny_causal_lm, tiny_tokenizer

from epa_kernels.transformers.linearity import linearity_report, win_rate


def response_length(prompt, response):
    """A gold reward for the program's --gold-reward test: longer answers are better."""
    return float(len(response))


def length_unless_hamlet(prompt, response):
    """A gold reward with a known tie: the answer's length, but the same for every answer about Hamlet."""
    return 0.0 if "Hamlet" in prompt else float(len(response))


def random_prompts(rng, num_prompts=7, sizes=(3, 6)):
    """Ragged per-prompt gold rewards (continuous, so no ties: all in the means) and per-prompt offsets."""
    gold = [rng.normal(size=rng.integers(sizes[0], sizes[1] + 1)) for _ in range(num_prompts)]
    offsets = rng.normal(scale=10, size=num_prompts)
    return gold, offsets


def centred(rows):
    return [np.asarray(row, dtype=float) - np.mean(row) for row in rows]


# ---------------------------------------------------------------------------------------------------------------
# The report


@pytest.mark.parametrize("scale", [0.3, 1.0, 2.5])
def test_exact_linear_rewards_give_pearson_one_and_their_slope(scale):
    rng = np.random.default_rng()
    gold, offsets = random_prompts(rng)
    implicit = [scale * g + c for g, c in zip(gold, offsets, strict=True)]  # per-prompt constants: invisible
    report = linearity_report(implicit, gold)
    assert report.mean_pearson == pytest.approx(1.0, abs=1e-12)
    assert report.pooled_pearson == pytest.approx(1.0, abs=1e-12)
    assert report.mean_slope == pytest.approx(scale, rel=1e-10)
    assert report.pooled_slope == pytest.approx(scale, rel=1e-10)
    assert report.per_prompt_slope == pytest.approx([scale] * len(gold), rel=1e-10)
    assert report.mean_regression_error == pytest.approx(
        np.mean([(scale - 1) ** 2 * np.mean(x ** 2) for x in centred(gold)]), rel=1e-9, abs=1e-20)
    assert report.pairwise_accuracy == 1.0
    assert report.num_prompts == len(gold)
    assert report.num_responses == sum(map(len, gold))
    assert report.num_pairs == sum(len(g) * (len(g) - 1) // 2 for g in gold)
    assert report.constant_gold == report.two_valued_gold == report.constant_implicit == 0


def test_noise_lowers_the_correlation():
    rng = np.random.default_rng()
    gold, offsets = random_prompts(rng, num_prompts=20, sizes=(4, 8))
    noise = [rng.normal(size=len(g)) for g in gold]
    pearsons = []
    for sigma in (0.0, 0.3, 3.0):
        implicit = [g + c + sigma * n for g, c, n in zip(gold, offsets, noise, strict=True)]
        pearsons.append(linearity_report(implicit, gold).pooled_pearson)
    assert pearsons[0] == pytest.approx(1.0)
    assert pearsons[0] > pearsons[1] > pearsons[2]
    implicit = [g + c + 0.3 * n for g, c, n in zip(gold, offsets, noise, strict=True)]
    assert linearity_report(implicit, gold).mean_pearson < 1.0


def test_numbers_match_numpy_and_scipy():
    rng = np.random.default_rng()
    gold, offsets = random_prompts(rng, num_prompts=9)
    implicit = [0.5 * g + c + rng.normal(scale=0.4, size=len(g)) for g, c in zip(gold, offsets, strict=True)]
    report = linearity_report([list(row) for row in implicit], gold)  # lists and arrays both accepted
    per_pearson = [stats.pearsonr(g, r).statistic for g, r in zip(gold, implicit, strict=True)]
    per_slope = [np.polyfit(g, r, 1)[0] for g, r in zip(gold, implicit, strict=True)]  # with an intercept
    assert report.per_prompt_pearson == pytest.approx(per_pearson, rel=1e-9)
    assert report.per_prompt_slope == pytest.approx(per_slope, rel=1e-9)
    assert report.mean_pearson == pytest.approx(np.mean(per_pearson), rel=1e-9)
    assert report.mean_slope == pytest.approx(np.mean(per_slope), rel=1e-9)
    per_error = [np.mean((y - x) ** 2) for x, y in zip(centred(gold), centred(implicit), strict=True)]
    assert report.per_prompt_regression_error == pytest.approx(per_error, rel=1e-9)
    assert report.mean_regression_error == pytest.approx(np.mean(per_error), rel=1e-9)
    x, y = np.concatenate(centred(gold)), np.concatenate(centred(implicit))
    assert report.pooled_pearson == pytest.approx(stats.pearsonr(x, y).statistic, rel=1e-9)
    assert report.pooled_slope == pytest.approx(np.polyfit(x, y, 1)[0], rel=1e-9)
    pairs = [(np.sign(g[i] - g[j]), np.sign(r[i] - r[j])) for g, r in zip(gold, implicit, strict=True)
             for i in range(len(g)) for j in range(i + 1, len(g))]
    assert report.pairwise_accuracy == pytest.approx(np.mean([a == b for a, b in pairs]))


def test_constant_prompts_are_excluded_and_counted():
    implicit = [[0.1, 0.4, 0.2], [3.0, 3.0, 3.0], [0.5, 0.7], [2.0, 1.0, 0.0]]
    gold = [[1.0, 2.0, 3.0], [0.0, 1.0, 2.0], [0.3, 0.3], [0.0, 1.0, 2.0]]  # prompt 2: gold ties only
    report = linearity_report(implicit, gold)
    assert report.constant_gold == 1 and report.constant_implicit == 1
    assert math.isnan(report.per_prompt_pearson[1]) and math.isnan(report.per_prompt_pearson[2])
    assert math.isnan(report.per_prompt_slope[2])
    assert report.per_prompt_slope[1] == 0.0  # a flat implicit reward does not respond to gold: slope 0
    assert report.mean_pearson == pytest.approx(np.mean([report.per_prompt_pearson[0], -1.0]))
    assert report.mean_slope == pytest.approx(np.mean([0.05, 0.0, -1.0]))
    assert math.isnan(report.per_prompt_regression_error[2])
    assert report.per_prompt_regression_error[1] == pytest.approx(2 / 3)  # flat implicit: mean x² of gold
    assert report.num_pairs == 9  # prompt 2's tied pair is no pair
    # Prompt 1 contributes 3 implicit ties (0.5 each), prompt 3 three reversed pairs, prompt 0 two of three right.
    assert report.pairwise_accuracy == pytest.approx((2 + 1.5 + 0) / 9)
    as_dict = report.to_dict()
    assert as_dict["per_prompt_pearson"][1] is None and as_dict["constant_gold"] == 1
    json.dumps(as_dict, allow_nan=False)


def test_nothing_to_average_is_nan():
    report = linearity_report([[0.0, 0.0], [1.0, 1.0]], [[1.0, 2.0], [3.0, 3.0]])
    assert math.isnan(report.mean_pearson) and math.isnan(report.pooled_pearson)
    assert math.isnan(report.mean_slope) and math.isnan(report.mean_regression_error)  # no prompt has 3 values
    assert report.pooled_slope == 0.0
    assert report.two_valued_gold == 1 and report.constant_gold == 1 and report.constant_implicit == 0
    assert report.to_dict()["mean_pearson"] is None


def test_prompts_with_fewer_than_three_distinct_gold_values_are_left_out_of_the_means():
    # Prompts 0 and 1: two responses, a Pearson of exactly ±1 whatever the model; prompt 2: three responses but two
    # gold values; prompt 3: one gold value. Only prompts 4 and 5 can show linearity.
    implicit = [[0.3, 0.1], [0.0, 0.9], [2.0, 1.0, 1.5], [0.2, 0.4, 0.6], [1.0, 0.0, 2.5], [0.4, 0.5, 0.2, 0.1]]
    gold = [[1.0, 0.0], [1.0, 0.0], [1.0, 1.0, 0.0], [5.0, 5.0, 5.0], [2.0, 1.0, 3.0], [4.0, 3.0, 2.0, 1.0]]
    report = linearity_report(implicit, gold)
    kept = [4, 5]
    x = {p: np.asarray(gold[p]) - np.mean(gold[p]) for p in kept}
    y = {p: np.asarray(implicit[p]) - np.mean(implicit[p]) for p in kept}
    pearson = [stats.pearsonr(gold[p], implicit[p]).statistic for p in kept]
    slope = [x[p] @ y[p] / (x[p] @ x[p]) for p in kept]
    error = [np.mean((y[p] - x[p]) ** 2) for p in kept]
    assert report.mean_pearson == pytest.approx(np.mean(pearson), rel=1e-12)
    assert report.mean_slope == pytest.approx(np.mean(slope), rel=1e-12)
    assert report.mean_regression_error == pytest.approx(np.mean(error), rel=1e-12)
    for values in (report.per_prompt_pearson, report.per_prompt_slope, report.per_prompt_regression_error):
        assert all(math.isnan(v) for v in values[:4]) and not any(math.isnan(v) for v in values[4:])
    assert report.num_prompts == 6 and report.two_valued_gold == 3 and report.constant_gold == 1
    assert report.constant_implicit == 0
    # Their pairs: prompt 0 agrees, prompt 1 disagrees, prompt 2 has one of its two pairs right.
    assert report.two_valued_pairwise_accuracy == pytest.approx((1 + 0 + 1) / 4)
    # Pairwise accuracy and the pooled numbers still count every prompt.
    assert report.num_pairs == 1 + 1 + 2 + 0 + 3 + 6
    pooled_x, pooled_y = np.concatenate(centred(gold)), np.concatenate(centred(implicit))
    assert report.pooled_pearson == pytest.approx(stats.pearsonr(pooled_x, pooled_y).statistic, rel=1e-12)
    json.dumps(report.to_dict(), allow_nan=False)


@pytest.mark.parametrize("transform, expected", [
    (np.exp, 1.0),  # monotone, not linear
    (lambda g: -g ** 3, 0.0),  # reversed
    (lambda g: np.full_like(g, 0.25), 0.5),  # constant: every pair an implicit tie
])
def test_pairwise_accuracy(transform, expected):
    rng = np.random.default_rng()
    gold, offsets = random_prompts(rng)
    report = linearity_report([transform(g) + c for g, c in zip(gold, offsets, strict=True)], gold)
    assert report.pairwise_accuracy == expected


@pytest.mark.parametrize("implicit, gold, message", [
    ([[1.0, 2.0]], [[1.0, 2.0], [3.0, 4.0]], "implicit has 1 prompts, gold has 2"),
    ([[1.0, 2.0], [1.0, 2.0, 3.0]], [[1.0, 2.0], [1.0, 2.0]], r"prompt 1: implicit has 3 responses, gold has 2"),
    ([[1.0, 2.0], [1.0]], [[1.0, 2.0], [1.0]], r"implicit\[1\] \(prompt 1\): 1 value\(s\); need ≥ 2"),
    ([[1.0, 2.0]], [[1.0, float("nan")]], r"gold\[0\] \(prompt 0\)\[1\]: not finite"),
    ([[1.0, 2.0], [float("inf"), 0.0]], [[1.0, 2.0], [1.0, 2.0]], r"implicit\[1\] \(prompt 1\)\[0\]: not finite"),
    ([[1.0, "x"]], [[1.0, 2.0]], r"implicit\[0\] \(prompt 0\): not a sequence of numbers"),
    ([[[1.0, 2.0]]], [[1.0, 2.0]], r"implicit\[0\] \(prompt 0\): expected a 1-D"),
    ([], [], "no prompts"),
])
def test_report_validation(implicit, gold, message):
    with pytest.raises(ValueError, match=message):
        linearity_report(implicit, gold)


def test_report_rejects_a_non_sequence():
    with pytest.raises(TypeError, match="implicit must be a sequence"):
        linearity_report(3.0, [[1.0, 2.0]])
    with pytest.raises(TypeError, match="gold must be a sequence"):
        linearity_report([[1.0, 2.0]], "12")


def test_win_rate():
    assert win_rate([1.0, 2.0, 3.0], [0.0, 2.0, 4.0]) == pytest.approx(0.5)  # win, tie, loss
    assert win_rate([5.0, 5.0], [5.0, 5.0]) == 0.5
    assert win_rate(np.array([2.0, 3.0, 4.0, 5.0]), [1.0, 1.0, 1.0, 9.0]) == 0.75
    with pytest.raises(ValueError, match="policy_gold has 2 prompts, reference_gold has 1"):
        win_rate([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match=r"reference_gold\[1\]: not finite"):
        win_rate([1.0, 2.0], [1.0, float("nan")])
    with pytest.raises(ValueError, match="policy_gold: 0 value"):
        win_rate([], [])


# ---------------------------------------------------------------------------------------------------------------
# The program on tiny random models

QUESTIONS = [
    ("What is the capital of France?", ["Paris is the capital of France.", "Paris.", "London, I think."]),
    ("How many legs does a spider have?", ["A spider has eight legs.", "Eight.", "Six legs.", "Ten."]),
    ("Why is the sky blue?", ["Blue light scatters the most.", "Sunlight scatters off air."]),
    ("Who wrote Hamlet?", ["William Shakespeare wrote it.", "Shakespeare.", "It is a tragedy."]),
]
SCORES = [[2.0, 1.5, -1.0], [2.0, 1.0, -1.0, -2.0], [1.0, 0.5], [1.0, 1.0, -0.5]]  # row 3: a tie in gold


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny reference, a perturbed copy as policy (both with the tokenizer) and ranked conversational data."""
    root = tmp_path_factory.mktemp("evaluate")
    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm("llama", seed=3)
    model.save_pretrained(root / "reference")
    tokenizer.save_pretrained(root / "reference")
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(root / "policy")
    tokenizer.save_pretrained(root / "policy")
    rows = [{"prompt": [{"role": "user", "content": question}],
             "completions": [[{"role": "assistant", "content": answer}] for answer in answers], "scores": scores}
            for (question, answers), scores in zip(QUESTIONS, SCORES, strict=True)]
    (root / "ranked.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (root / "pairwise.jsonl").write_text(json.dumps({"prompt": "Hi", "chosen": "Hello.", "rejected": "Go."}) + "\n")
    return root


def run_program(root, out, *extra, policy="policy"):
    from training.evaluate import main

    argv = ["--policy", str(root / policy), "--reference", str(root / "reference"), "--data",
            str(root / "ranked.jsonl"), "--output", str(out), "--max-tokens-per-batch", "96", "--max-length", "64",
            *extra]
    return main(argv)


def materialised_logp(model, prompt, response):
    """Σ log softmax(logits)[next token] over the response, from the model's own full logits."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    positions = torch.arange(len(prompt) - 1, ids.shape[1] - 1)
    return torch.log_softmax(logits[positions], -1).gather(1, ids[0, positions + 1, None]).sum().item()


def test_policy_equal_to_reference_gives_zero_implicit_rewards(workspace, tmp_path, capsys):
    assert run_program(workspace, tmp_path, policy="reference") == 0
    record = json.loads((tmp_path / "linearity.json").read_text())
    assert all(v == 0.0 for prompt in record["per_prompt"] for v in prompt["implicit"])
    report = record["report"]
    assert report["mean_pearson"] is None and report["pooled_pearson"] is None  # undefined: excluded
    # Rows 2 and 3 have 2 distinct gold values: left out of the means, so 2 flat prompts are left to count.
    assert report["constant_implicit"] == 2 and report["two_valued_gold"] == 2 and report["constant_gold"] == 0
    assert report["pairwise_accuracy"] == 0.5 and report["num_pairs"] == 3 + 6 + 1 + 2
    assert report["two_valued_pairwise_accuracy"] == 0.5 and report["mean_slope"] == 0.0
    assert record["win_rate"] is None and record["samples"] == []
    assert {"device", "torch", "transformers", "commit"} <= record["environment"].keys()
    assert record["options"]["beta"] == 0.1 and record["options"]["reduction"] == "sum"  # no run summary: defaults
    assert record["implicit_reward"] == {"beta": {"value": 0.1, "source": "default", "run": None},
                                         "reduction": {"value": "sum", "source": "default", "run": None}}
    assert (tmp_path / "linearity.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "linearity.md").read_text()
    assert "| pairwise accuracy | 0.5000 |" in table and table in capsys.readouterr().out
    assert "| mean slope (over 2 prompts) | 0.0000 |" in table
    assert "| prompts left out of the means: 1 / 2 distinct gold values | 0 / 2 |" in table


def test_perturbed_policy_matches_materialised_logits_and_wins_sometimes(workspace, tmp_path):
    from transformers import AutoModelForCausalLM

    from epa_kernels.transformers import PreferenceTokenizer

    code = run_program(workspace, tmp_path, "--beta", "0.5", "--gold-reward", "test_linearity:response_length",
                       "--max-new-tokens", "5", "--num-generate", "3", "--seed", "1")
    assert code == 0
    record = json.loads((tmp_path / "linearity.json").read_text())
    report = record["report"]
    for key in ("mean_pearson", "mean_slope", "pooled_pearson", "pooled_slope", "pairwise_accuracy"):
        assert report[key] is not None and math.isfinite(report[key]), key
    assert -1 <= report["mean_pearson"] <= 1 and report["constant_implicit"] == 0
    assert len(record["samples"]) == 3
    for sample in record["samples"]:
        assert sample["policy_gold"] == len(sample["policy"])
        assert sample["reference_gold"] == len(sample["reference"])
        assert sample["prompt"] == QUESTIONS[sample["row"]][0]  # the user's text, not the chat template
    wins = [(s["policy_gold"] > s["reference_gold"]) + 0.5 * (s["policy_gold"] == s["reference_gold"])
            for s in record["samples"]]
    assert record["win_rate"] == pytest.approx(sum(wins) / 3)

    tokenizer = tiny_tokenizer()
    examples, _ = PreferenceTokenizer(tokenizer, max_length=64, strict_positive=False)(
        [json.loads(line) for line in (workspace / "ranked.jsonl").read_text().splitlines()])
    prompt = record["per_prompt"][1]
    logps = {}
    for name in ("policy", "reference"):
        model = AutoModelForCausalLM.from_pretrained(workspace / name).eval()
        logps[name] = materialised_logp(model, examples[1].prompt, examples[1].responses[2])
    assert prompt["logp"][2] == pytest.approx(logps["policy"], rel=1e-5)
    assert prompt["ref_logp"][2] == pytest.approx(logps["reference"], rel=1e-5)
    assert prompt["implicit"][2] == pytest.approx(0.5 * (logps["policy"] - logps["reference"]), abs=1e-4)
    assert prompt["gold"] == sorted(SCORES[1], reverse=True)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_evaluate_in_process(workspace, reduction):
    from training.evaluate import evaluate

    model = tiny_causal_lm("llama", seed=3).train()  # evaluated in eval mode, then handed back as it came
    rows = [json.loads(line) for line in (workspace / "ranked.jsonl").read_text().splitlines()]
    result = evaluate(model, model, tiny_tokenizer(), rows, reduction=reduction, max_tokens_per_batch=64,
                      gold_reward=response_length, max_new_tokens=3, num_generate=2)
    assert result["report"]["pairwise_accuracy"] == 0.5
    assert result["win_rate"] == 0.5  # the same model answers the same way
    assert len(result["samples"]) == 2 and result["options"]["reduction"] == reduction
    assert model.training


def silent_model(seed=5):
    """A tiny model with a zero LM head: every logit ties, greedy decoding picks token 0 (the pad token), so every
    answer decodes to the empty string."""
    model = tiny_causal_lm("llama", seed=seed)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


def test_win_rate_of_known_answers_and_swapped_models(workspace):
    from training.evaluate import evaluate

    rows = [json.loads(line) for line in (workspace / "ranked.jsonl").read_text().splitlines()]
    talker, silent = tiny_causal_lm("llama", seed=3), silent_model()
    options = dict(max_tokens_per_batch=64, gold_reward=length_unless_hamlet, max_new_tokens=4)
    result = evaluate(talker, silent, tiny_tokenizer(), rows, **options)
    samples = result["samples"]
    assert [s["reference"] for s in samples] == [""] * len(QUESTIONS)
    assert all(s["policy"] for s in samples)  # the case is as built: the talker says something
    # Longer wins on 3 prompts; on Hamlet every answer scores 0, a tie worth half.
    assert result["win_rate"] == (3 + 0.5) / 4
    swapped = evaluate(silent, talker, tiny_tokenizer(), rows, **options)
    assert swapped["win_rate"] == 1 - result["win_rate"]
    assert [s["policy"] for s in swapped["samples"]] == [""] * len(QUESTIONS)


def training_run(root, tmp_path, options, *, inside=False):
    """A copy of the workspace's policy laid out as training leaves it: OUTPUT_DIR/model and, next to it (or with
    inside, in the model directory), train_summary.json with these options."""
    policy = tmp_path / "run" / "model"
    shutil.copytree(root / "policy", policy)
    summary = {"updates": 1, "options": {"model": "base", "output_dir": str(tmp_path / "run"), **options}}
    (policy if inside else policy.parent).joinpath("train_summary.json").write_text(json.dumps(summary))
    return policy


@pytest.mark.parametrize("inside", [False, True])
def test_beta_and_reduction_come_from_the_policy_run(workspace, tmp_path, capsys, inside):
    policy = training_run(workspace, tmp_path, {"beta": 0.5, "loss": "simpo"}, inside=inside)
    assert run_program(workspace, tmp_path / "out", policy=policy) == 0
    err = capsys.readouterr().err
    record = json.loads((tmp_path / "out" / "linearity.json").read_text())
    summary = str(policy / "train_summary.json" if inside else policy.parent / "train_summary.json")
    assert record["options"]["beta"] == 0.5 and record["options"]["reduction"] == "mean"  # simpo: mean log-probs
    assert record["implicit_reward"] == {"beta": {"value": 0.5, "source": summary, "run": 0.5},
                                         "reduction": {"value": "mean", "source": summary, "run": "mean"}}
    assert "warning" not in err
    for prompt in record["per_prompt"]:
        assert prompt["implicit"] == pytest.approx([0.5 * (a - b) for a, b in
                                                    zip(prompt["logp"], prompt["ref_logp"], strict=True)])
    # The same numbers as with the flags given.
    assert run_program(workspace, tmp_path / "flags", "--beta", "0.5", "--reduction", "mean", policy=policy) == 0
    flagged = json.loads((tmp_path / "flags" / "linearity.json").read_text())
    assert flagged["per_prompt"] == record["per_prompt"] and "warning" not in capsys.readouterr().err


def test_flags_override_the_policy_run_with_a_warning(workspace, tmp_path, capsys):
    policy = training_run(workspace, tmp_path, {"beta": 0.5, "loss": "simpo"})
    assert run_program(workspace, tmp_path / "out", "--beta", "0.25", "--reduction", "sum", policy=policy) == 0
    err = capsys.readouterr().err
    assert "warning: --beta 0.25 differs from the policy run's beta 0.5" in err
    assert "warning: --reduction sum differs from the policy run's reduction mean" in err
    record = json.loads((tmp_path / "out" / "linearity.json").read_text())
    assert record["options"]["beta"] == 0.25 and record["options"]["reduction"] == "sum"
    assert record["implicit_reward"] == {"beta": {"value": 0.25, "source": "--beta", "run": 0.5},
                                         "reduction": {"value": "sum", "source": "--reduction", "run": "mean"}}
    assert "(β = 0.25, sum)" in (tmp_path / "out" / "linearity.md").read_text()


@pytest.mark.parametrize("summary, message", [
    ("{not json", "cannot read the policy run's options.beta and options.loss (JSONDecodeError"),
    (json.dumps({"updates": 1}), "cannot read the policy run's options.beta and options.loss (KeyError"),
    (json.dumps({"options": {"beta": 0.1}}), "(KeyError: 'loss')"),
    (json.dumps({"options": {"beta": -1, "loss": "dpo"}}), "options.beta must be a positive finite number, got -1"),
    (json.dumps({"options": {"beta": "0.1", "loss": "dpo"}}), "options.beta must be a positive finite number"),
    (json.dumps({"options": {"beta": 0.1, "loss": "dpo", "reduction": "max"}}),
     "options.reduction must be one of ('sum', 'mean'), got 'max'"),
])
def test_a_bad_run_summary_exits_2(workspace, tmp_path, capsys, summary, message):
    policy = training_run(workspace, tmp_path, {})
    (policy.parent / "train_summary.json").write_text(summary)
    assert run_program(workspace, tmp_path / "out", policy=policy) == 2
    err = capsys.readouterr().err
    assert message in err and "train_summary.json" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "linearity.json").exists()


@pytest.mark.parametrize("extra, message", [
    (["--beta", "0"], "--beta must be a positive finite number"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be ≥ 1"),
    (["--max-tokens-per-batch", "8"], "--max-tokens-per-batch (8) must be ≥ --max-length (64)"),
    (["--num-generate", "2"], "--num-generate needs --gold-reward"),
    (["--gold-reward", "no_function_here"], "--gold-reward must be module:function"),
    (["--gold-reward", "no_such_module_xyz:f"], "cannot import 'no_such_module_xyz'"),
    (["--gold-reward", "test_linearity:nothing"], "has no callable 'nothing'"),
    (["--reduction", "max"], "invalid choice: 'max'"),
])
def test_bad_arguments_exit_2_with_a_message(workspace, tmp_path, capsys, extra, message):
    assert run_program(workspace, tmp_path, *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "linearity.json").exists()


@pytest.mark.parametrize("change, message", [
    ({"policy": "missing"}, "--policy"),
    ({"data": "missing.jsonl"}, "missing.jsonl: no such file"),
    ({"data": "pairwise.jsonl"}, "needs ranked data"),
])
def test_bad_inputs_exit_2_without_traceback(workspace, tmp_path, capsys, change, message):
    from training.evaluate import main

    paths = {"policy": "policy", "data": "ranked.jsonl", **change}
    code = main(["--policy", str(workspace / paths["policy"]), "--reference", str(workspace / "reference"),
                 "--data", str(workspace / paths["data"]), "--output", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
