"""PreferenceModel on tiny random transformers LMs against the model's own logits, each sequence run alone (DESIGN §5,
§9): values and every parameter's gradient, packing per attention backend, head transforms and the probe, the
reference model, dropout, tied weights, bf16 autocast."""
import copy
import math
import random
from types import SimpleNamespace

import pytest
import torch
from conftest import BACKEND_PARAMS, assert_matches_reference
from tiny_models import tiny_causal_lm, tiny_config
from torch import nn

from epa_kernels import preference_loss
from epa_kernels.transformers import (
    BatchPlanner,
    LogitTransform,
    PreferenceExample,
    PreferenceModel,
    disable_dropout,
    logit_transform,
)
from epa_kernels.transformers.model import check_fused_head, decoder_and_head

VOCAB = 320
SEED = 20240611
ARCHS = ["llama", "llama_tied", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "gpt_neox", "cohere", "granite"]
HEAD_SCALE = 25.0
TRANSFORMS = {"gemma2": (1.0, 5.0), "gemma3": (1.0, 5.0), "cohere": (2.0, None), "granite": (4.0, None)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: faster for these tiny models, and immune to oversubscription on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(arch, *, seed=SEED, **kwargs):
    """A tiny random LM with a head scaled by HEAD_SCALE; Gemma-2 with eager attention (transformers refuses sdpa).

    The random init gives near-uniform logits (std ≈ 0.1), under which a dropped softcap (5) or temperature would
    hardly show; scaled, the logits reach ±10, the softcap bites and the distributions are peaked."""
    print(f"tiny {arch} seed={seed}")
    if arch == "gemma2":
        kwargs.setdefault("attn", "eager")
    lm = tiny_causal_lm(arch, seed=seed, **kwargs)
    with torch.no_grad():
        lm.get_output_embeddings().weight.mul_(HEAD_SCALE)
    return lm


def make_batch(*, num_weak=2, scores=False, ref=True, seed=SEED):
    """A packed batch of three prompts with ragged K (1, 3, 2), a 1-token prompt, 1-token responses, weak negatives
    and sequences longer than the Gemma sliding window (4); ref_logps random when `ref`."""
    print(f"make_batch seed={seed}")
    rng = random.Random(seed)

    def ids(n):
        return tuple(rng.randrange(4, VOCAB) for _ in range(n))

    shapes = [(1, (3, 1)), (5, (7, 2, 6, 4)), (3, (1, 5, 3))]
    examples = []
    for row, (prompt_len, response_lens) in enumerate(shapes):
        example_scores = tuple(sorted((rng.uniform(-2, 2) for _ in response_lens), reverse=True)) if scores else None
        examples.append(PreferenceExample(row, ids(prompt_len), tuple(ids(n) for n in response_lens), example_scores))
    planner = BatchPlanner(examples, max_tokens_per_batch=1000, num_weak=num_weak, seed=seed)
    (step,) = planner.plan_epoch(0)
    batch = planner.collate(step.shards[0])
    num_seqs = batch["cu_seqlens"].numel() - 1
    generator = torch.Generator().manual_seed(seed)
    batch["ref_logps"] = torch.randn(num_seqs, generator=generator) * 3 - 20 if ref else None
    return batch


def sequences(batch):
    cu = batch["cu_seqlens"].tolist()
    return [(batch["input_ids"][:, cu[s] : cu[s + 1]], batch["targets"][cu[s] : cu[s + 1]]) for s in range(len(cu) - 1)]


def reference_logps(model, batch, reduction="sum", *, shifted=False):
    """Per-sequence log-probs from the model's own logits, each sequence run alone, in the model's dtype.
    shifted: score each position against its own token instead of the next one (a deliberately wrong reference)."""
    logps = []
    for ids, targets in sequences(batch):
        logits = model(input_ids=ids, use_cache=False).logits[0]
        counted = targets != -100
        wanted = ids[0][counted] if shifted else targets[counted]
        token_logps = torch.log_softmax(logits[counted], dim=-1).gather(1, wanted[:, None]).squeeze(1)
        logps.append(token_logps.sum() if reduction == "sum" else token_logps.mean())
    return torch.stack(logps)


def reference_loss(model, batch, *, loss, beta, reduction, shifted=False, **loss_kw):
    logps = reference_logps(model, batch, reduction, shifted=shifted)
    ref = batch.get("ref_logps")
    value, _ = preference_loss(logps, None if ref is None else ref.to(logps.dtype), batch["groups"], loss=loss,
                               beta=beta, num_strong=batch["num_strong"], scores=batch.get("scores"), **loss_kw)
    return value, logps


def check_against_model_logits(lm, batch, *, loss="epa", beta=0.5, reduction="sum", backend="auto", **loss_kw):
    """The fused fp32 loss, sequence log-probs and parameter gradients pass the 2×-reference rule, the reference
    being the model's own logits per sequence in fp64 (truth) and fp32 (yardstick)."""
    model32, model64 = copy.deepcopy(lm), copy.deepcopy(lm).double()
    wrapper = PreferenceModel(lm, loss=loss, beta=beta, reduction=reduction, backend=backend, **loss_kw)
    value, metrics = wrapper(batch)
    value.backward()
    with torch.no_grad():
        logps = wrapper.sequence_logps(batch)
    references = []
    for model in (model32, model64):
        ref_value, ref_logps = reference_loss(model, batch, loss=loss, beta=beta, reduction=reduction, **loss_kw)
        ref_value.backward()
        references.append((ref_value, ref_logps, dict(model.named_parameters())))
    (value32, logps32, params32), (value64, logps64, params64) = references
    assert value.dtype == torch.float32 and logps.dtype == torch.float32
    assert_matches_reference("loss", value, value32, value64)
    assert_matches_reference("sequence_logps", logps, logps32, logps64)
    assert_matches_reference("metrics policy_logps", metrics["policy_logps"], logps32, logps64)
    for name, param in lm.named_parameters():
        if params64[name].grad is None:
            assert param.grad is None, f"{name}: a gradient where the reference has none"
            continue
        assert param.grad is not None, f"{name}: no gradient"
        assert_matches_reference(f"{name}.grad", param.grad, params32[name].grad, params64[name].grad)
    return wrapper, value, (value32, value64), (model32, model64)


# -- values and gradients against the model's own logits ----------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_epa_matches_model_logits(arch):
    """EPA with strong and weak negatives, ragged K, prompt positions ignored, 1-token responses; sum reduction."""
    batch = make_batch(num_weak=2)
    assert int((batch["groups"] == -1).sum()) > 0 and batch["num_strong"] == 3
    check_against_model_logits(tiny(arch), batch, loss="epa", beta=0.5, weak_weight=0.5)


@pytest.mark.parametrize("arch, loss, reduction, num_weak, scores", [
    ("llama", "dpo", "sum", 0, False),
    ("llama", "infonca", "sum", 1, True),
    ("qwen2", "nca", "sum", 1, True),
    ("llama", "simpo", "mean", 1, False),
    ("gemma2", "simpo", "mean", 0, False),
    ("granite", "dpo", "mean", 1, False),
])
def test_losses_and_reductions_match_model_logits(arch, loss, reduction, num_weak, scores):
    batch = make_batch(num_weak=num_weak, scores=scores, ref=loss != "simpo")
    assert (batch["scores"] is not None) == scores
    kwargs = {"margin": 0.3} if loss == "simpo" else {}
    check_against_model_logits(tiny(arch), batch, loss=loss, beta=0.7, reduction=reduction, **kwargs)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_every_backend_matches_model_logits(backend):
    """Gemma-2 (softcap) through each fused backend (triton runs interpreted on CPU)."""
    check_against_model_logits(tiny("gemma2"), make_batch(num_weak=1), loss="epa", beta=0.5, backend=backend)


@pytest.mark.parametrize("arch, mutation", [("llama", "targets shifted by one"), ("gemma2", "softcap dropped"),
                                            ("granite", "temperature dropped")])
def test_a_wrong_computation_does_not_match(arch, mutation):
    """The comparison can fail: a reference that scores each position against its own token instead of the next
    one, or a wrapper that forgets the model's logit transform, is caught."""
    lm = tiny(arch)
    batch = make_batch()
    wrapper = PreferenceModel(lm, loss="epa", beta=0.5, check_head=False)
    if mutation != "targets shifted by one":
        wrapper.transform = LogitTransform()
    shifted = mutation == "targets shifted by one"
    with torch.no_grad():
        value, _ = wrapper(batch)
        logps = wrapper.sequence_logps(batch)
        references = [reference_loss(model, batch, loss="epa", beta=0.5, reduction="sum", shifted=shifted)
                      for model in (lm, copy.deepcopy(lm).double())]
    (value32, logps32), (value64, logps64) = references
    with pytest.raises(AssertionError):
        assert_matches_reference("loss", value, value32, value64)
    with pytest.raises(AssertionError):
        assert_matches_reference("sequence_logps", logps, logps32, logps64)


# -- packing --------------------------------------------------------------------------------------------------------

FLEX_SKIP = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="flex_attention on CPU: torch 2.13 compiles it (15-30 s) and the compiled CPU kernel returned wrong values "
           "(NaN; |Δ| ≈ 1 vs sdpa) for rows shorter than its 128-token block, so the head probe refuses it")


