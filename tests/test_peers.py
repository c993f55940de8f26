"""Peer adapters of the benchmark harness compute exactly the reference's function, or say why they are skipped."""
import importlib.util
import sys

import pytest
import torch

from benchmarks import peers
from benchmarks.harness import Case, implementations, max_rel_error
from epa_kernels import preference_loss, reference

CPU = torch.device("cpu")
PEERS = ("reference-compile", "liger", "liger-per-token", "cce", "cce-torch-compile", "trl")
PACKAGE = {"liger": "liger_kernel", "liger-per-token": "liger_kernel", "cce": "cut_cross_entropy",
           "cce-torch-compile": "cut_cross_entropy", "trl": "trl"}
CASES = ("logprobs", "dpo", "epa-1+2")


def small_case(kind, tokens=64, softcap=None):
    return Case.parse(kind, tokens=tokens, hidden=16, vocab=300, seqs=12 if kind.startswith("epa") else 8,
                      softcap=softcap)


def outputs_and_grads(fn, inputs):
    hidden, weight, targets, cu_seqlens, upstream = inputs
    out = fn(hidden, weight, targets, cu_seqlens)
    return (out, *torch.autograd.grad(out, (hidden, weight), grad_outputs=upstream))


def expected(case, inputs):
    return outputs_and_grads(implementations(CPU, case)["reference"], inputs)


def peer_or_skip(name, case):
    if name in PACKAGE and importlib.util.find_spec(PACKAGE[name]) is None:
        pytest.skip(f"{PACKAGE[name]} not installed (pip install 'epa-kernels[bench]')")
    impl = peers.peer_implementations(CPU, case)[name]
    if isinstance(impl, str):
        assert impl.startswith("skipped: ") and len(impl) > len("skipped: ") + 10, impl
        pytest.skip(impl)
    return impl


@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("name", PEERS)
def test_peer_matches_reference(name, kind):
    case = small_case(kind)
    fn = peer_or_skip(name, case)
    inputs = case.inputs(CPU)
    got = outputs_and_grads(fn, inputs)
    want = expected(case, inputs)
    assert got[0].dtype == torch.float32 and got[0].shape == want[0].shape
    for what, a, b in zip(("output", "grad hidden", "grad weight"), got, want, strict=True):
        assert max_rel_error(a, b) < 1e-4, f"{name} {kind} {what}: relative error {max_rel_error(a, b):.2e}"


@pytest.mark.parametrize("name", PEERS)
def test_peer_uneven_sequences_and_ignored_tokens(name):
    """The last sequence longer (N not a multiple of S), some targets ignore_index: DPO still matches."""
    case = small_case("dpo", tokens=70)
    fn = peer_or_skip(name, case)
    hidden, weight, targets, cu_seqlens, upstream = case.inputs(CPU)
    targets = targets.clone()
    targets[::7] = -100
    groups, ref_logps, options = case.loss_arguments(CPU)

    def want_fn(h, w, t, cu):
        return preference_loss(reference.linear_logprobs(h, w, t, cu_seqlens=cu), ref_logps, groups, **options)[0]

    inputs = (hidden, weight, targets, cu_seqlens, upstream)
    for a, b in zip(outputs_and_grads(fn, inputs), outputs_and_grads(want_fn, inputs), strict=True):
        assert max_rel_error(a, b) < 1e-4


@pytest.mark.parametrize("kind", CASES)
def test_every_peer_is_callable_or_a_skip_reason(kind):
    impls = peers.peer_implementations(CPU, small_case(kind))
    assert set(impls) == set(PEERS)
    for name, impl in impls.items():
        assert callable(impl) or (isinstance(impl, str) and impl.startswith("skipped: ") and len(impl) > 20), name


def test_cuda_only_and_missing_loss_peers_are_skipped_on_cpu():
    logprobs, dpo, epa = (peers.peer_implementations(CPU, small_case(kind)) for kind in CASES)
    assert "CUDA" in logprobs["cce"] and "CUDA" in dpo["cce"]
    if importlib.util.find_spec("liger_kernel") is not None:
        assert "CUDA" in logprobs["liger"]
    assert "multi-negative" in epa["liger"]
    assert all("CUDA sm_90" in impls["liger-per-token"] for impls in (logprobs, dpo, epa))


