"""Does the offline compile (`benchmarks.kernel_report`, no GPU) describe the kernels a GPU runs? For every config
of a tile sweep recorded on a GPU (`python -m benchmarks.tile_sweep --out DIR` there, which reads registers, spills
and shared memory off the kernels Triton compiled and loaded), compile the same config offline for sm_90a here and
print both side by side.

    python -m benchmarks.static_check benchmarks/results/2026-12-04_h200_kernels/tiles-*-llama-8k.json
    PYTHONPATH=/tmp/triton36 python -m benchmarks.static_check FILE.json   # with the Triton version the GPU had

Compare only under the Triton version the sweep records (its environment's `triton`): compilers of other versions
allocate registers differently. Takes about 5 s per config on 2 CPU cores.
"""
import argparse
import json
import sys

import torch

from benchmarks import kernel_report, tile_sweep
from epa_kernels.ops import triton_logprobs as kernels

COLUMNS = ("registers", "spill_bytes", "shared_bytes")


def compare(path: str) -> list[dict]:
    """One row per (pass, config) of the sweep at `path`: the device's static columns and the offline compile's."""
    with open(path) as handle:
        sweep = json.load(handle)
    rows, seen = [], set()
    for result in sweep["results"]:
        key = (result["pass"], result["label"])
        if key in seen or result.get("static_source") != "device":
            continue
        seen.add(key)
        dtype = getattr(torch, sweep["settings"]["dtype"])
        variant = tile_sweep._TileVariant(f"{result['pass']} {result['label']}", result["pass"], dtype,
                                          result["shape"]["tokens"], tile=kernels._Config(**result["config"]))
        usage = kernel_report.resource_usage(kernel_report.compile_variant(variant, 90))
        offline = {"registers": usage["registers"], "spill_bytes": usage["stack_bytes"],
                   "shared_bytes": usage["shared_bytes"]}
        rows.append({"pass": result["pass"], "config": result["label"],
                     "device": {column: result[column] for column in COLUMNS}, "offline": offline,
                     "device_triton": sweep["environment"].get("triton")})
    return rows


def markdown(rows: list[dict]) -> str:
    import triton

    device_triton = rows[0]["device_triton"] if rows else "?"
    lines = [f"Offline sm_90a compile with Triton {triton.__version__} against the device's kernels "
             f"(Triton {device_triton}): registers / spilled bytes per thread / shared KiB.",
             "", "| pass | config | device | offline | same registers and spills |", "|---|---|---|---|---|"]
    for row in rows:
        device, offline = (f"{r['registers']} / {r['spill_bytes']} / {r['shared_bytes'] / 1024:.0f}"
                           for r in (row["device"], row["offline"]))
        same = all(row["device"][c] == row["offline"][c] for c in COLUMNS[:2])
        lines.append(f"| {row['pass']} | {row['config']} | {device} | {offline} | {'yes' if same else '**no**'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweeps", nargs="+", help="tile_sweep.json files recorded on a GPU")
    args = parser.parse_args(argv)
    rows = [row for path in args.sweeps for row in compare(path)]
    if not rows:
        parser.error("no config with device-read static columns in the given sweeps")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
