"""The rounds: per seed and strategy, train, evaluate and query, recording each round as it ends."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from epa_kernels.provenance import environment
from training.active_learning.cli import ALError, resolve_args
from training.active_learning.data import content_hash, prepare_data
from training.active_learning.model import (
    check_max_length,
    evaluate,
    load_base_model,
    load_tokenizer,
    mix_seed,
    tokenize,
    train_model,
)
from training.active_learning.report import write_reports
from training.active_learning.state import fingerprint, load_state, uses_alps, write_json
from training.active_learning.strategies import build_alps, build_strategies, select, select_initial


def run(args) -> dict:
    if not args.online:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # everything that can be checked without the data first: a bad option fails before any data is read
    strategies = build_strategies(args)

    import torch
    import transformers
    from tqdm.auto import tqdm

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    tokenizer = load_tokenizer(args)
    check_max_length(args, tokenizer)
    data = prepare_data(args)
    args.data_sha256 = content_hash(data)  # part of the fingerprint: the data's content, not only its path

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curves_path = out / "curves.json"
    state = load_state(curves_path, args, data.label_names)
    session = environment(device)

    def save():
        """Write curves.json; the first write of this invocation adds its session (a resumed study keeps all)."""
        if not any(s is session for s in state["sessions"]):
            state["sessions"].append(session)
        write_json(curves_path, state)

    t0 = time.perf_counter()
    pool = tokenize(tokenizer, data.pool_texts, args.max_length)
    test = tokenize(tokenizer, data.test_texts, args.max_length)
    # Pool index = position in token-length order, so that the strategies' consecutive batches have similar
    # lengths; the library trims each batch to its longest example (no padding to the longest question).
    lengths = pool["attention_mask"].sum(1)
    order = torch.argsort(lengths, stable=True)
    pool = {k: v[order].contiguous() for k, v in pool.items()}
    data.pool_texts = [data.pool_texts[i] for i in order.tolist()]
    data.pool_labels = data.pool_labels[order.numpy()]
    data.pool_rows = [data.pool_rows[i] for i in order.tolist()]
    print(f"data: {data.info}; classes {data.label_names}; tokenised in {time.perf_counter() - t0:.1f}s "
          f"(pool width {pool['input_ids'].shape[1]}, test width {test['input_ids'].shape[1]}); device {device}",
          file=sys.stderr)
    write_json(out / "split.json", {"config": fingerprint(args), "label_names": data.label_names,
                                    "pool_rows": data.pool_rows, "test_rows": data.test_rows, "info": data.info})

    n_pool = len(data.pool_texts)
    mlm = mlm_tokenizer = alps_pool = None
    if uses_alps(args):
        from training.active_learning.mlm import load_mlm

        mlm, mlm_tokenizer, state["mlm"] = load_mlm(args, data.pool_texts, out, device)
        # ALPS reads the pool through its own tokenizer (the same rows, in pool-index order) when it differs
        same = mlm_tokenizer.get_vocab() == tokenizer.get_vocab()
        alps_pool = pool if same else tokenize(mlm_tokenizer, data.pool_texts, args.max_length)
    total_units = len(args.seeds) * len(args.strategies) * (args.rounds + 1)
    bar = tqdm(total=total_units, desc="active learning", unit="round", dynamic_ncols=True)
    for seed in args.seeds:
        alps = build_alps(args, mlm, mlm_tokenizer, seed) if mlm is not None else None
        # a resumed seed keeps the first labels it recorded: ALPS's choice could differ on another machine
        initial, initial_seconds = recorded_initial(state, seed)
        if initial is None and args.initial == "alps":
            t = time.perf_counter()
            initial = select_initial(alps, alps_pool, args, seed, device)
            initial_seconds = time.perf_counter() - t
        elif initial is None:
            initial = sorted(np.random.RandomState(mix_seed(seed, "initial")).choice(
                n_pool, args.initial_size, replace=False).tolist())
        base = None  # loaded when a round of this seed has to be trained
        shared_round0 = None  # (model, metrics): round 0 is the same model for every strategy under a seed

        def get_base():
            nonlocal base
            if base is None:
                base = load_base_model(args, data, seed, device, tokenizer)  # noqa: B023
            return base

        for name in args.strategies:
            strategy, strategy_pool = (alps, alps_pool) if name == "alps" else (strategies[name], pool)
            entries = state["curves"].setdefault(name, {}).setdefault(str(seed), [])
            done = len(entries)  # recorded rounds beyond --rounds (an earlier, longer run) are kept
            bar.update(min(done, args.rounds + 1))
            if done > args.rounds:
                continue
            if done == 0:
                labeled, model = list(initial), None
            else:
                last = entries[-1]
                if last.get("queried") is None:
                    # the last recorded round was the final one of an earlier, shorter run: its model is
                    # retrained (deterministically) to make the query; its recorded metrics are kept
                    labeled = list(last["labeled_indices"])
                    bar.set_postfix_str(f"{name} seed {seed}: retraining round {last['round']} to query")
                    model = train_model(get_base(), pool, data.pool_labels, labeled, args, seed, last["round"], device)
                    q0 = time.perf_counter()
                    last["queried"] = select(strategy, name, model, strategy_pool, args.query_size,
                                             labeled, args, seed, last["round"], n_pool)
                    last["query_seconds"] = time.perf_counter() - q0
                    last["seconds"] = last["train_seconds"] + last["eval_seconds"] + last["query_seconds"]
                    save()
                labeled = sorted(set(last["labeled_indices"]) | set(last["queried"]))
                model = None
            for rnd in range(done, args.rounds + 1):
                bar.set_postfix_str(f"{name} seed {seed} round {rnd} ({len(labeled)} labels)")
                if rnd == 0 and shared_round0 is not None:
                    model, (acc, f1, train_s, eval_s) = shared_round0
                else:
                    t = time.perf_counter()
                    model = train_model(get_base(), pool, data.pool_labels, labeled, args, seed, rnd, device)
                    train_s = time.perf_counter() - t
                    t = time.perf_counter()
                    acc, f1 = evaluate(model, test, data.test_labels, args, device)
                    eval_s = time.perf_counter() - t
                    if rnd == 0:
                        shared_round0 = (model, (acc, f1, train_s, eval_s))
                entry = {"round": rnd, "labels": len(labeled), "accuracy": acc, "macro_f1": f1,
                         "seconds": 0.0, "train_seconds": train_s, "eval_seconds": eval_s, "query_seconds": 0.0,
                         "labeled_indices": list(labeled), "queried": None}
                if rnd < args.rounds:
                    t = time.perf_counter()
                    entry["queried"] = select(strategy, name, model, strategy_pool, args.query_size,
                                              labeled, args, seed, rnd, n_pool)
                    entry["query_seconds"] = time.perf_counter() - t
                    labeled = sorted(set(labeled) | set(entry["queried"]))
                if rnd == 0:
                    entry["initial_seconds"] = initial_seconds  # choosing the first labels (ALPS; 0 at random)
                # what this round costs a strategy on its own (a shared round 0 counts in full)
                entry["seconds"] = train_s + eval_s + entry["query_seconds"] + entry.get("initial_seconds", 0.0)
                entries.append(entry)
                save()
                bar.update(1)
                bar.write(f"{name:>8} seed {seed} round {rnd}: {entry['labels']:5d} labels  acc {acc:.4f}  "
                          f"macro-F1 {f1:.4f}  ({entry['seconds']:.1f}s)", file=sys.stderr)
            model = None
        base = shared_round0 = None
        write_reports(state, out)  # after every seed: the plot and table of what is recorded so far
    bar.close()
    return state


def recorded_initial(state: dict, seed: int) -> tuple[list[int] | None, float]:
    """The first labels (and the seconds it took to choose them) already recorded for `seed`, or (None, 0)."""
    firsts = [runs[str(seed)][0] for runs in state["curves"].values() if runs.get(str(seed))]
    sets = {tuple(entry["labeled_indices"]) for entry in firsts}
    if len(sets) > 1:
        raise ALError(f"curves.json: the strategies of seed {seed} start from {len(sets)} different first labeled "
                      "sets; the record is inconsistent (use another --out or --no-resume)")
    if not sets:
        return None, 0.0
    return list(sets.pop()), max(entry.get("initial_seconds", 0.0) for entry in firsts)


def main(argv=None) -> int:
    args = resolve_args(argv)
    t0 = time.perf_counter()
    try:
        run(args)
    except ALError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    print(f"done in {time.perf_counter() - t0:.0f}s: {out / 'curves.json'}, {out / 'curves.png'}, "
          f"{out / 'summary.md'}", file=sys.stderr)
    if (out / "summary.md").exists():
        print((out / "summary.md").read_text())
    return 0
