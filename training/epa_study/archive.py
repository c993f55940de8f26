"""A study's portable part: what it takes to re-derive its report or to resume it on another machine.

The setting, the generated data (answers, gold rewards, held-out prompts) and each finished run's records, without
model weights, checkpoints, caches or plots (gigabytes, all recomputable): a few MB, kept beside the recorded report.
Each seed's preferences are not kept: `review_data.redraw` draws them again, identically, from the answers.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

DATA = ("responses.jsonl", "eval.jsonl", "meta.json")
RUN = ("train_summary.json", "timing.json", "metrics.jsonl", "eval")  # a run is finished when eval/ holds its result
# Settings added after studies were recorded, and the value every older study folder had.
SETTING_ADDED = {"gold": "prompt"}


def read_setting(out: Path) -> dict:
    """The setting of a study folder or archive (study.json), with SETTING_ADDED's values where an older one lacks
    them."""
    path = Path(out) / "study.json"
    if not path.is_file():
        raise SystemExit(f"error: {out} is not an EPA study folder (no study.json)")
    return {**SETTING_ADDED, **json.loads(path.read_text())["setting"]}


def portable_files(out: Path) -> list[Path]:
    """The portable files of the study folder `out`, relative to it; finished runs only."""
    out = Path(out)
    files = [Path("study.json"), *(Path("data") / name for name in DATA)]
    for result in sorted(out.glob("runs/*/seed-*/eval/linearity.json")):
        run = result.parent.parent
        for name in RUN:
            path = run / name
            found = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            files += [p.relative_to(out) for p in found if p.suffix != ".png"]  # records, not plots
    return [f for f in files if (out / f).exists()]  # a run may lack timing.json; data/ may be partial


def archive(out: Path, into: Path) -> int:
    """Copy the portable part of study folder `out` into `into` (replacing what is there); files copied."""
    out, into = Path(out), Path(into)
    if into.exists():
        shutil.rmtree(into)  # the archive mirrors the study as it is now
    files = portable_files(out)
    for relative in files:
        (into / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / relative, into / relative)
    return len(files)


def restore(archived: Path, out: Path) -> int:
    """Copy an archive into study folder `out`, keeping every file `out` already has; files copied.

    The setting travels with it (study.json), so the study's setting check then refuses options that differ.
    """
    archived, out = Path(archived), Path(out)
    if not (archived / "study.json").exists():
        raise SystemExit(f"error: --restore {archived}: not a study archive (no study.json)")
    if (out / "study.json").exists() and read_setting(out) != read_setting(archived):
        raise SystemExit(f"error: --restore {archived}: {out} holds a study with another setting; use another --out")
    copied = 0
    for path in sorted(p for p in archived.rglob("*") if p.is_file()):
        target = out / path.relative_to(archived)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            copied += 1
    return copied
