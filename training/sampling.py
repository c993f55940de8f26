"""Answers sampled from a causal LM, and their log-probs through the fused kernel: the evaluation's win rate
(greedy answers) and its KL estimate (sampled answers).

KL(π‖π_ref) on a prompt is E_{y~π}[log π(y|x) − log π_ref(y|x)]; `sample_answers` draws y from the policy (pure
sampling, temperature 1, so the estimate is unbiased for the answer distribution truncated at max_new_tokens) and
`answer_logps` scores the same token ids under either model, so no decode/re-encode changes the sequence.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from epa_kernels.transformers import PreferenceModel, pack_sequences
from epa_kernels.transformers.reference_cache import token_budget_chunks


def user_text(prompt) -> str:
    """What the gold function is given: the last user message of a conversation, else the prompt itself."""
    if isinstance(prompt, list):
        users = [m["content"] for m in prompt if m.get("role") == "user"]
        return str(users[-1] if users else prompt[-1]["content"])
    return prompt


def prompt_ids(tokenizer, prompt) -> list[int]:
    """A conversation through the chat template (generation prompt added), plain text as is."""
    if isinstance(prompt, list):
        ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=False)
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)
    return list(tokenizer(prompt)["input_ids"])


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


@torch.no_grad()
def _generate(model, tokenizer, encoded, *, max_new_tokens, max_tokens, num_return_sequences=1, **kwargs):
    """Generated token ids [prompt][return sequence], in left-padded batches of ≤ max_tokens tokens."""
    pad = _pad_id(tokenizer)
    device = model.get_output_embeddings().weight.device
    out: list[list[list[int]]] = [[] for _ in encoded]
    lengths = [(len(ids) + max_new_tokens) * num_return_sequences for ids in encoded]
    for chunk in token_budget_chunks(list(range(len(encoded))), lengths, max_tokens):
        width = max(len(encoded[i]) for i in chunk)
        input_ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in chunk], device=device)
        output = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                pad_token_id=pad, num_return_sequences=num_return_sequences, **kwargs)
        rows = output[:, width:].tolist()
        for n, i in enumerate(chunk):
            out[i] = rows[n * num_return_sequences:(n + 1) * num_return_sequences]
    return out


def greedy_samples(model, tokenizer, prompts, *, max_new_tokens, max_length, max_tokens) -> list[str]:
    """Greedy answers (new tokens only, decoded) to the prompts, left-padded batches of ≤ max_tokens tokens."""
    encoded = [prompt_ids(tokenizer, p)[-max_length:] for p in prompts]  # keep the end, next to the answer
    rows = _generate(model, tokenizer, encoded, max_new_tokens=max_new_tokens, max_tokens=max_tokens,
                     do_sample=False)
    return [tokenizer.decode(row[0], skip_special_tokens=True) for row in rows]


def _until_eos(ids: list[int], eos: set[int]) -> list[int]:
    """The sampled ids up to and including the first end-of-sequence token (the rest is padding)."""
    for n, token in enumerate(ids):
        if token in eos:
            return ids[:n + 1]
    return ids


def sample_answers(model, tokenizer, prompts, num_samples: int, *, max_new_tokens: int, max_length: int,
                   max_tokens: int, seed: int) -> list[list[list[int]]]:
    """num_samples answers per prompt as token ids [prompt][sample], drawn at temperature 1 (no top-k/top-p)
    under torch.manual_seed(seed); each ends at its first end-of-sequence token, which it keeps."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be ≥ 1, got {num_samples}")
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else \
        tokenizer.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    encoded = [prompt_ids(tokenizer, p)[-max_length:] for p in prompts]
    torch.manual_seed(seed)
    rows = _generate(model, tokenizer, encoded, max_new_tokens=max_new_tokens, max_tokens=max_tokens,
                     num_return_sequences=num_samples, do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    return [[_until_eos(ids, eos) for ids in samples] for samples in rows]


@torch.no_grad()
def answer_logps(model, tokenizer, prompts, answers: Sequence[Sequence[Sequence[int]]], *, max_length: int,
                 max_tokens: int, backend: str = "auto") -> list[list[float]]:
    """Σ log p(answer token) of each answer ([prompt][sample] token ids) after its prompt, under `model`, through
    the fused kernel (no logits), packed in batches of ≤ max_tokens tokens."""
    wrapper = PreferenceModel(model, reduction="sum", backend=backend)
    encoded = [prompt_ids(tokenizer, p)[-max_length:] for p in prompts]
    sequences = [(encoded[i], list(a)) for i, samples in enumerate(answers) for a in samples]
    values: list[float] = [0.0] * len(sequences)
    lengths = [len(p) + len(a) for p, a in sequences]
    device = wrapper.head.weight.device
    for chunk in token_budget_chunks(list(range(len(sequences))), lengths, max_tokens):
        logps = wrapper.sequence_logps(pack_sequences([sequences[i] for i in chunk], device))
        for i, value in zip(chunk, logps.double().cpu().tolist(), strict=True):
            values[i] = value
    out, start = [], 0
    for samples in answers:
        out.append(values[start:start + len(samples)])
        start += len(samples)
    return out
