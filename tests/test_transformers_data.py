"""TRL-format preference data → tokenized examples (epa_kernels/transformers/data.py, DESIGN §9).

Offline: the byte-level tiny tokenizer from tiny_models (ChatML template, eos = <|im_end|> = 3, bos = <|bos|> = 1,
no BOS from a plain call) and two variants built here (a post-processor adding BOS, one appending EOS).
"""
from __future__ import annotations

import csv
import json
import math
import random

import pytest
from tiny_models import CHAT_TEMPLATE, CORPUS, tiny_tokenizer

from epa_kernels.transformers.data import (
    DataStats,
    PreferenceDataError,
    PreferenceExample,
    PreferenceTokenizer,
)
from epa_kernels.transformers.reading import read_preference_rows

EOS, BOS = 3, 1


# ---------------------------------------------------------------------------------------------------------------
# Helpers


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _variant(single: str, special: list[tuple[str, int]]):
    """The tiny tokenizer with a TemplateProcessing post-processor (a fresh copy: the cached one is not touched)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_str(tiny_tokenizer().backend_tokenizer.to_str())
    raw.post_processor = processors.TemplateProcessing(single=single, special_tokens=special)
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<|pad|>", bos_token="<|bos|>",
                                   eos_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def bos_tok():
    """Adds <|bos|> in front of every plain tokenization (as Llama's tokenizer does)."""
    return _variant("<|bos|> $A", [("<|bos|>", BOS)])


@pytest.fixture(scope="module")
def eos_tok():
    """Appends <|im_end|> to every plain tokenization (as some tokenizers' post-processors do)."""
    return _variant("$A <|im_end|>", [("<|im_end|>", EOS)])


def ids(tokenizer, text):
    return list(tokenizer(text)["input_ids"])


def chat(tokenizer, messages, generation_prompt=False):
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                        return_dict=False)
    return list(out["input_ids"] if isinstance(out, dict) else out)


def msg(role, content):
    return {"role": role, "content": content}


def run(tokenizer, rows, **kwargs):
    return PreferenceTokenizer(tokenizer, **kwargs)(rows)


