"""Token-budget batches, weak negatives and the packed layout (DESIGN §9).

A *plan* fixes, from the seed alone, which prompts each rank trains on at each step and which responses of
other prompts each prompt scores as weak negatives: the reference pass and the training loop walk the same
plan, and a resumed run continues it at its step (`plan_digest` checks that it is the same plan). Every sequence
has a stable key `(source row, response index, row it is scored under)` — `(p, j, p)` for a row's own responses,
`(q, j, p)` for the weak negative prompt_p ⊕ response_j of row q — which the reference cache is keyed by.

Rows that repeat a prompt (identical token ids: SHP, pairwise expansions of ranked sets) stay adjacent in every
epoch's order — the seeded shuffle moves *units* of same-prompt rows — and a unit that fits a batch is not split
(unless a short last step must give every rank a row), so with prefix sharing its prompt is encoded once for all its
rows' responses. Batches hold as many rows as fit `max_tokens_per_batch` tokens (prompt + responses, weak negatives
counted at their longest), so long and short examples mix without padding. Weak negatives are drawn without
replacement from the responses of the step's rows with *other* prompts, on every rank (the plan is global), seeded
by (seed, epoch, step, row); a response that any row gives this prompt is never one. `collate` packs a batch into
one row: input_ids [1, N], position_ids restarting at 0 per sequence, cu_seqlens [S+1], targets [N] (the next token
at response positions only), groups [P, G].
"""
from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from epa_kernels.transformers.data import PreferenceDataError, PreferenceExample
from epa_kernels.transformers.prefix_sharing import IGNORE_INDEX, pack_prefix_shared


@dataclass(frozen=True)
class PlannedPrompt:
    """One prompt of a batch: its example index and its weak negatives as (example q, response j) pairs."""

    example: int
    weak: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class PlannedStep:
    """One forward/backward on every rank: shards[r] are rank r's prompts."""

    epoch: int
    index: int  # position in the epoch
    shards: tuple[tuple[PlannedPrompt, ...], ...]

    @property
    def num_prompts(self) -> int:
        return sum(len(shard) for shard in self.shards)


def _rng(*parts) -> random.Random:
    """A generator seeded from the parts, stable across processes and Python versions."""
    return random.Random(repr(parts))


