"""The shipped Triton configs compile for real GPU targets (no GPU needed) and fit each target's shared memory."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
pytestmark = pytest.mark.skipif(not (NVIDIA_BIN / "ptxas").exists() or not (NVIDIA_BIN / "cuobjdump").exists(),
                                reason="Triton's NVIDIA backend ships no ptxas/cuobjdump here")


def run_report(tmp_path, *args):
    # Without TRITON_INTERPRET (the test session sets it): the report must see the GPU configs.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "benchmarks.kernel_report", *args, "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["environment"]["triton"] == triton.__version__ and record["environment"]["commit"]
    assert f"Triton {triton.__version__}, commit " in (tmp_path / "results.md").read_text()
    return record["rows"]


def check(rows):
    for row in rows:
        assert 0 < row["registers"] <= 255, row
        assert row["stack_bytes"] >= 0 and row["shared_bytes"] > 0, row
        assert row["fits"], f"{row['variant']} needs {row['shared_bytes']} B of shared memory on {row['target']}, " \
                            f"more than its {row['shared_limit']} B per block"


def test_hot_configs_compile_for_hopper_and_ada(tmp_path):
    rows = run_report(tmp_path, "--targets", "sm_90a", "sm_86", "--variants", "forward bf16", "backward bf16",
                      "--exact")
    assert {(r["variant"], r["target"]) for r in rows} == {
        (v, t) for v in ("forward bf16", "backward bf16") for t in ("sm_90a", "sm_86")}
    check(rows)
    assert "| forward bf16 |" in (tmp_path / "results.md").read_text()


def test_cut_cross_entropy_kernels_compile_beside_ours(tmp_path):
    """The peer's kernels at their default configs, compiled the same way, so the report compares like with like."""
    pytest.importorskip("cut_cross_entropy")
    rows = run_report(tmp_path, "--targets", "sm_90a", "--variants", "CCE")
    assert [r["variant"] for r in rows] == ["CCE forward bf16 (peer)", "CCE backward bf16 (peer)"]
    check(rows)
    assert rows[0]["tile"].startswith("256×128×32, 8 warps")


@pytest.mark.slow
def test_every_shipped_config_compiles_and_fits_every_target(tmp_path):
    from benchmarks.kernel_report import TARGETS, cce_variants, shipped_variants

    rows = run_report(tmp_path)
    assert len(rows) == (len(shipped_variants()) + len(cce_variants())) * len(TARGETS)
    check(rows)


def test_the_report_compiles_the_pipelined_kernel_a_gpu_runs(tmp_path):
    """With the JIT's divisibility hints on the sizes (M, V, D), the hot path's D loop is pipelined as on a GPU: at
    least num_stages − 1 stages of both operand tiles in shared memory. Without them (the report before 2026-12-04)
    the loads were not vectorised and one stage was left, unlike the kernels the H200 compiled."""
    from epa_kernels.ops import triton_logprobs as kernels

    rows = run_report(tmp_path, "--targets", "sm_90a", "--variants", "forward bf16", "backward bf16", "--exact")
    for row, cfg in zip(rows, (kernels._FORWARD_CONFIG, kernels._BACKWARD_CONFIG), strict=True):
        stage = (cfg.block_m + cfg.block_v) * cfg.block_d * 2  # bf16 hidden and weight tiles
        assert row["shared_bytes"] >= (cfg.num_stages - 1) * stage, row