@pytest.mark.parametrize("arch, attn, window", [
    ("llama", "sdpa", None),
    ("llama", "eager", None),
    ("qwen3", "sdpa", None),
    ("gpt_neox", "eager", None),
    ("mistral", "sdpa", 4),
    ("gemma2", "eager", 4),
    ("gemma3", "sdpa", 4),
    ("gemma3", "eager", 4),
    pytest.param("llama", "flex_attention", None, marks=FLEX_SKIP),
    pytest.param("gemma2", "flex_attention", 4, marks=FLEX_SKIP),
])
def test_packed_sequences_equal_each_sequence_alone(arch, attn, window):
    # fp64 on CPU so that any leak across sequences stands far above rounding (transformers' eager attention takes
    # its softmax in fp32 even so); the kernels then run the model cast to fp32.
    on_cuda = attn == "flex_attention"
    device, dtype = ("cuda", torch.float32) if on_cuda else ("cpu", torch.float64)
    tolerance = 1e-10 if attn == "sdpa" else 1e-5
    overrides = {"sliding_window": window} if arch == "mistral" else {}
    lm = tiny(arch, attn=attn, dtype=dtype, **overrides).to(device)
    assert lm.config._attn_implementation == attn
    wrapper = PreferenceModel(lm)
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in make_batch().items()}
    if window is not None:
        assert lm.config.sliding_window == window and batch["max_seqlen"] > 2 * window
    with torch.no_grad():
        packed = wrapper.hidden_states(batch)  # folded into rows (no varlen kernel here)
        one_row = wrapper.decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                                  use_cache=False).last_hidden_state[0]  # the packed mask over the whole row
        alone = torch.cat([wrapper.decoder(input_ids=ids, use_cache=False).last_hidden_state[0]
                           for ids, _ in sequences(batch)])
        # Positions that do not restart make one long sequence: the comparison must see the difference.
        leaky = wrapper.decoder(input_ids=batch["input_ids"], use_cache=False,
                                position_ids=torch.arange(packed.shape[0], device=device)[None]).last_hidden_state[0]
        lm.float()  # in place: the wrapper's decoder and head follow
        logps = wrapper.sequence_logps(batch)
        expected = reference_logps(lm, batch)
    scale = alone.abs().max().item()
    assert (packed - alone).abs().max().item() <= tolerance * scale, "packed sequences attend across each other"
    assert (one_row - alone).abs().max().item() <= tolerance * scale, "one packed row attends across sequences"
    assert (leaky - alone).abs().max().item() > 1e-2 * scale
    torch.testing.assert_close(logps, expected, rtol=1e-4, atol=1e-4)
    if window is not None:  # the window is active: a wide one changes sequences longer than 4 tokens
        wide = tiny(arch, attn=attn, dtype=dtype, sliding_window=64).to(device)
        with torch.no_grad():
            wide_alone = torch.cat([wide.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[0]
                                    for ids, _ in sequences(batch)])
        assert (wide_alone - alone).abs().max().item() > 1e-3 * scale


