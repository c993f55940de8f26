"""PreferenceTokenizer's bad-row policy, merged duplicate negatives and boundary shifts (epa_kernels/transformers/
data.py, DESIGN §9). The helpers and the offline tiny tokenizer are test_transformers_data's."""
from __future__ import annotations

import pytest
from test_transformers_data import BOS, _response, _template_tokenizer, conv_pair, error_of, ids, msg, pair, ranked, run
from tiny_models import tiny_tokenizer

from epa_kernels.transformers.data import DETAIL_LINES, PreferenceDataError, PreferenceTokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def same_examples(a, b):
    """The same prompts, responses and scores, whatever the source rows."""
    return [(e.prompt, e.responses, e.scores) for e in a] == [(e.prompt, e.responses, e.scores) for e in b]


# ---------------------------------------------------------------------------------------------------------------
# invalid_rows


@pytest.mark.parametrize("value", ["raise", "Skip", "", None, True])
def test_invalid_rows_must_be_error_or_skip(tok, value):
    with pytest.raises(ValueError, match="invalid_rows") as info:
        PreferenceTokenizer(tok, invalid_rows=value)
    assert not isinstance(info.value, PreferenceDataError)


def test_invalid_rows_default_is_error(tok):
    assert PreferenceTokenizer(tok).invalid_rows == "error"
    rows = [pair(), pair(chosen=" ")]
    error_of(tok, rows, "row 1, column 'chosen'", "empty")
    error_of(tok, rows, "row 1, column 'chosen'", "empty", invalid_rows="error")
    assert len(run(tok, rows, invalid_rows="skip")[0]) == 1


def test_skip_negative_identical_to_positive(tok):
    chosen = pair()["chosen"]
    rows = [pair(), {**pair(), "rejected": [" Lyon.", chosen]}, pair(rejected=chosen),
            pair("Who wrote Hamlet?", " Shakespeare.", " Marlowe.")]
    error_of(tok, rows, "row 1, column 'rejected[1]'", "identical")
    examples, stats = run(tok, rows, invalid_rows="skip")
    # the identical negative goes; a row left without a negative goes too; the others keep their source row
    assert [e.row for e in examples] == [0, 1, 3]
    assert same_examples(examples, run(tok, [rows[0], {**pair(), "rejected": [" Lyon."]}, rows[3]])[0])
    assert stats.skipped == {"negative_identical_to_positive": 2} and stats.rows_dropped == 1 and stats.rows == 4
    assert len(examples) == stats.rows - stats.rows_dropped
    assert stats.details[0].startswith("row 1, column 'rejected[1]': identical")
    assert stats.details[1].startswith("row 2, column 'rejected': identical")
    assert stats.details[2] == "row 2: no negative left; the row is dropped"
    # identical only after max_length: the same rule
    row = {**pair("Hi?", " Paris is the capital of France."), "rejected": [" Paris is the capital of Germany.",
                                                                          " Lyon."]}
    prompt_len = len(run(tok, [row])[0][0].prompt)
    error_of(tok, [row], "row 0, column 'rejected[0]'", "identical", "truncation", max_length=prompt_len + 4)
    (example,), stats = run(tok, [row], max_length=prompt_len + 4, invalid_rows="skip")
    assert len(example.responses) == 2 and stats.skipped == {"negative_identical_to_positive": 1}
    # ranked: the scores stay with their completions
    row = ranked([" Marlowe.", " Shakespeare.", " Shakespeare.", " A spider."], [0, 2, 1, -1])
    (example,), stats = run(tok, [row], invalid_rows="skip")
    assert example.scores == (2.0, 0.0, -1.0)
    assert example.responses == tuple(_response(tok, row["prompt"], t) for t in (" Shakespeare.", " Marlowe.",
                                                                                    " A spider."))


def test_skip_empty_responses(tok):
    rows = [{**pair(), "rejected": [" Lyon.", "\n"]},  # an empty negative: dropped
            pair(chosen="  "),  # an empty positive: the row
            pair(rejected=""),  # no negative left: the row
            conv_pair(rejected=" "), conv_pair(chosen=""), conv_pair(rejected=None),
            pair("Who wrote Hamlet?", " Shakespeare.", " Marlowe.")]
    error_of(tok, rows, "row 0, column 'rejected[1]'", "empty")
    examples, stats = run(tok, rows, invalid_rows="skip")
    assert [e.row for e in examples] == [0, 6]
    assert same_examples(examples, run(tok, [pair(rejected=" Lyon."), rows[6]])[0])
    assert stats.skipped == {"empty_response": 6} and stats.rows_dropped == 5
    # ranked: the best-scored completion is the positive
    rows = [ranked([" a", "  ", " c"], [1, 2, 3]), ranked([" a", "  "], [1, 2])]
    (example,), stats = run(tok, rows, invalid_rows="skip")
    assert example.row == 0 and example.scores == (3.0, 1.0)
    assert example.responses == (_response(tok, "Who wrote Hamlet?", " c"), _response(tok, "Who wrote Hamlet?", " a"))
    assert stats.skipped == {"empty_response": 2} and stats.rows_dropped == 1
    # a wrong type stays an error, even in a row with an empty response
    error_of(tok, [pair(), {**pair(chosen=" "), "rejected": [" ok", 7]}], "row 1, column 'rejected[1]'", "int",
             invalid_rows="skip")


