"""benchmarks.frozen_head at tiny sizes: both passes run, the frozen one computes no weight gradient."""
import json

import torch

from benchmarks import frozen_head
from benchmarks.harness import Case


def test_frozen_pass_skips_the_weight_gradient(monkeypatch):
    case = Case(tokens=64, hidden=16, vocab=300)
    inputs = case.inputs(torch.device("cpu"))
    asked = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda out, wrt, **kw: asked.append(len(wrt)) or real(out, wrt, **kw))
    frozen_head.full_pass_ms("native", inputs, torch.device("cpu"), frozen=True)
    frozen_head.full_pass_ms("native", inputs, torch.device("cpu"), frozen=False)
    assert asked == [1, 2] and inputs[1].requires_grad  # the weight is left trainable after a trainable pass


def test_cli_writes_both_times_and_their_ratio(tmp_path, capsys):
    out = tmp_path / "frozen.json"
    assert frozen_head.main(["--tokens", "64", "--hidden", "16", "--vocab", "300", "--repeats", "2", "--warmup", "0",
                             "--out", str(out)]) == 0
    row = json.loads(out.read_text())["results"][0]
    assert row["backend"] == "native" and len(row["times_ms"]["frozen"]) == 2
    assert row["ratio"] == row["frozen_ms"] / row["trainable_ms"] > 0
    assert "| native | 64 | 16 | 300 |" in capsys.readouterr().out
