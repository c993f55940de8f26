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
import torch
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


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl not installed")
def test_trl_lora_step_trains_the_adapters_only(tmp_path):
    """--lora: DPOTrainer gets a peft_config; its optimizer holds the adapters' state only, and the reference (the
    policy with its adapters disabled) equals the policy at the first step: loss log 2."""
    model_dir = tmp_path / "tiny"
    tiny = tiny_causal_lm("llama", seed=MODEL_SEED)
    tiny.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    cmd = [sys.executable, "-m", "benchmarks.trl_step", "--model", str(model_dir), "--prompt-tokens", "16",
           "--response-tokens", "8", "--responses", "3", "--gradient-checkpointing", "--lora", "--lora-r", "4",
           "--lora-alpha", "8", "--warmup", "0", "--repeats", "1", "--measure", "time", "--device", "cpu"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    linears = [m for name, m in tiny.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    adapters = sum(4 * (m.in_features + m.out_features) for m in linears)
    assert result["impl"] == "trl-gc-lora" and result["pairs"] == 2
    assert result["trainable_params"] == adapters and result["trainable_bytes"] == 4 * adapters
    assert result["optimizer_state_bytes"] == 2 * 4 * adapters + 4 * 2 * len(linears)  # exp_avg, exp_avg_sq, step
    assert result["weights_bytes"] == 4 * (sum(p.numel() for p in tiny.parameters()) + adapters)
    assert result["lora"] == {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
    assert result["step_s"] > 0 and result["process_peak_bytes"] > 0
    assert abs(result["loss"] - math.log(2)) < 1e-4


@pytest.mark.parametrize("argv", [["--responses", "1"], ["--prompt-tokens", "0"], ["--warmup", "-1"],
                                  ["--lora", "--lora-r", "0"]])
def test_bad_arguments_exit_with_code_2(argv):
    with pytest.raises(SystemExit) as exit_info:
        trl_step.parse_args(argv)
    assert exit_info.value.code == 2