class BatchPlanner:
    """Plans epochs of token-budget steps over tokenized examples and packs them.

    max_tokens_per_batch: tokens per rank per step (an upper bound, checked before training); num_weak: W weak
    negatives per prompt; max_length: cap on each prompt ⊕ response (weak ones included; keeps the response's
    start); world_size: ranks sharing each step (a final step with fewer prompts than ranks is dropped: ranks
    must stay in step); shuffle: a seeded new order each epoch (else the data's order), rows repeating a prompt
    kept next to its first row either way; max_prompts_per_batch:
    an optional cap on prompts per rank per step on top of the token budget (e.g. to give runs with different
    numbers of responses per prompt the same number of updates); prefix_sharing: pack each prompt once for all
    the responses scored under it (`prefix_sharing.py`), and count the budget that way.
    """

    def __init__(self, examples: Sequence[PreferenceExample], *, max_tokens_per_batch: int, num_weak: int = 0,
                 max_length: int | None = None, seed: int = 0, world_size: int = 1, shuffle: bool = True,
                 max_prompts_per_batch: int | None = None, prefix_sharing: bool = False):
        for name, value, low in (("max_tokens_per_batch", max_tokens_per_batch, 1), ("num_weak", num_weak, 0),
                                 ("world_size", world_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int ≥ {low}, got {value!r}")
        if max_prompts_per_batch is not None and (isinstance(max_prompts_per_batch, bool) or not isinstance(
                max_prompts_per_batch, int) or max_prompts_per_batch < 1):
            raise ValueError(f"max_prompts_per_batch must be None or an int ≥ 1, got {max_prompts_per_batch!r}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 2):
            raise ValueError(f"max_length must be None or an int ≥ 2 (a prompt and a response token), "
                             f"got {max_length!r}")
        if not examples:
            raise ValueError("no examples to plan")
        if len(examples) < world_size:
            raise ValueError(f"{len(examples)} examples cannot give each of {world_size} ranks a prompt")
        self.examples = list(examples)
        self.max_tokens, self.num_weak, self.max_length = max_tokens_per_batch, num_weak, max_length
        self.seed, self.world_size, self.shuffle = seed, world_size, shuffle
        self.max_prompts = max_prompts_per_batch
        self.prefix_sharing = bool(prefix_sharing)
        if max_length is not None:
            for e in self.examples:
                if len(e.prompt) >= max_length:
                    raise PreferenceDataError(f"row {e.row}: its prompt ({len(e.prompt)} tokens) leaves no room for a "
                                              f"response within max_length={max_length}")
        # Units of rows with identical prompt ids (first-row order), and every response any row gives a prompt:
        # the plan keeps a unit together, and a weak negative is never an answer written for the prompt.
        units, self._answers = {}, {}
        for index, e in enumerate(self.examples):
            units.setdefault(e.prompt, []).append(index)
            self._answers.setdefault(e.prompt, set()).update(e.responses)
        self._units = list(units.values())
        longest_response = max(len(r) for e in self.examples for r in e.responses)
        self._cost = [self._example_cost(e, longest_response) for e in self.examples]
        worst = max(range(len(self.examples)), key=self._cost.__getitem__)
        if self._cost[worst] > self.max_tokens:
            raise PreferenceDataError(
                f"row {self.examples[worst].row}: its prompt and responses take up to {self._cost[worst]} tokens "
                f"(weak negatives counted at their longest), more than max_tokens_per_batch={self.max_tokens}; "
                "raise the budget or lower max_length / the number of negatives")

    def _response_room(self, prompt_len: int, response_len: int) -> int:
        return response_len if self.max_length is None else min(response_len, self.max_length - prompt_len)

    def _example_cost(self, example, longest_response) -> int:
        """Tokens of a prompt with its responses and W weak negatives at their longest, in the packed layout."""
        lp = len(example.prompt)
        responses = [self._response_room(lp, len(r)) for r in example.responses]
        responses += [self._response_room(lp, longest_response)] * self.num_weak
        if self.prefix_sharing:
            return lp - 1 + sum(responses)
        return sum(lp + n for n in responses)

    # -- planning -------------------------------------------------------------------------------------------

    def plan_epoch(self, epoch: int) -> list[PlannedStep]:
        """The epoch's steps: units of same-prompt rows (and the rows within each) in a seeded order, packed
        greedily into per-rank token-budget batches. A unit that fits an empty batch starts one rather than being
        split; a larger one is split row by row. Without repeated prompts every unit is one row: row-greedy."""
        units = [list(unit) for unit in self._units]
        if self.shuffle:
            rng = _rng("order", self.seed, epoch)
            rng.shuffle(units)
            for unit in units:  # a unit split over batches mixes differently each epoch (single rows draw nothing)
                rng.shuffle(unit)
        batches, current, used = [], [], 0

        def fits(rows, tokens):
            return used + tokens <= self.max_tokens and (self.max_prompts is None
                                                         or len(current) + rows <= self.max_prompts)

        for unit in units:
            tokens = sum(self._cost[index] for index in unit)
            whole = tokens <= self.max_tokens and (self.max_prompts is None or len(unit) <= self.max_prompts)
            if current and whole and not fits(len(unit), tokens):
                batches.append(current)
                current, used = [], 0
            for index in unit:
                if current and not fits(1, self._cost[index]):
                    batches.append(current)
                    current, used = [], 0
                current.append(index)
                used += self._cost[index]
        batches.append(current)

        steps = []
        for start in range(0, len(batches), self.world_size):
            shards = batches[start : start + self.world_size]
            if len(shards) < self.world_size:  # a short last step: split batches so every rank has a prompt
                if sum(len(shard) for shard in shards) < self.world_size:
                    break  # fewer prompts than ranks: dropped (they come back next epoch in another order)
                while len(shards) < self.world_size:  # halves of a batch stay within its budget
                    largest = max(range(len(shards)), key=lambda r: len(shards[r]))
                    shard = shards.pop(largest)
                    cut = self._halve(shard)
                    shards[largest:largest] = [shard[:cut], shard[cut:]]
            steps.append(self._draw_weak(epoch, len(steps), shards))
        return steps

    def _halve(self, shard) -> int:
        """Where to cut a batch of ≥ 2 rows in two: the boundary between prompts nearest its middle (a unit
        stays whole), or the middle when every row has one prompt."""
        middle = len(shard) // 2
        boundaries = [i for i in range(1, len(shard))
                      if self.examples[shard[i]].prompt != self.examples[shard[i - 1]].prompt]
        return min(boundaries, key=lambda i: (abs(i - middle), i), default=middle)

    def _draw_weak(self, epoch, step, shards) -> PlannedStep:
        """Pair each row with W responses of the step's rows (all ranks) with another prompt, seeded per row.
        Prompts compare by token ids, not rows: a data set may hold several rows per prompt."""
        pool = [(q, j) for shard in shards for q in shard for j in range(len(self.examples[q].responses))]
        planned = []
        for shard in shards:
            prompts = []
            for p in shard:
                weak = ()
                if self.num_weak:
                    prompt = self.examples[p].prompt
                    own = self._answers[prompt]
                    candidates = [(q, j) for q, j in pool if self.examples[q].prompt != prompt
                                  and self.examples[q].responses[j] not in own]
                    count = min(self.num_weak, len(candidates))
                    weak = tuple(_rng("weak", self.seed, epoch, step, p).sample(candidates, count))
                prompts.append(PlannedPrompt(p, weak))
            planned.append(tuple(prompts))
        return PlannedStep(epoch, step, tuple(planned))

    # -- sequences and packing -------------------------------------------------------------------------------

    def sequence_keys(self, prompts: Sequence[PlannedPrompt]) -> list[tuple[int, int, int]]:
        """Keys (source example, response, scored-under example) of the prompts' sequences, in packing order:
        per prompt its own responses (positive first), then its weak negatives."""
        keys = []
        for planned in prompts:
            p = planned.example
            keys += [(p, j, p) for j in range(len(self.examples[p].responses))]
            keys += [(q, j, p) for q, j in planned.weak]
        return keys

    def sequence_tokens(self, key) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(prompt ids, response ids) of a key, the response cut to max_length."""
        source, response, under = key
        prompt = self.examples[under].prompt
        ids = self.examples[source].responses[response]
        return prompt, ids[: self._response_room(len(prompt), len(ids))]

    def packed_length(self, keys: Sequence[tuple[int, int, int]]) -> int:
        """Tokens `pack(keys)` puts in the row."""
        total = 0
        for under, group in self._segments(keys):
            prompt = self.examples[under].prompt
            responses = sum(len(self.sequence_tokens(key)[1]) for key in group)
            total += (len(prompt) - 1 + responses) if self.prefix_sharing else len(group) * len(prompt) + responses
        return total

    def _segments(self, keys):
        """Runs of consecutive keys scored under identical prompt ids, from one row or several: [(row of the
        run's first key, [keys])]."""
        runs = []
        for key in keys:
            if runs and self.examples[runs[-1][0]].prompt == self.examples[key[2]].prompt:
                runs[-1][1].append(key)
            else:
                runs.append((key[2], [key]))
        return runs

    def pack(self, keys: Sequence[tuple[int, int, int]], device=None) -> dict:
        """Pack sequences into one row: input_ids / position_ids [1, N], cu_seqlens [S+1] int32, targets [N],
        keys [S, 3], max_seqlen. The target of a position is the next token, counted at response positions
        only (from the last prompt token to the token before the last). With prefix sharing, consecutive keys
        under identical prompt ids (one row's or several rows') share one encoding of it (`pack_prefix_shared`:
        adds cu_segments and branch_ids)."""
        if self.prefix_sharing:
            segments = [(self.examples[under].prompt, [self.sequence_tokens(key)[1] for key in group])
                        for under, group in self._segments(keys)]
            batch = pack_prefix_shared(segments, device)
            batch["keys"] = torch.tensor(keys, dtype=torch.int64, device=device).view(-1, 3)
            return batch
        batch = pack_sequences([self.sequence_tokens(key) for key in keys], device)
        batch["keys"] = torch.tensor(keys, dtype=torch.int64, device=device).view(-1, 3)
        return batch

    def collate(self, prompts: Sequence[PlannedPrompt], device=None) -> dict:
        """A packed training batch: `pack` of the prompts' sequences plus groups [P, 1 + K_max + W] (positive,
        strong negatives, weak negatives; -1 padding), num_strong = K_max, num_prompts, and scores [P, G] when
        the data has scores (weak negatives get −inf: no label mass)."""
        keys = self.sequence_keys(prompts)
        batch = self.pack(keys, device)
        num_strong = max(len(self.examples[p.example].responses) for p in prompts) - 1
        width = 1 + num_strong + self.num_weak
        groups = torch.full((len(prompts), width), -1, dtype=torch.int64)
        has_scores = self.examples[prompts[0].example].scores is not None
        scores = torch.zeros(len(prompts), width, dtype=torch.float64) if has_scores else None
        start = 0
        for row, planned in enumerate(prompts):
            example = self.examples[planned.example]
            own = len(example.responses)
            groups[row, :own] = torch.arange(start, start + own)
            weak = len(planned.weak)
            groups[row, 1 + num_strong : 1 + num_strong + weak] = torch.arange(start + own, start + own + weak)
            if scores is not None:
                scores[row, :own] = torch.tensor(example.scores, dtype=torch.float64)
                scores[row, 1 + num_strong : 1 + num_strong + weak] = -torch.inf
            start += own + weak
        batch.update(groups=groups.to(device), num_strong=num_strong, num_prompts=len(prompts),
                     scores=None if scores is None else scores.to(device))
        return batch


def pack_sequences(sequences: Sequence[tuple[Sequence[int], Sequence[int]]], device=None) -> dict:
    """(prompt ids, response ids) pairs packed into one row without sharing: input_ids / position_ids [1, N],
    cu_seqlens [S+1] int32, targets [N] (the next token at response positions, -100 elsewhere), max_seqlen."""
    input_ids, targets, lengths = [], [], []
    for prompt, response in sequences:
        if not prompt or not response:
            raise ValueError(f"sequence {len(lengths)}: needs ≥ 1 prompt and ≥ 1 response token, got "
                             f"{len(prompt)} and {len(response)}")
        input_ids += list(prompt) + list(response)
        targets += [IGNORE_INDEX] * (len(prompt) - 1) + list(response) + [IGNORE_INDEX]
        lengths.append(len(prompt) + len(response))
    if not lengths:
        raise ValueError("pack_sequences needs at least one sequence")
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.tensor(lengths).cumsum(0)
    return {
        "input_ids": torch.tensor(input_ids, device=device).unsqueeze(0),
        "position_ids": torch.cat([torch.arange(n) for n in lengths]).to(device).unsqueeze(0),
        "cu_seqlens": cu_seqlens.to(device),
        "targets": torch.tensor(targets, device=device),
        "max_seqlen": max(lengths),
    }


def plan_digest(steps: Iterable[PlannedStep]) -> str:
    """Hex blake2b of the steps (epoch, index, every shard's rows and their weak pairings), equal for equal plans
    in any process: a resumed run compares the digest of the steps it took with its plan's."""
    digest = hashlib.blake2b(digest_size=16)
    for step in steps:
        shards = tuple(tuple((planned.example, planned.weak) for planned in shard) for shard in step.shards)
        digest.update(repr((step.epoch, step.index, shards)).encode() + b"\n")  # ints and tuples: a stable repr
    return digest.hexdigest()
