"""The reward–KL frontier of study folders that differ in β alone: each run's samples' mean gold reward against its
KL from the reference (frontier.png), and the arms compared at matched KL (frontier.md).

    python -m training.epa_study.frontier --studies epa-study epa-study-beta0.05 epa-study-beta0.2 --out frontier \\
        [--scope epa-study-sentiment]

Why matched KL: a smaller β lets the policy move further from the reference, raising its samples' gold and its KL
together, so an arm that moves further at the same β (weak negatives do) can look better at equal β only for having
spent more KL. At equal KL the question is which arm buys more gold per nat.

The method: per arm and seed, the runs at the several β give points (KL, gold); sorted by KL and joined piecewise
linearly, they are that seed's frontier. At a KL level inside both arms' ranges for a seed (never extrapolated), the
difference of the two interpolated golds is one paired difference; over the seeds, Student's t interval
(`training.paired`). It uses every finished run and keeps the pairing by seed (a seed decides both arms' preference
draws, data order and weak negatives at every β), where pairing runs whose KLs happen to be close would drop most runs
and compare runs of different β. A seed with fewer than 2 β points for an arm has no curve: left out, and said so.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from training.epa_study.archive import read_setting
from training.epa_study.arms import ARMS
from training.epa_study.report import CONTRASTS, cell, collect, interval_cell, mean_of, seed_list
from training.epa_study.scope import scope_table
from training.paired import paired_interval

FRONTIER_ARMS = ("dpo-k5", "epa-k5", "epa-k5-w2")  # the arms the frontier runs: those of the contrasts it reads
MARKERS = ("v", "o", "s", "^", "D", "P", "X")  # one per β, smallest first


def read_studies(folders) -> dict[float, Path]:
    """β → study folder, for folders whose settings differ in β alone (a clear error otherwise)."""
    folders = [Path(f) for f in folders]
    if not folders:
        raise SystemExit("error: the frontier needs study folders (one per β)")
    settings = {folder: read_setting(folder) for folder in folders}
    first, base = folders[0], settings[folders[0]]
    by_beta: dict[float, Path] = {}
    for folder, setting in settings.items():
        if setting["beta"] in by_beta:
            raise SystemExit(f"error: {by_beta[setting['beta']]} and {folder} both hold β = {setting['beta']}")
        by_beta[setting["beta"]] = folder
        differ = [f"{k}: {base.get(k)} in {first}, {setting.get(k)} here" for k in sorted(set(base) | set(setting))
                  if k != "beta" and base.get(k) != setting.get(k)]
        if differ:
            raise SystemExit(f"error: {folder} differs from {first} in more than β ({'; '.join(differ)})")
    return dict(sorted(by_beta.items()))


def frontier_points(folders: dict[float, Path], arms, seeds) -> tuple[dict, list[str]]:
    """(arm → seed → [(β, KL, gold)] sorted by KL, the runs missing): finished runs with a KL and a samples' gold
    only; the missing are named "β B: ARM seeds S" (unfinished) or "... (no KL or gold)" (evaluated without
    --kl-samples or a gold reward)."""
    points = {arm: {} for arm in arms}
    missing = []
    for beta, folder in folders.items():
        runs = collect(folder, arms, seeds)
        for arm in arms:
            unfinished = [s for s in seeds if s not in runs[arm]]
            unmeasured = [s for s, v in runs[arm].items() if v.get("kl") is None or v.get("sample_gold") is None]
            for found, why in ((unfinished, ""), (unmeasured, " (no KL or gold)")):
                if found:
                    missing.append(f"β {beta:g}: {arm} seed{'s' if len(found) > 1 else ''} {seed_list(found)}{why}")
            for seed, values in runs[arm].items():
                if seed not in unmeasured:
                    points[arm].setdefault(seed, []).append((beta, values["kl"], values["sample_gold"]))
    for by_seed in points.values():
        for curve in by_seed.values():
            curve.sort(key=lambda p: p[1])
    return points, missing


def interpolate(curve, kl: float) -> float | None:
    """The gold at `kl` on the piecewise-linear curve through `curve`'s (β, KL, gold) points sorted by KL; None
    outside the curve's KL range or with fewer than 2 points (no extrapolation)."""
    if not np.isfinite(kl):
        raise ValueError(f"interpolate: the KL level must be finite, got {kl}")
    if len(curve) < 2 or not curve[0][1] <= kl <= curve[-1][1]:
        return None
    return float(np.interp(kl, [p[1] for p in curve], [p[2] for p in curve]))