# -- head transforms and the probe -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_logit_transform_of_each_arch(arch):
    temperature, softcap = TRANSFORMS.get(arch, (1.0, None))
    transform = logit_transform(tiny_config(arch))
    assert transform.temperature == pytest.approx(temperature) and transform.softcap == softcap


def test_logit_transform_reads_nested_and_combined_fields():
    text = SimpleNamespace(final_logit_softcapping=30, logit_scale=0.25, logits_scaling=2.0)
    transform = logit_transform(SimpleNamespace(text_config=text))
    assert transform.temperature == pytest.approx(8.0) and transform.softcap == 30.0
    assert logit_transform(SimpleNamespace()) == logit_transform(SimpleNamespace(final_logit_softcapping=None))
    assert logit_transform(SimpleNamespace()).temperature == 1.0 and logit_transform(SimpleNamespace()).softcap is None


@pytest.mark.parametrize("field", ["final_logit_softcapping", "logit_scale", "logits_scaling"])
@pytest.mark.parametrize("value", [0, 0.0, -1.5, math.nan, math.inf, -math.inf, "2.0"])
def test_logit_transform_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        logit_transform(SimpleNamespace(**{field: value}))


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_and_head_and_probe_pass(arch):
    lm = tiny(arch)
    decoder, head = decoder_and_head(lm)
    assert head is lm.get_output_embeddings() and isinstance(head, nn.Linear)
    assert decoder is lm.get_decoder() and decoder is not lm
    if arch == "llama_tied":
        assert head.weight is decoder.get_input_embeddings().weight
    check_fused_head(PreferenceModel(lm, check_head=False))


