"""linear_logprobs on every fused backend against the materialised fp64 reference (DESIGN §5)."""
import pytest
import torch
from conftest import BACKEND_PARAMS, DEVICE, assert_matches_reference, fresh_seed

import epa_kernels
from epa_kernels import reference

VOCAB, DIM = 1000, 72  # multiples of no block size
LENGTHS = [1, 6, 0, 9, 4, 13]  # ragged, a length-1 and an empty sequence


def make_case(layout, dtype, *, bias=False, seed=None, vocab=VOCAB, dim=DIM, lengths=LENGTHS):
    """Fresh random inputs with ignore_index runs and one fully-ignored sequence (index 3)."""
    gen = torch.Generator().manual_seed(seed if seed is not None else fresh_seed())
    if layout == "packed":
        total = sum(lengths)
        targets = torch.randint(0, vocab, (total,), generator=gen)
        bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
        if len(lengths) > 3:
            targets[bounds[1] : bounds[1] + 2] = -100  # a prompt run at the start of sequence 1
            targets[bounds[3] : bounds[4]] = -100  # sequence 3 entirely ignored
        hidden = torch.randn(total, dim, generator=gen)
        cu_seqlens = bounds.to(torch.int32)
    else:
        batch, length = 4, 7
        targets = torch.randint(0, vocab, (batch, length), generator=gen)
        targets[0, :3] = -100  # prompt
        targets[1, 5:] = -100  # padding
        targets[2, :] = -100  # fully ignored row
        hidden = torch.randn(batch, length, dim, generator=gen)
        cu_seqlens = None
    weight = torch.randn(vocab, dim, generator=gen) / dim**0.5
    case = {
        "hidden": hidden.to(DEVICE, dtype).requires_grad_(),
        "weight": weight.to(DEVICE, dtype).requires_grad_(),
        "targets": targets.to(DEVICE),
        "bias": (torch.randn(vocab, generator=gen) * 0.5).to(DEVICE, dtype).requires_grad_() if bias else None,
        "cu_seqlens": None if cu_seqlens is None else cu_seqlens.to(DEVICE),
    }
    return case


def upcast(case):
    """The same inputs as float64 CPU leaves: the ground truth's inputs."""
    out = {}
    for key, value in case.items():
        if value is None or not value.is_floating_point():
            out[key] = None if value is None else value.cpu()
        else:
            out[key] = value.detach().double().cpu().requires_grad_()
    return out


def params(case):
    return [case[k] for k in ("hidden", "weight", "bias") if case[k] is not None]


def outputs_and_grads(fn, case, upstream, **kwargs):
    """Run fn, contract every output with its fixed random upstream gradient, return outputs + grads."""
    out = fn(case["hidden"], case["weight"], case["targets"], case["bias"], cu_seqlens=case["cu_seqlens"], **kwargs)
    outs = list(out) if isinstance(out, tuple) else [out]
    outs = [o for o in outs if o is not None]
    loss = sum((o.double().cpu() * g).sum() for o, g in zip(outs, upstream, strict=True))
    grads = torch.autograd.grad(loss, params(case))
    return outs, list(grads)


