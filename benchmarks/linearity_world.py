"""The controlled world of `python -m benchmarks.linearity_theory`: a known true reward, a reference policy, offline
preferences drawn as the preference models assume, two policy families, full-batch training with the library's loss.

Shapes: X prompts and Y responses shared by every prompt; tables are [X, Y] (row x prompt x, column y response y).
The scored sequences are the flat [X·Y] table: prompt x scoring response y is sequence x·Y + y, so a weak negative (a
response sampled for another prompt) is scored under its group's own prompt, as in the library (DESIGN §3).
Every random choice has its own generator keyed by (seed, purpose), so adding one draw never shifts another.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from epa_kernels import preference_loss
from epa_kernels.transformers.linearity import linearity_report

DTYPE = torch.float64  # the closed forms are checked to ~1e-4 after centring: fp32 rounding would blur them


def generator(seed: int, purpose: str) -> np.random.Generator:
    """The numpy generator of one purpose under one seed."""
    return np.random.default_rng([seed, zlib.crc32(purpose.encode())])


def torch_generator(seed: int, purpose: str) -> torch.Generator:
    return torch.Generator().manual_seed(int(generator(seed, purpose).integers(2**62)))


def _gumbel(rng: np.random.Generator, shape) -> np.ndarray:
    return -np.log(-np.log(rng.uniform(np.finfo(float).tiny, 1.0, size=shape)))


# ---------------------------------------------------------------------------------------------------------------
# The world


@dataclass(frozen=True)
class WorldConfig:
    num_prompts: int = 16
    num_responses: int = 64
    feature_dim: int = 8
    reward_std: float = 1.5  # mean within-prompt std of r*, in Bradley–Terry units
    ref_sharpness: float = 0.5  # λ: π_ref(·|x) = softmax(λ·r*(x, ·) + noise)
    ref_noise: float = 0.5  # std of that noise


@dataclass(frozen=True)
class World:
    config: WorldConfig
    prompt_features: np.ndarray  # [X, d] φ_x
    response_features: np.ndarray  # [Y, d] ψ_y
    true_reward: np.ndarray  # [X, Y] r*(x, y)
    ref_logits: np.ndarray  # [X, Y]
    ref_logps: np.ndarray  # [X, Y] log π_ref(y|x)

    def other_prompt_mixture(self) -> np.ndarray:
        """[X, Y]: the law of a response sampled for a uniformly chosen other prompt x' ≠ x, mean of π_ref(·|x')."""
        probs = np.exp(self.ref_logps)
        return (probs.sum(0, keepdims=True) - probs) / (len(probs) - 1)

    def own_vs_other_gap(self) -> float:
        """Mean over prompts of E[r*(x, y)] for y ~ π_ref(·|x) minus for y sampled for another prompt: the premise of
        weak negatives is that this is > 0 (exact expectations, no sampling)."""
        own = (np.exp(self.ref_logps) * self.true_reward).sum(1)
        other = (self.other_prompt_mixture() * self.true_reward).sum(1)
        return float((own - other).mean())


def make_world(config: WorldConfig, seed: int) -> World:
    """r*(x, y) = s·φ_xᵀ M ψ_y (s sets the mean within-prompt std to reward_std); π_ref = softmax(λ·r* + noise)."""
    rng = generator(seed, "world")
    d = config.feature_dim
    prompts = rng.standard_normal((config.num_prompts, d))
    responses = rng.standard_normal((config.num_responses, d))
    bilinear = rng.standard_normal((d, d)) / math.sqrt(d)
    raw = prompts @ bilinear @ responses.T
    true_reward = raw * (config.reward_std / raw.std(1).mean())
    noise = generator(seed, "reference").standard_normal(true_reward.shape)
    ref_logits = config.ref_sharpness * true_reward + config.ref_noise * noise
    ref_logps = ref_logits - np.logaddexp.reduce(ref_logits, axis=1, keepdims=True)
    return World(config, prompts, responses, true_reward, ref_logits, ref_logps)


# ---------------------------------------------------------------------------------------------------------------
# Offline preferences


@dataclass(frozen=True)
class Preferences:
    """Observed groups: `groups [P, G]` int64 into the flat [X·Y] table (column 0 the positive, columns
    1…num_strong strong negatives, the rest weak, -1 padding); P = X·num_obs, prompt-major."""

    groups: torch.Tensor
    num_strong: int
    num_prompts: int
    num_responses: int

    def sampled(self) -> np.ndarray:
        """[X, Y] bool: the responses that appear in some group of each prompt (scored at least once)."""
        flat = np.zeros(self.num_prompts * self.num_responses, dtype=bool)
        index = self.groups.numpy()
        flat[index[index >= 0]] = True
        return flat.reshape(self.num_prompts, self.num_responses)

    def counts(self) -> np.ndarray:
        """[X, Y]: how often each response was the positive of its prompt."""
        return np.bincount(self.groups[:, 0].numpy(), minlength=self.num_prompts * self.num_responses).reshape(
            self.num_prompts, self.num_responses)


def _top(keys: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest keys along the last axis, largest first."""
    return np.argsort(-keys, axis=-1, kind="stable")[..., :k]


