"""Active-learning query strategies behind one interface (DESIGN §7): VAPAL and the baselines.

    strategy = make_strategy("vapal")                      # or VAPAL(point="pooled", ...); see registry.py
    picked = strategy.select(model, pool, k, labeled=already_labeled, seed=round_number)

`select` returns k distinct pool indices, none of them in `labeled`; features are computed only for the unlabeled
rows. Every strategy is deterministic for a given seed (and batch_size, which fixes the random draws of VAPAL).
"""
from __future__ import annotations

from collections.abc import Collection

import numpy as np
import torch

from epa_kernels._validation import check_choice, check_positive_int
from epa_kernels.active.model import autocast_off, classifier_parts, eval_mode, model_device
from epa_kernels.active.pool import pool_batches, pool_size, progress_bar
from epa_kernels.active.vap import check_vap_options, vap_embeddings

CLUSTERINGS = ("kmeans++", "kmeans")


# ---------------------------------------------------------------------------------------------------- clustering
def _as_numpy(vectors) -> np.ndarray:
    if isinstance(vectors, torch.Tensor):
        vectors = vectors.detach().float().cpu().numpy()
    return np.ascontiguousarray(vectors, dtype=np.float32)


def _fill_distinct(picked, k: int, n: int, seed: int) -> np.ndarray:
    """`picked` without repeats, topped up to k with seeded random rows not yet picked.

    k-means++ repeats a row once every remaining row sits on a centre (duplicates, or all-zero vectors of
    examples with no uncertainty): those picks carry no information, so random ones replace them.
    """
    unique = list(dict.fromkeys(int(i) for i in picked))[:k]
    if len(unique) < k:
        rest = np.setdiff1d(np.arange(n), np.asarray(unique, dtype=np.int64))
        unique += [int(i) for i in np.random.default_rng(seed).choice(rest, k - len(unique), replace=False)]
    return np.asarray(unique, dtype=np.int64)


def kmeans_pp_select(vectors, k: int, seed: int = 0) -> np.ndarray:
    """k distinct row positions chosen by k-means++ seeding (sklearn.cluster.kmeans_plusplus, seeded): BADGE style.

    Rows far from the centres chosen so far are likely picks, so large vectors (uncertain examples) and
    unlike vectors (diverse examples) are preferred.
    """
    from sklearn.cluster import kmeans_plusplus

    points = _as_numpy(vectors)
    _, picked = kmeans_plusplus(points, n_clusters=k, random_state=seed)
    return _fill_distinct(picked, k, len(points), seed)


def kmeans_nearest_select(vectors, k: int, seed: int = 0) -> np.ndarray:
    """k distinct row positions: k-means (k clusters, seeded), then for each centroid the nearest row not yet
    taken (ALPS / BERT-KM style)."""
    from sklearn.cluster import KMeans

    points = _as_numpy(vectors)
    kmeans = KMeans(n_clusters=k, n_init=1, max_iter=100, random_state=seed).fit(points)
    centres = kmeans.cluster_centers_.astype(np.float32)
    sq_norms = (points * points).sum(1)
    taken = np.zeros(len(points), dtype=bool)
    picked = []
    for start in range(0, k, 256):  # distances to 256 centres at a time: O(n · 256) memory
        block = centres[start : start + 256]
        distances = sq_norms[:, None] - 2.0 * points @ block.T + (block * block).sum(1)[None, :]
        for column in range(block.shape[0]):
            order = np.argsort(distances[:, column], kind="stable")
            position = next(int(i) for i in order if not taken[i])
            taken[position] = True
            picked.append(position)
    return np.asarray(picked, dtype=np.int64)


def cluster_select(vectors, k: int, clustering: str, seed: int) -> np.ndarray:
    if clustering == "kmeans++":
        return kmeans_pp_select(vectors, k, seed)
    return kmeans_nearest_select(vectors, k, seed)


# ---------------------------------------------------------------------------------------------------- base
def unlabeled_indices(n: int, labeled: Collection[int] | None) -> np.ndarray:
    """Sorted pool indices not in `labeled` (validated: integers in [0, n))."""
    if labeled is None:
        return np.arange(n, dtype=np.int64)
    labeled = np.asarray(list(labeled), dtype=np.int64).reshape(-1) if len(labeled) else np.empty(0, np.int64)
    if labeled.size and (labeled.min() < 0 or labeled.max() >= n):
        raise ValueError(
            f"labeled must hold pool indices in [0, {n}); got values from {labeled.min()} to {labeled.max()}"
        )
    keep = np.ones(n, dtype=bool)
    keep[labeled] = False
    return np.flatnonzero(keep)


