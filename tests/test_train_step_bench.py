"""benchmarks.train_step end to end on a tiny saved model: both implementations run, agree on the loss, and the
results carry time, memory and the environment."""
import json

import pytest
from tiny_models import tiny_causal_lm, tiny_tokenizer

from benchmarks import train_step


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


@pytest.mark.parametrize("argv", [["--responses", "1"], ["--prompt-tokens", "0"], ["--repeats", "0"],
                                  ["--warmup", "-1"]])
def test_bad_sizes_are_rejected(argv):
    with pytest.raises(SystemExit) as exit_info:
        train_step.parse_args(argv)
    assert exit_info.value.code == 2
