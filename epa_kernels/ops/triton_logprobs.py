"""Triton backend of the fused LM-head log-prob op (CUDA GPUs; CPU tensors under TRITON_INTERPRET=1).

It implements the kernel contract documented in `torch_logprobs` (same signatures and return
conventions): per token t, with logits z_t = softcap((h_t · Wᵀ + b) / temperature),

    forward:  logp_t = z_t[y_t] − lse_t,  lse_t = logsumexp_v z_t[v],  ez_t = Σ_v softmax(z_t)[v] · z_t[v]
    backward: dz_t[v] = coef_a_t · 1[v = y_t] + p_t[v] · (coef_b_t + coef_c_t · z_t[v]), chained through
              softcap and temperature into d hidden = da · W, d weight = daᵀ · h, d bias = Σ_t da.

Why kernels: the [M, V] logits never touch memory. Each program recomputes a tile of logits from
hidden and weight with tensor-core dots (fp32 accumulation) and reduces it on the spot.

* Forward: grid (token blocks, vocab splits). A program walks its vocab range in BLOCK_V tiles and
  keeps an online logsumexp (running max + rescaled sum), the target logit and, with entropy, a
  rescaled Σ e^(z−m)·z. Per-split partials go to tiny [splits, M] buffers that the launcher
  combines. Splitting the vocabulary keeps the GPU busy when there are few tokens.
* Backward: one program per (token block, vocab block) tile, in grouped order so concurrently
  running programs share hidden/weight tiles in L2. It recomputes the tile's logits, forms dz and
  accumulates dz · W and dzᵀ · h chunk by chunk over D into fp32 gradients with atomic adds; the D
  chunks start at a per-program offset so programs sharing gradient rows rarely hit the same
  addresses at once. Optionally, tiles whose probabilities are all below `filter_eps` (and that hold no counted
  target) are skipped. The "stored" scheme instead writes each tile's da to a [chunk, V] buffer and leaves the
  two gradient GEMMs to torch, chunk by chunk: no atomics, at the cost of the buffer.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from epa_kernels.ops import triton_interpreting
from epa_kernels.ops.triton_math import round_to_bf16, tanh

_INTERPRET = triton_interpreting()


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products (like torch's default fp32 matmul), not TF32.
    return "ieee" if dtype == torch.float32 else "tf32"


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    if UPCAST_DOT:
        # Triton's interpreter multiplies bf16 operands as raw uint16 bit patterns; fp32 operands
        # give what the tensor cores compute (exact bf16 products, fp32 accumulation).
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _logits_tile(hidden_ptr, weight_ptr, bias_ptr, offs_m, offs_v, mask_m, mask_v, D, inv_temp, softcap,
                 HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, EVEN_D: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 logits z [BLOCK_M, BLOCK_V] of hidden rows offs_m against vocab rows offs_v."""
    offs_d = tl.arange(0, BLOCK_D)
    # int64 row offsets: V · D can exceed 2^31 elements.
    h_ptrs = hidden_ptr + offs_m[:, None].to(tl.int64) * D + offs_d[None, :]
    w_ptrs = weight_ptr + offs_v[None, :].to(tl.int64) * D + offs_d[:, None]  # Wᵀ tile [BLOCK_D, BLOCK_V]
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for d in range(0, D, BLOCK_D):
        if EVEN_D:
            h = tl.load(h_ptrs, mask=mask_m[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=mask_v[None, :], other=0.0)
        else:
            mask_d = offs_d < D - d
            h = tl.load(h_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_d[:, None] & mask_v[None, :], other=0.0)
        acc = _dot(h, w, acc, DOT_PRECISION, UPCAST_DOT)
        h_ptrs += BLOCK_D
        w_ptrs += BLOCK_D
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    z = acc * inv_temp
    if HAS_SOFTCAP:
        z = softcap * tanh(z / softcap)
    return z


# Compile-time flags both kernels derive from their arguments (the logits tile is shared).
_TILE_HEURISTICS = {
    "HAS_BIAS": lambda args: args["bias_ptr"] is not None,
    "HAS_SOFTCAP": lambda args: args["softcap"] is not None,
    "EVEN_D": lambda args: args["D"] % args["BLOCK_D"] == 0,
    "DOT_PRECISION": lambda args: _dot_precision(args["hidden_ptr"].dtype),
    "UPCAST_DOT": lambda args: _INTERPRET and args["hidden_ptr"].dtype == torch.bfloat16,
}


@triton.heuristics({
    **_TILE_HEURISTICS,
    "HAS_ENTROPY": lambda args: args["part_ez_ptr"] is not None,
})
@triton.jit
def _forward_kernel(hidden_ptr, weight_ptr, bias_ptr, targets_ptr,
                    part_max_ptr, part_sum_ptr, part_ez_ptr, part_tgt_ptr,
                    M, V, D, v_per_split, inv_temp, softcap,
                    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ENTROPY: tl.constexpr,
                    EVEN_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    target = tl.load(targets_ptr + offs_m, mask=mask_m, other=0).to(tl.int32)  # V < 2^31; 32-bit compares

    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)  # Σ e^(z − run_max)
    run_ez = tl.zeros((BLOCK_M,), dtype=tl.float32)  # Σ e^(z − run_max) · z
    target_logit = tl.zeros((BLOCK_M,), dtype=tl.float32)

    # The launcher makes every split non-empty, so run_max is finite after the first tile.
    v_start = pid_s * v_per_split
    v_stop = tl.minimum(v_start + v_per_split, V)
    for v0 in range(v_start, v_stop, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < V
        z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, offs_m, offs_v, mask_m, mask_v, D, inv_temp,
                         softcap, HAS_BIAS, HAS_SOFTCAP, EVEN_D, DOT_PRECISION, UPCAST_DOT, BLOCK_M, BLOCK_V,
                         BLOCK_D)
        z = tl.where(mask_v[None, :], z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        scale = tl.exp(run_max - new_max)
        e = tl.exp(z - new_max[:, None])
        run_sum = run_sum * scale + tl.sum(e, axis=1)
        if HAS_ENTROPY:
            # Padded columns have e = 0 but z = −inf: zero z there so the product is 0, not NaN.
            run_ez = run_ez * scale + tl.sum(e * tl.where(mask_v[None, :], z, 0.0), axis=1)
        target_logit += tl.sum(tl.where(offs_v[None, :] == target[:, None], z, 0.0), axis=1)
        run_max = new_max

    out = pid_s * M + offs_m
    tl.store(part_max_ptr + out, run_max, mask=mask_m)
    tl.store(part_sum_ptr + out, run_sum, mask=mask_m)
    tl.store(part_tgt_ptr + out, target_logit, mask=mask_m)
    if HAS_ENTROPY:
        tl.store(part_ez_ptr + out, run_ez, mask=mask_m)


@triton.heuristics({
    **_TILE_HEURISTICS,
    "HAS_COEF_C": lambda args: args["coef_c_ptr"] is not None,
    "HAS_FILTER": lambda args: args["filter_eps"] is not None,
    "NEED_HIDDEN": lambda args: args["d_hidden_ptr"] is not None,
    "NEED_WEIGHT": lambda args: args["d_weight_ptr"] is not None,
    "NEED_BIAS": lambda args: args["d_bias_ptr"] is not None,
    "STORE_DA": lambda args: args["da_ptr"] is not None,
})
@triton.jit
def _backward_kernel(hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, coef_a_ptr, coef_b_ptr, coef_c_ptr,
                     d_hidden_ptr, d_weight_ptr, d_bias_ptr, da_ptr,
                     M, V, D, inv_temp, softcap, filter_eps,
                     HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_COEF_C: tl.constexpr,
                     HAS_FILTER: tl.constexpr, NEED_HIDDEN: tl.constexpr, NEED_WEIGHT: tl.constexpr,
                     NEED_BIAS: tl.constexpr, STORE_DA: tl.constexpr, EVEN_D: tl.constexpr,
                     DOT_PRECISION: tl.constexpr,
                     UPCAST_DOT: tl.constexpr, GROUP_M: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    # Grouped order: consecutive programs sweep GROUP_M token blocks against the same vocab
    # blocks, so the hidden and weight rows they read stay in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_v = tl.cdiv(V, BLOCK_V)
    pids_per_group = GROUP_M * num_pid_v
    first_m = (pid // pids_per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_group) % group_rows
    pid_v = (pid % pids_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_m = offs_m < M
    mask_v = offs_v < V
    z = _logits_tile(hidden_ptr, weight_ptr, bias_ptr, offs_m, offs_v, mask_m, mask_v, D, inv_temp, softcap,
                     HAS_BIAS, HAS_SOFTCAP, EVEN_D, DOT_PRECISION, UPCAST_DOT, BLOCK_M, BLOCK_V, BLOCK_D)

    # Padded rows get lse = +inf (p = 0); all padding is zeroed below anyway.
    lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=float("inf"))
    target = tl.load(targets_ptr + offs_m, mask=mask_m, other=0).to(tl.int32)  # V < 2^31; 32-bit compares
    coef_a = tl.load(coef_a_ptr + offs_m, mask=mask_m, other=0.0)
    coef = tl.load(coef_b_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
    if HAS_COEF_C:
        coef = coef + tl.load(coef_c_ptr + offs_m, mask=mask_m, other=0.0)[:, None] * z
    p = tl.exp(z - lse[:, None])  # 0 in padded rows
    if HAS_FILTER:  # skip the tile if every probability is below eps and it holds no counted target
        p_max = tl.max(tl.max(tl.where(mask_v[None, :], p, 0.0), axis=1), axis=0)
        v_start = pid_v * BLOCK_V
        counted = mask_m & (target >= v_start) & (target < v_start + BLOCK_V) & (coef_a != 0.0)
        keep = (p_max >= filter_eps) | (tl.sum(counted.to(tl.int32), axis=0) > 0)
    else:
        keep = True
    dz = p * coef + tl.where(offs_v[None, :] == target[:, None], coef_a[:, None], 0.0)
    if HAS_SOFTCAP:
        dz *= 1.0 - (z / softcap) * (z / softcap)
    dz = tl.where(mask_m[:, None] & mask_v[None, :], dz * inv_temp, 0.0)

    if STORE_DA:  # the stored scheme: da goes to a [M, V] buffer, the launcher runs the two gradient GEMMs
        da_tile = dz
        if HAS_FILTER:
            da_tile = tl.where(keep, dz, 0.0)
        if UPCAST_DOT:  # the interpreter's bf16 goes through an fp32 buffer holding bf16-rounded values
            da_tile = round_to_bf16(da_tile)
        tl.store(da_ptr + offs_m[:, None].to(tl.int64) * V + offs_v[None, :], da_tile.to(da_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_v[None, :])
    if keep:
        if NEED_BIAS:
            tl.atomic_add(d_bias_ptr + offs_v, tl.sum(dz, axis=0), mask=mask_v, sem="relaxed")
        # Tensor-core operands in the input dtype, like torch's da = dz.to(hidden.dtype).
        if UPCAST_DOT:
            da = round_to_bf16(dz)
        else:
            da = dz.to(hidden_ptr.dtype.element_ty)
        offs_d0 = tl.arange(0, BLOCK_D)
        rows_m = offs_m[:, None].to(tl.int64) * D
        rows_v = offs_v[:, None].to(tl.int64) * D
        num_d = tl.cdiv(D, BLOCK_D)
        # Programs sharing a token block (or vocab block) differ in pid_v (or pid_m), hence
        # start on different D chunks and spread their atomics over different addresses.
        first_d = (pid_m + pid_v) % num_d
        for i in range(0, num_d):
            offs_d = ((first_d + i) % num_d) * BLOCK_D + offs_d0
            if EVEN_D:
                mask_hd = mask_m[:, None]
                mask_wd = mask_v[:, None]
            else:
                mask_d = offs_d < D
                mask_hd = mask_m[:, None] & mask_d[None, :]
                mask_wd = mask_v[:, None] & mask_d[None, :]
            if NEED_HIDDEN:
                w = tl.load(weight_ptr + rows_v + offs_d[None, :], mask=mask_wd, other=0.0)
                dh = _dot(da, w, None, DOT_PRECISION, UPCAST_DOT)
                tl.atomic_add(d_hidden_ptr + rows_m + offs_d[None, :], dh, mask=mask_hd, sem="relaxed")
            if NEED_WEIGHT:
                h = tl.load(hidden_ptr + rows_m + offs_d[None, :], mask=mask_hd, other=0.0)
                dw = _dot(tl.trans(da), h, None, DOT_PRECISION, UPCAST_DOT)
                tl.atomic_add(d_weight_ptr + rows_v + offs_d[None, :], dw, mask=mask_wd, sem="relaxed")


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Config:
    block_m: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int


# The interpreter is slow and runs any config: use small tiles so tests cover many tiles and edges.
_INTERPRET_CONFIG = _Config(block_m=16, block_v=32, block_d=16, num_warps=1, num_stages=1)
# GPU configs, timed on an H200 (`python -m benchmarks.tile_sweep`, N = 8192, D = 4096, V = 128256, Triton 3.6;
# tables in benchmarks/results/2026-12-04_h200_kernels) and compiled for every target with `python -m
# benchmarks.kernel_report` (registers and spills from ptxas, no GPU needed; it reproduces the registers and spills
# of all 20 kernels the H200 compiled under the same Triton). Many-token forward: 128×128×64 w8 s3 took 20.3 ms
# against 29.8 for the earlier 128×128×32 w8 s3 (1.47×); it spills nothing on sm_90a under Triton 3.6 and 3.9
# on the hot path (16 B with the entropy epilogue under 3.9, 192 B on sm_80-sm_89); the fastest, 128×256×32 w8 s3
# (18.7 ms), spills under Triton 3.9 (32 B, 400 B with entropy). Many-token backward: 128×128×32 w8 s4 took 111.5 ms
# against 116.6 for w8 s3 (1.05×) and spills nothing on any target; the faster ones spill under Triton 3.9
# (128×128×32 w4 s3, 1.11×: 232 B) or need 160 KiB of shared memory, more than sm_86/sm_89 have per block
# (128×128×64 w8 s3, 1.12×). Few tokens (not yet timed) get 64-row tiles so less tensor-core work is wasted on
# padding (that regime streams the weight).
# Every config fits the per-block shared memory of sm_80, sm_86, sm_89 and sm_90 (tests/test_kernel_report.py).
_FORWARD_CONFIG = _Config(block_m=128, block_v=128, block_d=64, num_warps=8, num_stages=3)
_FORWARD_CONFIG_FEW_TOKENS = _Config(block_m=64, block_v=256, block_d=32, num_warps=8, num_stages=3)
_BACKWARD_CONFIG = _Config(block_m=128, block_v=128, block_d=32, num_warps=8, num_stages=4)
_BACKWARD_CONFIG_FEW_TOKENS = _Config(block_m=64, block_v=128, block_d=32, num_warps=8, num_stages=3)
# Exact fp32 dots run on CUDA cores (no wgmma) and need far more registers per tile.
_FP32_CONFIG = _Config(block_m=128, block_v=64, block_d=16, num_warps=8, num_stages=2)
_BACKWARD_GROUP_M = 8
# The stored backward scheme's da buffer: 512 MiB is 2048 tokens at V = 128256 in bf16 (4 chunks at N = 8192).
STORED_BYTES = 512 * 1024 * 1024
_FEW_TOKENS = 64
# Forward programs per SM to aim for when splitting the vocabulary; the configs fit one program per
# SM at a time, so this is the number of waves (the last one mostly full, as splits round down).
_PROGRAMS_PER_SM = 4


def _gpu_config(num_tokens: int, dtype: torch.dtype, many: _Config, few: _Config) -> _Config:
    """The tile config a GPU launch uses (benchmarks/kernel_report.py compiles exactly these)."""
    if dtype == torch.float32:
        return _FP32_CONFIG
    return few if num_tokens <= _FEW_TOKENS else many


def _config(num_tokens: int, dtype: torch.dtype, many: _Config, few: _Config) -> _Config:
    return _INTERPRET_CONFIG if _INTERPRET else _gpu_config(num_tokens, dtype, many, few)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: still split the vocabulary a few ways


def forward(hidden, weight, bias, targets, *, temperature=1.0, softcap=None, with_entropy=False, config=None):
    """hidden [M, D], weight [V, D], bias [V] | None, targets [M] int64 in [0, V).

    Returns (logp [M], lse [M], ez [M] | None), all fp32. `config`: a `_Config` tile to launch with instead of
    the shipped one (for benchmarks/tile_sweep.py; None = the launcher's choice).
    """
    num_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    if num_tokens == 0:
        empty = torch.empty(0, device=device, dtype=torch.float32)
        return empty, empty.clone(), empty.clone() if with_entropy else None

    cfg = config or _config(num_tokens, hidden.dtype, _FORWARD_CONFIG, _FORWARD_CONFIG_FEW_TOKENS)
    num_pid_m = triton.cdiv(num_tokens, cfg.block_m)
    num_tiles_v = triton.cdiv(vocab, cfg.block_v)
    splits = min(num_tiles_v, max(1, _PROGRAMS_PER_SM * _num_sms(device) // num_pid_m))
    # Whole tiles per split, recounted so that no split is empty.
    v_per_split = triton.cdiv(num_tiles_v, splits) * cfg.block_v
    splits = triton.cdiv(vocab, v_per_split)

    part = torch.empty(4 if with_entropy else 3, splits, num_tokens, device=device, dtype=torch.float32)
    _forward_kernel[(num_pid_m, splits)](
        hidden, weight, bias, targets,
        part_max_ptr=part[0], part_sum_ptr=part[1], part_tgt_ptr=part[2],
        part_ez_ptr=part[3] if with_entropy else None,
        M=num_tokens, V=vocab, D=dim, v_per_split=v_per_split,
        inv_temp=1.0 / temperature, softcap=None if softcap is None else float(softcap),
        BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )

    # Merge the per-split online-softmax states: O(splits · M) work.
    row_max = part[0].amax(0)
    weights = torch.exp(part[0] - row_max)
    total = (part[1] * weights).sum(0)
    lse = row_max + torch.log(total)
    logp = part[2].sum(0) - lse
    ez = (part[3] * weights).sum(0) / total if with_entropy else None
    return logp, lse, ez


def backward(hidden, weight, bias, targets, lse, coef_a, coef_b, coef_c=None, *, temperature=1.0,
             softcap=None, need_hidden=True, need_weight=True, need_bias=True, filter_eps=None, config=None,
             scheme="atomic", stored_bytes=None):
    """Gradients (d hidden [M, D] | None, d weight [V, D] | None, d bias [V] | None) in the input dtypes.

    lse, coef_a, coef_b, coef_c: [M] fp32 (coef_c None when no entropy gradient).
    `filter_eps`: skip (token block, vocab block) tiles whose every probability is below filter_eps and that
    hold no counted target (None = exact gradient). `config`: a `_Config` tile to launch with instead of the
    shipped one (for benchmarks/tile_sweep.py; None = the launcher's choice).
    `scheme`: "atomic" (the kernel adds each tile's dz·W and dzᵀ·h into fp32 gradients with atomics) or "stored"
    (the kernel writes da for a chunk of tokens to a [chunk, V] buffer of about `stored_bytes`, default
    STORED_BYTES, at least one token block; two torch GEMMs form the gradients in the input dtype, d weight
    accumulating over the chunks there, as Liger-Kernel does: no fp32 [V, D] buffer).
    """
    if scheme not in ("atomic", "stored"):
        raise ValueError(f"scheme must be 'atomic' or 'stored', got {scheme!r}")
    if stored_bytes is not None and stored_bytes <= 0:
        raise ValueError(f"stored_bytes must be positive, got {stored_bytes}")
    num_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    need_bias = need_bias and bias is not None
    stored = scheme == "stored"
    d_hidden = (torch.empty_like(hidden) if stored else
                torch.zeros(num_tokens, dim, device=device, dtype=torch.float32)) if need_hidden else None
    d_weight = torch.zeros(vocab, dim, device=device, dtype=weight.dtype if stored else torch.float32) \
        if need_weight else None
    d_bias = torch.zeros(vocab, device=device, dtype=torch.float32) if need_bias else None

    if num_tokens > 0 and (need_hidden or need_weight or need_bias):
        cfg = config or _config(num_tokens, hidden.dtype, _BACKWARD_CONFIG, _BACKWARD_CONFIG_FEW_TOKENS)
        launch = functools.partial(
            _launch_backward, weight=weight, bias=bias, coef_c=coef_c, d_bias=d_bias, cfg=cfg,
            inv_temp=1.0 / temperature, softcap=None if softcap is None else float(softcap),
            filter_eps=None if filter_eps is None else float(filter_eps))
        if not stored:
            launch(hidden, targets, lse, coef_a, coef_b, slice(None), d_hidden=d_hidden, d_weight=d_weight)
        elif need_hidden or need_weight:
            # The interpreter computes in fp32 and rounds to bf16 itself: its bf16 buffer is fp32.
            buffer_dtype = torch.float32 if _INTERPRET and hidden.dtype == torch.bfloat16 else hidden.dtype
            per_token = vocab * torch.empty(0, dtype=buffer_dtype).element_size()
            budget = STORED_BYTES if stored_bytes is None else stored_bytes
            chunk = max(cfg.block_m, budget // per_token // cfg.block_m * cfg.block_m)
            buffer = torch.empty(min(chunk, num_tokens), vocab, device=device, dtype=buffer_dtype)
            for start in range(0, num_tokens, chunk):
                rows = slice(start, min(start + chunk, num_tokens))
                da = buffer[: rows.stop - start]
                launch(hidden, targets, lse, coef_a, coef_b, rows, da=da)
                da = da.to(hidden.dtype)
                if need_hidden:
                    torch.mm(da, weight, out=d_hidden[rows])
                if need_weight:
                    d_weight.addmm_(da.t(), hidden[rows])
            del buffer
        else:  # only d bias: the atomic scheme has nothing else to do
            launch(hidden, targets, lse, coef_a, coef_b, slice(None))

    if d_hidden is not None:
        d_hidden = d_hidden.to(hidden.dtype)
    if d_weight is not None:
        d_weight = d_weight.to(weight.dtype)
    if d_bias is not None:
        d_bias = d_bias.to(bias.dtype)
    return d_hidden, d_weight, d_bias


def _launch_backward(hidden, targets, lse, coef_a, coef_b, rows, *, weight, bias, coef_c, d_bias, cfg, inv_temp,
                     softcap, filter_eps, d_hidden=None, d_weight=None, da=None):
    """One backward launch over the tokens `rows` (a slice) of the per-token inputs."""
    hidden, targets = hidden[rows], targets[rows]
    num_tokens, vocab = hidden.shape[0], weight.shape[0]
    grid = (triton.cdiv(num_tokens, cfg.block_m) * triton.cdiv(vocab, cfg.block_v),)
    _backward_kernel[grid](
        hidden, weight, bias, targets, lse[rows].contiguous(), coef_a[rows].contiguous(), coef_b[rows].contiguous(),
        coef_c_ptr=None if coef_c is None else coef_c[rows].contiguous(),
        d_hidden_ptr=d_hidden, d_weight_ptr=d_weight, d_bias_ptr=d_bias, da_ptr=da,
        M=num_tokens, V=vocab, D=hidden.shape[1], inv_temp=inv_temp, softcap=softcap, filter_eps=filter_eps,
        GROUP_M=_BACKWARD_GROUP_M,
        BLOCK_M=cfg.block_m, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
