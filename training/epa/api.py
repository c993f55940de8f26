"""The trainer as a Python function: `train(EPAConfig(model=..., data=..., output_dir=...))`, or the same fields as
keywords, returns the run's summary (what OUTPUT_DIR/train_summary.json holds).

`EPAConfig` is generated from the command line's parser (`cli.build_parser`): one field per option, named as its
underscore spelling, with the option's default. `train` turns the fields that differ from their default back into
command-line words and parses them with the program's own `parse_args`, so conversions, defaults and every check
are the command line's: the two cannot drift. A bad value raises `TrainError` (a ValueError) with the program's
one-line message, before anything loads.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
from typing import Any

from training.epa.cli import build_parser, parse_args

_SKIPPED = {"help", "config"}  # --help is no option of a run; a YAML file's keys are this dataclass's fields


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest → the action that spells it on the command line (the first: `--disable-dropout`, not its negation)."""
    options = {}
    for action in parser._actions:
        if action.dest not in _SKIPPED and action.option_strings and action.dest not in options:
            options[action.dest] = action
    return options


def _make_config() -> type:
    fields = []
    for dest, action in _options(build_parser()).items():
        default = action.default
        value = dataclasses.field(default_factory=lambda d=default: list(d)) if isinstance(default, list) else \
            dataclasses.field(default=default)
        fields.append((dest, Any, value))
    namespace = {"__doc__": "Every option of `python -m training.epa`, by its underscore name, with its default "
                            "(`python -m training.epa --help` describes each one). Checked when `train` runs."}
    return dataclasses.make_dataclass("EPAConfig", fields, namespace=namespace, kw_only=True)


EPAConfig = _make_config()


def _words(action: argparse.Action, value) -> list[str]:
    """The command-line words that give `value` to `action`."""
    option = action.option_strings[0]
    if value is None:
        return [option, "none"]
    if isinstance(value, bool):
        return [option, str(value).lower()]
    if isinstance(value, list | tuple):
        return [option, *map(str, value)]
    return [option, str(value)]


def to_argv(config) -> list[str]:
    """The command line that runs `config` (only the options that differ from their defaults)."""
    argv = []
    for dest, action in _options(build_parser()).items():
        value = getattr(config, dest)
        default = action.default
        if value == default or (isinstance(value, tuple) and list(value) == default):
            continue
        argv += _words(action, value)
    return argv


def train(config=None, **options) -> dict:
    """Train as `python -m training.epa` would with these options; returns the run's summary.

    config: an `EPAConfig` (or None); options: fields that override it, e.g.
    `train(model="path", data="prefs.jsonl", output_dir="run", use_peft=True)`.
    """
    if config is not None and not isinstance(config, EPAConfig):
        raise TypeError(f"config must be an EPAConfig, got {type(config).__name__}")
    known = {f.name for f in dataclasses.fields(EPAConfig)}
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            raise TypeError(f"train() got an unknown option {name!r}" + (f"; did you mean {close[0]!r}?" if close
                                                                          else ""))
    config = dataclasses.replace(config or EPAConfig(), **options)
    args = parse_args(to_argv(config), raise_errors=True)
    from training.epa.trainer import run

    return run(args)
