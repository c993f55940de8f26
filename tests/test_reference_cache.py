"""The precomputed reference: every chunk within the token budget, values equal to scoring each sequence alone,
with and without prefix sharing, and a cache that extends instead of recomputing."""
import random

import pytest

from epa_kernels.transformers import BatchPlanner, PreferenceExample, PreferenceModel, ReferenceCache
from epa_kernels.transformers.reference_cache import fill_reference_cache, prompt_segments
from tests.tiny_models import tiny_causal_lm

SEED = 4242
VOCAB = 320


def examples(count=5):
    print(f"examples seed={SEED}")
    rng = random.Random(SEED)
    out = []
    for row in range(count):
        prompt = tuple(rng.randrange(4, VOCAB) for _ in range(rng.randint(3, 12)))
        responses = tuple({tuple(rng.randrange(4, VOCAB) for _ in range(rng.randint(1, 6))) for _ in range(3)})
        out.append(PreferenceExample(row, prompt, responses))
    return out


def epoch_keys(planner, epochs):
    return [key for epoch in range(epochs) for step in planner.plan_epoch(epoch) for shard in step.shards
            for key in planner.sequence_keys(shard)]


@pytest.mark.parametrize("prefix_sharing", [False, True], ids=["unshared", "shared"])
def test_precompute_over_epochs_keeps_the_budget_and_the_values(tmp_path, prefix_sharing):
    data = examples()
    # Two prompts per step and three weak negatives each: over four epochs one prompt gathers many distinct
    # weak negatives, more than one chunk of the budget holds.
    planner = BatchPlanner(data, max_tokens_per_batch=200, num_weak=3, seed=SEED, max_prompts_per_batch=2,
                           prefix_sharing=prefix_sharing)
    keys = epoch_keys(planner, epochs=4)
    budget = 40
    by_prompt = {}
    for key in set(keys):
        by_prompt.setdefault(key[2], set()).add(key)
    assert max(planner.packed_length(sorted(group)) for group in by_prompt.values()) > budget  # the case at issue
    reference = PreferenceModel(tiny_causal_lm("llama", seed=SEED, attn="sdpa"))
    packed_lengths, pack = [], planner.pack

    def recording_pack(chunk, device=None):
        packed_lengths.append(planner.packed_length(chunk))
        return pack(chunk, device)

    planner.pack = recording_pack
    cache = ReferenceCache(tmp_path, {"test": prefix_sharing})
    computed = fill_reference_cache(cache, reference, planner, keys, max_tokens=budget)
    assert computed == len(set(keys)) == len(cache)
    longest_single = max(planner.packed_length([key]) for key in set(keys))
    assert max(packed_lengths) <= max(budget, longest_single)
    alone = {key: reference.sequence_logps(pack([key])).item() for key in sorted(set(keys))[:12]}
    for key, value in alone.items():
        assert cache.values[key] == pytest.approx(value, rel=1e-5, abs=1e-4), key
    # Saved and reloaded: nothing left to compute.
    again = ReferenceCache(tmp_path, {"test": prefix_sharing})
    assert fill_reference_cache(again, reference, planner, keys, max_tokens=budget) == 0
    assert again.values == cache.values


def test_prompt_segments_cut_each_prompt_to_the_budget():
    data = examples()
    planner = BatchPlanner(data, max_tokens_per_batch=200, num_weak=3, seed=SEED, prefix_sharing=True)
    keys = sorted(set(epoch_keys(planner, epochs=3)))
    segments = list(prompt_segments(keys, planner, max_tokens=30))
    assert sorted(key for segment in segments for key in segment) == keys
    for segment in segments:
        assert len({key[2] for key in segment}) == 1  # one prompt per segment
        assert len(segment) == 1 or planner.packed_length(segment) <= 30
