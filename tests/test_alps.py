"""ALPS: surprisal embeddings against their definition (per-token MLM cross-entropy from the full logits, fp64),
the seeded positions, the strategy's contract with no classifier, and bad input."""
import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
transformers = pytest.importorskip("transformers")

from epa_kernels.active import ALPS, make_strategy, surprisal_embeddings, surprisal_positions  # noqa: E402
from tests.test_active import tiny_mlm, tiny_pool  # noqa: E402

SPECIAL = [0, 1, 2]  # the tiny pools draw ordinary tokens from 3..99; 0 is padding


def with_specials(pool):
    """The tiny pool with [CLS]=1 first and [SEP]=2 last in each row, as a BERT tokenizer writes them."""
    ids, mask = pool["input_ids"].clone(), pool["attention_mask"]
    lengths = mask.sum(1)
    ids[:, 0] = 1
    ids[torch.arange(len(ids)), lengths - 1] = 2
    return {**pool, "input_ids": ids * mask}


@pytest.fixture(scope="module")
def mlm():
    return tiny_mlm(seed=3)


@pytest.fixture(scope="module")
def pool():
    return with_specials(tiny_pool(n=30, length=12, seed=4))


def reference(mlm, pool, chosen, masked_with=None):
    """The definition: −log softmax(full logits)[own token] in fp64 at the chosen positions, 0 elsewhere."""
    ids = pool["input_ids"] if masked_with is None else pool["input_ids"].masked_fill(chosen, masked_with)
    with torch.no_grad():
        logits = mlm(input_ids=ids, attention_mask=pool["attention_mask"],
                     token_type_ids=pool["token_type_ids"]).logits.double()
    nll = -torch.log_softmax(logits, -1).gather(-1, pool["input_ids"][..., None])[..., 0]
    return torch.where(chosen, nll, torch.zeros_like(nll))


def chosen_of(pool, fraction=0.15, seed=0):
    rows = np.arange(len(pool["input_ids"]))
    return surprisal_positions(pool["input_ids"], pool["attention_mask"], rows, special_token_ids=SPECIAL,
                               fraction=fraction, seed=seed)


def test_embedding_is_the_per_token_loss_at_the_chosen_positions(mlm, pool):
    chosen = chosen_of(pool, fraction=0.5)
    assert chosen.any() and not chosen.all()
    got = surprisal_embeddings(mlm, pool, special_token_ids=SPECIAL, fraction=0.5, batch_size=7, progress=False)
    assert got.shape == pool["input_ids"].shape and got.dtype == torch.float32
    assert torch.equal(got != 0, chosen)  # a cross-entropy over 100 tokens is never exactly 0
    torch.testing.assert_close(got.double(), reference(mlm, pool, chosen), rtol=1e-5, atol=1e-5)


def test_masked_input_option(mlm, pool):
    chosen = chosen_of(pool, fraction=0.3)
    got = surprisal_embeddings(mlm, pool, special_token_ids=SPECIAL, fraction=0.3, mask_token_id=99,
                               progress=False)
    torch.testing.assert_close(got.double(), reference(mlm, pool, chosen, masked_with=99), rtol=1e-5, atol=1e-5)
    unmasked = surprisal_embeddings(mlm, pool, special_token_ids=SPECIAL, fraction=0.3, progress=False)
    assert not torch.allclose(got, unmasked)


def test_full_logits_path_matches_the_head_at_chosen_positions(mlm, pool):
    """An MLM without a recognised `cls` / `lm_head` is scored from its full logits: same numbers."""

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)

    fast = surprisal_embeddings(mlm, pool, special_token_ids=SPECIAL, progress=False)
    # .eval(): restoring a training-mode wrapper afterwards would switch the shared mlm to training mode too
    full = surprisal_embeddings(Wrapped(mlm).eval(), pool, special_token_ids=SPECIAL, progress=False)
    torch.testing.assert_close(full, fast, rtol=1e-5, atol=1e-5)


def test_vocabulary_projection_stays_fp32_under_autocast(mlm, pool):
    """bf16 autocast speeds up the encoder only: the head sees fp32 hidden states and returns fp32 logits."""
    from epa_kernels.active.alps import _logits_at

    chosen = chosen_of(pool, fraction=0.5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = _logits_at(mlm, pool, chosen)
        hidden = mlm.bert(**pool)[0][chosen]
        assert mlm.cls(hidden).dtype == torch.bfloat16  # what the head would give inside autocast
    assert logits.dtype == torch.float32
    with torch.no_grad():
        expected = mlm.cls(hidden.float())
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)


def test_positions_skip_special_and_padding_and_match_the_fraction():
    pool = with_specials(tiny_pool(n=400, length=16, seed=5))
    chosen = chosen_of(pool, fraction=0.15, seed=11)
    ids, mask = pool["input_ids"], pool["attention_mask"].bool()
    assert not chosen[~mask].any()
    assert not chosen[torch.isin(ids, torch.tensor(SPECIAL))].any()
    eligible = mask & ~torch.isin(ids, torch.tensor(SPECIAL))
    rate = chosen.sum().item() / eligible.sum().item()
    # ~3,800 eligible positions: the binomial's 5-sigma band around 0.15 is about ±0.029
    assert abs(rate - 0.15) < 0.03, rate


