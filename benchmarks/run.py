"""The main benchmark (`make bench`): linear_logprobs forward + backward, fused backends vs the reference.

    python -m benchmarks.run                       # CPU preset, about two minutes on 2 cores
    python -m benchmarks.run --preset gpu          # N=8192, D=4096, V=128256, bf16 on CUDA
    python -m benchmarks.run --tokens 4096 --vocab 32000 --hidden 512 --impls reference native
    python -m benchmarks.run --cases logprobs dpo epa-1+3 epa-1+3+60
    python -m benchmarks.run --preset cpu-real     # SmolLM2's real activations, filter_eps variants, GEMM floors
    python -m benchmarks.run --source smollm2 --tokens 4096 --impls reference native native@1e-5
    python -m benchmarks.run --preset gpu-peers    # Llama-3/Qwen/Gemma heads against Liger, CCE, TRL, torch.compile
    python -m benchmarks.run --preset gpu-losses   # DPO and EPA 1+3+60 over plain log-probs, with the peers
    python -m benchmarks.run --preset smoke        # every implementation and case kind at tiny sizes (CPU, seconds)
    python -m benchmarks.run --tokens 64 --hidden 16 --vocab 300 --softcap 30 --repeats 1 --warmup 0 --no-memory

Cases: per-sequence log-probs ("logprobs"), DPO ("dpo", 1+1) and EPA ("epa-1+K" or "epa-1+K+W":
K strong and W weak negatives per prompt) on the same N tokens; for loss cases the reference is the
unfused path (materialised log-probs + preference_loss). `--source smollm2` replaces the random inputs by
SmolLM2-135M's own activations on real text (D = 576, V = 49152; `benchmarks/activations.py`). An
implementation "backend@eps" is that backend with filter_eps=eps (triton, native), accepted up to 2⁻⁸ relative
error. Each size also gets its 4-GEMM floor (the GEMMs of an exact fused pass, timed alone) and its 3-GEMM floor
(without the recompute: what a pass that keeps its logits needs). "gemm", "gemm-tokens", "gemm-vocab" and
"gemm-keep" are the GEMM-and-row-kernel backend at its default chunking, forced token or vocabulary chunks, and
with a budget that keeps the logits. `--softcap C` (or a
grid's "softcap") applies Gemma-style logit softcapping c·tanh(z / c) in every implementation that has it (the
others are skipped saying so).

Per implementation: median forward, backward and full (forward + backward) times, the full pass's spread over the
repeats (p20-p80 from 5 repeats, min-max below), effective TFLOP/s of the full pass (8·N·D·V) and of the forward
(2·N·D·V), peak memory above the inputs, the relative error against the first implementation run (the correctness
gate) and against the float32 materialised reference on the same inputs (`error_fp32`; `--no-error-fp32` skips it).
Prints a markdown table and a summary, and writes results.json + results.md to --out (default bench-out/).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

import torch

from benchmarks import activations
from benchmarks.harness import (
    CPU_MEMORY_ENV,
    SOURCES,
    SPREAD_MIN_REPEATS,
    Case,
    cpu_memory_exact,
    gemm_floor_ms,
    run_case,
)
from benchmarks.plots import write_plots
from epa_kernels.provenance import environment

# A preset is a list of grids; each grid is the product of its cases, tokens, hidden sizes and vocabularies.
PRESETS = {
    "cpu": {
        "dtype": "float32", "repeats": 3, "warmup": 1,
        "grids": [
            {"cases": ["logprobs", "dpo"], "tokens": [512, 1024], "hidden": [512], "vocab": [32000]},
            {"cases": ["epa-1+3+60"], "tokens": [1024], "hidden": [512], "vocab": [32000]},
        ],
    },
    "gpu": {
        "dtype": "bfloat16", "repeats": 20, "warmup": 5,
        "grids": [
            # time and memory vs tokens
            {"cases": ["logprobs", "dpo"], "tokens": [1024, 2048, 4096, 8192, 16384, 32768, 65536],
             "hidden": [4096], "vocab": [128256]},
            # vocabulary and hidden size at the issue's reference size
            {"cases": ["logprobs"], "tokens": [8192], "hidden": [4096], "vocab": [32000, 256000]},
            {"cases": ["logprobs"], "tokens": [8192], "hidden": [2048], "vocab": [128256]},
            # memory vs negatives per prompt at a fixed token count
            {"cases": ["epa-1+3", "epa-1+3+4", "epa-1+3+16", "epa-1+3+60"], "tokens": [8192], "hidden": [4096],
             "vocab": [128256]},
        ],
    },
    # The exact native backend against its 4-GEMM floor on random inputs, then SmolLM2's real activations with
    # gradient-filtering variants (error against the exact result in the table). About 20 minutes on 2 cores.
    "cpu-real": {
        "dtype": "float32", "repeats": 3, "warmup": 1,
        "impls": ["reference", "reference-compile", "native", "torch", "cce-torch-compile", "trl",
                  "native@1e-6", "native@3e-6", "native@1e-5", "native@3e-5"],
        "grids": [
            {"cases": ["logprobs"], "tokens": [4096], "hidden": [512], "vocab": [32000]},
            {"cases": ["logprobs"], "tokens": [4096], "source": "smollm2"},
        ],
    },
    # linear_logprobs against the peers at real LM heads' shapes, bf16: Llama-3-8B's (D 4096, V 128256) at 8k and 32k
    # tokens, a Qwen's (D 2048, V 151936: Qwen2.5-3B, Qwen3-1.7B) at 16k, and a Gemma-like one at 8k (Gemma-2-2B's
    # D 2304, Gemma 3's 262144 vocabulary, Gemma 2's final-logit softcap 30). Few repeats: the GPU session gives
    # this preset about 90 s.
    "gpu-peers": {
        "dtype": "bfloat16", "repeats": 5, "warmup": 1,
        "impls": ["reference", "reference-compile", "gemm", "gemm-tokens", "gemm-vocab", "gemm-keep", "triton", "torch",
                  "liger", "cce", "trl"],
        "grids": [
            {"cases": ["logprobs"], "tokens": [512, 8192, 32768], "hidden": [4096], "vocab": [128256]},
            {"cases": ["logprobs"], "tokens": [16384], "hidden": [2048], "vocab": [151936]},
            {"cases": ["logprobs"], "tokens": [8192], "hidden": [2304], "vocab": [262144], "softcap": 30.0},
        ],
    },
    # The losses' cost over plain log-probs on the same tokens (the summary's "takes …× the time" lines), bf16.
    "gpu-losses": {
        "dtype": "bfloat16", "repeats": 7, "warmup": 1,
        "impls": ["reference", "gemm", "gemm-vocab", "triton", "liger", "cce"],
        "grids": [
            {"cases": ["logprobs", "dpo", "epa-1+3+60"], "tokens": [8192], "hidden": [4096], "vocab": [128256]},
        ],
    },
    # Every implementation, case kind and a softcap at tiny sizes: a check that the benchmark runs (a few seconds
    # per torch.compile'd peer on CPU), not a measurement.
    "smoke": {
        "dtype": "float32", "repeats": 5, "warmup": 1,
        "grids": [
            {"cases": ["logprobs", "dpo", "epa-1+2"], "tokens": [64], "hidden": [16], "vocab": [300]},
            {"cases": ["logprobs"], "tokens": [64], "hidden": [16], "vocab": [300], "softcap": 30.0},
        ],
    },
}
IMPLS = ["reference", "reference-compile", "triton", "native", "torch", "gemm", "liger", "liger-per-token", "cce",
         "cce-torch-compile", "trl"]
GEMM_VARIANTS = ("gemm-tokens", "gemm-vocab", "gemm-keep")  # named in --impls or a preset: harness.gemm_variants
GRID_KEYS = ("cases", "tokens", "hidden", "vocab", "source", "softcap")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), help="default: gpu on CUDA, cpu otherwise; size "
                        "options below replace the preset's grids with one grid")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--cases", nargs="+", help="logprobs, dpo, epa-1+K, epa-1+K+W (default: the preset's)")
    parser.add_argument("--impls", nargs="+", help=f"implementations, 'backend@eps' for a filtered one (default: "
                        f"the preset's, else {' '.join(IMPLS)})")
    parser.add_argument("--source", choices=SOURCES, help="inputs: random, or smollm2's real activations (D and V "
                        "are then the model's)")
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts N")
    parser.add_argument("--hidden", type=int, nargs="+", help="hidden sizes D")
    parser.add_argument("--vocab", type=int, nargs="+", help="vocabulary sizes V")
    parser.add_argument("--softcap", type=float, metavar="C", help="logit softcap c·tanh(z / c) in every case "
                        "(replaces the grids' own; implementations without one are skipped)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, help="timed repeats (median reported; spread p20-p80 from 5 on, "
                        "else min-max)")
    parser.add_argument("--warmup", type=int, help="untimed warm-up runs")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--no-error-fp32", action="store_true", help="skip the float32 reference (error_fp32)")
    parser.add_argument("--out", default="bench-out", help="output directory for results.json and results.md")
    return parser.parse_args(argv)


def fmt(value, spec):
    return "—" if value is None else format(value, spec)


def spread_text(r) -> str:
    return "—" if r.full_lo_ms is None else f"{r.full_lo_ms:.1f}–{r.full_hi_ms:.1f}"


def markdown_table(results) -> str:
    """One row per result. "full spread ms": p20–p80 of the full pass over the repeats (min–max under 5 repeats;
    results.json says which in `spread`). "TFLOP/s": 8·N·D·V over the full pass; "fwd TFLOP/s": 2·N·D·V over the
    forward. "rel. error": against the first implementation run (the gate); "error vs fp32": against the float32
    materialised reference on the same inputs."""
    lines = [
        "| case | impl | N | D | V | dtype | forward ms | backward ms | full ms | full spread ms | × ref time "
        "| peak MiB | × ref memory | TFLOP/s | fwd TFLOP/s | rel. error | error vs fp32 | status |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        c = r.case
        peak = None if r.peak_bytes is None else r.peak_bytes / 2**20
        lines.append(
            f"| {c['name']} | {r.impl} | {c['tokens']} | {c['hidden']} | {c['vocab']} | {c['dtype']} "
            f"| {fmt(r.forward_ms, '.1f')} | {fmt(r.backward_ms, '.1f')} | {fmt(r.full_ms, '.1f')} "
            f"| {spread_text(r)} | {fmt(r.ratios.get('time'), '.2f')} "
            f"| {fmt(peak, '.1f')} | {fmt(r.ratios.get('memory'), '.3f')} | {fmt(r.tflops, '.3f')} "
            f"| {fmt(r.forward_tflops, '.3f')} | {fmt(r.error, '.1e')} | {fmt(r.error_fp32, '.1e')} | {r.status} |"
        )
    return "\n".join(lines)


def size_key(case) -> tuple:
    """(N, D, V, dtype) of a Case or of a result's case dict."""
    c = case if isinstance(case, dict) else vars(case)
    return c["tokens"], c["hidden"], c["vocab"], c["dtype"]


