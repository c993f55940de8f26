"""`python -m training.epa`'s options: TRL's spellings and --config, the options a loss would ignore, the attention
choice, bad rows, dropout and the saved config."""
import json
from pathlib import Path

import pytest
import torch
from training_fixtures import cli, metrics, saved_weights

from training.epa.__main__ import main
from training.epa.cli import DEFAULT_NUM_WEAK, TRL_NAMES, build_parser, parse_args
from training.models import ModelLoadError, attention_implementation


def trl_cli(workdir, out, *extra):
    """`cli` in TRL's spellings (underscores, TRL's names); this program's own options where TRL has none."""
    return ["--model_name_or_path", str(workdir / "model"), "--dataset_name", str(workdir / "train.jsonl"),
            "--output_dir", str(out), "--num_weak", "2", "--max_tokens_per_batch", "600", "--learning_rate", "1e-3",
            "--seed", "7", "--no_progress", *extra]


def test_trl_spellings_train_exactly_as_this_programs(workdir, tmp_path):
    ours = tmp_path / "ours"
    assert main(cli(workdir, ours, "--max-steps", "2", "--epochs", "2", "--scheduler", "cosine",
                    "--warmup-ratio", "0.5", "--loss", "dpo", "--max-length", "200", "--max-prompt-length", "100",
                    "--gradient-checkpointing", "--logging-steps", "1", "--num-weak", "0")) == 0
    trl = tmp_path / "trl"
    args = trl_cli(workdir, trl, "--max_steps", "2", "--num_train_epochs", "2.0", "--lr_scheduler_type", "cosine",
                   "--warmup_ratio", "0.5", "--loss_type", "sigmoid", "--max_length", "200", "--max_prompt_length",
                   "100", "--gradient_checkpointing", "true", "--logging_steps", "1", "--precompute_ref_log_probs",
                   "--bf16", "false")
    args[args.index("--num_weak") + 1] = "0"
    assert main(args) == 0
    assert metrics(ours) == metrics(trl)
    expected, got = saved_weights(ours), saved_weights(trl)
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_every_trl_name_is_an_option_of_the_same_meaning():
    parser = build_parser()
    for ours, names in TRL_NAMES.items():
        for name in names:
            assert parser._option_string_actions[name] is parser._option_string_actions[ours], name
    args = parse_args(["--model_name_or_path", "m", "--dataset_name", "d", "--output_dir", "o", "--loss_type",
                       "sigmoid", "--resume_from_checkpoint", "ckpt", "--torch_dtype", "bfloat16",
                       "--max_prompt_length", "none"])
    assert (args.model, args.data, args.loss, args.resume, args.dtype, args.max_prompt_length) == (
        "m", "d", "dpo", "ckpt", "bfloat16", None)


def test_weak_negatives_default_to_the_studys_choice_for_epa_only():
    base = ["--model", "m", "--data", "d", "--output-dir", "o"]
    assert parse_args(base).num_weak == DEFAULT_NUM_WEAK == 2  # --loss epa is the default loss
    for loss in ("dpo", "plackett_luce", "sdpo"):  # the last two refuse weak negatives: their default is none
        assert parse_args([*base, "--loss", loss]).num_weak == 0
    assert parse_args([*base, "--num-weak", "0"]).num_weak == 0


def test_a_yaml_config_is_the_command_line(workdir, tmp_path):
    """The same run from --config (TRL's keys) and from flags; the command line overrides the file."""
    config = tmp_path / "dpo.yaml"
    config.write_text(f"model_name_or_path: {workdir / 'model'}\ndataset_name: {workdir / 'train.jsonl'}\n"
                      f"output_dir: {tmp_path / 'from-yaml'}\nlearning_rate: 1.0e-3\nnum_weak: 2\n"
                      "max_tokens_per_batch: 600\nseed: 7\nmax_steps: 5\nno_progress: true\ngradient_checkpointing: "
                      "false\nmax_prompt_length: null\n")
    assert main(["--config", str(config), "--max_steps", "2"]) == 0
    assert main(cli(workdir, tmp_path / "flags", "--max-steps", "2", "--max-prompt-length", "none")) == 0
    assert metrics(tmp_path / "from-yaml") == metrics(tmp_path / "flags")
    summary = json.loads((tmp_path / "from-yaml" / "train_summary.json").read_text())
    assert summary["updates"] == 2 and summary["options"]["max_prompt_length"] is None