def matched_kl(points, arm: str, other: str, levels) -> dict[float, object]:
    """KL level → PairedInterval of gold(arm) − gold(other) at that KL over the seeds whose two curves both reach it
    (None where no seed does)."""
    out = {}
    for level in levels:
        diffs = []
        for seed, curve in points.get(arm, {}).items():
            mine, theirs = interpolate(curve, level), interpolate(points.get(other, {}).get(seed, []), level)
            if mine is not None and theirs is not None:
                diffs.append(mine - theirs)
        out[level] = paired_interval(diffs) if diffs else None
    return out


def default_levels(points, count: int = 4) -> list[float]:
    """`count` KL levels evenly inside the range most seeds of every arm cover: between the largest of the arms'
    median lowest KL and the smallest of their median highest KL (ends left out), to 0.1 nats."""
    if count < 1:
        raise ValueError(f"default_levels: count must be ≥ 1, got {count}")
    curves = {arm: [c for c in by_seed.values() if len(c) >= 2] for arm, by_seed in points.items()}
    curves = {arm: c for arm, c in curves.items() if c}
    if not curves:
        return []
    low = max(float(np.median([c[0][1] for c in cs])) for cs in curves.values())
    high = min(float(np.median([c[-1][1] for c in cs])) for cs in curves.values())
    if low >= high:  # the arms' ranges barely overlap: one level between them
        return [round((low + high) / 2, 1)]
    return sorted({round(float(x), 1) for x in np.linspace(low, high, count + 2)[1:-1]})


def contrasts_of(arms) -> list[tuple[str, str]]:
    """The report's contrasts whose two arms are both among `arms`."""
    return [(arm, other) for arm, other in CONTRASTS if arm in arms and other in arms]


def markdown(points, missing, folders, levels) -> str:
    """frontier.md: the matched-KL table, the frontier's points (means over seeds) and what is left out."""
    lines = ["**Gold of samples at matched KL**: the paired difference over seeds, each arm's gold interpolated "
             "along its seed's curve over β (piecewise linear in KL): mean [95% t interval] (n seeds; bold: the "
             "interval excludes 0; —: no seed's two curves reach that KL)", "",
             "| contrast | " + " | ".join(f"KL {level:g}" for level in levels) + " |",
             "|---|" + "---:|" * len(levels)]
    if not levels:
        lines[2:] = ["No KL level to compare at: no arm has a seed with 2 β points yet."]
    for arm, other in contrasts_of(list(points)) if levels else []:
        row = matched_kl(points, arm, other, levels)
        lines.append(f"| {arm} − {other} | " + " | ".join(
            "—" if iv is None else f"{interval_cell(iv)} ({iv.n})" for iv in row.values()) + " |")
    lines += ["", "**The frontier's points** (means over the seeds finished at each β)", "",
              "| arm | β | seeds | KL(π‖π_ref), nats | gold of policy samples |", "|---|---:|---|---:|---:|"]
    for arm, by_seed in points.items():
        for beta in folders:
            runs = [p for curve in by_seed.values() for p in curve if p[0] == beta]
            seeds = [s for s, curve in by_seed.items() if any(p[0] == beta for p in curve)]
            if not seeds:
                continue  # said in the notes
            lines.append(f"| {arm} | {beta:g} | {seed_list(seeds)} | {cell(mean_of(p[1] for p in runs))} | "
                         f"{cell(mean_of(p[2] for p in runs))} |")
    short = [f"{arm} seed {seed} (β {', '.join(f'{p[0]:g}' for p in curve)})" for arm, by_seed in points.items()
             for seed, curve in sorted(by_seed.items()) if len(curve) < 2]
    notes = [f"Studies: {', '.join(f'β {beta:g}: {folder}' for beta, folder in folders.items())}."]
    if missing:
        notes.append(f"Missing (rerun those studies to resume): {'; '.join(missing)}.")
    if short:
        notes.append(f"Left out of the matched-KL comparison, fewer than 2 β points: {'; '.join(short)}.")
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes)


