"""Is the implicit reward 1:1 linear in the true reward? A controlled experiment where the true reward is known.

    python -m benchmarks.linearity_theory --out linearity-out [--record benchmarks/results]   # ~3-4 min, 1 thread
    python -m benchmarks.linearity_theory --quick --out /tmp/lt                                # seconds

DPO-style training is right only if r(x, y) = β·(log π(y|x) − log π_ref(y|x)) equals the true reward r*(x, y) up to
a per-prompt constant. In a finite world (benchmarks/linearity_world.py: X prompts, Y responses, r* bilinear in random
features, π_ref = softmax(λ·r* + noise)) preferences are drawn exactly as the preference models assume, a tabular
policy and a small shared-feature network are trained full-batch from π_ref with the library's `preference_loss`
(DPO on Bradley–Terry pairs, DPO averaged over K negatives, EPA with K strong and W weak negatives), and the linearity
test (`epa_kernels.transformers.linearity`) is run over every response of every prompt, over the sampled responses
only, and over the responses chosen at least once. Sweeps: K × W, the weak weight α, the data size n_obs, both policy
families, the choice set the annotator saw (`strong` or `all`). Non-uniqueness is shown directly: R trainings on
the same data from different initialisations, the spread of their final losses against that of their implicit
rewards. A budget check repeats key arms with 4× the learning rate (4× the distance Adam may travel).

Writes OUT/summary.md, OUT/results.json (options, per-cell numbers per seed, environment) and
OUT/linearity_theory.png; --record DIR copies them into DIR/<date>_cpu_linearity-theory/.
"""
from __future__ import annotations

import argparse
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from benchmarks.linearity_theory_report import write_outputs
from benchmarks.linearity_world import (
    NetworkPolicy,
    TabularPolicy,
    WorldConfig,
    draw_preferences,
    implicit_spread,
    linearity,
    make_world,
    train,
)

QUICK = {"num_prompts": 4, "num_responses": 16, "feature_dim": 4, "strong": [1, 3], "weak": [0, 4, 12],
         "num_obs": 16, "obs_sweep": [4, 16], "weak_weights": [0.5, 1.0], "sweep_strong": 3, "sweep_weak": 4,
         "network_weak": [0, 12], "seeds": 2, "steps": 60, "hidden": 8}
METRICS = ("pearson", "slope", "error", "accuracy", "error_sampled", "error_chosen", "scored", "chosen", "loss",
           "grad_norm")


@dataclass(frozen=True)
class Cell:
    """One trained configuration, run once per seed. arm: dpo-pairs (K = 1 pairs), dpo-avg (mean pairwise loss over
    the K strong negatives), epa. lr_factor: the budget check's multiplier of the learning rate."""

    table: str
    family: str
    arm: str
    K: int
    W: int
    alpha: float
    n_obs: int
    choice: str = "strong"
    lr_factor: float = 1.0

    @property
    def loss(self) -> str:
        return "epa" if self.arm == "epa" else "dpo"

    def label(self) -> str:
        if self.arm == "dpo-pairs":
            return "DPO pairs"
        if self.arm == "dpo-avg":
            return f"DPO avg K={self.K}"
        return f"EPA K={self.K} W={self.W}" + (f" α={self.alpha:g}" if self.W and self.alpha != 1 else "") + (
            " (all)" if self.choice == "all" else "")


# ---------------------------------------------------------------------------------------------------------------
# Options


