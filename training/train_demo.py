"""`make train-demo`: DPO (1 + 1) against EPA (1 + K strong + W weak) from the same start, offline, on 2 CPU cores.

    python -m training.train_demo --out demo-out [--record benchmarks/results]

Steps, each the program a user would run (one process each, so each frees its memory):
1. `python -m training.demo_data`: TREC questions, SmolLM2-135M-Instruct answers, AFINN gold reward, preferences
   drawn from it by Bradley–Terry at scale s (pairs for DPO, the energy model over all answers for EPA);
2. `python -m training.epa` twice, same model, prompts, β, learning rate, epochs and prompts per update:
   `--loss dpo` on train_pairs.jsonl and `--loss epa --num-weak W` on train_multi.jsonl;
3. `python -m training.evaluate` of each trained policy against the base model on the held-out prompts: the
   linearity test (Pearson and slope of centred implicit vs gold rewards), pairwise accuracy, greedy win rate;
4. a summary (markdown table, JSON with device, versions, date and commit, both runs' training curves) in --out,
   and copied to --record when given.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from epa_kernels.provenance import environment

RUNS = {  # name → (training data file, loss options)
    "dpo": ("train_pairs.jsonl", ["--loss", "dpo"]),
    "epa": ("train_multi.jsonl", ["--loss", "epa"]),
}
METRICS = (("mean_pearson", "Pearson (mean over prompts)"), ("mean_slope", "slope (mean over prompts)"),
           ("pooled_pearson", "Pearson (pooled)"), ("pooled_slope", "slope (pooled)"),
           ("pairwise_accuracy", "pairwise accuracy"), ("win_rate", "greedy win rate vs reference"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo-out")
    p.add_argument("--record", help="also copy the summary, JSON and plots into this directory (a dated folder)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--num-train", type=int, default=128)
    p.add_argument("--num-eval", type=int, default=40)
    p.add_argument("--responses-per-prompt", type=int, default=6, help="n sampled answers per prompt (EPA: K = n−1)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--bt-scale", type=float, default=1.0)
    p.add_argument("--num-weak", type=int, default=2, help="W weak negatives per prompt for EPA")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--prompts-per-update", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-data", action="store_true", help="reuse OUT/data from an earlier run")
    return p.parse_args(argv)


def step(name: str, command: list[str], timings: dict) -> None:
    print(f"\n== {name}: {' '.join(command)}", flush=True)
    tic = time.perf_counter()
    subprocess.run([sys.executable, "-m", *command], check=True)
    timings[name] = round(time.perf_counter() - tic, 1)


def summary_table(results: dict) -> str:
    lines = ["| run | " + " | ".join(label for _, label in METRICS) + " | final train loss | updates |",
             "|---|" + "---:|" * (len(METRICS) + 2)]
    for name, result in results.items():
        cells = [result.get(key) for key, _ in METRICS]
        cells = ["—" if v is None else f"{v:.3f}" for v in cells]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {result['train_loss']:.4f} | {result['updates']} |")
    return "\n".join(lines)


def plot_runs(out: Path, path: Path) -> None:
    """Both runs' training curves on one figure (loss, margin, accuracy against the optimizer step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.epa.logs import read_metrics

    keys = (("loss", "training loss"), ("margin", "reward margin"), ("accuracy", "accuracy (positive beats all)"))
    fig, axes = plt.subplots(1, len(keys), figsize=(13, 3.4))
    for name in RUNS:
        records = [r for r in read_metrics(out / name / "metrics.jsonl") if r["split"] == "train"]
        for axis, (key, label) in zip(axes, keys, strict=True):
            axis.plot([r["step"] for r in records], [r.get(key, float("nan")) for r in records], label=name)
            axis.set_title(label, fontsize=9)
            axis.set_xlabel("optimizer step")
            axis.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    data = out / "data"
    if not args.skip_data:
        step("data", ["training.demo_data", "--out", str(data), "--model", args.model, "--num-train",
                      str(args.num_train), "--num-eval", str(args.num_eval), "--responses-per-prompt",
                      str(args.responses_per_prompt), "--max-new-tokens", str(args.max_new_tokens), "--bt-scale",
                      str(args.bt_scale), "--seed", str(args.seed)], timings)
    common = ["--model", args.model, "--beta", str(args.beta), "--lr", str(args.lr), "--epochs", str(args.epochs),
              "--max-prompts-per-batch", str(args.prompts_per_update), "--max-tokens-per-batch", "16384",
              "--max-length", "256", "--max-prompt-length", "128", "--seed", str(args.seed), "--warmup-ratio", "0.1",
              "--no-progress"]
    results = {}
    for name, (file, options) in RUNS.items():
        weak = ["--num-weak", str(args.num_weak)] if name == "epa" else []
        step(f"train {name}", ["training.epa", "--data", str(data / file), "--output-dir", str(out / name),
                               *common, *options, *weak], timings)
        step(f"evaluate {name}", ["training.evaluate", "--policy", str(out / name / "model"), "--reference",
                                  args.model, "--data", str(data / "eval.jsonl"), "--beta", str(args.beta),
                                  "--gold-reward", "training.demo_data:gold_reward", "--max-length", "256",
                                  "--output", str(out / name / "eval"), "--seed", str(args.seed)], timings)
        report = json.loads((out / name / "eval" / "linearity.json").read_text())
        train = json.loads((out / name / "train_summary.json").read_text())
        results[name] = {**{k: report["report"].get(k) for k, _ in METRICS if k in report["report"]},
                         "win_rate": report.get("win_rate"), "train_loss": train["train"]["loss"],
                         "updates": train["updates"], "report": report["report"]}
    plot_runs(out, out / "curves.png")

    env = environment(torch.device("cpu"))
    meta = json.loads((data / "meta.json").read_text())
    table = summary_table(results)
    conditions = (f"{env['device']}; torch {env['torch']}; commit {env['commit']}; {env['date']}. SmolLM2-135M-"
                  f"Instruct, {meta.get('counts', {}).get('train_prompts', args.num_train)} train and "
                  f"{args.num_eval} held-out TREC prompts, {args.responses_per_prompt} sampled answers each, gold "
                  f"reward = {args.bt_scale} × AFINN sentiment; β = {args.beta}, lr = {args.lr}, {args.epochs} "
                  f"epochs, {args.prompts_per_update} prompts per update; EPA: K = {args.responses_per_prompt - 1} "
                  f"strong + W = {args.num_weak} weak negatives. Step times (s): {timings}.")
    (out / "summary.md").write_text(f"{table}\n\n{conditions}\n")
    (out / "results.json").write_text(json.dumps({"environment": env, "options": vars(args), "timings": timings,
                                                  "data": meta, "results": results}, indent=1, default=str))
    print(f"\n{table}\n\n{conditions}")
    if args.record:
        folder = Path(args.record) / f"{time.strftime('%Y-%m-%d')}_cpu_train-demo"
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("summary.md", "results.json", "curves.png"):
            shutil.copy(out / name, folder / name)
        for name in RUNS:
            shutil.copy(out / name / "eval" / "linearity.png", folder / f"linearity_{name}.png")
        print(f"recorded in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
