"""The run's record in OUT: curves.json (resumed when its configuration matches) and split.json."""
from __future__ import annotations

import json
import os
from pathlib import Path

from training.active_learning.cli import ALError

# 2: text-grouped split, normalised labels, content hash in the fingerprint; 3: transformers' linear schedule
# (its warm-up starts at lr 0, so models trained under 2 are not retrained the same)
FORMAT_VERSION = 3
# Options that change the numbers: results recorded under other values are not resumed. The fingerprint also
# holds "data_sha256", a hash of the pool and test texts and labels (the data's content, not just its path).
FINGERPRINT_KEYS = (
    "data", "text_column", "label_column", "split", "test_data", "test_split", "test_fraction", "test_limit",
    "pool_limit", "split_seed", "dedupe", "model", "tokenizer", "strategy_option", "initial_size", "query_size",
    "epochs", "min_steps", "lr", "weight_decay", "warmup", "batch_size", "eval_batch_size", "max_length",
    "precision", "group_by_length", "data_sha256", "initial", "mlm_model", "mlm_steps",
)
# Keys added after records were written: an older record holds their value at the time (the default).
LEGACY = {"initial": "random", "mlm_model": None, "mlm_steps": None}
# The masked LM changes only what ALPS does: a record made without ALPS takes any, one made with ALPS only its own
# (or a resume that runs no ALPS).
ALPS_KEYS = ("mlm_model", "mlm_steps")
FITTED_HEAD = "fitted-head"  # the fingerprint's name for the default masked LM (training/active_learning/mlm.py)


def uses_alps(args) -> bool:
    return "alps" in args.strategies or args.initial == "alps"


PATH_KEYS = ("data", "test_data", "model", "tokenizer", "mlm_model")  # compared as absolute paths when they are paths


def _as_path(spec):
    """An existing path as an absolute one (the same file from another working directory), else as given."""
    if spec is None:
        return None
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def fingerprint(args) -> dict:
    out = {k: getattr(args, k, None) for k in FINGERPRINT_KEYS}
    if not uses_alps(args):
        out.update(dict.fromkeys(ALPS_KEYS))
    elif out["mlm_model"] is None:
        out["mlm_model"] = FITTED_HEAD
    else:
        out["mlm_steps"] = None  # only the fitted head takes steps
    for key in PATH_KEYS:
        out[key] = _as_path(out[key])
    out["strategy_option"] = sorted(out["strategy_option"] or [])
    return out


def load_state(path: Path, args, label_names) -> dict:
    fresh = {"version": FORMAT_VERSION, "config": fingerprint(args), "label_names": label_names, "curves": {},
             "sessions": []}
    if not args.resume or not path.exists():
        return fresh
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ALError(f"{path} is not valid JSON ({e}); remove it or pass --no-resume") from e
    if state.get("version") != FORMAT_VERSION:
        raise ALError(f"{path}: format version {state.get('version')} != {FORMAT_VERSION}; use --no-resume")
    old, new = {**LEGACY, **state.get("config", {})}, fingerprint(args)
    alps_now = uses_alps(args)
    diff = [f"{k}: recorded {old[k]!r}, now {new[k]!r}" for k in FINGERPRINT_KEYS
            if old[k] != new[k] and not (k in ALPS_KEYS and (old[k] is None or not alps_now))]
    if diff:
        raise ALError(f"{path} holds results of a different configuration ({'; '.join(diff)}); "
                      "use another --out or --no-resume to discard them")
    state["label_names"] = label_names
    # the same numbers; a record resumed with ALPS added now names its masked LM, one resumed without ALPS keeps it
    state["config"] = new if alps_now else {**new, **{k: old[k] for k in ALPS_KEYS}}
    state["sessions"] = sessions(state)
    state.pop("environment", None)
    return state


def sessions(state: dict) -> list[dict]:
    """The recorded sessions. Records of this version written before sessions were kept hold one "environment":
    the latest session's only, marked so (earlier sessions are unknown)."""
    if "sessions" in state:
        return state["sessions"]
    return [{**state["environment"], "earlier_sessions_unrecorded": True}] if "environment" in state else []


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)

