"""Triton row kernels of the `gemm` backend (CUDA; CPU tensors under TRITON_INTERPRET=1).

Same math and signatures as their reference, the torch twin `torch_rows` (read it first): a chunk of raw logits
a [R, C] in the input dtype, R tokens against vocabulary rows v0 … v0 + C − 1, z = softcap(a / T) in fp32.

* `_forward_rows_kernel`: one program per row walks its C logits in BLOCK_C tiles and folds them into the row's
  online log-sum-exp state (running max, Σ e^(z − max), Σ e^(z − max)·z with the entropy, the target logit),
  loaded from and stored back to fp32 [R] buffers, so a row's state carries across vocabulary chunks.
* `_backward_rows_kernel`: one program per row overwrites its logits with da = dz · (1 − (z/c)²) / T,
  dz = coef_a · 1[v = y] + p · (coef_b + coef_c · z), p = e^(z − lse), in the input dtype: the operand of the
  two gradient GEMMs that follow.

Each logit is read once (and written once by the backward): the kernels are bound by memory bandwidth, N·C·s bytes
per chunk, against the GEMMs' 2·N·C·D flops around them. One program per row keeps the reductions in registers;
with N in the thousands there are many more programs than SMs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from epa_kernels.ops import triton_interpreting
from epa_kernels.ops.torch_rows import RowState
from epa_kernels.ops.triton_math import round_to_bf16, tanh

_INTERPRET = triton_interpreting()
# GPU: 4096 fp32 values over 8 warps is 16 per thread, a few vector loads in flight per thread. The interpreter
# gets small tiles so tests cover several tiles per row and their ragged edge.
_BLOCK_C, _NUM_WARPS = (32, 1) if _INTERPRET else (4096, 8)


@triton.jit
def _transform(a, inv_temp, softcap, HAS_SOFTCAP: tl.constexpr):
    z = a.to(tl.float32) * inv_temp
    if HAS_SOFTCAP:
        z = softcap * tanh(z / softcap)
    return z


@triton.heuristics({
    "HAS_SOFTCAP": lambda args: args["softcap"] is not None,
    "HAS_ENTROPY": lambda args: args["ez_ptr"] is not None,
})
@triton.jit
def _forward_rows_kernel(logits_ptr, targets_ptr, max_ptr, sum_ptr, ez_ptr, target_ptr, C, row_stride, v0,
                         inv_temp, softcap, HAS_SOFTCAP: tl.constexpr, HAS_ENTROPY: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * row_stride  # R · C can exceed 2^31
    target = (tl.load(targets_ptr + row) - v0).to(tl.int32)  # may lie outside this chunk: then never matched
    run_max = tl.load(max_ptr + row)
    run_sum = tl.load(sum_ptr + row)
    run_ez = tl.load(ez_ptr + row) if HAS_ENTROPY else 0.0
    target_logit = tl.load(target_ptr + row)
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        mask = offs < C
        z = _transform(tl.load(row_ptr + offs, mask=mask, other=0.0), inv_temp, softcap, HAS_SOFTCAP)
        # Before the padding turns −inf: a target past this chunk's end may fall in its last tile's padding.
        target_logit += tl.sum(tl.where(offs == target, z, 0.0), axis=0)
        z = tl.where(mask, z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=0))
        scale = tl.exp(run_max - new_max)  # 0 on a row's first tile (run_max −inf)
        e = tl.exp(z - new_max)
        run_sum = run_sum * scale + tl.sum(e, axis=0)
        if HAS_ENTROPY:
            # Padded columns have e = 0 but z = −inf: zero z there so the product is 0, not NaN.
            run_ez = run_ez * scale + tl.sum(e * tl.where(mask, z, 0.0), axis=0)
        run_max = new_max
    tl.store(max_ptr + row, run_max)
    tl.store(sum_ptr + row, run_sum)
    tl.store(target_ptr + row, target_logit)
    if HAS_ENTROPY:
        tl.store(ez_ptr + row, run_ez)


@triton.heuristics({
    "HAS_SOFTCAP": lambda args: args["softcap"] is not None,
    "HAS_COEF_C": lambda args: args["coef_c_ptr"] is not None,
    # The interpreter's fp32 -> bf16 cast truncates; round to nearest even first, as the GPU's cvt.rn does.
    "ROUND_BF16": lambda args: _INTERPRET and args["logits_ptr"].dtype == torch.bfloat16,
})
@triton.jit
def _backward_rows_kernel(logits_ptr, targets_ptr, lse_ptr, coef_a_ptr, coef_b_ptr, coef_c_ptr, C, row_stride, v0,
                          inv_temp, softcap, HAS_SOFTCAP: tl.constexpr, HAS_COEF_C: tl.constexpr,
                          ROUND_BF16: tl.constexpr, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * row_stride
    target = (tl.load(targets_ptr + row) - v0).to(tl.int32)
    lse = tl.load(lse_ptr + row)
    coef_a = tl.load(coef_a_ptr + row)
    coef_b = tl.load(coef_b_ptr + row)
    coef_c = tl.load(coef_c_ptr + row) if HAS_COEF_C else 0.0
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        mask = offs < C
        z = _transform(tl.load(row_ptr + offs, mask=mask, other=0.0), inv_temp, softcap, HAS_SOFTCAP)
        p = tl.exp(z - lse)
        dz = p * (coef_b + coef_c * z) if HAS_COEF_C else p * coef_b
        dz += tl.where(offs == target, coef_a, 0.0)
        if HAS_SOFTCAP:
            dz *= 1.0 - (z / softcap) * (z / softcap)
        dz *= inv_temp
        if ROUND_BF16:
            dz = round_to_bf16(dz)
        tl.store(row_ptr + offs, dz.to(logits_ptr.dtype.element_ty), mask=mask)


def _launch(logits):
    """(grid, BLOCK_C, num_warps) of a launch over the rows of logits [R, C] (unit column stride)."""
    if logits.stride(1) != 1:
        raise ValueError(f"row kernels need logits with unit column stride, got strides {logits.stride()}")
    return (logits.shape[0],), min(_BLOCK_C, triton.next_power_of_2(logits.shape[1])), _NUM_WARPS


def forward_rows(logits: torch.Tensor, targets: torch.Tensor, v0: int, state: RowState, *, inv_temp: float,
                 softcap: float | None) -> None:
    """Fold the chunk logits [R, C] (vocabulary rows v0 …) into `state` (R rows), in place."""
    grid, block, warps = _launch(logits)
    _forward_rows_kernel[grid](logits, targets, state.max, state.sum, state.ez, state.target, logits.shape[1],
                               logits.stride(0), v0, inv_temp, softcap, BLOCK_C=block, num_warps=warps)


def backward_rows(logits: torch.Tensor, targets: torch.Tensor, v0: int, lse: torch.Tensor, coef_a: torch.Tensor,
                  coef_b: torch.Tensor, coef_c: torch.Tensor | None, *, inv_temp: float,
                  softcap: float | None) -> None:
    """Overwrite the chunk logits [R, C] (vocabulary rows v0 …) with d loss / d logits, in their dtype."""
    grid, block, warps = _launch(logits)
    _backward_rows_kernel[grid](logits, targets, lse, coef_a, coef_b, coef_c, logits.shape[1], logits.stride(0), v0,
                                inv_temp, softcap, BLOCK_C=block, num_warps=warps)
