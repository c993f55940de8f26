"""The strategies (`epa_kernels.active`) with their --strategy-option keywords, and the checked query."""
from __future__ import annotations

from training.active_learning.cli import ALError, parse_strategy_options
from training.active_learning.model import autocast, mix_seed


def strategy_library():
    try:
        from epa_kernels.active import STRATEGIES, make_strategy
    except ImportError as e:
        raise ALError(f"the strategy library epa_kernels.active is not importable: {e}") from e
    return STRATEGIES, make_strategy


def quiet(cls, options: dict) -> dict:
    """No per-pool tqdm bars from the strategies (one bar for the whole loop) unless asked for."""
    import inspect

    try:
        takes = "progress" in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        takes = False
    return {"progress": False, **options} if takes else dict(options)


def check_strategies(names):
    available, _ = strategy_library()
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ALError(f"unknown strategy {', '.join(map(repr, unknown))}; available: {', '.join(sorted(available))}")


def build_strategies(args) -> dict:
    """The strategies with their --strategy-option keywords, built (and so validated) before any data is read.
    ALPS is built per seed once its masked LM is loaded (`build_alps`); its keywords are checked here."""
    check_strategies(args.strategies)
    available, make_strategy = strategy_library()
    options = parse_strategy_options(args.strategy_option, args.strategies)
    strategies = {}
    for name in args.strategies:
        if name == "alps":
            check_alps_options(available[name], options[name])
            continue
        try:
            strategies[name] = make_strategy(name, **quiet(available[name], options[name]))
        except (TypeError, ValueError) as e:
            given = ", ".join(f"{k}={v!r}" for k, v in options[name].items())
            raise ALError(f"--strategy-option: strategy {name!r} rejects its options ({given}): {e} (an option "
                          "without NAME. goes to every strategy; NAME.KEY=VALUE gives it to one)") from e
    return strategies


def select(strategy, name, model, pool, k, labeled, args, seed, rnd, n) -> list[int]:
    """The strategy's query. Under --precision bf16 it runs inside autocast for the encoder's speed; the library
    computes its head and probability math with autocast disabled (fp32); nothing here computes any."""
    import torch

    with torch.random.fork_rng(devices=[]), autocast(args, next(model.parameters()).device):
        torch.manual_seed(mix_seed(seed, rnd, name, "select"))
        picked = strategy.select(model, pool, k, labeled=list(labeled), batch_size=args.eval_batch_size,
                                 seed=mix_seed(seed, rnd, name, "select"))
    picked = [int(i) for i in (picked.tolist() if hasattr(picked, "tolist") else picked)]
    bad = [i for i in picked if not 0 <= i < n]
    taken = set(labeled) & set(picked)
    if len(picked) != k or len(set(picked)) != k or bad or taken:
        raise RuntimeError(f"strategy {name!r} returned an invalid query: {len(picked)} indices "
                           f"({len(set(picked))} distinct) for k={k}, {len(bad)} out of range, "
                           f"{len(taken)} already labeled")
    return picked




def check_alps_options(cls, options: dict) -> None:
    """ALPS's keywords and values, checked on a stand-in masked LM (the real one is loaded after the data)."""
    import types

    import torch

    stand_in = types.SimpleNamespace(all_special_ids=[0], mask_token_id=0)  # a tokenizer with a mask token
    try:
        cls(mlm=torch.nn.Identity(), **{"tokenizer": stand_in, **quiet(cls, options)})
    except (TypeError, ValueError) as e:
        raise ALError(f"--strategy-option: strategy 'alps' rejects its options: {e}") from e


def build_alps(args, mlm, tokenizer, seed: int):
    """ALPS for one seed: its masked LM, the alps --strategy-option keywords (when alps is among --strategies),
    and, unless given, scored positions drawn under the seed (so the seeds differ in them, as ALPS's runs do)."""
    from epa_kernels.active import ALPS

    options = parse_strategy_options(args.strategy_option, args.strategies).get("alps", {})
    options = {"embedding_seed": mix_seed(seed, "alps-positions"), **quiet(ALPS, options)}
    try:
        return ALPS(mlm=mlm, tokenizer=tokenizer, **options)
    except (TypeError, ValueError) as e:
        raise ALError(f"ALPS rejects its options ({options}): {e}") from e


def select_initial(alps, pool, args, seed, device) -> list[int]:
    """The first labeled set chosen by ALPS (no classifier yet), under the seed the random draw would use."""
    with autocast(args, device):
        picked = alps.select(None, pool, args.initial_size, batch_size=args.eval_batch_size,
                             seed=mix_seed(seed, "initial"))
    if len(set(picked)) != args.initial_size:
        raise RuntimeError(f"ALPS returned {len(set(picked))} distinct initial examples, not {args.initial_size}")
    return sorted(int(i) for i in picked)
