"""The benchmark harness itself: a tiny case end to end, output files, wrong results flagged."""
import json

import torch

from benchmarks import harness, run


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
