"""benchmarks/tile_sweep.py: the tiny grid runs end to end under the interpreter, every config is checked against the
fp32 reference, a broken or impossible config is reported and never chosen, and the outputs carry the environment."""
import json
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")

from benchmarks import tile_sweep as sweep  # noqa: E402
from epa_kernels.ops import triton_logprobs as kernels  # noqa: E402

if torch.cuda.is_available():
    pytest.skip("these tests run the dry run on CPU under the interpreter", allow_module_level=True)

NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
HAS_PTXAS = (NVIDIA_BIN / "ptxas").exists() and (NVIDIA_BIN / "cuobjdump").exists()
# Tiny shapes: one per regime, V and N not multiples of the tiles.
TINY = ["--tokens", "80", "8", "--hidden", "32", "--vocab", "100", "--grid", "tiny", "--samples", "1"]
# Fast: a single launch gives garbage (zeros) without running the kernel. Impossible: D steps not a power of 2.
BROKEN = kernels._Config(block_m=32, block_v=32, block_d=32, num_warps=4, num_stages=2)
IMPOSSIBLE = kernels._Config(block_m=16, block_v=32, block_d=24, num_warps=1, num_stages=1)


def run(tmp_path, *extra):
    result = sweep.main([*TINY, "--out", str(tmp_path), *extra])
    assert (tmp_path / "tile_sweep.json").exists() and (tmp_path / "tile_sweep.md").exists()
    saved = json.loads((tmp_path / "tile_sweep.json").read_text(encoding="utf-8"))
    return result, saved, (tmp_path / "tile_sweep.md").read_text(encoding="utf-8")


def test_tiny_sweep_end_to_end(tmp_path):
    result, saved, md = run(tmp_path, "--backward-cost")
    env = saved["environment"]
    assert {"device", "python", "torch", "triton", "date", "commit"} <= set(env)
    assert saved["settings"]["interpreter"] and saved["settings"]["grid"] == "tiny"

    rows = saved["results"]
    shapes = {(r["shape"]["tokens"], r["shape"]["regime"]) for r in rows}
    assert shapes == {(80, "many"), (8, "few")}
    for pass_ in sweep.PASSES:
        for tokens in (80, 8):
            group = [r for r in rows if r["pass"] == pass_ and r["shape"]["tokens"] == tokens]
            labels = [r["label"] for r in group]
            # Every shipped config of the pass is timed on every shape, beside the grid's candidates.
            shipped = sweep.shipped_configs(pass_, torch.bfloat16)
            assert {sweep.label(c) for c in shipped} <= set(labels)
            assert len(labels) == len(set(labels)) > len(shipped)
            assert sum(r["launcher_default"] for r in group) == 1
            for r in group:  # every config checked against the reference, correct, timed
                assert r["status"] == "ok", r
                keys = {"logp", "lse"} if pass_ == "forward" else {"d_hidden", "d_weight"}
                assert set(r["errors"]) == keys and 0 <= r["error"] <= r["tolerance"]
                assert r["median_ms"] > 0 and r["samples"] == 1 and r["tflops"] > 0
                assert r["flops"] == (2 if pass_ == "forward" else 6) * tokens * 32 * 100
                # Static resources: an offline sm_90a compile where Triton ships ptxas, else a reason.
                if HAS_PTXAS:
                    assert r["static_source"] == "offline sm_90a", r.get("static_note")
                    assert 0 < r["registers"] <= 255 and r["spill_bytes"] >= 0 and r["shared_bytes"] > 0
                else:
                    assert r["static_source"] is None and r["static_note"].startswith("unavailable")

    choices = {(c["pass"], c["regime"]): c for c in saved["choice"]}
    assert set(choices) == {(p, g) for p in sweep.PASSES for g in ("many", "few")}
    for c in choices.values():
        assert c["choice"] is not None and c["speedup"] >= 1.0
        assert c["shipped_status"] == ["ok"]
    assert choices["forward", "many"]["shipped"] == sweep.label(kernels._FORWARD_CONFIG)
    assert choices["backward", "few"]["shipped"] == sweep.label(kernels._BACKWARD_CONFIG_FEW_TOKENS)

    costs = saved["backward_cost"]
    assert [c["shape"]["tokens"] for c in costs] == [80, 8]
    for c in costs:
        assert c["status"] == "ok"
        assert c["fp32_buffer_bytes"] == (c["shape"]["tokens"] + 100) * 32 * 4
        assert c["cast_bytes"] == (c["shape"]["tokens"] + 100) * 32 * (4 + 2)
        assert c["backward"]["median_ms"] > 0 and c["gemm_floor"]["median_ms"] > 0 and c["buffers"]["median_ms"] > 0
        assert c["backward_over_floor"] > 0 and c["peak_bytes_above_inputs"] is None  # CUDA only
        stored = c["stored"]  # the stored scheme beside the atomic one: the same gradients (bf16 rounding apart)
        assert stored["status"] == "ok" and stored["backward"]["median_ms"] > 0 and stored["over_floor"] > 0
        assert stored["difference_from_atomic"] < 1e-2

    for title in ("## forward, N=80 D=32 V=100 (many tokens)", "## backward, N=8 D=32 V=100 (few tokens)",
                  "## Choice", "## The backward's cost", "**fastest**", "| stored backward ms |"):
        assert title in md
    assert md.count("**fastest**") == 4


