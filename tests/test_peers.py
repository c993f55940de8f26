"""Peer adapters of the benchmark harness compute exactly the reference's function, or say why they are skipped."""
import importlib.util
import sys

import pytest
import torch

from benchmarks import peers
from benchmarks.harness import Case, implementations, max_rel_error
from epa_kernels import preference_loss, reference

CPU = torch.device("cpu")
PEERS = ("reference-compile", "liger", "cce", "cce-torch-compile", "trl")
PACKAGE = {"liger": "liger_kernel", "cce": "cut_cross_entropy", "cce-torch-compile": "cut_cross_entropy", "trl": "trl"}
CASES = ("logprobs", "dpo", "epa-1+2")


def small_case(kind, tokens=64):
    return Case.parse(kind, tokens=tokens, hidden=16, vocab=300, seqs=12 if kind.startswith("epa") else 8)


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
