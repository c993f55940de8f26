"""`python -m training.epa` end to end on a tiny random-weight model: outputs, resume, reference cache, errors."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_causal_lm, tiny_config, tiny_tokenizer
from training_fixtures import ANSWERS, QUESTIONS, SEED, cli, metrics, saved_weights

from epa_kernels.transformers import BatchPlanner, PreferenceModel, PreferenceTokenizer, ReferenceCache
from training.epa import plan as plan_module
from training.epa import trainer as train_module
from training.epa.__main__ import main
from training.epa.cli import parse_args

ROOT = Path(__file__).resolve().parents[1]


def test_train_writes_model_logs_and_curves(workdir, tmp_path):
    out = tmp_path / "run"
    assert main(cli(workdir, out, "--epochs", "2", "--eval-data", str(workdir / "train.jsonl"))) == 0
    for name in ("model/config.json", "model/model.safetensors", "model/tokenizer.json", "metrics.jsonl",
                 "curves.png", "train_summary.json"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, len(train) + 1))
    assert all(key in train[0] for key in ("loss", "margin", "accuracy", "reward_weak", "lr", "tokens"))
    assert any(r["split"] == "eval" for r in records)
    initial = tiny_causal_lm("llama_tied", seed=SEED).state_dict()
    trained = saved_weights(out)
    assert not torch.equal(trained["model.layers.0.mlp.up_proj.weight"], initial["model.layers.0.mlp.up_proj.weight"])
    assert list((out / "reference-cache").glob("ref-logps-*.pt"))


def test_a_fresh_run_in_a_used_folder_starts_a_new_log(workdir, tmp_path):
    """Without --resume, a run into a folder an interrupted or finished run wrote to keeps none of its records."""
    out = tmp_path / "run"
    assert main(cli(workdir, out, "--max-steps", "2")) == 0
    first = metrics(out)
    assert main(cli(workdir, out, "--max-steps", "2")) == 0
    assert metrics(out) == first  # the same run again: the same two records, not four


def test_resume_is_bit_identical(workdir, tmp_path, monkeypatch):
    """Stop right after the checkpoint of update 2, resume: the final weights equal an uninterrupted run's."""
    full, broken = tmp_path / "full", tmp_path / "broken"
    args = ("--epochs", "2", "--save-steps", "2", "--backend", "torch")
    assert main(cli(workdir, full, *args)) == 0

    real_save = train_module.save_checkpoint

    def save_then_die(accelerator, output_dir, step, fingerprint, plan, keep):
        real_save(accelerator, output_dir, step, fingerprint, plan, keep)
        if step == 2:
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        main(cli(workdir, broken, *args))
    monkeypatch.setattr(train_module, "save_checkpoint", real_save)
    assert not (broken / "model").exists()
    assert main(cli(workdir, broken, *args, "--resume")) == 0
    expected, resumed = saved_weights(full), saved_weights(broken)
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name
    assert metrics(full) == metrics(broken)


def test_resume_refuses_changed_options(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli(workdir, out, "--save-steps", "1", "--max-steps", "1")) == 0
    capsys.readouterr()
    assert main(cli(workdir, out, "--save-steps", "1", "--max-steps", "1", "--beta", "0.2", "--resume")) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: --resume") and "beta: 0.1 → 0.2" in error and len(error.splitlines()) == 1


def test_precomputed_cache_equals_live_reference_and_is_keyed(workdir, tmp_path):
    """The cached ref log-probs of a planned step equal the reference model's live ones; changing the model,
    the data or an option moves the cache to another file."""
    out = tmp_path / "run"
    assert main(cli(workdir, out, "--max-steps", "2")) == 0
    args = parse_args(cli(workdir, out))
    tokenizer = tiny_tokenizer()
    sharing, _ = plan_module.use_prefix_sharing(args.prefix_sharing, None, tiny_config("llama_tied"))  # auto, CPU: on
    split = plan_module.load_split(args.data, "train", tokenizer, args, 1, shuffle=True, prefix_sharing=sharing)
    (cache_file,) = (out / "reference-cache").glob("ref-logps-*.pt")
    stored = torch.load(cache_file, weights_only=True)
    fingerprint = json.loads(stored["fingerprint"])
    cache = ReferenceCache(out / "reference-cache", fingerprint)
    assert cache.path == cache_file and len(cache) > 0
    step = split.planner.plan_epoch(0)[0]
    batch = split.planner.collate(step.shards[0])
    reference = PreferenceModel(tiny_causal_lm("llama_tied", seed=SEED), backend="auto")
    with torch.no_grad():
        live = reference.sequence_logps(batch).double()
    torch.testing.assert_close(cache.lookup(batch["keys"]), live, rtol=1e-6, atol=1e-5)
    for change in ({"model": "another"}, {"data": "another"}, {"max_length": 77}, {"reduction": "mean"},
                   {"bf16": True}):
        assert ReferenceCache(out / "reference-cache", {**fingerprint, **change}).path != cache_file, change
    with pytest.raises(KeyError, match="no cached reference"):
        cache.lookup(torch.tensor([[999, 0, 999]]))


