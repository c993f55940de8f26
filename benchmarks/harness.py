"""Benchmark harness: implementations, timing, peak memory above inputs, correctness gate (DESIGN §6).

Time: median over repeats after warm-up; CUDA events on GPU, perf_counter on CPU. Memory: on CUDA,
the allocator's peak above what was allocated before the pass; on CPU, the process's peak resident
set above the resident set before the pass, in a process whose glibc returns every large block to
the OS (CPU_MEMORY_ENV), so memory freed by one pass cannot hide the next one's: the benchmark
re-executes itself with it, anything else measures in a subprocess started with it.
Every implementation's log-probs and gradients are compared with the reference first: a wrong result
is reported as wrong, not timed as fast.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

import epa_kernels
from benchmarks import activations
from benchmarks.peers import peer_implementations
from epa_kernels import fused_linear_preference_loss, make_groups, preference_loss, reference
from epa_kernels.logprobs import FILTERING_BACKENDS

CASE_PATTERN = re.compile(r"^(logprobs|dpo|epa-1\+(\d+)(?:\+(\d+))?)$")
SOURCES = ("random", "smollm2")  # where a case's hidden states, head and targets come from
FILTER_SEP = "@"  # "native@1e-5": an implementation run with filter_eps=1e-5


@dataclass(frozen=True)
class Case:
    """A benchmark case on N tokens, hidden D, vocab V.

    kind "logprobs": per-sequence log-probs of `seqs` sequences. Loss kinds, "dpo" (1+1) and "epa"
    (1 positive + `strong` + `weak` negatives per prompt): as many prompts as fit `seqs` sequences
    (at least one), the N tokens split evenly between their sequences.

    source "random": Gaussian hidden states and head (a flat softmax); "smollm2": SmolLM2-135M-Instruct's own
    final hidden states, head and next tokens on real dialogue (`benchmarks/activations.py`; D = 576,
    V = 49152), whose softmax is as peaked as a trained model's.
    """

    tokens: int
    hidden: int
    vocab: int
    dtype: str = "float32"
    seqs: int = 8
    kind: str = "logprobs"
    strong: int = 1
    weak: int = 0
    source: str = "random"

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ValueError(f"unknown source {self.source!r}: use one of {', '.join(SOURCES)}")
        if self.source == "smollm2" and (self.hidden, self.vocab) != (activations.HIDDEN, activations.VOCAB):
            raise ValueError(f"source smollm2 has D = {activations.HIDDEN}, V = {activations.VOCAB}; "
                             f"got D = {self.hidden}, V = {self.vocab}")

    @classmethod
    def parse(cls, name: str, **sizes) -> Case:
        """'logprobs', 'dpo', 'epa-1+K' or 'epa-1+K+W' → Case."""
        match = CASE_PATTERN.match(name)
        if match is None:
            raise ValueError(f"unknown case {name!r}: use logprobs, dpo, epa-1+K or epa-1+K+W")
        if name in ("logprobs", "dpo"):
            return cls(kind=name, **sizes)
        return cls(kind="epa", strong=int(match.group(2)), weak=int(match.group(3) or 0), **sizes)

    @property
    def name(self) -> str:
        name = self.kind
        if self.kind == "epa":
            name = f"epa-1+{self.strong}" + (f"+{self.weak}" if self.weak else "")
        return name if self.source == "random" else f"{name} ({self.source})"

    @property
    def group_size(self) -> int:
        return 1 + self.strong + self.weak

    @property
    def num_seqs(self) -> int:
        if self.kind == "logprobs":
            return self.seqs
        return max(1, self.seqs // self.group_size) * self.group_size

    @property
    def torch_dtype(self):
        return getattr(torch, self.dtype)

    @property
    def flops(self) -> float:
        """Effective FLOPs of a full pass, counted as 8·N·D·V (forward GEMM + two backward GEMMs + recompute)."""
        return 8.0 * self.tokens * self.hidden * self.vocab

    def inputs(self, device, seed=0):
        """(hidden, weight, targets, cu_seqlens, upstream gradient of the output)."""
        gen = torch.Generator().manual_seed(seed)
        if self.source == "smollm2":
            data = activations.load(self.tokens - self.tokens % self.num_seqs, self.num_seqs)
            hidden, weight = data["hidden"].to(device, self.torch_dtype), data["weight"].to(device, self.torch_dtype)
            targets, cu_seqlens = data["targets"].to(device), data["cu_seqlens"].to(device)
        else:
            hidden = torch.randn(self.tokens, self.hidden, generator=gen).to(device, self.torch_dtype)
            weight = (torch.randn(self.vocab, self.hidden, generator=gen) / self.hidden**0.5).to(device,
                                                                                                  self.torch_dtype)
            targets = torch.randint(0, self.vocab, (self.tokens,), generator=gen).to(device)
            step = self.tokens // self.num_seqs
            cu_seqlens = torch.tensor([i * step for i in range(self.num_seqs)] + [self.tokens], device=device)
        shape = (self.num_seqs,) if self.kind == "logprobs" else ()
        upstream = torch.randn(shape, generator=gen).to(device) if shape else torch.ones((), device=device)
        return hidden.requires_grad_(), weight.requires_grad_(), targets, cu_seqlens, upstream

    def loss_arguments(self, device, seed=1):
        """Groups, reference log-probs near the policy's (its own plus N(0, 1) noise for a model's activations, −log V
        per token for random ones) and the loss options."""
        gen = torch.Generator().manual_seed(seed)
        groups = make_groups(self.num_seqs // self.group_size, self.strong, self.weak, device=device)
        if self.source == "random":
            policy = torch.full((self.num_seqs,), -(self.tokens // self.num_seqs) * math.log(self.vocab))
        else:
            hidden, weight, targets, cu_seqlens, _ = self.inputs(device)
            with torch.no_grad():
                policy = epa_kernels.linear_logprobs(hidden, weight, targets, cu_seqlens=cu_seqlens).cpu()
        ref_logps = (policy + torch.randn(self.num_seqs, generator=gen)).to(device)
        options = {"loss": "dpo" if self.kind == "dpo" else "epa", "beta": 0.1}
        if self.kind == "epa":
            options["num_strong"] = self.strong
        return groups, ref_logps, options


def implementations(device: torch.device, case: Case, names=None) -> dict[str, Callable | str]:
    """name → fn(hidden, weight, targets, cu_seqlens) → the case's output, or a reason it is skipped.

    names: only these peers are set up (the reference and our backends always are: they are cheap).

    The reference materialises the logits (and, for loss cases, applies `preference_loss` to its
    per-sequence log-probs: the unfused path); then come our fused backends and the peers
    (`benchmarks/peers.py`: Liger-Kernel, Cut Cross-Entropy, TRL, the reference under torch.compile).
    """
    if case.kind == "logprobs":
        def reference_fn(h, w, t, cu):
            return reference.linear_logprobs(h, w, t, cu_seqlens=cu)

        def fused_fn(h, w, t, cu, backend, filter_eps=None):
            return epa_kernels.linear_logprobs(h, w, t, cu_seqlens=cu, backend=backend, filter_eps=filter_eps)
    else:
        groups, ref_logps, options = case.loss_arguments(device)

        def reference_fn(h, w, t, cu):
            logps = reference.linear_logprobs(h, w, t, cu_seqlens=cu)
            return preference_loss(logps, ref_logps, groups, **options)[0]

        def fused_fn(h, w, t, cu, backend, filter_eps=None):
            return fused_linear_preference_loss(h, w, t, groups, cu_seqlens=cu, ref_logps=ref_logps, backend=backend,
                                                filter_eps=filter_eps, **options)[0]

    impls: dict[str, Callable | str] = {"reference": reference_fn}
    for name, info in epa_kernels.backends().items():
        usable = info.available and not (
            (name == "triton" and device.type != "cuda") or (name == "native" and device.type != "cpu")
        )
        if usable:
            impls[name] = functools.partial(fused_fn, backend=name)
        else:
            reason = info.detail if not info.available else (
                f"needs CUDA tensors (device: {device.type})" if name == "triton" else "runs on CPU tensors only")
            impls[name] = f"skipped: {reason}"
    for name in names or ():  # gradient-filtering variants, "backend@eps"
        if FILTER_SEP in name:
            backend, eps = filter_variant(name)
            base = impls.get(backend)
            impls[name] = base if isinstance(base, str) else functools.partial(fused_fn, backend=backend,
                                                                               filter_eps=eps)
    impls.update(peer_implementations(device, case, names))
    return impls


def filter_variant(name: str) -> tuple[str, float]:
    """'native@1e-5' → ('native', 1e-5): a backend that implements filter_eps and a positive eps."""
    backend, _, eps = name.partition(FILTER_SEP)
    if backend not in FILTERING_BACKENDS:
        raise ValueError(f"implementation {name!r}: filter_eps is implemented by "
                         f"{', '.join(FILTERING_BACKENDS)}, not {backend!r}")
    try:
        value = float(eps)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"implementation {name!r}: {eps!r} is not a positive filter_eps")
    return backend, value


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def full_pass(fn, hidden, weight, targets, cu_seqlens, upstream):
    logps = fn(hidden, weight, targets, cu_seqlens)
    grads = torch.autograd.grad(logps, (hidden, weight), grad_outputs=upstream)
    return logps, grads


def time_pass(fn, inputs, device, *, warmup: int, repeats: int) -> dict[str, float]:
    """Median forward / backward / full times in milliseconds."""
    hidden, weight, targets, cu_seqlens, upstream = inputs
    fwd, bwd = [], []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            start, mid, stop = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            start.record()
            logps = fn(hidden, weight, targets, cu_seqlens)
            mid.record()
            torch.autograd.grad(logps, (hidden, weight), grad_outputs=upstream)
            stop.record()
            torch.cuda.synchronize()
            times = (start.elapsed_time(mid), mid.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            logps = fn(hidden, weight, targets, cu_seqlens)
            t1 = time.perf_counter()
            torch.autograd.grad(logps, (hidden, weight), grad_outputs=upstream)
            t2 = time.perf_counter()
            times = ((t1 - t0) * 1e3, (t2 - t1) * 1e3)
        if i >= warmup:
            fwd.append(times[0])
            bwd.append(times[1])
        del logps
    full = [f + b for f, b in zip(fwd, bwd, strict=True)]
    return {"forward_ms": statistics.median(fwd), "backward_ms": statistics.median(bwd),
            "full_ms": statistics.median(full)}


def _proc_status() -> dict[str, int]:
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmHWM", "VmRSS")):
                key, value = line.split(":")
                values[key] = int(value.split()[0]) * 1024
    return values


# glibc settings under which every block of 64 KiB or more is its own mapping, returned to the OS when
# freed: the resident set then tracks live memory, and one pass's frees cannot hide the next one's peak.
CPU_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def cpu_memory_exact() -> bool:
    """Whether this process started under CPU_MEMORY_ENV (`python -m benchmarks.run` re-executes itself so)."""
    return all(os.environ.get(key) == value for key, value in CPU_MEMORY_ENV.items())


def peak_memory(fn, inputs, device: torch.device) -> int:
    """Peak bytes above the inputs during one full pass of an already warmed-up implementation."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = full_pass(fn, *inputs)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _proc_status()["VmRSS"]
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets the peak resident set (VmHWM) to the current one
        result = full_pass(fn, *inputs)
        peak = _proc_status()["VmHWM"] - base
    del result
    return peak


