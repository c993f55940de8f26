"""Reference log-probs computed once, cached on disk, so training holds one model (DESIGN §9, `ref="precompute"`).

The cache file is named by a fingerprint of everything that decides a value: the reference model's weights and
config, the tokenized data, `max_length`, the per-sequence reduction and the compute dtype. Inside, values are
keyed by the sequence key `(source prompt, response, scored-under prompt)`, so a run that needs more sequences
(another seed pairs other weak negatives) computes only the missing ones and extends the file. A changed model,
data set or option gives another file name: a stale value can never be read.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist


def model_fingerprint(model) -> str:
    """blake2b of the config and every parameter and buffer (name, shape, dtype, bytes)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def data_fingerprint(examples) -> str:
    """blake2b of the tokenized examples in order (rows, prompt and response ids, scores)."""
    digest = hashlib.blake2b(digest_size=16)
    for example in examples:
        digest.update(repr((example.row, example.prompt, example.responses, example.scores)).encode())
    return digest.hexdigest()


class ReferenceCache:
    """Per-sequence reference log-probs on disk: `lookup(keys)` for batches, `missing(keys)` to fill it."""

    def __init__(self, directory, fingerprint: dict):
        self.fingerprint = dict(sorted(fingerprint.items()))
        name = hashlib.blake2b(json.dumps(self.fingerprint).encode(), digest_size=8).hexdigest()
        self.path = Path(directory) / f"ref-logps-{name}.pt"
        self.values: dict[tuple[int, int, int], float] = {}
        if self.path.is_file():
            stored = torch.load(self.path, map_location="cpu", weights_only=True)
            if stored["fingerprint"] != json.dumps(self.fingerprint):
                raise ValueError(f"{self.path}: fingerprint mismatch (a hash collision or a hand-edited file); "
                                 "delete it")
            self.values = dict(zip(map(tuple, stored["keys"].tolist()), stored["logps"].tolist(), strict=True))

    def __len__(self) -> int:
        return len(self.values)

    def missing(self, keys: Iterable) -> list[tuple[int, int, int]]:
        """The distinct keys with no cached value, sorted."""
        return sorted({tuple(k) for k in keys} - self.values.keys())

    def update(self, keys: Sequence, logps: Sequence[float]) -> None:
        for key, value in zip(keys, logps, strict=True):
            self.values[tuple(key)] = float(value)

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """ref_logps [S] (float64, on keys' device) for keys [S, 3]; a missing key is a KeyError naming it."""
        try:
            values = [self.values[k] for k in map(tuple, keys.tolist())]
        except KeyError as error:
            raise KeyError(f"no cached reference log-prob for sequence key {error.args[0]} in {self.path}") from None
        return torch.tensor(values, dtype=torch.float64, device=keys.device)

    def save(self) -> None:
        """Write atomically (temporary file, then rename), so an interrupted run never leaves a torn cache."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted(self.values)
        payload = {"fingerprint": json.dumps(self.fingerprint),
                   "keys": torch.tensor(keys, dtype=torch.int64).view(-1, 3),
                   "logps": torch.tensor([self.values[k] for k in keys], dtype=torch.float64)}
        temporary = self.path.with_suffix(f".tmp{os.getpid()}")
        torch.save(payload, temporary)
        os.replace(temporary, self.path)


def token_budget_chunks(items, lengths, max_tokens: int):
    """Split items (sorted by length, longest first) into chunks of at most max_tokens tokens (≥ 1 item each)."""
    order = sorted(range(len(items)), key=lambda i: -lengths[i])
    chunk, used = [], 0
    for i in order:
        if chunk and used + lengths[i] > max_tokens:
            yield chunk
            chunk, used = [], 0
        chunk.append(items[i])
        used += lengths[i]
    if chunk:
        yield chunk


def prompt_segments(keys, planner, max_tokens: int):
    """Keys grouped by the prompt they are scored under — its token ids, so rows repeating a prompt share one
    encoding as in training — each group cut into runs whose packed length fits max_tokens (a run holds ≥ 1 key):
    over several epochs one prompt gathers many weak negatives."""
    by_prompt = {}
    for key in keys:
        by_prompt.setdefault(planner.examples[key[2]].prompt, []).append(key)
    for prompt_keys in by_prompt.values():
        run = []
        for key in prompt_keys:
            if run and planner.packed_length([*run, key]) > max_tokens:
                yield run
                run = []
            run.append(key)
        if run:
            yield run


@torch.no_grad()
def fill_reference_cache(cache: ReferenceCache, reference, planner, keys, *, max_tokens: int, device=None,
                         autocast=None, progress=None) -> int:
    """Compute the reference log-probs of the keys the cache lacks, save it, and return how many were computed.

    reference: a `PreferenceModel` (its `sequence_logps`); planner: the `BatchPlanner` that packs keys. With
    torch.distributed initialised, each rank computes a share and rank 0 writes the merged file; every rank
    then holds every value. autocast: a context-manager factory for the forward (e.g. accelerator.autocast).
    progress: a callable(total) → object with update(n) and close(), e.g. tqdm.
    """
    missing = cache.missing(keys)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    # Keys scored under one prompt stay together (one segment when the planner shares prefixes) as far as the token
    # budget allows; ranks split the segments, and chunks of whole segments fill the budget.
    mine = list(prompt_segments(missing, planner, max_tokens))[rank::world]
    lengths = [planner.packed_length(segment) for segment in mine]
    bar = progress(len(missing)) if progress is not None and rank == 0 else None
    was_training = reference.training
    reference.eval()
    computed_keys, computed = [], []
    try:
        for chunk in token_budget_chunks(mine, lengths, max_tokens):
            chunk = [key for segment in chunk for key in segment]
            batch = planner.pack(chunk, device)
            with autocast() if autocast is not None else contextlib.nullcontext():
                logps = reference.sequence_logps(batch)
            computed_keys += chunk
            computed += logps.double().cpu().tolist()
            if bar is not None:
                bar.update(len(chunk) * world)
    finally:
        reference.train(was_training)
        if bar is not None:
            bar.close()
    if distributed:
        gathered = [None] * world
        dist.all_gather_object(gathered, (computed_keys, computed))
        for part_keys, part_values in gathered:
            cache.update(part_keys, part_values)
    else:
        cache.update(computed_keys, computed)
    if missing and rank == 0:
        cache.save()
    if distributed:
        dist.barrier()
    return len(missing)

