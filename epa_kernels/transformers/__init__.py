"""Training integration for transformers causal LMs (DESIGN §9): the pieces any loop needs.

- `PreferenceModel`: a causal LM whose forward(batch) returns the fused preference loss, never logits;
  `disable_dropout`: all of a model's dropout off, as the policy trains;
- `adapters_disabled`, `head_parameters`: PEFT (LoRA) models under the fused head, their reference without a copy;
- `read_preference_rows`, `PreferenceTokenizer`: TRL-format preference data → tokenized examples;
- `BatchPlanner`: token-budget steps, seeded weak negatives, the packed batch layout;
- `ReferenceCache`, `fill_reference_cache`: reference log-probs computed once and kept on disk;
- `linearity_report`: the EPA paper's linearity test of implicit against gold rewards.
"""
from epa_kernels.transformers.adapters import adapters_disabled, head_parameters, is_peft_model
from epa_kernels.transformers.batching import BatchPlanner, PlannedPrompt, PlannedStep, pack_sequences
from epa_kernels.transformers.data import (
    DataStats,
    PreferenceDataError,
    PreferenceExample,
    PreferenceTokenizer,
)
from epa_kernels.transformers.linearity import LinearityReport, linearity_report, win_rate
from epa_kernels.transformers.model import LogitTransform, PreferenceModel, disable_dropout, logit_transform
from epa_kernels.transformers.reading import read_preference_rows
from epa_kernels.transformers.reference_cache import (
    ReferenceCache,
    data_fingerprint,
    fill_reference_cache,
    model_fingerprint,
)

__all__ = [
    "BatchPlanner", "DataStats", "LinearityReport", "LogitTransform", "PlannedPrompt", "PlannedStep",
    "PreferenceDataError", "PreferenceExample", "PreferenceModel", "PreferenceTokenizer", "ReferenceCache",
    "adapters_disabled", "data_fingerprint", "disable_dropout", "fill_reference_cache", "head_parameters",
    "is_peft_model", "linearity_report", "logit_transform", "model_fingerprint", "pack_sequences",
    "read_preference_rows", "win_rate",
]