def test_skip_prompt_without_room(tok):
    rows = [pair("Hi?"), pair("Why is the sky blue? " * 4), pair("Who?")]
    error_of(tok, rows, "row 1", "no room", max_length=12)
    examples, stats = run(tok, rows, max_length=12, invalid_rows="skip")
    assert [e.row for e in examples] == [0, 2]
    assert stats.skipped == {"no_room_for_response": 1} and stats.rows_dropped == 1
    assert stats.details[0].startswith("row 1, column 'prompt'") and stats.details[0].endswith("the row is dropped")


def test_skip_missing_columns(tok):
    rows = [{"prompt": "Hi", "chosen": " Paris."}, pair(), {**pair(), "chosen": None}, {**pair(), "rejected": None},
            pair("Who wrote Hamlet?", " Shakespeare.", " Marlowe.")]
    error_of(tok, rows, "row 0", "missing columns")
    # the format is read from the first row that has one's columns; the rows missing some are dropped
    examples, stats = run(tok, rows, invalid_rows="skip")
    assert [e.row for e in examples] == [1, 4]
    assert same_examples(examples, run(tok, [rows[1], rows[4]])[0])
    assert stats.skipped == {"missing_columns": 3} and stats.rows_dropped == 3
    assert stats.details[1].startswith("row 2: missing column(s) ['chosen']")
    examples, stats = run(tok, [ranked([" a", " b"], [1, 0]), pair()], invalid_rows="skip")
    assert [e.row for e in examples] == [0] and stats.skipped == {"missing_columns": 1}


def test_skip_keeps_other_errors(tok):
    skip = dict(invalid_rows="skip")
    error_of(tok, [pair(), pair(prompt=7)], "row 1, column 'prompt'", "int", **skip)
    error_of(tok, [pair(), {**pair(), "rejected": [" ok", 7]}], "row 1, column 'rejected[1]'", "int", **skip)
    error_of(tok, [pair(), 5], "row 1", "int", **skip)
    error_of(tok, [5, pair()], "row 0", "int", **skip)
    error_of(tok, [{"text": "a"}, {"text": "b"}], "row 0", "missing columns", **skip)
    error_of(tok, [pair()], "needs scores", needs_scores=True, **skip)
    error_of(tok, [ranked([" a", " b"], [1, 0]), ranked([" a", " b"], [1, "x"])], "row 1", "'scores'[1]", **skip)
    error_of(tok, [conv_pair(), {**conv_pair(), "rejected": "Lyon."}], "row 1, column 'rejected'", **skip)


def test_skip_every_row_dropped_is_error(tok):
    message = error_of(tok, [pair(chosen=" "), pair(rejected=pair()["chosen"])], "every row (2) was dropped",
                       "empty_response", "negative_identical_to_positive", "row 0, column 'chosen'",
                       invalid_rows="skip")
    assert "invalid_rows" in message


def test_details_are_bounded(tok):
    rows = [{**pair(), "rejected": [" Lyon.", " "]} for _ in range(DETAIL_LINES + 10)]
    examples, stats = run(tok, rows, invalid_rows="skip")
    assert len(examples) == len(rows) and stats.skipped == {"empty_response": len(rows)}
    assert len(stats.details) == DETAIL_LINES and stats.details[-1].startswith(f"row {DETAIL_LINES - 1},")


# ---------------------------------------------------------------------------------------------------------------
# Duplicate negatives: merged under both policies


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_duplicate_negatives_merged(tok, policy):
    rows = [{**pair(), "rejected": [" Lyon.", " Nice.", " Lyon.", " Nice.", " Lyon."]}, pair()]
    examples, stats = run(tok, rows, invalid_rows=policy)
    assert examples == run(tok, [{**pair(), "rejected": [" Lyon.", " Nice."]}, pair()])[0]
    assert stats.duplicate_negatives_merged == 3 and stats.rows_dropped == 0 and stats.skipped == {}
    assert stats.details[0] == "row 0, column 'rejected[2]': the same tokens as 'rejected[0]'; merged"
    # the same tokens only after max_length keeps the responses' start
    row = {**pair("Hi?", " Paris."), "rejected": [" A spider has eight legs.", " A spider has six legs."]}
    prompt_len = len(run(tok, [row])[0][0].prompt)
    (example,), stats = run(tok, [row], max_length=prompt_len + 4, invalid_rows=policy)
    assert len(example.responses) == 2 and stats.duplicate_negatives_merged == 1 and stats.responses_truncated == 2
    # conversational
    row = {**conv_pair(), "rejected": [[msg("assistant", "Lyon.")], [msg("assistant", "Lyon.")]]}
    (example,), stats = run(tok, [row], invalid_rows=policy)
    assert example == run(tok, [conv_pair(rejected="Lyon.")])[0][0] and stats.duplicate_negatives_merged == 1
    # ranked: the first (best-scored) copy stays, with its score
    row = ranked([" Marlowe.", " Bacon.", " Marlowe.", " A spider."], [1, 3, 2, 0])
    (example,), stats = run(tok, [row], invalid_rows=policy)
    assert example.scores == (3.0, 2.0, 0.0) and stats.duplicate_negatives_merged == 1
    assert example.responses == tuple(_response(tok, row["prompt"], t) for t in (" Bacon.", " Marlowe.",
                                                                                    " A spider."))
    # max_negatives keeps the first K distinct negatives
    row = {**pair(), "rejected": [" Lyon.", " Lyon.", " Nice.", " Rome."]}
    (example,), stats = run(tok, [row], max_negatives=2, invalid_rows=policy)
    assert example == run(tok, [{**pair(), "rejected": [" Lyon.", " Nice."]}])[0][0]
    assert stats.duplicate_negatives_merged == 1 and stats.negatives_capped == 1


