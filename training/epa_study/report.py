"""The EPA study's report: every arm against DPO-on-pairs, and the contrasts that set the defaults (EPA against DPO
on the same data, weak negatives added, their weight), paired by seed, with Student's t interval.

summary.md (conditions, the per-arm means, the paired tables, what each interval shows, wall time and threads per
arm; arms may have run different seeds: each pair uses the seeds both arms finished),
results.json (every run's numbers, the environment), curves.png (training loss and accuracy), scatter.png (centred
implicit against centred gold reward on the held-out prompts) and intervals.png (the paired differences); a record
also keeps the study's portable part (`archive.py`), from which the report is re-derived or the study resumed.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch

from epa_kernels.provenance import environment
from training.epa_study.archive import archive, read_setting
from training.epa_study.arms import ARMS, BASELINE
from training.paired import paired_interval

# (key, label, higher is better); None: no preferred direction (KL is a cost traded against reward)
METRICS = (("mean_pearson", "mean Pearson", True), ("pooled_pearson", "pooled Pearson", True),
           ("mean_slope", "mean slope", True), ("mean_regression_error", "slope-1 error", False),
           ("pairwise_accuracy", "pairwise accuracy", True), ("win_rate", "greedy win rate vs reference", True),
           ("kl", "KL(π‖π_ref), nats", None), ("sample_gold", "gold of policy samples", True))


def run_values(folder: Path) -> dict | None:
    """A finished run's metrics, updates, final loss and seconds; None while it is unfinished."""
    path = folder / "eval" / "linearity.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    train = json.loads((folder / "train_summary.json").read_text())
    timing = json.loads((folder / "timing.json").read_text()) if (folder / "timing.json").exists() else {}
    kl = result.get("kl") or {}
    values = {key: result["report"].get(key) for key, _, _ in METRICS if key in result["report"]}
    values.update(win_rate=result.get("win_rate"), kl=kl.get("estimate"), sample_gold=kl.get("sample_gold"),
                  updates=train["updates"], train_loss=train["train"]["loss"], threads=timing.get("threads"),
                  **{f"{k}_seconds": timing[k] for k in ("train", "evaluate") if k in timing})
    return values


def collect(out: Path, arms, seeds) -> dict[str, dict[int, dict]]:
    """arm → seed → values, finished runs only."""
    runs = {}
    for arm in arms:
        runs[arm] = {s: v for s in seeds if (v := run_values(out / "runs" / arm / f"seed-{s}")) is not None}
    return runs


def mean_of(values) -> float | None:
    """The mean of the finite values (None and NaN left out); None when none is."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def cell(value, digits=3) -> str:
    """A table cell: the value to `digits` decimals, "—" for None."""
    return "—" if value is None else f"{value:.{digits}f}"


def seed_list(seeds) -> str:
    """"0–7" for a run of consecutive seeds, "0, 2, 5" otherwise."""
    seeds = sorted(seeds)
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}–{seeds[-1]}"
    return ", ".join(map(str, seeds))


def minutes(values) -> float | None:
    """Mean wall minutes of one run (training + evaluation) over the runs' values."""
    total = mean_of((v.get("train_seconds") or 0) + (v.get("evaluate_seconds") or 0) for v in values)
    return None if total is None else total / 60


def threads(values) -> str:
    """The OMP_NUM_THREADS the runs had, "/"-joined (None: not recorded)."""
    return "/".join(sorted({str(v.get("threads")) for v in values})) or "—"


def interval_cell(iv) -> str:
    """mean [low, high], bold when the interval excludes 0; the mean alone from one seed."""
    if iv is None:
        return "—"
    if iv.low is None:
        return f"{iv.mean:+.3f}"
    text = f"{iv.mean:+.3f} [{iv.low:+.3f}, {iv.high:+.3f}]"
    return f"**{text}**" if iv.verdict != "no difference shown" else text


# What sets the defaults: the loss on the same data, weak negatives added to EPA (against EPA and DPO on the same
# strong negatives), and their weight.
CONTRASTS = (("epa-k5", "dpo-k5"), ("epa-k5-w2", "dpo-k5"), ("epa-k5-w2", "epa-k5"), ("epa-k5-w8", "epa-k5"),
             ("epa-k5-w8-a0.5", "epa-k5-w8"))


