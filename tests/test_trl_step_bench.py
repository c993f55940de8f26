"""benchmarks.trl_step end to end on a tiny saved model: one measured DPOTrainer step reports time, memory, tokens
and a loss at log 2 (the policy is its own reference and barely moves)."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import tiny_causal_lm, tiny_tokenizer

from benchmarks import trl_step
from benchmarks.harness import CPU_MEMORY_ENV

ROOT = Path(__file__).resolve().parents[1]
MODEL_SEED = 5


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl not installed")
@pytest.mark.parametrize("warmup", [1, 0])
def test_trl_step_reports_one_measured_step(tmp_path, warmup):
    """warmup 0: the optimizer state is primed on zero gradients, and the measured step is the first."""
    print(f"tiny model seed {MODEL_SEED}")
    model_dir = tmp_path / "tiny"
    tiny_causal_lm("llama", seed=MODEL_SEED).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    cmd = [sys.executable, "-m", "benchmarks.trl_step", "--model", str(model_dir), "--prompt-tokens", "16",
           "--response-tokens", "8", "--responses", "3", "--gradient-checkpointing", "--precompute-ref",
           "--warmup", str(warmup), "--repeats", "1", "--measure", "both", "--device", "cpu"]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **CPU_MEMORY_ENV}, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["impl"] == "trl-gc-precompute" and result["pairs"] == 2
    assert result["tokens"] >= 2 * 2 * (16 + 8) * 0.8
    assert result["step_s"] > 0 and len(result["times_s"]) == 1
    assert result["process_peak_bytes"] == result["peak_bytes"] >= result["base_bytes"] > 0
    assert result["weights_bytes"] > 0
    assert math.isfinite(result["loss"]) and abs(result["loss"] - math.log(2)) < 0.1


@pytest.mark.parametrize("argv", [["--responses", "1"], ["--prompt-tokens", "0"], ["--warmup", "-1"]])
def test_bad_arguments_exit_with_code_2(argv):
    with pytest.raises(SystemExit) as exit_info:
        trl_step.parse_args(argv)
    assert exit_info.value.code == 2