def measure_peak_memory_here(name: str, case: Case, device: torch.device) -> int:
    """Set up `name` on fresh inputs, warm it up (lazy initialisation is not the pass's memory), measure."""
    inputs = case.inputs(device)
    fn = implementations(device, case, {name})[name]
    full_pass(fn, *inputs)
    return peak_memory(fn, inputs, device)


def measure_peak_memory(name: str, case: Case, device: torch.device) -> int | None:
    """In this process on CUDA or under CPU_MEMORY_ENV; otherwise in a fresh subprocess started with it."""
    if device.type == "cuda" or cpu_memory_exact():
        return measure_peak_memory_here(name, case, device)
    cmd = [sys.executable, "-m", "benchmarks.harness", name, json.dumps(asdict(case)), str(device)]
    done = subprocess.run(cmd, env={**os.environ, **CPU_MEMORY_ENV}, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"memory measurement of {name} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return int(done.stdout.strip().splitlines()[-1])


def max_rel_error(got, expected) -> float:
    got, expected = got.detach().double(), expected.detach().double()
    return ((got - expected).norm() / expected.norm().clamp(min=1e-30)).item()


# Relative L2 error, per compute dtype, above which a result counts as wrong.
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}
# Filtered variants approximate by design: they pass up to bf16 resolution (2⁻⁸ relative) on every output.
FILTER_TOLERANCE = 2.0**-8