def check_against_reference(backend, case, **kwargs):
    """Compare values and gradients of the fused op (dtype X) with the reference in X and in fp64."""
    with torch.no_grad():
        shapes = reference.linear_logprobs(
            case["hidden"], case["weight"], case["targets"], case["bias"], cu_seqlens=case["cu_seqlens"], **kwargs
        )
    shapes = [o for o in (shapes if isinstance(shapes, tuple) else [shapes]) if o is not None]
    upstream = [torch.randn(o.shape, dtype=torch.float64) for o in shapes]
    fused = outputs_and_grads(epa_kernels.linear_logprobs, case, upstream, backend=backend, **kwargs)
    ref_x = outputs_and_grads(reference.linear_logprobs, case, upstream, **kwargs)
    ref64 = outputs_and_grads(reference.linear_logprobs, upcast(case), upstream, **kwargs)
    names = ["output"] * len(fused[0]) + ["d_hidden", "d_weight", "d_bias"][: len(fused[1])]
    columns = (names, fused[0] + fused[1], ref_x[0] + ref_x[1], ref64[0] + ref64[1])
    for name, got, ref, truth in zip(*columns, strict=True):
        assert got.dtype == (torch.float32 if name == "output" else ref.dtype), f"{name} dtype {got.dtype}"
        assert_matches_reference(name, got, ref, truth)
    return fused


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_fp32_matches_reference(backend, layout, reduction, poison_allocations):
    case = make_case(layout, torch.float32, bias=layout == "packed")
    check_against_reference(backend, case, reduction=reduction)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_half_precision_matches_reference(backend, dtype, layout, poison_allocations):
    case = make_case(layout, dtype, bias=True)
    check_against_reference(backend, case, reduction="sum")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_temperature_and_softcap(backend, dtype):
    case = make_case("packed", dtype, bias=True)
    check_against_reference(backend, case, reduction="mean", temperature=0.7, softcap=5.0)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_gradients_through_lse_and_entropy(backend, layout):
    """Upstream gradients on logps, lse and entropy at once (e.g. z-loss plus an entropy bonus)."""
    case = make_case(layout, torch.float32, bias=True)
    fused = check_against_reference(
        backend, case, reduction="none", temperature=1.3, softcap=8.0, return_lse=True, return_entropy=True
    )
    logps, lse, entropy = fused[0]
    ignored = (case["targets"] == -100).cpu()
    for name, value in (("logps", logps), ("lse", lse), ("entropy", entropy)):
        assert torch.all(value.detach().cpu()[ignored] == 0), f"{name} is not 0 at ignored positions"


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_entropy_only_and_lse_only(backend):
    case = make_case("packed", torch.float32)
    check_against_reference(backend, case, reduction="sum", return_entropy=True)
    check_against_reference(backend, case, reduction="sum", return_lse=True)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_ignored_tokens_get_exactly_zero(backend):
    case = make_case("packed", torch.float32)
    logps = epa_kernels.linear_logprobs(
        case["hidden"], case["weight"], case["targets"], cu_seqlens=case["cu_seqlens"], backend=backend
    )
    assert logps.shape == (len(LENGTHS),)
    assert logps[2].item() == 0.0 and logps[3].item() == 0.0  # empty and fully-ignored sequences
    (d_hidden,) = torch.autograd.grad(logps.sum(), case["hidden"])
    ignored = case["targets"] == -100
    assert torch.all(d_hidden[ignored] == 0) and torch.all(d_hidden[~ignored].abs().sum(-1) > 0)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_every_token_ignored(backend):
    case = make_case("padded", torch.float32, bias=True)
    case["targets"].fill_(-100)
    out = epa_kernels.linear_logprobs(
        case["hidden"], case["weight"], case["targets"], case["bias"], backend=backend, return_lse=True
    )
    assert torch.all(out.logps == 0) and torch.all(out.lse == 0) and out.lse.shape == case["targets"].shape
    grads = torch.autograd.grad(out.logps.sum(), params(case))
    assert all(torch.all(g == 0) for g in grads)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_single_token(backend, dtype):
    case = make_case("packed", dtype, bias=True, lengths=[1])
    check_against_reference(backend, case, reduction="sum")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_packed_without_cu_seqlens_is_one_sequence(backend):
    case = make_case("packed", torch.float32)
    case["cu_seqlens"] = None
    fused = check_against_reference(backend, case, reduction="sum")
    assert fused[0][0].shape == (1,)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_partial_requires_grad_and_int32_targets(backend):
    case = make_case("padded", torch.float32, bias=True)
    case["weight"].requires_grad_(False)
    case["targets"] = case["targets"].to(torch.int32)
    out = epa_kernels.linear_logprobs(case["hidden"], case["weight"], case["targets"], case["bias"], backend=backend)
    expected = reference.linear_logprobs(case["hidden"], case["weight"], case["targets"], case["bias"])
    torch.testing.assert_close(out, expected.float(), rtol=1e-4, atol=1e-4)
    d_hidden, d_bias = torch.autograd.grad(out.sum(), (case["hidden"], case["bias"]))
    e_hidden, e_bias = torch.autograd.grad(expected.sum(), (case["hidden"], case["bias"]))
    torch.testing.assert_close(d_hidden, e_hidden, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(d_bias, e_bias, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_non_contiguous_hidden(backend):
    hidden = torch.randn(DIM, 20, device=DEVICE).t().requires_grad_()  # [20, DIM], transposed view
    weight = torch.randn(VOCAB, DIM, device=DEVICE) / DIM**0.5
    targets = torch.randint(0, VOCAB, (20,), device=DEVICE)
    out = epa_kernels.linear_logprobs(hidden, weight, targets, reduction="none", backend=backend)
    torch.testing.assert_close(out, reference.linear_logprobs(hidden, weight, targets, reduction="none"))


def test_auto_backend_choice():
    case = make_case("padded", torch.float32)
    args = (case["hidden"], case["weight"], case["targets"])
    expected = reference.linear_logprobs(*args)
    torch.testing.assert_close(epa_kernels.linear_logprobs(*args, backend="auto"), expected, rtol=1e-5, atol=1e-4)
    available = epa_kernels.backends()
    assert available["torch"].available
    assert set(available) == {"triton", "native", "torch", "gemm"}


def test_torch_backend_chunks_by_tokens_within_a_memory_cap():
    """Chunks of ≥ 256 tokens (the head is re-read once per chunk), bounded in bytes beyond that."""
    from epa_kernels.ops.torch_logprobs import CHUNK_BYTES, MIN_CHUNK_TOKENS, _chunk_size

    assert _chunk_size(8192, 128256) == MIN_CHUNK_TOKENS == 256  # was 16: 512 reads of a 1 GB bf16 head
    assert _chunk_size(8192, 4000) * 4 * 4000 <= CHUNK_BYTES and _chunk_size(8192, 4000) > MIN_CHUNK_TOKENS
    assert _chunk_size(100, 128256) == 100 and _chunk_size(0, 50) == 1


def production_configs():
    from epa_kernels.ops import triton_logprobs as kernels

    names = ["_FORWARD_CONFIG", "_FORWARD_CONFIG_FEW_TOKENS", "_BACKWARD_CONFIG", "_BACKWARD_CONFIG_FEW_TOKENS",
             "_FP32_CONFIG"]
    return {name: getattr(kernels, name) for name in names}


@pytest.mark.skipif(DEVICE.type != "cpu", reason="on a GPU every test already runs the production configs")
@pytest.mark.parametrize("name", list(production_configs()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_production_config_runs_in_the_interpreter(name, dtype, monkeypatch):
    """The big GPU tiles, not only the interpreter's small one, on 130 tokens, D = 128, V = 300: ragged edges in
    every dimension, with bias, softcap and the entropy, forward and backward against the fp64 reference."""
    if not epa_kernels.backends()["triton"].available:
        pytest.skip("triton not installed")
    from epa_kernels.ops import triton_logprobs as kernels

    monkeypatch.setattr(kernels, "_INTERPRET_CONFIG", production_configs()[name])
    case = make_case("packed", dtype, bias=True, vocab=300, dim=128, lengths=[1, 50, 79])
    check_against_reference("triton", case, softcap=20.0, return_entropy=True)