@pytest.mark.parametrize("kind", ["logprobs", "dpo"])
@pytest.mark.parametrize("name", PEERS)
def test_peer_softcap_matches_the_fp64_reference_or_is_skipped_saying_why(name, kind):
    """With a softcap that bites (c = 0.8 on logits ~ N(0, 1)) a peer either applies it, matching the float64
    reference, or is skipped with a reason (CUDA-only here, or no softcap)."""
    case = small_case(kind, tokens=70, softcap=0.8)
    fn = peer_or_skip(name, case)
    inputs = case.inputs(CPU)
    hidden, weight, targets, cu_seqlens, upstream = inputs
    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    want = reference.linear_logprobs(h, w, targets, cu_seqlens=cu_seqlens, softcap=0.8)
    if kind != "logprobs":
        groups, ref_logps, options = case.loss_arguments(CPU)
        want = preference_loss(want, ref_logps.double(), groups, **options)[0]
    want = (want, *torch.autograd.grad(want, (h, w), grad_outputs=upstream.double()))
    for what, a, b in zip(("output", "grad hidden", "grad weight"), outputs_and_grads(fn, inputs), want, strict=True):
        assert max_rel_error(a, b) < 1e-5, f"{name} {kind} {what}: relative error {max_rel_error(a, b):.2e}"


def test_softcap_skips_name_the_softcap():
    if importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger_kernel not installed")
    dpo = peers.peer_implementations(CPU, small_case("dpo", softcap=30.0))
    assert "softcap" in dpo["liger"] and "softcap" in dpo["liger-per-token"]


@pytest.mark.parametrize("kind", CASES)
def test_liger_per_token_adapter_matches_reference(kind):
    """The liger-per-token adapter (timed only on sm_90's kernel) computes the reference's function: checked through
    the PyTorch fallback Liger dispatches to on CPU, with ignored tokens and uneven sequences."""
    if importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger_kernel not installed")
    case = small_case(kind, tokens=70)
    fn = peers._liger_per_token(CPU, case, peers._loss_head(case, CPU), allow_fallback=True)
    assert callable(fn), fn
    hidden, weight, targets, cu_seqlens, upstream = case.inputs(CPU)
    targets = targets.clone()
    targets[::7] = -100
    inputs = (hidden, weight, targets, cu_seqlens, upstream)
    for a, b in zip(outputs_and_grads(fn, inputs), expected(case, inputs), strict=True):
        assert max_rel_error(a, b) < 1e-5


def test_liger_has_a_per_token_op():
    """Liger 0.8.5's per-token op the adapter is written against: per-token NLL (+ entropy), no softcap argument."""
    if importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("liger_kernel not installed")
    import inspect

    from liger_kernel.ops.fused_linear_scaled_cross_entropy import LigerFusedLinearScaledCrossEntropyFunction

    params = list(inspect.signature(LigerFusedLinearScaledCrossEntropyFunction.apply).parameters)
    assert params[:5] == ["_input", "weight", "target", "temperature", "ignore_index"]
    assert "return_entropy" in params and "softcap" not in params


def test_missing_package_is_a_skip_naming_it(monkeypatch):
    for module in [m for m in sys.modules if m.split(".")[0] in ("trl", "cut_cross_entropy", "liger_kernel")]:
        monkeypatch.delitem(sys.modules, module)
    for module in ("trl", "cut_cross_entropy", "liger_kernel"):
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    impls = peers.peer_implementations(CPU, small_case("dpo"))
    assert impls["trl"].startswith("skipped: ") and "pip install trl" in impls["trl"]
    assert "pip install cut-cross-entropy" in impls["cce-torch-compile"]
    assert "pip install liger-kernel" in impls["liger"]
    assert callable(impls["reference-compile"]) or impls["reference-compile"].startswith("skipped: ")
