"""The EPA study across folders, on synthetic finished runs (no training): the reward–KL frontier and the arms at
matched KL (`training.epa_study.frontier`), the prompt-gold against the sentiment-gold study (`scope`), and the
report with arms of different seed sets and no baseline."""
import json
import shutil

import numpy as np
import pytest

from training.epa_study import frontier, scope
from training.epa_study.report import CONTRASTS, contrast_rows, write_report

T_975_1 = 12.706204736  # Student t, 97.5% quantile, 1 degree of freedom (tables)
GAP = {"own_mean": -0.3, "other_prompts_mean": -2.0, "gap": 1.7, "other_prompts_sampled": 5,
       "own_rejected_mean": -0.7, "gap_vs_rejected": 1.3}


def setting(**changes) -> dict:
    from training.epa_study.study import SETTING, parse_args

    args = parse_args([])
    return {**{name: getattr(args, name) for name in SETTING}, **changes}


def fake_study(folder, runs, gap=GAP, **changes):
    """A study folder with finished runs: runs maps (arm, seed) to metric values (kl and sample_gold at least)."""
    (folder / "data").mkdir(parents=True)
    (folder / "study.json").write_text(json.dumps({"setting": setting(**changes)}))
    (folder / "data" / "meta.json").write_text(json.dumps({
        "rows": {"train_multi.jsonl": 8, "eval.jsonl": 4}, "prompts": {"train": 8, "eval": 4}, "gold_reward": "g",
        "weak_negative_gap": gap}))
    for (arm, seed), values in runs.items():
        run = folder / "runs" / arm / f"seed-{seed}"
        (run / "eval").mkdir(parents=True)
        report = {key: values.get(key, 0.0) for key in ("mean_pearson", "pooled_pearson", "mean_slope",
                                                        "mean_regression_error", "pairwise_accuracy")}
        (run / "eval" / "linearity.json").write_text(json.dumps({
            "report": report, "win_rate": values.get("win_rate", 0.5),
            "kl": {"estimate": values["kl"], "sample_gold": values["sample_gold"]},
            "per_prompt": [{"gold": [1.0, 0.0, -1.0], "implicit": [0.2, 0.0, -0.1]}]}))
        (run / "train_summary.json").write_text(json.dumps({"updates": 29, "train": {"loss": 1.0}}))
        (run / "timing.json").write_text(json.dumps({"train": 90.0, "evaluate": 30.0, "threads": "1"}))
        (run / "metrics.jsonl").write_text(json.dumps({"split": "train", "step": 1, "loss": 1.0, "accuracy": 0.5}))
    return folder


# (KL, gold) per arm, seed and β: the hand-computed case of test_gold_at_matched_kl_is_interpolated_per_seed
CURVES = {("epa-k5-w2", 0): {0.2: (2.0, 1.0), 0.1: (4.0, 2.0), 0.05: (8.0, 2.5)},
          ("dpo-k5", 0): {0.2: (3.0, 0.5), 0.1: (6.0, 1.1), 0.05: (9.0, 1.4)},
          ("epa-k5-w2", 1): {0.2: (1.0, 0.0), 0.1: (3.0, 1.0), 0.05: (5.0, 1.5)},
          ("dpo-k5", 1): {0.2: (2.0, 0.2), 0.1: (4.0, 0.6), 0.05: (7.0, 1.0)},
          ("epa-k5", 0): {0.1: (5.0, 1.0)}}  # one β only: no curve


@pytest.fixture
def studies(tmp_path):
    folders = {}
    for beta in (0.05, 0.1, 0.2):
        runs = {key: {"kl": points[beta][0], "sample_gold": points[beta][1]} for key, points in CURVES.items()
                if beta in points}
        folders[beta] = fake_study(tmp_path / f"epa-study-beta{beta}", runs, beta=beta)
    return folders


