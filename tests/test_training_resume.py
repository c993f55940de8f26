"""Resuming `python -m training.epa`: what a resume must share with its run (options, ranks, prefix sharing, the
plan), extending a run, and crash-and-resume under SIGKILL at three points (and mid-step with LoRA adapters)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_fixtures import cli, metrics, saved_weights

from training.epa.__main__ import main

ROOT = Path(__file__).resolve().parents[1]


def assert_same_run(expected: Path, got: Path) -> None:
    """Bit-identical final weights and the same metrics.jsonl (timings aside)."""
    a, b = saved_weights(expected), saved_weights(got)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert metrics(expected) == metrics(got)


def refusal(capsys) -> str:
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1, error  # the program's one-line error, no traceback
    return error


def test_a_run_is_extended_by_more_steps_or_epochs(workdir, tmp_path):
    """Resuming with a larger --max-steps (then more epochs) continues the same plan; the result is a run that
    asked for that many updates from the start, up to the learning-rate schedule (fixed here: constant)."""
    args = ("--save-steps", "1", "--scheduler", "constant", "--warmup-ratio", "0")
    full = tmp_path / "full"
    assert main(cli(workdir, full, "--epochs", "2", "--max-steps", "4", *args)) == 0
    extended = tmp_path / "extended"
    assert main(cli(workdir, extended, "--epochs", "2", "--max-steps", "2", *args)) == 0
    assert main(cli(workdir, extended, "--epochs", "2", "--max-steps", "4", "--resume", *args)) == 0
    assert_same_run(full, extended)
    assert main(cli(workdir, extended, "--epochs", "3", "--resume", *args)) == 0
    summary = json.loads((extended / "train_summary.json").read_text())
    assert summary["resumed_from"] == 4 and summary["updates"] == 9  # 3 epochs of 3 updates


def test_a_resume_under_other_prefix_sharing_is_refused_naming_it(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli(workdir, out, "--max-steps", "1", "--save-steps", "1")) == 0
    capsys.readouterr()
    assert main(cli(workdir, out, "--max-steps", "1", "--resume", "--prefix-sharing", "off")) == 2
    assert "prefix_sharing: True → False" in refusal(capsys)


def test_a_resume_past_the_runs_end_or_on_other_data_is_refused(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli(workdir, out, "--max-steps", "2", "--save-steps", "2")) == 0
    capsys.readouterr()
    assert main(cli(workdir, out, "--max-steps", "1", "--resume")) == 2
    assert "the checkpoint is at update 2, past this run's 1 updates" in refusal(capsys)
    data = tmp_path / "fewer.jsonl"
    data.write_text("".join((workdir / "train.jsonl").read_text().splitlines(keepends=True)[:6]))
    args = cli(workdir, out, "--max-steps", "2", "--resume")
    args[args.index("--data") + 1] = str(data)
    assert main(args) == 2
    assert "the run changed since the checkpoint (data: " in refusal(capsys)


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun on CPU is exercised on Linux")
def test_a_resume_under_another_world_size_is_refused_naming_it(workdir, tmp_path):
    """Checkpointed by one process, resumed by torchrun with two: refused before any model loads."""
    out = tmp_path / "run"
    assert main(cli(workdir, out, "--max-steps", "1", "--save-steps", "1", "--backend", "torch")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "training.epa",
                           *cli(workdir, out, "--max-steps", "1", "--backend", "torch", "--resume")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "error: --resume" in done.stderr and "world_size: 1 → 2" in done.stderr, done.stderr[-3000:]
    assert "training/epa/" not in done.stderr  # no traceback of the program's (torchrun prints its own report)


KILL_RUN = ("--epochs", "2", "--max-steps", "5", "--save-steps", "2", "--backend", "torch")


@pytest.fixture(scope="module")
def uninterrupted(workdir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert main(cli(workdir, out, *KILL_RUN)) == 0
    return out


@pytest.mark.parametrize("point, update", [("mid-step", 3), ("checkpoint-writing", 4), ("checkpoint-renamed", 4)])
def test_killed_then_resumed_equals_uninterrupted(workdir, uninterrupted, tmp_path, point, update):
    """SIGKILL mid-step, while a checkpoint is being written, and right after its rename: the run resumes and ends
    with the weights and metrics of a run never interrupted. A half-written checkpoint is never picked up."""
    out = tmp_path / "killed"
    env = {**os.environ, "EPA_CRASH_AT": f"{point}@{update}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "training.epa", *cli(workdir, out, *KILL_RUN)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == {"mid-step": ["step-2"], "checkpoint-writing": [".tmp-step-4", "step-2"],
                           "checkpoint-renamed": ["step-2", "step-4"]}[point]
    assert not (out / "model").exists()
    assert main(cli(workdir, out, *KILL_RUN, "--resume")) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["resumed_from"] == (4 if point == "checkpoint-renamed" else 2)
    assert_same_run(uninterrupted, out)


def test_lora_killed_mid_step_then_resumed_equals_uninterrupted(workdir, tmp_path):
    """SIGKILL mid-step, then --resume: bit-identical adapters and the same metrics.jsonl as a run never
    interrupted."""
    run = ("--use-peft", "--lora-r", "4", "--lora-alpha", "8", *KILL_RUN)
    uninterrupted = tmp_path / "uninterrupted"
    assert main(cli(workdir, uninterrupted, *run)) == 0
    out = tmp_path / "killed"
    env = {**os.environ, "EPA_CRASH_AT": "mid-step@3", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "training.epa", *cli(workdir, out, *run)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    assert main(cli(workdir, out, *run, "--resume")) == 0
    assert json.loads((out / "train_summary.json").read_text())["resumed_from"] == 2
    expected, got = saved_weights(uninterrupted), saved_weights(out)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert metrics(uninterrupted) == metrics(out)


def test_time_based_checkpoints_are_due_after_their_interval():
    """--save-minutes (default 30): due once the interval has passed, never at the last update (the model is saved
    then), off at 0; --save-steps is due on its own."""
    import time
    from types import SimpleNamespace

    from training.epa.trainer import checkpoint_due

    accelerator = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    args = SimpleNamespace(save_steps=0, save_minutes=30.0)
    now = time.monotonic()
    assert not checkpoint_due(accelerator, args, 1, 10, now)
    assert checkpoint_due(accelerator, args, 1, 10, now - 31 * 60)
    assert not checkpoint_due(accelerator, args, 10, 10, now - 31 * 60)
    args.save_minutes = 0.0
    assert not checkpoint_due(accelerator, args, 1, 10, now - 10**6)
    args.save_steps = 2
    assert checkpoint_due(accelerator, args, 4, 10, now) and not checkpoint_due(accelerator, args, 3, 10, now)
