"""The active-learning study's report across datasets: each dataset's two runs (first labels at random, and chosen
by ALPS) paired by seed, with the contrasts the verdict rests on.

    python -m training.active_learning.study al-study            # after `make al-study` (resumable)
    python -m training.active_learning.study al-study --record benchmarks/results    # and keep a record

STUDY/<dataset>/curves.json holds the strategies started from random first labels; STUDY/<dataset>-alps-start/
the ones started from ALPS's (--initial alps). Both runs of a seed share everything else the seed decides (head
initialisation, training order), so their round-0 accuracies differ only by the first labelled set: the
cold-start comparison. Writes STUDY/summary.md (and prints it). --record copies what the study can be resumed
and judged from (each run's curves.json, split.json, summary.md, curves.png and fitted MLM head) and the summary
into RECORD/<date>_al-study/; copying that folder back as STUDY resumes the study where it stopped.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from training.paired import paired_differences

COLD = "-alps-start"  # suffix of a dataset's --initial alps run
RECORDED = ("curves.json", "split.json", "summary.md", "curves.png", "mlm-head/head.json", "mlm-head/head.pt")
METRICS = (("accuracy", "accuracy"), ("macro_f1", "macro-F1"))
# (label, arm, baseline): the differences the verdict reads, each paired by seed on the label counts both reached
CONTRASTS = (
    ("VAPAL − BADGE", "vapal", "badge"),
    ("VAPAL − ALPS", "vapal", "alps"),
    ("VAPAL − random", "vapal", "random"),
    ("ALPS − random", "alps", "random"),
    ("VAPAL − ALPS, both from ALPS's first labels", "vapal (ALPS start)", "alps (ALPS start)"),
    ("VAPAL from ALPS's first labels − VAPAL from random ones", "vapal (ALPS start)", "vapal"),
)


@dataclass
class Dataset:
    name: str
    arms: dict  # arm -> seed -> rounds of its finished runs (both runs' arms, the ALPS-start ones renamed)
    records: dict  # run folder name -> its curves.json
    unfinished: dict  # arm -> seeds whose run has not reached its last round (left out until it does)


def finished(entries: list) -> bool:
    """A run that reached its last round: only the final round records no query."""
    return bool(entries) and entries[-1].get("queried") is None


# What the two runs of a dataset may differ in: how the first labels are chosen and the masked LM that does it.
MAY_DIFFER = ("initial", "mlm_model", "mlm_steps")


def load_dataset(study: Path, name: str) -> Dataset:
    """Both runs of a dataset, checked to be the same setting but for the first labels."""
    arms, records, unfinished = {}, {}, {}
    for folder, suffix in ((name, ""), (name + COLD, " (ALPS start)")):
        path = study / folder / "curves.json"
        if not path.exists():
            continue
        record = json.loads(path.read_text())
        if suffix and record["config"].get("initial") != "alps":
            raise ValueError(f"{path}: expected a run with --initial alps, found initial "
                             f"{record['config'].get('initial', 'random')!r}")
        records[folder] = record
        for arm, runs in record["curves"].items():
            done = {seed: entries for seed, entries in runs.items() if finished(entries)}
            if done:
                arms[arm + suffix] = done
            if len(done) < len([e for e in runs.values() if e]):
                unfinished[arm + suffix] = sorted(seed for seed, e in runs.items() if e and not finished(e))
    if not records:
        raise ValueError(f"{study / name}: no curves.json (run `make al-study` first)")
    if len(records) == 2:
        main, cold = (records[folder]["config"] for folder in (name, name + COLD))
        differ = sorted(k for k in set(main) | set(cold) if k not in MAY_DIFFER and main.get(k) != cold.get(k))
        if differ:
            raise ValueError(f"{study / name} and {study / (name + COLD)} are not runs of one setting: they differ in "
                             f"{', '.join(differ)}; seeds cannot be paired across them")
    return Dataset(name, arms, records, unfinished)


def datasets_in(study: Path) -> list[str]:
    names = sorted(p.parent.name for p in study.glob("*/curves.json"))
    return [n for n in names if not n.endswith(COLD)] + sorted(
        n[: -len(COLD)] for n in names if n.endswith(COLD) and n[: -len(COLD)] not in names)


def difference(arms: dict, arm: str, baseline: str, metric: str, first_round: bool = False):
    """The PairedDifference of `arm` against `baseline` (AUC, or round-0 value), or None when either is absent."""
    if not arms.get(arm) or not arms.get(baseline):
        return None
    pick = (lambda entries: entries[:1]) if first_round else (lambda entries: entries)
    curves = {name: {seed: pick(e) for seed, e in arms[name].items()} for name in (arm, baseline)}
    rows = paired_differences(curves, metric, baseline)
    return next((r for r in rows if r.strategy == arm), None)


def _cell(row) -> str:
    if row is None:
        return "—"
    if row.low is None:
        return f"{row.difference:+.4f} (1 seed)"
    return f"{row.difference:+.4f} [{row.low:+.4f}, {row.high:+.4f}]"


def _verdict(row) -> str:
    if row is None or row.low is None:
        return "—"
    return "higher" if row.low > 0 else "lower" if row.high < 0 else "no difference shown"


def dataset_section(data: Dataset) -> str:
    lines = [f"## {data.name}", ""]
    for folder, record in data.records.items():
        config, mlm = record["config"], record.get("mlm")
        lines.append(f"- `{folder}`: initial {config.get('initial', 'random')}, max length {config['max_length']}, "
                     f"pool {config['pool_limit']}, test {config['test_limit']}, initial {config['initial_size']} + "
                     f"{config['query_size']} per round.")
        if mlm and "held_out_loss" in mlm:
            lines.append(f"  ALPS's masked LM: {mlm['source']}; held-out masked-LM loss {mlm['held_out_loss']:.3f} "
                         f"nats (untrained head {mlm['untrained_head_loss']:.3f}, unigram {mlm['unigram_loss']:.3f}; "
                         f"{mlm['steps']} steps, {mlm['fit_seconds']:.0f} s).")
        elif mlm:
            lines.append(f"  ALPS's masked LM: {mlm['source']}.")
    lines += ["", "Area under the learning curve (mean over seeds) and its paired difference from random, 95% t "
              "interval over seeds:", "",
              "| arm | seeds | AUC accuracy | − random | AUC macro-F1 | − random | seconds per run |",
              "|---|---:|---:|---|---:|---|---:|"]
    for arm in data.arms:
        acc = difference(data.arms, arm, "random", "accuracy") if arm != "random" else None
        f1 = difference(data.arms, arm, "random", "macro_f1") if arm != "random" else None
        runs = list(data.arms[arm].values())
        auc = {m: paired_differences({arm: data.arms[arm]}, m, arm)[0].auc for m, _ in METRICS}
        seconds = sum(sum(e["seconds"] for e in entries) for entries in runs) / len(runs)
        lines.append(f"| {arm} | {len(runs)} | {auc['accuracy']:.4f} | {_cell(acc)} | {auc['macro_f1']:.4f} | "
                     f"{_cell(f1)} | {seconds:.0f} |")
    if data.unfinished:
        lines += ["", "Not counted yet (runs still short of their last round): " + "; ".join(
            f"{arm} seed {', '.join(seeds)}" for arm, seeds in data.unfinished.items()) + "."]
    lines += ["", "Seconds per run: wall time of its rounds as recorded. Arms recorded in different sessions ran on "
              "different machines or thread counts; compare times within a session:"]
    for folder, record in data.records.items():
        lines += [f"- `{folder}`: " + "; ".join(f"{s.get('device')}, commit {s.get('commit')}, {s.get('date')}"
                                                for s in record.get("sessions", []))]
    lines += ["", "Contrasts (paired by seed, 95% t interval; AUC unless it says first round):", "",
              "| contrast | accuracy | verdict | macro-F1 | verdict |", "|---|---|---|---|---|"]
    rows = [(label, arm, base, False) for label, arm, base in CONTRASTS]
    rows.append(("first round (cold start): ALPS's first labels − random ones", "alps (ALPS start)", "random", True))
    for label, arm, base, first in rows:
        acc, f1 = (difference(data.arms, arm, base, m, first) for m, _ in METRICS)
        if acc is None:
            continue
        lines.append(f"| {label} | {_cell(acc)} | {_verdict(acc)} | {_cell(f1)} | {_verdict(f1)} |")
    first = [(arm, [e[0]["accuracy"] for e in data.arms[arm].values()]) for arm in ("random", "alps (ALPS start)")
             if arm in data.arms]
    if len(first) == 2:
        lines += ["", "First-round accuracy (mean over seeds): " + ", ".join(
            f"{arm.replace(' (ALPS start)', '')}'s first labels {sum(v) / len(v):.4f}" for arm, v in first) + "."]
    return "\n".join(lines)


def headline(study: Path, names: list[str]) -> str:
    """The README's table: per dataset, the verdict's contrasts on accuracy AUC and the cold start."""
    lines = ["| dataset | VAPAL − random | VAPAL − BADGE | VAPAL − ALPS | VAPAL − ALPS, ALPS start | first round: "
             "ALPS − random |", "|---|---|---|---|---|---|"]
    for name in names:
        arms = load_dataset(study, name).arms
        cells = [_cell(difference(arms, a, b, "accuracy")) for a, b in (
            ("vapal", "random"), ("vapal", "badge"), ("vapal", "alps"), ("vapal (ALPS start)", "alps (ALPS start)"))]
        cells.append(_cell(difference(arms, "alps (ALPS start)", "random", "accuracy", first_round=True)))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(study: Path, names: list[str]) -> str:
    text = "\n\n".join([
        "# Active-learning study: VAPAL against ALPS, BADGE and the other baselines",
        "Accuracy AUC, paired by seed (95% t interval); the per-dataset tables follow.",
        headline(study, names),
        *(dataset_section(load_dataset(study, n)) for n in names),
    ]) + "\n"
    (study / "summary.md").write_text(text)
    return text


def record(study: Path, names: list[str], into: Path) -> Path:
    """Copy the study's portable part (no model weights but the small fitted MLM heads) into a dated folder."""
    target = into / f"{time.strftime('%Y-%m-%d')}_al-study"
    for name in names:
        for folder in (name, name + COLD):
            for relative in RECORDED:
                source = study / folder / relative
                if source.exists():
                    (target / folder / relative).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(source, target / folder / relative)
    shutil.copy2(study / "summary.md", target / "summary.md")
    return target


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.active_learning.study", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", type=Path, help="the study folder (`make al-study` writes al-study)")
    parser.add_argument("--datasets", nargs="+", help="dataset folders to report (default: every one found)")
    parser.add_argument("--record", type=Path, help="also copy the study's portable part under this folder")
    args = parser.parse_args(argv)
    names = args.datasets or datasets_in(args.study)
    if not names:
        print(f"error: {args.study}: no <dataset>/curves.json", file=sys.stderr)
        return 2
    try:
        print(write_summary(args.study, names))
        if args.record:
            print(f"recorded in {record(args.study, names, args.record)}", file=sys.stderr)
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
