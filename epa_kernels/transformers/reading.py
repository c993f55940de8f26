"""Reading preference rows: files (.jsonl, .json, .parquet, .csv), `datasets` directories and objects, lists of dicts
→ a list of row dicts, each cell as written; `data.py` reads their format and tokenizes them.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path

from epa_kernels.transformers.data import PreferenceDataError

LIST_COLUMNS = ("rejected", "completions", "scores", "chosen", "prompt")  # CSV cells that may hold a JSON list

def read_preference_rows(source, *, split: str = "train") -> list[dict]:
    """Rows as dicts from a .jsonl / .json / .parquet / .csv file, a `datasets.save_to_disk` directory, a
    `datasets.Dataset(Dict)` or a list of dicts. CSV cells are strings as written, except that a cell of a list
    column (rejected, completions, scores, a conversational prompt/chosen) holding a JSON list is parsed."""
    if isinstance(source, list):
        return [dict(row) for row in source]
    if not isinstance(source, (str, Path)):
        return _dataset_rows(source, split)
    path = Path(source).expanduser()
    if path.is_dir():
        import datasets

        return _dataset_rows(datasets.load_from_disk(str(path)), split)
    if not path.is_file():
        raise PreferenceDataError(f"{source}: no such file or datasets directory")
    suffix = "".join(path.suffixes[-2:]).lower()
    if suffix.endswith((".jsonl", ".ndjson")):
        lines = path.read_text(encoding="utf-8").splitlines()
        return [_json_object(line, path, i) for i, line in enumerate(lines) if line.strip()]
    if suffix.endswith(".json"):
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and isinstance(data.get(split), list):
            data = data[split]
        if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
            raise PreferenceDataError(f"{path}: expected a JSON list of objects (one per row)")
        return data
    if suffix.endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if suffix.endswith(".csv"):
        with path.open(newline="", encoding="utf-8") as handle:
            return [{key: _csv_cell(key, value) for key, value in row.items()} for row in csv.DictReader(handle)]
    raise PreferenceDataError(f"{path}: unknown file type (expected .jsonl, .json, .parquet, .csv or a directory)")


def _dataset_rows(dataset, split):
    """A datasets.Dataset's rows; a DatasetDict's `split`."""
    if not hasattr(dataset, "to_list") and not hasattr(dataset, "keys"):
        raise PreferenceDataError(f"cannot read preference rows from a {type(dataset).__name__}: expected a file path, "
                                  "a datasets directory, a datasets.Dataset(Dict) or a list of dicts")
    if not hasattr(dataset, "column_names") or isinstance(dataset.column_names, Mapping):  # a DatasetDict
        if split not in dataset:
            raise PreferenceDataError(f"no split {split!r} in the dataset (splits: {list(dataset.keys())})")
        dataset = dataset[split]
    return dataset.to_list()


def _json_object(line, path, index):
    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise PreferenceDataError(f"{path}: line {index + 1} is not valid JSON ({error})") from error
    if not isinstance(row, dict):
        raise PreferenceDataError(f"{path}: line {index + 1} is not a JSON object")
    return row


def _csv_cell(column, value):
    if column in LIST_COLUMNS and isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value