# ---------------------------------------------------------------------------------------------------------------
# Boundary shifts: counted, and the tokens stay TRL's


def test_boundary_shifts_counted(tok):
    # a prompt ending in a partial word: its "l" merges with the chosen's "ue" into "lu"; the rejected's space does not
    row = pair("Why is the sky bl", "ue? Sunlight scatters.", " I love this.")
    prompt_alone = ids(tok, row["prompt"])
    assert ids(tok, row["prompt"] + row["chosen"])[: len(prompt_alone)] != prompt_alone
    assert ids(tok, row["prompt"] + row["rejected"])[: len(prompt_alone)] == prompt_alone
    examples, stats = run(tok, [pair(), row])
    assert stats.boundary_shifts == 1
    (detail,) = stats.details
    assert detail.startswith("row 1:") and "['chosen']" in detail and "rejected" not in detail
    example = examples[1]
    assert list(example.prompt) == prompt_alone[: len(example.prompt)] and len(example.prompt) < len(prompt_alone)
    for text, response in zip((row["chosen"], row["rejected"]), example.responses, strict=True):
        assert list(example.prompt) + list(response) == ids(tok, row["prompt"] + text) + [3]
    # a trailing space merging into both responses' first word: one per response
    assert run(tok, [pair("What is ", "the capital of France?", "a spider?")])[1].boundary_shifts == 2
    # none for the chat template, whose turns end before the response starts
    assert run(tok, [conv_pair()])[1].boundary_shifts == 0


# ---------------------------------------------------------------------------------------------------------------
# The prompt's header under max_prompt_length, with other chat templates

# the system message folded into the first user turn (as Gemma's template does)
FOLDING = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] + '\\n\\n' %}"
           "{% set turns = messages[1:] %}{% else %}{% set sys = '' %}{% set turns = messages %}{% endif %}"
           "{% for m in turns %}<|im_start|>{{ m['role'] }}\n{% if loop.first %}{{ sys }}{% endif %}{{ m['content'] }}"
           "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# a default system prompt in the last user turn (where Mistral's template puts the system message)
LAST_TURN = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {% if loop.last %}Be brief.\n\n"
             "{% endif %}{{ m['content'] }}[/INST]{% else %} {{ m['content'] }}<|im_end|>{% endif %}{% endfor %}")


def test_prompt_header_of_other_templates():
    answers = {"chosen": [msg("assistant", "It scatters.")], "rejected": [msg("assistant", "No.")]}
    # folded: the system text is content; the header is the BOS alone
    folding = _template_tokenizer(FOLDING)
    row = {"prompt": [msg("system", "Be brief."), msg("user", "Why is the sky blue? Tell me why.")], **answers}
    (a,), _ = run(folding, [row])
    assert a.prompt[0] == BOS and len(a.prompt) > 12
    (b,), _ = run(folding, [row], max_prompt_length=12)
    assert b.prompt == (BOS, *a.prompt[-11:])
    # rendered alone, the first message is the last user turn and gets the default system prompt: the header stops
    # where the real prompt's tokens differ from it
    last_turn = _template_tokenizer(LAST_TURN)
    row = {"prompt": [msg("user", "Why is the sky blue? Tell me why."), msg("assistant", "Sunlight."),
                      msg("user", "Tell me more.")], **answers}
    (a,), stats = run(last_turn, [row])
    header = [BOS, *ids(last_turn, "[INST] ")]
    assert list(a.prompt[: len(header)]) == header and len(a.prompt) > len(header) + 6
    (b,), _ = run(last_turn, [row], max_prompt_length=len(header) + 6)
    assert b.prompt == a.prompt[: len(header)] + a.prompt[-6:]
    # the same template moves the prompt/response boundary (the prompt alone ends with the default system prompt, the
    # last user turn of prompt ⊕ response does not): counted for both responses
    assert stats.boundary_shifts == 2 and "'chosen', 'rejected'" in stats.details[0]