def test_gold_at_matched_kl_is_interpolated_per_seed(studies, tmp_path):
    points, _ = frontier.frontier_points(studies, ["dpo-k5", "epa-k5-w2"], [0, 1])
    assert [p[1] for p in points["dpo-k5"][0]] == [3.0, 6.0, 9.0]  # sorted by KL
    got = frontier.matched_kl(points, "epa-k5-w2", "dpo-k5", [5.0, 2.5, 9.5])
    # KL 5, seed 0: 2.0 + (1/4)·0.5 − (0.5 + (2/3)·0.6); seed 1: 1.5 (the end) − (0.6 + (1/3)·0.4)
    diffs = [2.125 - 0.9, 1.5 - (0.6 + 0.4 / 3)]
    iv = got[5.0]
    half = T_975_1 * abs(diffs[0] - diffs[1]) / np.sqrt(2) / np.sqrt(2)
    assert iv.n == 2 and iv.mean == pytest.approx(np.mean(diffs))
    assert (iv.low, iv.high) == pytest.approx((np.mean(diffs) - half, np.mean(diffs) + half), rel=1e-6)
    # KL 2.5 lies below dpo-k5's seed-0 curve (from 3): only seed 1 (0.75 − 0.3); 9.5: beyond every curve
    assert got[2.5].n == 1 and got[2.5].mean == pytest.approx(0.45) and got[9.5] is None
    assert frontier.interpolate(points["epa-k5-w2"][0], 8.0) == 2.5 and frontier.interpolate([], 1.0) is None
    text = frontier.write_frontier(studies, ["dpo-k5", "epa-k5", "epa-k5-w2"], [0, 1], tmp_path / "out",
                                   levels=[5.0, 9.5])
    row = next(line for line in text.splitlines() if line.startswith("| epa-k5-w2 − dpo-k5 |"))
    assert f"{np.mean(diffs):+.3f}" in row and "(2)" in row and row.endswith("| — |")
    assert "fewer than 2 β points: epa-k5 seed 0 (β 0.1)." in text  # one β: no curve
    assert (tmp_path / "out" / "frontier.png").stat().st_size > 0
    assert (tmp_path / "out" / "frontier.md").read_text() == text + "\n"


def test_missing_runs_and_seeds_without_a_curve_are_named(studies, tmp_path):
    shutil.copytree(studies[0.2] / "runs" / "dpo-k5", studies[0.2] / "runs" / "epa-k5")
    result = studies[0.2] / "runs" / "epa-k5" / "seed-1" / "eval" / "linearity.json"
    result.write_text(json.dumps({**json.loads(result.read_text()), "kl": None}))  # evaluated without --kl-samples
    text = frontier.write_frontier(studies, ["dpo-k5", "epa-k5", "epa-k5-w2"], [0, 1], tmp_path / "out")
    assert "Missing (rerun those studies to resume): β 0.05: epa-k5 seeds 0, 1; β 0.1: epa-k5 seed 1; β 0.2: " \
           "epa-k5 seed 1 (no KL or gold)." in text  # never ran, or no KL; every other run counts
    assert "| epa-k5 | 0.1 | 0 | 5.000 | 1.000 |" in text and "| epa-k5 | 0.05 |" not in text
    assert "fewer than 2 β points" not in text  # epa-k5 seed 0 has β 0.2 and 0.1 now
    levels = frontier.default_levels(frontier.frontier_points(studies, ["dpo-k5", "epa-k5-w2"], [0, 1])[0])
    # between the arms' median lowest KL (max(2.5, 1.5)) and median highest (min(8, 6.5)), ends left out
    assert levels == [round(x, 1) for x in np.linspace(2.5, 6.5, 6)[1:-1]]


def test_studies_must_differ_in_beta_alone(studies, tmp_path):
    assert frontier.read_studies(list(studies.values())[::-1]) == studies  # β read from study.json, sorted
    other = fake_study(tmp_path / "other", {}, beta=0.3, lr=1e-4)
    with pytest.raises(SystemExit, match="differs from .* in more than β .*lr: 5e-05"):
        frontier.read_studies([studies[0.1], other])
    with pytest.raises(SystemExit, match="both hold β = 0.1"):
        frontier.read_studies([studies[0.1], fake_study(tmp_path / "again", {})])
    with pytest.raises(SystemExit, match="not an EPA study folder"):
        frontier.read_studies([tmp_path])


def scope_pair(tmp_path, prompt_rows, sentiment_rows):
    """Prompt- and sentiment-gold folders at β 0.1; rows: seed → (w2, k5) mean Pearson (other metrics 0)."""
    def runs(rows):
        return {(arm, seed): {"kl": 1.0, "sample_gold": 0.0, "mean_pearson": value} for seed, pair in rows.items()
                for arm, value in zip(("epa-k5-w2", "epa-k5"), pair, strict=True)}

    sentiment_gap = {**GAP, "own_mean": 0.39, "other_prompts_mean": 0.40, "gap": -0.01, "own_rejected_mean": 0.08,
                     "gap_vs_rejected": -0.32}
    return (fake_study(tmp_path / "epa-study", runs(prompt_rows)),
            fake_study(tmp_path / "epa-study-sentiment", runs(sentiment_rows), gap=sentiment_gap, gold="sentiment"))


