"""The active-learning study's report (`python -m training.active_learning.study`) on two tiny runs of one dataset:
random first labels and ALPS's, paired by seed."""
import importlib
import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("sklearn")
pytest.importorskip("scipy")

from tests import test_active_learning_program as program  # noqa: E402

tiny_model, tiny_csv = program.tiny_model, program.tiny_csv  # the program tests' fixtures: a tiny BERT and a CSV
al = importlib.import_module("training.active_learning")
study = importlib.import_module("training.active_learning.study")


@pytest.fixture(scope="module")
def study_dir(tiny_model, tiny_csv, tmp_path_factory):
    root = tmp_path_factory.mktemp("al-study")
    common = dict(rounds=2, seeds=(0, 1, 2), mlm_steps=30)
    assert al.main(program._argv(tiny_model, tiny_csv, root / "toy", ["random", "vapal", "badge", "alps"],
                                 **common)) == 0
    assert al.main(program._argv(tiny_model, tiny_csv, root / f"toy{study.COLD}", ["vapal", "alps"],
                                 initial="alps", **common)) == 0
    return root


def test_first_round_contrast_is_the_round0_difference_by_seed(study_dir):
    arms = study.load_dataset(study_dir, "toy").arms
    assert set(arms) == {"random", "vapal", "badge", "alps", "vapal (ALPS start)", "alps (ALPS start)"}
    row = study.difference(arms, "alps (ALPS start)", "random", "accuracy", first_round=True)
    by_seed = [arms["alps (ALPS start)"][s][0]["accuracy"] - arms["random"][s][0]["accuracy"] for s in "012"]
    assert row.seeds == 3 and row.difference == pytest.approx(sum(by_seed) / 3)
    # both runs of a seed start from different first labels; within a run every strategy shares them
    assert arms["vapal (ALPS start)"]["0"][0]["labeled_indices"] == arms["alps (ALPS start)"]["0"][0]["labeled_indices"]
    assert arms["vapal (ALPS start)"]["0"][0]["labeled_indices"] != arms["vapal"]["0"][0]["labeled_indices"]


def test_only_finished_runs_count(study_dir, tmp_path):
    import shutil

    for folder in ("toy", f"toy{study.COLD}"):
        shutil.copytree(study_dir / folder, tmp_path / folder)
    path = tmp_path / "toy" / "curves.json"
    record = json.loads(path.read_text())
    del record["curves"]["vapal"]["2"][1:]  # interrupted after round 0 (which recorded its query)
    path.write_text(json.dumps(record))
    data = study.load_dataset(tmp_path, "toy")
    assert set(data.arms["vapal"]) == {"0", "1"} and data.unfinished == {"vapal": ["2"]}
    assert "Not counted yet (runs still short of their last round): vapal seed 2." in study.dataset_section(data)
    assert study.difference(data.arms, "vapal", "random", "accuracy").seeds == 2


def test_summary_headline_and_record(study_dir, tmp_path, capsys):
    assert study.main([str(study_dir), "--record", str(tmp_path)]) == 0
    summary = (study_dir / "summary.md").read_text()
    assert summary == capsys.readouterr().out.rstrip("\n") + "\n"
    headline = summary.split("\n\n")[2].splitlines()
    assert headline[0].startswith("| dataset | VAPAL − random | VAPAL − BADGE | VAPAL − ALPS |")
    assert headline[2].startswith("| toy | ") and "—" not in headline[2]  # every contrast present
    for label, *_ in study.CONTRASTS:
        assert f"| {label} |" in summary
    assert "| first round (cold start): ALPS's first labels − random ones |" in summary
    assert "held-out masked-LM loss" in summary
    (recorded,) = tmp_path.iterdir()
    assert recorded.name.endswith("_al-study")
    for folder in ("toy", f"toy{study.COLD}"):
        assert json.loads((recorded / folder / "curves.json").read_text()) == json.loads(
            (study_dir / folder / "curves.json").read_text())
        assert (recorded / folder / "mlm-head" / "head.pt").exists()
    assert (recorded / "summary.md").read_text() == summary


def test_refuses_what_it_cannot_read(study_dir, tmp_path, capsys):
    assert study.main([str(tmp_path)]) == 2
    assert "no <dataset>/curves.json" in capsys.readouterr().err
    cold = tmp_path / f"toy{study.COLD}"
    cold.mkdir()
    record = json.loads((study_dir / "toy" / "curves.json").read_text())  # initial random: not a cold-start run
    (cold / "curves.json").write_text(json.dumps(record))
    assert study.main([str(tmp_path), "--datasets", "toy"]) == 2
    assert "expected a run with --initial alps" in capsys.readouterr().err
    record["config"] |= {"initial": "alps", "pool_limit": 50}  # a cold-start run of another setting
    (cold / "curves.json").write_text(json.dumps(record))
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "curves.json").write_text((study_dir / "toy" / "curves.json").read_text())
    assert study.main([str(tmp_path), "--datasets", "toy"]) == 2
    assert "not runs of one setting: they differ in pool_limit" in capsys.readouterr().err
