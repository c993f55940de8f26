"""Atomic checkpoints and resume: accelerate's state (model, optimizer, scheduler, RNG) plus the data position.

A checkpoint is written to `checkpoints/.tmp-step-N` and renamed to `checkpoints/step-N` only once complete, so
a run killed mid-write never leaves a checkpoint that looks whole. `trainer_state.json` inside it holds the
optimizer step (the plan is a pure function of the seed, so the step is the data position) and the options
that must not change across a resume.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

STATE_FILE = "trainer_state.json"


def checkpoint_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(accelerator, output_dir: Path, step: int, fingerprint: dict, keep: int) -> Path:
    """Save every process's share (accelerate), then rename the finished directory (main process)."""
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
        (temporary / STATE_FILE).write_text(json.dumps({"step": step, "fingerprint": fingerprint}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        temporary.rename(final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def find_resume_point(output_dir: Path, resume: str) -> Path:
    """The checkpoint to resume from: the latest in OUTPUT_DIR (resume == "latest") or the given directory."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume: no complete checkpoint in {checkpoint_dir(output_dir)}")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (no {STATE_FILE})")
    return path


def load_checkpoint(accelerator, path: Path, fingerprint: dict) -> int:
    """Restore the state saved at `path`; returns its optimizer step. Options that change the run are refused."""
    state = json.loads((path / STATE_FILE).read_text())
    changed = sorted(k for k in fingerprint.keys() | state["fingerprint"].keys()
                     if fingerprint.get(k) != state["fingerprint"].get(k))
    if changed:
        details = ", ".join(f"{k}: {state['fingerprint'].get(k)!r} → {fingerprint.get(k)!r}" for k in changed)
        raise ValueError(f"--resume {path}: the run's options changed since the checkpoint ({details})")
    accelerator.load_state(str(path))
    return int(state["step"])