def test_broken_and_impossible_configs_are_reported_never_chosen(tmp_path, monkeypatch):
    grid = {key: [*configs, BROKEN, IMPOSSIBLE] for key, configs in sweep.GRIDS["tiny"].items()}
    monkeypatch.setitem(sweep.GRIDS, "tiny", grid)
    real_forward, real_backward = kernels.forward, kernels.backward

    def forward(hidden, weight, bias, targets, config=None, **kwargs):
        if config == BROKEN:  # wrong and faster than any real kernel
            zeros = torch.zeros(hidden.shape[0])
            return zeros, zeros.clone(), None
        return real_forward(hidden, weight, bias, targets, config=config, **kwargs)

    def backward(hidden, weight, bias, targets, *args, config=None, **kwargs):
        grads = real_backward(hidden, weight, bias, targets, *args, config=config, **kwargs)
        if config == BROKEN:  # one token's gradient lost
            grads[0][0] = 0
        return grads

    monkeypatch.setattr(kernels, "forward", forward)
    monkeypatch.setattr(kernels, "backward", backward)
    _, saved, md = run(tmp_path, "--static", "none")

    rows = saved["results"]
    broken = [r for r in rows if r["label"] == sweep.label(BROKEN)]
    impossible = [r for r in rows if r["label"] == sweep.label(IMPOSSIBLE)]
    assert len(broken) == len(impossible) == 4  # 2 passes × 2 shapes
    for r in broken:
        assert r["status"].startswith("wrong: relative error"), r
        assert r["error"] > r["tolerance"] and r["median_ms"] > 0  # still timed, for the record
    for r in impossible:
        assert r["status"].startswith("failed:") and "power of 2" in r["status"], r
        assert r["error"] is None and "median_ms" not in r
    assert all(r["status"] == "ok" for r in rows if r not in broken and r not in impossible)
    # The broken forward is the fastest config measured, and still not chosen.
    for tokens in (80, 8):
        forward_rows = [r for r in rows if r["pass"] == "forward" and r["shape"]["tokens"] == tokens]
        assert min(forward_rows, key=lambda r: r.get("median_ms", float("inf")))["label"] == sweep.label(BROKEN)
    for c in saved["choice"]:
        assert c["choice"] not in (sweep.label(BROKEN), sweep.label(IMPOSSIBLE))
    assert "| wrong: relative error" in md and "| failed: " in md
    for line in md.splitlines():
        if "**fastest**" in line:
            assert "| ok |" in line


def row(pass_, tokens, lab, ms, status="ok", default=False):
    return {"pass": pass_, "shape": {"tokens": tokens, "hidden": 8, "vocab": 16,
                                     "regime": "few" if tokens <= kernels._FEW_TOKENS else "many"},
            "label": lab, "config": {"label": lab}, "status": status, "launcher_default": default, "median_ms": ms}


def test_choice_is_the_geometric_mean_winner_among_configs_correct_on_every_shape():
    rows = [row("forward", 100, "shipped", 10.0, default=True), row("forward", 200, "shipped", 20.0, default=True),
            row("forward", 100, "a", 5.0), row("forward", 200, "a", 40.0),  # geomean ratio 1.0
            row("forward", 100, "b", 9.0), row("forward", 200, "b", 16.0),  # geomean ratio ≈ 0.85: the choice
            row("forward", 100, "w", 1.0, "wrong: relative error 1e+00 > 1e-04"), row("forward", 200, "w", 1.0),
            row("forward", 100, "f", 2.0), row("forward", 200, "f", None, "failed: CompilationError"),
            row("forward", 8, "shipped", 3.0, "wrong: relative error 1e+00 > 1e-04", default=True),
            row("forward", 8, "c", 4.0)]
    choices = {(c["pass"], c["regime"]): c for c in sweep.choose(rows)}
    assert set(choices) == {("forward", "many"), ("forward", "few")}
    many = choices["forward", "many"]
    assert many["choice"] == "b" and many["speedup"] == pytest.approx((10 / 9 * 20 / 16) ** 0.5)
    assert many["speedups"] == {"N=100 D=8 V=16": pytest.approx(10 / 9), "N=200 D=8 V=16": pytest.approx(20 / 16)}
    few = choices["forward", "few"]  # a wrong shipped config: the fastest correct one, no speedup against it
    assert few["choice"] == "c" and few["speedup"] is None and "not correct" in few["note"]
