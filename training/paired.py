"""Paired statistics for the studies: differences from a baseline, paired by seed, with Student's t interval.

Runs of one seed share what the seed decides (the active-learning study's initial labeled set and fine-tuning
draws; the EPA study's data order and weak-negative pairing), so a method's value minus the baseline's, seed by
seed, removes the seed's own luck that overlapping per-method standard deviations would leave in. The interval is
mean ± t₍₁₊c₎/₂,ₙ₋₁ · s / √n over the n seeds (`paired_interval`). Both studies import it from here: the
active-learning study judges areas under learning curves (`curve_auc`, `paired_differences`, DESIGN §7), the EPA
study the linearity metrics of trained policies (`training.epa_study`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def curve_auc(points: list[dict], metric: str) -> float:
    """Area under `metric` against the label count (trapezoid), divided by the label range: the curve's mean
    height. One point: its value."""
    if not points:
        raise ValueError("curve_auc needs at least one point of the learning curve")
    points = sorted(points, key=lambda p: p["labels"])
    if len(points) == 1:
        return float(points[0][metric])
    pairs = zip(points[:-1], points[1:], strict=True)
    area = sum((b["labels"] - a["labels"]) * (a[metric] + b[metric]) / 2 for a, b in pairs)
    return area / (points[-1]["labels"] - points[0]["labels"])


@dataclass(frozen=True)
class PairedInterval:
    n: int  # pairs (seeds)
    mean: float  # mean paired difference
    low: float | None  # the t interval; None with one pair
    high: float | None

    @property
    def verdict(self) -> str:
        """What the interval shows: "higher", "lower", "no difference shown" or "one seed: no interval"."""
        if self.low is None:
            return "one seed: no interval"
        return "higher" if self.low > 0 else "lower" if self.high < 0 else "no difference shown"


def paired_interval(differences, confidence: float = 0.95) -> PairedInterval:
    """The mean of paired differences (one per seed) and its Student t interval at `confidence`."""
    from scipy import stats

    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    diffs = [float(d) for d in differences]
    if not diffs:
        raise ValueError("paired_interval needs at least one difference")
    if not all(math.isfinite(d) for d in diffs):
        raise ValueError(f"paired_interval: differences must be finite, got {diffs}")
    n, mean = len(diffs), sum(diffs) / len(diffs)
    if n == 1:
        return PairedInterval(1, mean, None, None)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return PairedInterval(n, mean, mean - half, mean + half)


@dataclass
class PairedDifference:
    strategy: str
    seeds: int  # seeds both this strategy and the baseline completed on the same label counts
    auc: float  # mean over those seeds
    difference: float  # mean paired difference from the baseline's AUC
    low: float | None  # the t interval (None with one seed)
    high: float | None


def paired_differences(curves: dict[str, dict[str, list[dict]]], metric: str = "accuracy",
                       baseline: str = "random", confidence: float = 0.95) -> list[PairedDifference]:
    """Per strategy (baseline first, difference 0), the AUC over seeds and its paired difference from the baseline.

    curves: strategy → seed → the rounds' points ({"labels": int, metric: float, ...}). Each pair of runs is
    compared on the label counts both reached, so an unfinished run still counts on its finished rounds.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not any(curves.get(baseline, {}).values()):
        raise ValueError(f"baseline {baseline!r} has no runs; strategies: {sorted(curves)}")
    rows = []
    for strategy in [baseline] + [s for s in curves if s != baseline]:
        aucs, diffs = [], []
        for seed, points in curves[strategy].items():
            base = curves[baseline].get(seed)
            if not base:
                continue
            common = {p["labels"] for p in points} & {p["labels"] for p in base}
            if not common:
                continue
            mine = curve_auc([p for p in points if p["labels"] in common], metric)
            theirs = curve_auc([p for p in base if p["labels"] in common], metric)
            aucs.append(mine)
            diffs.append(mine - theirs)
        if not diffs:
            continue
        interval = paired_interval(diffs, confidence)
        rows.append(PairedDifference(strategy, interval.n, sum(aucs) / interval.n, interval.mean, interval.low,
                                     interval.high))
    return rows


def markdown(rows: list[PairedDifference], metric: str, baseline: str, confidence: float = 0.95) -> str:
    """A table: AUC, paired difference from the baseline with its interval, and whether the interval excludes 0."""
    lines = [f"| strategy | seeds | AUC ({metric}) | − {baseline}, paired by seed | {confidence:.0%} t interval | "
             "verdict |", "|---|---:|---:|---:|---|---|"]
    for r in rows:
        if r.strategy == baseline:
            lines.append(f"| {r.strategy} | {r.seeds} | {r.auc:.4f} | — | — | baseline |")
            continue
        interval = "—" if r.low is None else f"[{r.low:+.4f}, {r.high:+.4f}]"
        verdict = ("one seed: no interval" if r.low is None else "better" if r.low > 0 else "worse" if r.high < 0
                   else "no difference shown")
        lines.append(f"| {r.strategy} | {r.seeds} | {r.auc:.4f} | {r.difference:+.4f} | {interval} | {verdict} |")
    return "\n".join(lines)
