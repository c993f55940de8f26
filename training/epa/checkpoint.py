"""Atomic checkpoints and resume: accelerate's state (model, optimizer, scheduler, RNG) plus the data position.

A checkpoint is written to `checkpoints/.tmp-step-N` and renamed to `checkpoints/step-N` only once complete, so
a run killed mid-write never leaves a checkpoint that looks whole. `trainer_state.json` inside it holds the
optimizer step (the plan is a pure function of the seed and options, so the step is the data position), the
fingerprint of the options a resume must share, and a digest of the plan's steps taken so far: a resume goes on
only when its own plan takes the same steps up to there, so a run may be extended (more epochs, a larger
--max-steps) but never silently changed.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

from epa_kernels.transformers.batching import plan_digest
from training.epa.cli import TrainError

STATE_FILE = "trainer_state.json"
def crash_point(name: str, update: int) -> None:
    """Fault injection for the crash-and-resume test: EPA_CRASH_AT=NAME@UPDATE kills this process with SIGKILL at
    the point so named ("mid-step", "checkpoint-writing", "checkpoint-renamed"); nothing else reads the variable."""
    if os.environ.get("EPA_CRASH_AT") == f"{name}@{update}":
        os.kill(os.getpid(), signal.SIGKILL)


def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a `.tmp-step-N` left by a crash is not one)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(accelerator, output_dir: Path, step: int, fingerprint: dict, plan: str, keep: int) -> Path:
    """Save every process's share (accelerate), then rename the finished directory (main process). plan: the
    `plan_digest` of the steps taken so far."""
    root = checkpoint_dir(output_dir)
    final = root / f"step-{step}"
    temporary = root / f".tmp-step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        crash_point("checkpoint-writing", step)  # the weights and optimizer are written, the state file is not
        state = {"step": step, "fingerprint": fingerprint, "plan": plan}
        (temporary / STATE_FILE).write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        temporary.rename(final)
        crash_point("checkpoint-renamed", step)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def find_resume_point(output_dir: Path, resume: str) -> Path:
    """The checkpoint to resume from: the latest in OUTPUT_DIR (resume == "latest") or the given directory."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise TrainError(f"--resume: no complete checkpoint in {checkpoint_dir(output_dir)}")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise TrainError(f"--resume {resume}: not a complete checkpoint (no {STATE_FILE})")
    return path


def check_resume(path: Path, fingerprint: dict, steps, accumulation: int, total_updates: int) -> int:
    """The update to resume at, once the checkpoint is known to continue this run: the same options (each change
    named) and a plan that takes the same steps up to the checkpoint. steps: this run's planned steps; accumulation:
    steps per update. Raises TrainError (the program's one-line error) otherwise."""
    state = json.loads((path / STATE_FILE).read_text())
    saved = state["fingerprint"]
    changed = sorted(k for k in fingerprint.keys() | saved.keys() if fingerprint.get(k) != saved.get(k))
    if changed:
        details = ", ".join(f"{k}: {saved.get(k)!r} → {fingerprint.get(k)!r}" for k in changed)
        raise TrainError(f"--resume {path}: the run changed since the checkpoint ({details}); resume with the "
                         "checkpoint's options or start a new --output-dir")
    step = int(state["step"])
    taken = step * accumulation
    if step > total_updates or taken > len(steps):
        raise TrainError(f"--resume {path}: the checkpoint is at update {step}, past this run's {total_updates} "
                         "updates (raise --epochs or --max-steps)")
    if plan_digest(steps[:taken]) != state["plan"]:
        raise TrainError(f"--resume {path}: this run's plan does not take the checkpoint's {step} updates' steps "
                         "(same options, so the data or the planner changed); start a new --output-dir")
    return step


def trainable_checkpoints(accelerator) -> None:
    """Make this run's checkpoints hold only the parameters that train (an adapter run: megabytes of adapters,
    not the frozen base, which the model folder already holds unchanged)."""

    def drop_frozen(models, weights, output_dir):
        for i, model in enumerate(models):
            trainable = {name for name, p in model.named_parameters() if p.requires_grad}
            weights[i] = {k: v for k, v in weights[i].items() if k in trainable}

    accelerator.register_save_state_pre_hook(drop_frozen)


def load_checkpoint(accelerator, path: Path, *, trainable_only: bool = False) -> None:
    """Restore the model, optimizer, scheduler and RNG states saved at `path` (after `check_resume`).
    trainable_only: the checkpoint holds the trainable parameters alone (`trainable_checkpoints`); every one of
    them must be there, and nothing else."""
    if not trainable_only:
        accelerator.load_state(str(path))
        return
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as saved:
        keys = set(saved.keys())
    model = accelerator._models[0]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if keys != trainable:
        raise TrainError(f"--resume {path}: the checkpoint's weights are not this run's trainable parameters "
                         f"({len(keys - trainable)} unexpected, {len(trainable - keys)} missing)")
    accelerator.load_state(str(path), strict=False)  # the frozen base stays as loaded from --model