def plot(points, folders, path: Path) -> None:
    """frontier.png: each run's (KL, gold), one colour per arm, one marker per β; each arm's means over seeds joined
    in order of β and labelled with it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    markers = dict(zip(folders, MARKERS, strict=False))
    fig, axis = plt.subplots(figsize=(6.4, 4.4))
    for i, by_seed in enumerate(points.values()):
        colour = f"C{i}"
        runs = [p for curve in by_seed.values() for p in curve]
        for beta, kl, gold in runs:
            axis.scatter(kl, gold, color=colour, marker=markers[beta], s=18, alpha=0.35)
        means = [(beta, np.mean([p[1] for p in at]), np.mean([p[2] for p in at])) for beta in folders
                 if (at := [p for p in runs if p[0] == beta])]
        axis.plot([m[1] for m in means], [m[2] for m in means], color=colour, lw=1.2)
        for beta, kl, gold in means:
            axis.scatter(kl, gold, color=colour, marker=markers[beta], s=60, edgecolor="k", zorder=3)
            axis.annotate(f"β {beta:g}", (kl, gold), textcoords="offset points", xytext=(5, -10), fontsize=7,
                          color=colour)
    handles = [Line2D([], [], color=f"C{i}", lw=2, label=arm) for i, arm in enumerate(points)]
    handles += [Line2D([], [], color="grey", marker=m, ls="", label=f"β {beta:g}") for beta, m in markers.items()]
    axis.legend(handles=handles, fontsize=7)
    axis.set_xlabel("KL(π‖π_ref) of policy samples, nats")
    axis.set_ylabel("mean gold reward of policy samples")
    axis.set_title("reward–KL frontier (small: one run; large: mean over seeds)", fontsize=9)
    axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_frontier(folders: dict[float, Path], arms, seeds, out: Path, levels=None) -> str:
    """Write frontier.png and frontier.md into `out` for the finished runs of `arms` × `seeds` in the study folders
    (β → folder); returns the markdown. levels: the matched KL values (default: `default_levels`)."""
    if not folders or not arms or not seeds:
        raise ValueError(f"write_frontier needs study folders, arms and seeds; got {folders}, {arms}, {seeds}")
    if levels is not None and not all(np.isfinite(level) and level >= 0 for level in levels):
        raise ValueError(f"write_frontier: KL levels must be finite and ≥ 0, got {levels}")
    folders = {float(beta): Path(folder) for beta, folder in sorted(folders.items())}
    points, missing = frontier_points(folders, list(arms), list(seeds))
    if not any(points.values()):
        raise SystemExit(f"error: no finished run with a KL and a gold in {', '.join(map(str, folders.values()))}")
    levels = default_levels(points) if levels is None else sorted(float(level) for level in levels)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(points, missing, folders, levels)
    (out / "frontier.md").write_text(text + "\n")
    plot(points, folders, out / "frontier.png")
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.epa_study.frontier", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--studies", nargs="+", required=True, help="study folders differing in β alone (each its own)")
    p.add_argument("--out", required=True, help="folder for frontier.md, frontier.png (and scope.md)")
    p.add_argument("--arms", nargs="+", default=list(FRONTIER_ARMS), choices=list(ARMS), help="the arms to compare")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="the seeds each β ran")
    p.add_argument("--kl", type=float, nargs="+", metavar="NATS",
                   help="the matched KL levels; none given: 4 inside the range most seeds of every arm cover")
    p.add_argument("--scope", help="a study folder run with --gold sentiment: also compare it with the --studies "
                   "folder of its β (scope.md)")
    args = p.parse_args(argv)
    if args.kl and not all(np.isfinite(level) and level >= 0 for level in args.kl):
        p.error(f"--kl levels must be finite and ≥ 0, got {args.kl}")
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds must be distinct, got {args.seeds}")
    folders = read_studies(args.studies)
    text = write_frontier(folders, args.arms, args.seeds, Path(args.out), args.kl)
    if args.scope:
        beta = read_setting(args.scope)["beta"]
        if beta not in folders:
            p.error(f"--scope {args.scope}: none of --studies has its β ({beta})")
        scope = scope_table(folders[beta], args.scope, args.seeds)
        (Path(args.out) / "scope.md").write_text(scope + "\n")
        text += "\n\n" + scope
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
