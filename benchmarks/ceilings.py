"""The device's two ceilings, measured: a large matrix product's rate and a device-to-device copy's bandwidth.

    python -m benchmarks.ceilings --device cuda --size 8192 --copy-mib 4096 --out bench-out/ceilings

A fused forward + backward of the LM head is 4 GEMMs of N·D·V, so the matmul rate bounds its effective TFLOP/s;
the copy bandwidth bounds what is memory-bound. Both on random data (zeros run faster on some GPUs), timed with
device events after warm-up (perf_counter on CPU): the median of `--repeats`. Writes ceilings.json and ceilings.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from epa_kernels.provenance import environment


def timed(fn, device: torch.device, repeats: int, warmup: int = 3) -> float:
    """Median seconds of fn() over `repeats` after `warmup` calls."""
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(stop) / 1e3
        else:
            t0 = time.perf_counter()
            fn()
            seconds = time.perf_counter() - t0
        if i >= warmup:
            times.append(seconds)
    return statistics.median(times)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=8192, help="the square matrix product's side")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--copy-mib", type=float, default=4096, help="bytes copied device to device, in MiB")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="bench-out/ceilings")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(args.size, args.size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(args.size, args.size, device=device, dtype=dtype, generator=gen)
    matmul_s = timed(lambda: a @ b, device, args.repeats)
    source = torch.randn(int(args.copy_mib * 2**20) // 4, device=device, generator=gen)
    target = torch.empty_like(source)
    copy_s = timed(lambda: target.copy_(source), device, args.repeats)
    result = {"environment": environment(device), "matmul": {"size": args.size, "dtype": str(dtype).split(".")[-1],
              "seconds": matmul_s, "tflops": 2 * args.size**3 / matmul_s / 1e12},
              "copy": {"bytes_moved": 2 * source.numel() * 4, "seconds": copy_s,
                       "tb_per_s": 2 * source.numel() * 4 / copy_s / 1e12}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ceilings.json").write_text(json.dumps(result, indent=1))
    table = (f"| ceiling | measured |\n|---|---:|\n| {args.size}³ matmul, {result['matmul']['dtype']} | "
             f"{result['matmul']['tflops']:.1f} TFLOP/s |\n| device copy (bytes read + written) | "
             f"{result['copy']['tb_per_s']:.3f} TB/s |\n\n{result['environment']['device']}, median of "
             f"{args.repeats} after 3 warm-ups, random data")
    (out / "ceilings.md").write_text(table + "\n")
    print(table)
    return result


if __name__ == "__main__":
    main()
