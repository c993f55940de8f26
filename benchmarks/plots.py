"""PNG plots of a benchmark run: time and memory vs tokens per implementation, memory vs negatives per prompt.

    python -m benchmarks.plots bench-out/results.json     # re-plot a recorded run next to its JSON
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

# One colour per implementation in every panel and every plot.
_ORDER = ["reference", "reference-compile", "triton", "native", "torch", "liger", "liger-per-token", "cce",
          "cce-torch-compile", "trl"]


def _case_panel(r):
    c = r.case
    return f"{c['name']}, D={c['hidden']}, V={c['vocab']}, {c['dtype']}"


def _size_panel(r):
    c = r.case
    return f"N={c['tokens']}, D={c['hidden']}, V={c['vocab']}, {c['dtype']}"


def _series(results, x_of, y_of, keep, panel_of=_case_panel):
    """{(panel title, implementation): sorted [(x, y)]} over the results that are ok and kept."""
    series = defaultdict(list)
    for r in results:
        if r.status != "ok" or not keep(r):
            continue
        y = y_of(r)
        if y is None:
            continue
        series[(panel_of(r), r.impl)].append((x_of(r), y))
    return {key: sorted(points) for key, points in series.items()}


def _plot(series, path, *, xlabel, ylabel, title, logx=True):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({panel for panel, _ in series})
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for (p, impl), points in sorted(series.items()):
            if p != panel:
                continue
            xs, ys = zip(*points, strict=True)
            index = _ORDER.index(impl) if impl in _ORDER else len(_ORDER) + sorted(series).index((p, impl))
            ax.plot(xs, ys, marker="o", label=impl, color=plt.get_cmap("tab10")(index % 10))
        if logx:
            ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(results, out_dir: str, device_name: str) -> list[str]:
    """time_vs_tokens.png, memory_vs_tokens.png, memory_vs_negatives.png (where the run has the data)."""
    written = []
    by_tokens = {"time_vs_tokens.png": (lambda r: r.full_ms, "forward + backward (ms)"),
                 "memory_vs_tokens.png": (lambda r: r.peak_bytes and r.peak_bytes / 2**20, "peak above inputs (MiB)")}
    for name, (y_of, ylabel) in by_tokens.items():
        series = _series(results, lambda r: r.case["tokens"], y_of, keep=lambda r: True)
        swept = {panel for (panel, _), points in series.items() if len(points) > 1}  # a line needs two sizes
        series = {key: points for key, points in series.items() if key[0] in swept}
        path = _plot(series, os.path.join(out_dir, name), xlabel="tokens N", ylabel=ylabel,
                     title=f"{ylabel} vs tokens — {device_name}")
        if path:
            written.append(path)
    negatives = _series(
        results, lambda r: r.case["strong"] + r.case["weak"], lambda r: r.peak_bytes and r.peak_bytes / 2**20,
        keep=lambda r: r.case["kind"] in ("dpo", "epa"), panel_of=_size_panel,
    )
    swept = {panel for (panel, _), points in negatives.items() if len(points) > 1}
    negatives = {key: points for key, points in negatives.items() if key[0] in swept}
    if any(len(points) > 1 for points in negatives.values()):
        path = _plot(negatives, os.path.join(out_dir, "memory_vs_negatives.png"), xlabel="negatives per prompt",
                     ylabel="peak above inputs (MiB)", title=f"memory vs negatives per prompt — {device_name}")
        if path:
            written.append(path)
    return written


if __name__ == "__main__":
    from benchmarks.harness import Result

    parser = argparse.ArgumentParser(description="Re-plot a recorded run of python -m benchmarks.run; the PNG "
                                                 "files are written beside its results.json.")
    parser.add_argument("results", help="results.json of a recorded run")
    path = parser.parse_args().results
    with open(path) as recorded:
        run = json.load(recorded)
    results = [Result(**r) for r in run["results"]]
    written = write_plots(results, os.path.dirname(path) or ".", run["environment"]["device"])
    print("wrote " + ", ".join(written))
