"""The fused head with a frozen weight (LoRA's case): forward + backward time against a trainable weight.

    python -m benchmarks.frozen_head                                  # SmolLM2's head, 4096 tokens, native (CPU)
    python -m benchmarks.frozen_head --tokens 8192 --hidden 4096 --vocab 128256 --dtype bfloat16 --backends triton

Under LoRA the LM head is frozen unless targeted, so the backward needs d hidden only: three GEMMs of N·D·V (the
logits, their recompute, d hidden) instead of four. Expectation: the full pass takes about 3/4 of the trainable
one's time where the GEMMs dominate. The two runs alternate (trainable, frozen, trainable, ...) so that a noisy
machine slows both alike; the medians and their ratio are printed, and with --out written as JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.harness import Case, _sync
from epa_kernels import linear_logprobs
from epa_kernels.provenance import environment


def full_pass_ms(backend: str, inputs, device, *, frozen: bool) -> float:
    """One forward + backward of per-sequence log-probs; the weight's gradient only when it is trainable."""
    hidden, weight, targets, cu_seqlens, upstream = inputs
    weight.requires_grad_(not frozen)
    _sync(device)
    tic = time.perf_counter()
    logps = linear_logprobs(hidden, weight, targets, cu_seqlens=cu_seqlens, backend=backend)
    grads = torch.autograd.grad(logps, (hidden,) if frozen else (hidden, weight), grad_outputs=upstream)
    _sync(device)
    del logps, grads
    return (time.perf_counter() - tic) * 1e3


def measure(backend: str, case: Case, device, *, warmup: int, repeats: int) -> dict:
    inputs = case.inputs(device)
    times = {"trainable": [], "frozen": []}
    for i in range(warmup + repeats):
        for name in times:
            elapsed = full_pass_ms(backend, inputs, device, frozen=name == "frozen")
            if i >= warmup:
                times[name].append(elapsed)
    result = {f"{name}_ms": statistics.median(values) for name, values in times.items()}
    result["ratio"] = result["frozen_ms"] / result["trainable_ms"]
    return {"backend": backend, **result, "times_ms": times}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.frozen_head", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--backends", nargs="+", help="default: native on CPU, triton on CUDA")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="write the results as JSON to this file")
    args = p.parse_args(argv)
    for name in ("tokens", "hidden", "vocab", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be ≥ 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be ≥ 0, got {args.warmup}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = args.backends or (["triton"] if device.type == "cuda" else ["native"])
    case = Case(tokens=args.tokens, hidden=args.hidden, vocab=args.vocab, dtype=args.dtype)
    rows = [measure(b, case, device, warmup=args.warmup, repeats=args.repeats) for b in backends]
    env = environment(device)
    print("| backend | N | D | V | dtype | trainable head ms | frozen head ms | frozen / trainable |\n"
          "|---|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['backend']} | {case.tokens} | {case.hidden} | {case.vocab} | {case.dtype} | "
              f"{r['trainable_ms']:.1f} | {r['frozen_ms']:.1f} | {r['ratio']:.2f} |")
    print(f"\n{env['device']}, torch {env['torch']}, {torch.get_num_threads()} threads, commit {env['commit']}; "
          f"median of {args.repeats} alternating repeats after {args.warmup} warm-up")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"environment": env, "threads": torch.get_num_threads(),
                                              "case": vars(args), "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