def test_scope_table_pairs_each_gold_and_their_difference(tmp_path):
    prompt, sentiment = scope_pair(tmp_path, {0: (0.5, 0.3), 1: (0.45, 0.3), 2: (0.55, 0.3)},
                                   {0: (0.3, 0.3), 1: (0.2, 0.3)})
    text = scope.scope_table(prompt, sentiment, [0, 1, 2])
    row = next(line for line in text.splitlines() if line.startswith("| mean Pearson |"))
    cells = [c.strip() for c in row.split("|")[2:-1]]
    assert cells[0].startswith("**+0.200 [+0.076,") and cells[0].endswith("(3)")  # 0.2, 0.15, 0.25: excludes 0
    assert cells[1].startswith("-0.050 [") and cells[1].endswith("(2)")
    assert cells[2].startswith("+0.225 [") and cells[2].endswith("(2)")  # (0.2 − 0) and (0.15 + 0.1), seeds 0, 1
    assert "| gap: own rejected − other | 1.300 | -0.320 |" in text
    with pytest.raises(SystemExit, match="holds a study with --gold sentiment, not prompt"):
        scope.scope_table(sentiment, prompt, [0])
    other = fake_study(tmp_path / "lr", {}, gold="sentiment", lr=1e-3)
    with pytest.raises(SystemExit, match="differ in more than the gold .*lr"):
        scope.scope_table(prompt, other, [0])


def test_frontier_program_writes_the_frontier_and_the_scope(studies, tmp_path, capsys):
    sentiment = fake_study(tmp_path / "epa-study-sentiment", {("epa-k5-w2", 0): {"kl": 1.0, "sample_gold": 0.0}},
                           gold="sentiment")
    out = tmp_path / "out"
    argv = ["--studies", *map(str, studies.values()), "--out", str(out), "--seeds", "0", "1", "--kl", "5"]
    assert frontier.main([*argv, "--scope", str(sentiment)]) == 0
    printed = capsys.readouterr().out
    assert "Gold of samples at matched KL" in printed and "Where weak negatives help" in printed
    assert {p.name for p in out.iterdir()} == {"frontier.md", "frontier.png", "scope.md"}
    with pytest.raises(SystemExit):
        frontier.main([*argv, "--scope", str(fake_study(tmp_path / "b3", {}, gold="sentiment", beta=0.3))])
    assert "none of --studies has its β (0.3)" in capsys.readouterr().err


def test_report_pairs_arms_of_different_seed_sets_without_the_baseline(tmp_path):
    assert ("epa-k5-w2", "dpo-k5") in CONTRASTS
    rng = np.random.default_rng(3)
    runs = {(arm, seed): {"kl": float(rng.normal(5)), "sample_gold": float(rng.normal()),
                          "mean_pearson": float(rng.normal())}
            for arm in ("dpo-k5", "epa-k5", "epa-k5-w2") for seed in range(8 if arm != "epa-k5" else 3)}
    out = fake_study(tmp_path / "epa-study-beta0.05", runs, beta=0.05)
    text = write_report(out, ["dpo-pairs", "dpo-k5", "epa-k5", "epa-k5-w2"], range(8), record=tmp_path / "record")
    assert "| epa-k5-w2 − dpo-k5 | 8 |" in text and "| epa-k5 − dpo-k5 | 3 |" in text
    assert "| epa-k5 | 3 (0–2) |" in text and "| dpo-k5 | 8 (0–7) |" in text
    assert "minutes per run | threads |" in text and "| 2.0 | 1 |" in text  # (90 + 30) s
    assert "Difference from dpo-pairs" not in text  # the baseline never ran
    assert "seeds dpo-pairs" not in text and "dpo-k5 0–7; epa-k5 0–2" in text
    # the record is named after the folder: the β = 0.1 study recorded the same day keeps its own
    assert [p.name.split("_", 1)[1] for p in (tmp_path / "record").iterdir()] == ["cpu_epa-study-beta0.05"]
    # the study program reports them without training the baseline's missing seeds
    from training.epa_study.study import main

    argv = ["--out", str(out), "--beta", "0.05", "--seeds", *map(str, range(8)), "--report-only"]
    assert main(argv) == 0 and "| epa-k5-w2 − dpo-k5 | 8 |" in (out / "summary.md").read_text()
    assert not (out / "runs" / "dpo-pairs").exists()
    with pytest.raises(SystemExit, match="holds no study"):
        main(["--out", str(tmp_path / "none"), "--report-only"])
    contrasts = contrast_rows({"dpo-k5": {0: {"kl": 1.0}}, "epa-k5-w2": {0: {"kl": 3.0}}})
    assert contrasts["epa-k5-w2 − dpo-k5"]["kl"].mean == 2.0
