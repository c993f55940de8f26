"""ALPS (Yuan et al. 2020, "Cold-start active learning through self-supervised language modeling"): k-means on
surprisal embeddings from a masked language model. It needs no classifier, so it can choose the first labels.

    alps = ALPS(mlm=AutoModelForMaskedLM.from_pretrained(path), tokenizer=tokenizer)
    first = alps.select(None, pool, k=30, seed=0)            # a cold start: no model yet

Surprisal embedding of an example x of length L (reference: `surprisal_embeddings`):

    s_t = −log p_mlm(x_t | x̃)   at a seeded ~`fraction` of x's non-special positions t,   s_t = 0 elsewhere

x̃ = x by default (ALPS's own code scores the unmasked input); `mask=True` replaces the scored tokens by the mask
token first. The embeddings are L2-normalised, clustered by k-means (k = query size) and the example nearest
each centre is chosen. Which positions are scored depends only on (`embedding_seed`, pool row), not on the
batch, so an example's embedding is the same in every round; `ALPS` computes the pool's once and reuses them.
"""
from __future__ import annotations

import hashlib
from collections.abc import Collection

import numpy as np
import torch
from torch import nn

from epa_kernels._validation import check_finite, check_positive_int
from epa_kernels.active.model import _accepted_keys, autocast_off, eval_mode, model_device
from epa_kernels.active.pool import pool_batches, pool_size, progress_bar
from epa_kernels.active.strategies import Strategy, kmeans_nearest_select

# Token-id fields of a transformers config that name special tokens (used when no tokenizer is given).
_CONFIG_SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "cls_token_id", "sep_token_id",
                       "mask_token_id", "unk_token_id")


def surprisal_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor, rows, *,
                        special_token_ids: Collection[int], fraction: float = 0.15, seed: int = 0) -> torch.Tensor:
    """Bool [b, T]: the positions scored for each pool row in `rows` [b].

    Each real (attention_mask = 1), non-special position is drawn with probability `fraction`; the uniform
    numbers come from a generator seeded by (seed, row), in position order over the row's real tokens, so the
    draw does not depend on the batch or on its padding.
    """
    if special_token_ids is None:
        raise ValueError("special_token_ids must be a collection of token ids (e.g. tokenizer.all_special_ids)")
    _check_fraction(fraction)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} must "
                         "be the same [b, T]")
    if len(rows) != input_ids.shape[0]:
        raise ValueError(f"rows has {len(rows)} entries for a batch of {input_ids.shape[0]} rows")
    special = torch.as_tensor(sorted(int(i) for i in special_token_ids), dtype=input_ids.dtype,
                              device=input_ids.device)
    real = attention_mask.bool() & ~torch.isin(input_ids, special)
    chosen = torch.zeros_like(real)
    for i, row in enumerate(rows.tolist()):
        state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, row]).generate_state(2)
        gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        tokens = attention_mask[i].bool().nonzero().flatten()
        draws = torch.rand(len(tokens), generator=gen) < fraction
        chosen[i, tokens[draws.to(tokens.device)]] = True
    return chosen & real


def _check_fraction(fraction) -> None:
    check_finite("fraction", fraction, low=0.0, high=1.0)
    if fraction == 0.0:
        raise ValueError("fraction must be > 0: no position would be scored")


def _split_mlm(mlm: nn.Module):
    """(encoder, position-wise head) of BERT-style (`cls`) and RoBERTa-style (`lm_head`) MLMs, so the vocabulary
    projection runs only at the scored positions; None for other architectures (their full logits are used)."""
    base = getattr(mlm, "base_model", None)
    for name in ("cls", "lm_head"):
        head = getattr(mlm, name, None)
        if isinstance(head, nn.Module) and isinstance(base, nn.Module) and base is not mlm:
            return base, head
    return None


