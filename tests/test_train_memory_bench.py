"""benchmarks.train_memory end to end on a tiny saved model: every case runs in its own process, the sweep of an
implementation stops at the budget, and the table, JSON and plot are written."""
import importlib.util
import json

import pytest
from tiny_models import tiny_causal_lm, tiny_tokenizer

from benchmarks import train_memory

MODEL_SEED = 9


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl not installed")
def test_sweep_stops_at_the_budget_and_records(tmp_path):
    print(f"tiny model seed {MODEL_SEED}")
    model_dir = tmp_path / "tiny"
    tiny_causal_lm("llama", seed=MODEL_SEED).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    out = tmp_path / "out"
    # A budget below any process's peak: each implementation runs its shortest prompt only.
    assert train_memory.main(["--model", str(model_dir), "--prompt-tokens", "16", "32", "--response-tokens", "8",
                              "--responses", "3", "--impls", "trl-gc-precompute", "epa-shared-gc",
                              "--budget-gib", "0.01", "--device", "cpu", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert [(r["impl"], r["prompt_tokens"]) for r in results] == [("trl-gc-precompute", 16), ("epa-shared-gc", 16)]
    trl, ours = results
    assert "error" not in trl and "error" not in ours, results
    assert ours["tokens"] == 15 + 3 * 8  # the prompt once (its last token copied per branch), then the responses
    assert trl["tokens"] >= 2 * 2 * (16 + 8)  # two pairs, each row with its own prompt
    assert trl["peak_bytes"] > 0 and ours["step_s"] > 0
    table = (out / "results.md").read_text()
    assert "Longest prompt within 0.01 GiB" in table and "| 1 + 2 | — | — |" in table
    assert (out / "memory.png").stat().st_size > 0


@pytest.mark.parametrize("argv", [["--responses", "1"], ["--prompt-tokens", "0"], ["--budget-gib", "0"],
                                  ["--warmup", "-1"], ["--impls", "liger"]])
def test_bad_arguments(argv):
    with pytest.raises(SystemExit) as exit_info:
        train_memory.parse_args(argv)
    assert exit_info.value.code == 2
