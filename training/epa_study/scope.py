"""Where weak negatives help: the same study under the gold that depends on the prompt and under the control gold that
ignores it (`--gold sentiment`, the same answers rescored), side by side.

A weak negative is an answer written for another prompt, so it can teach only what the gold says about answering
*this* prompt. Under the sentiment gold an answer to another prompt is on average as good as the prompt's own (the
weak-negative gap of data/meta.json ≈ 0; better than the prompt's own rejected answers), so W = 2 should buy nothing
there. The table gives epa-k5-w2 − epa-k5 paired by seed in each folder, and the difference of the two contrasts,
paired by seed across the folders (a seed draws each folder's preferences from its own gold, so this pairing removes
less than the one within a folder; the t interval holds either way).
"""
from __future__ import annotations

import json
from pathlib import Path

from training.epa_study.archive import read_setting
from training.epa_study.report import METRICS, cell, collect, interval_cell, paired_metrics
from training.paired import paired_interval

SCOPE_METRICS = ("mean_pearson", "mean_regression_error", "win_rate", "sample_gold", "kl")
GAP = (("own_mean", "a prompt's own answers"), ("own_rejected_mean", "its own rejected answers (all but its best)"),
       ("other_prompts_mean", "other prompts' answers, under it"), ("gap", "gap: own − other"),
       ("gap_vs_rejected", "gap: own rejected − other"))


def check_pair(prompt_folder: Path, sentiment_folder: Path) -> None:
    """Refuse folders that are not one study under the two golds: each its gold, every other setting equal."""
    settings = {"prompt": read_setting(prompt_folder), "sentiment": read_setting(sentiment_folder)}
    for gold, folder in (("prompt", prompt_folder), ("sentiment", sentiment_folder)):
        if settings[gold]["gold"] != gold:
            raise SystemExit(f"error: {folder} holds a study with --gold {settings[gold]['gold']}, not {gold}")
    keys = sorted(set(settings["prompt"]) | set(settings["sentiment"]))
    differ = [f"{k}: {settings['prompt'].get(k)} → {settings['sentiment'].get(k)}" for k in keys
              if k != "gold" and settings["prompt"].get(k) != settings["sentiment"].get(k)]
    if differ:
        raise SystemExit(f"error: {prompt_folder} and {sentiment_folder} differ in more than the gold "
                         f"({'; '.join(differ)})")


def data_gap(folder: Path, gold: str) -> dict:
    """The weak-negative gap of a study folder's data: data/meta.json's, computed from its answers (no generation)
    when the data were made before own_rejected_mean existed."""
    gap = json.loads((Path(folder) / "data" / "meta.json").read_text())["weak_negative_gap"]
    if all(key in gap for key, _ in GAP):
        return gap
    from training.review_data import gap_of

    return gap_of(Path(folder) / "data", gold)


def scope_table(prompt_folder: Path, sentiment_folder: Path, seeds, arm: str = "epa-k5-w2",
                other: str = "epa-k5") -> str:
    """Markdown: `arm − other` paired by seed under each gold and their difference, on SCOPE_METRICS; then each
    data's weak-negative gap side by side."""
    if not seeds:
        raise ValueError("scope_table needs seeds")
    prompt_folder, sentiment_folder = Path(prompt_folder), Path(sentiment_folder)
    check_pair(prompt_folder, sentiment_folder)
    runs = {gold: collect(folder, [arm, other], seeds)
            for gold, folder in (("prompt", prompt_folder), ("sentiment", sentiment_folder))}
    paired = {gold: paired_metrics(r, arm, other) for gold, r in runs.items()}
    labels = {key: label for key, label, _ in METRICS}
    lines = [f"**Where weak negatives help: {arm} − {other}, paired by seed, under each gold** (mean [95% t "
             "interval] (seeds); bold: the interval excludes 0; the last column: the prompt gold's contrast minus "
             "the sentiment gold's, paired by seed)", "",
             f"| metric | prompt gold ({prompt_folder.name}) | sentiment gold ({sentiment_folder.name}) | "
             "prompt − sentiment |", "|---|---:|---:|---:|"]
    for key in SCOPE_METRICS:
        cells = [_with_n(paired[gold].get(key)) for gold in ("prompt", "sentiment")]
        lines.append(f"| {labels[key]} | {cells[0]} | {cells[1]} | {_with_n(_difference(runs, arm, other, key))} |")
    gaps = {"prompt": data_gap(prompt_folder, "prompt"), "sentiment": data_gap(sentiment_folder, "sentiment")}
    lines += ["", "**Weak-negative gap of the training answers** (mean gold under each folder's gold: data/meta.json, "
              "or computed from the answers for data made before the rejected-answer fields)", "",
              "| | prompt gold | sentiment gold |", "|---|---:|---:|"]
    lines += [f"| {label} | {cell(gaps['prompt'][key])} | {cell(gaps['sentiment'][key])} |" for key, label in GAP]
    return "\n".join(lines)


def _with_n(iv) -> str:
    return "—" if iv is None else f"{interval_cell(iv)} ({iv.n})"


def _difference(runs, arm: str, other: str, key: str):
    """PairedInterval over seeds of (arm − other) under the prompt gold minus the same under the sentiment gold."""
    def contrast(gold, seed):
        a, b = runs[gold][arm].get(seed), runs[gold][other].get(seed)
        return None if a is None or b is None or a.get(key) is None or b.get(key) is None else a[key] - b[key]

    diffs = [p - s for seed in runs["prompt"][arm]
             if (p := contrast("prompt", seed)) is not None and (s := contrast("sentiment", seed)) is not None]
    return paired_interval(diffs) if diffs else None
