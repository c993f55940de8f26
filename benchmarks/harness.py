"""Benchmark harness: implementations, timing, peak memory above inputs, correctness gate (DESIGN §6).

Time: median over repeats after warm-up; CUDA events on GPU, perf_counter on CPU; the full pass's spread beside it
(`spread`). Throughput: effective TFLOP/s of the full pass counted as 8·N·D·V, of the forward alone as 2·N·D·V
(`Case.flops`, `Case.forward_flops`), whatever an implementation actually computes. Memory: on CUDA,
the allocator's peak above what was allocated before the pass; on CPU, the process's peak resident
set above the resident set before the pass, in a process whose glibc returns every large block to
the OS (CPU_MEMORY_ENV), so memory freed by one pass cannot hide the next one's: the benchmark
re-executes itself with it, anything else measures in a subprocess started with it.
Every implementation's log-probs and gradients are compared with the reference first: a wrong result
is reported as wrong, not timed as fast. Two errors are reported: `error`, against the first implementation run
in the same dtype (usually `reference`: the correctness gate, as before), and `error_fp32`, against the
materialised reference computed in float32 on the same inputs upcast (`fp32_reference`), which says how far
each implementation is from the exact function rather than from another bf16 computation.
"""
from __future__ import annotations

import contextlib
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
from epa_kernels.ops.gemm_plan import DEFAULT_MEMORY_BUDGET

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

    softcap c: every implementation applies z ← c·tanh(z / c) to the logits (Gemma's final-logit softcapping);
    implementations that cannot are skipped with the reason. None: no softcap.
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
    softcap: float | None = None

    def __post_init__(self):
        if self.softcap is not None:
            if isinstance(self.softcap, bool) or not isinstance(self.softcap, (int, float)) or not (
                    math.isfinite(self.softcap) and self.softcap > 0):
                raise ValueError(f"softcap must be a positive finite number or None, got {self.softcap!r}")
            object.__setattr__(self, "softcap", float(self.softcap))
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
        notes = ([] if self.source == "random" else [self.source]) + (
            [] if self.softcap is None else [f"softcap {self.softcap:g}"])
        return f"{name} ({', '.join(notes)})" if notes else name

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

    @property
    def forward_flops(self) -> float:
        """Effective FLOPs of the forward alone, counted as 2·N·D·V (the logits GEMM)."""
        return 2.0 * self.tokens * self.hidden * self.vocab

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
    per-sequence log-probs: the unfused path); then come our fused backends, the gemm backend's variants
    (`gemm_variants`) and the peers (`benchmarks/peers.py`: Liger-Kernel, Cut Cross-Entropy, TRL, the reference
    under torch.compile). All of them apply the case's softcap.
    """
    softcap = case.softcap
    if case.kind == "logprobs":
        def reference_fn(h, w, t, cu):
            return reference.linear_logprobs(h, w, t, cu_seqlens=cu, softcap=softcap)

        def fused_fn(h, w, t, cu, backend, filter_eps=None, **memory):
            return epa_kernels.linear_logprobs(h, w, t, cu_seqlens=cu, softcap=softcap, backend=backend,
                                               filter_eps=filter_eps, **memory)
    else:
        groups, ref_logps, options = case.loss_arguments(device)

        def reference_fn(h, w, t, cu):
            logps = reference.linear_logprobs(h, w, t, cu_seqlens=cu, softcap=softcap)
            return preference_loss(logps, ref_logps, groups, **options)[0]

        def fused_fn(h, w, t, cu, backend, filter_eps=None, **memory):
            return fused_linear_preference_loss(h, w, t, groups, cu_seqlens=cu, ref_logps=ref_logps, backend=backend,
                                                softcap=softcap, filter_eps=filter_eps, **memory, **options)[0]

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
    for name, memory in gemm_variants(case).items():
        impls[name] = impls["gemm"] if isinstance(impls["gemm"], str) else functools.partial(
            fused_fn, backend="gemm", **memory)
    for name in names or ():  # gradient-filtering variants, "backend@eps"
        if FILTER_SEP in name:
            backend, eps = filter_variant(name)
            base = impls.get(backend)
            impls[name] = base if isinstance(base, str) else functools.partial(fused_fn, backend=backend,
                                                                               filter_eps=eps)
    impls.update(peer_implementations(device, case, names))
    return impls


def gemm_variants(case: Case) -> dict[str, dict]:
    """The gemm backend's memory options beside its defaults ("gemm"): each chunking forced, and a budget raised to
    exactly the case's [N, V] logits so that they are kept from the forward (three GEMMs instead of four)."""
    logits_bytes = case.tokens * case.vocab * torch.empty(0, dtype=case.torch_dtype).element_size()
    return {"gemm-tokens": {"chunking": "tokens"}, "gemm-vocab": {"chunking": "vocab"},
            "gemm-keep": {"memory_budget": max(logits_bytes, DEFAULT_MEMORY_BUDGET)}}


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


