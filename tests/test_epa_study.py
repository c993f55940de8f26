"""The EPA study: its data (a gold reward that depends on the prompt, and the control's that does not; the rescoring
of existing answers), the evaluation's KL estimate, and the study program end to end on a tiny model (resume,
setting check, report)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("afinn", reason="the study's gold reward needs afinn: pip install afinn")

from training import review_data as rd  # noqa: E402

SEED = 11


def test_prompts_parse_back_and_split_by_subject():
    train, held_out = rd.split_prompts(5, SEED)
    assert len(held_out) == 5 * 4 and len(train) == (len(rd.SUBJECTS) - 5) * 4
    subjects = [{rd.parse_prompt(t)[1] for t in part} for part in (train, held_out)]
    assert not subjects[0] & subjects[1]  # held-out prompts ask about unseen subjects
    assert (train, held_out) == rd.split_prompts(5, SEED) != rd.split_prompts(5, SEED + 1)
    assert rd.parse_prompt(rd.make_prompt(1, "negative", "the Eiffel Tower")) == ("negative", "the Eiffel Tower")
    with pytest.raises(ValueError, match="not a review prompt"):
        rd.parse_prompt("What is the capital of France?")


def test_gold_reward_is_signed_sentiment_minus_the_off_subject_penalty():
    positive = rd.make_prompt(0, "positive", "cats")
    negative = rd.make_prompt(0, "negative", "cats")
    # AFINN: love +3, wonderful +4, hate −3; halved, clipped to ±3, minus 2 when the subject is not named
    assert rd.gold_reward(positive, "I love my cat.") == 1.5
    assert rd.gold_reward(negative, "I love my cat.") == -1.5
    assert rd.gold_reward(positive, "I love cats, they are wonderful.") == 3.0  # 3.5 clipped
    assert rd.gold_reward(positive, "I love dogs.") == 1.5 - rd.OFF_SUBJECT_PENALTY
    assert rd.gold_reward(negative, "I hate dogs.") == 1.5 - rd.OFF_SUBJECT_PENALTY
    assert rd.gold_reward(rd.conversation(negative), "Cats.") == 0.0  # messages are read like the user text
    assert rd.names_subject("The tower was tall", "the Eiffel Tower") and not rd.names_subject("Nice.", "the Louvre")


def test_sentiment_reward_ignores_the_prompt():
    answers = ("I love my cat.", "I love cats, they are wonderful.", "I hate dogs.", "Opera.")
    prompts = [rd.make_prompt(t, p, s) for t in (0, 1) for p in rd.POLARITIES for s in ("cats", "opera")]
    for answer, expected in zip(answers, (1.5, 3.0, -1.5, 0.0), strict=True):  # AFINN / 2, clipped to ±3
        assert {rd.sentiment_reward(p, answer) for p in prompts} == {expected}
    assert rd.sentiment_reward(rd.conversation(prompts[0]), "I hate dogs.") == -1.5
    with pytest.raises(ValueError, match="not a review prompt"):
        rd.sentiment_reward("What is the capital of France?", "Paris.")


def test_weak_negative_gap_against_own_and_own_rejected_answers():
    prompts = [rd.make_prompt(0, "positive", "cats"), rd.make_prompt(0, "negative", "opera")]
    answers = [["I love cats.", "Cats."], ["Opera is awful.", "Opera."]]
    # prompt gold: own 1.5, 0 | 1.5, 0; rejected (all but the best) 0 | 0; each under the other prompt: off subject,
    # the other polarity: −1.5 − 2, 0 − 2 | −1.5 − 2, 0 − 2
    gap = rd.weak_negative_gap(prompts, answers, SEED, others=1)
    assert gap == {"own_mean": 0.75, "other_prompts_mean": -2.75, "gap": 3.5, "other_prompts_sampled": 1,
                   "own_rejected_mean": 0.0, "gap_vs_rejected": 2.75}
    # sentiment gold: own 1.5, 0 | −1.5, 0 (best: "Opera.", rejected −1.5); other prompts' the same values
    gap = rd.weak_negative_gap(prompts, answers, SEED, others=1, gold=rd.sentiment_reward)
    assert (gap["own_mean"], gap["other_prompts_mean"], gap["own_rejected_mean"]) == (0.0, 0.0, -0.75)
    assert gap["gap"] == 0.0 and gap["gap_vs_rejected"] == -0.75
    with pytest.raises(ValueError, match="≥ 2 prompts"):
        rd.weak_negative_gap(prompts[:1], answers[:1], SEED)


def test_the_study_evaluates_with_the_gold_each_variant_trained_on():
    from importlib import import_module

    from training.epa_study.arms import GOLD

    assert set(GOLD) == set(rd.GOLDS) == set(rd.GOLD_DESCRIPTIONS)
    for name, spec in GOLD.items():
        module, function = spec.split(":")
        assert getattr(import_module(module), function) is rd.GOLDS[name]
        assert rd.GOLD_DESCRIPTIONS[name].startswith(spec)


RECORD = Path(__file__).resolve().parents[1] / "benchmarks/results/2026-12-04_cpu_epa-study/study/data"


@pytest.mark.skipif(not RECORD.is_dir(), reason="the recorded EPA study is not in this checkout")
def test_rescoring_the_recorded_answers_with_their_gold_reproduces_them(tmp_path):
    meta = rd.rescore(RECORD, tmp_path, "prompt")
    for name in ("responses.jsonl", "eval.jsonl"):  # every gold value and score, to the byte
        assert (tmp_path / name).read_bytes() == (RECORD / name).read_bytes(), name
    recorded = json.loads((RECORD / "meta.json").read_text())
    assert meta["gold"] == recorded["gold"] and meta["gold_reward"] == recorded["gold_reward"]
    gap = meta["weak_negative_gap"]
    assert {k: gap[k] for k in recorded["weak_negative_gap"]} == recorded["weak_negative_gap"]
    assert gap["own_rejected_mean"] < gap["own_mean"] and gap["gap_vs_rejected"] > 0  # weak negatives are worse
    assert rd.gap_of(RECORD, "prompt") == gap
    # the control on the same answers: each answer's gold is the same under every prompt, so other prompts' answers
    # are as good as the prompt's own, and better than its rejected ones
    gap = rd.rescore(RECORD, tmp_path / "sentiment", "sentiment")["weak_negative_gap"]
    assert abs(gap["gap"]) < 0.05 and gap["gap_vs_rejected"] < -0.1
    other = rd.make_prompt(0, "negative", "pigeons")
    for r in rd.read_records(tmp_path / "sentiment" / "responses.jsonl")[::50]:
        assert r["gold"] == [rd.sentiment_reward(other, t) for t in r["responses"]]


@pytest.fixture(scope="module")
def generated(workdir, tmp_path_factory):
    """A data folder written by the generator (tiny model): 6 training and 4 held-out prompts, 3 answers each."""
    out = tmp_path_factory.mktemp("review-data") / "data"
    assert rd.main(["--out", str(out), "--model", str(workdir / "model"), "--limit-train", "6",
                    "--num-eval-subjects", "1", "--responses-per-prompt", "3", "--max-new-tokens", "4"]) == 0
    return out


def test_rescore_reproduces_the_generator_and_scores_the_control(generated, tmp_path):
    files = ["responses.jsonl", "eval.jsonl", "train_pairs.jsonl", "train_multi.jsonl", "train_ranked.jsonl"]
    meta = rd.rescore(generated, tmp_path / "prompt", "prompt")
    for name in files:
        assert (tmp_path / "prompt" / name).read_bytes() == (generated / name).read_bytes(), name
    made = json.loads((generated / "meta.json").read_text())
    changed = {k for k in made if made[k] != meta[k]}
    assert changed == {"options"} and meta["options"] == {**made["options"], "out": str(tmp_path / "prompt")}
    assert meta["rescored"]["from"] == str(generated)

    meta = rd.rescore(generated, tmp_path / "sentiment", "sentiment")
    records = rd.read_records(tmp_path / "sentiment" / "responses.jsonl")
    assert [r["responses"] for r in records] == [r["responses"] for r in rd.read_records(generated / "responses.jsonl")]
    other = rd.make_prompt(1, "negative", "the Eiffel Tower")
    for r in records:  # the prompt-independent value, under this prompt or any other
        assert r["gold"] == [rd.sentiment_reward(other, t) for t in r["responses"]]
    held_out = {r["prompt"]: r for r in records if r["split"] == "eval"}
    for row in (json.loads(line) for line in (tmp_path / "sentiment" / "eval.jsonl").read_text().splitlines()):
        answers = [c[0]["content"] for c in row["completions"]]
        assert row["scores"] == [rd.sentiment_reward(other, t) for t in answers]
        assert set(answers) <= set(held_out[row["prompt"][-1]["content"]]["responses"])
    train = [r for r in records if r["split"] == "train"]
    assert meta["weak_negative_gap"] == rd.weak_negative_gap([r["prompt"] for r in train],
                                                             [r["responses"] for r in train], made["seed"],
                                                             gold=rd.sentiment_reward)
    assert meta["gold_reward"].startswith("training.review_data:sentiment_reward")
    assert rd.gap_of(tmp_path / "sentiment", "sentiment") == meta["weak_negative_gap"]
    for args, message in (((generated, generated, "prompt"), "another folder"), ((generated, tmp_path, "x"), "one of"),
                          ((tmp_path, tmp_path / "y", "prompt"), "not a finished"),
                          ((generated, tmp_path / "z", "prompt", 0.0), "bt_scale")):
        with pytest.raises(rd.DemoDataError, match=message):
            rd.rescore(*args)


def test_a_study_takes_another_folders_answers_under_its_gold(generated, tmp_path, capsys):
    from training.epa_study.study import Study, main, parse_args

    options = ["--limit-train", "6", "--num-eval-subjects", "1", "--responses-per-prompt", "3", "--max-new-tokens",
               "4", "--model", json.loads((generated / "meta.json").read_text())["options"]["model"]]
    out = tmp_path / "epa-study-sentiment"
    argv = ["--out", str(out), "--gold", "sentiment", "--answers-from", str(generated), *options]
    assert main([*argv, "--dry-run", "--seeds", "0", "--arms", "epa-k5"]) == 0
    printed = capsys.readouterr().out
    assert f"== data: -m training.review_data --out {out / 'data'} --answers-from {generated} --gold sentiment" \
        in printed and "--gold-reward training.review_data:sentiment_reward" in printed
    study = Study(parse_args(argv))
    study.check_setting()
    (study.base).mkdir(parents=True)
    (study.base / "config.json").write_text("{}")  # the base model is not this test's business
    study.prepare()
    rd.rescore(generated, tmp_path / "expected", "sentiment")
    for name in ("responses.jsonl", "eval.jsonl"):
        assert (out / "data" / name).read_bytes() == (tmp_path / "expected" / name).read_bytes()
    with pytest.raises(SystemExit):
        parse_args([*argv, "--max-new-tokens", "5"])
    assert "answers made with other options (max_new_tokens: 4 there, 5 here)" in capsys.readouterr().err


def test_a_folder_holds_one_gold_variant(tmp_path):
    from training.epa_study.archive import restore
    from training.epa_study.study import SETTING, Study, parse_args

    legacy = tmp_path / "legacy"  # a study made before --gold: it was the prompt gold
    legacy.mkdir()
    args = parse_args([])
    (legacy / "study.json").write_text(json.dumps({"setting": {k: getattr(args, k) for k in SETTING if k != "gold"}}))
    Study(parse_args(["--out", str(legacy)])).check_setting()
    with pytest.raises(SystemExit, match="another setting .*gold: prompt → sentiment"):
        Study(parse_args(["--out", str(legacy), "--gold", "sentiment"])).check_setting()
    new = tmp_path / "new"
    Study(parse_args(["--out", str(new)])).check_setting()
    assert json.loads((new / "study.json").read_text())["setting"]["gold"] == "prompt"
    assert restore(legacy, new) == 0  # the same setting, written before and after --gold
    sentiment = tmp_path / "sentiment"
    Study(parse_args(["--out", str(sentiment), "--gold", "sentiment"])).check_setting()
    with pytest.raises(SystemExit, match="another setting"):
        restore(legacy, sentiment)


def test_redraw_draws_other_preferences_from_the_same_answers(tmp_path):
    prompts = [rd.make_prompt(0, "positive", s) for s in ("cats", "dogs", "opera")]
    answers = [["I love cats.", "Cats are bad.", "Meh.", "Cats!"], ["Dogs are great.", "Awful dogs.", "Dogs.", "Ok."],
               ["Opera is wonderful.", "Opera bores me.", "Hmm.", "Opera."]]
    with (tmp_path / "responses.jsonl").open("w") as handle:
        for text, texts in zip(prompts, answers, strict=True):
            handle.write(json.dumps({"split": "train", "prompt": text, "responses": texts,
                                     "gold": [rd.gold_reward(text, t) for t in texts]}) + "\n")
        handle.write(json.dumps({"split": "eval", "prompt": prompts[0], "responses": ["x", "y"],
                                 "gold": [0, 0]}) + "\n")
    counts = rd.redraw(tmp_path, tmp_path / "a", SEED, 1.0)
    assert counts == {"train_pairs.jsonl": 3, "train_multi.jsonl": 3}
    rd.redraw(tmp_path, tmp_path / "b", SEED, 1.0)
    assert (tmp_path / "a" / "train_multi.jsonl").read_text() == (tmp_path / "b" / "train_multi.jsonl").read_text()
    multi = [json.loads(line) for line in (tmp_path / "a" / "train_multi.jsonl").read_text().splitlines()]
    for row, texts in zip(multi, answers, strict=True):
        assert sorted([row["chosen"][0]["content"]] + [m[0]["content"] for m in row["rejected"]]) == sorted(texts)
    draws = {rd.redraw(tmp_path, tmp_path / f"s{s}", s, 1.0) and (tmp_path / f"s{s}" / "train_pairs.jsonl").read_text()
             for s in range(6)}
    assert len(draws) > 1  # the seed changes the draws


@pytest.fixture(scope="module")
def tiny_pair():
    from tiny_models import tiny_causal_lm, tiny_tokenizer

    return tiny_causal_lm("llama", seed=0), tiny_causal_lm("llama", seed=1), tiny_tokenizer()


def test_answer_logps_equal_a_plain_forward_and_kl_is_zero_against_itself(tiny_pair):
    from training.sampling import answer_logps, prompt_ids, sample_answers

    print("seed", SEED)
    policy, reference, tokenizer = tiny_pair
    prompts = [rd.conversation(rd.make_prompt(0, "positive", s)) for s in ("cats", "the Eiffel Tower")]
    kwargs = dict(max_new_tokens=6, max_length=256, max_tokens=512)
    answers = sample_answers(policy, tokenizer, prompts, 3, seed=SEED, **kwargs)
    assert answers == sample_answers(policy, tokenizer, prompts, 3, seed=SEED, **kwargs)
    assert [len(a) for a in answers] == [3, 3] and all(1 <= len(a) <= 6 for s in answers for a in s)
    eos = tokenizer.eos_token_id
    assert all(eos not in a[:-1] for s in answers for a in s)  # each ends at its first end-of-sequence token
    got = answer_logps(reference, tokenizer, prompts, answers, max_length=256, max_tokens=64)
    for prompt, samples, values in zip(prompts, answers, got, strict=True):
        ids = prompt_ids(tokenizer, prompt)
        for answer, value in zip(samples, values, strict=True):
            with torch.no_grad():
                logits = reference(torch.tensor([ids + answer])).logits[0].double()
            expected = logits[len(ids) - 1:-1].log_softmax(-1).gather(1, torch.tensor(answer)[:, None]).sum()
            assert value == pytest.approx(float(expected), abs=1e-4)
    same = answer_logps(policy, tokenizer, prompts, answers, max_length=256, max_tokens=64)
    assert same == answer_logps(policy, tokenizer, prompts, answers, max_length=256, max_tokens=4096)


def test_evaluate_reports_kl_of_policy_samples(tiny_pair):
    from training.evaluate import evaluate

    policy, reference, tokenizer = tiny_pair
    rows = [{"prompt": rd.conversation(rd.make_prompt(0, "positive", s)),
             "completions": [[{"role": "assistant", "content": t}] for t in ("I love it.", "Awful.", "Fine.")],
             "scores": [1.5, -1.5, 0.0]} for s in ("cats", "opera")]
    itself = evaluate(policy, policy, tokenizer, rows, kl_samples=2, max_new_tokens=5, seed=SEED)
    assert itself["kl"]["estimate"] == 0.0 and itself["kl"]["samples"] == 4 and itself["win_rate"] is None
    other = evaluate(policy, reference, tokenizer, rows, kl_samples=2, max_new_tokens=5, seed=SEED,
                     gold_reward=rd.gold_reward)
    assert other["kl"]["estimate"] != 0.0 and other["kl"]["sample_gold"] is not None
    assert other["win_rate"] is not None
    with pytest.raises(ValueError, match="kl_samples"):
        evaluate(policy, reference, tokenizer, rows, kl_samples=-1)


def test_the_reference_pass_is_cached_by_weights_data_and_options(tiny_pair, tmp_path):
    from training.evaluate import evaluate

    policy, reference, tokenizer = tiny_pair
    rows = [{"prompt": rd.conversation(rd.make_prompt(1, "negative", s)),
             "completions": [[{"role": "assistant", "content": t}] for t in ("Bad.", "Awful opera.", "Fine.")],
             "scores": [1.0, 2.0, 0.0]} for s in ("opera", "cats")]
    kwargs = dict(kl_samples=1, max_new_tokens=5, seed=SEED, gold_reward=rd.gold_reward, reference_cache=tmp_path)
    logged = []
    fresh = evaluate(policy, reference, tokenizer, rows, log=logged.append, **kwargs)
    cached = evaluate(policy, reference, tokenizer, rows, log=logged.append, **kwargs)
    assert len(list(tmp_path.glob("eval-reference-*.json"))) == 1
    assert sum("read from" in line for line in logged) == 1  # the second run read it
    for key in ("per_prompt", "samples", "win_rate", "kl"):
        assert cached[key] == fresh[key]
    # another reference (or other options) is another entry, never a stale one
    evaluate(policy, policy, tokenizer, rows, **kwargs)
    evaluate(policy, reference, tokenizer, rows, **{**kwargs, "max_new_tokens": 4})
    assert len(list(tmp_path.glob("eval-reference-*.json"))) == 3


def study(out, model, *extra):
    command = [sys.executable, "-m", "training.epa_study", "--out", str(out), "--model", str(model),
               "--limit-train", "8", "--num-eval-subjects", "2", "--seeds", "0", "1", "--arms", "dpo-pairs",
               "epa-k5-w2", "--prompts-per-update", "4", "--max-new-tokens", "6", "--kl-samples", "1", *extra]
    return subprocess.run(command, capture_output=True, text=True)


def test_study_end_to_end_resumes_and_refuses_another_setting(workdir, tmp_path):
    out = tmp_path / "epa-study"  # the record is named after it
    first = study(out, workdir / "model", "--record", str(tmp_path / "record"))
    assert first.returncode == 0, first.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert "epa-k5-w2" in summary and "paired by seed" in summary and "What the intervals show" in summary
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert set(runs) == {"dpo-pairs", "epa-k5-w2"} and all(set(r) == {"0", "1"} for r in runs.values())
    updates = {v["updates"] for r in runs.values() for v in r.values()}
    assert len(updates) == 1  # every arm gets the same number of updates
    for name in ("curves.png", "scatter.png", "intervals.png"):
        assert (out / name).stat().st_size > 0
    # each seed drew its own preferences from the same answers
    assert (out / "data/seed-0/train_pairs.jsonl").read_text() != (out / "data/seed-1/train_pairs.jsonl").read_text()
    paired = results["paired"]["epa-k5-w2"]["kl"]
    kl = [runs["epa-k5-w2"][s]["kl"] - runs["dpo-pairs"][s]["kl"] for s in ("0", "1")]
    assert paired["n"] == 2 and paired["mean"] == pytest.approx(np.mean(kl))

    again = study(out, workdir / "model")  # every run is done: nothing trains again
    assert again.returncode == 0 and "== train" not in again.stdout and "== evaluate" not in again.stdout
    refused = study(out, workdir / "model", "--lr", "1e-3")
    assert refused.returncode != 0 and "another setting" in refused.stderr and "lr: 5e-05 → 0.001" in refused.stderr

    # the record keeps the portable part (no weights, no per-seed preferences: redrawn identically, see above):
    # another folder restored from it trains nothing again and reports the same numbers
    archived = next((tmp_path / "record").glob("*_cpu_epa-study")) / "study"
    assert (archived / "data/responses.jsonl").exists() and (archived / "runs/epa-k5-w2/seed-1/eval").is_dir()
    assert not list(archived.rglob("*.safetensors")) and not (archived / "data/seed-0").exists()
    other = tmp_path / "restored"
    restored = study(other, workdir / "model", "--restore", str(archived))
    assert restored.returncode == 0, restored.stderr[-3000:]
    assert "== train" not in restored.stdout and "== evaluate" not in restored.stdout
    assert json.loads((other / "results.json").read_text())["runs"] == runs
    refused = study(tmp_path / "elsewhere", workdir / "model", "--restore", str(archived), "--beta", "0.5")
    assert refused.returncode != 0 and "beta: 0.1 → 0.5" in refused.stderr


def test_study_options_are_checked(capsys):
    from training.epa_study.study import parse_args

    for argv, message in ((["--seeds", "1", "1"], "--seeds must be distinct"), (["--lr", "0"], "--lr must be > 0"),
                          (["--kl-samples", "-1"], "--kl-samples must be ≥ 0")):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err


def test_contrasts_pair_arms_by_seed_and_skip_arms_not_run():
    from training.epa_study.report import METRICS, contrast_rows, headline, paired_rows, verdict

    rng = np.random.default_rng(SEED)
    print("seed", SEED)
    keys = [key for key, _, _ in METRICS]
    runs = {arm: {s: {k: float(rng.normal()) for k in keys} for s in (0, 1, 2)}
            for arm in ("dpo-pairs", "dpo-k5", "epa-k5", "epa-k5-w8")}
    del runs["epa-k5"][2]  # a seed one arm has not finished is left out of its pairs
    paired, contrasts = paired_rows(runs), contrast_rows(runs)
    assert set(contrasts) == {"epa-k5 − dpo-k5", "epa-k5-w8 − epa-k5"}  # w2 and α = 0.5 never ran
    diffs = [runs["epa-k5-w8"][s]["kl"] - runs["epa-k5"][s]["kl"] for s in (0, 1)]
    iv = contrasts["epa-k5-w8 − epa-k5"]["kl"]
    assert iv.n == 2 and iv.mean == pytest.approx(np.mean(diffs))
    assert paired["epa-k5-w8"]["mean_pearson"].n == 3
    lines = verdict(paired, contrasts).splitlines()
    assert len(lines) == 5 and any(line.startswith("- epa-k5-w8 vs epa-k5, 2 seeds:") for line in lines)
    table = headline(runs, paired, contrasts).splitlines()
    assert len(table) == 2 + 1 + 3 + 2 and table[-1].startswith("| epa-k5-w8 − epa-k5 | 2 |")
