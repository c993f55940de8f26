"""Preference data in TRL's formats → tokenized examples: one prompt, its responses, positive first (DESIGN §9).

Formats (the columns of the first row decide; every row must have them):
- pairwise / multi-negative: `prompt`, `chosen`, `rejected`, where `rejected` is one response or a list
  (K strong negatives, ragged K allowed);
- ranked: `prompt`, `completions`, `scores` (for `infonca`, `nca`, `plackett_luce`; with the other losses the
  best-scored completion is the positive and the strictly worse ones are its strong negatives);
- standard (strings) or conversational (lists of `{"role", "content"}` messages, rendered with the tokenizer's
  chat template; a response is the assistant message(s) after the prompt). Without a `prompt` column,
  conversational `chosen`/`rejected` share their prompt as the common leading messages (TRL's implicit prompt).

Tokenization follows TRL: the prompt and each prompt ⊕ response are tokenized whole and the response starts
where they diverge, so tokens that merge across the boundary stay right. Standard-format responses get the EOS
token appended; conversational ones end with whatever the chat template closes a turn with.
Truncation: `max_prompt_length` keeps the *end* of the prompt (the part next to the response);
`max_length` then keeps the *start* of each response so prompt + response ≤ max_length. A prompt that leaves no
room for a single response token is an error, as are empty responses and a positive identical to a negative.
"""
from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PAIRWISE_COLUMNS = ("prompt", "chosen", "rejected")
RANKED_COLUMNS = ("prompt", "completions", "scores")
LIST_COLUMNS = ("rejected", "completions", "scores", "chosen", "prompt")


class PreferenceDataError(ValueError):
    """Bad preference data; the message names the row and the column."""


@dataclass(frozen=True)
class PreferenceExample:
    """One prompt and its responses as token ids. responses[0] is the positive, then the strong negatives
    (ranked data: best → worst). scores: one per response when the data has them. row: the source row."""

    row: int
    prompt: tuple[int, ...]
    responses: tuple[tuple[int, ...], ...]
    scores: tuple[float, ...] | None = None


@dataclass
class DataStats:
    """What tokenization changed, for the log: nothing here is silent."""

    rows: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0
    negatives_capped: int = 0
    tied_negatives_dropped: int = 0
    details: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# Reading rows


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


# ---------------------------------------------------------------------------------------------------------------
# Row format


def _is_conversation(value) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, Mapping) and "role" in m and "content" in m for m in value)


def _row_format(row: Mapping) -> str:
    _check_mapping(row, 0)
    if all(c in row for c in RANKED_COLUMNS):
        return "ranked"
    if all(c in row for c in PAIRWISE_COLUMNS):
        return "pairwise"
    if "prompt" not in row and "chosen" in row and "rejected" in row:
        return "implicit"
    have = sorted(row.keys())
    raise PreferenceDataError(
        f"row 0: missing columns; need {list(PAIRWISE_COLUMNS)} (rejected: one response or a list), "
        f"{list(RANKED_COLUMNS)}, or conversational chosen/rejected with an implicit prompt; got {have}")


def _check_mapping(row, index):
    if not isinstance(row, Mapping):
        raise PreferenceDataError(f"row {index}: expected a mapping of column → value, got {type(row).__name__}")


def _split_implicit_prompt(row, index):
    """TRL's implicit prompt: the messages chosen and every rejected conversation share before they diverge."""
    chosen, rejected = row["chosen"], row["rejected"]
    single = not (rejected and _is_conversation(rejected[0]))
    rejected = [rejected] if single else rejected
    conversations = [chosen, *rejected]
    if not all(_is_conversation(c) for c in conversations):
        raise PreferenceDataError(f"row {index}: without a 'prompt' column, 'chosen' and 'rejected' must be "
                                  "conversations (lists of role/content messages)")
    shared = 0
    while all(shared < len(c) - 1 and c[shared] == chosen[shared] for c in conversations):
        shared += 1
    if shared == 0:
        raise PreferenceDataError(f"row {index}: 'chosen' and 'rejected' share no leading messages (no prompt)")
    prompt = chosen[:shared]
    tails = [c[shared:] for c in rejected]
    return {"prompt": prompt, "chosen": chosen[shared:], "rejected": tails[0] if single else tails}