def test_filter_eps_reaches_the_policy_loss(workdir, tmp_path, monkeypatch):
    """--filter-eps is handed to the fused loss of the policy (not to the reference pass) and the run trains."""
    seen = []
    real = train_module.PreferenceModel.forward

    def spy(self, batch):
        seen.append(self.loss_options.get("filter_eps"))
        return real(self, batch)

    monkeypatch.setattr(train_module.PreferenceModel, "forward", spy)
    assert main(cli(workdir, tmp_path / "filtered", "--max-steps", "1", "--filter-eps", "1e-5")) == 0
    assert seen and all(eps == 1e-5 for eps in seen)


def test_reference_modes_model_and_none(workdir, tmp_path):
    assert main(cli(workdir, tmp_path / "live", "--max-steps", "1", "--ref", "model")) == 0
    assert main(cli(workdir, tmp_path / "simpo", "--max-steps", "1", "--loss", "simpo")) == 0
    assert not (tmp_path / "live" / "reference-cache").exists()
    summary = json.loads((tmp_path / "simpo" / "train_summary.json").read_text())
    assert summary["options"]["ref"] == "none"


@pytest.mark.parametrize("extra, message", [
    (("--loss", "simpo", "--ref", "precompute"), "reference-free"),
    (("--loss", "plackett_luce", "--num-weak", "2"), "weak negatives have no rank"),
    (("--loss", "ipo", "--margin", "0.5"), "--loss ipo does not use --margin"),
    (("--max-prompt-length", "600", "--max-length", "500"), "max-prompt-length"),
    (("--beta", "nan"), "--beta"),
    (("--prefix-sharing", "on", "--attn", "flash_attention_2", "--dtype", "bfloat16"),
     "needs attention that takes a mask"),
    (("--filter-eps", "-1"), "--filter-eps must be a positive"),
    (("--filter-eps", "1e-5", "--backend", "torch"), "not --backend torch"),
])
def test_bad_options_are_rejected_before_loading(workdir, tmp_path, extra, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(cli(workdir, tmp_path / "x", *extra))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_prefix_sharing_auto_falls_back_where_it_cannot_mask():
    choose = plan_module.use_prefix_sharing
    assert choose("auto", "sdpa", tiny_config("llama")) == (True, "")
    assert choose("off", "sdpa", tiny_config("llama"))[0] is False
    on, why = choose("auto", "flash_attention_2", tiny_config("llama"))
    assert not on and "flash_attention_2" in why
    bidirectional = tiny_config("gemma3", use_bidirectional_attention=True)
    on, why = choose("auto", "sdpa", bidirectional)
    assert not on and "bidirectionally" in why
    with pytest.raises(plan_module.TrainError, match="bidirectionally"):
        choose("on", "sdpa", bidirectional)


def test_unknown_loss_is_an_argparse_error(workdir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(cli(workdir, tmp_path / "x", "--loss", "kto"))
    assert "invalid choice: 'kto'" in capsys.readouterr().err


@pytest.mark.parametrize("row, message", [
    ({"prompt": "q", "chosen": "a"}, "row 1: missing column(s) ['rejected']"),
    ({"prompt": "q", "chosen": "a", "rejected": "  "}, "row 1, column 'rejected': empty response"),
    ({"prompt": "q", "chosen": "same", "rejected": ["other", "same"]}, "row 1, column 'rejected[1]': identical"),
])
def test_bad_rows_name_row_and_column(workdir, tmp_path, row, message, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "q0", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(row) + "\n")
    args = cli(workdir, tmp_path / "x")
    args[args.index("--data") + 1] = str(data)
    assert main(args) == 2
    assert message in capsys.readouterr().err


def test_prefix_sharing_on_and_off_train_alike(workdir, tmp_path, capsys):
    """Same steps (the budget fits everything either way), same updates: only the layout differs."""
    weights = {}
    for mode in ("on", "off"):
        out = tmp_path / mode
        assert main(cli(workdir, out, "--max-steps", "2", "--ref", "model", "--max-tokens-per-batch", "5000",
                        "--prefix-sharing", mode)) == 0
        weights[mode] = saved_weights(out)
    log = capsys.readouterr().out
    assert "prefix sharing:" in log and "0." in log.split("prefix sharing:")[1].splitlines()[0]
    assert weights["on"].keys() == weights["off"].keys()
    for name in weights["on"]:
        torch.testing.assert_close(weights["on"][name], weights["off"][name], rtol=1e-4, atol=1e-5, msg=name)


def test_infonca_needs_ranked_data(workdir, tmp_path, capsys):
    assert main(cli(workdir, tmp_path / "x", "--loss", "infonca")) == 2
    assert "needs scores" in capsys.readouterr().err


def test_ranked_data_trains_infonca(workdir, tmp_path):
    data = tmp_path / "ranked.jsonl"
    rng = random.Random(SEED)
    with data.open("w") as handle:
        for i in range(6):
            handle.write(json.dumps({"prompt": f"{QUESTIONS[i % 4]} ", "completions": rng.sample(ANSWERS, 3),
                                     "scores": [rng.uniform(-2, 2) for _ in range(3)]}) + "\n")
    args = cli(workdir, tmp_path / "run", "--loss", "infonca", "--max-steps", "2")
    args[args.index("--data") + 1] = str(data)
    assert main(args) == 0


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun on CPU is exercised on Linux")
def test_torchrun_two_ranks_one_update_matches_one_process(workdir, tmp_path):
    """The program under torchrun (gloo, 2 ranks): one update over a step both ranks share equals one process
    holding the whole step (same logged loss, same parameters after AdamW)."""
    budget = ("--max-tokens-per-batch", "4000", "--max-steps", "1", "--lr", "1e-5", "--backend", "torch")
    single = tmp_path / "single"
    assert main(cli(workdir, single, *budget)) == 0
    ddp = tmp_path / "ddp"
    # Half the budget per rank, so the same prompts form one step split across the two ranks.
    args = cli(workdir, ddp, *budget)
    args[args.index("--max-tokens-per-batch", args.index("--no-progress")) + 1] = "2000"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "-m", "training.epa", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 rank(s)" in result.stdout
    plan_single = json.loads((single / "metrics.jsonl").read_text().splitlines()[0])
    plan_ddp = json.loads((ddp / "metrics.jsonl").read_text().splitlines()[0])
    assert plan_ddp["tokens"] == plan_single["tokens"]
    assert plan_ddp["loss"] == pytest.approx(plan_single["loss"], rel=1e-5)
    expected, got = saved_weights(single), saved_weights(ddp)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-7, msg=name)


def test_planner_budget_split_used_by_torchrun_test_is_one_step(workdir):
    """The torchrun test relies on all prompts fitting one step of 2 × 2000 tokens and one batch of 4000."""
    args = parse_args(cli(workdir, "/tmp/unused"))
    tokenizer = tiny_tokenizer()
    examples, _ = PreferenceTokenizer(tokenizer, max_length=args.max_length,
                                      max_prompt_length=args.max_prompt_length)(
        [json.loads(line) for line in (workdir / "train.jsonl").read_text().splitlines()])
    one = BatchPlanner(examples, max_tokens_per_batch=4000, num_weak=2, seed=SEED).plan_epoch(0)
    two = BatchPlanner(examples, max_tokens_per_batch=2000, num_weak=2, seed=SEED, world_size=2).plan_epoch(0)
    assert len(one) == 1 and len(two) == 1 and all(two[0].shards)
    merged = [p for shard in two[0].shards for p in shard]
    assert merged == list(one[0].shards[0])
