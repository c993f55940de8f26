"""`gemm` backend of the fused LM-head log-prob op: library GEMMs (cuBLAS on CUDA) plus fused row kernels.

Same math as the kernel contract in `torch_logprobs` (hidden [M, D], weight [V, D], bias [V], targets [M]):
z = softcap((h · Wᵀ + b) / T); forward logp = z[y] − lse, lse, ez = Σ softmax(z)·z; backward dz from the per-token
coefficients a, b, c, chained through the softcap and the temperature into d hidden, d weight, d bias.

Why: tile kernels that run the GEMMs themselves reached 3× the time of the four GEMMs on an H200, while cuBLAS
runs the GEMMs at the floor. Here the GEMMs are torch's, in the input dtype (bf16 logits out of an fp32
accumulation, as a model's own LM head computes them), over chunks sized by a memory budget (`gemm_plan`), and
everything else happens in one row pass per chunk that reads each logit once (`triton_rows` on CUDA, its torch
twin `torch_rows` elsewhere). Per chunk:

    forward   a = h · Wᵀ (+ b)                 GEMM (addmm), [n, V] or [N, c] in the input dtype
              row pass: online lse, target logit, ez; only per-token fp32 floats survive
    backward  a = h · Wᵀ (+ b) again            GEMM, unless the forward's logits were kept
              row pass: da over a, in place     (softcap and temperature chain inside, fp32 math)
              d hidden[rows] = da · W           token chunks: written once; vocab chunks: accumulated
              d weight[cols] = daᵀ · h          token chunks: accumulated; vocab chunks: written once
              d bias = Σ_rows da                fp32, cast at the end

Sums over chunks. d weight over token chunks: addmm_ into the gradient itself, in the input dtype (each chunk's
product accumulated in fp32 inside the GEMM, the running sum rounded once per chunk, as Liger-Kernel does), or
into an fp32 [V, D] buffer with `fp32_accumulation=True`. d hidden over vocabulary chunks: always into an fp32
[N, D] buffer (for half-precision inputs), because there the target's one-hot term lands in one chunk and every
later chunk would re-round the whole sum. On CPU (N = 256, D = 64, V = 2000, three seeds) bf16 sums of d hidden
gave 1.9× (16 chunks) and 3.6× (63 chunks) the error of the bf16 reference, past the 2× standard, fp32 sums 1.15×;
bf16 sums of d weight over 16 and 64 token chunks gave 1.5× and 1.7×.

Kept logits: when N·V·s fits the budget and a gradient is needed, the forward returns its [N, V] logits and the
backward overwrites them in place with da (the custom op declares that mutation: `ops/library.py`), so a full
pass runs three GEMMs of N·D·V instead of four.

Expectation on a GPU (an estimate from the traffic, not a measurement): the GEMMs at cuBLAS speed, their own
writes and reads of the logits hidden under their compute, plus what the row passes move outside them: 3·N·V·s
bytes (the forward reads the logits; the backward reads them and writes da), one more read with a bias. At
N = 8192, V = 128256, D = 4096, bf16 that is 6.3 GB, about 1.3 ms at an H200's 4.8 TB/s, against 34 TFLOP of four
GEMMs (about 35 ms at its 989 TFLOP/s dense bf16 peak): a few percent over the GEMMs, and a fourth fewer GEMM
flops with kept logits. Chunks add, each after the first: token chunks one more pass of W through the GEMMs and a
read-modify-write of d weight [V, D] in the addmm_; vocabulary chunks one more pass of hidden and the fp32 d hidden
sum (12·N·D bytes, 0.4 GB here): why vocabulary chunks are expected to win at N < V.
"""
from __future__ import annotations

import torch

from epa_kernels.ops import torch_rows
from epa_kernels.ops.gemm_plan import ChunkPlan, plan_chunks
from epa_kernels.ops.torch_rows import RowState


def default_rows(device: torch.device) -> str:
    """Which row kernels run on `device`: Triton on CUDA (where installed), the torch twin elsewhere."""
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch"
        return "triton"
    return "torch"


def _row_kernels(device: torch.device, rows: str | None):
    rows = rows or default_rows(device)
    if rows == "triton":
        from epa_kernels.ops import triton_rows  # imported on first use: Triton is optional

        return triton_rows
    if rows == "torch":
        return torch_rows
    raise ValueError(f"rows must be 'triton' or 'torch', got {rows!r}")


