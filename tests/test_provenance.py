"""The provenance record every program and benchmark writes beside its results."""
import json
import subprocess
import sys
from pathlib import Path

import torch

from epa_kernels import provenance


def test_the_record_names_device_versions_date_and_commit():
    record = provenance.environment("cpu")
    assert f"({torch.get_num_threads()} threads)" in record["device"]
    assert record["torch"] == torch.__version__
    assert record["epa_kernels"] and record["python"] and record["date"]
    if (Path(provenance.__file__).parents[1] / ".git").exists():
        assert record["commit"] != "unknown", "a git checkout has a commit"
    assert set(record) == {"device", "python", "date", "commit", *(p.replace("-", "_") for p in provenance.PACKAGES)}


def test_a_missing_package_is_recorded_as_none(monkeypatch):
    monkeypatch.setattr(provenance, "PACKAGES", ("torch", "no-such-package-epa"))
    assert provenance.environment("cpu")["no_such_package_epa"] is None


def test_outside_a_checkout_the_commit_is_unknown(monkeypatch, tmp_path):
    monkeypatch.setattr(provenance, "__file__", str(tmp_path / "provenance.py"))
    assert provenance.commit() == "unknown"


def test_the_command_prints_the_record_as_json():
    done = subprocess.run([sys.executable, "-m", "epa_kernels.provenance", "--device", "cpu"], capture_output=True,
                          text=True, check=True)
    assert json.loads(done.stdout)["torch"] == torch.__version__