def inputs_key(case: dict) -> tuple:
    """What makes two cases' log-probs the same function of the same tokens: size, dtype, source and softcap."""
    return (*size_key(case), case.get("source", "random"), case.get("softcap"))


def summary(results, floors=None) -> str:
    """What one run shows beyond the table: each implementation's time over the 4-GEMM floor of its size, a
    loss's cost over plain log-probs of the same backend, and how peak memory moves with the number of
    negatives at a fixed token count."""
    ok = [r for r in results if r.status == "ok"]
    lines = []
    for size, (floor, floor3) in (floors or {}).items():
        names = dict.fromkeys(r.case["name"] for r in ok if size_key(r.case) == size and r.case["kind"] == "logprobs")
        for name in names:
            rows = [r for r in ok if size_key(r.case) == size and r.case["name"] == name]
            ratios = ", ".join(f"{r.impl} {r.full_ms / floor:.2f}×" for r in rows)
            lines.append(f"- N={size[0]}, D={size[1]}, V={size[2]} {size[3]}: 4 GEMMs take {floor:.1f} ms, 3 GEMMs "
                         f"(logits kept) {floor3:.1f} ms; time over the 4-GEMM floor ({name}): {ratios}")
    for r in ok:
        c = r.case
        if c["kind"] == "logprobs":
            continue
        base = next((b for b in ok if b.impl == r.impl and b.case["kind"] == "logprobs"
                     and inputs_key(b.case) == inputs_key(c)), None)
        if base is not None and r.impl != "reference":
            lines.append(f"- {r.impl}: {c['name']} takes {r.full_ms / base.full_ms:.3f}× the time of its plain "
                         f"log-probs on the same tokens (N={c['tokens']})")
    by_impl = {}
    for r in ok:
        if r.case["kind"] != "logprobs" and r.peak_bytes:
            by_impl.setdefault((r.impl, *inputs_key(r.case)), []).append(r)
    for (impl, tokens, *_), rows in by_impl.items():
        if len(rows) > 1:
            sizes = ", ".join(f"{r.case['name']} {r.peak_bytes / 2**20:.1f} MiB" for r in rows)
            lines.append(f"- {impl}: peak memory above inputs at N={tokens}: {sizes}")
    return "\n".join(lines)


