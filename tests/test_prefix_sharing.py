"""Prefix sharing: the shared layout scores every response exactly as prompt ⊕ response run alone (DESIGN §9)."""
import random

import pytest
import torch

from epa_kernels.transformers import BatchPlanner, PreferenceExample, PreferenceModel
from epa_kernels.transformers.prefix_sharing import (
    IGNORE_INDEX,
    attention_windows,
    dense_prefix_mask,
    pack_prefix_shared,
    prefix_attention,
)
from epa_kernels.transformers.reference_cache import prompt_segments
from tests.tiny_models import tiny_causal_lm, tiny_config

SEED = 31337
VOCAB = 320


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ragged_examples(seed=SEED, count=4):
    """Prompts of 1–9 tokens with 2–4 responses of 1–8 tokens each (a one-token response in every example)."""
    print(f"ragged_examples seed={seed}")
    rng = random.Random(seed)
    examples = []
    for row in range(count):
        prompt = tuple(rng.randrange(4, VOCAB) for _ in range(rng.randint(1, 9)))
        responses = [(rng.randrange(4, VOCAB),)]
        while len(responses) < rng.randint(2, 4):
            response = tuple(rng.randrange(4, VOCAB) for _ in range(rng.randint(1, 8)))
            if response not in responses:
                responses.append(response)
        rng.shuffle(responses)
        examples.append(PreferenceExample(row, prompt, tuple(responses)))
    return examples


def repeated_prompt_examples(seed=SEED):
    """`ragged_examples` plus, at the end of the data, rows 4 and 6 with row 0's prompt and row 5 with row 2's (as in
    a pairwise expansion, row 5 reuses an answer of row 2)."""
    examples = ragged_examples(seed)
    rng = random.Random(seed + 1)
    for source in (0, 2, 0):
        first = examples[source]
        response = tuple(rng.randrange(4, VOCAB) for _ in range(rng.randint(1, 8)))
        other = first.responses[-1] if source == 2 else (rng.randrange(4, VOCAB),)
        examples.append(PreferenceExample(len(examples), first.prompt, (response, other)))
    return examples


def planners(examples, num_weak=2, max_length=None, shuffle=False):
    common = dict(max_tokens_per_batch=10_000, num_weak=num_weak, max_length=max_length, seed=SEED, shuffle=shuffle)
    return BatchPlanner(examples, **common), BatchPlanner(examples, prefix_sharing=True, **common)


def one_step(planner):
    (step,) = planner.plan_epoch(0)
    return step.shards[0]


# -- layout --------------------------------------------------------------------------------------------------------


def test_layout_of_one_segment():
    batch = pack_prefix_shared([((10, 11, 12), [(20, 21), (30,)])])
    # shared prompt [10, 11]; branch 1: [12, 20] → targets [20, 21]; branch 2: [12] → target [30]
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 12]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2]]
    assert batch["targets"].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 20, 21, 30]
    assert batch["branch_ids"].tolist() == [0, 0, 1, 1, 2]
    assert batch["cu_seqlens"].tolist() == [0, 4, 5]
    assert batch["cu_segments"].tolist() == [0, 5]


def test_one_token_prompt_has_no_shared_tokens():
    batch = pack_prefix_shared([((7,), [(20, 21, 22), (30,)]), ((8, 9), [(40,)])])
    assert batch["input_ids"].tolist() == [[7, 20, 21, 7, 8, 9]]
    assert batch["branch_ids"].tolist() == [1, 1, 1, 2, 0, 1]
    assert batch["cu_segments"].tolist() == [0, 4, 6]


@pytest.mark.parametrize("segments", [[((), [(1,)])], [((1,), [])], [((1,), [()])]])
def test_pack_rejects_empty_parts(segments):
    with pytest.raises(ValueError, match="segment"):
        pack_prefix_shared(segments)


