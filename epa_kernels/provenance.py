"""What a recorded result ran on: device, versions, date and commit (`environment`).

Every program and benchmark that writes a result imports this record from here, below them all, so a table in
`benchmarks/results/` can be compared with a later run. `python -m epa_kernels.provenance` prints it, for bug
reports.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path

import torch

# Versions recorded when installed; read from package metadata, so recording one imports nothing.
PACKAGES = ("torch", "triton", "transformers", "accelerate", "trl", "liger-kernel", "cut-cross-entropy",
            "epa-kernels")


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name with the threads torch uses."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            name = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def commit() -> str:
    """`git describe --always --dirty` of the checkout this package runs from (its programs and benchmarks sit
    beside it), "-dirty" when tracked files differ from the commit; "unknown" outside a checkout."""
    try:
        described = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                                   check=False, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        described = ""
    return described or "unknown"


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device | str = "cpu") -> dict:
    """Device, Python, the installed versions of PACKAGES (None when absent; torch's own build string), date and
    commit. Keys of PACKAGES use underscores (`epa_kernels`, `liger_kernel`)."""
    device = torch.device(device)
    versions = {name.replace("-", "_"): package_version(name) for name in PACKAGES}
    versions["torch"] = torch.__version__  # the build tag too (+cpu, +cu130), which metadata may omit
    return {"device": device_name(device), "python": platform.python_version(), **versions,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "commit": commit()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Print the provenance record (device, versions, date, commit) that "
                                                 "this machine's results would carry, as JSON.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="the device whose name to record (default: cuda when available, else cpu)")
    print(json.dumps(environment(parser.parse_args().device), indent=1))