def tolerance(impl: str, dtype: str) -> float:
    return max(TOLERANCE[dtype], FILTER_TOLERANCE) if FILTER_SEP in impl else TOLERANCE[dtype]


@dataclass
class Result:
    impl: str
    case: dict  # the Case's fields plus its name
    status: str  # "ok", "wrong: …", "skipped: …", "failed: …"
    forward_ms: float | None = None
    backward_ms: float | None = None
    full_ms: float | None = None
    peak_bytes: int | None = None
    tflops: float | None = None
    error: float | None = None
    ratios: dict = field(default_factory=dict)


def run_case(case: Case, device: torch.device, names, *, warmup: int, repeats: int, memory: bool = True,
             progress=print) -> list[Result]:
    """Check, time and measure each implementation on one case; ratios are against the reference."""
    described = {**asdict(case), "name": case.name, "num_seqs": case.num_seqs}
    impls = implementations(device, case, set(names))
    inputs = case.inputs(device)
    expected = None
    results = []
    for name in names:
        impl = impls.get(name, f"skipped: unknown implementation {name!r}")
        if isinstance(impl, str):
            progress(f"  {name}: {impl}")
            results.append(Result(name, described, impl))
            continue
        progress(f"  {name}: checking, timing{' and measuring memory' if memory else ''} …")
        try:
            logps, grads = full_pass(impl, *inputs)
            if expected is None:  # the first implementation run is the reference
                expected = (logps, *grads)
            error = max(max_rel_error(a, b) for a, b in zip((logps, *grads), expected, strict=True))
            del logps, grads
            if error > tolerance(name, case.dtype):
                results.append(Result(name, described, f"wrong: relative error {error:.2e}", error=error))
                continue
            timing = time_pass(impl, inputs, device, warmup=warmup, repeats=repeats)
        except Exception as exc:  # a broken implementation is reported, the run goes on
            results.append(Result(name, described, f"failed: {type(exc).__name__}: {exc}"))
            continue
        if not memory:
            peak = None
        elif device.type == "cuda" or cpu_memory_exact():
            peak = peak_memory(impl, inputs, device)  # warmed up by the timing runs
        else:
            peak = measure_peak_memory(name, case, device)
        tflops = case.flops / (timing["full_ms"] * 1e-3) / 1e12
        results.append(Result(name, described, "ok", peak_bytes=peak, tflops=tflops, error=error, **timing))
    base = next((r for r in results if r.impl == "reference" and r.status == "ok"), None)
    for r in results:
        if base is not None and r.status == "ok":
            r.ratios = {"time": r.full_ms / base.full_ms}
            if r.peak_bytes and base.peak_bytes:
                r.ratios["memory"] = r.peak_bytes / base.peak_bytes
    return results