def _logits_at(mlm: nn.Module, batch: dict, chosen: torch.Tensor) -> torch.Tensor:
    """MLM logits [n_chosen, V] at the chosen positions of the batch, fp32. A caller's autocast speeds up the
    encoder; the vocabulary projection runs in fp32 (bf16 logits near 16 are 0.125 apart: coarse surprisals)."""
    split = _split_mlm(mlm)
    if split is None:
        keys = _accepted_keys(mlm)
        return _full_logits(mlm, {k: v for k, v in batch.items() if k in keys}, chosen)
    base, head = split
    keys = _accepted_keys(base)
    hidden = base(**{k: v for k, v in batch.items() if k in keys})[0][chosen]
    return _head_logits(head, hidden)


@autocast_off
def _head_logits(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return head(hidden.float()).float()


@autocast_off
def _full_logits(mlm: nn.Module, inputs: dict, chosen: torch.Tensor) -> torch.Tensor:
    return mlm(**inputs).logits[chosen].float()


def _token_surprisal(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """−log softmax(logits)[target] per row (logits fp32)."""
    return torch.nn.functional.cross_entropy(logits, targets, reduction="none")


def _pool_width(pool) -> int:
    ids = pool["input_ids"]
    if isinstance(ids, torch.Tensor):
        return int(ids.shape[1])
    return max((len(row) for row in ids), default=0)


def surprisal_embeddings(mlm: nn.Module, pool, indices=None, *, special_token_ids: Collection[int],
                         fraction: float = 0.15, mask_token_id: int | None = None, seed: int = 0,
                         batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """Surprisal embeddings [m, W] fp32 (CPU) of the pool rows `indices` (default: all), W the pool's width.

    mlm: any transformers AutoModelForMaskedLM (or a module returning `.logits` [b, T, V]) whose tokenizer made
    the pool. Entry t of row i is the MLM cross-entropy of token t at the positions `surprisal_positions` draws,
    0 elsewhere. mask_token_id: replace the scored tokens by it before the forward (default: unmasked input).
    """
    if not isinstance(mlm, nn.Module):
        raise TypeError(f"mlm must be a torch.nn.Module (a masked language model), got {type(mlm).__name__}")
    _check_fraction(fraction)
    check_positive_int("batch_size", batch_size)
    if mask_token_id is not None and (isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int)
                                      or mask_token_id < 0):
        raise ValueError(f"mask_token_id must be a token id (an int >= 0) or None, got {mask_token_id!r}")
    n = pool_size(pool)
    indices = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    if indices.size and (indices.min() < 0 or indices.max() >= n):
        raise ValueError(f"indices must be pool rows in [0, {n}); got {indices.min()} to {indices.max()}")
    width = _pool_width(pool)
    out = torch.zeros(len(indices), width, dtype=torch.float32)
    device = model_device(mlm)
    written = 0
    with eval_mode(mlm), torch.no_grad(), progress_bar(len(indices), "ALPS", progress) as bar:
        for batch in pool_batches(pool, indices, batch_size, device):
            rows = indices[written : written + len(batch["input_ids"])]
            chosen = surprisal_positions(batch["input_ids"].cpu(), batch["attention_mask"].cpu(), rows,
                                         special_token_ids=special_token_ids, fraction=fraction,
                                         seed=seed).to(device)
            targets = batch["input_ids"][chosen]
            if mask_token_id is not None:
                batch = {**batch, "input_ids": batch["input_ids"].masked_fill(chosen, int(mask_token_id))}
            piece = torch.zeros(chosen.shape, dtype=torch.float32)
            piece[chosen.cpu()] = _token_surprisal(_logits_at(mlm, batch, chosen), targets).cpu()
            out[written : written + len(rows), : piece.shape[1]] = piece
            written += len(rows)
            bar.update(len(rows))
    return out


def special_ids_of(mlm: nn.Module, tokenizer=None) -> list[int]:
    """The special token ids: the tokenizer's `all_special_ids`, else the ids its config names."""
    if tokenizer is not None:
        return sorted({int(i) for i in tokenizer.all_special_ids})
    config = getattr(mlm, "config", None)
    ids = {getattr(config, key, None) for key in _CONFIG_SPECIAL_IDS}
    return sorted(int(i) for i in ids if isinstance(i, int) and i >= 0)


class ALPS(Strategy):
    """ALPS: k-means (k = query size) on L2-normalised surprisal embeddings, the example nearest each centre.

    mlm: a masked language model (transformers AutoModelForMaskedLM) whose tokenizer made the pool; the `model`
    passed to `select` is not used (None is fine). tokenizer: names the special tokens (never scored) and the
    mask token; without it they come from `special_token_ids` or, failing that, the mlm's config.
    mask: score masked inputs instead of the unmasked ones (ALPS's code uses unmasked input).
    The pool's embeddings are cached (keyed by its tokens): after changing the mlm's weights, make a new ALPS.
    """

    name = "alps"

    def __init__(self, mlm: nn.Module | None = None, *, tokenizer=None, special_token_ids=None,
                 fraction: float = 0.15, mask: bool = False, embedding_seed: int = 0, progress: bool = True):
        super().__init__(progress=progress)
        if mlm is None:
            raise ValueError("ALPS needs mlm=: a masked language model (e.g. transformers AutoModelForMaskedLM) "
                             "whose tokenizer made the pool")
        if not isinstance(mlm, nn.Module):
            raise TypeError(f"mlm must be a torch.nn.Module (a masked language model), got {type(mlm).__name__}")
        _check_fraction(fraction)
        self.mlm, self.fraction, self.mask, self.embedding_seed = mlm, float(fraction), bool(mask), int(embedding_seed)
        self.special_token_ids = (sorted(int(i) for i in special_token_ids) if special_token_ids is not None
                                  else special_ids_of(mlm, tokenizer))
        if not self.special_token_ids:
            raise ValueError("ALPS cannot tell the special tokens: pass tokenizer= or special_token_ids=")
        self.mask_token_id = None
        if self.mask:
            source = tokenizer if tokenizer is not None else getattr(mlm, "config", None)
            self.mask_token_id = getattr(source, "mask_token_id", None)
            if not isinstance(self.mask_token_id, int):
                raise ValueError("mask=True needs the mask token: pass tokenizer= (with a mask token)")
        self._cache: tuple[str, torch.Tensor] | None = None  # (pool key, embeddings of every pool row)

    def embeddings(self, pool, *, batch_size: int = 64) -> torch.Tensor:
        """Surprisal embeddings [n, W] of every pool row, computed once per pool (same tokens, same result)."""
        key = _pool_key(pool)
        if key is None or self._cache is None or self._cache[0] != key:
            vectors = surprisal_embeddings(
                self.mlm, pool, special_token_ids=self.special_token_ids, fraction=self.fraction,
                mask_token_id=self.mask_token_id, seed=self.embedding_seed, batch_size=batch_size,
                progress=self.progress)
            if key is None:
                return vectors
            self._cache = (key, vectors)
        return self._cache[1]

    def _select(self, model, pool, unlabeled, k, *, batch_size, seed):
        vectors = self.embeddings(pool, batch_size=batch_size)[torch.as_tensor(unlabeled)]
        return kmeans_nearest_select(torch.nn.functional.normalize(vectors, dim=1), k, seed)

    def __repr__(self):
        return (f"ALPS(mlm={type(self.mlm).__name__}, fraction={self.fraction}, mask={self.mask}, "
                f"embedding_seed={self.embedding_seed})")


def _pool_key(pool) -> str | None:
    """A digest of a tensor pool's tokens (None for other pools, which are not cached)."""
    if not isinstance(pool, dict) or not all(isinstance(pool.get(k), torch.Tensor)
                                             for k in ("input_ids", "attention_mask")):
        return None
    digest = hashlib.sha256()
    for key in ("input_ids", "attention_mask"):
        tensor = pool[key].detach().cpu().contiguous()
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()
