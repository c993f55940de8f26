"""How the `gemm` backend splits its work: a memory budget decides the chunks (no kernel here, no Triton needed).

The backend holds logits in the input dtype (itemsize s bytes) in one buffer at a time. That buffer is the extra
memory the budget bounds:

    kept      N·V·s ≤ budget and a gradient is needed: the forward's [N, V] logits are kept for the backward,
              which then skips their recompute (three GEMMs of N·D·V in all instead of four)
    tokens    [n, V] per chunk of n tokens; d weight accumulates over the N / n chunks
    vocab     [N, c] per chunk of c vocabulary rows; the forward's log-sum-exp runs online across the V / c
              chunks, the backward writes d weight[chunk] once and accumulates d hidden

n = budget // (V·s) and c = budget // (N·s), rounded down to a multiple of CHUNK_ALIGN (GEMM tile edges; rows of
the buffer 16-byte aligned) and never below MIN_CHUNK_TOKENS / MIN_CHUNK_VOCAB, so each GEMM stays large enough
for the tensor cores (then the buffer exceeds a smaller budget: `ChunkPlan.buffer_bytes` says by how much).
Not counted in the budget: the gradients themselves, O(N) fp32 per-token state, the fp32 d bias [V], the row
twin's bounded scratch (`torch_rows.SCRATCH_BYTES`), and the fp32 sums of half-precision gradients with a chunk's
product beside them (`gemm_logprobs`): an fp32 [N, D] and an [N, D] for vocabulary chunks (N·D·6 bytes in bf16,
192 MiB at N = 8192, D = 4096), an fp32 [V, D] and a [V, D] for token chunks only with fp32_accumulation (V·D·6
bytes, 3 GiB at Llama-3-8B's head).

"auto" takes a plan whose buffer fits the budget if either does, then the chunking that re-reads less of the
operand it does not split. Every token chunk after the first streams the whole head W [V, D] once more through
the GEMMs and read-modify-writes d weight [V, D]; every vocabulary chunk after the first does the same with hidden
[N, D] and d hidden [N, D]. For the same budget both make about N·V·s / budget chunks, so vocab wins when N < V
(every LM batch below the vocabulary size: Llama-3's 128k), tokens otherwise, and tokens when one chunk holds
every token. This is an expectation from the traffic; the GPU session measures both ("gemm-tokens", "gemm-vocab"
in the benchmarks).
"""
from __future__ import annotations

from dataclasses import dataclass

# 512 MiB: at Llama-3-8B's head (V = 128256, D = 4096, bf16) and N = 8192 that is 2048 tokens or 32768 vocabulary
# rows per chunk, four chunks either way; logits of up to 2048 such tokens are kept from the forward.
DEFAULT_MEMORY_BUDGET = 512 * 1024 * 1024
# [512, D] × [D, V] does ~512 flop per byte it moves (D, V ≫ 512): past an H100/H200's ~200 flop/byte ridge.
MIN_CHUNK_TOKENS = 512
# [N, D] × [D, c] with N, c ≥ 2048 likewise; fewer vocabulary chunks also mean fewer passes over d hidden.
MIN_CHUNK_VOCAB = 2048
CHUNK_ALIGN = 128
CHUNKINGS = ("auto", "tokens", "vocab")


@dataclass(frozen=True)
class ChunkPlan:
    """The chunks of one pass over N tokens × V vocabulary rows. `chunking` says which dimension the chunks
    split ("tokens": N, "vocab": V), `chunk` how many of it each holds (the last may hold fewer), `keep` whether
    the forward's logits (one chunk of all N tokens) are kept for the backward."""

    chunking: str
    chunk: int
    num_tokens: int
    vocab: int
    itemsize: int
    keep: bool = False

    @property
    def split(self) -> int:
        """The size of the dimension the chunks split."""
        return self.num_tokens if self.chunking == "tokens" else self.vocab

    @property
    def num_chunks(self) -> int:
        return -(-self.split // self.chunk)

    @property
    def buffer_shape(self) -> tuple[int, int]:
        """The logits buffer of the largest chunk: [chunk, V] or [N, chunk]."""
        return (self.chunk, self.vocab) if self.chunking == "tokens" else (self.num_tokens, self.chunk)

    @property
    def buffer_bytes(self) -> int:
        """The extra memory the plan holds: its logits buffer in the input dtype."""
        rows, cols = self.buffer_shape
        return rows * cols * self.itemsize

    def ranges(self):
        """(start, stop) of each chunk along the split dimension."""
        return [(start, min(start + self.chunk, self.split)) for start in range(0, self.split, self.chunk)]


def _chunk(total: int, fit: int, minimum: int) -> int:
    """Rows per chunk: as many as `fit` the budget, aligned, at least `minimum`, at most `total`."""
    if fit >= CHUNK_ALIGN:
        fit -= fit % CHUNK_ALIGN
    return max(1, min(total, max(fit, minimum)))


def plan_chunks(num_tokens: int, vocab: int, itemsize: int, memory_budget: int | None, chunking: str = "auto",
                keep_allowed: bool = False) -> ChunkPlan:
    """The plan of a pass over `num_tokens` × `vocab` logits of `itemsize` bytes under `memory_budget` bytes
    (None: DEFAULT_MEMORY_BUDGET). `keep_allowed`: a backward will follow, so the logits may be kept when they fit."""
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    if keep_allowed and num_tokens * vocab * itemsize <= budget:
        return ChunkPlan("tokens", num_tokens, num_tokens, vocab, itemsize, keep=True)
    by_tokens = ChunkPlan("tokens", _chunk(num_tokens, budget // (vocab * itemsize), MIN_CHUNK_TOKENS), num_tokens,
                          vocab, itemsize)
    by_vocab = ChunkPlan("vocab", _chunk(vocab, budget // (num_tokens * itemsize), MIN_CHUNK_VOCAB), num_tokens,
                         vocab, itemsize)
    if chunking == "auto":
        def cost(plan):  # over budget first, then rows of the unsplit operand re-read: W per token chunk, h per vocab
            return plan.buffer_bytes > budget, (plan.num_chunks - 1) * (vocab if plan is by_tokens else num_tokens)
        chunking = "vocab" if cost(by_vocab) < cost(by_tokens) else "tokens"
    return by_tokens if chunking == "tokens" else by_vocab
