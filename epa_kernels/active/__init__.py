"""Active learning with virtual adversarial perturbations (VAPAL) and baselines (DESIGN §7).

    from epa_kernels.active import make_strategy
    picked = make_strategy("vapal").select(model, pool, k=100, labeled=labeled_indices, seed=0)

- `model`: how a classifier exposes its pooled representation and linear head (`classifier_parts`,
  `ClassifierParts`; custom models define `active_learning_parts()`).
- `pool`: pools of tokenized examples read in batches, each padded to its longest example.
- `vap`: per-example virtual adversarial perturbation vectors (`vap_embeddings`), numerically sound at ξ = 1e-6.
- `strategies`: `VAPAL`, `Random`, `Entropy`, `BADGE`, `BertKM` behind `Strategy.select`.
- `alps`: `ALPS`, k-means on surprisal embeddings from a masked LM (`surprisal_embeddings`); needs no classifier,
  so it can choose the first labelled set (a cold start).
- `registry`: every strategy by name (`STRATEGIES`, `make_strategy`).
- `lm`: VAP through an LM head with the fused kernel, to choose prompts for preference annotation
  (`lm_vap_embeddings`, `select_prompts`).

Needs scikit-learn and tqdm (and transformers for the recognised models), imported lazily where possible.
"""
from epa_kernels.active.alps import ALPS, surprisal_embeddings, surprisal_positions
from epa_kernels.active.lm import last_token_index, lm_vap_embeddings, prompt_hidden_states, select_prompts
from epa_kernels.active.model import ClassifierParts, classifier_parts, find_head
from epa_kernels.active.registry import STRATEGIES, make_strategy
from epa_kernels.active.strategies import (
    BADGE,
    VAPAL,
    BertKM,
    Entropy,
    Random,
    Strategy,
    VAPALDirection,
    badge_embeddings,
    kmeans_nearest_select,
    kmeans_pp_select,
)
from epa_kernels.active.vap import kl_divergence, pooled_vap, softmax_shift, vap_embeddings

__all__ = [
    "ALPS", "BADGE", "STRATEGIES", "VAPAL", "VAPALDirection", "BertKM", "ClassifierParts", "Entropy", "Random",
    "Strategy", "badge_embeddings", "classifier_parts", "find_head", "kl_divergence", "kmeans_nearest_select",
    "kmeans_pp_select", "last_token_index", "lm_vap_embeddings", "make_strategy", "pooled_vap",
    "prompt_hidden_states", "select_prompts", "softmax_shift", "surprisal_embeddings", "surprisal_positions",
    "vap_embeddings",
]