def check_k(k, available: int):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an integer, got {type(k).__name__}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if k > available:
        raise ValueError(f"k={k} exceeds the number of unlabeled pool examples ({available})")


def pooled_features(model, pool, indices: np.ndarray, *, batch_size: int, device=None, progress=True, desc="encode"):
    """(pooled representations [m, H], logits [m, C]) of the pool rows `indices`, fp32 on CPU."""
    parts = classifier_parts(model)
    device = model_device(model) if device is None else torch.device(device)
    pooled_rows, logit_rows = [], []
    with eval_mode(model), torch.no_grad(), progress_bar(len(indices), desc, progress) as bar:
        for batch in pool_batches(pool, indices, batch_size, device):
            pooled = parts.encode(batch)
            logit_rows.append(parts.logits(pooled).cpu())
            pooled_rows.append(pooled.float().cpu())
            bar.update(len(pooled))
    return torch.cat(pooled_rows), torch.cat(logit_rows)


class Strategy:
    """Chooses which unlabeled pool examples to label next. Subclasses implement `_select`."""

    name = "strategy"

    def __init__(self, *, progress: bool = True):
        self.progress = bool(progress)  # tqdm bars over the pool

    def select(self, model, pool, k: int, *, labeled: Collection[int] | None = None, batch_size: int = 64,
               seed: int = 0) -> list[int]:
        """k distinct pool indices, none in `labeled` (a collection of already-labeled pool indices).

        model: a classifier `classifier_parts` understands; pool: dict of tensors or tokenized datasets.Dataset.
        Raises ValueError for an empty pool, k ≤ 0 or k > the number of unlabeled examples, a model with no
        reachable head; TypeError for a non-integer k.
        """
        n = pool_size(pool)
        if n == 0:
            raise ValueError("pool is empty: nothing to select from")
        check_positive_int("batch_size", batch_size)
        unlabeled = unlabeled_indices(n, labeled)
        check_k(k, len(unlabeled))
        positions = np.asarray(self._select(model, pool, unlabeled, int(k), batch_size=batch_size, seed=seed))
        picked = [int(i) for i in unlabeled[positions]]
        assert len(set(picked)) == k, f"{self.name} returned repeated picks"
        return picked

    def _select(self, model, pool, unlabeled: np.ndarray, k: int, *, batch_size: int, seed: int) -> np.ndarray:
        """Positions (into `unlabeled`) of the k picks."""
        raise NotImplementedError

    def __repr__(self):
        options = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({options})"


# ---------------------------------------------------------------------------------------------------- strategies
class Random(Strategy):
    """k unlabeled examples uniformly at random (seeded). Needs no model forward."""

    name = "random"

    def _select(self, model, pool, unlabeled, k, *, batch_size, seed):
        return np.random.default_rng(seed).choice(len(unlabeled), size=k, replace=False)


class Entropy(Strategy):
    """The k unlabeled examples with the highest predictive entropy (ties: lower pool index first)."""

    name = "entropy"

    def _select(self, model, pool, unlabeled, k, *, batch_size, seed):
        classifier_parts(model)  # a clear error before any forward
        _, logits = pooled_features(model, pool, unlabeled, batch_size=batch_size, progress=self.progress,
                                    desc="entropy")
        log_p = torch.log_softmax(logits.double(), dim=-1)
        entropy = -(log_p.exp() * log_p).sum(-1).numpy()
        return np.argsort(-entropy, kind="stable")[:k]