def paired_metrics(runs, arm: str, against: str) -> dict[str, object]:
    """metric → PairedInterval of (arm − against) over the seeds both finished."""
    rows = {}
    for key, _, _ in METRICS:
        diffs = [v[key] - runs[against][s][key] for s, v in runs[arm].items()
                 if s in runs[against] and v.get(key) is not None and runs[against][s].get(key) is not None]
        if diffs:
            rows[key] = paired_interval(diffs)
    return rows


def paired_rows(runs) -> dict[str, dict[str, object]]:
    """arm → metric → PairedInterval of (arm − baseline); arms with no finished seed have nothing to pair yet."""
    return {arm: paired_metrics(runs, arm, BASELINE) for arm, by_seed in runs.items() if arm != BASELINE and by_seed}


def contrast_rows(runs) -> dict[str, dict[str, object]]:
    """"arm − other" → metric → PairedInterval, for the CONTRASTS whose two arms both ran."""
    return {f"{arm} − {other}": paired_metrics(runs, arm, other) for arm, other in CONTRASTS
            if runs.get(arm) and runs.get(other)}


def tables(runs, paired, contrasts) -> str:
    head = ("| arm | seeds | updates | " + " | ".join(label for _, label, _ in METRICS)
            + " | train s | eval s | minutes per run | threads |")
    lines = ["**Means over seeds**", "", head, "|---|---:|---:|" + "---:|" * (len(METRICS) + 3) + "---|"]
    for arm, by_seed in runs.items():
        values = list(by_seed.values())
        cells = [cell(mean_of(v.get(key) for v in values)) for key, _, _ in METRICS]
        updates = sorted({v["updates"] for v in values})
        seeds = f"{len(values)} ({seed_list(by_seed)})" if values else "0"
        lines.append(f"| {arm} | {seeds} | {'/'.join(map(str, updates)) or '—'} | "
                     + " | ".join(cells) + f" | {cell(mean_of(v.get('train_seconds') for v in values), 0)} | "
                     f"{cell(mean_of(v.get('evaluate_seconds') for v in values), 0)} | {cell(minutes(values), 1)} | "
                     f"{threads(values)} |")
    if paired:
        lines += ["", f"**Difference from {BASELINE}, paired by seed: mean [95% t interval]** (bold: the interval "
                      "excludes 0)", "", "| arm | seeds | " + " | ".join(label for _, label, _ in METRICS) + " |",
                  "|---|---:|" + "---:|" * len(METRICS), *_paired_table(paired)]
    if contrasts:
        lines += ["", "**Between arms, paired by seed** (the loss on the same data; weak negatives added; their "
                      "weight)", "", "| contrast | seeds | " + " | ".join(label for _, label, _ in METRICS) + " |",
                  "|---|---:|" + "---:|" * len(METRICS), *_paired_table(contrasts)]
    return "\n".join(lines)


def _paired_table(paired) -> list[str]:
    lines = []
    for name, metrics in paired.items():
        cells = [interval_cell(metrics.get(key)) for key, _, _ in METRICS]
        seeds = max((iv.n for iv in metrics.values()), default=0)
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + " |")
    return lines


HEADLINE = ("mean_pearson", "mean_regression_error", "pairwise_accuracy", "win_rate", "kl")


