"""BatchPlanner: seeded token-budget plans, weak-negative pairing and the packed batch layout (DESIGN §9)."""
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from epa_kernels.transformers import (
    BatchPlanner,
    PlannedPrompt,
    PlannedStep,
    PreferenceDataError,
    PreferenceExample,
)
from epa_kernels.transformers.batching import IGNORE_INDEX, plan_digest

VOCAB = 320
SEED = 1234


def make_examples(count, seed=SEED, *, max_strong=3, prompt_len=(1, 6), response_len=(1, 7), scores=False,
                  shared_every=0):
    """Random examples with ragged K; with `shared_every`, every such example reuses a response of the previous
    one (so identical responses across prompts exist)."""
    print(f"make_examples seed={seed}")
    rng = random.Random(seed)
    examples = []
    for row in range(count):
        prompt = tuple(rng.randrange(4, VOCAB) for _ in range(rng.randint(*prompt_len)))
        responses, count = [], 1 + rng.randint(1, max_strong)
        if shared_every and row % shared_every == 1:
            responses.append(examples[-1].responses[-1])
        while len(responses) < count:
            response = tuple(rng.randrange(4, VOCAB) for _ in range(rng.randint(*response_len)))
            if response not in responses:
                responses.append(response)
        rng.shuffle(responses)
        example_scores = tuple(sorted((rng.uniform(-3, 3) for _ in responses), reverse=True)) if scores else None
        examples.append(PreferenceExample(row, prompt, tuple(responses), example_scores))
    return examples


def example(row, prompt_len, *response_lens, start=10):
    """A deterministic example with the given prompt and response lengths (distinct responses)."""
    prompt = tuple(range(start, start + prompt_len))
    responses = tuple(tuple(range(100 + 10 * j, 100 + 10 * j + n)) for j, n in enumerate(response_lens))
    return PreferenceExample(row, prompt, responses)


def repeated_prompt_examples(num_prompts, seed=SEED):
    """Pairwise expansions of ranked sets (SHP-like): each prompt has 1–4 rows, each row a pair of the prompt's
    answers, rows of one prompt scattered through the data; some rows answer with another prompt's answer (so
    an answer written for a prompt also exists elsewhere)."""
    print(f"repeated_prompt_examples seed={seed}")
    rng = random.Random(seed)
    prompts, pools = set(), []
    while len(prompts) < num_prompts:
        prompt = tuple(rng.randrange(4, VOCAB) for _ in range(rng.randint(2, 5)))
        if prompt not in prompts:
            prompts.add(prompt)
            pools.append((prompt, [tuple(rng.randrange(4, VOCAB) for _ in range(rng.randint(1, 5)))
                                   for _ in range(4)]))
    rows = []
    for index, (prompt, answers) in enumerate(pools):
        for _ in range(rng.randint(1, 4)):
            pair = rng.sample(answers, 2)
            if index % 3 == 1 and pools[index - 1][1][0] not in pair:  # the previous prompt's first answer
                pair[1] = pools[index - 1][1][0]
            rows.append((prompt, tuple(pair)))
    rng.shuffle(rows)
    return [PreferenceExample(row, prompt, responses) for row, (prompt, responses) in enumerate(rows)]


def planned_examples(steps):
    return [planned.example for step in steps for shard in step.shards for planned in shard]


# -- plan_epoch ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_example_once_per_epoch(world_size):
    examples = make_examples(23)
    planner = BatchPlanner(examples, max_tokens_per_batch=60, num_weak=1, seed=SEED, world_size=world_size)
    for epoch in range(3):
        steps = planner.plan_epoch(epoch)
        seen = planned_examples(steps)
        assert len(seen) == len(set(seen)), "an example planned twice in one epoch"
        dropped = set(range(len(examples))) - set(seen)
        assert len(dropped) < world_size, f"epoch {epoch}: {len(dropped)} examples dropped"
        if world_size == 1:
            assert sorted(seen) == list(range(len(examples)))
        for index, step in enumerate(steps):
            assert (step.epoch, step.index) == (epoch, index)
            assert len(step.shards) == world_size and all(len(shard) >= 1 for shard in step.shards)


