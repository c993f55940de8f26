"""Every query strategy by name: `STRATEGIES` and `make_strategy`."""
from __future__ import annotations

from epa_kernels.active.alps import ALPS
from epa_kernels.active.strategies import BADGE, VAPAL, BertKM, Entropy, Random, Strategy, VAPALDirection

STRATEGIES = {"vapal": VAPAL, "vapal-direction": VAPALDirection, "random": Random, "entropy": Entropy,
              "badge": BADGE, "bertkm": BertKM, "alps": ALPS}


def make_strategy(name: str, **kwargs) -> Strategy:
    """A strategy by name ("vapal", "vapal-direction", "random", "entropy", "badge", "bertkm", "alps";
    case-insensitive) with its options ("alps" needs `mlm=`, a masked language model)."""
    key = name.lower() if isinstance(name, str) else name
    if key not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(map(repr, STRATEGIES))}")
    cls = STRATEGIES[key]
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise TypeError(f"strategy {key!r} ({cls.__name__}) does not take these options: {error}") from None


__all__ = ["STRATEGIES", "make_strategy"]
