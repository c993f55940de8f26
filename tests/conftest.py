"""Shared fixtures: backend parametrisation, the 2×-reference error rule, output poisoning."""
import os
import zlib
from collections import Counter

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when there is no GPU. It must be set
# before triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import epa_kernels  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FUSED_BACKENDS = ("triton", "native", "torch")  # gemm: tests/test_gemm_*.py (sizes where bf16 logits average out)

# Slack added to 2× the same-dtype reference error, relative to the fp64 value's norm.
SLACK = {torch.float32: 1e-6, torch.bfloat16: 1e-4, torch.float16: 1e-5}


_draws = Counter()


def fresh_seed() -> int:
    """A new fixed seed for each draw of the running test: its node id and draw number hashed, so every run of a
    test draws the same inputs. Printed (pytest shows it with a failure) so a failure reproduces."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
    _draws[test] += 1
    seed = zlib.crc32(f"{test}#{_draws[test]}".encode()) % 2**31
    print(f"seed {seed} ({test}, draw {_draws[test]})")
    return seed


def pytest_collection_modifyitems(config, items):
    run_slow = os.environ.get("EPA_RUN_SLOW") == "1"
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: set EPA_RUN_SLOW=1 to run"))
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


def backend_param(name):
    """A pytest param for a fused backend, skipped with the reason when it is unavailable here."""
    info = epa_kernels.backends()[name]
    marks = [] if info.available else [pytest.mark.skip(reason=f"{name} unavailable: {info.detail}")]
    if name == "native" and DEVICE.type != "cpu":
        marks = [pytest.mark.skip(reason="native runs on CPU tensors")]
    return pytest.param(name, marks=marks, id=name)


BACKEND_PARAMS = [backend_param(name) for name in FUSED_BACKENDS]


def assert_matches_reference(name, fused, ref_same_dtype, ref_fp64):
    """The flash-attn / CCE rule: |fused − fp64| ≤ 2·|reference_in_dtype − fp64| + slack (L2 norms)."""
    assert fused is not None, f"{name}: missing"
    assert fused.shape == ref_fp64.shape, f"{name}: shape {tuple(fused.shape)} != {tuple(ref_fp64.shape)}"
    fused64 = fused.detach().double().cpu()
    truth = ref_fp64.detach().double().cpu()
    assert torch.isfinite(fused64).all(), f"{name}: non-finite values"
    err = (fused64 - truth).norm().item()
    ref_err = (ref_same_dtype.detach().double().cpu() - truth).norm().item()
    slack = SLACK.get(ref_same_dtype.dtype, SLACK[torch.float32]) * (truth.norm().item() + 1.0)
    assert err <= 2 * ref_err + slack, f"{name}: error {err:.3e} > 2 × reference error {ref_err:.3e} + {slack:.1e}"


@pytest.fixture
def poison_allocations(monkeypatch):
    """Fill Python-side torch.empty/empty_like allocations with NaN so an unwritten output shows."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(tensor):
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
        return tensor

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(real_empty_like(*a, **k)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The training program's test data: a saved tiny model and a data set (tests/training_fixtures.py)."""
    from training_fixtures import make_workdir

    return make_workdir(tmp_path_factory.mktemp("epa-program"))