def _logits_into(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """out = hidden · weightᵀ (+ bias): one GEMM in the input dtype, bias added in its epilogue."""
    if bias is None:
        torch.mm(hidden, weight.t(), out=out)
    else:
        torch.addmm(bias, hidden, weight.t(), out=out)


def _chunk_view(buffer: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The first rows·cols elements of the flat buffer as a contiguous [rows, cols] matrix (a GEMM's output)."""
    return buffer[: rows * cols].view(rows, cols)


class _Sum:
    """A gradient summed over chunks, total += a · b: into the gradient itself in its dtype (the first chunk
    writes, the next ones addmm_), or into an fp32 buffer (`fp32`, for half-precision inputs only)."""

    def __init__(self, like: torch.Tensor, fp32: bool):
        self.dtype = like.dtype
        self.fp32 = fp32 and like.dtype != torch.float32
        self.total = torch.empty(like.shape, device=like.device, dtype=torch.float32 if self.fp32 else like.dtype)
        self.started = False

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if self.fp32:  # each chunk's product rounded once to the input dtype, the sum kept in fp32
            product = torch.mm(a, b)
            if self.started:
                self.total.add_(product)
            else:
                self.total.copy_(product)
        elif not self.started:
            torch.mm(a, b, out=self.total)
        else:
            self.total.addmm_(a, b)
        self.started = True

    def result(self) -> torch.Tensor:
        return self.total.to(self.dtype)


def forward(hidden, weight, bias, targets, *, temperature=1.0, softcap=None, with_entropy=False, memory_budget=None,
            chunking="auto", keep_logits=False, rows=None):
    """hidden [M, D], weight [V, D], bias [V] | None, targets [M] int64 in [0, V).

    Returns the contract's (logp [M], lse [M], ez [M] | None), all fp32, plus the logits [M, V] in the input dtype
    when `keep_logits` (a backward follows) and they fit `memory_budget` (else None). `chunking`: "auto",
    "tokens" or "vocab" (`gemm_plan`); `rows`: "triton" or "torch" row kernels (None: `default_rows`).
    """
    num_tokens, vocab = hidden.shape[0], weight.shape[0]
    plan = plan_chunks(num_tokens, vocab, hidden.element_size(), memory_budget, chunking, keep_logits)
    kernels = _row_kernels(hidden.device, rows)
    options = {"inv_temp": 1.0 / temperature, "softcap": softcap}
    state = RowState.fresh(num_tokens, hidden.device, with_entropy)
    buffer = hidden.new_empty(plan.buffer_bytes // plan.itemsize)
    for start, stop in plan.ranges():
        if plan.chunking == "tokens":
            logits = _chunk_view(buffer, stop - start, vocab)
            _logits_into(logits, hidden[start:stop], weight, bias)
            kernels.forward_rows(logits, targets[start:stop], 0, state.rows(start, stop), **options)
        else:
            logits = _chunk_view(buffer, num_tokens, stop - start)
            _logits_into(logits, hidden, weight[start:stop], None if bias is None else bias[start:stop])
            kernels.forward_rows(logits, targets, start, state, **options)
    return (*state.finish(), buffer.view(num_tokens, vocab) if plan.keep else None)


def backward(hidden, weight, bias, targets, lse, coef_a, coef_b, coef_c=None, *, temperature=1.0, softcap=None,
             need_hidden=True, need_weight=True, need_bias=True, logits=None, memory_budget=None, chunking="auto",
             fp32_accumulation=False, rows=None):
    """Gradients (d hidden [M, D] | None, d weight [V, D] | None, d bias [V] | None) in the input dtypes.

    lse, coef_a, coef_b, coef_c: [M] fp32 (coef_c None when no entropy gradient). `logits`: the forward's kept
    logits [M, V], overwritten here (None: recompute them chunk by chunk under `memory_budget` and `chunking`).
    `fp32_accumulation`: sum d weight over token chunks in fp32 instead of the input dtype (d hidden is always
    summed over vocabulary chunks in fp32).
    """
    num_tokens, vocab = hidden.shape[0], weight.shape[0]
    need_bias = need_bias and bias is not None
    if not (need_hidden or need_weight or need_bias):
        return None, None, None
    if logits is not None:
        plan = ChunkPlan("tokens", num_tokens, num_tokens, vocab, hidden.element_size(), keep=True)
        buffer = logits.view(-1)
    else:
        plan = plan_chunks(num_tokens, vocab, hidden.element_size(), memory_budget, chunking)
        buffer = hidden.new_empty(plan.buffer_bytes // plan.itemsize)
    kernels = _row_kernels(hidden.device, rows)
    options = {"inv_temp": 1.0 / temperature, "softcap": softcap}
    by_tokens = plan.chunking == "tokens"
    # Written once per chunk: d hidden by token chunks, d weight by vocabulary chunks; the other one is summed.
    d_hidden = (torch.empty_like(hidden) if by_tokens else _Sum(hidden, True)) if need_hidden else None
    d_weight = (_Sum(weight, fp32_accumulation) if by_tokens else torch.empty_like(weight)) if need_weight else None
    d_bias = torch.zeros(vocab, device=weight.device, dtype=torch.float32) if need_bias else None
    for start, stop in plan.ranges():
        if by_tokens:
            h, tokens = hidden[start:stop], slice(start, stop)
            da = _chunk_view(buffer, stop - start, vocab)
            if logits is None:
                _logits_into(da, h, weight, bias)
            kernels.backward_rows(da, targets[tokens], 0, lse[tokens], coef_a[tokens], coef_b[tokens],
                                  None if coef_c is None else coef_c[tokens], **options)
            if need_hidden:
                torch.mm(da, weight, out=d_hidden[tokens])
            if need_weight:
                d_weight.add(da.t(), h)
            if need_bias:
                d_bias += da.sum(0, dtype=torch.float32)
        else:
            w = weight[start:stop]
            da = _chunk_view(buffer, num_tokens, stop - start)
            _logits_into(da, hidden, w, None if bias is None else bias[start:stop])
            kernels.backward_rows(da, targets, start, lse, coef_a, coef_b, coef_c, **options)
            if need_hidden:
                d_hidden.add(da, w)
            if need_weight:
                torch.mm(da.t(), hidden, out=d_weight[start:stop])
            if need_bias:
                d_bias[start:stop] = da.sum(0, dtype=torch.float32)
    del buffer, da  # the logits buffer goes before the casts below allocate
    if isinstance(d_hidden, _Sum):
        d_hidden = d_hidden.result()
    if isinstance(d_weight, _Sum):
        d_weight = d_weight.result()
    return d_hidden, d_weight, None if d_bias is None else d_bias.to(bias.dtype)