def error_of(tokenizer, rows, *fragments, **kwargs):
    """The PreferenceDataError the rows raise; every fragment must be in its message."""
    with pytest.raises(PreferenceDataError) as info:
        run(tokenizer, rows, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def pair(prompt="What is the capital of France?", chosen=" Paris is the capital of France.",
         rejected=" I love this, it is wonderful."):
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def conv_pair(user="What is the capital of France?", chosen="Paris.", rejected="Lyon, I think."):
    return {"prompt": [msg("user", user)], "chosen": [msg("assistant", chosen)],
            "rejected": [msg("assistant", rejected)]}


# ---------------------------------------------------------------------------------------------------------------
# Formats


def test_standard_pairwise(tok):
    rows = [pair(), pair("Who wrote Hamlet?", " William Shakespeare.", " A spider.")]
    examples, stats = run(tok, rows)
    assert isinstance(stats, DataStats) and stats.rows == 2
    assert stats == DataStats(rows=2)  # nothing truncated, capped or dropped
    for index, (row, example) in enumerate(zip(rows, examples, strict=True)):
        assert isinstance(example, PreferenceExample)
        assert example.row == index and example.scores is None and len(example.responses) == 2
        assert all(isinstance(t, int) for t in example.prompt)
        for text, response in zip((row["chosen"], row["rejected"]), example.responses, strict=True):
            assert list(example.prompt) + list(response) == ids(tok, row["prompt"] + text) + [EOS]
        assert tok.decode(example.responses[0], skip_special_tokens=True) == row["chosen"]


def test_string_rejected_equals_list_of_one(tok):
    single, _ = run(tok, [pair()])
    listed, _ = run(tok, [{**pair(), "rejected": [pair()["rejected"]]}])
    assert single == listed


def test_multi_negative_ragged(tok):
    negatives = [" A spider has eight legs.", " I hate that, it is awful.", " Sunlight scatters.", " Hamlet."]
    rows = [{**pair(), "rejected": negatives[:k]} for k in (1, 3, 2, 4)]
    examples, stats = run(tok, rows)
    assert [len(e.responses) for e in examples] == [2, 4, 3, 5]
    assert stats.negatives_capped == 0
    for row, example in zip(rows, examples, strict=True):
        for text, response in zip([row["chosen"], *row["rejected"]], example.responses, strict=True):
            assert list(example.prompt) + list(response) == ids(tok, row["prompt"] + text) + [EOS]
    # the negatives are in the data's order
    assert examples[3].responses[1:] == tuple(tuple(ids(tok, rows[3]["prompt"] + n)[len(examples[3].prompt):] + [EOS])
                                             for n in negatives)


def test_conversational(tok):
    row = conv_pair()
    (example,), stats = run(tok, [row])
    assert stats.rows == 1 and example.scores is None
    # the prompt ends with the generation prompt; prompt ⊕ response is the template of the whole conversation
    assert list(example.prompt) == chat(tok, row["prompt"], generation_prompt=True)
    for response, column in zip(example.responses, ("chosen", "rejected"), strict=True):
        assert list(example.prompt) + list(response) == chat(tok, row["prompt"] + row[column])
        # no EOS appended: the response ends the way the template closes a turn (<|im_end|> then a newline)
        assert list(response[-2:]) == [EOS, ids(tok, "\n")[0]]
        assert list(response).count(EOS) == 1
    assert tok.decode(example.responses[0]) == "Paris.<|im_end|>\n"


def test_conversational_multi_turn_and_multi_negative(tok):
    prompt = [msg("system", "Be brief."), msg("user", "Who wrote Hamlet?"), msg("assistant", "Shakespeare."),
              msg("user", "When?")]
    rejected = [[msg("assistant", "Around 1600.")], [msg("assistant", "I love this.")],
                [msg("assistant", "Paris.")]]
    rows = [{"prompt": prompt, "chosen": [msg("assistant", "Around 1600; a great tragedy.")],
             "rejected": rejected},
            {"prompt": prompt, "chosen": [msg("assistant", "1600.")], "rejected": rejected[:1]}]
    examples, _ = run(tok, rows)
    assert [len(e.responses) for e in examples] == [4, 2]
    for row, example in zip(rows, examples, strict=True):
        assert list(example.prompt) == chat(tok, prompt, generation_prompt=True)
        for response, conversation in zip(example.responses, [row["chosen"], *row["rejected"]], strict=True):
            assert list(example.prompt) + list(response) == chat(tok, prompt + conversation)


def test_implicit_prompt_equals_explicit(tok):
    user = msg("user", "What is the capital of France?")
    implicit = {"chosen": [user, msg("assistant", "Paris.")], "rejected": [user, msg("assistant", "Lyon.")]}
    explicit = {"prompt": [user], "chosen": [msg("assistant", "Paris.")], "rejected": [msg("assistant", "Lyon.")]}
    assert run(tok, [implicit])[0] == run(tok, [explicit])[0]


def test_implicit_prompt_multi_turn_multi_negative(tok):
    u1, a1, u2 = msg("user", "Who wrote Hamlet?"), msg("assistant", "Shakespeare."), msg("user", "When?")
    chosen = [u1, a1, u2, msg("assistant", "Around 1600.")]
    rejected = [[u1, a1, u2, msg("assistant", "Paris.")], [u1, a1, u2, msg("assistant", "Eight legs.")]]
    (example,), _ = run(tok, [{"chosen": chosen, "rejected": rejected}])
    (expected,), _ = run(tok, [{"prompt": [u1, a1, u2], "chosen": chosen[3:], "rejected": [r[3:] for r in rejected]}])
    assert example == expected and len(example.responses) == 3
    # a negative diverging earlier: the prompt is what every conversation shares, the response the rest
    early = [u1, msg("assistant", "Marlowe."), u2, msg("assistant", "1590.")]
    (example,), _ = run(tok, [{"chosen": chosen, "rejected": [rejected[0], early]}])
    (expected,), _ = run(tok, [{"prompt": [u1], "chosen": chosen[1:], "rejected": [rejected[0][1:], early[1:]]}])
    assert example == expected
    assert list(example.prompt) == chat(tok, [u1], generation_prompt=True)


def test_implicit_prompt_errors(tok):
    user = msg("user", "Hi")
    error_of(tok, [{"chosen": [msg("user", "A"), msg("assistant", "B")],
                    "rejected": [msg("user", "C"), msg("assistant", "D")]}], "row 0", "share no leading")
    error_of(tok, [{"chosen": "Paris.", "rejected": "Lyon."}], "row 0", "'prompt'", "conversations")
    ok = {"chosen": [user, msg("assistant", "Paris.")], "rejected": [user, msg("assistant", "Lyon.")]}
    error_of(tok, [ok, {"chosen": [user, msg("assistant", "Paris.")], "rejected": "Lyon."}], "row 1")
    # a single rejected conversation is named 'rejected' (rejected[0] would be its first message)
    message = error_of(tok, [ok, {"chosen": ok["chosen"], "rejected": [user, msg("assistant", "  ")]}],
                       "row 1", "column 'rejected'", "empty")
    assert "rejected[" not in message
    error_of(tok, [{"chosen": ok["chosen"], "rejected": [ok["rejected"], [user, msg("assistant", "")]]}],
             "row 0", "column 'rejected[1]'", "empty")


def ranked(completions, scores, prompt="Who wrote Hamlet?"):
    return {"prompt": prompt, "completions": completions, "scores": scores}


def _response(tok, prompt, text):
    return tuple(ids(tok, prompt + text)[len(ids(tok, prompt)):] + [EOS])


def test_ranked_sorted_best_to_worst(tok):
    texts = [" Marlowe.", " William Shakespeare.", " A spider.", " Shakespeare, around 1600."]
    row = ranked(texts, [1.0, 3.0, -2.0, 2.5])
    (example,), stats = run(tok, [row])
    assert example.scores == (3.0, 2.5, 1.0, -2.0)
    assert example.responses == tuple(_response(tok, row["prompt"], texts[j]) for j in (1, 3, 0, 2))
    assert stats.tied_negatives_dropped == 0
    # the same with needs_scores (infonca / plackett_luce) and with ints, numeric strings (a CSV's cells)
    assert run(tok, [row], needs_scores=True)[0] == [example]
    assert run(tok, [ranked(texts, ["1", 3, "-2e0", 2.5])])[0][0].scores == (3.0, 2.5, 1.0, -2.0)


def test_ranked_ties(tok):
    texts = [" a0", " a1", " a2", " a3", " a4"]
    row = ranked(texts, [1.0, 2.0, 1.0, 2.0, 0.0])
    # strict_positive=False keeps every completion; ties keep the data's order
    (example,), stats = run(tok, [row], strict_positive=False)
    assert example.scores == (2.0, 2.0, 1.0, 1.0, 0.0)
    assert example.responses == tuple(_response(tok, row["prompt"], texts[j]) for j in (1, 3, 0, 2, 4))
    assert stats.tied_negatives_dropped == 0
    # strict_positive=True drops the negatives tied with the best, not those tied with each other
    (example,), stats = run(tok, [row])
    assert example.scores == (2.0, 1.0, 1.0, 0.0)
    assert example.responses == tuple(_response(tok, row["prompt"], texts[j]) for j in (1, 0, 2, 4))
    assert stats.tied_negatives_dropped == 1
    # all tied: an error with strict_positive, kept without
    tied = ranked(texts[:3], [0.5, 0.5, 0.5])
    error_of(tok, [row, tied], "row 1", "'scores'", "tie")
    (example,), _ = run(tok, [tied], strict_positive=False)
    assert example.scores == (0.5, 0.5, 0.5)
    assert example.responses == tuple(_response(tok, tied["prompt"], t) for t in texts[:3])


def test_ranked_conversational(tok):
    prompt = [msg("user", "Who wrote Hamlet?")]
    completions = [[msg("assistant", "Marlowe.")], [msg("assistant", "Shakespeare.")], [msg("assistant", "Eh.")]]
    (example,), _ = run(tok, [{"prompt": prompt, "completions": completions, "scores": [0, 1, -1]}])
    assert example.scores == (1.0, 0.0, -1.0)
    for response, j in zip(example.responses, (1, 0, 2), strict=True):
        assert list(example.prompt) + list(response) == chat(tok, prompt + completions[j])


def test_ranked_max_negatives_keeps_best(tok):
    texts = [" n0", " n1", " n2", " n3", " n4", " n5"]
    row = ranked(texts, [0.0, 5.0, 1.0, 5.0, 3.0, 2.0])
    (example,), stats = run(tok, [row], max_negatives=2)
    assert example.scores == (5.0, 3.0, 2.0)  # the best, then the best 2 strictly worse
    assert example.responses == tuple(_response(tok, row["prompt"], texts[j]) for j in (1, 4, 5))
    assert stats.tied_negatives_dropped == 1 and stats.negatives_capped == 2
    (example,), stats = run(tok, [row], max_negatives=2, strict_positive=False)
    assert example.scores == (5.0, 5.0, 3.0) and stats.negatives_capped == 3


# ---------------------------------------------------------------------------------------------------------------
# Tokenization (TRL's)


def test_concatenation_reproduces_whole_random_splits(tok):
    seed = 1234
    print(f"seed={seed}")
    rng = random.Random(seed)
    texts = sorted(set(CORPUS))
    rows = []
    for _ in range(60):
        text = rng.choice(texts)
        cut = rng.randrange(1, len(text) - 1)
        other = rng.choice(texts)
        rows.append({"prompt": "Q: " + text[:cut], "chosen": text[cut:], "rejected": other[: rng.randrange(1, 20)]})
    rows = [r for r in rows if r["chosen"].strip() and r["rejected"].strip() and r["chosen"] != r["rejected"]]
    examples, stats = run(tok, rows)
    merged = shifted = 0
    for row, example in zip(rows, examples, strict=True):
        prompt_alone = ids(tok, row["prompt"])
        merged += len(example.prompt) < len(prompt_alone)
        for text, response in zip((row["chosen"], row["rejected"]), example.responses, strict=True):
            assert list(example.prompt) + list(response) == ids(tok, row["prompt"] + text) + [EOS]
            assert response[-1] == EOS and list(response).count(EOS) == 1
            shifted += ids(tok, row["prompt"] + text)[: len(prompt_alone)] != prompt_alone
    assert merged > 0  # some prompts' last tokens merged with the response (the case TRL's rule is for)
    assert stats.boundary_shifts == shifted  # one per response whose tokens do not start with the prompt's


def test_merge_at_boundary(tok):
    # "What is " ends with a space that byte-level BPE merges into " the" — the prompt alone tokenizes differently
    row = pair("What is ", "the capital of France?", "a spider?")
    prompt_alone = ids(tok, row["prompt"])
    assert ids(tok, row["prompt"] + row["chosen"])[: len(prompt_alone)] != prompt_alone
    (example,), _ = run(tok, [row])
    assert len(example.prompt) < len(prompt_alone)
    assert list(example.prompt) == prompt_alone[: len(example.prompt)]
    for text, response in zip((row["chosen"], row["rejected"]), example.responses, strict=True):
        assert list(example.prompt) + list(response) == ids(tok, row["prompt"] + text) + [EOS]
    # one response merging, one not: the prompt is cut where the first one diverges; both still concatenate
    row = pair("What is ", "the capital of France?", " a spider?")
    (example,), _ = run(tok, [row])
    for text, response in zip((row["chosen"], row["rejected"]), example.responses, strict=True):
        assert list(example.prompt) + list(response) == ids(tok, row["prompt"] + text) + [EOS]


def test_prompt_merging_whole_is_error(tok):
    # "Wh" is one token that disappears into "What": no prompt token survives
    assert len(ids(tok, "Wh")) == 1 and ids(tok, "What")[0] != ids(tok, "Wh")[0]
    error_of(tok, [pair(), pair("Wh", "at is the capital?", "at is a spider?")], "row 1", "'prompt'")


def test_eos_appended_exactly_once(tok, eos_tok):
    row = pair(chosen=" Paris.<|im_end|>", rejected=" Lyon.")
    (example,), _ = run(tok, [row])
    chosen, rejected = example.responses
    assert chosen[-1] == EOS and list(chosen).count(EOS) == 1
    assert list(example.prompt) + list(chosen) == ids(tok, row["prompt"] + row["chosen"])
    assert list(example.prompt) + list(rejected) == ids(tok, row["prompt"] + row["rejected"]) + [EOS]
    # a tokenizer whose post-processor appends EOS: not doubled, and the prompt does not keep its own EOS
    row = pair()
    (example,), _ = run(eos_tok, [row])
    assert EOS not in example.prompt
    for text, response in zip((row["chosen"], row["rejected"]), example.responses, strict=True):
        assert list(example.prompt) + list(response) == ids(eos_tok, row["prompt"] + text)
        assert response[-1] == EOS and list(response).count(EOS) == 1
    assert run(eos_tok, [row])[0] == run(tok, [row])[0]


def test_bos_tokenizer(tok, bos_tok):
    assert ids(bos_tok, "Hi")[0] == BOS and ids(tok, "Hi")[0] != BOS
    rows = [pair(), pair("What is ", "the capital of France?", "a spider?")]
    examples, _ = run(bos_tok, rows)
    for row, example in zip(rows, examples, strict=True):
        assert example.prompt[0] == BOS and list(example.prompt).count(BOS) == 1
        for text, response in zip((row["chosen"], row["rejected"]), example.responses, strict=True):
            assert BOS not in response
            assert list(example.prompt) + list(response) == ids(bos_tok, row["prompt"] + text) + [EOS]
    # the BOS is the only difference from the plain tokenizer
    plain, _ = run(tok, rows)
    for a, b in zip(plain, examples, strict=True):
        assert b.prompt == (BOS, *a.prompt) and b.responses == a.responses
    # with a BOS, even a prompt that merges whole keeps a token (the BOS)
    (example,), _ = run(bos_tok, [pair("Wh", "at is the capital?", "at is a spider?")])
    assert example.prompt == (BOS,)


# ---------------------------------------------------------------------------------------------------------------
# Truncation


def _long_rows():
    return [pair("Why is the sky blue? " * 2, " Sunlight scatters off air molecules, and blue light scatters.",
                 " I love this, it is wonderful and good."),
            pair("Hi?", " Paris.", " A spider has eight legs, which is more than an insect."),
            pair("Who wrote Hamlet? " * 2, " Shakespeare.", " Marlowe.")]


def test_max_prompt_length_keeps_end(tok):
    rows = _long_rows()
    full, _ = run(tok, rows)
    examples, stats = run(tok, rows, max_prompt_length=8)
    truncated = 0
    for a, b in zip(full, examples, strict=True):
        if len(a.prompt) > 8:
            truncated += 1
            assert b.prompt == a.prompt[-8:]
        else:
            assert b.prompt == a.prompt
        assert b.responses == a.responses
    assert truncated == 2 and stats.prompts_truncated == 2 and stats.responses_truncated == 0


def test_max_length_keeps_start_of_responses(tok):
    rows = _long_rows()
    full, _ = run(tok, rows)
    max_length = 30
    examples, stats = run(tok, rows, max_length=max_length)
    cut = 0
    for a, b in zip(full, examples, strict=True):
        assert b.prompt == a.prompt
        room = max_length - len(a.prompt)
        for ra, rb in zip(a.responses, b.responses, strict=True):
            assert rb == ra[:room] and len(b.prompt) + len(rb) <= max_length
            cut += len(ra) > room
    assert cut > 0 and stats.responses_truncated == cut and stats.prompts_truncated == 0


def test_both_limits_conversational(tok):
    prompt = [msg("system", "You are a helpful assistant."), msg("user", "Why is the sky blue? Tell me.")]
    row = {"prompt": prompt, "chosen": [msg("assistant", "Sunlight scatters off air molecules.")],
           "rejected": [msg("assistant", "I love this.")]}
    (a,), _ = run(tok, [row])
    (b,), stats = run(tok, [row], max_prompt_length=20, max_length=26)
    # the template's header before the first message's content is kept, then the end of the prompt
    header = ids(tok, "<|im_start|>system\n")
    assert list(a.prompt[: len(header)]) == header and len(a.prompt) > 20
    assert b.prompt == a.prompt[: len(header)] + a.prompt[-(20 - len(header)):]
    # the end of the prompt is the generation prompt, next to the response
    user = [msg("user", "x")]
    generation_prompt = chat(tok, user, generation_prompt=True)[len(chat(tok, user)):]
    assert len(generation_prompt) > 0 and list(b.prompt[-len(generation_prompt):]) == generation_prompt
    assert all(rb == ra[:6] for ra, rb in zip(a.responses, b.responses, strict=True))
    assert stats.prompts_truncated == 1 and stats.responses_truncated == 2


def _template_tokenizer(template):
    """A fresh copy of the tiny tokenizer with another chat template (the cached one is not touched)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer.from_str(tiny_tokenizer().backend_tokenizer.to_str())
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<|pad|>", bos_token="<|bos|>",
                                   eos_token="<|im_end|>")
    fast.chat_template = template
    return fast


def test_max_prompt_length_keeps_header(tok, bos_tok):
    # plain text: the leading special tokens (BOS) stay, then the end of the prompt
    rows = _long_rows()
    full, _ = run(bos_tok, rows)
    examples, stats = run(bos_tok, rows, max_prompt_length=8)
    for a, b in zip(full, examples, strict=True):
        assert a.prompt[0] == BOS and b.prompt[0] == BOS and b.responses == a.responses
        assert b.prompt == (a.prompt if len(a.prompt) <= 8 else (BOS, *a.prompt[-7:]))
    assert stats.prompts_truncated == 2
    # no special token in front: the end alone, as before
    assert run(tok, rows, max_prompt_length=8)[0][0].prompt == run(tok, rows)[0][0].prompt[-8:]
    # a template with BOS and a default system prompt: both are the header of a conversation starting with the user
    template = ("{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n"
                "{% endif %}" + CHAT_TEMPLATE)
    llama = _template_tokenizer(template)
    row = {"prompt": [msg("user", "Why is the sky blue? Tell me why, really."), msg("assistant", "Sunlight."),
                      msg("user", "Tell me more.")],
           "chosen": [msg("assistant", "It scatters.")], "rejected": [msg("assistant", "No.")]}
    (a,), _ = run(llama, [row])
    header = [BOS, *ids(llama, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")]
    assert list(a.prompt[: len(header)]) == header and len(a.prompt) > len(header) + 5
    (b,), stats = run(llama, [row], max_prompt_length=len(header) + 5)
    assert b.prompt == a.prompt[: len(header)] + a.prompt[-5:] and stats.prompts_truncated == 1
    # a header that alone fills max_prompt_length: the end is kept
    (b,), _ = run(llama, [row], max_prompt_length=len(header))
    assert b.prompt == a.prompt[-len(header):]


def test_max_prompt_length_none_is_no_cap(tok, bos_tok):
    rows = [pair("Why is the sky blue? " * 20), conv_pair("Who wrote Hamlet? " * 20)]
    for tokenizer in (tok, bos_tok):
        full, _ = run(tokenizer, rows)
        assert len(full[0].prompt) > 100 and len(full[1].prompt) > 100
        for max_length in (None, 400):
            examples, stats = run(tokenizer, rows, max_prompt_length=None, max_length=max_length)
            assert examples == full and stats.prompts_truncated == 0 and stats.responses_truncated == 0


def test_prompt_leaving_no_room_is_error(tok):
    rows = [pair("Hi?"), pair("Why is the sky blue? " * 4)]
    message = error_of(tok, rows, "row 1", "'prompt'", "max_length=12", max_length=12)
    assert "max_prompt_length" in message and "header" in message
    # max_prompt_length makes room
    examples, stats = run(tok, rows, max_length=12, max_prompt_length=8)
    assert all(len(e.prompt) + len(r) <= 12 for e in examples for r in e.responses)


@pytest.mark.parametrize("kwargs", [
    dict(max_length=10, max_prompt_length=10), dict(max_length=10, max_prompt_length=11), dict(max_length=0),
    dict(max_prompt_length=-1), dict(max_negatives=0), dict(max_length=True), dict(max_length=1.5),
    dict(max_negatives="2")])
def test_bad_limits(tok, kwargs):
    with pytest.raises(ValueError) as info:
        PreferenceTokenizer(tok, **kwargs)
    assert not isinstance(info.value, PreferenceDataError)
    assert next(iter(kwargs)) in str(info.value) or "max_prompt_length" in str(info.value)


def test_max_negatives_keeps_first(tok):
    negatives = [" n0 spider.", " n1 Hamlet.", " n2 Lyon.", " n3 blue."]
    rows = [{**pair(), "rejected": negatives}, {**pair(), "rejected": negatives[:2]}, pair()]
    full, _ = run(tok, rows)
    examples, stats = run(tok, rows, max_negatives=2)
    assert examples[0].responses == full[0].responses[:3]
    assert examples[1:] == full[1:]
    assert stats.negatives_capped == 2
    examples, stats = run(tok, rows, max_negatives=1)
    assert [len(e.responses) for e in examples] == [2, 2, 2] and stats.negatives_capped == 3 + 1


def test_stats_count_only_kept_responses(tok):
    # a long negative that max_negatives drops is neither counted as truncated nor checked against the positive
    rows = [{**pair("Hi?"), "chosen": " Paris.", "rejected": [" Lyon.", " A spider has eight legs, really."]}]
    examples, stats = run(tok, rows, max_length=12, max_negatives=1)  # room 9: only the dropped one is cut
    assert len(examples[0].responses) == 2
    assert stats.negatives_capped == 1 and stats.responses_truncated == 0


# ---------------------------------------------------------------------------------------------------------------
# Errors name the row and the column


def test_no_rows(tok):
    error_of(tok, [], "no rows")


def test_missing_columns(tok):
    error_of(tok, [{"prompt": "Hi", "chosen": "Paris."}], "row 0", "missing columns", "'chosen', 'prompt'")
    error_of(tok, [pair(), pair(), {"prompt": "Hi", "chosen": "Paris."}], "row 2", "missing", "'rejected'")
    error_of(tok, [pair(), {**pair(), "chosen": None}], "row 1", "missing", "'chosen'")
    error_of(tok, [ranked([" a", " b"], [1, 0]), pair()], "row 1", "missing", "'completions'", "'scores'", "ranked")


def test_non_mapping_rows(tok):
    error_of(tok, ["prompt chosen rejected"], "row 0", "str")
    error_of(tok, [pair(), 5], "row 1", "int")
    error_of(tok, [pair(), ["prompt", "chosen", "rejected"]], "row 1", "list")


def test_empty_responses_and_prompt(tok):
    error_of(tok, [pair(), pair(chosen="  ")], "row 1, column 'chosen'", "empty")
    error_of(tok, [pair(rejected="")], "row 0, column 'rejected'", "empty")
    error_of(tok, [pair(), {**pair(), "rejected": [" ok", "\n"]}], "row 1, column 'rejected[1]'", "empty")
    error_of(tok, [{**pair(), "rejected": []}], "row 0, column 'rejected'", "empty list")
    error_of(tok, [pair(), pair(prompt=" ")], "row 1, column 'prompt'", "empty")
    error_of(tok, [conv_pair(), conv_pair(chosen="")], "row 1, column 'chosen'", "empty")
    error_of(tok, [conv_pair(rejected=" ")], "row 0, column 'rejected'", "empty")
    error_of(tok, [conv_pair(rejected=None)], "row 0, column 'rejected'", "empty")
    row = conv_pair()
    error_of(tok, [{**row, "rejected": [row["rejected"], [msg("assistant", "")]]}], "row 0, column 'rejected[1]'")
    error_of(tok, [{**row, "rejected": []}], "row 0, column 'rejected'")
    error_of(tok, [ranked([" a", "  ", " c"], [1, 2, 3])], "row 0, column 'completions[1]'", "empty")


def test_identical_to_positive(tok):
    message = error_of(tok, [pair(), pair(rejected=pair()["chosen"])], "row 1, column 'rejected'", "identical",
                       "'chosen'")
    assert "truncation" not in message
    error_of(tok, [{**pair(), "rejected": [" Lyon.", pair()["chosen"]]}], "row 0, column 'rejected[1]'",
             "identical")
    error_of(tok, [conv_pair(rejected="Paris.")], "row 0, column 'rejected'", "identical")
    error_of(tok, [ranked([" Marlowe.", " Shakespeare.", " Shakespeare."], [0, 2, 1])],
             "row 0, column 'completions[2]'", "identical", "'completions[1]'")
    # identical only after max_length keeps the responses' common start
    row = pair("Hi?", " Paris is the capital of France.", " Paris is the capital of Germany.")
    assert run(tok, [row])[0]
    prompt_len = len(run(tok, [row])[0][0].prompt)
    error_of(tok, [row], "row 0, column 'rejected'", "identical", "truncation", f"max_length={prompt_len + 4}",
             max_length=prompt_len + 4)


def test_needs_scores_on_pairwise(tok):
    error_of(tok, [pair()], "needs scores", "'completions'", "'scores'", needs_scores=True)
    error_of(tok, [conv_pair()], "needs scores", needs_scores=True)


@pytest.mark.parametrize("scores, fragment", [
    ([1.0, 2.0], "column 'scores'"), ([1.0, 2.0, 3.0, 4.0], "column 'scores'"), (3.0, "column 'scores'"),
    ([1.0, "abc", 0.0], "'scores'[1]"), ([1.0, 0.0, None], "'scores'[2]"), ([True, 0.0, 1.0], "'scores'[0]"),
    ([1.0, math.nan, 0.0], "'scores'[1]"), ([1.0, 0.0, math.inf], "'scores'[2]"), ([1.0, 0.0, "nan"], "'scores'[2]"),
])
def test_bad_scores(tok, scores, fragment):
    good = ranked([" a", " b", " c"], [1.0, 0.0, 2.0])
    error_of(tok, [good, {**good, "scores": scores}], "row 1", fragment)


def test_bad_completions(tok):
    error_of(tok, [ranked([" a"], [1.0])], "row 0, column 'completions'", "≥ 2")
    error_of(tok, [ranked(" a b", [1.0, 2.0])], "row 0, column 'completions'")
    error_of(tok, [ranked([" a", 7], [1.0, 2.0])], "row 0, column 'completions[1]'", "int")


def test_conversational_prompt_string_response(tok):
    row = conv_pair()
    error_of(tok, [{**row, "chosen": "Paris."}], "row 0, column 'chosen'", "list of messages")
    error_of(tok, [row, {**row, "rejected": "Lyon."}], "row 1, column 'rejected'", "list of messages")
    error_of(tok, [{**row, "rejected": [row["rejected"], "Lyon."]}], "row 0, column 'rejected[1]'")
    error_of(tok, [{"prompt": [msg("user", "Hi")], "completions": [[msg("assistant", "a")], "b"],
                    "scores": [1, 0]}], "row 0, column 'completions[1]'", "list of messages")


def test_wrong_types(tok):
    error_of(tok, [pair(), pair(prompt=7)], "row 1, column 'prompt'", "int")
    error_of(tok, [pair(prompt=[{"text": "hi"}])], "row 0, column 'prompt'", "list")
    error_of(tok, [pair(chosen=3.5)], "row 0, column 'chosen'", "float")
    error_of(tok, [{**pair(), "rejected": [" ok", 7]}], "row 0, column 'rejected[1]'", "int")
    error_of(tok, [{**pair(), "rejected": {"text": "no"}}], "row 0, column 'rejected'", "dict")
    # a string prompt with conversational responses
    error_of(tok, [{**conv_pair(), "prompt": "Hi"}], "row 0, column 'chosen'", "string")


# ---------------------------------------------------------------------------------------------------------------
# File readers: every source gives the same rows, hence the same examples


def _datasets():
    user = msg("user", "What is the capital of France?")
    return {
        "multi_negative": [
            {"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": [" Lyon.", " Nice."]},
            {"prompt": "Who wrote \"Hamlet\", 007?", "chosen": " Shakespeare, around 1600.",
             "rejected": [" Marlowe, a, b"]},
            {"prompt": "Why is the sky blue?\nSay it.", "chosen": " Sunlight scatters.",
             "rejected": [" NA", " I love this.", " It is, \"really\", blue."]},
        ],
        "conversational": [
            {"prompt": [user], "chosen": [msg("assistant", "Paris.")],
             "rejected": [[msg("assistant", "Lyon.")], [msg("assistant", "Nice, \"maybe\".")]]},
            {"prompt": [msg("system", "Be brief."), user], "chosen": [msg("assistant", "Paris, 007.")],
             "rejected": [[msg("assistant", "NA")]]},
        ],
        "ranked": [
            {"prompt": "Who wrote Hamlet?", "completions": [" Marlowe.", " Shakespeare.", " A spider."],
             "scores": [0.5, 2.0, -1.0]},
            {"prompt": "Sky?", "completions": [" Blue.", " Green."], "scores": [1.25, 0.0]},
        ],
    }


def _write_jsonl(rows, path):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _write_csv(rows, path):
    columns = list(rows[0])
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: v if isinstance(v, str) else json.dumps(v) for k, v in row.items()})


def _write_parquet(rows, path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def _source(kind, rows, tmp_path):
    """(source, split) holding `rows` in the form `kind`."""
    import datasets

    if kind == "list":
        return rows, "train"
    if kind == "jsonl":
        _write_jsonl(rows, tmp_path / "data.jsonl")
        return tmp_path / "data.jsonl", "train"
    if kind == "ndjson_upper":
        _write_jsonl(rows, tmp_path / "data.v1.NDJSON")
        return str(tmp_path / "data.v1.NDJSON"), "train"
    if kind == "json_list":
        (tmp_path / "data.json").write_text(json.dumps(rows), encoding="utf-8")
        return tmp_path / "data.json", "train"
    if kind == "json_split":
        (tmp_path / "data.json").write_text(json.dumps({"test": rows, "train": rows[:1]}), encoding="utf-8")
        return tmp_path / "data.json", "test"
    if kind == "parquet":
        _write_parquet(rows, tmp_path / "data.parquet")
        return tmp_path / "data.parquet", "train"
    if kind == "pq":
        _write_parquet(rows, tmp_path / "data.pq")
        return tmp_path / "data.pq", "train"
    if kind == "csv":
        _write_csv(rows, tmp_path / "data.csv")
        return tmp_path / "data.csv", "train"
    if kind == "dataset":
        return datasets.Dataset.from_list(rows), "train"
    if kind == "dataset_dict":
        return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}), "test"
    if kind == "dataset_dir":
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
        return tmp_path / "ds", "train"
    if kind == "dataset_dict_dir":
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:1]),
                              "validation": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dd"))
        return str(tmp_path / "dd"), "validation"
    raise AssertionError(kind)


KINDS = ["list", "jsonl", "ndjson_upper", "json_list", "json_split", "parquet", "pq", "csv", "dataset",
         "dataset_dict", "dataset_dir", "dataset_dict_dir"]


@pytest.mark.parametrize("name", ["multi_negative", "conversational", "ranked"])
@pytest.mark.parametrize("kind", KINDS)
def test_readers_agree(tok, tmp_path, kind, name):
    rows = _datasets()[name]
    source, split = _source(kind, rows, tmp_path)
    read = read_preference_rows(source, split=split)
    assert read == rows
    assert run(tok, read) == run(tok, rows)


def test_read_list_copies_rows():
    rows = [pair()]
    read = read_preference_rows(rows)
    read[0]["prompt"] = "changed"
    assert rows[0]["prompt"] == pair()["prompt"]


def test_csv_cells_as_written(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text(
        "id,prompt,chosen,rejected,completions,note\n"
        '007,NA,"[INST] hi","[1, 2",,"[1, 2]"\n'
        '1e3,"[{""role"": ""user"", ""content"": ""Hi""}]", Paris,"[""a"", ""b""]",  [3],true\n',
        encoding="utf-8")
    first, second = read_preference_rows(path)
    # non-list columns and unparseable cells stay strings exactly as written
    assert first == {"id": "007", "prompt": "NA", "chosen": "[INST] hi", "rejected": "[1, 2", "completions": "",
                     "note": "[1, 2]"}
    assert second["id"] == "1e3" and second["note"] == "true" and second["chosen"] == " Paris"
    # list columns holding JSON lists are parsed (leading spaces allowed)
    assert second["prompt"] == [{"role": "user", "content": "Hi"}]
    assert second["rejected"] == ["a", "b"] and second["completions"] == [3]


def test_csv_short_row(tok, tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('prompt,chosen,rejected\nHi?, Paris., Lyon.\nHo?, Paris.\n', encoding="utf-8")
    rows = read_preference_rows(path)
    assert rows[1] == {"prompt": "Ho?", "chosen": " Paris.", "rejected": None}
    error_of(tok, rows, "row 1", "missing", "'rejected'")


def test_csv_ranked_scores(tok, tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('prompt,completions,scores\nHi?,"["" a"", "" b""]","[0, 1.5]"\nHo?,"["" c"", "" d""]",oops\n',
                    encoding="utf-8")
    rows = read_preference_rows(path)
    assert rows[0]["scores"] == [0, 1.5] and rows[1]["scores"] == "oops"
    (example,), _ = run(tok, rows[:1])
    assert example.scores == (1.5, 0.0)
    error_of(tok, rows, "row 1, column 'scores'")


def test_reader_errors(tmp_path):
    with pytest.raises(PreferenceDataError, match="no such file"):
        read_preference_rows(tmp_path / "missing.jsonl")
    (tmp_path / "data.txt").write_text("{}", encoding="utf-8")
    with pytest.raises(PreferenceDataError, match="unknown file type"):
        read_preference_rows(tmp_path / "data.txt")
    with pytest.raises(PreferenceDataError, match="cannot read preference rows from a int"):
        read_preference_rows(42)
    # bad JSONL lines: the 1-based line number (blank lines count)
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": "a",\n', encoding="utf-8")
    with pytest.raises(PreferenceDataError, match=r"line 3 is not valid JSON"):
        read_preference_rows(path)
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(PreferenceDataError, match=r"line 2 is not a JSON object"):
        read_preference_rows(path)
    path.write_text("\n\n", encoding="utf-8")
    assert read_preference_rows(path) == []
    # .json: a list of objects, or a dict holding the split
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"train": [pair()]}), encoding="utf-8")
    with pytest.raises(PreferenceDataError, match="JSON list of objects"):
        read_preference_rows(path, split="test")
    path.write_text(json.dumps([pair(), "row"]), encoding="utf-8")
    with pytest.raises(PreferenceDataError, match="JSON list of objects"):
        read_preference_rows(path)


def test_dataset_dict_missing_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([pair()]),
                               "validation": datasets.Dataset.from_list([pair()])})
    with pytest.raises(PreferenceDataError) as info:
        read_preference_rows(dd, split="test")
    assert "'test'" in str(info.value) and "'train'" in str(info.value) and "'validation'" in str(info.value)
    dd.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(PreferenceDataError, match="validation"):
        read_preference_rows(tmp_path / "dd", split="test")
    assert read_preference_rows(tmp_path / "dd") == [pair()]
