"""benchmarks/static_check.py: the offline kernel report set beside the registers and spills a GPU's tile sweep read
off its own kernels. Here the "device" columns are made up from an offline compile, then one is changed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
pytestmark = pytest.mark.skipif(not (NVIDIA_BIN / "cuobjdump").exists(),
                                reason="Triton's NVIDIA backend ships no cuobjdump here")
CONFIG = {"block_m": 64, "block_v": 128, "block_d": 32, "num_warps": 4, "num_stages": 2}


def sweep(path: Path, static: dict) -> Path:
    result = {"pass": "backward", "label": "64×128×32 w4 s2", "config": CONFIG, "static_source": "device",
              "shape": {"tokens": 8192, "hidden": 4096, "vocab": 128256}, **static}
    path.write_text(json.dumps({"environment": {"triton": "test"}, "settings": {"dtype": "bfloat16"},
                                "results": [result, {**result, "static_source": "offline sm_90a"}]}))
    return path


def run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the report compiles GPU configs
    return subprocess.run([sys.executable, "-m", "benchmarks.static_check", *map(str, args)], capture_output=True,
                          text=True, env=env, check=False)


def offline_columns(stdout: str) -> dict:
    row = [line for line in stdout.splitlines() if line.startswith("| backward |")]
    assert len(row) == 1, stdout  # the row read offline is not compared
    registers, spills, _ = row[0].split("|")[4].split("/")
    return {"registers": int(registers), "spill_bytes": int(spills), "shared_bytes": 0}


def test_same_and_different_static_columns_are_told_apart(tmp_path):
    first = run(sweep(tmp_path / "a.json", {"registers": 1, "spill_bytes": 0, "shared_bytes": 0}))
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stdout.rstrip().endswith("| **no** |")
    offline = offline_columns(first.stdout)
    assert 0 < offline["registers"] <= 255
    same = run(sweep(tmp_path / "same.json", offline))
    assert "| backward | 64×128×32 w4 s2 |" in same.stdout and same.stdout.rstrip().endswith("| yes |")
    other = run(sweep(tmp_path / "other.json", {**offline, "spill_bytes": offline["spill_bytes"] + 8}))
    assert other.stdout.rstrip().endswith("| **no** |")


def test_a_sweep_without_device_columns_is_refused(tmp_path):
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps({"environment": {}, "settings": {"dtype": "bfloat16"}, "results": []}))
    done = run(path)
    assert done.returncode == 2 and "no config with device-read static columns" in done.stderr