def _list_of(kind, name):
    def parse(text):
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {name}, got {text!r}") from None
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.linearity_theory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    world = WorldConfig()
    p.add_argument("--num-prompts", type=int, default=world.num_prompts, help="X prompts (≥ 2: weak negatives)")
    p.add_argument("--num-responses", type=int, default=world.num_responses, help="|Y| responses (≥ 3)")
    p.add_argument("--feature-dim", type=int, default=world.feature_dim)
    p.add_argument("--reward-std", type=float, default=world.reward_std, help="mean within-prompt std of r*")
    p.add_argument("--ref-sharpness", type=float, default=world.ref_sharpness, help="λ in π_ref ∝ exp(λ·r* + noise)")
    p.add_argument("--ref-noise", type=float, default=world.ref_noise)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--strong", type=_list_of(int, "ints"), default=[1, 3, 7], help="K values")
    p.add_argument("--weak", type=_list_of(int, "ints"), default=[0, 4, 16, 56], help="W values (K + 1 + W ≤ |Y|)")
    p.add_argument("--num-obs", type=int, default=64, help="observations per prompt in the K × W tables")
    p.add_argument("--obs-sweep", type=_list_of(int, "ints"), default=[1, 4, 16, 64, 256], help="n_obs values")
    p.add_argument("--weak-weights", type=_list_of(float, "numbers"), default=[0.25, 0.5, 1.0], help="α values")
    p.add_argument("--sweep-strong", type=int, default=3, help="K of the α and n_obs sweeps")
    p.add_argument("--sweep-weak", type=int, default=16, help="W of the α and n_obs sweeps")
    p.add_argument("--network-weak", type=_list_of(int, "ints"), default=[0, 16, 56], help="W values for the network")
    p.add_argument("--families", type=_list_of(str, "names"), default=["tabular", "network"])
    p.add_argument("--seeds", type=int, default=3, help="seeds per cell (each a fresh world and data)")
    p.add_argument("--seed", type=int, default=0, help="the first seed")
    p.add_argument("--steps", type=int, default=400, help="Adam steps (cosine-decayed), the same for every arm")
    p.add_argument("--lr", type=float, default=0.1, help="tabular Adam learning rate (reward units per step)")
    p.add_argument("--network-lr", type=float, default=0.03)
    p.add_argument("--hidden", type=int, default=32, help="the network's hidden width")
    p.add_argument("--restarts", type=int, default=4, help="R initialisations in the non-uniqueness table")
    p.add_argument("--init-noise", type=float, default=0.5, help="std of the tabular restarts' initial reward noise")
    p.add_argument("--budget-factor", type=float, default=4.0, help="lr multiplier of the budget check")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--quick", action="store_true", help="a tiny world and sweep that runs in seconds (for tests)")
    p.add_argument("--out", default="linearity-out", help="directory for summary.md, results.json and the plot")
    p.add_argument("--record", help="also copy the outputs into RECORD/<date>_cpu_linearity-theory/")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(**QUICK)  # options given explicitly still win
    args = parser.parse_args(argv)
    _validate(parser, args)
    return args


def _validate(parser, a) -> None:
    def need(ok, message):
        if not ok:
            parser.error(message)

    for option, value, low in (("--num-prompts", a.num_prompts, 2), ("--num-responses", a.num_responses, 3),
                               ("--feature-dim", a.feature_dim, 1), ("--num-obs", a.num_obs, 1),
                               ("--sweep-strong", a.sweep_strong, 1), ("--sweep-weak", a.sweep_weak, 0),
                               ("--seeds", a.seeds, 1), ("--steps", a.steps, 1), ("--hidden", a.hidden, 1),
                               ("--restarts", a.restarts, 2), ("--threads", a.threads, 1)):
        need(value >= low, f"{option} must be ≥ {low}, got {value}")
    for option, value in (("--reward-std", a.reward_std), ("--beta", a.beta), ("--lr", a.lr),
                          ("--network-lr", a.network_lr), ("--init-noise", a.init_noise)):
        need(math.isfinite(value) and value > 0, f"{option} must be a finite number > 0, got {value}")
    for option, value in (("--ref-sharpness", a.ref_sharpness), ("--ref-noise", a.ref_noise)):
        need(math.isfinite(value) and value >= 0, f"{option} must be a finite number ≥ 0, got {value}")
    need(math.isfinite(a.budget_factor) and a.budget_factor >= 1, f"--budget-factor must be ≥ 1, got {a.budget_factor}")
    for option, values, low in (("--strong", a.strong, 1), ("--weak", a.weak, 0), ("--obs-sweep", a.obs_sweep, 1),
                                ("--network-weak", a.network_weak, 0)):
        need(len(values) > 0, f"{option} needs at least one value")
        need(min(values) >= low, f"{option} values must be ≥ {low}, got {min(values)}")
        need(len(set(values)) == len(values), f"{option} has a repeated value: {values}")
    need(len(a.weak_weights) > 0 and all(math.isfinite(v) and v >= 0 for v in a.weak_weights),
         f"--weak-weights must be finite numbers ≥ 0 (α), got {a.weak_weights}")
    unknown = sorted(set(a.families) - {"tabular", "network"})
    need(a.families and not unknown and len(set(a.families)) == len(a.families),
         f"--families must name tabular and/or network once each, got {','.join(a.families)}")
    for option, ks, ws in (("--strong/--weak", a.strong, a.weak), ("--strong/--network-weak", a.strong, a.network_weak),
                           ("--sweep-strong/--sweep-weak", [a.sweep_strong], [a.sweep_weak])):
        worst = max(ks) + 1 + max(ws)
        need(worst <= a.num_responses, f"{option}: K + 1 + W = {max(ks)} + 1 + {max(ws)} = {worst} exceeds "
                                       f"--num-responses {a.num_responses} (a group holds distinct responses)")


