"""The main benchmark (`make bench`): linear_logprobs forward + backward, fused backends vs the reference.

    python -m benchmarks.run                       # CPU preset, about two minutes on 2 cores
    python -m benchmarks.run --preset gpu          # N=8192, D=4096, V=128256, bf16 on CUDA
    python -m benchmarks.run --tokens 4096 --vocab 32000 --hidden 512 --impls reference native

Prints a markdown table and writes results.json + results.md to --out (default bench-out/).
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict

import torch

from benchmarks.harness import Case, environment, run_case

PRESETS = {
    "cpu": {"tokens": [4096], "hidden": [512], "vocab": [32000], "dtype": "float32", "repeats": 5, "warmup": 1},
    "gpu": {"tokens": [8192], "hidden": [4096], "vocab": [128256], "dtype": "bfloat16", "repeats": 20, "warmup": 5},
}
IMPLS = ["reference", "triton", "native", "torch"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="default: gpu on CUDA, cpu otherwise")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--impls", nargs="+", default=IMPLS, help=f"implementations (default: {' '.join(IMPLS)})")
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts N")
    parser.add_argument("--hidden", type=int, nargs="+", help="hidden sizes D")
    parser.add_argument("--vocab", type=int, nargs="+", help="vocabulary sizes V")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, help="timed repeats (median reported)")
    parser.add_argument("--warmup", type=int, help="untimed warm-up runs")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--out", default="bench-out", help="output directory for results.json and results.md")
    return parser.parse_args(argv)


def fmt(value, spec):
    return "—" if value is None else format(value, spec)


def markdown_table(results) -> str:
    lines = [
        "| impl | N | D | V | dtype | forward ms | backward ms | full ms | × ref time | peak MiB | × ref memory "
        "| TFLOP/s | rel. error | status |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        c = r.case
        peak = None if r.peak_bytes is None else r.peak_bytes / 2**20
        lines.append(
            f"| {r.impl} | {c['tokens']} | {c['hidden']} | {c['vocab']} | {c['dtype']} | {fmt(r.forward_ms, '.1f')} "
            f"| {fmt(r.backward_ms, '.1f')} | {fmt(r.full_ms, '.1f')} | {fmt(r.ratios.get('time'), '.2f')} "
            f"| {fmt(peak, '.1f')} | {fmt(r.ratios.get('memory'), '.3f')} | {fmt(r.tflops, '.3f')} "
            f"| {fmt(r.error, '.1e')} | {r.status} |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = dict(PRESETS[args.preset or ("gpu" if device.type == "cuda" else "cpu")])
    for key in ("tokens", "hidden", "vocab", "dtype", "repeats", "warmup"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    env = environment(device)
    print(f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}")
    results = []
    for tokens in preset["tokens"]:
        for hidden in preset["hidden"]:
            for vocab in preset["vocab"]:
                case = Case(tokens=tokens, hidden=hidden, vocab=vocab, dtype=preset["dtype"])
                print(f"case N={tokens} D={hidden} V={vocab} {preset['dtype']}:", flush=True)
                results += run_case(case, device, args.impls, warmup=preset["warmup"], repeats=preset["repeats"],
                                    memory=not args.no_memory, progress=lambda msg: print(msg, flush=True))
    table = markdown_table(results)
    conditions = (
        f"{env['device']}; torch {env['torch']}, triton {env['triton']}; commit {env['commit']}; {env['date']}; "
        f"median of {preset['repeats']} after {preset['warmup']} warm-up; forward + backward of per-sequence sums "
        "(8 sequences) w.r.t. hidden and weight; memory = peak above inputs."
    )
    print("\n" + table + "\n\n" + conditions)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as out:
        json.dump({"environment": env, "preset": preset, "results": [asdict(r) for r in results]}, out, indent=2)
    with open(os.path.join(args.out, "results.md"), "w") as out:
        out.write(table + "\n\n" + conditions + "\n")
    print(f"\nwrote {args.out}/results.json and {args.out}/results.md")
    return results


if __name__ == "__main__":
    main()
