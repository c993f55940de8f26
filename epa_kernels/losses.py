"""The preference-loss family on grouped rewards (DESIGN §3): a few [P, G] tensor ops per loss.

Rewards are r_s = β·(logp_s − ref_logp_s) (β·logp_s without a reference), gathered into the groups:
column 0 the positive, columns 1…K strong negatives, the rest weak negatives, -1 padding. Every loss
returns its mean over prompts. Masked entries hold a large finite negative instead of -inf, so
padding can never produce a NaN value or gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from epa_kernels._validation import (
    check_choice,
    check_finite,
    check_positive_finite,
    check_tensor,
    compiling,
    require,
)
from epa_kernels.groups import check_groups

LOSSES = ("epa", "dpo", "ipo", "simpo", "infonca", "nca", "sdpo", "plackett_luce")
_MASKED = -1e30  # exp(_MASKED − anything finite) == 0 in fp32, without -inf arithmetic


@dataclass
class GroupedRewards:
    """Rewards of every group and what each column is. All [P, G] unless noted."""

    rewards: torch.Tensor  # at least fp32, _MASKED at padding
    mask: torch.Tensor  # bool, real entries
    log_weight: torch.Tensor  # log of each e^r's multiplier, _MASKED at padding or zero weight
    strong: torch.Tensor  # bool, strong negatives
    weak: torch.Tensor  # bool, weak negatives
    beta: float
    margin: float
    label_smoothing: float
    targets: torch.Tensor | None  # soft labels from scores (infonca, nca), 0 at padding

    @property
    def negatives(self):
        return self.strong | self.weak


def _weighted_pair_mean(pair_loss, g: GroupedRewards, columns):
    """Σ_j c_j·pair_loss_j / Σ_j c_j over the chosen negative columns of each group."""
    c = torch.where(columns, g.log_weight.exp(), 0.0)
    return (torch.where(columns, pair_loss, 0.0) * c).sum(1) / c.sum(1)


def _sigmoid_pairs(g: GroupedRewards):
    """Pairwise −log σ(r⁺ − r_j − γ), label-smoothed (cDPO), weighted mean over negatives: DPO and SimPO."""
    delta = g.rewards[:, :1] - torch.where(g.mask, g.rewards, 0.0) - g.margin
    eps = g.label_smoothing
    pair = -(1 - eps) * F.logsigmoid(delta) - eps * F.logsigmoid(-delta)
    return _weighted_pair_mean(pair, g, g.negatives)


def _epa(g: GroupedRewards):
    # ℓ = log(w·e^{r⁺−γ} + Σ_s a_s·e^{r_s} + α·Σ_w e^{r_w}) − (r⁺ − γ)
    shifted = g.rewards.clone()
    shifted[:, 0] = shifted[:, 0] - g.margin
    return torch.logsumexp(shifted + g.log_weight, dim=1) - shifted[:, 0]


def _ipo(g: GroupedRewards):
    # (h − 1/(2β))² with h the difference of log-ratios, i.e. of rewards / β
    h = (g.rewards[:, :1] - torch.where(g.mask, g.rewards, 0.0)) / g.beta
    return _weighted_pair_mean((h - 1 / (2 * g.beta)) ** 2, g, g.negatives)


def _sdpo(g: GroupedRewards):
    # S-DPO: −log σ(−log Σ_strong a_j·e^{r_j − r⁺ + γ}) = log(1 + Σ_strong a_j·e^{r_j − r⁺ + γ})
    logits = torch.where(g.strong, g.rewards - g.rewards[:, :1] + g.margin + g.log_weight, _MASKED)
    return F.softplus(torch.logsumexp(logits, dim=1))


def _infonca(g: GroupedRewards):
    # Cross-entropy between soft labels (softmax of scores) and the weighted softmax of rewards.
    log_q = torch.log_softmax(g.rewards + g.log_weight, dim=1)
    return -(g.targets * torch.where(g.mask, log_q, 0.0)).sum(1)


def _nca(g: GroupedRewards):
    # NCA: −Σ_j [t_j·log σ(r_j) + (1/n)·log σ(−r_j)] over the n responses of the group
    r = torch.where(g.mask, g.rewards, 0.0)
    count = g.mask.sum(1, keepdim=True)
    terms = g.targets * F.logsigmoid(r) + F.logsigmoid(-r) / count
    return -torch.where(g.mask, terms, 0.0).sum(1)


def _plackett_luce(g: GroupedRewards):
    # −Σ_k [r_k − log Σ_{j≥k} e^{r_j}] over the ranked list (padding trailing, so masked j add 0).
    num = g.rewards.shape[1]
    later = torch.ones(num, num, dtype=torch.bool, device=g.rewards.device).triu()  # [k, j]: j ≥ k
    tails = torch.where(later, g.rewards[:, None, :], _MASKED)
    terms = g.rewards - torch.logsumexp(tails, dim=2)
    return -torch.where(g.mask, terms, 0.0).sum(1)


_LOSS_FUNCTIONS = {
    "epa": _epa, "dpo": _sigmoid_pairs, "simpo": _sigmoid_pairs, "ipo": _ipo, "sdpo": _sdpo,
    "infonca": _infonca, "nca": _nca, "plackett_luce": _plackett_luce,
}
_NEEDS_NEGATIVE = ("dpo", "simpo", "ipo")
# The options each loss reads; any other option given a non-default value is refused rather than ignored.
# positive_weight: only where the positive's e^r is a term of a softmax (pairs have no such term); weak_weight and
# weights: not nca and plackett_luce, whose terms are not per-response exponentials, nor sdpo's weak columns (it
# reads strong negatives only); score_temperature: only the losses with soft labels from scores.
LOSS_OPTIONS = {
    "epa": ("margin", "positive_weight", "weak_weight", "weights"),
    "dpo": ("margin", "label_smoothing", "weak_weight", "weights"),
    "simpo": ("margin", "label_smoothing", "weak_weight", "weights"),
    "ipo": ("weak_weight", "weights"),
    "sdpo": ("margin", "weights"),
    "infonca": ("positive_weight", "weak_weight", "weights", "score_temperature"),
    "nca": ("score_temperature",),
    "plackett_luce": (),
}


def _check_per_group(name, value, shape, device):
    if value is None:
        return None
    check_tensor(name, value, dims=(2,))
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} must have the shape of groups {tuple(shape)}, got {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but groups is on {device}")
    return value.detach()


def _check_logps(policy_logps, ref_logps) -> int:
    """Validate the per-sequence log-probs [S] (and the reference's, if any); return S."""
    check_tensor("policy_logps", policy_logps, dims=(1,))
    if not policy_logps.is_floating_point():
        raise TypeError(f"policy_logps must be a floating tensor, got {policy_logps.dtype}")
    num_seqs = policy_logps.shape[0]
    if ref_logps is not None:
        check_tensor("ref_logps", ref_logps, dims=(1,))
        if ref_logps.shape[0] != num_seqs:
            raise ValueError(f"ref_logps must have one value per sequence [S] = [{num_seqs}], "
                             f"got {tuple(ref_logps.shape)}")
    return num_seqs


def group_rewards(policy_logps, ref_logps, groups, *, loss="epa", beta=0.1, num_strong=None, weak_weight=1.0,
                  positive_weight=1.0, weights=None, scores=None, score_temperature=1.0, margin=0.0,
                  label_smoothing=0.0) -> GroupedRewards:
    """Validate the arguments of `preference_loss` and gather the rewards into groups."""
    check_choice("loss", loss, LOSSES)
    num_seqs = _check_logps(policy_logps, ref_logps)
    if ref_logps is not None:
        if loss == "simpo":
            raise ValueError("loss='simpo' is reference-free: pass ref_logps=None")
    beta = check_positive_finite("beta", beta)
    margin = check_finite("margin", margin)
    label_smoothing = check_finite("label_smoothing", label_smoothing, low=0.0, high=0.5)
    weak_weight = check_finite("weak_weight", weak_weight, low=0.0)
    positive_weight = check_positive_finite("positive_weight", positive_weight)
    score_temperature = check_positive_finite("score_temperature", score_temperature)
    given = {"margin": margin != 0, "label_smoothing": label_smoothing != 0, "weak_weight": weak_weight != 1.0,
             "positive_weight": positive_weight != 1.0, "weights": weights is not None,
             "score_temperature": score_temperature != 1.0}
    for name in (name for name, set_ in given.items() if set_ and name not in LOSS_OPTIONS[loss]):
        users = [other for other, options in LOSS_OPTIONS.items() if name in options]
        raise ValueError(f"{name} is not used by loss={loss!r} (only by {', '.join(users)}): leave it at its default")

    mask = check_groups(groups, num_seqs, ordered=loss == "plackett_luce")
    if groups.device != policy_logps.device:
        raise ValueError(f"groups is on {groups.device} but policy_logps is on {policy_logps.device}")
    num_prompts, size = groups.shape
    if num_strong is None:
        num_strong = size - 1
    if isinstance(num_strong, bool) or not isinstance(num_strong, int) or not 0 <= num_strong <= size - 1:
        raise ValueError(f"num_strong must be an int in [0, {size - 1}] (columns after the positive), "
                         f"got {num_strong!r}")
    weights = _check_per_group("weights", weights, groups.shape, groups.device)
    scores = _check_per_group("scores", scores, groups.shape, groups.device)
    if weights is not None:
        require(~((weights < 0).any() | ~torch.isfinite(weights).all()), lambda: "weights must be finite and >= 0")
    if loss == "infonca" and scores is None:
        raise ValueError("loss='infonca' needs scores [P, G]: the annotator's rewards that define its soft labels")

    column = torch.arange(size, device=groups.device)
    strong = mask & (column >= 1) & (column <= num_strong)
    weak = mask & (column > num_strong)
    if loss in _NEEDS_NEGATIVE:
        has = (strong | weak).any(1)
        require(has.all(), lambda: f"groups row {int((~has).nonzero()[0])} has no negative, which loss={loss!r} needs")
    if loss == "sdpo":
        has_strong = strong.any(1)
        require(has_strong.all(), lambda: f"groups row {int((~has_strong).nonzero()[0])} has no strong negative, "
                                          "which loss='sdpo' needs")

    dtype = torch.promote_types(policy_logps.dtype, torch.float32)  # never below fp32; fp64 stays fp64
    logps = policy_logps.to(dtype)
    rewards = beta * (logps - ref_logps.to(dtype)) if ref_logps is not None else beta * logps
    rewards = torch.where(mask, rewards[groups.clamp(min=0).long()], _MASKED)
    multiplier = torch.where(column == 0, positive_weight, torch.where(column > num_strong, weak_weight, 1.0))
    multiplier = multiplier.to(dtype).expand(num_prompts, size) * (weights.to(dtype) if weights is not None else 1.0)
    usable = mask & (multiplier > 0)
    if loss in _NEEDS_NEGATIVE:
        weighed = (usable & (strong | weak)).any(1)
        require(weighed.all(), lambda: f"groups row {int((~weighed).nonzero()[0])}: every negative has weight 0 "
                                       f"(weak_weight={weak_weight}, weights), so loss={loss!r}'s weighted mean over "
                                       "negatives is undefined")
    log_weight = torch.where(usable, multiplier.clamp(min=1e-30).log(), _MASKED)

    targets = None
    if loss in ("infonca", "nca"):
        if scores is None:  # NCA without scores: all the label mass on the positive
            targets = (column == 0).to(dtype).expand(num_prompts, size)
        else:
            logits = torch.where(mask, scores.to(dtype) / score_temperature, -math.inf)
            require(torch.isfinite(logits.amax(1)).all(),
                    lambda: "scores must have a finite value for at least one response of every group")
            targets = torch.where(mask, torch.softmax(logits, dim=1), 0.0).to(dtype)
    return GroupedRewards(rewards, mask, log_weight, strong, weak, beta, margin, label_smoothing, targets)


def preference_metrics(g: GroupedRewards) -> dict[str, torch.Tensor]:
    """Detached scalars to log: mean rewards (positive, strong, weak), margin, accuracy, positive probability."""
    with torch.no_grad():
        r = g.rewards
        metrics = {"reward_positive": r[:, 0].mean()}
        if compiling():  # keys fixed by the shapes, no data-dependent branch: masked means (0 where none)
            return _static_metrics(g, metrics)
        for name, columns in (("reward_strong", g.strong), ("reward_weak", g.weak)):
            if bool(columns.any()):
                metrics[name] = r[columns].mean()
        has_negative = g.negatives.any(1)
        if bool(has_negative.any()):
            negatives = torch.where(g.negatives, r, 0.0)
            mean_negative = negatives.sum(1) / g.negatives.sum(1).clamp(min=1)
            best_negative = torch.where(g.negatives, r, _MASKED).amax(1)
            metrics["margin"] = (r[:, 0] - mean_negative)[has_negative].mean()
            metrics["accuracy"] = (r[:, 0] > best_negative)[has_negative].float().mean()
        metrics["positive_prob"] = torch.softmax(r, dim=1)[:, 0].mean()
    return metrics


def _static_metrics(g: GroupedRewards, metrics: dict) -> dict:
    """`preference_metrics` under torch.compile: every key, means over the real entries (0 when there are none)."""
    r = g.rewards
    for name, columns in (("reward_strong", g.strong), ("reward_weak", g.weak)):
        metrics[name] = torch.where(columns, r, 0.0).sum() / columns.sum().clamp(min=1)
    has_negative = g.negatives.any(1)
    rows = has_negative.sum().clamp(min=1)
    mean_negative = torch.where(g.negatives, r, 0.0).sum(1) / g.negatives.sum(1).clamp(min=1)
    best_negative = torch.where(g.negatives, r, _MASKED).amax(1)
    metrics["margin"] = torch.where(has_negative, r[:, 0] - mean_negative, 0.0).sum() / rows
    metrics["accuracy"] = ((r[:, 0] > best_negative) & has_negative).float().sum() / rows
    metrics["positive_prob"] = torch.softmax(r, dim=1)[:, 0].mean()
    return metrics


def _gather_checked(policy_logps, ref_logps, groups, process_group, **options):
    """Every rank's log-probs, after every rank checked its inputs and the ranks agreed (a bad input on one rank
    raises on all of them rather than hanging the others in the backward's all-reduce)."""
    from epa_kernels import distributed

    error, count = None, 0
    try:
        count = _check_logps(policy_logps, ref_logps)
    except (ValueError, TypeError) as caught:
        error = caught
    device = distributed.collective_device(process_group, policy_logps)
    counts = distributed.exchange_counts(count, device, process_group, error)
    total = sum(counts)
    try:
        group_rewards(torch.zeros(total, device=policy_logps.device),
                      None if ref_logps is None else torch.zeros(total, device=policy_logps.device), groups,
                      **options)
    except (ValueError, TypeError) as caught:
        error = caught
    distributed.agree(error, device, process_group)
    policy_logps = distributed.all_gather_sequences(policy_logps, process_group, counts)
    if ref_logps is not None:
        ref_logps = distributed.all_gather_sequences(ref_logps.detach(), process_group, counts)
    return policy_logps, ref_logps


def preference_loss(policy_logps, ref_logps, groups, *, loss="epa", beta=0.1, num_strong=None, weak_weight=1.0,
                    positive_weight=1.0, weights=None, scores=None, score_temperature=1.0, margin=0.0,
                    label_smoothing=0.0, process_group=None):
    """Group preference loss from per-sequence log-probs → (loss, metrics).

    policy_logps [S], ref_logps [S] or None (reference-free), groups [P, G] (see `make_groups`).
    loss: "epa" (default), "dpo", "ipo", "simpo" (pass mean log-probs, ref_logps=None), "infonca"
    (needs scores), "nca", "sdpo" (strong negatives only), "plackett_luce" (rows ranked best→worst).
    num_strong: columns 1…num_strong are strong negatives, the rest weak (default: all strong).
    weights [P, G] multiply each e^r (EPA, InfoNCA, S-DPO) or weight each pair (DPO, IPO, SimPO); weak_weight (α)
    does the same for weak negatives (not S-DPO: strong only); positive_weight (w) multiplies the positive's e^r
    (EPA, InfoNCA only). scores [P, G]: soft labels softmax(scores / score_temperature) (InfoNCA, NCA).
    An option the loss does not use is refused, not ignored.
    margin γ: the positive's reward is lowered by γ. label_smoothing ε: conservative DPO.
    process_group: gather every rank's log-probs first, so groups may index any rank's sequences
    (global index = position in the rank-ordered concatenation); each rank's loss is the mean over
    its own groups.
    metrics: detached mean positive / strong / weak rewards, mean margin, accuracy (the positive beats
    every negative) and mean softmax probability of the positive.
    """
    if process_group is not None:
        policy_logps, ref_logps = _gather_checked(policy_logps, ref_logps, groups, process_group, loss=loss, beta=beta,
                                                  num_strong=num_strong, weak_weight=weak_weight,
                                                  positive_weight=positive_weight, weights=weights, scores=scores,
                                                  score_temperature=score_temperature, margin=margin,
                                                  label_smoothing=label_smoothing)
    g = group_rewards(policy_logps, ref_logps, groups, loss=loss, beta=beta, num_strong=num_strong,
                      weak_weight=weak_weight, positive_weight=positive_weight, weights=weights, scores=scores,
                      score_temperature=score_temperature, margin=margin, label_smoothing=label_smoothing)
    return _LOSS_FUNCTIONS[loss](g).mean(), preference_metrics(g)