def test_probe_refuses_logits_it_cannot_reproduce():
    lm = tiny("llama")

    class DoubledLogits(type(lm)):
        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            output.logits = output.logits * 2
            return output

    lm.__class__ = DoubledLogits
    with pytest.raises(ValueError, match="head"):
        PreferenceModel(lm)
    PreferenceModel(lm, check_head=False)  # the probe is skipped: the caller takes the responsibility
    with pytest.raises(ValueError, match="head"):
        PreferenceModel(tiny("llama", seed=SEED), ref_model=lm)  # the reference is probed too


def test_probe_refuses_a_transform_the_model_does_not_apply():
    lm = tiny("llama", final_logit_softcapping=2.0)  # Llama ignores the field; the wrapper would apply it
    assert logit_transform(lm.config).softcap == 2.0
    with pytest.raises(ValueError, match="softcap=2.0"):
        PreferenceModel(lm)


def test_refuses_a_head_that_is_not_linear():
    class ScaledHead(nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.linear = linear

        def forward(self, hidden):
            return self.linear(hidden) * 2

    lm = tiny("llama")
    lm.set_output_embeddings(ScaledHead(lm.get_output_embeddings()))
    with pytest.raises(ValueError, match="nn.Linear"):
        PreferenceModel(lm, check_head=False)


def test_refuses_a_model_without_a_decoder():
    class HeadOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, VOCAB)

        def get_output_embeddings(self):
            return self.head

    with pytest.raises(ValueError, match="decoder"):
        decoder_and_head(HeadOnly())


# -- the reference model --------------------------------------------------------------------------------------------


def test_reference_model_equals_precomputed_ref_logps():
    policy, ref_lm = tiny("llama"), tiny("llama", seed=SEED + 1)
    policy_copy = copy.deepcopy(policy)
    batch = make_batch(ref=False)
    wrapper = PreferenceModel(policy, ref_model=ref_lm, loss="epa", beta=0.5)
    assert isinstance(wrapper.ref_model, PreferenceModel) and wrapper.ref_model.model is ref_lm
    assert not ref_lm.training and not any(p.requires_grad for p in ref_lm.parameters())
    value, _ = wrapper(batch)
    value.backward()
    assert all(p.grad is None for p in ref_lm.parameters())
    assert all(p.grad is not None for p in policy.parameters())

    with torch.no_grad():
        precomputed = wrapper.ref_model.sequence_logps(batch)
        torch.testing.assert_close(precomputed, reference_logps(ref_lm, batch), rtol=1e-5, atol=1e-5)
    plain = PreferenceModel(policy_copy, loss="epa", beta=0.5)
    expected, _ = plain({**batch, "ref_logps": precomputed})
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)
    free, _ = plain(batch)  # reference-free: differs, so the reference was used
    assert abs(free.item() - value.item()) > 1e-3

    # A PreferenceModel as the reference; ref_logps in the batch take precedence over the reference model.
    wrapped = PreferenceModel(policy_copy, ref_model=PreferenceModel(ref_lm), loss="epa", beta=0.5)
    torch.testing.assert_close(wrapped(batch)[0], expected, rtol=1e-6, atol=1e-6)
    given = torch.full_like(precomputed, -30.0)
    torch.testing.assert_close(wrapped({**batch, "ref_logps": given})[0], plain({**batch, "ref_logps": given})[0])


