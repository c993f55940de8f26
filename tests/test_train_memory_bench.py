"""benchmarks.train_memory end to end on a tiny saved model: every case runs in its own process, the sweep of an
implementation stops at the budget, and the table, JSON and plot are written."""
import importlib.util
import json
import subprocess
import types

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


def test_lora_cases_pass_the_lora_settings_and_record_them(tmp_path, monkeypatch):
    """The `-lora` implementations' workers get --lora and the settings (the others none of them), and the results
    and table record them. The workers themselves are tested in test_train_step_bench / test_trl_step_bench."""
    commands = []

    def fake_worker(cmd, **kwargs):
        commands.append(cmd)
        lora = ({"r": int(cmd[cmd.index("--lora-r") + 1]), "alpha": int(cmd[cmd.index("--lora-alpha") + 1]),
                 "dropout": 0.0, "target_modules": cmd[cmd.index("--lora-target-modules") + 1:]}
                if "--lora" in cmd else None)
        result = {"tokens": 100, "step_s": 2.0 if lora else 3.0, "process_peak_bytes": 2**30 if lora else 2**31,
                  "loss": 0.5, "trainable_params": 1000 if lora else 10**6, "optimizer_state_bytes": 8000, "lora": lora}
        return subprocess.CompletedProcess(cmd, 0, stdout="log line\n" + json.dumps(result) + "\n", stderr="")

    monkeypatch.setattr(train_memory, "subprocess", types.SimpleNamespace(run=fake_worker))
    out = tmp_path / "out"
    assert train_memory.main(["--prompt-tokens", "64", "--response-tokens", "8", "--responses", "4", "--impls",
                              "epa-shared-gc-lora", "trl-gc-lora", "trl-gc-precompute-lora", "epa-shared-gc",
                              "--lora-r", "8", "--lora-alpha", "16", "--lora-target-modules", "q_proj", "v_proj",
                              "--device", "cpu", "--out", str(out)]) == 0
    modules = [cmd[cmd.index("-m") + 1] for cmd in commands]
    assert modules == ["benchmarks.train_step", "benchmarks.trl_step", "benchmarks.trl_step", "benchmarks.train_step"]
    for cmd in commands[:3]:
        assert "--lora" in cmd and cmd[cmd.index("--lora-r"):] == ["--lora-r", "8", "--lora-alpha", "16",
                                                                    "--lora-target-modules", "q_proj", "v_proj"]
    assert "--precompute-ref" in commands[2] and "--precompute-ref" not in commands[1]
    assert not any(arg.startswith("--lora") for arg in commands[3])
    recorded = json.loads((out / "results.json").read_text())
    assert recorded["options"]["lora_r"] == 8 and recorded["options"]["lora_target_modules"] == ["q_proj", "v_proj"]
    lora, *_, full = recorded["results"]
    assert lora["lora"] == {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    assert lora["trainable_params"] == 1000 and full["lora"] is None and full["trainable_params"] == 10**6
    table = (out / "results.md").read_text()
    assert "| 1 + 3 | 64 | epa-shared-gc | 100 | 3.0 | 2048 | 2.00 | 1.50 |" in table
    assert "LoRA adapters only (r 8, α 16" in table


def test_a_killed_worker_is_reported_as_such(monkeypatch):
    """The OOM killer leaves no traceback: the error says the worker was killed, not its last log line."""
    def killed(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, -9, stdout="", stderr="TRL tokenization: prompt [64] tokens\n")

    monkeypatch.setattr(train_memory, "subprocess", types.SimpleNamespace(run=killed))
    args = train_memory.parse_args(["--prompt-tokens", "64", "--responses", "2", "--impls", "trl-gc-lora"])
    result = train_memory.run_case("trl-gc-lora", 64, args, 2)
    assert result["error"] == "killed by SIGKILL (out of memory?)"


@pytest.mark.parametrize("argv", [["--responses", "1"], ["--prompt-tokens", "0"], ["--budget-gib", "0"],
                                  ["--warmup", "-1"], ["--impls", "liger"],
                                  ["--impls", "epa-shared-gc-lora", "--lora-r", "0"]])
def test_bad_arguments(argv):
    with pytest.raises(SystemExit) as exit_info:
        train_memory.parse_args(argv)
    assert exit_info.value.code == 2
