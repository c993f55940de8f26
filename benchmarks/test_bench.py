"""pytest-benchmark suite (`make bench-pytest`): the main benchmark's cases as regression benchmarks.

Each implementation is checked against the reference on the same inputs before it is timed; one
that is unavailable here is skipped with its reason. Sizes: small on CPU, the issue's reference
size on CUDA. Compare runs with `pytest-benchmark compare`.
"""
import pytest
import torch

from benchmarks.harness import TOLERANCE, Case, full_pass, implementations, max_rel_error

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZES = (
    {"tokens": 8192, "hidden": 4096, "vocab": 128256, "dtype": "bfloat16"} if DEVICE.type == "cuda"
    else {"tokens": 1024, "hidden": 256, "vocab": 8000, "dtype": "float32"}
)
CASES = ["logprobs", "dpo", "epa-1+3+16"]
IMPLS = ["reference", "reference-compile", "triton", "native", "torch", "liger", "cce", "cce-torch-compile", "trl"]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case_name", CASES)
def test_full_pass(benchmark, case_name, impl):
    case = Case.parse(case_name, **SIZES)
    impls = implementations(DEVICE, case, {impl})
    fn = impls.get(impl, f"skipped: {impl} is not an implementation here")
    if isinstance(fn, str):
        pytest.skip(fn)
    inputs = case.inputs(DEVICE)
    output, grads = full_pass(fn, *inputs)
    expected, expected_grads = full_pass(impls["reference"], *inputs)
    error = max(max_rel_error(a, b) for a, b in zip((output, *grads), (expected, *expected_grads), strict=True))
    assert error <= TOLERANCE[case.dtype], f"{impl} differs from the reference: relative error {error:.2e}"
    del output, grads, expected, expected_grads

    def run():
        full_pass(fn, *inputs)
        _sync()

    benchmark.extra_info.update({**SIZES, "case": case.name, "flops": case.flops, "device": str(DEVICE)})
    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