@pytest.mark.parametrize("max_length", [None, 12])
def test_planner_counts_and_packs_each_prompt_once(max_length):
    examples = ragged_examples()
    unshared, shared = planners(examples, max_length=max_length)
    prompts = one_step(shared)
    keys = shared.sequence_keys(prompts)
    plain, batch = unshared.collate(prompts), shared.collate(prompts)
    assert batch["input_ids"].shape[1] == shared.packed_length(keys) < plain["input_ids"].shape[1]
    assert plain["input_ids"].shape[1] == unshared.packed_length(keys)
    expected = sum(len(examples[p.example].prompt) - 1 for p in prompts) + sum(
        len(unshared.sequence_tokens(key)[1]) for key in keys)
    assert batch["input_ids"].shape[1] == expected
    # the same targets per sequence, in the same order, and the same groups
    for name in ("groups", "keys"):
        assert torch.equal(plain[name], batch[name])
    def counted(b, s):
        t = b["targets"][b["cu_seqlens"][s] : b["cu_seqlens"][s + 1]]
        return t[t != IGNORE_INDEX].tolist()

    for s in range(len(keys)):
        assert counted(plain, s) == counted(batch, s)


def test_rows_sharing_a_prompt_share_one_segment():
    """Rows 0, 4, 6 and rows 2, 5 repeat a prompt: the plan puts each set together and the packing encodes its
    prompt once, with one branch per response of every row (weak negatives included), none drawn from those rows."""
    examples = repeated_prompt_examples()
    unshared, shared = planners(examples, num_weak=3, shuffle=True)
    prompts = one_step(shared)
    rows = [p.example for p in prompts]
    for unit in ([0, 4, 6], [2, 5]):
        at = [rows.index(row) for row in unit]
        assert sorted(at) == list(range(min(at), min(at) + len(unit))), f"rows {unit} apart in {rows}"
    for planned in prompts:
        prompt = examples[planned.example].prompt
        assert planned.weak and all(examples[q].prompt != prompt for q, _ in planned.weak), planned
    keys = shared.sequence_keys(prompts)
    batch, plain = shared.collate(prompts), unshared.collate(prompts)
    distinct = {examples[row].prompt for row in rows}
    assert batch["cu_segments"].numel() - 1 == len(distinct) == 4
    expected = sum(len(prompt) - 1 for prompt in distinct) + sum(len(shared.sequence_tokens(k)[1]) for k in keys)
    assert batch["input_ids"].shape[1] == shared.packed_length(keys) == expected
    for name in ("groups", "keys"):
        assert torch.equal(plain[name], batch[name])
    wrapper = PreferenceModel(tiny("llama", "sdpa", dtype=torch.float32))
    with torch.no_grad():
        torch.testing.assert_close(wrapper.sequence_logps(batch), wrapper.sequence_logps(plain), rtol=1e-5, atol=1e-4)


def test_reference_segments_share_a_repeated_prompt():
    """The reference pass groups keys by prompt ids as training does: one segment per distinct prompt."""
    examples = repeated_prompt_examples()
    _, shared = planners(examples, num_weak=3, shuffle=True)
    keys = sorted(shared.sequence_keys(one_step(shared)))
    segments = list(prompt_segments(keys, shared, max_tokens=10_000))
    assert len(segments) == len({examples[row].prompt for row in range(len(examples))}) == 4
    for segment in segments:
        assert len({examples[key[2]].prompt for key in segment}) == 1
        assert shared.pack(segment)["cu_segments"].numel() == 2, "one encoding of the prompt per segment"
    assert max(len({key[2] for key in segment}) for segment in segments) == 3  # rows 0, 4 and 6


def test_budget_counts_the_shared_layout():
    examples = [PreferenceExample(0, tuple(range(4, 104)), ((5, 6), (7, 8), (9, 10)))]
    with pytest.raises(Exception, match="max_tokens_per_batch"):
        BatchPlanner(examples, max_tokens_per_batch=105)
    BatchPlanner(examples, max_tokens_per_batch=105, prefix_sharing=True)  # 99 + 6 tokens