def headline(runs, paired, contrasts) -> str:
    """The README's table: the baseline's means, then each arm's paired difference from it and the contrasts, on
    the headline metrics, with the wall time of one run of the arm (training + evaluation)."""
    labels = {key: label for key, label, _ in METRICS}
    base = list(runs.get(BASELINE, {}).values())
    lines = ["| arm | seeds | " + " | ".join(labels[k] for k in HEADLINE) + " | minutes per run |",
             "|---|---:|" + "---:|" * (len(HEADLINE) + 1)]
    if base:
        means = [cell(mean_of(v.get(k) for v in base)) for k in HEADLINE]
        lines.append(f"| {BASELINE} (value) | {len(base)} | " + " | ".join(means) + f" | {cell(minutes(base), 1)} |")
    arms = {f"{arm} − {other}": arm for arm, other in CONTRASTS}  # the arm whose run time a contrast shows
    rows = {**{f"{arm} − {BASELINE}": m for arm, m in paired.items()}, **contrasts}
    arms.update({f"{arm} − {BASELINE}": arm for arm in paired})
    for name, metrics in rows.items():
        cells = [interval_cell(metrics.get(key)) for key in HEADLINE]
        seeds = max((iv.n for iv in metrics.values()), default=0)
        arm = arms[name]
        lines.append(f"| {name} | {seeds} | " + " | ".join(cells) + f" | {cell(minutes(runs[arm].values()), 1)} |")
    return "\n".join(lines)


def verdict(paired, contrasts) -> str:
    """One line per arm and per contrast: only what the intervals show (better, worse, or nothing)."""
    named = {arm: f"{arm} ({ARMS[arm].label}) vs {BASELINE}" for arm in paired}
    named.update({name: name.replace(" − ", " vs ") for name in contrasts})
    lines = []
    for name, metrics in {**paired, **contrasts}.items():
        if not metrics:
            lines.append(f"- {named[name]}: no seed finished by both yet.")
            continue
        shown = []
        for key, label, higher in METRICS:
            iv = metrics.get(key)
            if iv is None or iv.verdict in ("no difference shown", "one seed: no interval"):
                continue
            if higher is None:
                shown.append(f"{label} {iv.verdict}")
            else:
                better = (iv.verdict == "higher") == higher
                shown.append(f"{label} {'better' if better else 'worse'}")
        seeds = max((iv.n for iv in metrics.values()), default=0)
        text = "; ".join(shown) if shown else "no metric separates them"
        lines.append(f"- {named[name]}, {seeds} seeds: {text}.")
    return "\n".join(lines)


def plot(out: Path, runs, paired) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.epa.logs import read_metrics

    arms = [a for a in runs if runs[a]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    for arm in arms:
        seed = min(runs[arm])
        records = [r for r in read_metrics(out / "runs" / arm / f"seed-{seed}" / "metrics.jsonl")
                   if r["split"] == "train"]
        for axis, key in zip(axes, ("loss", "accuracy"), strict=True):
            axis.plot([r["step"] for r in records], [r.get(key, math.nan) for r in records], label=arm)
            axis.set_title(f"training {key} (seed {seed})", fontsize=9)
            axis.set_xlabel("optimizer step")
            axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(arms), figsize=(3 * len(arms), 3.2), squeeze=False, sharey=True)
    for axis, arm in zip(axes[0], arms, strict=True):
        seed = min(runs[arm])
        result = json.loads((out / "runs" / arm / f"seed-{seed}" / "eval" / "linearity.json").read_text())
        xs, ys = [], []
        for p in result["per_prompt"]:
            g, r = p["gold"], p["implicit"]
            xs += [x - sum(g) / len(g) for x in g]
            ys += [y - sum(r) / len(r) for y in r]
        axis.scatter(xs, ys, s=4, alpha=0.4)
        axis.axline((0, 0), slope=1, color="k", lw=0.8, ls="--")
        axis.set_title(f"{arm} (seed {seed})", fontsize=9)
        axis.set_xlabel("centred gold reward")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("centred implicit reward")
    fig.tight_layout()
    fig.savefig(out / "scatter.png", dpi=110)
    plt.close(fig)

    keys = [(key, label) for key, label, _ in METRICS if any(key in m for m in paired.values())]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(2.6 * len(keys), 0.5 * len(paired) + 1.6), sharey=True)
    for axis, (key, label) in zip(axes, keys, strict=True):
        for y, metrics in enumerate(paired.values()):
            iv = metrics.get(key)
            if iv is None:
                continue
            error = None if iv.low is None else [[iv.mean - iv.low], [iv.high - iv.mean]]
            axis.errorbar(iv.mean, y, xerr=error, fmt="o", capsize=3)
        axis.axvline(0, color="k", lw=0.8)
        axis.set_title(f"{label}\n− {BASELINE}", fontsize=8)
        axis.grid(alpha=0.3)
    axes[0].set_yticks(range(len(paired)), list(paired), fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "intervals.png", dpi=110)
    plt.close(fig)