@autocast_off
def badge_embeddings(pooled: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """BADGE gradient embeddings g = (p − onehot(argmax p)) ⊗ h, [b, C·H] (the last-layer gradient of the
    cross-entropy at the predicted label, up to sign)."""
    p = torch.softmax(logits.float(), dim=-1)
    residual = p - torch.nn.functional.one_hot(p.argmax(-1), p.shape[-1]).float()
    return (residual[:, :, None] * pooled.float()[:, None, :]).flatten(1)


class BADGE(Strategy):
    """BADGE (Ash et al. 2020): k-means++ seeding on gradient embeddings (p − onehot(argmax p)) ⊗ h.

    Memory: the embeddings are built in batch-sized pieces, but k-means++ needs all of them at once, so it holds
    an [n, C·H] fp32 array: O(n·C·H), C times VAPAL's O(n·H). Seeding uses sklearn's kmeans_plusplus (first
    centre uniformly at random, greedy local trials), not the original code's max-norm first centre.
    """

    name = "badge"

    def _select(self, model, pool, unlabeled, k, *, batch_size, seed):
        parts = classifier_parts(model)
        num_classes, hidden = parts.head_weight.shape
        vectors = np.empty((len(unlabeled), num_classes * hidden), dtype=np.float32)
        device = model_device(model)
        written = 0
        with eval_mode(model), torch.no_grad(), progress_bar(len(unlabeled), "BADGE", self.progress) as bar:
            for batch in pool_batches(pool, unlabeled, batch_size, device):
                pooled = parts.encode(batch)
                piece = badge_embeddings(pooled, parts.logits(pooled)).cpu().numpy()
                vectors[written : written + len(piece)] = piece
                written += len(piece)
                bar.update(len(piece))
        return kmeans_pp_select(vectors, k, seed)


class BertKM(Strategy):
    """BERT-KM (as in ALPS, Yuan et al. 2020): k-means on the L2-normalised pooled embeddings, then the example
    nearest each centroid. Uncertainty-free: diversity only."""

    name = "bertkm"

    def _select(self, model, pool, unlabeled, k, *, batch_size, seed):
        pooled, _ = pooled_features(model, pool, unlabeled, batch_size=batch_size, progress=self.progress,
                                    desc="BERT-KM")
        return kmeans_nearest_select(torch.nn.functional.normalize(pooled, dim=1), k, seed)


class VAPAL(Strategy):
    """VAPAL: cluster the virtual adversarial perturbations of the unlabeled examples (DESIGN §7).

    Each example's VAP ε·d̂ (see `vap_embeddings`) is the direction at `point` in which its prediction changes
    fastest. representation="outer" (default) clusters vec(δ ⊗ h): the logit shift δ [C] that perturbation
    causes times the example's pooled representation h [H], so examples differ even with two classes, where
    every d̂ is ±(w₁ − w₀); "direction" clusters ε·d̂ itself (the earlier default). Memory O(n·C·H) / O(n·H).
    `clustering="kmeans++"` (default) picks by k-means++ seeding (BADGE style), `"kmeans"` by k-means with
    nearest-to-centroid picks (ALPS style).

    scale_by_kl (default True): multiply each direction by the KL its perturbation causes. A unit direction
    alone says where the prediction is least smooth but not how unsmooth: every example would have norm ε and
    k-means++'s D² sampling would ignore uncertainty. Scaled by the KL (≈ ½ε²·λ_max of the head's Fisher matrix,
    which shrinks like 1 − p_max for a confident prediction), the squared norms behave like BADGE's
    ‖p − onehot‖²·‖h‖² — confident examples sit near the origin and are rarely drawn, uncertain ones far out —
    while the direction supplies the diversity.
    """

    name = "vapal"

    def __init__(self, point: str = "pooled", representation: str = "outer", xi: float = 1e-6, eps: float = 1.0,
                 power_iters: int = 1, scale_by_kl: bool = True, clustering: str = "kmeans++", progress: bool = True):
        super().__init__(progress=progress)
        check_vap_options(point, xi, eps, power_iters, representation)
        check_choice("clustering", clustering, CLUSTERINGS)
        self.point, self.representation = point, representation
        self.xi, self.eps, self.power_iters = xi, eps, power_iters
        self.scale_by_kl, self.clustering = bool(scale_by_kl), clustering

    def _select(self, model, pool, unlabeled, k, *, batch_size, seed):
        vectors = vap_embeddings(
            model, pool, point=self.point, representation=self.representation, xi=self.xi, eps=self.eps,
            power_iters=self.power_iters, scale_by_kl=self.scale_by_kl, batch_size=batch_size, seed=seed,
            progress=self.progress, indices=unlabeled,
        )
        return cluster_select(vectors, k, self.clustering, seed)


class VAPALDirection(VAPAL):
    """VAPAL clustering the perturbations themselves (`representation="direction"`, the default before "outer"),
    by its own name so that one run can compare the two."""

    name = "vapal-direction"

    def __init__(self, **options):
        super().__init__(**{"representation": "direction", **options})


__all__ = [
    "BADGE", "CLUSTERINGS", "VAPAL", "BertKM", "Entropy", "Random", "Strategy", "VAPALDirection",
    "badge_embeddings", "cluster_select", "kmeans_nearest_select", "kmeans_pp_select", "pooled_features",
]
