"""Element-wise Triton helpers shared by the tile kernels (`triton_logprobs`) and the row kernels (`triton_rows`)."""
import triton
import triton.language as tl


@triton.jit
def tanh(x):
    # tl has no tanh in every supported Triton version; this form never overflows.
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def round_to_bf16(x):
    # Round-to-nearest-even to bf16, kept in fp32 (the interpreter's fp32 -> bf16 cast truncates).
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)
