"""Pools of unlabeled examples, read in batches: what every strategy iterates over.

A pool is a dict of tensors or (possibly ragged) token lists with `input_ids` (optionally `attention_mask`,
`token_type_ids`), or a tokenized datasets.Dataset with those columns. Each batch is padded to its own longest
example: ragged rows are padded here, and padded tensors lose the trailing columns that are padding in every
row, so a caller hands over its padded tensors once and a length-sorted pool costs no more than its batches need.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from epa_kernels.active.model import MODEL_INPUT_KEYS


def pool_size(pool) -> int:
    """Number of examples in a pool: a dict of tensors/lists with `input_ids`, or a tokenized datasets.Dataset."""
    if isinstance(pool, dict):
        if "input_ids" not in pool:
            raise ValueError(f"pool must have an 'input_ids' entry; it has {sorted(pool)}")
        sizes = {key: len(pool[key]) for key in MODEL_INPUT_KEYS if key in pool}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"pool entries differ in length: {sizes}")
        return sizes["input_ids"]
    column_names = getattr(pool, "column_names", None)
    if column_names is None:
        raise TypeError(
            f"pool must be a dict of tensors or a tokenized datasets.Dataset, got {type(pool).__name__}"
        )
    if "input_ids" not in column_names:
        raise ValueError(f"pool dataset must have an 'input_ids' column; it has {column_names}")
    return len(pool)


def _as_padded(values) -> torch.Tensor:
    """A [b, T] int64 tensor from a tensor or a list of (possibly ragged) token lists, padded with 0."""
    if isinstance(values, torch.Tensor):
        return values.long()
    rows = [torch.as_tensor(row, dtype=torch.long) for row in values]
    length = max((row.numel() for row in rows), default=0)
    out = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : row.numel()] = row
    return out


def pool_rows(pool, rows) -> dict:
    """The pool rows `rows` (in order) as one batch: [b, T] int64 CPU tensors with an `attention_mask`, T the
    last column holding a real token of any row (so right padding is trimmed to the longest example)."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if isinstance(pool, dict):
        index = torch.as_tensor(rows, dtype=torch.long)
        batch = {}
        for key in MODEL_INPUT_KEYS:
            if key in pool:
                column = pool[key]
                batch[key] = column[index] if isinstance(column, torch.Tensor) else [column[i] for i in rows]
    else:
        selected = pool[[int(i) for i in rows]]
        batch = {key: selected[key] for key in MODEL_INPUT_KEYS if key in selected}
    lengths = None if isinstance(batch["input_ids"], torch.Tensor) else [len(row) for row in batch["input_ids"]]
    out = {key: _as_padded(value) for key, value in batch.items()}
    if "attention_mask" not in out:
        mask = torch.ones_like(out["input_ids"])
        if lengths is not None:  # ragged rows were padded here: mask the padding
            mask = (torch.arange(mask.shape[1]) < torch.tensor(lengths)[:, None]).long()
        out["attention_mask"] = mask
    # only trailing all-padding columns go: leading ones (left padding) would shift the tokens' positions
    real = out["attention_mask"].any(0).nonzero()
    width = int(real[-1]) + 1 if len(real) else out["attention_mask"].shape[1]
    return {key: value[:, :width] for key, value in out.items()}


def pool_batches(pool, indices: np.ndarray, batch_size: int, device) -> Iterator[dict]:
    """Batches (dicts of [b, T] tensors on `device`, see `pool_rows`) of the pool rows `indices`, in order."""
    for start in range(0, len(indices), batch_size):
        batch = pool_rows(pool, indices[start : start + batch_size])
        yield {key: value.to(device) for key, value in batch.items()}


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar over `total` examples (a no-op one when not `enabled`)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ex", disable=not enabled, leave=False)