def draw_preferences(world: World, seed: int, num_obs: int, num_strong: int, num_weak: int = 0,
                     choice: str = "strong") -> Preferences:
    """num_obs observations per prompt. Each: K+1 distinct responses sampled from π_ref(·|x) (the strong set) and W
    weak negatives, distinct responses sampled for other prompts x' ≠ x outside the strong set; the positive is drawn
    by the energy model P(y) ∝ exp r*(x, y) over the strong set (choice="strong": the annotator saw only those; weak
    negatives appended after) or over strong ∪ weak (choice="all": the EPA model exactly). K = 1, W = 0 is a
    Bradley–Terry pair: the winner by σ(r*_a − r*_b).

    Sampling without replacement is the Gumbel-top-k trick: the k largest of log p + Gumbel are k successive draws
    without replacement; for weak negatives p is the other-prompt mixture, which is the same as drawing x' uniformly,
    y ~ π_ref(·|x') and redrawing duplicates. Generators are keyed so that cells share what they can: the strong sets
    and strong-mode positives do not depend on W, and the weak sets of a smaller W are a prefix of a larger W's.
    """
    cfg = world.config
    X, Y, K, W = cfg.num_prompts, cfg.num_responses, num_strong, num_weak
    if K + 1 + W > Y:
        raise ValueError(f"K + 1 + W = {K + 1 + W} responses per group exceed the {Y} responses of the world")
    if choice not in ("strong", "all"):
        raise ValueError(f"choice must be 'strong' or 'all', got {choice!r}")
    shape = (X, num_obs, Y)
    strong = _top(world.ref_logps[:, None, :] + _gumbel(generator(seed, f"strong/K={K}/n={num_obs}"), shape), K + 1)
    weak = np.zeros((X, num_obs, 0), dtype=strong.dtype)
    if W:
        keys = np.log(world.other_prompt_mixture())[:, None, :] + _gumbel(generator(seed, f"weak/K={K}/n={num_obs}"),
                                                                            shape)
        np.put_along_axis(keys, strong, -np.inf, axis=-1)
        weak = _top(keys, W)
    rewards = world.true_reward[:, None, :]
    if choice == "strong":
        chooser = generator(seed, f"positive/K={K}/n={num_obs}")
        winner = np.argmax(np.take_along_axis(rewards, strong, -1) + _gumbel(chooser, strong.shape), -1)
        positive = np.take_along_axis(strong, winner[..., None], -1)
        rest = strong[np.arange(K + 1) != winner[..., None]].reshape(X, num_obs, K)
        rows, columns_strong = np.concatenate([positive, rest, weak], -1), K
    else:  # the positive may be any member: its slot is left as -1, so strong and weak columns keep their places
        union = np.concatenate([strong, weak], -1)
        chooser = generator(seed, f"positive-all/K={K}/W={W}/n={num_obs}")
        winner = np.argmax(np.take_along_axis(rewards, union, -1) + _gumbel(chooser, union.shape), -1)
        positive = np.take_along_axis(union, winner[..., None], -1)
        np.put_along_axis(union, winner[..., None], -1, axis=-1)
        rows, columns_strong = np.concatenate([positive, union], -1), K + 1
    flat = np.where(rows >= 0, rows + Y * np.arange(X)[:, None, None], -1)
    return Preferences(torch.from_numpy(flat.reshape(X * num_obs, -1)).long(), columns_strong, X, Y)


