"""Bad input fails with a clear ValueError/TypeError that names the argument (DESIGN §5)."""
import os

import pytest
import torch

import epa_kernels


def good(**overrides):
    args = {
        "hidden": torch.randn(10, 8),
        "weight": torch.randn(50, 8),
        "targets": torch.randint(0, 50, (10,)),
        "bias": None,
        "cu_seqlens": torch.tensor([0, 4, 10], dtype=torch.int32),
    }
    args.update(overrides)
    return args


def call(**overrides):
    args = good(**overrides)
    extra = {k: args.pop(k) for k in list(args) if k not in ("hidden", "weight", "targets", "bias")}
    return epa_kernels.linear_logprobs(args["hidden"], args["weight"], args["targets"], args["bias"], **extra)


CASES = [
    # (overrides, exception, text the message must contain)
    ({"hidden": torch.randn(10)}, ValueError, "hidden"),
    ({"hidden": [[1.0]]}, TypeError, "hidden"),
    ({"hidden": torch.randn(10, 8, dtype=torch.float64)}, TypeError, "hidden"),
    ({"weight": torch.randn(50, 8, 1)}, ValueError, "weight"),
    ({"weight": torch.randn(50, 9)}, ValueError, "weight"),
    ({"weight": torch.randn(50, 8).half()}, TypeError, "weight dtype"),
    ({"targets": torch.randint(0, 50, (9,))}, ValueError, "targets"),
    ({"targets": torch.rand(10)}, TypeError, "targets"),
    ({"targets": torch.full((10,), 50)}, ValueError, "targets must be in [0, 50)"),
    ({"targets": torch.full((10,), -3)}, ValueError, "ignore_index"),
    ({"bias": torch.randn(49)}, ValueError, "bias"),
    ({"bias": torch.randn(50).half()}, TypeError, "bias"),
    ({"cu_seqlens": torch.tensor([0, 6, 4, 10])}, ValueError, "non-decreasing"),
    ({"cu_seqlens": torch.tensor([1, 4, 10])}, ValueError, "cu_seqlens must start at 0"),
    ({"cu_seqlens": torch.tensor([0, 4, 9])}, ValueError, "end at N = 10"),
    ({"cu_seqlens": torch.tensor([0])}, ValueError, "cu_seqlens"),
    ({"cu_seqlens": torch.tensor([0.0, 10.0])}, TypeError, "cu_seqlens"),
    ({"reduction": "avg"}, ValueError, "reduction"),
    ({"backend": "cuda"}, ValueError, "backend"),
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"temperature": float("nan")}, ValueError, "temperature"),
    ({"softcap": -1.0}, ValueError, "softcap"),
    ({"ignore_index": 1.5}, TypeError, "ignore_index"),
    ({"filter_eps": float("inf")}, ValueError, "filter_eps"),
    ({"filter_eps": 1e-3, "backend": "torch"}, ValueError, "computes the exact gradient"),
]


@pytest.mark.parametrize("overrides, error, text", CASES, ids=[f"{i}-{c[2][:20]}" for i, c in enumerate(CASES)])
def test_bad_input_is_rejected_clearly(overrides, error, text):
    with pytest.raises(error, match=None) as info:
        call(**overrides)
    assert text in str(info.value), str(info.value)


def test_cu_seqlens_with_padded_hidden():
    with pytest.raises(ValueError, match="cu_seqlens"):
        epa_kernels.linear_logprobs(
            torch.randn(2, 5, 8), torch.randn(50, 8), torch.randint(0, 50, (2, 5)), cu_seqlens=torch.tensor([0, 10])
        )


def test_padded_targets_shape():
    with pytest.raises(ValueError, match="targets"):
        epa_kernels.linear_logprobs(torch.randn(2, 5, 8), torch.randn(50, 8), torch.randint(0, 50, (10,)))


def test_required_backends_are_available():
    """`make test` names the backends this machine must have (EPA_REQUIRE_BACKENDS), so none is skipped silently."""
    required = os.environ.get("EPA_REQUIRE_BACKENDS", "").split()
    if not required:
        pytest.skip("EPA_REQUIRE_BACKENDS is unset (make test sets it): nothing is required here")
    available = epa_kernels.backends()
    unknown = sorted(set(required) - set(available))
    assert not unknown, f"EPA_REQUIRE_BACKENDS names unknown backends {unknown}"
    missing = {name: available[name].detail for name in required if not available[name].available}
    assert not missing, f"required backends unavailable: {missing}"


def test_native_backend_rejects_other_devices():
    from epa_kernels.dispatch import resolve_backend

    if not epa_kernels.backends()["native"].available:
        with pytest.raises(ValueError, match="native"):
            call(backend="native")
        return
    assert call(backend="native").shape == (2,)
    for device in ("cuda", "meta"):
        with pytest.raises(ValueError, match="runs on CPU tensors"):
            resolve_backend("native", torch.device(device))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    if not epa_kernels.backends()["triton"].available:
        pytest.skip("triton not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        call(backend="triton")


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "on", "0", "false", "", "2", "off"])
def test_one_reading_of_triton_interpret_and_it_is_tritons(monkeypatch, value):
    """dispatch and the Triton backend read TRITON_INTERPRET the way Triton itself does."""
    knobs = pytest.importorskip("triton.knobs", reason="Triton ≥ 3.4 exposes its reading as triton.knobs")
    from epa_kernels.ops import triton_interpreting

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert triton_interpreting() == bool(knobs.runtime.interpret)
