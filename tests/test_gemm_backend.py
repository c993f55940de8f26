"""The `gemm` backend (library GEMMs + row kernels, `epa_kernels/ops/gemm_logprobs.py`) against the fp64 reference
(DESIGN §5), on each of its three paths: logits kept from the forward, token chunks, vocabulary chunks.

Budgets here are set from the case so that chunks do not divide N or V, and the minimum chunk sizes are lowered to
1 (`small_chunks`) so that tiny shapes still split. The row work runs in the torch twin (CPU); the Triton row
kernels run through the same paths under the interpreter in `test_triton_rows_through_every_path`.
"""
import pytest
import torch
from conftest import assert_matches_reference, fresh_seed
from test_fused_loss import SEQS, STRONG, fp64_leaves, leaves, loss_kwargs, make_batch, unfused
from test_logprobs import make_case, outputs_and_grads, upcast

import epa_kernels
from epa_kernels import FusedLinearDPOLoss, fused_linear_preference_loss, reference
from epa_kernels.ops import gemm_logprobs, gemm_plan

PATHS = ["keep", "tokens", "vocab"]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(gemm_plan, "MIN_CHUNK_TOKENS", 1)
    monkeypatch.setattr(gemm_plan, "MIN_CHUNK_VOCAB", 1)


@pytest.fixture
def plans(monkeypatch):
    """The ChunkPlans the backend's forward and (recomputing) backward choose, in order."""
    seen = []
    real = gemm_logprobs.plan_chunks

    def recording(*args, **kwargs):
        seen.append(real(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(gemm_logprobs, "plan_chunks", recording)
    return seen


def ragged_third(total):
    """About a third of `total` (≥ 3) that does not divide it: 2 or 3 chunks, the last one shorter."""
    chunk = -(-total // 3)
    while total % chunk == 0:
        chunk += 1
    return chunk


def memory_for(path, num_tokens, vocab, itemsize):
    """Options that put a pass of num_tokens × vocab on `path`: exactly the logits' bytes (kept), or about a third
    of them (token chunks; vocabulary chunks, four of 256 after alignment at V = 1000)."""
    if path == "keep":
        return {"memory_budget": num_tokens * vocab * itemsize}
    if path == "tokens":
        return {"memory_budget": ragged_third(num_tokens) * vocab * itemsize, "chunking": "tokens"}
    return {"memory_budget": ragged_third(vocab) * num_tokens * itemsize, "chunking": "vocab"}


def counted(case):
    return int((case["targets"] != -100).sum())


def check(case, memory, **kwargs):
    """Values and gradients of linear_logprobs(backend="gemm", **memory) against the reference in the same dtype and
    in fp64 (conftest.assert_matches_reference), under a fixed random upstream gradient on every output."""
    with torch.no_grad():
        shapes = reference.linear_logprobs(case["hidden"], case["weight"], case["targets"], case["bias"],
                                           cu_seqlens=case["cu_seqlens"], **kwargs)
    shapes = [o for o in (shapes if isinstance(shapes, tuple) else [shapes]) if o is not None]
    upstream = [torch.randn(o.shape, dtype=torch.float64) for o in shapes]
    fused = outputs_and_grads(epa_kernels.linear_logprobs, case, upstream, backend="gemm", **memory, **kwargs)
    ref_x = outputs_and_grads(reference.linear_logprobs, case, upstream, **kwargs)
    ref64 = outputs_and_grads(reference.linear_logprobs, upcast(case), upstream, **kwargs)
    names = ["output"] * len(fused[0]) + ["d_hidden", "d_weight", "d_bias"][: len(fused[1])]
    for name, got, ref, truth in zip(names, fused[0] + fused[1], ref_x[0] + ref_x[1], ref64[0] + ref64[1],
                                     strict=True):
        assert got.dtype == (torch.float32 if name == "output" else ref.dtype), f"{name} dtype {got.dtype}"
        assert_matches_reference(name, got, ref, truth)
    return fused


def assert_path(plans, path, budget):
    forward = plans[0]
    assert forward.keep == (path == "keep")
    if path != "keep":
        assert forward.chunking == path and forward.num_chunks > 1, forward
        assert forward.split % forward.chunk, f"chunks divide the {path}: {forward}"
        assert plans[-1] == forward, "the backward recomputes with the forward's chunks"
    assert forward.buffer_bytes <= budget


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout,reduction", [("packed", "sum"), ("padded", "mean")])
def test_matches_reference(dtype, path, layout, reduction, small_chunks, plans, poison_allocations):
    """ignore_index runs, an empty and a fully ignored sequence (packed, cu_seqlens) or padding (padded)."""
    case = make_case(layout, dtype, bias=layout == "packed")
    memory = memory_for(path, counted(case), case["weight"].shape[0], case["hidden"].element_size())
    check(case, memory, reduction=reduction)
    assert_path(plans, path, memory["memory_budget"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", PATHS)
def test_every_logit_option_and_output(dtype, path, small_chunks, plans):
    """Temperature, softcap, bias; per-token log-probs, lse and entropy, each under its own upstream gradient."""
    case = make_case("packed", dtype, bias=True)
    memory = memory_for(path, counted(case), case["weight"].shape[0], case["hidden"].element_size())
    check(case, memory, reduction="none", temperature=0.7, softcap=5.0, return_lse=True, return_entropy=True)
    assert_path(plans, path, memory["memory_budget"])


@pytest.mark.parametrize("path", PATHS)
def test_single_token(path, small_chunks):
    case = make_case("packed", torch.float32, bias=True, lengths=[1])
    check(case, memory_for(path, 1, case["weight"].shape[0], 4), reduction="sum", return_lse=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", ["tokens", "vocab"])
def test_fp32_accumulation(dtype, path, small_chunks):
    """fp32_accumulation sums d weight over token chunks in fp32 and passes the same standard; it changes nothing
    for fp32 inputs, nor for vocabulary chunks (whose d hidden sum is always fp32)."""
    case = make_case("packed", dtype, bias=True)
    memory = memory_for(path, counted(case), case["weight"].shape[0], case["hidden"].element_size())
    seed = fresh_seed()  # of the upstream gradients: the same for both runs
    torch.manual_seed(seed)
    fp32 = check(case, {**memory, "fp32_accumulation": True}, reduction="sum", return_entropy=True)
    torch.manual_seed(seed)
    plain = check(case, memory, reduction="sum", return_entropy=True)
    same = dtype == torch.float32 or path == "vocab"
    assert same == all(torch.equal(a, b) for a, b in zip(fp32[0] + fp32[1], plain[0] + plain[1], strict=True))


@pytest.mark.parametrize("path, chunk", [("tokens", 1), ("vocab", 32)])
def test_many_chunks_in_bf16(path, chunk, small_chunks, plans):
    """Sums over many chunks stay within the standard: d hidden over 32 vocabulary chunks (always fp32 sums), d weight
    over one-token chunks with fp32_accumulation."""
    case = make_case("packed", torch.bfloat16, bias=True)
    width = case["weight"].shape[0] if path == "tokens" else counted(case)
    memory = {"memory_budget": chunk * width * 2, "chunking": path, "fp32_accumulation": path == "tokens"}
    check(case, memory, reduction="sum", return_lse=True)
    assert plans[0].chunk == chunk and plans[0].num_chunks >= 22, plans[0]


class GemmCount:
    """Counts the GEMMs of N·D·V-sized products the backend issues (torch.mm, torch.addmm, Tensor.addmm_)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        for owner, name in ((torch, "mm"), (torch, "addmm"), (torch.Tensor, "addmm_")):
            real = getattr(owner, name)
            monkeypatch.setattr(owner, name, self.wrap(real))

    def wrap(self, real):
        def counting(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)
        return counting


@pytest.mark.parametrize("path, frozen_head, gemms", [
    ("keep", False, 3), ("keep", True, 2), ("tokens", False, 12), ("vocab", False, 16), ("tokens", True, 9)])
def test_gemm_count_and_frozen_head(path, frozen_head, gemms, small_chunks, monkeypatch):
    """Kept logits: three GEMMs (forward, d hidden, d weight); recomputed: four per chunk (3 token chunks, 4 vocab
    chunks). A frozen head (weight without grad) computes no d weight: one GEMM less per chunk."""
    case = make_case("packed", torch.float32, bias=False)
    case["weight"].requires_grad_(not frozen_head)
    memory = memory_for(path, counted(case), case["weight"].shape[0], 4)
    seen = {}
    real_backward = gemm_logprobs.backward

    def spying(*args, **kwargs):
        seen.update(kwargs)
        result = real_backward(*args, **kwargs)
        seen["d_weight"] = result[1]
        return result

    monkeypatch.setattr(gemm_logprobs, "backward", spying)
    count = GemmCount(monkeypatch)
    out = epa_kernels.linear_logprobs(case["hidden"], case["weight"], case["targets"], cu_seqlens=case["cu_seqlens"],
                                      backend="gemm", **memory)
    (d_hidden,) = torch.autograd.grad(out.sum(), case["hidden"])
    assert count.calls == gemms
    assert seen["need_weight"] is not frozen_head and (seen["d_weight"] is None) == frozen_head
    expected = reference.linear_logprobs(case["hidden"], case["weight"], case["targets"],
                                         cu_seqlens=case["cu_seqlens"])
    torch.testing.assert_close(d_hidden, torch.autograd.grad(expected.sum(), case["hidden"])[0], rtol=1e-5,
                               atol=1e-6)


def test_kept_logits_switch_exactly_at_the_budget(plans, small_chunks):
    """Kept when the M counted tokens' logits fit: M·V·itemsize ≤ budget; never without a backward to come."""
    case = make_case("packed", torch.bfloat16)
    args = (case["hidden"], case["weight"], case["targets"])
    fits = counted(case) * case["weight"].shape[0] * 2
    for budget, keep in ((fits, True), (fits - 1, False)):
        epa_kernels.linear_logprobs(*args, cu_seqlens=case["cu_seqlens"], backend="gemm", memory_budget=budget)
        assert plans[-1].keep == keep and (keep or plans[-1].buffer_bytes <= budget), plans[-1]
    with torch.no_grad():
        epa_kernels.linear_logprobs(*args, cu_seqlens=case["cu_seqlens"], backend="gemm", memory_budget=fits)
    assert not plans[-1].keep


def test_forward_leaves_kept_logits_as_the_gemm_wrote_them():
    """The row work reads the kept logits without writing them, also in fp32 where .float() is no copy."""
    gen = torch.Generator().manual_seed(fresh_seed())
    hidden, weight, bias = torch.randn(7, 16, generator=gen), torch.randn(50, 16, generator=gen), torch.randn(50)
    targets = torch.randint(0, 50, (7,), generator=gen)
    *_, logits = gemm_logprobs.forward(hidden, weight, bias, targets, temperature=0.7, softcap=3.0,
                                       with_entropy=True, keep_logits=True)
    torch.testing.assert_close(logits, torch.addmm(bias, hidden, weight.t()), rtol=0, atol=0)


def test_second_backward_through_kept_logits_is_refused():
    """The backward overwrites the kept logits; a second one (retain_graph) must fail, not use a gradient as logits."""
    case = make_case("packed", torch.float32)
    out = epa_kernels.linear_logprobs(case["hidden"], case["weight"], case["targets"], cu_seqlens=case["cu_seqlens"],
                                      backend="gemm")
    torch.autograd.grad(out.sum(), case["hidden"], retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out.sum(), case["hidden"])


def check_loss(batch, kwargs, memory):
    """fused_linear_preference_loss(backend="gemm", **memory) against the unfused reference (test_fused_loss)."""
    loss, metrics = fused_linear_preference_loss(
        batch["hidden"], batch["weight"], batch["targets"], batch["groups"], bias=batch["bias"],
        cu_seqlens=batch["cu_seqlens"], ref_logps=batch["ref_logps"], backend="gemm", **memory, **kwargs)
    grads = torch.autograd.grad(loss, leaves(batch))
    ref_loss, _ = unfused(batch, "sum", kwargs, leaves(batch))
    ref_grads = torch.autograd.grad(ref_loss, leaves(batch))
    truth = fp64_leaves(batch)
    truth_loss, _ = unfused({k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}, "sum",
                            kwargs, truth)
    truth_grads = torch.autograd.grad(truth_loss, truth)
    assert_matches_reference("loss", loss.reshape(1), ref_loss.reshape(1), truth_loss.reshape(1))
    for name, got, ref, want in zip(("d_hidden", "d_weight", "d_bias"), grads, ref_grads, truth_grads, strict=True):
        assert_matches_reference(name, got, ref, want)
    assert metrics["policy_logps"].shape == (SEQS,)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("loss", ["epa", "dpo"])
def test_fused_losses(loss, path, dtype, small_chunks, plans):
    """EPA with strong and weak negatives (one weak negative shared by two prompts, one without counted tokens) and
    DPO, through the gemm backend on each path."""
    batch = make_batch(dtype)
    if loss == "dpo":
        batch["groups"][0, 2] = 2  # no padding in a pairwise loss's groups
    counted_tokens = int((batch["targets"] != -100).sum())
    memory = memory_for(path, counted_tokens, batch["weight"].shape[0], batch["hidden"].element_size())
    check_loss(batch, loss_kwargs(loss), memory)
    assert_path(plans, path, memory["memory_budget"])


def test_loss_options_reach_the_reference_pass_and_the_modules(small_chunks, plans):
    """The no-grad reference-model pass runs with the caller's chunking and keeps nothing; FusedLinearDPOLoss passes
    the options from its construction."""
    batch = make_batch()
    args = (batch["hidden"], batch["weight"], batch["targets"], batch["groups"])
    ref_hidden, ref_weight = batch["hidden"].detach() * 0.9, batch["weight"].detach() * 1.1
    budget = 64 * batch["hidden"].shape[0] * 4
    loss, _ = fused_linear_preference_loss(*args, cu_seqlens=batch["cu_seqlens"], ref_hidden=ref_hidden,
                                           ref_weight=ref_weight, backend="gemm", memory_budget=budget,
                                           chunking="vocab", beta=0.5, num_strong=STRONG)
    assert [(p.keep, p.chunking) for p in plans] == [(False, "vocab"), (False, "vocab")]
    ref_logps = reference.linear_logprobs(ref_hidden, ref_weight, batch["targets"], cu_seqlens=batch["cu_seqlens"])
    expected, _ = fused_linear_preference_loss(*args, cu_seqlens=batch["cu_seqlens"], ref_logps=ref_logps,
                                               backend="torch", beta=0.5, num_strong=STRONG)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)

    plans.clear()
    pairs = torch.randn(4, 3, batch["weight"].shape[1], requires_grad=True)  # 2 chosen, then 2 rejected
    targets = torch.randint(0, batch["weight"].shape[0], (4, 3))
    criterion = FusedLinearDPOLoss(beta=0.2, backend="gemm", memory_budget=3 * batch["weight"].shape[0] * 4,
                                   chunking="tokens", fp32_accumulation=True)
    criterion(pairs, batch["weight"], targets, ref_logps=torch.randn(4))[0].backward()
    assert [(p.keep, p.chunking, p.chunk) for p in plans] == [(False, "tokens", 3)] * 2


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("path, compiler", [("keep", "aot_eager"), ("vocab", "aot_eager"), ("keep", "inductor")])
def test_compiles_whole_and_matches_eager(path, compiler, small_chunks, fresh_dynamo):
    """fullgraph: no graph break; the kept logits' in-place gradient survives functionalization (inductor
    re-inplaces it). Compiled, every token reaches the kernel (ignored ones masked after)."""
    case = make_case("packed", torch.float32, bias=True)
    memory = memory_for(path, case["targets"].numel(), case["weight"].shape[0], 4)

    def f(hidden, weight, bias, targets, cu_seqlens):
        out = epa_kernels.linear_logprobs(hidden, weight, targets, bias, cu_seqlens=cu_seqlens, backend="gemm",
                                          return_entropy=True, **memory)
        return out.logps.sum() + 0.1 * out.entropy.sum()

    args = (case["hidden"], case["weight"], case["bias"], case["targets"], case["cu_seqlens"])
    got, expected = torch.compile(f, fullgraph=True, backend=compiler)(*args), f(*args)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(got, args[:3]), torch.autograd.grad(expected, args[:3]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# opcheck's AOT tests return every output of the op from the traced graph, the kept logits too, which the backward
# then overwrites: AOT's partitioner refuses a graph output mutated in the backward. Callers never return them;
# test_compiles_whole_and_matches_eager covers the AOT path end to end.
FORWARD_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


def test_ops_pass_opcheck():
    gen = torch.Generator().manual_seed(fresh_seed())
    hidden = torch.randn(12, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, requires_grad=True)
    bias = torch.randn(50, generator=gen, requires_grad=True)
    targets = torch.randint(0, 50, (12,), generator=gen)
    forward = torch.ops.epa_kernels.gemm_logprobs_forward.default
    for args in [(hidden, weight, bias, targets, 1.0, None, True, None, "auto", False, True),
                 (hidden, weight, None, targets, 0.7, 30.0, False, 64, "vocab", True, False)]:
        torch.library.opcheck(forward, args, test_utils=FORWARD_CHECKS)
    _, lse, _, logits = forward(hidden.detach(), weight.detach(), None, targets, 1.0, None, False, None, "auto",
                                False, True)
    assert logits.shape == (12, 50)
    coef = torch.randn(12, generator=gen)
    backward = torch.ops.epa_kernels.gemm_logprobs_backward.default
    for kept in (logits, logits.new_empty(0)):
        torch.library.opcheck(backward, (hidden.detach(), weight.detach(), None, targets, lse, coef, -coef, None,
                                         kept.clone(), 1.0, None, True, True, False, None, "auto", False))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("path", PATHS)
def test_triton_rows_through_every_path(dtype, path, small_chunks, plans, monkeypatch):
    """The Triton row kernels (interpreter on CPU) in place of the twin, end to end with every logit option."""
    if not epa_kernels.backends()["triton"].available:
        pytest.skip("triton not installed")
    monkeypatch.setattr(gemm_logprobs, "default_rows", lambda device: "triton")
    case = make_case("packed", dtype, bias=True, vocab=70, dim=16, lengths=[7, 13, 0, 11])
    memory = memory_for(path, counted(case), 70, case["hidden"].element_size())
    check(case, memory, reduction="none", temperature=0.7, softcap=5.0, return_lse=True, return_entropy=True)
    assert_path(plans, path, memory["memory_budget"])