# ---------------------------------------------------------------------------------------------------------------
# The sweep


def world_config(a) -> WorldConfig:
    return WorldConfig(a.num_prompts, a.num_responses, a.feature_dim, a.reward_std, a.ref_sharpness, a.ref_noise)


def plan(a) -> list[Cell]:
    """Every cell of the default sweep, in the order of the summary's tables."""
    n, K0, W0 = a.num_obs, a.sweep_strong, a.sweep_weak
    cells = []
    for family in a.families:
        weak = a.weak if family == "tabular" else a.network_weak
        table = f"kw-{family}"
        cells.append(Cell(table, family, "dpo-pairs", 1, 0, 1.0, n))
        cells += [Cell(table, family, "dpo-avg", K, 0, 1.0, n) for K in a.strong if K > 1]
        cells += [Cell(table, family, "epa", K, W, 1.0, n) for K in a.strong for W in weak]
        cells += [Cell(f"all-{family}", family, "epa", K, W, 1.0, n, "all") for K in a.strong for W in weak if W]
        cells += [replace(c, table=f"budget-{family}", lr_factor=a.budget_factor) for c in _key_arms(a, family)]
    if "tabular" in a.families:
        cells += [Cell("alpha", "tabular", "epa", K0, W0, alpha, n) for alpha in a.weak_weights]
        for n_obs in a.obs_sweep:
            cells += [Cell("nobs", "tabular", "dpo-pairs", 1, 0, 1.0, n_obs),
                      Cell("nobs", "tabular", "epa", K0, 0, 1.0, n_obs),
                      Cell("nobs", "tabular", "epa", K0, W0, 1.0, n_obs)]
    return cells


def nonuniqueness_configs(a, family) -> list[Cell]:
    """The arms whose restarts the non-uniqueness table compares (`_key_arms`)."""
    return [replace(cell, table=f"restarts-{family}") for cell in _key_arms(a, family)]


def _key_arms(a, family) -> list[Cell]:
    """DPO pairs, DPO avg at the largest K, EPA at the largest K without and with the largest W (both choice sets)."""
    n, Kmax, Wmax = a.num_obs, max(a.strong), max(a.weak if family == "tabular" else a.network_weak)
    return [Cell("", family, "dpo-pairs", 1, 0, 1.0, n), Cell("", family, "dpo-avg", Kmax, 0, 1.0, n),
            Cell("", family, "epa", Kmax, 0, 1.0, n), Cell("", family, "epa", Kmax, Wmax, 1.0, n),
            Cell("", family, "epa", Kmax, Wmax, 1.0, n, "all")]


def _policy(cell: Cell, world, a, seed: int, restart: int | None):
    if cell.family == "tabular":
        noise = 0.0 if restart is None else a.init_noise
        return TabularPolicy(world, a.beta, init_noise=noise, seed=seed, purpose=f"init/{restart}")
    return NetworkPolicy(world, a.beta, hidden=a.hidden, seed=seed, purpose=f"network-init/{restart or 0}")


def _fit(cell: Cell, world, prefs, a, seed: int, restart: int | None = None):
    lr = (a.lr if cell.family == "tabular" else a.network_lr) * cell.lr_factor
    return train(_policy(cell, world, a, seed, restart), world, prefs, loss=cell.loss, beta=a.beta,
                 weak_weight=cell.alpha if cell.W else 1.0, steps=a.steps, lr=lr)


def _data(cell: Cell, world, seed: int):
    K, W = (1, 0) if cell.arm == "dpo-pairs" else (cell.K, cell.W)
    return draw_preferences(world, seed, cell.n_obs, K, W, cell.choice)


