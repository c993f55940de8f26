"""The reports of what is recorded: curves.png (mean ± std over seeds) and summary.md, whose verdicts come from
the area under each learning curve paired by seed (`training/paired.py`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from training.active_learning.state import sessions
from training.paired import markdown as paired_markdown
from training.paired import paired_differences

BASELINE = "random"


def aggregate(state: dict, metric: str) -> dict[str, dict[int, tuple[float, float, int]]]:
    """strategy -> labels -> (mean, std over seeds, number of seeds)."""
    out = {}
    for name, runs in state["curves"].items():
        by_labels: dict[int, list[float]] = {}
        for entries in runs.values():
            for e in entries:
                by_labels.setdefault(int(e["labels"]), []).append(float(e[metric]))
        out[name] = {n: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v))
                     for n, v in sorted(by_labels.items())}
    return out


def plot_curves(state: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (metric, title) in zip(axes, (("accuracy", "accuracy"), ("macro_f1", "macro-F1")), strict=True):
        for name, points in aggregate(state, metric).items():
            if not points:  # a strategy with nothing recorded yet
                continue
            xs = np.array(list(points))
            mean = np.array([points[x][0] for x in xs])
            std = np.array([points[x][1] for x in xs])
            seeds = max(p[2] for p in points.values())
            (line,) = ax.plot(xs, mean, marker="o", ms=3, label=f"{name} (n={seeds})")
            ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        ax.set_xlabel("labeled examples")
        ax.set_ylabel(f"test {title}")
        ax.set_title(f"{title}: mean ± std over seeds")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_markdown(state: dict) -> str:
    cfg = state["config"]
    lines = ["# Active-learning learning curves", "",
             f"data `{cfg['data']}`, model `{cfg['model']}`, initial {cfg['initial_size']}, "
             f"query {cfg['query_size']}, epochs {cfg['epochs']}, lr {cfg['lr']}, batch {cfg['batch_size']}, "
             f"max length {cfg['max_length']}, pool limit {cfg['pool_limit']}, test limit {cfg['test_limit']}.",
             "Mean ± sample std over seeds (n = seeds recorded); **bold**: best mean at that label count. "
             "Macro-F1: the unweighted mean of the per-class F1 over the classes present in the test split."]
    history = sessions(state)
    if history:
        lines.append("Run on " + "; resumed on ".join(
            f"{env['device']}, torch {env['torch']}, transformers {env['transformers']}, commit {env['commit']}, "
            f"{env['date']}" + (" (the latest of earlier, unrecorded sessions)"
                                if env.get("earlier_sessions_unrecorded") else "") for env in history) + ".")
    lines.append("")
    names = [s for s, runs in state["curves"].items() if any(runs.values())]  # those with something recorded
    if BASELINE in names and len(names) > 1:
        lines += [f"## Paired by seed: area under the learning curve against {BASELINE}", "",
                  "Each seed's strategies start from the same labeled set, so each strategy's AUC (the curve's "
                  f"mean height over the label counts both runs reached) minus {BASELINE}'s is taken seed by "
                  "seed; the interval is Student's t over seeds. A verdict needs the interval to exclude 0.", ""]
        for metric, title in (("accuracy", "accuracy"), ("macro_f1", "macro-F1")):
            curves = {s: state["curves"][s] for s in names}
            lines += [f"**{title}**", "", paired_markdown(paired_differences(curves, metric, BASELINE), title,
                                                          BASELINE), ""]
    for metric, title in (("accuracy", "Accuracy"), ("macro_f1", "Macro-F1")):
        agg = aggregate(state, metric)
        counts = sorted({n for pts in agg.values() for n in pts})
        lines += [f"## {title}", "", "| labels | " + " | ".join(names) + " |",
                  "|---:|" + "---:|" * len(names)]
        for n in counts:
            means = [agg[s][n][0] for s in names if n in agg[s]]
            best = max(means) if len(set(means)) > 1 else None  # no bold when all equal (the shared round 0)
            cells = []
            for s in names:
                if n not in agg[s]:
                    cells.append("")
                    continue
                mean, std, k = agg[s][n]
                cell = f"{mean:.3f} ± {std:.3f} (n={k})"
                cells.append(f"**{cell}**" if mean == best else cell)
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        # mean over the label counts every strategy reached: a normalised area under the learning curve
        common = sorted(set.intersection(*(set(agg[s]) for s in names))) if names else []
        if common:
            lines.append("| mean over " + ", ".join(map(str, common)) + " | " + " | ".join(
                f"{np.mean([agg[s][n][0] for n in common]):.3f}" for s in names) + " |")
        lines.append("")
    lines += ["## Time", "", "| strategy | seconds per run (train + eval + query, all rounds) |", "|---|---:|"]
    for s in names:
        totals = [sum(e["seconds"] for e in entries) for entries in state["curves"][s].values() if entries]
        lines.append(f"| {s} | {np.mean(totals):.1f} |")
    lines.append("")
    return "\n".join(lines)


def write_reports(state: dict, out: Path) -> None:
    if not any(entries for runs in state["curves"].values() for entries in runs.values()):
        return
    plot_curves(state, out / "curves.png")
    (out / "summary.md").write_text(summary_markdown(state))