@pytest.mark.parametrize("text, message", [
    ("learning_rate: 1.0e-3\nbogus: 1\n", "unknown option 'bogus'"),
    ("- a list\n", "expected a mapping"),
    ("lr: [1, 2]\n", "lr must be a single value"),
])
def test_a_bad_config_is_one_line(tmp_path, capsys, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--config", str(config)])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (("--loss", "dpo", "--positive-weight", "3"), "--loss dpo does not use --positive-weight"),
    (("--loss", "epa", "--score-temperature", "2"), "--loss epa does not use --score-temperature"),
    (("--num-weak", "0", "--weak-weight", "0.5"), "--weak-weight weighs weak negatives, and there are none"),
    (("--loss", "sdpo", "--num-weak", "2"), "--loss sdpo reads strong negatives only"),
    (("--attn", "flash_attention_2"), "runs in bf16 or fp16 only"),
    (("--precompute-ref-log-probs", "false", "--ref", "precompute"), "contradicts --ref precompute"),
    (("--max-prompt-length", "0"), "--max-prompt-length must be ≥ 1"),
])
def test_options_a_run_would_ignore_or_cannot_use_are_refused(workdir, tmp_path, extra, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(cli(workdir, tmp_path / "x", *extra))
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in error and len(error.splitlines()) == 1, error


def test_auto_attention_keeps_prefix_sharing_and_flash_attn_only_in_half_precision(monkeypatch):
    """flash-attn installed on a CUDA machine (faked: this one has neither): auto picks it only for bf16/fp16
    weights and only when no mask is needed; fp32 never gets it."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert attention_implementation("auto", cuda, torch.bfloat16, masks=False) == "flash_attention_2"
    assert attention_implementation("auto", cuda, torch.bfloat16, masks=True) is None  # sdpa: prefix sharing
    assert attention_implementation("auto", cuda, torch.float32, masks=False) is None  # flash-attn refuses fp32
    assert attention_implementation("auto", cpu, torch.bfloat16, masks=False) is None
    assert attention_implementation("flash_attention_2", cuda, torch.float16) == "flash_attention_2"
    with pytest.raises(ModelLoadError, match="bf16 or fp16"):
        attention_implementation("flash_attention_2", cuda, torch.float32)


def test_prefix_sharing_off_is_said_in_the_log_and_the_summary(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli(workdir, out, "--max-steps", "1", "--prefix-sharing", "off")) == 0
    assert "prefix sharing off: --prefix-sharing off" in capsys.readouterr().out
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["prefix_sharing"] == {"on": False, "why_not": "--prefix-sharing off"}
    assert summary["attention"] == "sdpa"


def test_the_saved_model_generates_with_its_kv_cache(workdir, tmp_path):
    out = tmp_path / "run"
    assert main(cli(workdir, out, "--max-steps", "1")) == 0
    assert json.loads((out / "model" / "config.json").read_text())["use_cache"] is True


def test_dropout_is_off_by_default_and_kept_on_request(workdir, tmp_path, monkeypatch):
    """The policy PreferenceModel gets disable_dropout from the command line (default true)."""
    from training.epa import trainer as train_module

    seen = []
    real = train_module.PreferenceModel.__init__

    def spy(self, model, **kwargs):
        seen.append(kwargs.get("disable_dropout"))
        real(self, model, **kwargs)

    monkeypatch.setattr(train_module.PreferenceModel, "__init__", spy)
    assert main(cli(workdir, tmp_path / "a", "--max-steps", "1")) == 0
    assert main(cli(workdir, tmp_path / "b", "--max-steps", "1", "--no-disable-dropout")) == 0
    assert main(cli(workdir, tmp_path / "c", "--max-steps", "1", "--disable_dropout", "false")) == 0
    assert seen == [True, False, False]


def bad_rows_data(path: Path) -> Path:
    """Six good rows, one with a duplicate negative, one with an empty response, one with every negative identical
    to its positive."""
    rows = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": [f"Wrong {i}.", "No."]}
            for i in range(6)]
    rows[1]["rejected"] = ["Wrong 1.", "Wrong 1."]
    rows[2]["rejected"] = ["Wrong 2.", "   "]
    rows[3]["rejected"] = ["Answer 3."]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_bad_rows_are_refused_by_default_and_skipped_on_request(workdir, tmp_path, capsys):
    data = bad_rows_data(tmp_path / "bad.jsonl")
    args = cli(workdir, tmp_path / "refused", "--max-steps", "1")
    args[args.index("--data") + 1] = str(data)
    assert main(args) == 2
    assert "row 2, column 'rejected[1]': empty response" in capsys.readouterr().err
    args = cli(workdir, tmp_path / "skipped", "--max-steps", "1", "--invalid-rows", "skip")
    args[args.index("--data") + 1] = str(data)
    assert main(args) == 0
    log = capsys.readouterr().out
    record = json.loads((tmp_path / "skipped" / "train_summary.json").read_text())["data"]
    assert record["duplicate_negatives_merged"] == 1 and "duplicate negatives merged: 1" in log
    assert record["rows_dropped"] == 1 and record["prompts"] == 5  # row 3: no negative left
    assert record["skipped"] == {"empty_response": 1, "negative_identical_to_positive": 1}
    assert "skipped (--invalid-rows skip): 1 rows dropped" in log


@pytest.mark.parametrize("script", ["epa-train", "epa-evaluate"])
def test_console_scripts_run_from_any_directory(script, tmp_path):
    import shutil
    import subprocess

    path = shutil.which(script)
    if path is None:
        pytest.skip(f"{script} is not on PATH: the package is not installed (make test installs it)")
    done = subprocess.run([path, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-2000:]