def write_report(out: Path, arms, seeds, *, record: str | None = None) -> str:
    """Write the report for the finished runs; returns summary.md's text. record: also copy it, with the study's
    portable part, into RECORD/DATE_cpu_NAME (NAME: the study folder's)."""
    out = Path(out)
    runs = collect(out, arms, seeds)
    if not any(runs.values()):
        raise SystemExit(f"error: no finished run in {out}: nothing to report")
    # Arms against the baseline where it ran; the contrasts between arms need only their two arms.
    paired = paired_rows(runs) if runs.get(BASELINE) else {}
    contrasts = contrast_rows(runs)
    setting = read_setting(out)
    meta = json.loads((out / "data" / "meta.json").read_text())
    env = environment(torch.device("cpu"))
    gap = meta["weak_negative_gap"]
    rejected = (f", its own rejected answers (all but its best) {gap['own_rejected_mean']:.2f}"
                if "own_rejected_mean" in gap else "")  # data made before the field
    seed_sets = {seed_list(by_seed) for by_seed in runs.values() if by_seed}
    seeds = (seed_sets.pop() if len(seed_sets) == 1 else
             "; ".join(f"{arm} {seed_list(by_seed)}" for arm, by_seed in runs.items() if by_seed))
    conditions = (
        f"{env['device']}; torch {env['torch']}; transformers {env.get('transformers')}; commit {env['commit']}; "
        f"{env['date']}. SmolLM2-135M-Instruct; {meta['rows']['train_multi.jsonl']} training prompts (of "
        f"{meta['prompts']['train']}) and {meta['rows']['eval.jsonl']} held-out prompts on unseen subjects, "
        f"{setting['responses_per_prompt']} sampled answers each; gold ({setting['gold']}) = {meta['gold_reward']}; "
        f"a prompt's own answers score {gap['own_mean']:.2f} on average{rejected}, other prompts' answers under it "
        f"{gap['other_prompts_mean']:.2f}. "
        f"β = {setting['beta']}, lr = {setting['lr']}, {setting['epochs']} epoch(s), {setting['prompts_per_update']} "
        f"prompts per update, seeds {seeds} (each seed draws its own preferences from the same answers and its own "
        f"order and weak negatives; each pair uses the seeds both arms finished). KL: {setting['kl_samples']} "
        f"policy samples per held-out prompt. Wall times: one process per run, OMP_NUM_THREADS "
        f"{threads(v for r in runs.values() for v in r.values())} (None: not recorded).")
    waiting = [arm for arm, by_seed in runs.items() if not by_seed]
    status = f"Not finished yet (rerun the study to resume): {', '.join(waiting)}." if waiting else ""
    parts = [tables(runs, paired, contrasts), "**What the intervals show**", verdict(paired, contrasts), status,
             "**Headline** (the README's table)", headline(runs, paired, contrasts), conditions]
    text = "\n\n".join(part for part in parts if part)
    (out / "summary.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(
        {"environment": env, "setting": setting, "data": meta, "runs": runs,
         "paired": {arm: {k: vars(iv) for k, iv in m.items()} for arm, m in paired.items()},
         "contrasts": {name: {k: vars(iv) for k, iv in m.items()} for name, m in contrasts.items()}}, indent=1,
        default=str))
    plot(out, runs, paired)
    print(text)
    if record:
        # named after the study folder: studies of other settings (β, gold) recorded the same day keep their own
        folder = Path(record) / f"{time.strftime('%Y-%m-%d')}_cpu_{out.resolve().name}"
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("summary.md", "results.json", "curves.png", "scatter.png", "intervals.png"):
            if (out / name).exists():
                shutil.copy(out / name, folder / name)
        files = archive(out, folder / "study")
        print(f"recorded in {folder} (the study's portable part, {files} files, in {folder / 'study'})")
    return text
