"""Tile configs of the Triton kernels chosen by measurement: every shipped config and a small grid around them,
timed, checked and compiled side by side, per hot shape; plus what the backward's fp32 accumulation costs.

    python -m benchmarks.tile_sweep --out bench-out/tile-sweep                  # H200: the default sweep (~2-3 min)
    python -m benchmarks.tile_sweep --backward-cost --out bench-out/tile-sweep  # ... and the backward's cost
    python -m benchmarks.tile_sweep --tokens 8192 --hidden 4096 --vocab 128256 --passes backward
    TRITON_INTERPRET=1 python -m benchmarks.tile_sweep --backward-cost --out /tmp/sweep   # CPU dry run (tiny)

Per shape (default on CUDA: N = 8192 and 32768 at D = 4096, V = 128256; N = 16384 at D = 2048, V = 151936; and
N = 64 at both heads for the few-token configs; bf16) and per pass (forward, backward), each config is
1. run once on fresh random inputs and compared with an fp32 materialised reference (`epa_kernels.reference`, fp32
   matmuls at "highest" precision) on the same inputs: relative L2 error of logp and lse (forward; tolerance
   FORWARD_TOLERANCE) and of d hidden and d weight (backward, given the reference's lse and per-token upstream
   gradients g: coef_a = g, coef_b = -g; tolerance BACKWARD_TOLERANCE). A config over its tolerance is "wrong",
   reported and never chosen; one that does not compile is "failed", one over the shared memory or thread limit
   "skipped", with the reason;
2. timed as the launcher runs it (`triton_logprobs.forward/backward(..., config=cfg)`: the backward includes zeroing
   its fp32 accumulation buffers and the final cast): on CUDA `triton.testing.do_bench` (L2 flushed before each
   sample; its repetition time set from one timed run so that it takes about --samples samples or more: median,
   p20-p80, min, max); on CPU (the interpreter) a perf_counter median of --samples runs, only to show the code runs;
3. described statically: registers, spilled (local) bytes per thread and shared memory of the kernel as compiled,
   on CUDA read from the compiled kernel Triton's launch returns (`n_regs`, `n_spills` × 4 B, `metadata.shared`),
   on CPU from an offline sm_90a compile (`benchmarks.kernel_report`'s, in a subprocess without the interpreter).
FLOPs counted: forward 2·N·D·V (the logits GEMM), backward 6·N·D·V (logits recomputed, d hidden, d weight).

Shapes are grouped by regime as the launchers choose configs: few tokens (N ≤ triton_logprobs._FEW_TOKENS), many
tokens. The choice per (pass, regime) is the config correct on every shape of the regime with the smallest geometric
mean of its time over the shipped config's; its speedup is the inverse. This program never changes a shipped config.

`--backward-cost` adds, per shape: the backward's time with the launcher's own config, the bytes of its fp32
accumulation buffers (d hidden [N, D] and d weight [V, D]), of their zero fill and of the final cast, the time of
those buffer operations alone (torch.zeros + .to), the peak memory above the inputs (CUDA), and the floor: the
backward's three GEMMs alone in torch (logits = h·Wᵀ, d hidden = dz·W, d weight = dzᵀ·h in the input dtype into
preallocated outputs), to show how far the fused backward is from it.

Writes tile_sweep.json (every config × shape × pass, the choices, the backward cost, the environment) and
tile_sweep.md (a table per pass and shape, the choice table, the backward cost) under --out.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: on a CPU this is a dry run

from benchmarks import kernel_report  # noqa: E402
from epa_kernels import reference  # noqa: E402
from epa_kernels.ops import triton_interpreting  # noqa: E402
from epa_kernels.ops import triton_logprobs as kernels  # noqa: E402
from epa_kernels.provenance import environment  # noqa: E402

C = kernels._Config
PASSES = ("forward", "backward")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Relative L2 error against the fp32 reference above which a config is wrong. The forward's products are exact and
# accumulate in fp32 (any dtype): only summation order differs. The backward rounds dz to the input dtype for the
# tensor cores and its outputs are in the input dtype: bf16 rounding alone is ~2⁻⁹ relative.
FORWARD_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}
BACKWARD_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 5e-3}
# The reference materialises fp32 logits of this many elements at a time (1 GiB).
REFERENCE_CHUNK_ELEMS = 2**28


@dataclass(frozen=True)
class Shape:
    tokens: int
    hidden: int
    vocab: int

    @property
    def regime(self) -> str:
        return "few" if self.tokens <= kernels._FEW_TOKENS else "many"

    @property
    def name(self) -> str:
        return f"N={self.tokens} D={self.hidden} V={self.vocab}"

    def flops(self, pass_: str) -> int:
        return (2 if pass_ == "forward" else 6) * self.tokens * self.hidden * self.vocab


HOT_SHAPES = (Shape(8192, 4096, 128256), Shape(32768, 4096, 128256), Shape(16384, 2048, 151936),
              Shape(64, 4096, 128256), Shape(64, 2048, 151936))
# The CPU dry run: V and N not multiples of the tiles, a few-token shape too.
DRY_RUN_SHAPES = (Shape(96, 64, 300), Shape(16, 64, 300))
REGIME_NAMES = {"many": "many tokens", "few": "few tokens"}

# Candidates per grid, (pass, regime) → configs, timed beside every shipped config. "small" stays around the
# shipped bf16/fp16 configs (forward 128×128×64 w8 s3, few tokens 64×256×32 w8 s3; backward 128×128×32 w8 s4, few
# tokens 64×128×32 w8 s3): wider D steps (fewer loop trips, more registers), deeper or shallower pipelines, fewer
# warps, other tile shapes. "fp32" replaces the table for float32 inputs (exact dots on CUDA cores).
GRIDS = {
    "small": {
        ("forward", "many"): [C(128, 128, 64, 8, 3), C(128, 128, 32, 8, 4), C(128, 128, 64, 8, 2),
                              C(128, 256, 32, 8, 3), C(256, 128, 32, 8, 3), C(128, 128, 32, 4, 3),
                              C(64, 128, 64, 4, 4), C(128, 64, 64, 4, 4)],
        ("forward", "few"): [C(64, 128, 32, 4, 4), C(64, 256, 64, 8, 3), C(64, 128, 64, 4, 3),
                             C(64, 256, 32, 4, 4)],
        ("backward", "many"): [C(128, 128, 64, 8, 3), C(128, 128, 32, 8, 4), C(128, 128, 32, 4, 3),
                               C(128, 64, 32, 4, 3), C(64, 128, 32, 4, 3), C(128, 64, 64, 4, 3),
                               C(128, 256, 32, 8, 2), C(64, 256, 32, 8, 3)],
        ("backward", "few"): [C(64, 128, 32, 4, 3), C(64, 256, 32, 8, 3), C(64, 128, 64, 4, 3),
                              C(64, 64, 64, 4, 3)],
        "fp32": [C(64, 64, 16, 4, 2), C(64, 64, 32, 4, 3), C(128, 64, 32, 8, 2), C(64, 128, 16, 8, 2)],
    },
    "tiny": {
        ("forward", "many"): [C(16, 32, 16, 1, 1), C(32, 64, 32, 4, 2)],
        ("forward", "few"): [C(16, 64, 32, 4, 2)],
        ("backward", "many"): [C(16, 32, 16, 1, 1), C(32, 64, 32, 4, 2)],
        ("backward", "few"): [C(16, 64, 32, 4, 2)],
        "fp32": [C(32, 32, 16, 4, 2)],
    },
}


def label(cfg) -> str:
    return f"{cfg.block_m}×{cfg.block_v}×{cfg.block_d} w{cfg.num_warps} s{cfg.num_stages}"


def shipped_configs(pass_: str, dtype: torch.dtype) -> dict:
    """{config: which launcher choice it is} for every config the launchers ship for this pass and dtype."""
    if dtype == torch.float32:
        return {kernels._FP32_CONFIG: "fp32"}
    if pass_ == "forward":
        many, few = kernels._FORWARD_CONFIG, kernels._FORWARD_CONFIG_FEW_TOKENS
    else:
        many, few = kernels._BACKWARD_CONFIG, kernels._BACKWARD_CONFIG_FEW_TOKENS
    if many == few:
        return {many: "many + few tokens"}
    return {many: REGIME_NAMES["many"], few: REGIME_NAMES["few"]}


def launcher_config(pass_: str, shape: Shape, dtype: torch.dtype):
    """The config the launcher uses for this shape on a GPU."""
    if pass_ == "forward":
        return kernels._gpu_config(shape.tokens, dtype, kernels._FORWARD_CONFIG, kernels._FORWARD_CONFIG_FEW_TOKENS)
    return kernels._gpu_config(shape.tokens, dtype, kernels._BACKWARD_CONFIG, kernels._BACKWARD_CONFIG_FEW_TOKENS)


def configs_for(pass_: str, shape: Shape, dtype: torch.dtype, grid: str) -> list:
    """[(config, shipped label | None)]: every shipped config, then the grid's candidates for the shape's regime."""
    table = GRIDS[grid]
    candidates = table["fp32"] if dtype == torch.float32 else table[(pass_, shape.regime)]
    shipped = shipped_configs(pass_, dtype)
    out = list(shipped.items())
    for cfg in candidates:
        if cfg not in shipped and cfg not in [c for c, _ in out]:
            out.append((cfg, None))
    return out


# ---------------------------------------------------------------------------------------------
# Inputs, reference, errors
# ---------------------------------------------------------------------------------------------

def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int) -> dict:
    """Random hidden [N, D], weight [V, D] (logits of standard deviation ~2), targets, upstream gradients g [N]."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n, d, v = shape.tokens, shape.hidden, shape.vocab
    hidden = torch.randn(n, d, generator=gen, device=device).to(dtype)
    weight = (torch.randn(v, d, generator=gen, device=device) * (2.0 / math.sqrt(d))).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen, device=device)
    upstream = torch.randn(n, generator=gen, device=device)
    return {"hidden": hidden, "weight": weight, "targets": targets, "upstream": upstream}


