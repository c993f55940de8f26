"""The fused backends never hold [N, V] logits: peak memory above the inputs stays near the gradients' size."""
import pytest
import torch
from conftest import DEVICE, backend_param

from benchmarks.harness import Case, measure_peak_memory


@pytest.mark.skipif(DEVICE.type != "cpu", reason="CPU resident-set measurement")
@pytest.mark.parametrize("backend", [backend_param("native"), backend_param("torch")])
def test_peak_memory_is_independent_of_logits_size(backend):
    case = Case(tokens=8192, hidden=64, vocab=16000, seqs=4)  # logits: 500 MiB; gradients: 6 MiB
    gradients = (case.tokens + case.vocab) * case.hidden * 4
    logits = case.tokens * case.vocab * 4
    reference = measure_peak_memory("reference", case, torch.device("cpu"))
    fused = measure_peak_memory(backend, case, torch.device("cpu"))
    assert reference > logits, f"reference peak {reference / 2**20:.1f} MiB should exceed the logits' size"
    limit = gradients + 64 * 2**20  # the gradients + a bounded chunk workspace: an eighth of [N, V] here
    assert fused < limit, f"{backend} peak {fused / 2**20:.1f} MiB > {limit / 2**20:.1f} MiB"