def _number(value) -> float | None:
    """A finite float from a JSON number or a CSV string; None otherwise."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _responses(row, fmt, index):
    """(responses, scores or None, column names) with the positive first, as written (not yet tokenized)."""
    if fmt == "ranked":
        completions, raw_scores = row["completions"], row["scores"]
        if not isinstance(completions, list) or len(completions) < 2:
            raise PreferenceDataError(f"row {index}, column 'completions': need a list of ≥ 2 responses")
        if not isinstance(raw_scores, list) or len(raw_scores) != len(completions):
            raise PreferenceDataError(f"row {index}, column 'scores': need one number per completion "
                                      f"({len(completions)}), got {raw_scores!r}")
        scores = [_number(score) for score in raw_scores]
        for j, score in enumerate(scores):
            if score is None:
                raise PreferenceDataError(f"row {index}, column 'scores'[{j}]: not a finite number: "
                                          f"{raw_scores[j]!r}")
        order = sorted(range(len(scores)), key=lambda j: -scores[j])  # stable: ties keep the data's order
        return [completions[j] for j in order], [scores[j] for j in order], [f"completions[{j}]" for j in order]
    rejected = row["rejected"]
    conversational = _is_conversation(row["chosen"])
    many = isinstance(rejected, list) and not (conversational and _is_conversation(rejected))
    rejected = rejected if many else [rejected]
    if not rejected:
        raise PreferenceDataError(f"row {index}, column 'rejected': an empty list (need ≥ 1 rejected response)")
    names = ["chosen"] + ([f"rejected[{j}]" for j in range(len(rejected))] if many else ["rejected"])
    return [row["chosen"], *rejected], None, names


# ---------------------------------------------------------------------------------------------------------------
# Tokenization


def _common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _tokenize_text(tokenizer, prompt, response, conversational):
    if conversational:
        ids = tokenizer.apply_chat_template(prompt + response if response is not None else prompt, tokenize=True,
                                            add_generation_prompt=response is None, return_dict=False)
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)
    text = prompt if response is None else prompt + response
    return list(tokenizer(text)["input_ids"])


class PreferenceTokenizer:
    """Turns rows into `PreferenceExample`s with TRL's tokenization and this module's truncation rule.

    max_length: cap on prompt + response tokens (each sequence); max_prompt_length: cap on the prompt (keeps its
    end); max_negatives: keep at most K strong negatives per prompt (the first K as written; ranked: the best K
    strictly worse than the positive); needs_scores: the loss needs ranked data (infonca, plackett_luce);
    strict_positive: drop negatives scored equal to the best (a loss that needs a single positive).
    """

    def __init__(self, tokenizer, *, max_length: int | None = None, max_prompt_length: int | None = None,
                 max_negatives: int | None = None, needs_scores: bool = False, strict_positive: bool = True):
        for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length),
                            ("max_negatives", max_negatives)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
            raise ValueError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length}) to "
                             "leave room for a response")
        self.tokenizer = tokenizer
        self.max_length, self.max_prompt_length, self.max_negatives = max_length, max_prompt_length, max_negatives
        self.needs_scores, self.strict_positive = needs_scores, strict_positive

    def __call__(self, rows: Sequence[Mapping]) -> tuple[list[PreferenceExample], DataStats]:
        if len(rows) == 0:
            raise PreferenceDataError("the preference data has no rows")
        fmt = _row_format(rows[0])
        if self.needs_scores and fmt != "ranked":
            raise PreferenceDataError(f"this loss needs scores: use the ranked format {list(RANKED_COLUMNS)}; "
                                      f"the data has columns {sorted(rows[0].keys())}")
        stats = DataStats(rows=len(rows))
        examples = [self._example(row, index, fmt, stats) for index, row in enumerate(rows)]
        return examples, stats

    def _example(self, row, index, fmt, stats) -> PreferenceExample:
        _check_mapping(row, index)
        expected = {"ranked": RANKED_COLUMNS, "pairwise": PAIRWISE_COLUMNS, "implicit": ("chosen", "rejected")}[fmt]
        missing = [c for c in expected if c not in row or row[c] is None]
        if missing:
            raise PreferenceDataError(f"row {index}: missing column(s) {missing} (the first row's format is {fmt})")
        if fmt == "implicit":
            row = _split_implicit_prompt(row, index)
        prompt = row["prompt"]
        conversational = _is_conversation(prompt)
        if not conversational and not isinstance(prompt, str):
            raise PreferenceDataError(f"row {index}, column 'prompt': expected a string or a list of messages, "
                                      f"got {type(prompt).__name__}")
        if isinstance(prompt, str) and not prompt.strip():
            raise PreferenceDataError(f"row {index}, column 'prompt': empty prompt")
        responses, scores, names = _responses(row, fmt, index)
        for name, response in zip(names, responses, strict=True):
            self._check_response(response, conversational, index, name)

        prompt_ids = _tokenize_text(self.tokenizer, prompt, None, conversational)
        full = [_tokenize_text(self.tokenizer, prompt, r, conversational) for r in responses]
        start = min(_common_prefix(prompt_ids, ids) for ids in full)
        if start == 0:
            raise PreferenceDataError(f"row {index}, column 'prompt': no prompt token survives tokenization (the "
                                      "prompt's tokens merge with the response's)")
        prompt_ids = prompt_ids[:start]
        response_ids = [ids[start:] for ids in full]
        eos = self.tokenizer.eos_token_id
        if not conversational and eos is not None:
            response_ids = [ids if ids and ids[-1] == eos else ids + [eos] for ids in response_ids]
        for name, ids in zip(names, response_ids, strict=True):
            if not ids:
                raise PreferenceDataError(f"row {index}, column {name!r}: the response has no tokens")

        if self.max_prompt_length is not None and len(prompt_ids) > self.max_prompt_length:
            prompt_ids = prompt_ids[-self.max_prompt_length:]
            stats.prompts_truncated += 1
        cut = [False] * len(response_ids)
        if self.max_length is not None:
            room = self.max_length - len(prompt_ids)
            if room < 1:
                raise PreferenceDataError(
                    f"row {index}, column 'prompt': {len(prompt_ids)} tokens leave no room for a response within "
                    f"max_length={self.max_length}; set max_prompt_length (keeps the end of the prompt) or raise "
                    "max_length")
            cut = [len(ids) > room for ids in response_ids]
            response_ids = [ids[:room] for ids in response_ids]

        keep = list(range(len(response_ids)))
        if scores is not None and self.strict_positive:
            keep = [0] + [j for j in keep[1:] if scores[j] < scores[0]]
            stats.tied_negatives_dropped += len(response_ids) - len(keep)
            if len(keep) == 1:
                raise PreferenceDataError(f"row {index}, column 'scores': every completion ties with the best "
                                          f"({scores[0]}); this loss needs a positive better than a negative")
        if self.max_negatives is not None and len(keep) - 1 > self.max_negatives:
            stats.negatives_capped += len(keep) - 1 - self.max_negatives
            keep = keep[: 1 + self.max_negatives]
        for j in keep[1:]:
            if response_ids[j] == response_ids[0]:
                truncated = "" if self.max_length is None else f" (after truncation to max_length={self.max_length})"
                raise PreferenceDataError(f"row {index}, column {names[j]!r}: identical to the positive "
                                          f"{names[0]!r}{truncated}")
        stats.responses_truncated += sum(cut[j] for j in keep)  # the responses kept, not those dropped above
        return PreferenceExample(
            row=index, prompt=tuple(prompt_ids), responses=tuple(tuple(response_ids[j]) for j in keep),
            scores=None if scores is None else tuple(scores[j] for j in keep))

    @staticmethod
    def _check_response(response, conversational, index, name):
        if conversational:
            if not _is_conversation(response):
                raise PreferenceDataError(f"row {index}, column {name!r}: the prompt is a conversation, so the "
                                          "response must be a list of messages too")
            if not any(str(m["content"] if m["content"] is not None else "").strip() for m in response):
                raise PreferenceDataError(f"row {index}, column {name!r}: empty response")
        elif not isinstance(response, str):
            raise PreferenceDataError(f"row {index}, column {name!r}: expected a string, got "
                                      f"{type(response).__name__}")
        elif not response.strip():
            raise PreferenceDataError(f"row {index}, column {name!r}: empty response")