def test_reference_model_reduces_like_the_policy():
    policy, ref_lm = tiny("llama"), tiny("llama", seed=SEED + 1)
    with pytest.raises(ValueError, match="reduction"):  # mean policy log-probs against sum reference ones
        PreferenceModel(policy, loss="dpo", reduction="mean", ref_model=PreferenceModel(ref_lm))
    with pytest.raises(ValueError, match="ignore_index"):
        PreferenceModel(policy, ignore_index=-1, ref_model=PreferenceModel(ref_lm))

    # A plain LM as the reference takes the policy's reduction and ignore_index.
    batch = make_batch(ref=False)
    batch["targets"] = batch["targets"].masked_fill(batch["targets"] == -100, -1)
    wrapper = PreferenceModel(policy, loss="dpo", reduction="mean", ignore_index=-1, ref_model=ref_lm)
    value, _ = wrapper(batch)
    with torch.no_grad():
        ref_logps = reference_logps(ref_lm, {**batch, "targets": batch["targets"].masked_fill(
            batch["targets"] == -1, -100)}, "mean")
    expected, _ = PreferenceModel(copy.deepcopy(policy), loss="dpo", reduction="mean", ignore_index=-1)(
        {**batch, "ref_logps": ref_logps})
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-5)


def test_parameters_and_state_dict_hold_the_policy_once():
    policy, ref_lm = tiny("llama_tied"), tiny("llama", seed=SEED + 1)
    wrapper = PreferenceModel(policy, ref_model=ref_lm)
    params = list(wrapper.parameters())
    assert len(params) == len({id(p) for p in params}) == len(list(policy.parameters()))
    assert {id(p) for p in params} == {id(p) for p in policy.parameters()}
    assert not {id(p) for p in params} & {id(p) for p in ref_lm.parameters()}
    keys = list(wrapper.state_dict().keys())
    assert len(keys) == len(set(keys))
    assert keys == [f"model.{key}" for key in policy.state_dict()], "decoder/head/ref_model registered again"
    assert [name for name, _ in wrapper.named_children()] == ["model"]
    wrapper.train()
    assert policy.training and not ref_lm.training, "train() must leave the reference in eval mode"


# -- dropout and tied weights -------------------------------------------------------------------------------------


def drop_fields(config):
    return {name: value for name, value in vars(config).items() if "drop" in name and isinstance(value, float)}


@pytest.mark.parametrize("arch", ARCHS)
def test_dropout_is_off_by_default(arch):
    """Every dropout probability of the config at 0.5 (Llama's is applied by the attention function, GPT-NeoX also has
    nn.Dropout modules): the policy in train mode computes the eval-mode loss, as the reference does; with
    disable_dropout=False two forwards differ."""
    fields = dict.fromkeys(drop_fields(tiny_config(arch)), 0.5)
    assert "attention_dropout" in fields
    batch = make_batch()
    wrapper = PreferenceModel(tiny(arch, **fields), loss="epa", beta=0.5).train()
    losses = [wrapper(batch)[0].item() for _ in range(2)]
    assert losses == [wrapper.eval()(batch)[0].item()] * 2
    assert set(drop_fields(wrapper.config).values()) == {0.0}

    kept = PreferenceModel(tiny(arch, **fields), loss="epa", beta=0.5, disable_dropout=False).train()
    assert kept(batch)[0].item() != kept(batch)[0].item()
    assert drop_fields(kept.config) == fields