def build_cases(grids, settings, softcap=None) -> list:
    """The product of each grid's cases, tokens, hidden sizes and vocabularies (a model source brings its own D
    and V), in the settings' dtype, with the grid's softcap unless `softcap` replaces it; duplicates dropped."""
    cases = []
    for grid in grids:
        source = grid.get("source") or "random"
        cap = softcap if softcap is not None else grid.get("softcap")
        model_sizes = source == "smollm2"  # a model's activations come with its D and V
        for name in grid["cases"]:
            for tokens in grid["tokens"]:
                for hidden in [activations.HIDDEN] if model_sizes else grid["hidden"]:
                    for vocab in [activations.VOCAB] if model_sizes else grid["vocab"]:
                        case = Case.parse(name, tokens=tokens, hidden=hidden, vocab=vocab, dtype=settings["dtype"],
                                          source=source, softcap=cap)
                        if case not in cases:
                            cases.append(case)
    return cases


def preset_cases(name: str, **settings) -> list:
    """The cases a preset runs (its dtype unless `dtype` is given)."""
    preset = PRESETS[name]
    return build_cases(preset["grids"], {"dtype": settings.get("dtype", preset["dtype"])}, settings.get("softcap"))


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = PRESETS[args.preset or ("gpu" if device.type == "cuda" else "cpu")]
    settings = {key: getattr(args, key) if getattr(args, key) is not None else preset[key]
                for key in ("dtype", "repeats", "warmup")}
    impls = args.impls or preset.get("impls", IMPLS)
    grids = preset["grids"]
    overrides = {key: getattr(args, key) for key in ("cases", "tokens", "hidden", "vocab", "source")
                 if getattr(args, key)}
    if overrides:  # command-line sizes replace the preset's grids with one grid
        base = grids[0]
        grids = [{key: overrides.get(key, base.get(key)) for key in GRID_KEYS}]
    cases = build_cases(grids, settings, args.softcap)
    env = environment(device)
    print(f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}")
    results, floors = [], {}
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] case {case.name} N={case.tokens} D={case.hidden} V={case.vocab} {case.dtype} "
              f"({case.num_seqs} sequences):", flush=True)
        results += run_case(case, device, impls, warmup=settings["warmup"], repeats=settings["repeats"],
                            memory=not args.no_memory, fp32_error=not args.no_error_fp32,
                            progress=lambda msg: print(msg, flush=True))
        size = size_key(case)
        if size not in floors:
            floors[size] = tuple(gemm_floor_ms(case, device, warmup=settings["warmup"], repeats=settings["repeats"],
                                               gemms=gemms) for gemms in (4, 3))
            print(f"  4-GEMM floor: {floors[size][0]:.1f} ms, 3 GEMMs: {floors[size][1]:.1f} ms", flush=True)
    table = markdown_table(results) + "\n\n" + summary(results, floors)
    spread = "p20–p80" if settings["repeats"] >= SPREAD_MIN_REPEATS else "min–max"
    conditions = (
        f"{env['device']}; torch {env['torch']}, triton {env['triton']}; commit {env['commit']}; {env['date']}; "
        f"median of {settings['repeats']} after {settings['warmup']} warm-up (full spread: {spread} of the "
        "repeats); forward + backward w.r.t. hidden and weight of the case's output (logprobs: per-sequence sums of "
        "8 sequences under a random upstream gradient; dpo/epa: the scalar loss; their reference is materialised "
        "log-probs + preference_loss); TFLOP/s = 8·N·D·V / full time, fwd TFLOP/s = 2·N·D·V / forward time; "
        "memory = peak above inputs, gradients included; rel. error: max over output and the two gradients of "
        "the relative L2 error against the first implementation run, error vs fp32: the same against the "
        "materialised reference in float32 (no TF32) on the same inputs upcast."
    )
    print("\n" + table + "\n\n" + conditions)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as out:
        json.dump({"environment": env, "settings": {**settings, "spread": spread.replace("–", "-"),
                                                     "softcap": args.softcap, "error_fp32": not args.no_error_fp32},
                   "results": [asdict(r) for r in results],
                   "gemm_floor_ms": [{"tokens": n, "hidden": d, "vocab": v, "dtype": t, "ms": ms, "ms_3_gemms": ms3}
                                     for (n, d, v, t), (ms, ms3) in floors.items()]}, out, indent=2)
    with open(os.path.join(args.out, "results.md"), "w") as out:
        out.write(table + "\n\n" + conditions + "\n")
    try:
        plots = write_plots(results, args.out, env["device"])
    except ImportError:
        plots = []
        print("plots skipped: matplotlib is not installed (pip install -e '.[bench]')")
    print(f"\nwrote {', '.join(os.path.join(args.out, f) for f in ('results.json', 'results.md'))}"
          + "".join(f", {p}" for p in plots))
    return results


if __name__ == "__main__":
    if not cpu_memory_exact():  # restart under the allocator settings that make CPU memory exact
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.run", *sys.argv[1:]],
                  {**os.environ, **CPU_MEMORY_ENV})
    main()