def run_cell(cell: Cell, a, seed: int) -> dict:
    """Train one cell on one seed's world and data; the linearity numbers over all, sampled and chosen responses."""
    tic = time.perf_counter()
    world = make_world(world_config(a), seed)
    prefs = _data(cell, world, seed)
    fit = _fit(cell, world, prefs, a, seed)
    sampled, chosen = prefs.sampled(), prefs.counts() > 0
    row = linearity(fit.implicit, world)
    row.update(error_sampled=linearity(fit.implicit, world, sampled)["error"],
               error_chosen=linearity(fit.implicit, world, chosen)["error"], scored=float(sampled.mean()),
               chosen=float(chosen.mean()), loss=fit.loss, grad_norm=fit.grad_norm, curve=list(fit.curve),
               gap=world.own_vs_other_gap(), seconds=time.perf_counter() - tic)
    return row


def run_restarts(cell: Cell, a, seed: int) -> dict:
    """R trainings of one cell on the same data from different initialisations: spread of losses vs implicit rewards
    (mean over prompts and responses of the std over runs of the centred implicit reward)."""
    world = make_world(world_config(a), seed)
    prefs = _data(cell, world, seed)
    fits = [_fit(cell, world, prefs, a, seed, restart) for restart in range(a.restarts)]
    losses, implicits = [f.loss for f in fits], [f.implicit for f in fits]
    return {"loss": float(np.mean(losses)), "loss_spread": max(losses) - min(losses),
            "spread": implicit_spread(implicits), "spread_sampled": implicit_spread(implicits, prefs.sampled()),
            "spread_chosen": implicit_spread(implicits, prefs.counts() > 0),
            "error": float(np.mean([linearity(i, world)["error"] for i in implicits]))}


def summarise(rows: list[dict], keys) -> dict:
    """{key: [mean, sd]} over seeds, NaN-aware (NaN where no seed has a value)."""
    out = {}
    for key in keys:
        values = np.array([r[key] for r in rows], dtype=float)
        kept = values[~np.isnan(values)]
        out[key] = [float(kept.mean()), float(kept.std(ddof=1)) if len(kept) > 1 else 0.0] if len(kept) else [
            math.nan, math.nan]
    return out


def run_sweep(a, log=print) -> dict:
    """Every cell over every seed, then the restarts; {"cells": [...], "restarts": [...]} with per-seed rows."""
    seeds = [a.seed + i for i in range(a.seeds)]
    cells, restarts = [], []
    for cell in plan(a):
        rows = [run_cell(cell, a, seed) for seed in seeds]
        cells.append({**asdict(cell), "label": cell.label(), "per_seed": rows, **summarise(rows, METRICS)})
        m = cells[-1]
        log(f"{cell.table:>16} {cell.label():<28} n={cell.n_obs:<4} error {m['error'][0]:7.3f}  slope "
            f"{m['slope'][0]:6.3f}  pearson {m['pearson'][0]:6.3f}  loss {m['loss'][0]:.4f}  "
            f"({sum(r['seconds'] for r in rows):.1f} s)")
    for family in a.families:
        for cell in nonuniqueness_configs(a, family):
            tic = time.perf_counter()
            rows = [run_restarts(cell, a, seed) for seed in seeds]
            keys = ("loss", "loss_spread", "spread", "spread_sampled", "spread_chosen", "error")
            restarts.append({**asdict(cell), "label": cell.label(), "per_seed": rows, **summarise(rows, keys)})
            m = restarts[-1]
            log(f"{cell.table:>16} {cell.label():<28} loss spread {m['loss_spread'][0]:.2e}  implicit spread "
                f"{m['spread'][0]:.3f} (chosen {m['spread_chosen'][0]:.3f})  ({time.perf_counter() - tic:.1f} s)")
    gaps = [make_world(world_config(a), seed).own_vs_other_gap() for seed in seeds]
    return {"cells": cells, "restarts": restarts, "own_vs_other_gap": gaps}


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    try:
        tic = time.perf_counter()
        results = run_sweep(args)
        wall = time.perf_counter() - tic
        write_outputs(out, args, results, wall)  # its environment record names the threads the sweep ran on
    finally:  # main() may run inside another process (the tests): leave its thread count as it was
        torch.set_num_threads(threads)
    print(f"\n{(out / 'summary.md').read_text()}\nwall time {wall:.1f} s; wrote {out}/summary.md, results.json, "
          "linearity_theory.png")
    if args.record:
        folder = Path(args.record) / f"{time.strftime('%Y-%m-%d')}_cpu_linearity-theory"
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("summary.md", "results.json", "linearity_theory.png"):
            shutil.copy(out / name, folder / name)
        print(f"recorded in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