def test_positions_depend_on_the_seed_and_row_only(mlm, pool):
    """Not on the batch, its padding or which rows are asked for: a row's embedding is the same every round."""
    whole = surprisal_embeddings(mlm, pool, special_token_ids=SPECIAL, seed=4, batch_size=30, progress=False)
    rows = np.array([17, 3, 25, 8])
    subset = surprisal_embeddings(mlm, pool, rows, special_token_ids=SPECIAL, seed=4, batch_size=3, progress=False)
    torch.testing.assert_close(subset, whole[rows], rtol=1e-5, atol=1e-6)
    other = surprisal_embeddings(mlm, pool, special_token_ids=SPECIAL, seed=5, progress=False)
    assert not torch.equal(other != 0, whole != 0)


def test_alps_contract_without_a_classifier(mlm, pool):
    alps = ALPS(mlm=mlm, special_token_ids=SPECIAL, progress=False)
    labeled = {0, 4, 9}
    picked = alps.select(None, pool, 8, labeled=labeled, batch_size=16, seed=2)
    assert len(picked) == 8 and len(set(picked)) == 8
    assert all(isinstance(i, int) and 0 <= i < 30 and i not in labeled for i in picked)
    assert picked == ALPS(mlm=mlm, special_token_ids=SPECIAL, progress=False).select(
        None, pool, 8, labeled=labeled, batch_size=5, seed=2)
    cold = alps.select(None, pool, 10, seed=0)  # a cold start: nothing labeled yet
    assert len(set(cold)) == 10
    assert sorted(alps.select(None, pool, 27, labeled=labeled, seed=1)) == sorted(set(range(30)) - labeled)


def test_alps_picks_the_example_nearest_each_centre(mlm, pool):
    """With k = 1 the single k-means centre is the mean of the normalised embeddings: the pick is the unlabeled
    row nearest to it."""
    alps = ALPS(mlm=mlm, special_token_ids=SPECIAL, progress=False)
    labeled = [1, 2]
    vectors = torch.nn.functional.normalize(alps.embeddings(pool), dim=1).double()
    unlabeled = np.setdiff1d(np.arange(30), labeled)
    centre = vectors[unlabeled].mean(0)
    expected = int(unlabeled[torch.argmin(((vectors[unlabeled] - centre) ** 2).sum(1))])
    assert alps.select(None, pool, 1, labeled=labeled, seed=0) == [expected]


def test_alps_reuses_the_pools_embeddings(mlm, pool, monkeypatch):
    import epa_kernels.active.alps as module

    calls = []
    real = module.surprisal_embeddings
    monkeypatch.setattr(module, "surprisal_embeddings", lambda *a, **k: calls.append(1) or real(*a, **k))
    alps = ALPS(mlm=mlm, special_token_ids=SPECIAL, progress=False)
    alps.select(None, pool, 3, seed=0)
    alps.select(None, pool, 3, labeled=[0, 1], seed=1)
    assert len(calls) == 1
    alps.select(None, {**pool, "input_ids": pool["input_ids"].flip(0)}, 3, seed=0)  # another pool
    assert len(calls) == 2


def test_alps_special_tokens_from_a_tokenizer_or_the_config(mlm):
    class Tok:
        all_special_ids = [2, 1, 0, 99]
        mask_token_id = 99

    alps = ALPS(mlm=mlm, tokenizer=Tok(), mask=True, progress=False)
    assert alps.special_token_ids == [0, 1, 2, 99] and alps.mask_token_id == 99
    assert ALPS(mlm=mlm, progress=False).special_token_ids == [0]  # the tiny config names only padding


def test_alps_bad_input(mlm, pool):
    with pytest.raises(ValueError, match="ALPS needs mlm="):
        make_strategy("alps")
    with pytest.raises(TypeError, match="mlm must be a torch.nn.Module"):
        ALPS(mlm="bert-base-uncased")
    with pytest.raises(ValueError, match="fraction"):
        ALPS(mlm=mlm, fraction=0.0)
    with pytest.raises(ValueError, match="fraction"):
        ALPS(mlm=mlm, fraction=1.5)
    with pytest.raises(ValueError, match="mask=True needs the mask token"):
        ALPS(mlm=mlm, mask=True)
    rows = np.arange(30)
    with pytest.raises(ValueError, match="rows has 29 entries for a batch of 30"):
        surprisal_positions(pool["input_ids"], pool["attention_mask"], rows[:29], special_token_ids=SPECIAL)
    with pytest.raises(ValueError, match="special_token_ids must be"):
        surprisal_positions(pool["input_ids"], pool["attention_mask"], rows, special_token_ids=None)
    with pytest.raises(ValueError, match="fraction"):
        surprisal_positions(pool["input_ids"], pool["attention_mask"], rows, special_token_ids=SPECIAL, fraction=-3)
    with pytest.raises(ValueError, match="mask_token_id must be a token id"):
        surprisal_embeddings(mlm, pool, special_token_ids=SPECIAL, mask_token_id=-1, progress=False)
    with pytest.raises(ValueError, match="indices must be pool rows"):
        surprisal_embeddings(mlm, pool, [0, 30], special_token_ids=SPECIAL, progress=False)
    with pytest.raises(ValueError, match="k=31 exceeds"):
        ALPS(mlm=mlm, special_token_ids=SPECIAL, progress=False).select(None, pool, 31)