def test_disable_dropout_reaches_modules_and_nested_configs():
    """Dropout modules of every kind, float "drop" attributes of any module, sub-configs; flags and counts stay."""
    from transformers import Gemma3Config

    lm = tiny("gpt_neox", hidden_dropout=0.5, attention_dropout=0.5)
    vision_language = nn.Module()  # a module holding a composite config, as a vision tower would
    vision_language.config = Gemma3Config(text_config={"attention_dropout": 0.4},
                                          vision_config={"attention_dropout": 0.3})
    lm.extra = nn.ModuleList([nn.Dropout2d(0.3), nn.AlphaDropout(0.2), nn.MultiheadAttention(8, 2, dropout=0.1),
                              vision_language])
    lm.config.token_dropout, lm.config.dropped_layers = True, 3
    assert disable_dropout(lm) is lm
    assert [m.p for m in lm.modules() if isinstance(m, (nn.Dropout, nn.Dropout2d, nn.AlphaDropout))] == [0.0] * 7
    assert lm.extra[2].dropout == 0.0 and lm.config.hidden_dropout == 0.0
    assert vision_language.config.text_config.attention_dropout == 0.0
    assert vision_language.config.vision_config.attention_dropout == 0.0
    assert lm.config.token_dropout is True and lm.config.dropped_layers == 3
    assert all(layer.attention.attention_dropout == 0.0 for layer in lm.gpt_neox.layers)


def test_tie_weights_reties_a_head_untied_by_loading():
    """A tied model moved to the meta device, or loaded with assign=True (both done by accelerate's FSDP2
    preparation), has a head weight of its own until tie_weights(); an untied model stays untied."""
    wrapper = PreferenceModel(tiny("llama_tied"))
    embedding = wrapper.model.get_input_embeddings()
    state = {key: value.clone() for key, value in wrapper.state_dict().items()}
    wrapper.load_state_dict(state, assign=True)
    assert wrapper.head.weight is not embedding.weight
    wrapper.tie_weights()
    assert wrapper.head is wrapper.model.lm_head and wrapper.head.weight is embedding.weight
    torch.testing.assert_close(embedding.weight, state["model.model.embed_tokens.weight"], rtol=0, atol=0)
    wrapper.to("meta")
    assert wrapper.head.weight is not embedding.weight
    wrapper.tie_weights()
    assert wrapper.head.weight is embedding.weight and wrapper.head.weight.is_meta

    untied = PreferenceModel(tiny("llama"))
    untied.tie_weights()
    assert untied.head.weight is not untied.model.get_input_embeddings().weight


# -- bf16 autocast ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_bf16_autocast_on_cpu(arch):
    lm = tiny(arch)
    reference_lm = copy.deepcopy(lm)
    batch = make_batch()
    expected, expected_metrics = PreferenceModel(reference_lm, loss="epa", beta=0.5)(batch)
    expected.backward()
    wrapper = PreferenceModel(lm, loss="epa", beta=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value, metrics = wrapper(batch)
    assert value.dtype == torch.float32 and math.isfinite(value.item())
    assert abs(value.item() - expected.item()) <= 0.05 * (1 + abs(expected.item()))
    torch.testing.assert_close(metrics["policy_logps"], expected_metrics["policy_logps"], rtol=5e-2, atol=0.5)
    value.backward()
    grads, expected_grads = [], []
    for (name, param), ref_param in zip(lm.named_parameters(), reference_lm.parameters(), strict=True):
        assert param.dtype == torch.float32 and param.grad is not None, f"{name}: no fp32 gradient"
        assert param.grad.dtype == torch.float32 and bool(torch.isfinite(param.grad).all()), name
        grads.append(param.grad.flatten())
        expected_grads.append(ref_param.grad.flatten())
    cosine = torch.nn.functional.cosine_similarity(torch.cat(grads), torch.cat(expected_grads), dim=0).item()
    assert cosine > 0.95, f"bf16 gradients point elsewhere (cosine {cosine:.3f})"


def test_disable_dropout_refuses_what_is_not_a_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        disable_dropout({"attention_dropout": 0.5})