def reference_outputs(inputs: dict, need_backward: bool) -> dict:
    """logp, lse (and d hidden, d weight of Σ g·logp) from `epa_kernels.reference` on fp32 copies of the inputs,
    chunked over tokens so that each chunk's fp32 logits stay under REFERENCE_CHUNK_ELEMS."""
    hidden, weight, targets, upstream = inputs["hidden"], inputs["weight"], inputs["targets"], inputs["upstream"]
    num_tokens, vocab = hidden.shape[0], weight.shape[0]
    chunk = max(1, min(num_tokens, REFERENCE_CHUNK_ELEMS // vocab))
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32: a true fp32 reference
    try:
        weight32 = weight.float().requires_grad_(need_backward)
        logp, lse, d_hidden = [], [], []
        for start in range(0, num_tokens, chunk):
            stop = min(start + chunk, num_tokens)
            hidden32 = hidden[start:stop].float().requires_grad_(need_backward)
            with torch.set_grad_enabled(need_backward):
                out = reference.linear_logprobs(hidden32, weight32, targets[start:stop], reduction="none",
                                                return_lse=True)
                if need_backward:
                    (out.logps * upstream[start:stop]).sum().backward()
                    d_hidden.append(hidden32.grad)
            logp.append(out.logps.detach())
            lse.append(out.lse.detach())
        result = {"logp": torch.cat(logp), "lse": torch.cat(lse)}
        if need_backward:
            result.update(d_hidden=torch.cat(d_hidden), d_weight=weight32.grad)
        return result
    finally:
        torch.set_float32_matmul_precision(precision)


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """‖got − expected‖ / ‖expected‖ (L2, fp32 on the device); inf for a missing or misshapen output, nan stays."""
    if got is None or got.shape != expected.shape:
        return math.inf
    return ((got.float() - expected).norm() / expected.norm().clamp(min=1e-30)).item()


# ---------------------------------------------------------------------------------------------
# Launching, timing, static resources
# ---------------------------------------------------------------------------------------------

def launch(pass_: str, inputs: dict, ref: dict, cfg):
    """One launch of the pass with tile `cfg`, as the launcher runs it (calls the module's functions, so that tests
    can patch them)."""
    h, w, t = inputs["hidden"], inputs["weight"], inputs["targets"]
    if pass_ == "forward":
        return kernels.forward(h, w, None, t, config=cfg)
    g = inputs["upstream"]
    return kernels.backward(h, w, None, t, ref["lse"], g, -g, need_bias=False, config=cfg)


def outputs_errors(pass_: str, out, ref: dict) -> dict:
    if pass_ == "forward":
        logp, lse, _ = out
        return {"logp": relative_error(logp, ref["logp"]), "lse": relative_error(lse, ref["lse"])}
    d_hidden, d_weight, _ = out
    return {"d_hidden": relative_error(d_hidden, ref["d_hidden"]),
            "d_weight": relative_error(d_weight, ref["d_weight"])}


@contextlib.contextmanager
def capturing(kernel_name: str):
    """Within the block, launches of `triton_logprobs.<kernel_name>` record the compiled kernel the launch returns
    (None under the interpreter) in the yielded dict, under "kernel"."""
    real = getattr(kernels, kernel_name)
    box = {}

    class Capture:
        def __getitem__(self, grid):
            run = real[grid]

            def launch_and_record(*args, **kwargs):
                box["kernel"] = run(*args, **kwargs)
                return box["kernel"]

            return launch_and_record

    setattr(kernels, kernel_name, Capture())
    try:
        yield box
    finally:
        setattr(kernels, kernel_name, real)


def device_static(compiled) -> dict:
    """Registers, spilled bytes per thread and shared memory of a compiled kernel object, as loaded on the device."""
    if compiled is None:
        return {"static_source": None, "static_note": "no compiled kernel (interpreter)"}
    try:
        if getattr(compiled, "n_regs", None) is None and hasattr(compiled, "_init_handles"):
            compiled._init_handles()
        return {"static_source": "device", "registers": int(compiled.n_regs),
                "spill_bytes": 4 * int(compiled.n_spills),  # Triton divides the local bytes by 4
                "shared_bytes": int(compiled.metadata.shared)}
    except Exception as exc:  # a Triton version without these attributes
        return {"static_source": None, "static_note": f"unavailable: {type(exc).__name__}: {exc}"}


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    pos = q * (len(values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def bench(fn, device: torch.device, *, samples: int, rep_ms: float) -> dict:
    """Milliseconds of fn(): on CUDA `triton.testing.do_bench` (L2 flushed before each sample) with enough repetition
    time for `samples` samples; on CPU `samples` perf_counter runs. fn has run at least once before (warm)."""
    if device.type == "cuda":
        import triton.testing

        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        estimate_ms = (time.perf_counter() - start) * 1e3
        # do_bench takes rep / (its own estimate) samples; 1.5× covers its estimate being a little longer.
        rep = max(rep_ms, 1.5 * samples * estimate_ms)
        try:
            times = list(triton.testing.do_bench(fn, warmup=0, rep=rep, return_mode="all"))
        except (AssertionError, TypeError, ValueError):  # a Triton without return_mode="all": its quantiles
            low, p20, median, p80, high = triton.testing.do_bench(fn, warmup=0, rep=rep,
                                                                  quantiles=[0.0, 0.2, 0.5, 0.8, 1.0])
            return {"samples": None, "median_ms": median, "min_ms": low, "max_ms": high, "p20_ms": p20,
                    "p80_ms": p80, "spread": (p80 - p20) / median if median > 0 else None}
    else:
        times = []
        for _ in range(samples):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
    median = statistics.median(times)
    return {"samples": len(times), "median_ms": median, "min_ms": min(times), "max_ms": max(times),
            "p20_ms": _quantile(times, 0.2), "p80_ms": _quantile(times, 0.8),
            "spread": (_quantile(times, 0.8) - _quantile(times, 0.2)) / median if median > 0 else None}


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def run_config(pass_: str, cfg, shipped: str | None, shape: Shape, inputs: dict, ref: dict, *, device, dtype,
               static: str, samples: int, rep_ms: float) -> dict:
    """Check, describe and time one config on one shape; a config that fails is recorded, the sweep goes on."""
    row = {"pass": pass_, "shape": {**asdict(shape), "regime": shape.regime}, "label": label(cfg),
           "config": asdict(cfg), "shipped": shipped, "launcher_default": cfg == launcher_config(pass_, shape, dtype),
           "flops": shape.flops(pass_), "status": None, "error": None, "errors": None,
           "tolerance": (FORWARD_TOLERANCE if pass_ == "forward" else BACKWARD_TOLERANCE)[dtype],
           "static_source": None}

    def fn():
        return launch(pass_, inputs, ref, cfg)

    try:
        with capturing("_forward_kernel" if pass_ == "forward" else "_backward_kernel") as box:
            out = fn()
            _sync(device)
        errors = outputs_errors(pass_, out, ref)
        del out
    except Exception as exc:
        # Over the shared memory (or thread) limit: Triton's OutOfResources at launch. Anything else: a tile that
        # does not compile or run.
        resources = type(exc).__name__ == "OutOfResources"
        row["status"] = f"{'skipped' if resources else 'failed'}: {_why(exc)}"
        return row
    row["errors"] = errors
    row["error"] = max(errors.values())
    row["status"] = "ok" if row["error"] <= row["tolerance"] else \
        f"wrong: relative error {row['error']:.2e} > {row['tolerance']:.0e}"
    if static == "device":
        row.update(device_static(box.get("kernel")))
    try:
        row.update(bench(fn, device, samples=samples, rep_ms=rep_ms))
    except Exception as exc:
        row["status"] = f"failed: while timing: {_why(exc)}"
        return row
    row["tflops"] = row["flops"] / (row["median_ms"] * 1e-3) / 1e12
    return row


def offline_static(rows: list[dict], dtype: torch.dtype, progress=print) -> None:
    """Fill registers/spills/shared memory of every row from an offline sm_90a compile (kernel_report's) in one
    subprocess without the interpreter; rows keep static_source None with a note when that is not possible."""
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not ((tools / "ptxas").exists() and (tools / "cuobjdump").exists()):
        for row in rows:
            row["static_note"] = "unavailable: Triton's NVIDIA backend ships no ptxas/cuobjdump here"
        return
    keys = sorted({(row["pass"], row["label"]) for row in rows})
    configs = {(row["pass"], row["label"]): row["config"] for row in rows}
    items = [{"kernel": k[0], "dtype": str(dtype).split(".")[-1], "config": configs[k]} for k in keys]
    progress(f"compiling {len(items)} kernels offline for sm_90a (registers, spills) …")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        done = subprocess.run([sys.executable, "-c", "from benchmarks.tile_sweep import static_worker; "
                               "static_worker()"], input=json.dumps(items), capture_output=True, text=True,
                              env=env, cwd=Path(__file__).resolve().parent.parent, timeout=60 + 30 * len(items),
                              check=True)
        usage = dict(zip(keys, json.loads(done.stdout.strip().splitlines()[-1]), strict=True))
    except (subprocess.SubprocessError, ValueError, IndexError) as exc:
        stderr = getattr(exc, "stderr", "") or ""
        for row in rows:
            row["static_note"] = f"unavailable: offline compile failed: {_why(exc)} {stderr[-300:]}".strip()
        return
    for row in rows:
        found = usage[(row["pass"], row["label"])]
        if "error" in found:
            row["static_note"] = f"unavailable: offline compile: {found['error']}"
        else:
            row.update(found, static_source="offline sm_90a")


@dataclass(frozen=True)
class _TileVariant(kernel_report.Variant):
    """A kernel_report variant (hot path: no bias, softcap, entropy or filter; D a multiple of the tile) with an
    explicit tile config instead of the launcher's."""

    tile: kernels._Config | None = None

    @property
    def config(self):
        return self.tile


def static_worker() -> None:
    """The offline compile subprocess: reads [{kernel, dtype, config}] as JSON on stdin, prints one JSON list of
    {registers, spill_bytes, shared_bytes} or {error}, in order."""
    out = []
    for item in json.load(sys.stdin):
        dtype = DTYPES[item["dtype"]]
        variant = _TileVariant(f"{item['kernel']} {item['dtype']}", item["kernel"], dtype, 8192,
                               tile=kernels._Config(**item["config"]))
        try:
            usage = kernel_report.resource_usage(kernel_report.compile_variant(variant, 90))
            out.append({"registers": usage["registers"], "spill_bytes": usage["stack_bytes"],
                        "shared_bytes": usage["shared_bytes"]})
        except Exception as exc:
            out.append({"error": _why(exc)})
    print(json.dumps(out))


# ---------------------------------------------------------------------------------------------
# The sweep, the choice
# ---------------------------------------------------------------------------------------------

def sweep_shape(shape: Shape, passes, *, device, dtype, grid: str, static: str, samples: int, rep_ms: float,
                seed: int, progress=print) -> list[dict]:
    inputs = make_inputs(shape, dtype, device, seed)
    progress(f"{shape.name} ({REGIME_NAMES[shape.regime]}): fp32 reference …")
    ref = reference_outputs(inputs, need_backward="backward" in passes)
    rows = []
    for pass_ in passes:
        for cfg, shipped in configs_for(pass_, shape, dtype, grid):
            row = run_config(pass_, cfg, shipped, shape, inputs, ref, device=device, dtype=dtype, static=static,
                             samples=samples, rep_ms=rep_ms)
            timing = f"{row['median_ms']:.3f} ms" if "median_ms" in row else "untimed"
            progress(f"  {pass_:8s} {row['label']:22s} {timing:>12s}  {row['status']}")
            rows.append(row)
        base = next((r for r in rows if r["pass"] == pass_ and r["launcher_default"]), None)
        for r in rows:
            if r["pass"] == pass_ and base is not None and base.get("median_ms") and r.get("median_ms"):
                r["speedup_vs_launcher"] = base["median_ms"] / r["median_ms"]
    del inputs, ref
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _shape(row: dict) -> Shape:
    return Shape(row["shape"]["tokens"], row["shape"]["hidden"], row["shape"]["vocab"])


def choose(rows: list[dict]) -> list[dict]:
    """Per (pass, regime): the config correct ("ok") on every shape of the regime with the smallest geometric mean
    of time / the launcher's shipped config's time (of absolute time when the shipped one is not ok everywhere)."""
    choices = []
    for pass_ in PASSES:
        for regime in ("many", "few"):
            group = [r for r in rows if r["pass"] == pass_ and r["shape"]["regime"] == regime]
            if not group:
                continue
            shapes = list(dict.fromkeys(_shape(r).name for r in group))
            by = {(_shape(r).name, r["label"]): r for r in group}
            shipped = next((r["label"] for r in group if r["launcher_default"]), None)
            labels = list(dict.fromkeys(r["label"] for r in group))
            correct = [lab for lab in labels
                       if all((s, lab) in by and by[s, lab]["status"] == "ok" for s in shapes)]
            shipped_ok = shipped in correct

            def score(lab, shipped_ok=shipped_ok, shipped=shipped, shapes=shapes, by=by):
                ratios = [by[s, lab]["median_ms"] / (by[s, shipped]["median_ms"] if shipped_ok else 1.0)
                          for s in shapes]
                return math.exp(sum(math.log(x) for x in ratios) / len(ratios))

            entry = {"pass": pass_, "regime": regime, "shapes": shapes, "shipped": shipped,
                     "shipped_config": by[shapes[0], shipped]["config"] if (shapes[0], shipped) in by else None,
                     "shipped_status": sorted({by[s, shipped]["status"] for s in shapes if (s, shipped) in by}),
                     "choice": None, "choice_config": None, "speedup": None, "speedups": {}, "note": ""}
            if not correct:
                entry["note"] = "no config was correct on every shape"
            else:
                best = min(correct, key=score)
                entry.update(choice=best, choice_config=by[shapes[0], best]["config"])
                if shipped_ok:
                    entry["speedup"] = 1.0 / score(best)
                    entry["speedups"] = {s: by[s, shipped]["median_ms"] / by[s, best]["median_ms"] for s in shapes}
                    entry["note"] = "the shipped config is the fastest" if best == shipped else ""
                else:
                    entry["note"] = "the shipped config is not correct on every shape: no speedup against it"
            choices.append(entry)
    return choices


# ---------------------------------------------------------------------------------------------
# The backward's cost
# ---------------------------------------------------------------------------------------------

def backward_cost(shape: Shape, *, device, dtype, samples: int, rep_ms: float, seed: int, progress=print) -> dict:
    """The launcher's backward (its own config) against its fp32 buffers and the three GEMMs it must run."""
    inputs = make_inputs(shape, dtype, device, seed)
    h, w, t, g = inputs["hidden"], inputs["weight"], inputs["targets"], inputs["upstream"]
    n, d, v = shape.tokens, shape.hidden, shape.vocab
    elt = torch.empty(0, dtype=dtype).element_size()
    progress(f"{shape.name}: backward cost …")
    lse = kernels.forward(h, w, None, t)[1]
    cfg = kernels._config(n, dtype, kernels._BACKWARD_CONFIG, kernels._BACKWARD_CONFIG_FEW_TOKENS)

    def backward():
        return kernels.backward(h, w, None, t, lse, g, -g, need_bias=False)

    row = {"shape": {**asdict(shape), "regime": shape.regime}, "config": label(cfg),
           "flops": shape.flops("backward"), "fp32_buffer_bytes": (n + v) * d * 4, "zero_fill_bytes": (n + v) * d * 4,
           "cast_bytes": (n + v) * d * (4 + elt), "output_bytes": (n + v) * d * elt,
           "peak_bytes_above_inputs": None, "status": "ok"}
    try:
        backward()  # warm: compiled
        row["peak_bytes_above_inputs"] = _cuda_peak(backward, device)
        row["backward"] = bench(backward, device, samples=samples, rep_ms=rep_ms)
    except Exception as exc:
        row["status"] = f"failed: {_why(exc)}"
        return row
    row["backward_tflops"] = row["flops"] / (row["backward"]["median_ms"] * 1e-3) / 1e12

    def buffers():  # what the launcher does around the kernel: zero the fp32 accumulators, cast them at the end
        d_hidden = torch.zeros(n, d, device=device, dtype=torch.float32)
        d_weight = torch.zeros(v, d, device=device, dtype=torch.float32)
        return d_hidden.to(dtype), d_weight.to(dtype)

    buffers()
    row["buffers"] = bench(buffers, device, samples=samples, rep_ms=rep_ms)

    row["gemm_floor"] = gemm_floor(h, w, device, samples=samples, rep_ms=rep_ms)
    row["gemm_floor_tflops"] = row["flops"] / (row["gemm_floor"]["median_ms"] * 1e-3) / 1e12
    row["backward_over_floor"] = row["backward"]["median_ms"] / row["gemm_floor"]["median_ms"]
    row["buffers_share"] = row["buffers"]["median_ms"] / row["backward"]["median_ms"]
    row["stored"] = stored_scheme_cost(backward, lambda: kernels.backward(h, w, None, t, lse, g, -g, need_bias=False,
                                                                          scheme="stored"), device,
                                       samples=samples, rep_ms=rep_ms, floor_ms=row["gemm_floor"]["median_ms"])
    return row


def stored_scheme_cost(atomic, stored, device: torch.device, *, samples: int, rep_ms: float, floor_ms: float) -> dict:
    """The stored scheme (da written per chunk of tokens, two torch GEMMs) beside the atomic one: its time, peak
    memory and its gradients' relative L2 difference from the atomic scheme's."""
    out = {"status": "ok", "peak_bytes_above_inputs": None}
    try:
        want, got = atomic(), stored()
        out["difference_from_atomic"] = max(((g.double() - w.double()).norm() / w.double().norm()).item()
                                            for g, w in zip(got[:2], want[:2], strict=True))
        del want, got
        out["peak_bytes_above_inputs"] = _cuda_peak(stored, device)
        out["backward"] = bench(stored, device, samples=samples, rep_ms=rep_ms)
    except Exception as exc:
        out["status"] = f"failed: {_why(exc)}"
        return out
    out["over_floor"] = out["backward"]["median_ms"] / floor_ms
    return out


def _cuda_peak(fn, device: torch.device) -> int | None:
    """Peak bytes allocated above what was live before one call of fn (CUDA only; None elsewhere)."""
    _sync(device)
    if device.type != "cuda":
        return None
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del result
    return peak


def gemm_floor(hidden, weight, device: torch.device, *, samples: int, rep_ms: float) -> dict:
    """Time of the backward's three GEMMs alone in torch, in the input dtype into preallocated outputs: the logits
    recomputed (h·Wᵀ → [N, V]), d hidden (dz·W) and d weight (dzᵀ·h), with the logits standing in for dz."""
    logits = torch.empty(hidden.shape[0], weight.shape[0], device=device, dtype=hidden.dtype)
    d_hidden, d_weight = torch.empty_like(hidden), torch.empty_like(weight)

    def gemms():
        torch.matmul(hidden, weight.t(), out=logits)
        torch.matmul(logits, weight, out=d_hidden)
        torch.matmul(logits.t(), hidden, out=d_weight)

    gemms()
    return bench(gemms, device, samples=samples, rep_ms=rep_ms)


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def _ms(row: dict | None, key: str = "median_ms") -> str:
    return "–" if not row or row.get(key) is None else f"{row[key]:.3f}"


def _num(x: float) -> str:
    """Three significant figures, without exponents for large values: 0.00123, 1.23, 123, 1234."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _mib(nbytes: int) -> str:
    return _num(nbytes / 2**20)


def _static_cells(row: dict) -> list[str]:
    if row.get("static_source") is None:
        return ["–", "–", "–"]
    return [str(row["registers"]), str(row["spill_bytes"]), f"{row['shared_bytes'] / 1024:.0f}"]


def markdown(result: dict) -> str:
    env, settings = result["environment"], result["settings"]
    lines = [f"# Tile sweep: {env['device']}", "",
             f"Triton {env['triton']}, torch {env['torch']}, commit {env['commit']}, {env['date']}; "
             f"{settings['dtype']}, grid `{settings['grid']}`, timing: {settings['timing']}.",
             f"FLOPs: {settings['flops']}. Error: relative L2 against {settings['reference']}; tolerances "
             f"forward {settings['forward_tolerance']:.0e}, backward {settings['backward_tolerance']:.0e}. "
             f"Static: {settings['static']}.", ""]
    rows = result["results"]
    for pass_ in PASSES:
        for shape in dict.fromkeys(_shape(r) for r in rows if r["pass"] == pass_):
            group = [r for r in rows if r["pass"] == pass_ and _shape(r) == shape]
            ok = [r for r in group if r["status"] == "ok"]
            fastest = min(ok, key=lambda r: r["median_ms"])["label"] if ok else None
            order = sorted(group, key=lambda r: (r["status"] != "ok", r.get("median_ms") or math.inf))
            lines += [f"## {pass_}, {shape.name} ({REGIME_NAMES[shape.regime]})", "",
                      "| config (M×V×D, warps, stages) | | status | median ms | p20–p80 ms | TFLOP/s "
                      "| vs launcher's | rel. error | registers | spill B | shared KiB |",
                      "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for r in order:
                marks = []
                if r["label"] == fastest:
                    marks.append("**fastest**")
                if r["launcher_default"]:
                    marks.append("launcher's")
                elif r["shipped"]:
                    marks.append(f"shipped ({r['shipped']})")
                status = r["status"] if len(r["status"]) < 90 else r["status"][:87] + "…"
                spread = f"{_ms(r, 'p20_ms')}–{_ms(r, 'p80_ms')}" if r.get("median_ms") is not None else "–"
                tflops = _num(r["tflops"]) if r.get("tflops") else "–"
                speedup = f"{r['speedup_vs_launcher']:.3f}×" if r.get("speedup_vs_launcher") else "–"
                error = f"{r['error']:.1e}" if r.get("error") is not None else "–"
                lines.append(f"| {r['label']} | {', '.join(marks)} | {status.replace('|', '/')} | {_ms(r)} | "
                             f"{spread} | {tflops} | {speedup} | {error} | " + " | ".join(_static_cells(r)) + " |")
            lines.append("")
    if result["choice"]:
        lines += ["## Choice", "",
                  "Per pass and regime, the config correct on every shape with the smallest geometric mean of its "
                  "time over the shipped config's (no shipped config was changed by this run).", "",
                  "| pass | regime | shipped | choice | speedup (geomean) | per shape | note |",
                  "|---|---|---|---|---:|---|---|"]
        for c in result["choice"]:
            per_shape = "; ".join(f"{s}: {x:.3f}×" for s, x in c["speedups"].items()) or "–"
            speedup = f"{c['speedup']:.3f}×" if c["speedup"] is not None else "–"
            lines.append(f"| {c['pass']} | {REGIME_NAMES[c['regime']]} | {c['shipped']} | {c['choice'] or '–'} | "
                         f"{speedup} | {per_shape} | {c['note']} |")
        lines.append("")
    if result["backward_cost"]:
        lines += ["## The backward's cost", "",
                  "The launcher's backward (its own config; zeroing the fp32 accumulators and the final cast "
                  "included) against the buffer operations alone (torch.zeros + cast) and the floor: its three "
                  "GEMMs alone in torch (logits, d hidden, d weight; 6·N·D·V FLOPs) into preallocated outputs.", "",
                  "| shape | config | backward ms | TFLOP/s | 3-GEMM floor ms | floor TFLOP/s | backward / floor "
                  "| fp32 buffers MiB | zero + cast ms (share) | cast traffic MiB | peak above inputs MiB |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for b in result["backward_cost"]:
            name = _shape(b).name
            if b["status"] != "ok":
                lines.append(f"| {name} | {b['config']} | {b['status']} |" + " |" * 8)
                continue
            peak = "–" if b["peak_bytes_above_inputs"] is None else _mib(b["peak_bytes_above_inputs"])
            lines.append(f"| {name} | {b['config']} | {_ms(b['backward'])} | {_num(b['backward_tflops'])} | "
                         f"{_ms(b['gemm_floor'])} | {_num(b['gemm_floor_tflops'])} | "
                         f"{_num(b['backward_over_floor'])}× | {_mib(b['fp32_buffer_bytes'])} | "
                         f"{_ms(b['buffers'])} ({b['buffers_share']:.0%}) | {_mib(b['cast_bytes'])} | {peak} |")
        lines += ["", "The stored scheme (`scheme=\"stored\"`: the kernel writes da for a chunk of tokens, two torch "
                  "GEMMs form the gradients, d weight accumulates in fp32) beside it:", "",
                  "| shape | stored backward ms | / floor | × atomic time | peak above inputs MiB | "
                  "difference from atomic |", "|---|---:|---:|---:|---:|---:|"]
        for b in result["backward_cost"]:
            stored = b.get("stored")
            if b["status"] != "ok" or stored is None:
                continue
            if stored["status"] != "ok":
                lines.append(f"| {_shape(b).name} | {stored['status']} |" + " |" * 4)
                continue
            peak = "–" if stored["peak_bytes_above_inputs"] is None else _mib(stored["peak_bytes_above_inputs"])
            ratio = stored["backward"]["median_ms"] / b["backward"]["median_ms"]
            lines.append(f"| {_shape(b).name} | {_ms(stored['backward'])} | {_num(stored['over_floor'])}× | "
                         f"{ratio:.2f}× | {peak} | {stored['difference_from_atomic']:.1e} |")
        lines.append("")
    lines.append(f"Sweep wall time {result['wall_s']:.0f} s.")
    return "\n".join(lines)


def _json_safe(value):
    """inf and nan (an output missing, a kernel gone wrong) as strings: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def parse_shapes(args, device: torch.device) -> list[Shape]:
    if args.tokens is None and args.hidden is None and args.vocab is None:
        return list(HOT_SHAPES if device.type == "cuda" else DRY_RUN_SHAPES)
    default = HOT_SHAPES[0] if device.type == "cuda" else DRY_RUN_SHAPES[0]
    return [Shape(n, d, v) for n in args.tokens or [default.tokens] for d in args.hidden or [default.hidden]
            for v in args.vocab or [default.vocab]]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", help="token counts N (shapes: every N × D × V given)")
    parser.add_argument("--hidden", type=int, nargs="+", help="hidden sizes D")
    parser.add_argument("--vocab", type=int, nargs="+", help="vocabulary sizes V")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--grid", choices=list(GRIDS), help="candidates (default: small on CUDA, tiny on CPU)")
    parser.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
    parser.add_argument("--no-sweep", action="store_true", help="skip the config sweep (with --backward-cost)")
    parser.add_argument("--backward-cost", action="store_true", help="add the backward's cost per shape")
    parser.add_argument("--static", choices=("auto", "device", "offline", "none"), default="auto",
                        help="registers/spills: from the launched kernel (device), an offline sm_90a compile "
                             "(offline), or none; auto: device on CUDA, offline on CPU")
    parser.add_argument("--samples", type=int, help="timed samples at least (default: 3 on CUDA, 2 on CPU)")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="do_bench's repetition time at least (CUDA)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench-out/tile-sweep", help="directory for tile_sweep.json and .md")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not triton_interpreting() else "cpu")
    dtype = DTYPES[args.dtype]
    grid = args.grid or ("small" if device.type == "cuda" else "tiny")
    samples = args.samples or (3 if device.type == "cuda" else 2)
    static = args.static if args.static != "auto" else ("device" if device.type == "cuda" else "offline")
    shapes = parse_shapes(args, device)

    def progress(line):
        print(f"[{time.perf_counter() - started:6.1f} s] {line}", flush=True)

    progress(f"{device} ({'interpreter' if triton_interpreting() else 'compiled'}), {args.dtype}, grid {grid}, "
             f"shapes: {', '.join(s.name for s in shapes)}")
    rows = []
    if not args.no_sweep:
        for shape in shapes:
            rows += sweep_shape(shape, args.passes, device=device, dtype=dtype, grid=grid, static=static,
                                samples=samples, rep_ms=args.rep_ms, seed=args.seed, progress=progress)
        if static == "offline":
            offline_static(rows, dtype, progress)
    costs = []
    if args.backward_cost:
        for shape in shapes:
            costs.append(backward_cost(shape, device=device, dtype=dtype, samples=samples, rep_ms=args.rep_ms,
                                       seed=args.seed, progress=progress))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    static_text = {"device": "registers, spilled bytes per thread (n_spills × 4) and shared memory of the kernel "
                             "Triton compiled and loaded on this device",
                   "offline": "registers, stack (spill) bytes and shared memory of an offline sm_90a compile "
                              "(benchmarks.kernel_report), not of this device",
                   "none": "not collected"}[static]
    timing = ("triton.testing.do_bench, L2 flushed before each sample, at least "
              f"{samples} samples (rep ≥ {args.rep_ms:g} ms)" if device.type == "cuda" else
              f"perf_counter, {samples} runs after one checked run, under the Triton interpreter (not a measurement)")
    result = {
        "environment": environment(device),
        "settings": {"device": str(device), "interpreter": triton_interpreting(), "dtype": args.dtype, "grid": grid,
                     "passes": args.passes, "samples": samples, "rep_ms": args.rep_ms, "seed": args.seed,
                     "shapes": [{**asdict(s), "regime": s.regime} for s in shapes],
                     "few_tokens_at_most": kernels._FEW_TOKENS, "timing": timing, "static": static_text,
                     "flops": "forward 2·N·D·V (logits GEMM), backward 6·N·D·V (logits recomputed, d hidden, "
                              "d weight)",
                     "reference": "epa_kernels.reference on fp32 copies of the inputs (fp32 matmul, no TF32)",
                     "forward_tolerance": FORWARD_TOLERANCE[dtype], "backward_tolerance": BACKWARD_TOLERANCE[dtype],
                     "shipped": {p: {label(c): which for c, which in shipped_configs(p, dtype).items()}
                                 for p in PASSES}},
        "results": rows,
        "choice": choose(rows),
        "backward_cost": costs,
    }
    result["wall_s"] = time.perf_counter() - started
    table = markdown(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tile_sweep.json").write_text(json.dumps(_json_safe(result), indent=1, default=str, ensure_ascii=False),
                                         encoding="utf-8")
    (out / "tile_sweep.md").write_text(table + "\n", encoding="utf-8")
    print(table)
    progress(f"wrote {out / 'tile_sweep.json'} and {out / 'tile_sweep.md'}")
    return result


if __name__ == "__main__":
    main()