def spread(values) -> tuple[float, float, str]:
    """(low, high, what) of repeated timings: with 5 or more values their 20th and 80th percentiles (linear
    interpolation between order statistics, numpy's default), what = "p20-p80"; with fewer, where those
    percentiles would only interpolate between two or three values, their minimum and maximum, what = "min-max"."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("spread of no values")
    if len(ordered) < SPREAD_MIN_REPEATS:
        return ordered[0], ordered[-1], "min-max"

    def percentile(q):
        position = q * (len(ordered) - 1)
        below = math.floor(position)
        above = min(below + 1, len(ordered) - 1)
        return ordered[below] + (ordered[above] - ordered[below]) * (position - below)
    return percentile(0.2), percentile(0.8), "p20-p80"


SPREAD_MIN_REPEATS = 5  # fewer repeats: the spread is their min-max, not p20-p80


def time_pass(fn, inputs, device, *, warmup: int, repeats: int) -> dict:
    """Median forward / backward / full times in milliseconds, and the full pass's spread over the repeats
    (`full_lo_ms`, `full_hi_ms`: p20 and p80 from 5 repeats on, min and max below; `spread` says which)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
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
    low, high, what = spread(full)
    return {"forward_ms": statistics.median(fwd), "backward_ms": statistics.median(bwd),
            "full_ms": statistics.median(full), "full_lo_ms": low, "full_hi_ms": high, "spread": what}


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
    """‖got − expected‖₂ / ‖expected‖₂ over all entries, in float64 slices (no float64 copy of a whole
    [V, D] gradient). Shapes must match; NaN or inf in either gives NaN or inf (never passes a gate)."""
    got, expected = got.detach(), expected.detach()
    if got.shape != expected.shape:
        raise ValueError(f"shape {tuple(got.shape)} compared with expected {tuple(expected.shape)}")
    got, expected = got.reshape(-1), expected.reshape(-1)
    diff = torch.zeros((), dtype=torch.float64, device=got.device)
    norm = torch.zeros((), dtype=torch.float64, device=got.device)
    for start in range(0, got.numel(), ERROR_SLICE):
        a = got[start:start + ERROR_SLICE].double()
        b = expected[start:start + ERROR_SLICE].to(a.device, torch.float64)
        diff += (a - b).square().sum()
        norm += b.square().sum()
    return diff.sqrt().item() / max(norm.sqrt().item(), 1e-30)


ERROR_SLICE = 1 << 24  # elements per float64 slice of max_rel_error


@contextlib.contextmanager
def ieee_fp32():
    """float32 matmuls in full precision (no TF32) inside, the previous setting restored after. Through the legacy
    switch, which sets the legacy and the new (`fp32_precision`) flags together: setting only the new one after
    the legacy one was used makes PyTorch refuse to read either."""
    try:
        previous = torch.get_float32_matmul_precision()
    except RuntimeError:  # the new API alone was used (PyTorch then refuses the legacy getter): stay with it
        matmul = torch.backends.cuda.matmul
        previous = matmul.fp32_precision
        matmul.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = previous
        return
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


# Bytes of [tokens, V] float32 temporaries per chunk of `fp32_reference` (about 8 live per chunk).
FP32_CHUNK_BYTES = {"cuda": 4 << 30}
FP32_CHUNK_BYTES_DEFAULT = 512 << 20