def test_odd_last_step_is_spread_over_ranks():
    # Batches [0] [1] [2 3] (64, 64, 14 + 14 tokens of 70): with two ranks the last step is one batch, split.
    examples = [example(0, 2, 30, 30), example(1, 2, 30, 30), example(2, 2, 5, 5), example(3, 2, 5, 5)]
    planner = BatchPlanner(examples, max_tokens_per_batch=70, world_size=2, shuffle=False)
    steps = planner.plan_epoch(0)
    assert [[[p.example for p in shard] for shard in step.shards] for step in steps] == [[[0], [1]], [[2], [3]]]
    # Batches [0] [1] [2 3 4] on four ranks: one short step whose five prompts fill every rank within the budget.
    examples.append(example(4, 2, 5, 5))
    planner = BatchPlanner(examples, max_tokens_per_batch=70, world_size=4, shuffle=False)
    (step,) = planner.plan_epoch(0)
    assert sorted(planned_examples([step])) == list(range(5))
    assert all(planner.collate(shard)["input_ids"].numel() <= 70 for shard in step.shards)


def test_fewer_prompts_than_ranks_are_dropped():
    examples = [example(row, 2, 30, 30) for row in range(3)]  # one prompt per batch
    planner = BatchPlanner(examples, max_tokens_per_batch=70, world_size=2, seed=SEED)
    dropped = []
    for epoch in range(6):
        steps = planner.plan_epoch(epoch)
        assert len(steps) == 1 and len(set(planned_examples(steps))) == 2
        dropped.append((set(range(3)) - set(planned_examples(steps))).pop())
    assert len(set(dropped)) > 1, f"the same example is dropped every epoch: {dropped}"


def test_order_changes_between_epochs_and_follows_the_seed():
    examples = make_examples(30)

    def plan(seed, epoch):
        return BatchPlanner(examples, max_tokens_per_batch=80, num_weak=2, seed=seed, world_size=2).plan_epoch(epoch)

    assert plan(SEED, 0) == plan(SEED, 0), "same seed and epoch must give the same plan"
    assert planned_examples(plan(SEED, 0)) != planned_examples(plan(SEED, 1)), "order must change between epochs"
    assert planned_examples(plan(SEED, 0)) != planned_examples(plan(SEED + 1, 0)), "the seed must change the order"
    unshuffled = BatchPlanner(examples, max_tokens_per_batch=80, shuffle=False).plan_epoch(3)
    assert planned_examples(unshuffled) == list(range(len(examples)))


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("max_length", [None, 7])
def test_batches_fit_the_token_budget(world_size, max_length):
    examples = make_examples(40, seed=SEED + world_size, prompt_len=(1, 5))
    budget = 90
    planner = BatchPlanner(examples, max_tokens_per_batch=budget, num_weak=2, max_length=max_length, seed=SEED,
                           world_size=world_size)
    for epoch in range(3):
        for step in planner.plan_epoch(epoch):
            for shard in step.shards:
                tokens = planner.collate(shard)["input_ids"].numel()
                assert tokens <= budget, f"epoch {epoch} step {step.index}: {tokens} tokens > {budget}"


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("prefix_sharing", [False, True], ids=["unshared", "shared"])
def test_rows_of_one_prompt_stay_together(world_size, prefix_sharing):
    examples = repeated_prompt_examples(15)
    units = {}
    for index, e in enumerate(examples):
        units.setdefault(e.prompt, []).append(index)
    assert max(map(len, units.values())) > 1 and len(units) < len(examples)
    budget = 150  # any unit fits a batch: none is split
    planner = BatchPlanner(examples, max_tokens_per_batch=budget, num_weak=2, seed=SEED, world_size=world_size,
                           prefix_sharing=prefix_sharing)
    orders = []
    for epoch in range(3):
        steps = planner.plan_epoch(epoch)
        order = planned_examples(steps)
        orders.append(order)
        if world_size == 1:
            assert sorted(order) == list(range(len(examples)))
        for step in steps:
            in_step = planned_examples([step])
            for shard in step.shards:
                rows = [p.example for p in shard]
                assert planner.collate(shard)["input_ids"].numel() <= budget
                for unit in units.values():
                    here = [i for i, row in enumerate(rows) if row in unit]
                    if not here:
                        continue
                    assert here == list(range(here[0], here[0] + len(here))), f"rows {unit} apart in {rows}"
                    if len(here) < len(unit):  # only a last step spread over the ranks may split a unit
                        assert step is steps[-1] and set(unit) <= set(in_step), (
                            f"epoch {epoch} step {step.index}: rows {unit} of one prompt split: {rows}")
    assert orders[0] != orders[1] != orders[2], "the order of units must change between epochs"
    unshuffled = BatchPlanner(examples, max_tokens_per_batch=budget, shuffle=False).plan_epoch(0)
    assert planned_examples(unshuffled) == [row for unit in units.values() for row in unit]


