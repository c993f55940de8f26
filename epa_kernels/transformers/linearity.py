"""The EPA paper's intrinsic linearity test: is the implicit reward a 1:1 linear function of the gold reward?

DPO-style training is right only if `r(x, y) = β·(log π(y|x) − log π_ref(y|x))` equals the true reward up to a
per-prompt constant (DESIGN §9). Given, per prompt p, responses i with implicit rewards r_pi and gold rewards g_pi,
both are centred per prompt (x = g − mean_p g, y = r − mean_p r), which removes that constant, and then:

- per prompt: Pearson ρ_p = Σxy / √(Σx²·Σy²), the least-squares slope b_p = Σxy / Σx² of implicit on gold and
  the paper's slope-1 regression error e_p = mean (y − x)²; `mean_pearson`, `mean_slope` and
  `mean_regression_error` are their unweighted means over prompts. Correlation 1 is always the target; slope 1 (and
  error 0) is the target when the preferences were drawn from the gold reward by Bradley–Terry at that scale.
- pooled: Pearson and slope over every centred point of every prompt at once.
- pairwise accuracy: over the within-prompt pairs with distinct gold, the fraction the implicit reward orders
  like the gold one (an implicit tie counts 0.5).

Only a prompt with ≥ 3 distinct gold values can show whether the implicit reward is *linear* in gold: through two
gold values every monotone function is a line, and with two responses the centred Pearson is exactly ±1. So the
per-prompt means are over prompts with ≥ 3 distinct gold values; a prompt with exactly 2 is counted in
`two_valued_gold` and its pairs, the only thing it can tell, in `two_valued_pairwise_accuracy`; a prompt whose gold
rewards are all equal is counted in `constant_gold`. Neither has per-prompt values (NaN). A prompt in the means
whose implicit rewards are all equal has slope 0 (the implicit reward does not respond to gold) but no correlation:
it stays in the slope and error means and is counted in `constant_implicit`. "Equal" is exact, as for a policy
identical to its reference. Every prompt stays in the pooled numbers and the pairwise accuracy (a flat side
centres to zero).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class LinearityReport:
    """The linearity test's numbers; NaN where undefined (no prompt or pair to average over). Per-prompt values are
    NaN for a prompt left out of their mean, so each mean is that of its per-prompt values, NaN skipped."""

    mean_pearson: float  # over prompts with ≥ 3 distinct gold values and unequal implicit ones
    mean_slope: float  # over prompts with ≥ 3 distinct gold values
    mean_regression_error: float  # over prompts with ≥ 3 distinct gold values
    pooled_pearson: float
    pooled_slope: float
    pairwise_accuracy: float
    num_prompts: int
    num_responses: int
    num_pairs: int  # within-prompt pairs with distinct gold rewards
    constant_gold: int  # prompts with 1 distinct gold value: left out of the means
    two_valued_gold: int  # prompts with 2 distinct gold values: left out of the means
    two_valued_pairwise_accuracy: float  # pairwise accuracy over those prompts' pairs only
    constant_implicit: int  # prompts in the means with all implicit rewards equal: left out of the Pearson mean
    per_prompt_pearson: tuple[float, ...]
    per_prompt_slope: tuple[float, ...]
    per_prompt_regression_error: tuple[float, ...]

    def to_dict(self) -> dict:
        """A JSON-ready dict: tuples become lists and NaN becomes None."""
        return {key: _json_value(value) for key, value in asdict(self).items()}


def _json_value(value):
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _as_values(name: str, values, min_length: int) -> np.ndarray:
    """values as a 1-D float64 array of ≥ min_length finite numbers; `name` says which prompt it is."""
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name}: not a sequence of numbers ({error})") from None
    if array.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D sequence of numbers, got shape {array.shape}")
    if len(array) < min_length:
        raise ValueError(f"{name}: {len(array)} value(s); need ≥ {min_length}")
    bad = np.flatnonzero(~np.isfinite(array))
    if len(bad):
        raise ValueError(f"{name}[{bad[0]}]: not finite ({array[bad[0]]})")
    return array


def _per_prompt(name: str, values) -> list[np.ndarray]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a sequence of per-prompt sequences of floats, got {type(values).__name__}")
    return [_as_values(f"{name}[{p}] (prompt {p})", row, 2) for p, row in enumerate(values)]


def _pearson(xy: float, xx: float, yy: float) -> float:
    """Σxy / √(Σx²·Σy²), clipped to [−1, 1] against rounding; NaN when either sum of squares is 0."""
    if not (xx > 0 and yy > 0):
        return math.nan
    return max(-1.0, min(1.0, xy / math.sqrt(xx * yy)))


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def linearity_report(implicit: Sequence[Sequence[float]], gold: Sequence[Sequence[float]]) -> LinearityReport:
    """The linearity test of per-prompt implicit rewards against gold rewards (ragged: any number ≥ 2 of
    responses per prompt, the same in both). See the module docstring for the formulas."""
    implicit_rows, gold_rows = _per_prompt("implicit", implicit), _per_prompt("gold", gold)
    if len(implicit_rows) != len(gold_rows):
        raise ValueError(f"implicit has {len(implicit_rows)} prompts, gold has {len(gold_rows)}")
    if not gold_rows:
        raise ValueError("no prompts: implicit and gold are empty")
    pearsons, slopes, errors = [], [], []
    constant_gold = two_valued = constant_implicit = 0
    num_pairs = two_pairs = 0
    correct = two_correct = sxy = sxx = syy = 0.0
    for p, (r, g) in enumerate(zip(implicit_rows, gold_rows, strict=True)):
        if len(r) != len(g):
            raise ValueError(f"prompt {p}: implicit has {len(r)} responses, gold has {len(g)}")
        x, y = g - g.mean(), r - r.mean()
        xy, xx, yy = float(x @ y), float(x @ x), float(y @ y)
        sxy, sxx, syy = sxy + xy, sxx + xx, syy + yy
        # Exact equality, not the centred variance: centring equal values can leave rounding residue.
        distinct_gold, flat_implicit = len(np.unique(g)), bool(r.min() == r.max())
        averaged = distinct_gold >= 3
        constant_gold += distinct_gold == 1
        two_valued += distinct_gold == 2
        constant_implicit += averaged and flat_implicit
        slopes.append(xy / xx if averaged else math.nan)
        errors.append(float(np.mean((y - x) ** 2)) if averaged else math.nan)
        pearsons.append(_pearson(xy, xx, yy) if averaged and not flat_implicit else math.nan)
        gold_order = np.sign(g[:, None] - g[None, :])
        implicit_order = np.sign(r[:, None] - r[None, :])
        pairs = np.triu(gold_order != 0, k=1)  # each unordered pair once, gold ties left out
        agreement = gold_order[pairs] * implicit_order[pairs]  # 1 agree, 0 implicit tie, −1 disagree
        agreed, count = float(((agreement + 1) / 2).sum()), int(pairs.sum())
        correct, num_pairs = correct + agreed, num_pairs + count
        if distinct_gold == 2:
            two_correct, two_pairs = two_correct + agreed, two_pairs + count
    return LinearityReport(
        mean_pearson=_nanmean(pearsons), mean_slope=_nanmean(slopes), mean_regression_error=_nanmean(errors),
        pooled_pearson=_pearson(sxy, sxx, syy), pooled_slope=sxy / sxx if sxx > 0 else math.nan,
        pairwise_accuracy=correct / num_pairs if num_pairs else math.nan,
        num_prompts=len(gold_rows), num_responses=sum(map(len, gold_rows)), num_pairs=num_pairs,
        constant_gold=constant_gold, two_valued_gold=two_valued,
        two_valued_pairwise_accuracy=two_correct / two_pairs if two_pairs else math.nan,
        constant_implicit=constant_implicit, per_prompt_pearson=tuple(pearsons), per_prompt_slope=tuple(slopes),
        per_prompt_regression_error=tuple(errors),
    )


def win_rate(policy_gold: Sequence[float], reference_gold: Sequence[float]) -> float:
    """Fraction of prompts where the policy's sample has a higher gold reward than the reference's:
    (1/P)·Σ_p [1(g_policy > g_ref) + ½·1(g_policy = g_ref)]."""
    policy = _as_values("policy_gold", policy_gold, 1)
    reference = _as_values("reference_gold", reference_gold, 1)
    if len(policy) != len(reference):
        raise ValueError(f"policy_gold has {len(policy)} prompts, reference_gold has {len(reference)}")
    return float(np.mean((np.sign(policy - reference) + 1) / 2))
