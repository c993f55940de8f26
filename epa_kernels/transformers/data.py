"""Preference data in TRL's formats → tokenized examples: one prompt, its responses, positive first (DESIGN §9).

Formats (the columns of the first row decide, with invalid_rows="skip" those of the first row that has a format's
columns; every row must have them):
- pairwise / multi-negative: `prompt`, `chosen`, `rejected`, where `rejected` is one response or a list
  (K strong negatives, ragged K allowed);
- ranked: `prompt`, `completions`, `scores` (for `infonca`, `nca`, `plackett_luce`; with the other losses the
  best-scored completion is the positive and the strictly worse ones are its strong negatives);
- standard (strings) or conversational (lists of `{"role", "content"}` messages, rendered with the tokenizer's
  chat template; a response is the assistant message(s) after the prompt). Without a `prompt` column,
  conversational `chosen`/`rejected` share their prompt as the common leading messages (TRL's implicit prompt).

Tokenization follows TRL: the prompt and each prompt ⊕ response are tokenized whole and the response starts
where they diverge, so tokens that merge across the boundary stay right (such a shift is counted, not silent).
Standard-format responses get the EOS token appended; conversational ones end with whatever the chat template
closes a turn with.
Truncation: `max_prompt_length` keeps the prompt's *header* and its *end* (the part next to the response) and
cuts what lies between: header + prompt[-(max_prompt_length - len(header)):]. The header is what the chat template
renders before the first message's content (BOS, a default system prompt, the first role's marker), or for a
plain-text prompt its leading special tokens (BOS); a header that alone fills max_prompt_length is not kept (the
end is). `max_length` then keeps the *start* of each response so prompt + response ≤ max_length.
Rows that cannot train (missing columns, an empty response, a negative identical to the positive, a prompt that
leaves no room for a response) are errors, or dropped and counted with `invalid_rows="skip"`; a negative with the
same tokens as an earlier one is always merged into it (it would weigh double in the loss).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

PAIRWISE_COLUMNS = ("prompt", "chosen", "rejected")
RANKED_COLUMNS = ("prompt", "completions", "scores")


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


DETAIL_LINES = 20  # DataStats.details keeps this many lines: the counts say how many events there were


@dataclass
class DataStats:
    """What tokenization changed or dropped, for the log: nothing here is silent.

    rows: rows read; rows_dropped: rows that gave no example (invalid_rows="skip": a skipped row, or one left with
    no negative); skipped: reason → rows or negatives dropped for it under "skip" (missing_columns, empty_response,
    negative_identical_to_positive, no_room_for_response); duplicate_negatives_merged: negatives with the same
    tokens as an earlier one of their row; boundary_shifts: kept responses whose prompt ⊕ response tokens do not
    start with the prompt's own tokens; details: the first DETAIL_LINES events of these kinds, each naming its row.
    """

    rows: int = 0
    prompts_truncated: int = 0
    responses_truncated: int = 0
    negatives_capped: int = 0
    tied_negatives_dropped: int = 0
    rows_dropped: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    duplicate_negatives_merged: int = 0
    boundary_shifts: int = 0
    details: list[str] = field(default_factory=list)

    def note(self, line: str) -> None:
        """Keep `line` for the log, up to DETAIL_LINES lines."""
        if len(self.details) < DETAIL_LINES:
            self.details.append(line)


# ---------------------------------------------------------------------------------------------------------------
# Row format


def _is_conversation(value) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, Mapping) and "role" in m and "content" in m for m in value)


def _row_format(row: Mapping) -> str | None:
    if all(c in row for c in RANKED_COLUMNS):
        return "ranked"
    if all(c in row for c in PAIRWISE_COLUMNS):
        return "pairwise"
    if "prompt" not in row and "chosen" in row and "rejected" in row:
        return "implicit"
    return None


def _data_format(rows: Sequence, scan: bool) -> tuple[str, int]:
    """(format, the row it is read from): the first row's; scan: the first row that has some format's columns
    (the rows before it lack columns, which invalid_rows="skip" drops)."""
    for index, row in enumerate(rows if scan else rows[:1]):
        _check_mapping(row, index)
        fmt = _row_format(row)
        if fmt is not None:
            return fmt, index
    raise PreferenceDataError(
        f"row 0: missing columns; need {list(PAIRWISE_COLUMNS)} (rejected: one response or a list), "
        f"{list(RANKED_COLUMNS)}, or conversational chosen/rejected with an implicit prompt; got {sorted(rows[0])}")


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
    header and its end; None: no cap); max_negatives: keep at most K strong negatives per prompt (the first K as
    written, not counting those dropped or merged; ranked: the best K strictly worse than the positive);
    needs_scores: the loss needs ranked data (infonca, plackett_luce); strict_positive: drop negatives scored equal
    to the best (a loss that needs a single positive).
    invalid_rows: what to do with data that cannot train — "error" (raise, naming the row and column) or "skip":
    a row missing a column (or holding None in one), with an empty positive, or whose prompt leaves no room for a
    response within max_length is dropped; an empty negative or one identical to the positive (after truncation) is
    dropped, and the row with it when no negative is left. Each is counted in `DataStats.skipped` by reason; the
    examples keep their source `row`; every row dropped is an error. Wrong types, an unknown format or a loss that
    needs scores on pairwise data are errors either way.
    Always: a negative with the same tokens as an earlier one of its row (after truncation) is merged into it
    (counted), and a prompt whose own tokens are not a prefix of prompt ⊕ response is counted as a boundary shift.
    """

    def __init__(self, tokenizer, *, max_length: int | None = None, max_prompt_length: int | None = None,
                 max_negatives: int | None = None, needs_scores: bool = False, strict_positive: bool = True,
                 invalid_rows: str = "error"):
        for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length),
                            ("max_negatives", max_negatives)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
            raise ValueError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length}) to "
                             "leave room for a response")
        if invalid_rows not in ("error", "skip"):
            raise ValueError(f"invalid_rows must be 'error' or 'skip', got {invalid_rows!r}")
        self.tokenizer = tokenizer
        self.max_length, self.max_prompt_length, self.max_negatives = max_length, max_prompt_length, max_negatives
        self.needs_scores, self.strict_positive, self.invalid_rows = needs_scores, strict_positive, invalid_rows

    def __call__(self, rows: Sequence[Mapping]) -> tuple[list[PreferenceExample], DataStats]:
        if len(rows) == 0:
            raise PreferenceDataError("the preference data has no rows")
        fmt, first = _data_format(rows, scan=self.invalid_rows == "skip")
        if self.needs_scores and fmt != "ranked":
            raise PreferenceDataError(f"this loss needs scores: use the ranked format {list(RANKED_COLUMNS)}; "
                                      f"the data has columns {sorted(rows[first].keys())}")
        stats = DataStats(rows=len(rows))
        examples = []
        for index, row in enumerate(rows):
            example = self._example(row, index, fmt, stats)
            if example is None:
                stats.rows_dropped += 1
            else:
                examples.append(example)
        if not examples:
            raise PreferenceDataError(f"every row ({len(rows)}) was dropped (invalid_rows='skip'; by reason: "
                                      f"{stats.skipped}), e.g. {stats.details[0]}")
        return examples, stats

    def _example(self, row, index, fmt, stats) -> PreferenceExample | None:
        """The row's example; None when invalid_rows="skip" drops the row."""
        _check_mapping(row, index)
        expected = {"ranked": RANKED_COLUMNS, "pairwise": PAIRWISE_COLUMNS, "implicit": ("chosen", "rejected")}[fmt]
        missing = [c for c in expected if c not in row or row[c] is None]
        if missing:
            return self._invalid(stats, "missing_columns", f"row {index}: missing column(s) {missing} (the data's "
                                 f"format is {fmt})", "the row")
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
        # every type is checked before a blank response drops anything: a wrong type is an error under both policies
        live = []
        for j, response in enumerate(responses):
            if not _is_blank(response, conversational):
                live.append(j)
            elif j == 0:
                return self._invalid(stats, "empty_response", f"row {index}, column {names[0]!r}: empty response",
                                     "the row")
            else:
                self._invalid(stats, "empty_response", f"row {index}, column {names[j]!r}: empty response",
                              "the negative")
        if len(live) == 1:
            return self._no_negative_left(stats, index)
        responses, names = [responses[j] for j in live], [names[j] for j in live]
        scores = None if scores is None else [scores[j] for j in live]

        prompt_ids = _tokenize_text(self.tokenizer, prompt, None, conversational)
        full = [_tokenize_text(self.tokenizer, prompt, r, conversational) for r in responses]
        alone, prefix = len(prompt_ids), [_common_prefix(prompt_ids, ids) for ids in full]
        shifted = [n < alone for n in prefix]  # a template or a token merge moved the boundary
        start = min(prefix)
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
            prompt_ids = self._truncate_prompt(prompt, prompt_ids, conversational)
            stats.prompts_truncated += 1
        cut = [False] * len(response_ids)
        if self.max_length is not None:
            room = self.max_length - len(prompt_ids)
            if room < 1:
                return self._invalid(
                    stats, "no_room_for_response",
                    f"row {index}, column 'prompt': {len(prompt_ids)} tokens leave no room for a response within "
                    f"max_length={self.max_length}; set max_prompt_length (keeps the prompt's header and end) or "
                    "raise max_length", "the row")
            cut = [len(ids) > room for ids in response_ids]
            response_ids = [ids[:room] for ids in response_ids]

        candidates = list(range(1, len(response_ids)))
        if scores is not None and self.strict_positive:
            candidates = [j for j in candidates if scores[j] < scores[0]]
            stats.tied_negatives_dropped += len(response_ids) - 1 - len(candidates)
            if not candidates:
                raise PreferenceDataError(f"row {index}, column 'scores': every completion ties with the best "
                                          f"({scores[0]}); this loss needs a positive better than a negative")
        # negatives in order until max_negatives are kept: the capped ones are neither checked nor merged
        keep, seen = [0], {}
        for position, j in enumerate(candidates):
            if self.max_negatives is not None and len(keep) - 1 == self.max_negatives:
                stats.negatives_capped += len(candidates) - position
                break
            ids = tuple(response_ids[j])
            if response_ids[j] == response_ids[0]:
                truncated = "" if self.max_length is None else f" (after truncation to max_length={self.max_length})"
                self._invalid(stats, "negative_identical_to_positive", f"row {index}, column {names[j]!r}: "
                              f"identical to the positive {names[0]!r}{truncated}", "the negative")
            elif ids in seen:
                stats.duplicate_negatives_merged += 1
                stats.note(f"row {index}, column {names[j]!r}: the same tokens as {names[seen[ids]]!r}; merged")
            else:
                seen[ids] = j
                keep.append(j)
        if len(keep) == 1:
            return self._no_negative_left(stats, index)
        stats.responses_truncated += sum(cut[j] for j in keep)  # the responses kept, not those dropped above
        moved = [names[j] for j in keep if shifted[j]]
        if moved:
            stats.boundary_shifts += len(moved)
            stats.note(f"row {index}: the prompt's {alone} tokens alone are not a prefix of prompt ⊕ response for "
                       f"{moved} (a template or a token merge moved the boundary); the prompt keeps its first {start}")
        return PreferenceExample(
            row=index, prompt=tuple(prompt_ids), responses=tuple(tuple(response_ids[j]) for j in keep),
            scores=None if scores is None else tuple(scores[j] for j in keep))

    def _invalid(self, stats, reason, message, dropped) -> None:
        """Data that cannot train: raise it ("error"), or count `reason` and note that `dropped` is dropped."""
        if self.invalid_rows == "error":
            raise PreferenceDataError(message)
        stats.skipped[reason] = stats.skipped.get(reason, 0) + 1
        stats.note(f"{message}; {dropped} is dropped")

    @staticmethod
    def _no_negative_left(stats, index) -> None:
        stats.note(f"row {index}: no negative left; the row is dropped")

    def _truncate_prompt(self, prompt, ids, conversational) -> list[int]:
        """The prompt's header and its last tokens: max_prompt_length in all; its end alone when the header fills it."""
        header = self._header_length(prompt, ids, conversational)
        tail = self.max_prompt_length - header
        return ids[:header] + ids[-tail:] if tail > 0 else ids[-self.max_prompt_length:]

    def _header_length(self, prompt, ids, conversational) -> int:
        """How many of the prompt's leading tokens `ids` are its header: for a conversation, those the chat template
        renders the same before two different contents of the first message (and the prompt starts with); for
        plain text, the leading special tokens (BOS)."""
        if not conversational:
            special = set(self.tokenizer.all_special_ids)
            return next((n for n, token in enumerate(ids) if token not in special), len(ids))
        # the first message alone ([] as the response: no generation prompt), with two contents differing at once
        a, b = (_tokenize_text(self.tokenizer, [{**prompt[0], "content": probe}], [], True) for probe in ("A", "B"))
        # capped: a template may render a message alone differently (Mistral's system prompt goes to the last user turn)
        return min(_common_prefix(a, b), _common_prefix(a, ids))

    @staticmethod
    def _check_response(response, conversational, index, name):
        if conversational:
            if not _is_conversation(response):
                raise PreferenceDataError(f"row {index}, column {name!r}: the prompt is a conversation, so the "
                                          "response must be a list of messages too")
        elif not isinstance(response, str):
            raise PreferenceDataError(f"row {index}, column {name!r}: expected a string, got "
                                      f"{type(response).__name__}")


def _is_blank(response, conversational) -> bool:
    if conversational:
        return not any(str(m["content"] if m["content"] is not None else "").strip() for m in response)
    return not response.strip()