def test_a_unit_starts_a_batch_rather_than_split_and_a_larger_one_is_split():
    # 14 tokens a row, budget 30. Rows 1 and 3 share prompt X (28 tokens): they move to a batch of their own
    # instead of 1 joining row 0. Rows 4–6 share prompt Z (42 tokens, more than a batch): split row by row.
    prompts = {0: 0, 1: 50, 2: 60, 3: 50, 4: 70, 5: 70, 6: 70}
    examples = [example(row, 2, 5, 5, start=start) for row, start in prompts.items()]
    planner = BatchPlanner(examples, max_tokens_per_batch=30, shuffle=False)
    steps = planner.plan_epoch(0)
    assert [[p.example for p in step.shards[0]] for step in steps] == [[0], [1, 3], [2, 4], [5, 6]]
    assert all(planner.collate(step.shards[0])["input_ids"].numel() <= 30 for step in steps)
    capped = BatchPlanner(examples, max_tokens_per_batch=1000, max_prompts_per_batch=2, shuffle=False)
    assert [[p.example for p in step.shards[0]] for step in capped.plan_epoch(0)] == [[0], [1, 3], [2, 4], [5, 6]]
    # One batch spread over two ranks is cut between prompts (after X X), not in the middle (after X).
    spread = BatchPlanner([examples[i] for i in (1, 3, 0)], max_tokens_per_batch=1000, world_size=2, shuffle=False)
    (step,) = spread.plan_epoch(0)
    assert [[p.example for p in shard] for shard in step.shards] == [[0, 1], [2]]


def test_prompt_cap_limits_batches_on_top_of_the_budget():
    examples = make_examples(23, seed=SEED, prompt_len=(1, 3), response_len=(1, 3))
    capped = BatchPlanner(examples, max_tokens_per_batch=10_000, max_prompts_per_batch=4, seed=SEED)
    sizes = [len(step.shards[0]) for step in capped.plan_epoch(0)]
    assert sizes == [4, 4, 4, 4, 4, 3]
    uncapped = BatchPlanner(examples, max_tokens_per_batch=10_000, seed=SEED)
    assert [len(step.shards[0]) for step in uncapped.plan_epoch(0)] == [23]
    with pytest.raises(ValueError, match="max_prompts_per_batch"):
        BatchPlanner(examples, max_tokens_per_batch=100, max_prompts_per_batch=0)


def test_spread_last_step_keeps_the_budget():
    # Batches [A50 B50] and [C10 D90] (budget 100) over three ranks: dealing prompts round-robin would give one
    # rank A + D = 140 tokens.
    examples = [example(0, 1, 24, 24), example(1, 1, 24, 24), example(2, 1, 4, 4), example(3, 1, 44, 44)]
    planner = BatchPlanner(examples, max_tokens_per_batch=100, world_size=3, shuffle=False)
    (step,) = planner.plan_epoch(0)
    assert sorted(planned_examples([step])) == [0, 1, 2, 3]
    for shard in step.shards:
        assert 1 <= len(shard) and planner.collate(shard)["input_ids"].numel() <= 100


def test_example_that_cannot_fit_names_its_row():
    examples = make_examples(5) + [PreferenceExample(17, tuple(range(4, 40)), ((5, 6), (7, 8, 9)))]
    with pytest.raises(PreferenceDataError, match="row 17"):
        BatchPlanner(examples, max_tokens_per_batch=60)
    BatchPlanner(examples, max_tokens_per_batch=80)  # 38 + 39 = 77 tokens fit
    with pytest.raises(PreferenceDataError, match="row 17"):  # a weak negative is counted at the longest response
        BatchPlanner(examples, max_tokens_per_batch=80, num_weak=1)


def test_prompt_without_room_under_max_length_names_its_row():
    examples = [example(0, 3, 4, 5), example(9, 6, 2, 3)]
    with pytest.raises(PreferenceDataError, match="row 9"):
        BatchPlanner(examples, max_tokens_per_batch=100, max_length=6)
    planner = BatchPlanner(examples, max_tokens_per_batch=100, max_length=7)
    batch = planner.collate([PlannedPrompt(1)])
    assert batch["cu_seqlens"].diff().tolist() == [7, 7]