def test_dense_mask_by_hand():
    segment = torch.tensor([[0, 0, 0, 0, 0, 1]])
    branch = torch.tensor([[0, 1, 1, 2, 2, 1]])
    positions = torch.tensor([[0, 1, 2, 1, 2, 0]])
    mask = dense_prefix_mask(segment, branch, positions)[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0, 0],
                    [1, 1, 1, 0, 0, 0],
                    [1, 0, 0, 1, 0, 0],
                    [1, 0, 0, 1, 1, 0],
                    [0, 0, 0, 0, 0, 1]]
    windowed = dense_prefix_mask(segment, branch, positions, window=2)[0, 0].int().tolist()
    assert windowed[2] == [0, 1, 1, 0, 0, 0] and windowed[4] == [0, 0, 0, 1, 1, 0]


def test_attention_windows_follow_the_config():
    assert attention_windows(tiny_config("llama")) == {None: None}
    assert attention_windows(tiny_config("mistral", sliding_window=4)) == {None: 4}
    assert attention_windows(tiny_config("qwen2")) == {None: None}  # Qwen2's window is unused by default
    assert attention_windows(tiny_config("gemma2")) == {"full_attention": None, "sliding_attention": 4}
    config = tiny_config("llama")
    config.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(ValueError, match="chunked_attention"):
        attention_windows(config)
    with pytest.raises(ValueError, match="bidirectionally"):
        attention_windows(tiny_config("gemma3", use_bidirectional_attention=True))


def test_sdpa_rows_past_its_cuda_limit_are_refused():
    from epa_kernels.transformers.prefix_sharing import SDPA_CUDA_MAX_ROW, check_mask_width

    check_mask_width("sdpa", SDPA_CUDA_MAX_ROW, torch.device("cuda"))
    check_mask_width("sdpa", 10 * SDPA_CUDA_MAX_ROW, torch.device("cpu"))
    check_mask_width("flex_attention", 10 * SDPA_CUDA_MAX_ROW, torch.device("cuda"))
    with pytest.raises(ValueError, match="flex_attention"):
        check_mask_width("sdpa", SDPA_CUDA_MAX_ROW + 1, torch.device("cuda"))


def test_flash_attention_is_refused():
    config = tiny_config("llama")
    config._attn_implementation = "flash_attention_2"
    batch = pack_prefix_shared([((1, 2), [(3,), (4,)])])
    with pytest.raises(ValueError, match="flash_attention_2"):
        prefix_attention(batch, config)


# -- exactness against the unshared layout --------------------------------------------------------------------------


def tiny(arch, attn, dtype=torch.float64, window=None, layer_types=None):
    overrides = {"sliding_window": window} if window is not None else {}
    if layer_types is not None:
        overrides["layer_types"] = layer_types
    lm = tiny_causal_lm(arch, seed=SEED, dtype=dtype, attn=attn, **overrides)
    with torch.no_grad():  # peaked distributions, so that a wrong context shows in the log-probs
        lm.get_output_embeddings().weight.mul_(25.0)
    return lm


def logps_and_grads(wrapper, batch):
    wrapper.zero_grad()
    logps = wrapper.sequence_logps(batch)
    (logps * torch.linspace(-1, 1, logps.numel(), dtype=logps.dtype)).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in wrapper.named_parameters() if p.grad is not None}


MIXED = ["sliding_attention", "full_attention"]  # one mask per layer type, as Gemma-2/3 and Cohere-2 interleave


