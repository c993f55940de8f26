"""`from training.epa import EPAConfig, train`: one field per command-line option with its default, the same run as
the command line, the same checks as exceptions."""
import dataclasses

import pytest
from training_fixtures import SEED, cli, metrics, saved_weights

from training.epa import EPAConfig, TrainError, train
from training.epa.__main__ import main
from training.epa.api import to_argv
from training.epa.cli import build_parser, parse_args


def test_config_has_every_option_with_its_default():
    parser = build_parser()
    dests = {a.dest for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    fields = {f.name: f for f in dataclasses.fields(EPAConfig)}
    assert set(fields) == dests
    config = EPAConfig()
    for name in fields:
        assert getattr(config, name) == parser.get_default(name), name
    assert EPAConfig().lora_target_modules is not EPAConfig().lora_target_modules  # no shared mutable default


def test_config_round_trips_through_the_command_line():
    config = EPAConfig(model="m", data="d.jsonl", output_dir="o", use_peft=True, lora_r=8, lr=3e-4, bf16=True,
                       disable_dropout=False, lora_dropout=0.1, lora_target_modules=["q_proj", "v_proj"],
                       max_prompt_length=None, num_weak=0, loss="dpo")
    args = parse_args(to_argv(config))
    for field in dataclasses.fields(EPAConfig):
        assert getattr(args, field.name) == getattr(config, field.name) or field.name == "ref", field.name
    assert args.ref == "precompute"  # the command line's own resolution of the default


def test_train_is_the_command_line_run(workdir, tmp_path):
    """The same options through train() and through main(): the same summary, metrics and weights."""
    assert main(cli(workdir, tmp_path / "cli", "--max-steps", "2", "--use-peft", "--lora-r", "4")) == 0
    summary = train(EPAConfig(model=str(workdir / "model"), data=str(workdir / "train.jsonl"),
                              output_dir=str(tmp_path / "api"), num_weak=2, max_tokens_per_batch=600, lr=1e-3,
                              seed=SEED, no_progress=True, max_steps=2, use_peft=True), lora_r=4)
    assert summary["updates"] == 2 and summary["options"]["use_peft"] is True
    assert metrics(tmp_path / "api") == metrics(tmp_path / "cli")
    a, b = saved_weights(tmp_path / "api"), saved_weights(tmp_path / "cli")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("options, error, message", [
    ({"lr": -1.0}, TrainError, "--lr must be a positive finite number"),
    ({"loss": "nope"}, TrainError, "invalid choice: 'nope'"),
    ({"lora_r": 8}, TrainError, "--lora-r configure LoRA adapters: add --use-peft"),
    ({"lora_rank": 8}, TypeError, "unknown option 'lora_rank'; did you mean 'lora_r'?"),
])
def test_bad_options_raise_before_anything_loads(options, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace("?", r"\?")):
        train(model="m", data="d.jsonl", output_dir="o", **options)


def test_required_options_are_named():
    with pytest.raises(TrainError, match="--model is required"):
        train(data="d.jsonl", output_dir="o")


def test_train_stays_the_function_after_the_trainer_module_loads():
    """The run lives in training/epa/trainer.py: a submodule named `train` would replace the package's function
    as soon as anything imported it."""
    import training.epa
    import training.epa.trainer  # noqa: F401

    assert callable(training.epa.train) and training.epa.train.__module__ == "training.epa.api"
