"""The gemm backend's memory side: the chunk plan's rules and numbers, its options' validation (and their refusal by
the other backends), its registration, its benchmark variants, and its peak memory measured on the CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICE, fresh_seed

import epa_kernels
from benchmarks import harness
from epa_kernels.dispatch import resolve_backend
from epa_kernels.ops import torch_rows
from epa_kernels.ops.gemm_plan import (
    CHUNK_ALIGN,
    DEFAULT_MEMORY_BUDGET,
    MIN_CHUNK_TOKENS,
    MIN_CHUNK_VOCAB,
    ChunkPlan,
    plan_chunks,
)

MiB = 1 << 20
LLAMA = {"num_tokens": 8192, "vocab": 128256, "itemsize": 2}  # Llama-3-8B's head at the size, bf16


def test_default_plan_at_llama_3_8b():
    """512 MiB by default: 2 GiB of logits are not kept; four vocabulary chunks of 32768 rows (auto, N < V), or
    four token chunks of 2048 (forced), each buffer within the budget."""
    assert DEFAULT_MEMORY_BUDGET == 512 * MiB
    auto = plan_chunks(**LLAMA, memory_budget=None, keep_allowed=True)
    assert (auto.keep, auto.chunking, auto.chunk, auto.num_chunks) == (False, "vocab", 32768, 4)
    assert auto.buffer_shape == (8192, 32768) and auto.buffer_bytes == 512 * MiB
    tokens = plan_chunks(**LLAMA, memory_budget=None, chunking="tokens")
    assert (tokens.chunk, tokens.num_chunks, tokens.buffer_bytes) == (2048, 4, 2048 * 128256 * 2)
    assert tokens.ranges()[-1] == (6144, 8192) and auto.ranges()[-1] == (98304, 128256)


def test_raised_budget_keeps_the_logits_exactly_when_they_fit():
    logits = 8192 * 128256 * 2
    assert plan_chunks(**LLAMA, memory_budget=logits, keep_allowed=True) == ChunkPlan("tokens", 8192, 8192, 128256,
                                                                                       2, keep=True)
    assert not plan_chunks(**LLAMA, memory_budget=logits - 1, keep_allowed=True).keep
    assert not plan_chunks(**LLAMA, memory_budget=logits, keep_allowed=False).keep  # no backward to come
    assert plan_chunks(**LLAMA, memory_budget=logits, keep_allowed=True).buffer_bytes == logits


def test_minimum_chunks_and_alignment():
    """A budget too small for MIN_CHUNK_* rows still gets them (the buffer then exceeds it, as the plan says);
    chunks from a budget are rounded down to CHUNK_ALIGN; a dimension smaller than its minimum is one chunk."""
    assert (MIN_CHUNK_TOKENS, MIN_CHUNK_VOCAB, CHUNK_ALIGN) == (512, 2048, 128)
    tiny = plan_chunks(**LLAMA, memory_budget=1, chunking="tokens")
    assert tiny.chunk == MIN_CHUNK_TOKENS and tiny.buffer_bytes > 1
    assert plan_chunks(**LLAMA, memory_budget=1, chunking="vocab").chunk == MIN_CHUNK_VOCAB
    assert plan_chunks(**LLAMA, memory_budget=1000 * 128256 * 2, chunking="tokens").chunk == 896
    assert plan_chunks(num_tokens=100, vocab=1000, itemsize=4, memory_budget=1, chunking="tokens").chunk == 100


def test_auto_takes_the_chunking_that_rereads_less():
    """Each token chunk after the first re-reads the head [V, D], each vocabulary chunk hidden [N, D]: vocab below
    N = V, tokens above, tokens when one chunk holds every token (nothing is re-read), and a plan within the
    budget before one whose minimum chunk exceeds it."""
    assert plan_chunks(8192, 128256, 2, None).chunking == "vocab"
    assert plan_chunks(65536, 32000, 2, None).chunking == "tokens"
    one = plan_chunks(100, 128256, 2, None)
    assert (one.chunking, one.num_chunks) == ("tokens", 1)
    # Vocabulary chunks would be fewer (16 of the minimum 2048 rows against 256 of 1024 tokens) but hold 1 GiB.
    tight = plan_chunks(262144, 32000, 2, 64 * MiB)
    assert (tight.chunking, tight.chunk, tight.buffer_bytes) == ("tokens", 1024, 1024 * 32000 * 2)


def call(**options):
    gen = torch.Generator().manual_seed(fresh_seed())
    hidden = torch.randn(6, 8, generator=gen).to(DEVICE)
    weight = torch.randn(20, 8, generator=gen).to(DEVICE)
    targets = torch.randint(0, 20, (6,), generator=gen).to(DEVICE)
    return epa_kernels.linear_logprobs(hidden, weight, targets, **options)


@pytest.mark.parametrize("options, error, text", [
    ({"memory_budget": 0}, ValueError, "memory_budget must be None or a positive integer number of bytes"),
    ({"memory_budget": 2.5e9}, ValueError, "memory_budget"),
    ({"memory_budget": True}, ValueError, "memory_budget"),
    ({"chunking": "rows"}, ValueError, "chunking must be one of 'auto', 'tokens', 'vocab'"),
    ({"fp32_accumulation": 1}, TypeError, "fp32_accumulation must be True or False"),
    ({"filter_eps": 1e-5}, ValueError, "filter_eps is implemented by the triton and native backends only"),
])
def test_bad_options_name_the_argument(options, error, text):
    with pytest.raises(error, match=text):
        call(backend="gemm", **options)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("options", [{"memory_budget": 1 << 30}, {"chunking": "vocab"}, {"fp32_accumulation": True}])
def test_other_backends_refuse_the_gemm_options(backend, options):
    name = next(iter(options))
    with pytest.raises(ValueError, match=f"{name}=.*implemented by the gemm backend only.*drop {name}"):
        call(backend=backend, **options)
    call(backend=backend, memory_budget=None, chunking="auto", fp32_accumulation=False)  # the defaults pass


def test_fused_loss_passes_and_checks_the_options():
    hidden = torch.randn(8, 8, device=DEVICE)
    weight = torch.randn(20, 8, device=DEVICE)
    targets = torch.randint(0, 20, (8,), device=DEVICE)
    groups = epa_kernels.make_groups(1, 1, 0, device=DEVICE)
    cu_seqlens = torch.tensor([0, 4, 8], device=DEVICE)
    with pytest.raises(ValueError, match="chunking=.*gemm backend only"):
        epa_kernels.fused_linear_preference_loss(hidden, weight, targets, groups, cu_seqlens=cu_seqlens,
                                                 backend="torch", chunking="tokens")
    with pytest.raises(ValueError, match="memory_budget"):
        epa_kernels.FusedLinearDPOLoss(backend="gemm", memory_budget=-1)(hidden, weight, targets,
                                                                         cu_seqlens=cu_seqlens)


def test_gemm_is_registered_and_auto_is_unchanged():
    info = epa_kernels.backends()["gemm"]
    assert info.available and "GEMMs" in info.detail and "row kernels" in info.detail
    for device in ("cpu", "meta"):
        assert resolve_backend("gemm", torch.device(device))[0] == "gemm"
    assert resolve_backend("auto", torch.device("cpu"))[0] in ("native", "torch")


def test_benchmark_variants():
    """gemm (defaults), gemm-tokens, gemm-vocab and gemm-keep (budget = the case's logits) run and agree with the
    reference on a tiny case, for log-probs and a loss."""
    for kind in ("logprobs", "epa-1+2+1"):
        case = harness.Case.parse(kind, tokens=48, hidden=16, vocab=300)
        assert harness.gemm_variants(case)["gemm-keep"] == {"memory_budget": DEFAULT_MEMORY_BUDGET}
        impls = harness.implementations(torch.device("cpu"), case, set())  # no peers
        inputs = case.inputs(torch.device("cpu"))
        expected = harness.full_pass(impls["reference"], *inputs)
        for name in ("gemm", "gemm-tokens", "gemm-vocab", "gemm-keep"):
            logps, grads = harness.full_pass(impls[name], *inputs)
            for got, want in zip((logps, *grads), (expected[0], *expected[1]), strict=True):
                assert harness.max_rel_error(got, want) < 1e-5, name
    big = harness.Case(tokens=8192, hidden=4096, vocab=128256, dtype="bfloat16")
    assert harness.gemm_variants(big)["gemm-keep"] == {"memory_budget": 8192 * 128256 * 2}


MEMORY_SCRIPT = """
import json, sys, torch, epa_kernels
from benchmarks.harness import cpu_memory_exact, full_pass, peak_memory
assert cpu_memory_exact()
torch.manual_seed(0)
hidden = torch.randn(2048, 32, requires_grad=True)
weight = (torch.randn(8192, 32) / 32**0.5).requires_grad_()
inputs = (hidden, weight, torch.randint(0, 8192, (2048,)), torch.tensor([0, 2048]), torch.ones(1))
peaks = {}
for name, memory in json.loads(sys.argv[1]).items():
    def fn(h, w, t, cu, memory=memory):
        return epa_kernels.linear_logprobs(h, w, t, cu_seqlens=cu, backend="gemm", **memory)
    full_pass(fn, *inputs)  # warm-up: lazy initialisation is not the pass's memory
    peaks[name] = peak_memory(fn, inputs, torch.device("cpu"))
print(json.dumps(peaks))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc peak resident set")
def test_peak_memory_on_cpu():
    """A full pass at N = 2048, V = 8192, fp32 (64 MiB of logits), resident set measured as the benchmarks do
    (harness.peak_memory under CPU_MEMORY_ENV): a 16 MiB budget holds one 16 MiB chunk at a time whichever the
    chunking; a 64 MiB budget keeps the logits. Above that only the row twin's scratch and a small remainder
    (gradients, 1.25 MiB here; per-token state; BLAS workspace)."""
    budgets = {"vocab": {"memory_budget": 16 * MiB}, "tokens": {"memory_budget": 16 * MiB, "chunking": "tokens"},
               "keep": {"memory_budget": 64 * MiB}}
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, **harness.CPU_MEMORY_ENV, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, json.dumps(budgets)], env=env, cwd=root,
                          capture_output=True, text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    remainder = 10 * MiB
    for name in ("vocab", "tokens"):
        assert peaks[name] <= 16 * MiB + torch_rows.SCRATCH_BYTES + remainder, (name, peaks[name] / MiB)
    assert 64 * MiB <= peaks["keep"] <= 64 * MiB + torch_rows.SCRATCH_BYTES + remainder, peaks["keep"] / MiB