# ---------------------------------------------------------------------------------------------------------------
# Policies: forward() → log π [X, Y]. Both store their change in reward units (logits = ref + change/β), so one
# learning rate serves every β and the implicit reward β·(log π − log π_ref) is the change up to a per-prompt constant.


class TabularPolicy(torch.nn.Module):
    """log π(·|x) = log_softmax(ref_logits[x] + u[x]/β), u [X, Y] free; u starts at init_noise·N(0, 1) (0: π_ref)."""

    def __init__(self, world: World, beta: float, init_noise: float = 0.0, seed: int = 0, purpose: str = "init"):
        super().__init__()
        self.beta = beta
        self.register_buffer("ref_logits", torch.tensor(world.ref_logits, dtype=DTYPE))
        noise = torch.randn(self.ref_logits.shape, generator=torch_generator(seed, purpose), dtype=DTYPE)
        self.change = torch.nn.Parameter(init_noise * noise)

    def forward(self) -> torch.Tensor:
        return torch.log_softmax(self.ref_logits + self.change / self.beta, dim=1)


class NetworkPolicy(torch.nn.Module):
    """log π(y|x) = log_softmax_y(ref_logit(x, y) + f([φ_x, ψ_y])/β), f: Linear(2d, hidden) → tanh → Linear(hidden,
    1). f's last layer starts at zero, so every initialisation starts at π_ref; what it learns for one response moves
    the others through the shared features."""

    def __init__(self, world: World, beta: float, hidden: int = 32, seed: int = 0, purpose: str = "network-init"):
        super().__init__()
        self.beta = beta
        X, Y = world.true_reward.shape
        pairs = np.concatenate([np.repeat(world.prompt_features[:, None], Y, 1),
                                np.repeat(world.response_features[None], X, 0)], -1)
        self.register_buffer("inputs", torch.tensor(pairs, dtype=DTYPE))  # [X, Y, 2d]
        self.register_buffer("ref_logits", torch.tensor(world.ref_logits, dtype=DTYPE))
        torch_gen = torch_generator(seed, purpose)
        d_in = pairs.shape[-1]
        self.hidden = torch.nn.Linear(d_in, hidden, dtype=DTYPE)
        with torch.no_grad():  # PyTorch's default uniform init, from this run's own generator
            bound = 1 / math.sqrt(d_in)
            self.hidden.weight.uniform_(-bound, bound, generator=torch_gen)
            self.hidden.bias.uniform_(-bound, bound, generator=torch_gen)
        self.out = torch.nn.Linear(hidden, 1, dtype=DTYPE)
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.zeros_(self.out.bias)

    def forward(self) -> torch.Tensor:
        change = self.out(torch.tanh(self.hidden(self.inputs))).squeeze(-1)
        return torch.log_softmax(self.ref_logits + change / self.beta, dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Training and measuring


@dataclass(frozen=True)
class Fit:
    loss: float  # final full-batch loss
    grad_norm: float  # its gradient's norm over every parameter
    implicit: np.ndarray  # [X, Y] β·(log π − log π_ref), every response of every prompt
    curve: tuple[float, ...]  # the loss at 10 evenly spaced steps (Adam), to see the plateau


def objective(policy, world: World, prefs: Preferences, *, loss: str, beta: float, weak_weight: float = 1.0):
    """The library's grouped loss of the policy's whole table on every observation at once (full batch)."""
    ref = torch.tensor(world.ref_logps, dtype=DTYPE).reshape(-1)
    value, _ = preference_loss(policy().reshape(-1), ref, prefs.groups, loss=loss, beta=beta,
                               num_strong=prefs.num_strong, weak_weight=weak_weight)
    return value


def train(policy, world: World, prefs: Preferences, *, loss: str, beta: float, weak_weight: float = 1.0,
          steps: int = 400, lr: float = 0.05, optimizer: str = "adam") -> Fit:
    """Full-batch training. adam: `steps` Adam steps, cosine-decayed from lr to 0 (the sweep's fixed budget; lr in
    reward units per step for the tabular policy). lbfgs: up to `steps` L-BFGS iterations with a strong-Wolfe line
    search, to machine tolerance (the closed forms, where the optimum is finite)."""
    params = list(policy.parameters())

    def value():
        return objective(policy, world, prefs, loss=loss, beta=beta, weak_weight=weak_weight)

    curve = []
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        marks = set(np.linspace(0, steps - 1, 10).round().astype(int).tolist())
        for step in range(steps):
            opt.zero_grad()
            current = value()
            current.backward()
            opt.step()
            schedule.step()
            if step in marks:
                curve.append(current.item())
    elif optimizer == "lbfgs":
        opt = torch.optim.LBFGS(params, lr=1, max_iter=steps, max_eval=2 * steps, tolerance_grad=1e-12,
                                tolerance_change=1e-15, history_size=50, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            current = value()
            current.backward()
            return current

        opt.step(closure)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'lbfgs', got {optimizer!r}")
    final = value()
    grads = torch.autograd.grad(final, params, allow_unused=True)
    grad_norm = math.sqrt(sum(float((g ** 2).sum()) for g in grads if g is not None))
    with torch.no_grad():
        implicit = beta * (policy() - torch.tensor(world.ref_logps, dtype=DTYPE))
    return Fit(final.item(), grad_norm, implicit.numpy(), tuple(curve))


def centred(table: np.ndarray) -> np.ndarray:
    return table - table.mean(1, keepdims=True)


def linearity(implicit: np.ndarray, world: World, mask: np.ndarray | None = None) -> dict:
    """The library's linearity report of implicit against true reward, over every response ([X, Y] tables) or over
    the responses where mask [X, Y] is true (prompts with fewer than 2 such responses are left out)."""
    # Rounded to 1e-9 so that rounding noise cannot order responses the loss treats alike (e.g. two responses never
    # scored, or two that each lost once): exact ties count ½ in the pairwise accuracy.
    implicit = np.round(implicit, 9)
    rows = [np.ones(implicit.shape[1], dtype=bool)] * len(implicit) if mask is None else list(mask)
    keep = [p for p, row in enumerate(rows) if row.sum() >= 2]
    if not keep:  # e.g. one positive per prompt: nothing to compare
        return {"pearson": math.nan, "slope": math.nan, "error": math.nan, "accuracy": math.nan}
    report = linearity_report([implicit[p][rows[p]] for p in keep], [world.true_reward[p][rows[p]] for p in keep])
    return {"pearson": report.mean_pearson, "slope": report.mean_slope, "error": report.mean_regression_error,
            "accuracy": report.pairwise_accuracy}


def implicit_spread(implicits: list[np.ndarray], mask: np.ndarray | None = None) -> float:
    """Mean over prompts and responses (those in mask [X, Y]) of the std over runs of the per-prompt-centred implicit
    reward: 0 when every run ends at the same implicit reward up to per-prompt constants."""
    mask = np.ones(implicits[0].shape, dtype=bool) if mask is None else mask
    if not mask.any():
        return math.nan
    count = np.maximum(mask.sum(1, keepdims=True), 1)
    # centred over the responses measured, so responses outside the mask cannot move the centre
    stack = np.stack([implicit - np.where(mask, implicit, 0).sum(1, keepdims=True) / count
                      for implicit in implicits])  # [R, X, Y]
    return float(stack.std(0)[mask].mean())
