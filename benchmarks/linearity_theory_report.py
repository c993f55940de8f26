"""Outputs of `python -m benchmarks.linearity_theory`: summary.md (tables), results.json, linearity_theory.png."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from epa_kernels.provenance import environment

DEFINITIONS = (
    "Columns: the linearity test (`epa_kernels.transformers.linearity.linearity_report`) of the implicit reward "
    "β·(log π − log π_ref) against the true reward r*, both centred per prompt, over **all** responses of every "
    "prompt: mean Pearson, mean slope of implicit on true reward (target 1), slope-1 error (mean squared residual of "
    "implicit − true, target 0; 0 for a policy equal to π_ref would be var(r*) ≈ reward-std²), pairwise accuracy. "
    "*error (sampled)*: the same error over the responses that appear in some group of the prompt; *error (chosen)*: "
    "over those that were the positive at least once. *scored %* / *chosen %*: share of all (prompt, response) pairs "
    "in those two sets. Each cell: mean ± sd over seeds (each seed a fresh world and data set).")


def _fmt(pair, digits=3) -> str:
    mean, sd = pair
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _sci(pair) -> str:
    mean, sd = pair
    return "—" if math.isnan(mean) else f"{mean:.1e} ± {sd:.0e}"


def _pct(pair) -> str:
    return "—" if math.isnan(pair[0]) else f"{100 * pair[0]:.0f}"


def _cells(results, table):
    return [c for c in results["cells"] if c["table"] == table]


def _sweep_table(rows, first=("arm", "K", "W")) -> str:
    head = list(first) + ["Pearson", "slope", "slope-1 error", "pair acc.", "error (sampled)", "error (chosen)",
                          "scored %", "chosen %", "final loss"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(first) + "---:|" * (len(head) - len(first))]
    for c in rows:
        names = {"arm": c["label"].split(" K=")[0] if c["arm"] != "dpo-avg" else "DPO avg", "K": str(c["K"]),
                 "W": str(c["W"]), "α": f"{c['alpha']:g}", "n_obs": str(c["n_obs"]), "choice": c["choice"]}
        values = [names[key] for key in first] + [
            _fmt(c["pearson"]), _fmt(c["slope"]), _fmt(c["error"]), _fmt(c["accuracy"]), _fmt(c["error_sampled"]),
            _fmt(c["error_chosen"]), _pct(c["scored"]), _pct(c["chosen"]), _fmt(c["loss"], 4)]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def _restart_table(rows) -> str:
    lines = ["| arm | final loss | loss spread (max − min) | implicit spread (all) | (sampled) | (chosen) | "
             "slope-1 error |", "|---|---:|---:|---:|---:|---:|---:|"]
    for c in rows:
        lines.append(f"| {c['label']} | {_fmt(c['loss'], 4)} | {_sci(c['loss_spread'])} | {_fmt(c['spread'])} | "
                     f"{_fmt(c['spread_sampled'])} | {_fmt(c['spread_chosen'])} | {_fmt(c['error'])} |")
    return "\n".join(lines)


def _budget_table(results, family) -> str:
    def same(c, b):
        return all(c[k] == b[k] for k in ("family", "arm", "K", "W", "alpha", "n_obs", "choice"))

    lines = ["| arm | final loss (1×) | final loss (lr ×f) | slope (1×) | slope (×f) | slope-1 error (1×) | "
             "error (×f) | Pearson (1×) | Pearson (×f) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for b in _cells(results, f"budget-{family}"):
        base = next((c for c in results["cells"] if c["lr_factor"] == 1 and same(c, b)), None)
        if base is None:
            continue
        lines.append(f"| {b['label']} | {_fmt(base['loss'], 4)} | {_fmt(b['loss'], 4)} | {_fmt(base['slope'])} | "
                     f"{_fmt(b['slope'])} | {_fmt(base['error'])} | {_fmt(b['error'])} | {_fmt(base['pearson'])} | "
                     f"{_fmt(b['pearson'])} |")
    return "\n".join(lines)


def summary(args, results, wall: float, env: dict) -> str:
    gap = np.array(results["own_vs_other_gap"])
    nets = f"2-layer tanh MLP, hidden {args.hidden}, Adam lr {args.network_lr}"
    parts = [
        "# Is the implicit reward 1:1 linear in the true reward? (a world where r* is known)",
        f"`python -m benchmarks.linearity_theory` — {env['device']}; torch {env['torch']}; commit {env['commit']}; "
        f"{env['date']}; wall time {wall:.0f} s.",
        f"World: X = {args.num_prompts} prompts, |Y| = {args.num_responses} responses, feature dim "
        f"{args.feature_dim}, r* bilinear with within-prompt std {args.reward_std}, π_ref = softmax("
        f"{args.ref_sharpness}·r* + N(0, {args.ref_noise}²)). Mean r* of a response sampled for its own prompt minus "
        f"one sampled for another prompt (exact expectation): {gap.mean():.3f} ± "
        f"{gap.std(ddof=1) if len(gap) > 1 else 0:.3f}. Largest group: K + 1 + W = "
        f"{max(args.strong) + 1 + max(args.weak)} of the {args.num_responses} responses (a group holds distinct "
        f"responses, so W ≤ |Y| − K − 1). β = {args.beta}. Training: full batch, {args.steps} Adam "
        f"steps cosine-decayed to 0, the same for every arm; tabular lr {args.lr} (reward units per step), "
        f"network: {nets}. Seeds {args.seed}…{args.seed + args.seeds - 1}.",
        DEFINITIONS,
    ]
    titles = {"tabular": "Tabular policy", "network": f"Network policy ({nets})"}
    for family in args.families:
        parts += [f"## {titles[family]}: K strong × W weak negatives (n_obs = {args.num_obs}, the annotator saw the "
                  "strong set)", "DPO pairs: Bradley–Terry pairs (the same data as EPA K=1 W=0). DPO avg: the "
                  "library's `loss=\"dpo\"` with K negatives (mean pairwise −log σ) on EPA's strong sets.",
                  _sweep_table(_cells(results, f"kw-{family}")),
                  f"### {titles[family]}: positive drawn over strong ∪ weak (choice set `all`, the EPA model exactly)",
                  _sweep_table(_cells(results, f"all-{family}"))]
    if "tabular" in args.families:
        parts += [f"## Weak weight α (tabular, K = {args.sweep_strong}, W = {args.sweep_weak}, n_obs = "
                  f"{args.num_obs})", _sweep_table(_cells(results, "alpha"), first=("α",)),
                  f"## Data size (tabular; EPA at K = {args.sweep_strong})",
                  _sweep_table(_cells(results, "nobs"), first=("n_obs", "arm", "K", "W"))]
    parts += ["## Non-uniqueness: the same data, different initialisations",
              f"{args.restarts} trainings per seed on the same data: tabular from π_ref's logits plus N(0, "
              f"{args.init_noise}²) reward-unit noise; network from {args.restarts} seeds of its hidden layer (all "
              "start at π_ref: the last layer is 0). *loss spread*: max − min of the final losses; *implicit "
              "spread*: mean over prompts and responses of the std over runs of the per-prompt-centred implicit "
              "reward (all responses; sampled; chosen at least once)."]
    for family in args.families:
        parts += [f"### {titles[family]}", _restart_table([r for r in results["restarts"]
                                                            if r["family"] == family])]
    parts += [f"## Budget check: the same arms with lr × {args.budget_factor:g} (≈ {args.budget_factor:g}× the "
              "distance Adam may travel)",
              "Where no finite minimiser exists (a response never chosen, a component of the comparison graph that "
              "always wins) the loss keeps falling ever more slowly while those implicit rewards keep moving: a small "
              "loss change next to a large change of slope or error means the loss does not pin the implicit reward."]
    for family in args.families:
        parts += [f"### {titles[family]}", _budget_table(results, family)]
    return "\n\n".join(parts) + "\n"


def _plot(path: Path, args, results) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = args.families
    fig, axes = plt.subplots(len(families), 4, figsize=(21, 4.6 * len(families)), squeeze=False)
    for row, family in enumerate(families):
        kw, alls = _cells(results, f"kw-{family}"), _cells(results, f"all-{family}")
        for col, (metric, name) in enumerate((("error", "slope-1 error (all responses)"), ("slope", "slope"))):
            ax = axes[row, col]
            for i, K in enumerate(args.strong):
                color = f"C{i}"
                for cells, style, tag in ((kw, "-o", "strong"), (alls, "--s", "all")):
                    points = sorted((c["W"], *c[metric]) for c in cells if c["arm"] == "epa" and c["K"] == K)
                    if points:
                        w, mean, sd = map(np.array, zip(*points, strict=True))
                        ax.errorbar(w, mean, sd, fmt=style, color=color, capsize=2, label=f"EPA K={K} ({tag})")
            for c in (c for c in kw if c["arm"] != "epa"):  # DPO: one level each, in its K's colour
                color = f"C{args.strong.index(c['K'])}" if c["arm"] == "dpo-avg" else "k"
                ax.axhline(c[metric][0], color=color, linestyle=":", label=c["label"])
            if metric == "slope":
                ax.axhline(1.0, color="grey", linewidth=0.8)
            weak = sorted({c["W"] for c in kw})
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xlim(-0.3, 1.4 * max(weak) + 0.5)
            ax.set_xticks(weak, [str(w) for w in weak])
            ax.set_xlabel("W weak negatives")
            ax.set_ylabel(name)
            ax.set_title(f"{family}: {name} (n_obs = {args.num_obs})")
            ax.legend(fontsize=6)
        ax = axes[row, 2]
        if family == "tabular" and _cells(results, "nobs"):
            nobs = _cells(results, "nobs")
            for label in dict.fromkeys(c["label"] for c in nobs):
                points = sorted((c["n_obs"], *c["error"]) for c in nobs if c["label"] == label)
                n, mean, sd = map(np.array, zip(*points, strict=True))
                ax.errorbar(n, mean, sd, fmt="-o", capsize=2, label=label)
            ax.set_xscale("log")
            ax.set_xlabel("n_obs per prompt")
            ax.set_ylabel("slope-1 error (all responses)")
            ax.set_title("tabular: data size")
            ax.legend(fontsize=6)
        else:  # the approximation question: does the error over chosen responses fall as K + W grows?
            for i, f in enumerate(families):
                for tag, marker in (("kw", "o"), ("all", "s")):
                    cells = [c for c in _cells(results, f"{tag}-{f}") if c["arm"] == "epa"]
                    points = sorted((c["K"] + c["W"], *c["error_chosen"]) for c in cells)
                    if points:
                        size, mean, sd = map(np.array, zip(*points, strict=True))
                        ax.errorbar(size, mean, sd, fmt=marker, color=f"C{i}", capsize=2, alpha=0.8,
                                    label=f"{f}, EPA ({'strong' if tag == 'kw' else 'all'})")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("K + W negatives per group")
            ax.set_ylabel("slope-1 error (responses chosen ≥ 1)")
            ax.set_title("EPA: error on chosen responses vs K + W")
            ax.legend(fontsize=6)
        ax = axes[row, 3]
        rows = [r for r in results["restarts"] if r["family"] == family]
        x = np.arange(len(rows))
        for offset, key, label in ((-0.2, "spread", "all responses"), (0.2, "spread_chosen", "chosen ≥ 1")):
            ax.bar(x + offset, [r[key][0] for r in rows], 0.4, yerr=[r[key][1] for r in rows], label=label)
        ax.set_xticks(x, [f"{r['label']}\nΔloss {r['loss_spread'][0]:.0e}" for r in rows], fontsize=6)
        ax.set_ylabel("implicit-reward spread over restarts")
        ax.set_title(f"{family}: same data, {args.restarts} initialisations")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return value


def write_outputs(out: Path, args, results: dict, wall: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = environment(torch.device("cpu"))
    (out / "summary.md").write_text(summary(args, results, wall, env))
    record = {"options": vars(args), "environment": env, "wall_seconds": wall, **results}
    (out / "results.json").write_text(json.dumps(_jsonable(record), indent=1, allow_nan=False))
    _plot(out / "linearity_theory.png", args, results)
