"""How a classifier exposes what active learning needs: its pooled representation and its linear head.

Everything in `epa_kernels.active` sees a model through `ClassifierParts`:

    logits = encode(batch) · head_weightᵀ + head_bias        pooled [b, H], head_weight [C, H]

`classifier_parts(model)` builds it for transformers sequence classifiers, recognised by their head:

- `model.classifier.out_proj` (nn.Linear) — RoBERTa / XLM-R / ELECTRA style: the head is `out_proj`; `encode`
  includes `classifier.dense` + tanh (and the dropouts, identity in eval mode);
- `model.classifier` (nn.Linear) — BERT style (pooler output + dropout) and DistilBERT (`pre_classifier` +
  ReLU + dropout are part of `encode`).

`encode` runs the model's own forward and captures the head's input with a forward pre-hook, so the pooled
representation is exactly what the model feeds its head (whatever pooling the architecture does).

Any other model can take part by defining a method `active_learning_parts(self) -> ClassifierParts`; it is
used before any recognition. Example for a custom mean-pooling classifier:

    def active_learning_parts(self):
        def encode(batch):
            states = self.encoder(batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
            return (states * mask).sum(1) / mask.sum(1).clamp(min=1)
        return ClassifierParts(encode, self.head.weight, self.head.bias)

`embed` / `encode_from_embeddings` are optional: only the token-embeddings VAP point needs them.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# The batch keys passed to a model; anything else in a pool (labels, text) is ignored.
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def autocast_off(fn):
    """Run `fn` with autocast disabled (CPU, and CUDA when present).

    The head and VAP math is written in fp32 on purpose (softmax differences at ξ = 1e-6, KL values that rank
    examples); a caller's bf16 autocast (e.g. a training loop that wraps selection for encoder speed) would
    otherwise turn its matmuls into bf16. The encoder forward is outside, so it still autocasts.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.autocast("cpu", enabled=False))
            if torch.cuda.is_available():
                stack.enter_context(torch.autocast("cuda", enabled=False))
            return fn(*args, **kwargs)

    return wrapper


@dataclass(frozen=True)
class ClassifierParts:
    """A classifier as active learning sees it.

    encode(batch) → pooled [b, H]: the representation the linear head is applied to (batch: dict of tensors
    `input_ids`, `attention_mask`, optional `token_type_ids`, on the model's device).
    head_weight [C, H], head_bias [C] | None: logits = pooled · head_weightᵀ + head_bias.
    embed(batch) → token embeddings [b, T, E] and encode_from_embeddings(embeddings, batch) → pooled [b, H]:
    optional, for VAP at the token embeddings (`point="embeddings"`); encode_from_embeddings must be
    differentiable w.r.t. the embeddings.
    """

    encode: Callable[[dict], torch.Tensor]
    head_weight: torch.Tensor
    head_bias: torch.Tensor | None
    embed: Callable[[dict], torch.Tensor] | None = None
    encode_from_embeddings: Callable[[torch.Tensor, dict], torch.Tensor] | None = None

    @autocast_off
    def logits(self, pooled: torch.Tensor) -> torch.Tensor:
        """fp32 logits [b, C] of pooled representations [b, H] (fp32 even inside a bf16 autocast)."""
        weight = self.head_weight.float()
        logits = pooled.float() @ weight.t()
        return logits if self.head_bias is None else logits + self.head_bias.float()


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """The model in eval mode (dropout off) for the duration; its training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def find_head(model: nn.Module) -> nn.Linear | None:
    """The linear head of a recognised transformers classifier (`classifier.out_proj`, else `classifier`), or None.

    Whatever feeds it (RoBERTa's `classifier.dense`, DistilBERT's `pre_classifier`) is part of `encode`.
    """
    classifier = getattr(model, "classifier", None)
    out_proj = getattr(classifier, "out_proj", None)
    if isinstance(out_proj, nn.Linear):
        return out_proj
    if isinstance(classifier, nn.Linear):
        return classifier
    return None


def _accepted_keys(model: nn.Module) -> tuple[str, ...]:
    """The MODEL_INPUT_KEYS the model's forward takes (DistilBERT has no token_type_ids)."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return MODEL_INPUT_KEYS
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return MODEL_INPUT_KEYS
    return tuple(key for key in MODEL_INPUT_KEYS if key in parameters)


def _captured_head_input(model: nn.Module, head: nn.Linear, **inputs) -> torch.Tensor:
    """Run the model and return what its head received (the pooled representation)."""
    captured = []
    handle = head.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        model(**inputs)
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"{type(model).__name__}'s forward never called its head {type(head).__name__}")
    pooled = captured[-1]
    if pooled.dim() != 2:
        raise ValueError(
            f"{type(model).__name__}'s head receives a {pooled.dim()}-D input {tuple(pooled.shape)}; a pooled "
            "[batch, hidden] representation is expected (define active_learning_parts() for this model)"
        )
    return pooled


def classifier_parts(model: nn.Module) -> ClassifierParts:
    """`ClassifierParts` of a model: its own `active_learning_parts()`, or a recognised transformers classifier.

    Raises TypeError for a non-module and ValueError("model has no reachable head: …") when nothing is found.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    own = getattr(model, "active_learning_parts", None)
    if callable(own):
        parts = own()
        if not isinstance(parts, ClassifierParts):
            raise TypeError(
                f"{type(model).__name__}.active_learning_parts() must return ClassifierParts, "
                f"got {type(parts).__name__}"
            )
        return parts
    head = find_head(model)
    if head is None:
        raise ValueError(
            f"model has no reachable head: {type(model).__name__} has no active_learning_parts() method, no "
            "`classifier.out_proj` nn.Linear (RoBERTa/XLM-R style) and no `classifier` nn.Linear (BERT/DistilBERT "
            "style); define active_learning_parts() returning ClassifierParts"
        )
    keys = _accepted_keys(model)

    def model_inputs(batch):
        return {key: batch[key] for key in keys if key in batch and key != "input_ids"}

    def encode(batch):
        return _captured_head_input(model, head, input_ids=batch["input_ids"], **model_inputs(batch))

    embed = encode_from_embeddings = None
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:

        def embed(batch):
            return embeddings(batch["input_ids"])

        def encode_from_embeddings(inputs_embeds, batch):
            return _captured_head_input(model, head, inputs_embeds=inputs_embeds, **model_inputs(batch))

    return ClassifierParts(encode, head.weight, head.bias, embed, encode_from_embeddings)
