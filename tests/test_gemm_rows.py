"""The gemm backend's row work: the torch twin (`ops/torch_rows.py`) against the fp64 definition, and the Triton
row kernels (`ops/triton_rows.py`, under TRITON_INTERPRET=1 on CPU) against the twin, chunk by chunk.

Shapes are tiny (the interpreter is slow) but every chunk width leaves a ragged last tile (the interpreter's tile
is 32 columns), and targets are placed before, inside, at both ends of, after, and in the padding of a chunk.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICE, fresh_seed

import epa_kernels
from epa_kernels.ops import torch_rows
from epa_kernels.ops.torch_rows import RowState

VOCAB = 130
CHUNKS = [(0, 45), (45, 115), (115, 130)]  # vocabulary chunks [v0, v1): widths 45, 70 and 15


def inputs(dtype, rows=6, seed=None):
    """Raw logits [rows, VOCAB] (scale 3: a softmax that is neither flat nor one-hot) and targets at the edges."""
    gen = torch.Generator().manual_seed(seed if seed is not None else fresh_seed())
    logits = (torch.randn(rows, VOCAB, generator=gen) * 3).to(dtype)
    targets = torch.randint(0, VOCAB, (rows,), generator=gen)
    edges = torch.tensor([0, 44, 45, 114, 129])[:rows]  # both ends of every chunk
    targets[: len(edges)] = edges
    coefs = [torch.randn(rows, generator=gen) for _ in range(3)]
    return logits.to(DEVICE), targets.to(DEVICE), [c.to(DEVICE) for c in coefs]


def transformed(logits, temperature, softcap):
    z = logits.double() / temperature
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def fold(kernels, logits, targets, with_entropy, temperature, softcap):
    """Run the forward row work chunk by chunk over the vocabulary; (logp, lse, ez | None)."""
    state = RowState.fresh(logits.shape[0], logits.device, with_entropy)
    for v0, v1 in CHUNKS:
        kernels.forward_rows(logits[:, v0:v1].contiguous(), targets, v0, state, inv_temp=1.0 / temperature,
                             softcap=softcap)
    return state.finish()


def unfold(kernels, logits, targets, lse, coefs, with_c, temperature, softcap):
    """Run the backward row work chunk by chunk; the logits' gradient [R, V] in their dtype."""
    chunks = []
    for v0, v1 in CHUNKS:
        chunk = logits[:, v0:v1].clone()
        kernels.backward_rows(chunk, targets, v0, lse, coefs[0], coefs[1], coefs[2] if with_c else None,
                              inv_temp=1.0 / temperature, softcap=softcap)
        chunks.append(chunk)
    return torch.cat(chunks, dim=1)


OPTIONS = [pytest.param(1.0, None, id="plain"), pytest.param(0.7, 4.0, id="temperature-softcap")]