# fp32 logits per vocabulary tile of the CPU floor: the native backend's tile (csrc/linear_logprobs.cpp), which
# keeps each GEMM's output in cache; whole-matrix GEMMs stream an [N, V] buffer through memory and are slower.
FLOOR_TILE_ELEMS = 2 * 1024 * 1024


def gemm_floor_ms(case: Case, device: torch.device, *, warmup: int, repeats: int) -> float:
    """Median time of the four GEMMs of N·D·V that an exact fused pass runs (the logits, their recompute in the
    backward, d_hidden, d_weight) and nothing else, in the case's dtype into preallocated outputs: the floor of
    any exact fused method. On CPU over cache-sized vocabulary tiles, on CUDA as whole matrices. A materialised
    reference keeps its logits and runs three."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(case.tokens, case.hidden, generator=gen).to(device, case.torch_dtype)
    weight = torch.randn(case.vocab, case.hidden, generator=gen).to(device, case.torch_dtype)
    cols = case.vocab if device.type == "cuda" else max(1, min(case.vocab, FLOOR_TILE_ELEMS // case.tokens))
    logits = torch.empty(case.tokens, cols, device=device, dtype=case.torch_dtype)
    d_hidden, d_weight = torch.empty_like(hidden), torch.empty_like(weight)
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        start = time.perf_counter()
        for v0 in range(0, case.vocab, cols):
            w, z = weight[v0:v0 + cols], logits[:, :min(cols, case.vocab - v0)]
            torch.mm(hidden, w.t(), out=z)  # forward
            torch.mm(hidden, w.t(), out=z)  # recompute in the backward
            if v0 == 0:
                torch.mm(z, w, out=d_hidden)
            else:
                d_hidden.addmm_(z, w)
            torch.mm(z.t(), hidden, out=d_weight[v0:v0 + cols])
        _sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


if __name__ == "__main__":  # worker for measure_peak_memory: name, case json, device
    impl_name, case_json, device_name = sys.argv[1:4]
    print(measure_peak_memory_here(impl_name, Case(**json.loads(case_json)), torch.device(device_name)))