@pytest.mark.parametrize("kwargs", [
    dict(max_tokens_per_batch=0), dict(max_tokens_per_batch=-5), dict(max_tokens_per_batch=2.5),
    dict(max_tokens_per_batch=True), dict(max_tokens_per_batch=100, num_weak=-1),
    dict(max_tokens_per_batch=100, num_weak=1.0), dict(max_tokens_per_batch=100, world_size=0),
    dict(max_tokens_per_batch=100, max_length=0), dict(max_tokens_per_batch=100, max_length=1.5),
    dict(max_tokens_per_batch=100, world_size=4),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_invalid_arguments(kwargs):
    name = [key for key in kwargs if key != "max_tokens_per_batch"] or ["max_tokens_per_batch"]
    pattern = "ranks" if "world_size" in kwargs and kwargs["world_size"] > 0 else name[0]
    with pytest.raises(ValueError, match=pattern):
        BatchPlanner(make_examples(3), **kwargs)


def test_no_examples():
    with pytest.raises(ValueError, match="no examples"):
        BatchPlanner([], max_tokens_per_batch=100)


# -- weak negatives -----------------------------------------------------------------------------------------------


def check_weak_pairing(examples, steps, num_weak):
    """Every weak negative: from the step, from a row with another prompt, not an answer any row gives this
    prompt, drawn once; as many as asked unless the step has fewer."""
    answers = {}
    for e in examples:
        answers.setdefault(e.prompt, set()).update(e.responses)
    for step in steps:
        in_step = [p.example for shard in step.shards for p in shard]
        for shard in step.shards:
            for planned in shard:
                p = planned.example
                prompt, own = examples[p].prompt, answers[examples[p].prompt]
                available = sum(examples[q].prompt != prompt and response not in own
                                for q in in_step for response in examples[q].responses)
                assert len(planned.weak) == min(num_weak, available)
                assert len(set(planned.weak)) == len(planned.weak), "a weak negative drawn twice"
                for q, j in planned.weak:
                    assert q in in_step, f"weak ({q}, {j}) for row {p} is not from the step"
                    assert examples[q].prompt != prompt, f"weak ({q}, {j}) for row {p}: a row of the same prompt"
                    assert 0 <= j < len(examples[q].responses)
                    assert examples[q].responses[j] not in own, "a weak negative identical to an answer to the prompt"


@pytest.mark.parametrize("world_size", [1, 2])
def test_weak_negative_pairing(world_size):
    examples = make_examples(24, shared_every=2)
    num_weak = 3
    planner = BatchPlanner(examples, max_tokens_per_batch=110, num_weak=num_weak, seed=SEED, world_size=world_size)
    shared = sum(len(set(a.responses) & set(b.responses)) > 0 for a, b in zip(examples, examples[1:], strict=False))
    assert shared > 0, "the data must have identical responses across prompts"
    for epoch in range(2):
        check_weak_pairing(examples, planner.plan_epoch(epoch), num_weak)


@pytest.mark.parametrize("world_size", [1, 2])
def test_weak_negatives_never_come_from_rows_of_the_same_prompt(world_size):
    examples = repeated_prompt_examples(12)
    num_weak = 4
    planner = BatchPlanner(examples, max_tokens_per_batch=200, num_weak=num_weak, seed=SEED, world_size=world_size)
    for epoch in range(3):
        steps = planner.plan_epoch(epoch)
        assert any(len({examples[p.example].prompt for p in shard}) < len(shard)
                   for step in steps for shard in step.shards), "steps must hold rows of one prompt"
        check_weak_pairing(examples, steps, num_weak)


def test_weak_count_is_capped_by_what_the_step_has():
    examples = [example(0, 2, 3, 4), example(1, 2, 5, 6, start=50)]
    planner = BatchPlanner(examples, max_tokens_per_batch=200, num_weak=5, seed=SEED)
    (step,) = planner.plan_epoch(0)
    assert sorted(len(p.weak) for p in step.shards[0]) == [2, 2]
    batch = planner.collate(step.shards[0])
    assert batch["groups"].shape == (2, 1 + 1 + 5)
    assert (batch["groups"][:, 4:] == -1).all()


def test_weak_pairing_follows_the_seed():
    examples = make_examples(20)

    def weak(seed, epoch):
        steps = BatchPlanner(examples, max_tokens_per_batch=120, num_weak=2, seed=seed).plan_epoch(epoch)
        return [p.weak for step in steps for shard in step.shards for p in shard]

    assert weak(SEED, 0) == weak(SEED, 0)
    assert weak(SEED, 0) != weak(SEED + 1, 0)
    assert weak(SEED, 0) != weak(SEED, 1)


@pytest.mark.parametrize("max_length", [None, 6])
def test_weak_sequence_is_prompt_then_other_response(max_length):
    examples = make_examples(12, prompt_len=(1, 4))
    planner = BatchPlanner(examples, max_tokens_per_batch=150, num_weak=2, max_length=max_length, seed=SEED)
    checked = 0
    for step in planner.plan_epoch(0):
        for shard in step.shards:
            batch = planner.collate(shard)
            cu, ids = batch["cu_seqlens"].tolist(), batch["input_ids"][0].tolist()
            for s, (q, j, p) in enumerate(batch["keys"].tolist()):
                expected = list(examples[p].prompt) + list(examples[q].responses[j])
                if max_length is not None:
                    expected = expected[:max_length]
                assert ids[cu[s] : cu[s + 1]] == expected, f"sequence {(q, j, p)}"
                checked += q != p
    assert checked > 0


# -- plan_digest --------------------------------------------------------------------------------------------------


def digest(examples, **kwargs):
    planner = BatchPlanner(examples, **{"max_tokens_per_batch": 200, "num_weak": 2, "seed": SEED, **kwargs})
    return plan_digest(step for epoch in range(2) for step in planner.plan_epoch(epoch))


def test_plan_digest_follows_the_plan():
    examples = make_examples(30)
    base = digest(examples)
    assert len(base) == 32 and int(base, 16) >= 0
    assert digest(examples) == base, "equal plans must give equal digests"
    assert digest(examples, world_size=2) != base
    assert digest(examples, seed=SEED + 1) != base
    assert digest(examples, max_tokens_per_batch=250) != base
    assert digest(examples, max_tokens_per_batch=10_000) == digest(examples, max_tokens_per_batch=20_000), (
        "budgets that pack alike plan alike")
    planner = BatchPlanner(examples, max_tokens_per_batch=200, num_weak=2, seed=SEED)
    steps = planner.plan_epoch(0) + planner.plan_epoch(1)
    assert plan_digest(steps) == base and plan_digest(steps[:3]) != base and plan_digest([]) != base
    swapped = [steps[1], steps[0], *steps[2:]]
    assert plan_digest(swapped) != base
    first = steps[0].shards[0][0]
    assert len(first.weak) == 2
    fewer = PlannedStep(0, 0, ((PlannedPrompt(first.example, first.weak[:1]), *steps[0].shards[0][1:]),))
    assert plan_digest([fewer, *steps[1:]]) != base, "the same rows with other weak pairings"


def test_plan_digest_is_equal_across_processes():
    """Another interpreter with another str-hash seed computes the same digest (no hash(), no ids)."""
    examples = [(e.row, e.prompt, e.responses) for e in make_examples(30)]
    code = ("from epa_kernels.transformers import BatchPlanner, PreferenceExample\n"
            "from epa_kernels.transformers.batching import plan_digest\n"
            f"examples = [PreferenceExample(*e) for e in {examples!r}]\n"
            f"planner = BatchPlanner(examples, max_tokens_per_batch=200, num_weak=2, seed={SEED}, world_size=2)\n"
            "print(plan_digest(step for epoch in range(2) for step in planner.plan_epoch(epoch)))\n")
    hash_seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONHASHSEED": hash_seed}, cwd=Path(__file__).parents[1])
    assert result.stdout.strip() == digest(make_examples(30), world_size=2)


# -- collate ------------------------------------------------------------------------------------------------------


def collated(scores=False, num_weak=2, max_length=None):
    examples = make_examples(6, scores=scores, prompt_len=(1, 4))
    examples[0] = PreferenceExample(0, (7,), ((11,), (12, 13)), (2.0, 1.0) if scores else None)  # 1-token prompt
    planner = BatchPlanner(examples, max_tokens_per_batch=500, num_weak=num_weak, max_length=max_length, seed=SEED)
    (step,) = planner.plan_epoch(0)
    prompts = step.shards[0]
    return planner, prompts, planner.collate(prompts)


def test_groups_layout():
    planner, prompts, batch = collated()
    examples = planner.examples
    k_max = max(len(examples[p.example].responses) for p in prompts) - 1
    assert len({len(examples[p.example].responses) for p in prompts}) > 1, "K must be ragged"
    assert batch["num_strong"] == k_max and batch["num_prompts"] == len(prompts)
    groups, keys = batch["groups"], [tuple(k) for k in batch["keys"].tolist()]
    assert groups.shape == (len(prompts), 1 + k_max + 2) and groups.dtype == torch.int64
    used = groups[groups >= 0].tolist()
    assert sorted(used) == list(range(len(keys))), "every sequence in exactly one group slot"
    for row, planned in enumerate(prompts):
        p, own = planned.example, len(examples[planned.example].responses)
        assert keys[groups[row, 0]] == (p, 0, p), "the positive goes in column 0"
        for column in range(1, 1 + k_max):
            index = int(groups[row, column])
            assert (keys[index] == (p, column, p)) if column < own else index == -1
        for column, (q, j) in enumerate(planned.weak, start=1 + k_max):
            assert keys[groups[row, column]] == (q, j, p)
        assert (groups[row, 1 + k_max + len(planned.weak) :] == -1).all()


def test_keys_match_sequence_keys():
    planner, prompts, batch = collated()
    assert batch["keys"].shape == (len(planner.sequence_keys(prompts)), 3)
    assert [tuple(k) for k in batch["keys"].tolist()] == planner.sequence_keys(prompts)
    assert batch["cu_seqlens"].numel() == batch["keys"].shape[0] + 1


@pytest.mark.parametrize("max_length", [None, 5])
def test_packed_layout_and_targets(max_length):
    planner, prompts, batch = collated(max_length=max_length)
    ids, positions, targets = batch["input_ids"], batch["position_ids"], batch["targets"]
    cu = batch["cu_seqlens"]
    assert ids.shape == positions.shape == (1, targets.numel()) and cu.dtype == torch.int32
    assert int(cu[0]) == 0 and int(cu[-1]) == targets.numel() and bool((cu.diff() > 0).all())
    assert batch["max_seqlen"] == int(cu.diff().max())
    one_token = 0
    for s, key in enumerate(batch["keys"].tolist()):
        start, end = int(cu[s]), int(cu[s + 1])
        prompt, response = planner.sequence_tokens(tuple(key))
        assert len(prompt) + len(response) == end - start and len(response) >= 1
        if max_length is not None:
            assert end - start <= max_length
        one_token += len(response) == 1
        assert positions[0, start:end].tolist() == list(range(end - start)), "positions restart per sequence"
        seq_targets = targets[start:end].tolist()
        last_prompt = len(prompt) - 1
        assert seq_targets[:last_prompt] == [IGNORE_INDEX] * last_prompt, "prompt positions are ignored"
        assert seq_targets[last_prompt] == response[0], "the last prompt position targets the first response token"
        assert seq_targets[last_prompt : end - start - 1] == list(response), "response positions: the next token"
        assert seq_targets[-1] == IGNORE_INDEX, "the last position has no next token"
        counted = [t for t in seq_targets if t != IGNORE_INDEX]
        assert len(counted) == len(response)
        row_ids = ids[0, start:end].tolist()
        assert all(row_ids[t + 1] == y for t, y in enumerate(seq_targets) if y != IGNORE_INDEX)
    assert one_token > 0, "a response of one token must be covered"


def test_scores():
    planner, prompts, batch = collated(scores=True)
    scores, groups = batch["scores"], batch["groups"]
    assert scores.shape == groups.shape and scores.is_floating_point()
    k_max = batch["num_strong"]
    for row, planned in enumerate(prompts):
        own = planner.examples[planned.example].scores
        assert scores[row, : len(own)].tolist() == list(own)
        weak = scores[row, 1 + k_max : 1 + k_max + len(planned.weak)]
        assert weak.numel() > 0 and bool((weak == -math.inf).all())
    assert collated(scores=False)[2]["scores"] is None


def test_fold_into_rows_places_every_token_once():
    from epa_kernels.transformers.rows import fold_into_rows

    lengths = [5, 1, 7, 3, 3, 2, 7]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    layout = fold_into_rows(cu_seqlens)
    rows, width = layout.input_index.shape
    assert width == max(lengths) and rows == 4  # first fit decreasing: 7 | 7 | 5+2 | 3+3+1
    flat = layout.input_index.reshape(-1)
    assert sorted(flat[flat >= 0].tolist()) == list(range(sum(lengths)))
    assert torch.equal(flat[layout.token_index], torch.arange(sum(lengths)))
    positions = layout.position_ids.reshape(-1)[layout.token_index]
    expected = torch.cat([torch.arange(n) for n in lengths])
    assert torch.equal(positions, expected)
    for r in range(rows):  # padding restarts at 0, so it never continues a real sequence
        pad = (layout.input_index[r] < 0).nonzero().squeeze(1)
        if pad.numel():
            assert torch.equal(layout.position_ids[r, pad], torch.arange(pad.numel()))