@pytest.mark.parametrize("temperature,softcap", OPTIONS)
def test_twin_forward_is_the_log_softmax(temperature, softcap):
    logits, targets, _ = inputs(torch.float32)
    logp, lse, ez = fold(torch_rows, logits, targets, True, temperature, softcap)
    z = transformed(logits, temperature, softcap)
    log_probs = torch.log_softmax(z, -1)
    torch.testing.assert_close(lse.double(), torch.logsumexp(z, -1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logp.double(), log_probs.gather(1, targets[:, None]).squeeze(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ez.double(), (log_probs.exp() * z).sum(-1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("temperature,softcap", OPTIONS)
def test_twin_backward_is_the_chain_rule(temperature, softcap):
    """The twin's da is autograd's product of the contract's dz = a·1[y] + p·(b + c·z) with the Jacobian of
    z = softcap(a / T), in fp64."""
    logits, targets, coefs = inputs(torch.float32)
    _, lse, _ = fold(torch_rows, logits, targets, False, temperature, softcap)
    got = unfold(torch_rows, logits, targets, lse, coefs, True, temperature, softcap)
    a = logits.double().requires_grad_()
    z = transformed(a, temperature, softcap)
    p = torch.exp(z - lse.double()[:, None]).detach()
    dz = p * (coefs[1].double()[:, None] + coefs[2].double()[:, None] * z.detach())
    dz[torch.arange(len(targets)), targets] += coefs[0].double()
    (expected,) = torch.autograd.grad(z, a, grad_outputs=dz)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_twin_row_blocks_do_not_change_the_result(monkeypatch):
    """The twin's scratch bound splits rows into blocks: one row per block gives the same numbers."""
    logits, targets, coefs = inputs(torch.float32)
    whole = fold(torch_rows, logits, targets, True, 0.8, 5.0)
    grads = unfold(torch_rows, logits, targets, whole[1], coefs, True, 0.8, 5.0)
    monkeypatch.setattr(torch_rows, "SCRATCH_BYTES", 1)
    for a, b in zip(whole, fold(torch_rows, logits, targets, True, 0.8, 5.0), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(unfold(torch_rows, logits, targets, whole[1], coefs, True, 0.8, 5.0), grads,
                               rtol=0, atol=0)


def triton_rows():
    if not epa_kernels.backends()["triton"].available:
        pytest.skip("triton not installed")
    from epa_kernels.ops import triton_rows as module

    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature,softcap", OPTIONS)
@pytest.mark.parametrize("with_entropy", [False, True], ids=["", "entropy"])
def test_triton_forward_rows_match_the_twin(dtype, temperature, softcap, with_entropy):
    kernels = triton_rows()
    logits, targets, _ = inputs(dtype)
    got = fold(kernels, logits, targets, with_entropy, temperature, softcap)
    expected = fold(torch_rows, logits, targets, with_entropy, temperature, softcap)
    for name, a, b in zip(("logp", "lse", "ez"), got, expected, strict=True):
        if b is None:
            assert a is None, name
            continue
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_triton_forward_rows_ignore_a_target_in_the_padding():
    """A target just past a chunk's end lies in its last tile's padding (width 45, tile 32): it must not count."""
    kernels = triton_rows()
    logits, targets, _ = inputs(torch.float32, rows=2)
    targets[:] = torch.tensor([45, 60])  # chunk [0, 45) pads its last tile to columns 45 … 63
    state = RowState.fresh(2, logits.device, False)
    kernels.forward_rows(logits[:, :45].contiguous(), targets, 0, state, inv_temp=1.0, softcap=None)
    assert torch.all(state.target == 0) and torch.isfinite(state.sum).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("temperature,softcap", OPTIONS)
@pytest.mark.parametrize("with_c", [False, True], ids=["", "entropy-gradient"])
def test_triton_backward_rows_match_the_twin(dtype, temperature, softcap, with_c):
    """In place, in the input dtype: bf16 results round to nearest like the twin's cast (at most one bf16 step
    apart where fp32 evaluation orders differ)."""
    kernels = triton_rows()
    logits, targets, coefs = inputs(dtype)
    _, lse, _ = fold(torch_rows, logits, targets, False, temperature, softcap)
    got = unfold(kernels, logits, targets, lse, coefs, with_c, temperature, softcap)
    expected = unfold(torch_rows, logits, targets, lse, coefs, with_c, temperature, softcap)
    assert got.dtype == dtype
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2**-8, "atol": 1e-6}
    torch.testing.assert_close(got, expected, **tolerance)


def test_triton_rows_refuse_a_strided_chunk():
    kernels = triton_rows()
    logits, targets, _ = inputs(torch.float32, rows=2)
    state = RowState.fresh(2, logits.device, False)
    with pytest.raises(ValueError, match="unit column stride"):
        kernels.forward_rows(logits.t(), targets, 0, state, inv_temp=1.0, softcap=None)



# Run without TRITON_INTERPRET (the test session sets it, and then triton.jit gives no compilable kernel).
COMPILE_SCRIPT = """
import json, sys
from benchmarks.kernel_report import compile_kernel, resource_usage
from epa_kernels.ops import triton_rows as kernels


def compile_for_gpu(kernel, types, constants, capability):
    return compile_kernel(kernel, types, constants, capability, num_warps=kernels._NUM_WARPS)


usage = {}
for capability in (80, 90):
    for dtype in ("bf16", "fp32"):
        for flags in (False, True):
            common = {"logits_ptr": "*" + dtype, "targets_ptr": "*i64", "C": "i32", "row_stride": "i32", "v0": "i32",
                      "inv_temp": "fp32", "softcap": "fp32" if flags else None}
            forward = compile_for_gpu(kernels._forward_rows_kernel, {
                **common, "max_ptr": "*fp32", "sum_ptr": "*fp32", "target_ptr": "*fp32",
                "ez_ptr": "*fp32" if flags else None,
            }, {"HAS_SOFTCAP": flags, "HAS_ENTROPY": flags, "BLOCK_C": kernels._BLOCK_C}, capability)
            backward = compile_for_gpu(kernels._backward_rows_kernel, {
                **common, "lse_ptr": "*fp32", "coef_a_ptr": "*fp32", "coef_b_ptr": "*fp32",
                "coef_c_ptr": "*fp32" if flags else None,
            }, {"HAS_SOFTCAP": flags, "HAS_COEF_C": flags, "ROUND_BF16": False, "BLOCK_C": kernels._BLOCK_C},
                capability)
            for name, compiled in (("forward", forward), ("backward", backward)):
                usage[f"{name} {dtype} sm_{capability} flags={flags}"] = resource_usage(compiled)
print(json.dumps({"block": kernels._BLOCK_C, "usage": usage}))
"""


def test_row_kernels_compile_for_gpus_without_spills():
    """The GPU tile (BLOCK_C = 4096, 8 warps) of both row kernels compiles ahead of time (no GPU needed) for Ampere
    and Hopper, bf16 and fp32, with and without softcap, entropy and the entropy gradient, and spills no register
    to local memory (stack 0)."""
    triton = pytest.importorskip("triton")
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not ((tools / "ptxas").exists() and (tools / "cuobjdump").exists()):
        pytest.skip("Triton's NVIDIA backend ships no ptxas/cuobjdump here")
    root = Path(__file__).resolve().parents[1]
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(root), TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                          check=False, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["block"] == 4096 and len(report["usage"]) == 16
    for variant, usage in report["usage"].items():
        assert usage["stack_bytes"] == 0 and 0 < usage["registers"] <= 255, (variant, usage)
