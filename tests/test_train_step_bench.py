"""benchmarks.train_step end to end on a tiny saved model: both implementations run, agree on the loss, and the
results carry time, memory and the environment."""
import json

import pytest
import torch
from tiny_models import tiny_causal_lm, tiny_tokenizer

from benchmarks import train_step


def adapter_parameters(model, r: int) -> tuple[int, int]:
    """(parameters, tensors) of rank-r LoRA adapters on every nn.Linear but the LM head, counted from the model."""
    linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    return sum(r * (m.in_features + m.out_features) for m in linears), 2 * len(linears)


def test_train_step_benchmark_runs_and_agrees(tmp_path):
    model_dir = tmp_path / "tiny"
    tiny_causal_lm("llama_tied", seed=3).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "out"
    assert train_step.main(["--model", str(model_dir), "--prompt-tokens", "8", "--response-tokens", "16",
                            "--responses", "3", "--repeats", "1", "--device", "cpu", "--out", str(out)]) == 0
    recorded = json.loads((out / "results.json").read_text())
    fused, unfused = recorded["results"]
    assert (fused["impl"], unfused["impl"]) == ("fused", "unfused")
    for result in (fused, unfused):
        assert result["step_s"] > 0 and result["peak_bytes"] > 0 and result["tokens"] == 3 * 24
        assert abs(result["loss"] - result["loss_memory_run"]) < 1e-6
    assert abs(fused["loss"] - unfused["loss"]) < 1e-4
    assert recorded["environment"]["commit"] and "× fused time" in (out / "results.md").read_text()


def test_prefix_shared_step_runs_fewer_tokens_to_the_same_loss(tmp_path):
    model_dir = tmp_path / "tiny"
    tiny_causal_lm("llama", seed=4).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "out"
    assert train_step.main(["--model", str(model_dir), "--prompt-tokens", "20", "--response-tokens", "6",
                            "--responses", "4", "--repeats", "1", "--warmup", "0", "--what", "time",
                            "--device", "cpu", "--impls", "fused-gc", "shared-gc", "--out", str(out)]) == 0
    fused, shared = json.loads((out / "results.json").read_text())["results"]
    assert fused["tokens"] == 4 * 26 and shared["tokens"] == 19 + 4 * 6
    assert "peak_bytes" not in shared and shared["step_s"] > 0 and shared["process_peak_bytes"] > 0
    assert shared["optimizer_state_bytes"] > 0  # warmup 0: primed on zero gradients
    assert abs(fused["loss"] - shared["loss"]) < 1e-4
    assert "× fused-gc time" in (out / "results.md").read_text()


def test_lora_step_trains_the_adapters_only(tmp_path):
    """--lora: the optimizer holds the adapters' AdamW state only, and the first step's loss is the full-weight
    step's (LoRA's B starts at zero, so the adapted model is the base model)."""
    model_dir = tmp_path / "tiny"
    tiny = tiny_causal_lm("llama_tied", seed=6)
    tiny.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    argv = ["--model", str(model_dir), "--prompt-tokens", "12", "--response-tokens", "6", "--responses", "3",
            "--repeats", "1", "--warmup", "0", "--device", "cpu", "--lora-r", "4", "--lora-alpha", "8"]
    lora = train_step.measure("shared-gc", train_step.parse_args([*argv, "--lora"]))
    full = train_step.measure("shared-gc", train_step.parse_args(argv))
    adapters, tensors = adapter_parameters(tiny, 4)
    assert lora["trainable_params"] == adapters and lora["trainable_bytes"] == 4 * adapters
    assert lora["optimizer_state_bytes"] == 2 * 4 * adapters + 4 * tensors  # exp_avg, exp_avg_sq, step per tensor
    assert full["trainable_params"] == sum(p.numel() for p in tiny.parameters()) > adapters
    assert lora["lora"] == {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
    assert full["lora"] is None
    assert lora["tokens"] == full["tokens"] == 11 + 3 * 6 and lora["step_s"] > 0
    assert abs(lora["loss"] - full["loss"]) < 1e-5


def test_lora_targets_are_passed_to_peft(tmp_path):
    model_dir = tmp_path / "tiny"
    tiny = tiny_causal_lm("llama", seed=7)
    tiny.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    args = train_step.parse_args(["--model", str(model_dir), "--prompt-tokens", "8", "--response-tokens", "4",
                                  "--responses", "2", "--repeats", "1", "--warmup", "0", "--device", "cpu",
                                  "--lora", "--lora-r", "2", "--lora-target-modules", "q_proj", "v_proj"])
    result = train_step.measure("shared-gc", args)
    layers = tiny.model.layers
    assert result["trainable_params"] == sum(2 * (m.in_features + m.out_features) for layer in layers
                                             for m in (layer.self_attn.q_proj, layer.self_attn.v_proj))
    assert result["lora"]["target_modules"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize("argv", [["--responses", "1"], ["--prompt-tokens", "0"], ["--repeats", "0"],
                                  ["--warmup", "-1"], ["--lora", "--lora-r", "0"], ["--lora", "--lora-alpha", "0"]])
def test_bad_sizes_are_rejected(argv):
    with pytest.raises(SystemExit) as exit_info:
        train_step.parse_args(argv)
    assert exit_info.value.code == 2
