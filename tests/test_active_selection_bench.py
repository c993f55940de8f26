"""The selection-cost benchmark (`python -m benchmarks.active_selection`) end to end on a tiny random BERT."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("sklearn")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 1-layer BERT (hidden 32), saved like a real checkpoint."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-bert-selection")
    config = BertConfig(vocab_size=1200, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=4)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    return path


def test_records_time_split_and_memory_per_strategy(tiny_bert, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "benchmarks.active_selection", "--model", str(tiny_bert), "--num-labels", "4",
               "--pool-size", "300", "--k", "25", "--seq-len", "8", "--batch-size", "64", "--device", "cpu",
               "--strategies", "vapal", "badge", "alps", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "active_selection.json").read_text())
    assert {"device", "torch", "commit", "date"} <= set(record["environment"])
    rows = {row["strategy"]: row for row in record["results"]}
    assert set(rows) == {"vapal", "badge", "alps"}
    # VAPAL's default (outer) vectors vec(δ ⊗ h) and BADGE's gradient embeddings are both [n, C·H].
    assert rows["vapal"]["vectors_shape"] == [300, 4 * 32]
    assert rows["badge"]["vectors_shape"] == [300, 4 * 32]
    assert rows["alps"]["vectors_shape"] == [300, 8]  # a surprisal per position
    for row in rows.values():
        assert row["pool_size"] == 300 and row["k"] == 25
        assert row["seconds"] >= row["clustering_seconds"] > 0
        assert row["peak_rss_mib"] >= row["rss_before_select_mib"] > 0
    table = (out / "active_selection.md").read_text()
    assert table.count("| vapal |") == 1 and table.count("| badge |") == 1 and table.count("| alps |") == 1


def test_a_failing_strategy_is_reported_and_fails_the_run(tiny_bert, tmp_path):
    command = [sys.executable, "-m", "benchmarks.active_selection", "--model", str(tiny_bert), "--num-labels", "4",
               "--pool-size", "10", "--k", "20", "--seq-len", "8", "--device", "cpu", "--strategies", "vapal"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 1
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["strategy"] == "vapal" and "exceeds the number of unlabeled pool examples" in row["error"]
