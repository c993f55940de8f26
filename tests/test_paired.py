"""Paired statistics (training/paired.py): the t interval of paired differences, and learning curves judged by it
(AUC per seed, differences from random paired by seed)."""
import json
import math

import pytest
from scipy import stats

from training.active_learning.report import summary_markdown
from training.paired import curve_auc, markdown, paired_differences, paired_interval


def curve(values, start=30, step=30):
    return [{"labels": start + i * step, "accuracy": v, "macro_f1": v / 2, "seconds": 1.0}
            for i, v in enumerate(values)]


def test_paired_interval_is_students_t():
    diffs = [0.1, 0.3, 0.2, 0.4]
    n, mean, sd = 4, 0.25, math.sqrt(sum((d - 0.25) ** 2 for d in diffs) / 3)
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    interval = paired_interval(diffs)
    assert (interval.n, interval.mean) == (4, pytest.approx(mean))
    assert (interval.low, interval.high) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert interval.verdict == "higher"
    assert paired_interval([-0.1, -0.2, -0.15]).verdict == "lower"
    assert paired_interval([-0.1, 0.2, 0.0]).verdict == "no difference shown"
    assert paired_interval([0.5]).verdict == "one seed: no interval" and paired_interval([0.5]).low is None
    wider = paired_interval(diffs, confidence=0.99)
    assert wider.low < interval.low and wider.high > interval.high
    for bad, message in (([], "at least one"), ([0.1, float("nan")], "finite")):
        with pytest.raises(ValueError, match=message):
            paired_interval(bad)
    with pytest.raises(ValueError, match="confidence"):
        paired_interval(diffs, confidence=1.0)


def test_auc_is_the_curves_mean_height():
    assert curve_auc(curve([0.2, 0.4, 0.6]), "accuracy") == pytest.approx(0.4)  # trapezoid over 30..90
    assert curve_auc(curve([0.2, 0.4, 1.0]), "accuracy") == pytest.approx((0.3 * 30 + 0.7 * 30) / 60)
    assert curve_auc(curve([0.7]), "accuracy") == 0.7
    with pytest.raises(ValueError, match="at least one point"):
        curve_auc([], "accuracy")
    with pytest.raises(ValueError, match="confidence"):
        paired_differences({"random": {"0": curve([0.5])}}, confidence=1.5)


def test_a_constant_gain_is_shown_and_noise_is_not():
    base = {"0": curve([0.3, 0.5]), "1": curve([0.5, 0.6]), "2": curve([0.4, 0.4])}
    better = {seed: [{**p, "accuracy": p["accuracy"] + 0.05} for p in points] for seed, points in base.items()}
    noisy = {"0": curve([0.4, 0.6]), "1": curve([0.4, 0.5]), "2": curve([0.4, 0.45])}
    rows = {r.strategy: r for r in paired_differences({"random": base, "better": better, "noisy": noisy})}
    assert rows["random"].difference == 0 and rows["better"].difference == pytest.approx(0.05)
    assert rows["better"].low == pytest.approx(0.05) and rows["better"].high == pytest.approx(0.05)
    diffs = [curve_auc(noisy[s], "accuracy") - curve_auc(base[s], "accuracy") for s in "012"]
    low, high = stats.t.interval(0.95, 2, loc=sum(diffs) / 3, scale=stats.sem(diffs))
    assert (rows["noisy"].low, rows["noisy"].high) == (pytest.approx(low), pytest.approx(high))
    lines = {line.split("|")[1].strip(): line for line in markdown(list(rows.values()), "accuracy", "random")
             .splitlines()[2:]}
    assert lines["better"].endswith("| better |") and lines["noisy"].endswith("| no difference shown |")


def test_runs_are_paired_on_the_rounds_both_reached():
    base = {"0": curve([0.3, 0.5, 0.7])}
    unfinished = {"0": curve([0.3, 0.6])}  # stopped after two rounds
    rows = paired_differences({"random": base, "x": unfinished})
    assert rows[1].seeds == 1 and rows[1].difference == pytest.approx(0.05)  # (0.45 − 0.40) over 30..60
    assert rows[1].low is None and "one seed" in markdown(rows, "accuracy", "random")
    with pytest.raises(ValueError, match="baseline 'random' has no runs"):
        paired_differences({"x": unfinished})
    with pytest.raises(ValueError, match="baseline 'random' has no runs"):  # interrupted before its first round
        paired_differences({"random": {"0": []}, "x": unfinished})


def test_summary_reports_the_paired_table_and_the_environment():
    state = {"config": {"data": "d", "model": "m", "initial_size": 30, "query_size": 30, "epochs": 1, "lr": 1e-4,
                        "batch_size": 8, "max_length": 16, "pool_limit": None, "test_limit": None},
             "sessions": [{"device": "cpu (2 threads)", "torch": "2.13", "transformers": "5.24", "python": "3.11",
                           "date": "monday", "commit": "abc1234"},
                          {"device": "cpu (2 threads)", "torch": "2.13", "transformers": "5.24", "python": "3.11",
                           "date": "tuesday", "commit": "def5678"}],
             "curves": {"random": {"0": curve([0.3, 0.5]), "1": curve([0.4, 0.5])},
                        "vapal": {"0": curve([0.3, 0.6]), "1": curve([0.4, 0.7])}}}
    text = summary_markdown(state)
    assert "commit abc1234, monday; resumed on cpu (2 threads)" in text and "commit def5678, tuesday" in text
    assert "## Paired by seed" in text
    older = {k: v for k, v in state.items() if k != "sessions"} | {"environment": state["sessions"][1]}
    assert "commit def5678, tuesday (the latest of earlier, unrecorded sessions)." in summary_markdown(older)
    vapal = next(line for line in text.splitlines() if line.startswith("| vapal | 2 |"))
    assert "+0.0750" in vapal and math.isfinite(float(vapal.split("|")[3]))


def test_compare_judges_a_recorded_run_against_any_baseline(tmp_path, capsys):
    from training.active_learning.compare import main

    path = tmp_path / "curves.json"
    path.write_text(json.dumps({"curves": {"random": {"0": curve([0.3, 0.5]), "1": curve([0.4, 0.5])},
                                           "old": {"0": curve([0.3, 0.6]), "1": curve([0.4, 0.6])},
                                           "new": {"0": curve([0.3, 0.7]), "1": curve([0.4, 0.8])}}}))
    assert main([str(path), "--baseline", "old"]) == 0
    out = capsys.readouterr().out
    assert "| old | 2 |" in out and "baseline" in out and "− old, paired by seed" in out
    new = next(line for line in out.splitlines() if line.startswith("| new | 2 |"))
    assert "+0.0750" in new  # (0.05 + 0.10) / 2 over 30..60, paired with "old"
    assert main([str(path), "--baseline", "missing"]) == 2
    assert "baseline 'missing' has no runs" in capsys.readouterr().err
    (tmp_path / "other.json").write_text("{}")
    assert main([str(tmp_path / "other.json")]) == 2
    assert 'has no "curves" table' in capsys.readouterr().err
    (tmp_path / "list.json").write_text("[1, 2]")
    assert main([str(tmp_path / "list.json")]) == 2
    assert 'has no "curves" table' in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{")
    assert main([str(tmp_path / "broken.json")]) == 2
    assert "broken.json" in capsys.readouterr().err
