"""Training logs: one JSON line per logged step in metrics.jsonl, TensorBoard when installed, PNG curves."""
from __future__ import annotations

import json
from pathlib import Path

CURVES = (("loss", "loss"), ("margin", "reward margin (positive − mean negative)"),
          ("accuracy", "accuracy (positive beats every negative)"), ("reward_positive", "reward of the positive"))


class MetricsLog:
    """Appends records to OUTPUT_DIR/metrics.jsonl (main process only) and mirrors scalars to TensorBoard."""

    def __init__(self, output_dir: Path, *, enabled: bool = True):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.writer = None

    def write(self, record: dict) -> None:
        """record: {"split": "train"|"eval", "step": int, ...scalars}."""
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key not in ("split", "step") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{record['split']}/{key}", value, record["step"])

    def truncate_after(self, step: int) -> None:
        """Drop records past `step`: on resume those after the checkpoint (they will be written again); -1 for a
        fresh run in a folder an earlier run wrote to."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_curves(metrics_path: Path, out_path: Path, title: str = "") -> None:
    """Train (and eval, when logged) loss, margin, accuracy and positive reward against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.4))
    for axis, (key, label) in zip(axes, CURVES, strict=True):
        for split, style in (("train", "-"), ("eval", "o-")):
            points = [(r["step"], r[key]) for r in records if r["split"] == split and key in r]
            if points:
                steps, values = zip(*points, strict=True)
                axis.plot(steps, values, style, label=split, markersize=4)
        axis.set_xlabel("optimizer step")
        axis.set_title(label, fontsize=9)
        axis.grid(alpha=0.3)
    axes[0].legend()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
