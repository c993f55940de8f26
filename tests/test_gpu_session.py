"""benchmarks/gpu_session.sh cannot rot between device sessions: its dry run runs every stage on this CPU at tiny
shapes (the Triton interpreter where a stage needs Triton), and its stage limits fit one device call."""
import os
import re
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
CALL_LIMIT_S = 9 * 60  # one call, leaving time for a second within the 15-minute lease
MUST_S = 6 * 60  # the must-have stages, cold Triton cache included
MUST = ("ceilings", "tests", "peers-llama", "peers-llama-32k", "peers-qwen", "peers-gemma", "losses")
TRAINING = ("model", "flex", "fsdp2")  # left from the last session: in the time the must-haves leave
TILE_KERNELS = ("tiles", "filter")  # the Triton tile kernels' own questions, last


def stage_limits() -> dict[str, int]:
    """Each stage's limit (a stage written twice, once per mode, counts once)."""
    found = re.findall(r"^\s*(?:stage|peers) ([\w-]+) (\d+) ", SCRIPT.read_text(), re.M)
    return {name: int(seconds) for name, seconds in found}


def test_the_must_have_stages_come_first_and_fit_six_minutes():
    limits = stage_limits()
    assert list(limits) == [*MUST, *TRAINING, *TILE_KERNELS], list(limits)
    assert sum(limits[name] for name in MUST) <= MUST_S, limits
    assert sum(limits[name] for name in (*MUST, *TRAINING)) <= CALL_LIMIT_S, limits


def test_the_peer_stages_time_the_gemm_backend_and_both_floors():
    from benchmarks.run import PRESETS

    impls = PRESETS["gpu-peers"]["impls"]
    assert {"gemm", "gemm-tokens", "gemm-vocab", "gemm-keep", "triton", "liger", "cce", "trl", "reference",
            "reference-compile"} <= set(impls)
    assert [512, 8192, 32768] == PRESETS["gpu-peers"]["grids"][0]["tokens"]


def test_dry_run_runs_every_stage(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env={**os.environ, "OUT": str(tmp_path)},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    for stage in stage_limits():
        assert f"== {stage}: exit 0" in summary, f"{stage}:\n{done.stdout[-4000:]}"
    with tarfile.open(tmp_path / "gpu-session.tar.gz") as archive:
        names = archive.getnames()
    assert all(f"gpu-session/{stage}.log" in names for stage in stage_limits())
    # the training stages' model stays out of the archive (SmolLM2's 540 MB made the first session's too big to return)
    assert not any(name.endswith((".safetensors", ".bin")) for name in names), names
    assert "| logprobs (smollm2) | native@1e-5 |" in summary  # filtering ran on the (synthetic) slice
    assert "head tied to the embeddings | True | True" in summary