def fp32_chunk_tokens(case: Case, device: torch.device) -> int:
    """Tokens per chunk of `fp32_reference`: about eight [tokens, V] float32 buffers live in one chunk's pass."""
    budget = FP32_CHUNK_BYTES.get(device.type, FP32_CHUNK_BYTES_DEFAULT)
    return max(1, min(case.tokens, budget // (8 * 4 * case.vocab)))


def fp32_reference(case: Case, inputs, device: torch.device, chunk_tokens: int | None = None):
    """(output, d hidden, d weight) of the case in float32: the materialised reference (`epa_kernels.reference`,
    logits in float32, matmuls without TF32) on the inputs upcast to float32, under the same upstream gradient.

    Chunked over tokens (`fp32_chunk_tokens`), so any shape gets one: a pass without grad sums each chunk's token
    log-probs into the sequences' log-probs, the case's output and its gradient w.r.t. those [S] log-probs follow
    (the upstream for logprobs; for a loss, autograd through `preference_loss`), then each chunk is recomputed
    with grad under its tokens' share of that gradient, d weight accumulating over chunks. The cost is one
    float32 reference pass plus a forward, never an [N, V] buffer.
    """
    hidden, weight, targets, cu_seqlens, upstream = inputs
    h = hidden.detach().float()
    w = weight.detach().float().requires_grad_()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    num_seqs = lengths.numel()
    seq_of = torch.repeat_interleave(torch.arange(num_seqs, device=h.device), lengths)
    if seq_of.numel() != h.shape[0]:
        raise ValueError(f"cu_seqlens covers {seq_of.numel()} of {h.shape[0]} tokens")
    step = chunk_tokens or fp32_chunk_tokens(case, device)
    chunks = [(start, min(start + step, h.shape[0])) for start in range(0, h.shape[0], step)]

    def token_logps(start, stop, h_chunk):
        return reference.linear_logprobs(h_chunk, w, targets[start:stop], reduction="none", softcap=case.softcap)

    with ieee_fp32():
        with torch.no_grad():
            logps = torch.zeros(num_seqs, dtype=torch.float32, device=h.device)
            for start, stop in chunks:
                logps.index_add_(0, seq_of[start:stop], token_logps(start, stop, h[start:stop]))
        if case.kind == "logprobs":
            output, per_seq = logps, upstream.float()
        else:
            groups, ref_logps, options = case.loss_arguments(device)
            leaf = logps.clone().requires_grad_()
            loss = preference_loss(leaf, ref_logps.float(), groups, **options)[0]
            (per_seq,) = torch.autograd.grad(loss, leaf, grad_outputs=upstream.float())
            output = loss.detach()
        d_hidden, d_weight = torch.empty_like(h), torch.zeros_like(w)
        for start, stop in chunks:
            h_chunk = h[start:stop].clone().requires_grad_()
            out = token_logps(start, stop, h_chunk)
            g_hidden, g_weight = torch.autograd.grad(out, (h_chunk, w), grad_outputs=per_seq[seq_of[start:stop]])
            d_hidden[start:stop] = g_hidden
            d_weight += g_weight
            del out, g_hidden, g_weight
    return output, d_hidden, d_weight


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
    full_lo_ms: float | None = None  # the full pass's spread over the repeats: see `spread`
    full_hi_ms: float | None = None
    spread: str | None = None  # "p20-p80" (5 repeats or more) or "min-max"
    forward_tflops: float | None = None  # 2·N·D·V over the median forward time
    error_fp32: float | None = None  # against `fp32_reference`; None when not computed (fp32_error=False)


def run_case(case: Case, device: torch.device, names, *, warmup: int, repeats: int, memory: bool = True,
             fp32_error: bool = True, progress=print) -> list[Result]:
    """Check, time and measure each implementation on one case; ratios are against the reference.

    The gate: each implementation's output and gradients against the first implementation run (`error`, its
    dtype's tolerance; NaN fails). Beside it, with fp32_error, `error_fp32` against `fp32_reference` (computed once,
    before the first implementation runs, and reported for wrong results too). `fp32_reference` is chunked over
    tokens, so it fits beside the inputs at any shape; error_fp32 is None ("—" in the table) only without
    fp32_error, for a result that failed or was skipped, or when the float32 reference itself failed (said in the
    progress output).
    """
    described = {**asdict(case), "name": case.name, "num_seqs": case.num_seqs}
    impls = implementations(device, case, set(names))
    inputs = case.inputs(device)
    exact = None
    if fp32_error and any(callable(impls.get(name)) for name in names):
        progress("  float32 reference (error_fp32) …")
        try:
            exact = fp32_reference(case, inputs, device)
        except Exception as exc:  # e.g. out of memory: the run goes on without error_fp32
            progress(f"  float32 reference failed ({type(exc).__name__}: {exc}): no error_fp32 for this case")
            if device.type == "cuda":
                torch.cuda.empty_cache()
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
            error_fp32 = None if exact is None else max(
                max_rel_error(a, b) for a, b in zip((logps, *grads), exact, strict=True))
            del logps, grads
            if not error <= tolerance(name, case.dtype):
                results.append(Result(name, described, f"wrong: relative error {error:.2e}", error=error,
                                      error_fp32=error_fp32))
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
        tflops = case.flops / (timing["full_ms"] * 1e-3) / 1e12 if timing["full_ms"] > 0 else None
        forward_tflops = case.forward_flops / (timing["forward_ms"] * 1e-3) / 1e12 if timing["forward_ms"] > 0 \
            else None
        results.append(Result(name, described, "ok", peak_bytes=peak, tflops=tflops, error=error,
                              forward_tflops=forward_tflops, error_fp32=error_fp32, **timing))
        # One line per implementation as soon as it is done: a run stopped before its table keeps these in its log.
        progress(f"  {name}: forward {timing['forward_ms']:.3f} ms, full {timing['full_ms']:.3f} ms"
                 + ("" if peak is None else f", peak {peak / 2**20:.1f} MiB")
                 + ("" if error_fp32 is None else f", error vs fp32 {error_fp32:.1e}"))
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


def gemm_floor_ms(case: Case, device: torch.device, *, warmup: int, repeats: int, gemms: int = 4) -> float:
    """Median time of the four GEMMs of N·D·V that an exact fused pass runs (the logits, their recompute in the
    backward, d_hidden, d_weight) and nothing else, in the case's dtype into preallocated outputs: the floor of
    any exact fused method. On CPU over cache-sized vocabulary tiles, on CUDA as whole matrices. gemms=3 drops the
    recompute: the floor of a pass that keeps its logits (a materialised reference, the gemm backend's kept
    logits)."""
    if gemms not in (3, 4):
        raise ValueError(f"gemms must be 3 or 4, got {gemms}")
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
            if gemms == 4:
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