@pytest.mark.parametrize("arch, attn, window, layer_types", [
    ("llama", "sdpa", None, None),
    ("llama", "eager", None, None),
    ("llama_tied", "sdpa", None, None),
    ("qwen2", "sdpa", None, None),
    ("mistral", "sdpa", 3, None),
    ("gemma2", "eager", 3, None),
    ("gemma3", "sdpa", 3, None),
    ("gemma3", "sdpa", 3, MIXED),
])
def test_shared_equals_unshared(arch, attn, window, layer_types):
    """Hidden states at every counted position (fp64, so any leak stands far above rounding), then per-sequence
    log-probs and every parameter's gradient (fp32, the kernels' dtype): packed rows of several prompts, ragged
    responses, one-token responses and prompts, weak negatives."""
    lm = tiny(arch, attn, window=window, layer_types=layer_types)
    if window is not None:
        assert lm.config.sliding_window == window
    if layer_types is not None:
        assert lm.config.layer_types == layer_types
    wrapper = PreferenceModel(lm)
    unshared, shared = planners(ragged_examples())
    prompts = one_step(shared)
    plain, batch = unshared.collate(prompts), shared.collate(prompts)
    with torch.no_grad():
        expected_hidden = wrapper.hidden_states(plain)[plain["targets"] != IGNORE_INDEX]
        hidden = wrapper.hidden_states(batch)[batch["targets"] != IGNORE_INDEX]
    scale = expected_hidden.abs().max().item()
    tolerance = 1e-10 if attn == "sdpa" else 1e-5  # eager attention takes its softmax in fp32 even in fp64
    assert (hidden - expected_hidden).abs().max().item() <= tolerance * scale
    lm.float()
    expected, expected_grads = logps_and_grads(wrapper, plain)
    logps, grads = logps_and_grads(wrapper, batch)
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=1e-4)
    assert expected_grads.keys() == grads.keys()
    for name in grads:  # fp32 rounding, relative to each tensor's scale (element-wise it depends on the CPU's SIMD)
        error = (grads[name] - expected_grads[name]).abs().max().item()
        assert error <= 1e-5 * expected_grads[name].abs().max().item(), f"{name}: max error {error:.3e}"


def test_a_mask_without_branches_differs():
    """The comparison above can fail: letting branches see each other changes the log-probs."""
    lm = tiny("llama", "sdpa", dtype=torch.float32)
    wrapper = PreferenceModel(lm)
    unshared, shared = planners(ragged_examples())
    batch = shared.collate(one_step(shared))
    expected = wrapper.sequence_logps(unshared.collate(one_step(shared))).detach()
    leaky = dict(batch, branch_ids=torch.zeros_like(batch["branch_ids"]))
    assert (wrapper.sequence_logps(leaky).detach() - expected).abs().max() > 1e-3


def test_loss_and_gradients_equal_in_the_trainer_module():
    lm = tiny("qwen2", "sdpa", dtype=torch.float32)
    wrapper = PreferenceModel(lm, loss="epa", beta=0.3)
    unshared, shared = planners(ragged_examples(), num_weak=1)
    prompts = one_step(shared)
    results = []
    for planner in (unshared, shared):
        wrapper.zero_grad()
        batch = planner.collate(prompts)
        batch["ref_logps"] = torch.linspace(-30, -5, batch["keys"].shape[0], dtype=torch.float64)
        loss, _ = wrapper(batch)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in wrapper.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_flex_attention_block_mask_equals_dense_on_cpu():
    """The BlockMask through FlexAttention (compiled for CPU; rows padded to its 128-token block) against the dense
    SDPA mask. Forward only: torch 2.13's CPU FlexAttention has no backward (training with it needs CUDA); on
    CPU it serves the reference pass."""
    lm = tiny("llama", "flex_attention", dtype=torch.float32)
    reference = tiny("llama", "sdpa", dtype=torch.float32)
    _, shared = planners(ragged_examples())
    batch = shared.collate(one_step(shared))
    with torch.no_grad():
        flex = PreferenceModel(lm, check_head=False).sequence_logps(batch)
        dense = PreferenceModel(reference).sequence_logps(batch)
        leaky = PreferenceModel(lm, check_head=False).sequence_logps(
            dict(batch, branch_ids=torch.zeros_like(batch["branch_ids"])))
    torch.testing.assert_close(flex, dense, rtol=1e-4, atol=1e-4)
    assert (leaky - dense).abs().max() > 1e-3
