"""A transformers causal LM as a preference-loss module: packed batch in, (loss, metrics) out, no logits (DESIGN §9).

`PreferenceModel(model).forward(batch)` runs the decoder to its final hidden states and feeds them, with the LM
head's weight, straight into `fused_linear_preference_loss`. The model's own logit transforms are applied
(Gemma's final-logit softcapping → `softcap`; Cohere's `logit_scale` and Granite's `logits_scaling` →
`temperature`), and a one-time probe checks on a few tokens that hidden · Wᵀ with those transforms reproduces the
model's own logits exactly, so a head this module cannot reproduce is refused instead of trained wrongly.
Everything happens inside `forward`, so DDP and FSDP hooks (all-gathers, gradient reduction) fire as usual.
`disable_dropout(model)` switches all of a model's dropout off, as the policy must train (TRL's `disable_dropout`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from epa_kernels._validation import check_choice
from epa_kernels.fused_loss import SEQUENCE_REDUCTIONS, fused_linear_preference_loss
from epa_kernels.logprobs import linear_logprobs
from epa_kernels.losses import LOSSES
from epa_kernels.transformers.adapters import adapters_disabled, head_parameters, is_peft_model
from epa_kernels.transformers.prefix_sharing import prefix_attention
from epa_kernels.transformers.rows import fold_into_rows

# Probe tolerance: max |ours − model's logits| / (max |logits| + 1), per dtype of the model.
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@dataclass(frozen=True)
class LogitTransform:
    """z = softcap((hidden · Wᵀ + b) / temperature), read from a transformers config."""

    temperature: float = 1.0
    softcap: float | None = None


def logit_transform(config) -> LogitTransform:
    """The logit transforms a transformers config declares; a value the kernel cannot express is a ValueError."""
    config = getattr(config, "text_config", None) or config
    temperature = 1.0
    scale = getattr(config, "logit_scale", None)  # Cohere: logits * logit_scale
    if scale is not None:
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"config.logit_scale={scale!r}: only a positive finite scale can become a temperature")
        temperature /= float(scale)
    scaling = getattr(config, "logits_scaling", None)  # Granite: logits / logits_scaling
    if scaling is not None:
        if not (isinstance(scaling, (int, float)) and math.isfinite(scaling) and scaling > 0):
            raise ValueError(f"config.logits_scaling={scaling!r}: only a positive finite scaling is supported")
        temperature *= float(scaling)
    softcap = getattr(config, "final_logit_softcapping", None)  # Gemma-2/3: cap · tanh(logits / cap)
    if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"config.final_logit_softcapping={softcap!r}: must be a positive finite number or None")
    return LogitTransform(temperature, None if softcap is None else float(softcap))


def decoder_and_head(model) -> tuple[nn.Module, nn.Module]:
    """The decoder stack (input ids → final hidden states) and the LM head of a transformers causal LM (a peft
    model's too: its decoder runs the adapters; the head is an nn.Linear or one wrapped by peft)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Module):
        raise ValueError(f"{type(model).__name__}: it has no LM head (get_output_embeddings() gave "
                         f"{type(head).__name__})")
    try:
        head_parameters(head)
    except ValueError as error:
        raise ValueError(f"{type(model).__name__}: {error}") from None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        decoder = getattr(model, "base_model", None)
    if decoder is None or decoder is model:
        raise ValueError(f"{type(model).__name__}: cannot find its decoder (get_decoder() / base_model)")
    return decoder, head


DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Switch off all of the model's dropout, in place, and return it: TRL's `disable_dropout`, completed.

    p = 0 on every `nn.Dropout*` module, and 0.0 for every float attribute whose name holds "drop" on every module
    and on the model's configs (with their sub-configs): transformers attention modules keep
    `self.attention_dropout` and pass it to the attention function, which applies it in train mode without any
    dropout module; some models read `config.dropout` or `config.layerdrop` in forward.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    configs, seen = [], set()
    for module in model.modules():
        if isinstance(module, DROPOUT_MODULES):
            module.p = 0.0
        _zero_drop_fields(module)
        configs.append(getattr(module, "config", None))
    while configs:
        config = configs.pop()
        if hasattr(config, "__dict__") and id(config) not in seen:
            seen.add(id(config))
            _zero_drop_fields(config)
            configs.extend(getattr(config, name, None) for name in getattr(config, "sub_configs", {}))
    return model


def _zero_drop_fields(obj) -> None:
    for name, value in list(vars(obj).items()):
        if "drop" in name and isinstance(value, float):  # floats only: not flags (token_dropout) nor counts
            setattr(obj, name, 0.0)


_disable_dropout = disable_dropout  # PreferenceModel's flag of the same name shadows the function


class PreferenceModel(nn.Module):
    """Wraps a transformers causal LM for preference training with the fused loss.

    forward(batch) → (loss, metrics). batch (see `epa_kernels.transformers.collate`): input_ids [1, N],
    position_ids [1, N] restarting at 0 per sequence, cu_seqlens [S+1], targets [N] (next token at response
    positions, ignore_index elsewhere), groups [P, G], num_strong, and optionally ref_logps [S], scores [P, G].
    loss / beta / **loss_kw are those of `preference_loss`; reduction "sum" (default) or "mean" (SimPO).
    ref_model: a frozen reference `PreferenceModel` (or causal LM) run under no_grad when the batch has no
    ref_logps; its own head and transforms are used. ref_adapters_off: `model` is a peft model and its reference
    is the same model with the adapters disabled (TRL's reference under a peft_config: no second model).
    check_head: verify on 8 tokens that the fused head reproduces the model's own logits. disable_dropout
    (default True): `disable_dropout(model)` at construction, so that the policy in train mode computes what the
    reference computes in eval mode; with the model's dropout the implicit rewards would be noisy and biased.
    False keeps it.
    """

    def __init__(self, model, *, loss: str = "epa", beta: float = 0.1, reduction: str | None = None,
                 ref_model=None, backend: str = "auto", ignore_index: int = -100, check_head: bool = True,
                 disable_dropout: bool = True, ref_adapters_off: bool = False, **loss_kw):
        super().__init__()
        if ref_adapters_off and (ref_model is not None or not is_peft_model(model)):
            raise ValueError("ref_adapters_off needs a peft model and no ref_model (the reference is the model "
                             "with its adapters disabled)")
        check_choice("loss", loss, LOSSES)
        reduction = reduction or ("mean" if loss == "simpo" else "sum")
        check_choice("reduction", reduction, SEQUENCE_REDUCTIONS)
        if disable_dropout:
            _disable_dropout(model)
        self.model = model
        decoder, head = decoder_and_head(model)
        # Plain attributes (they live inside self.model): registering them again would list their weights twice
        # in state_dict() and checkpoints.
        self.__dict__.update(decoder=decoder, head=head)
        self.transform = logit_transform(model.config)
        self.loss_options = dict(loss=loss, beta=beta, reduction=reduction, backend=backend,
                                 ignore_index=ignore_index, **loss_kw)
        if ref_model is not None and not isinstance(ref_model, PreferenceModel):
            ref_model = PreferenceModel(ref_model, reduction=reduction, backend=backend, ignore_index=ignore_index,
                                        check_head=check_head)
        if ref_model is not None:
            for option in ("reduction", "ignore_index"):  # else rewards would mix, e.g., mean and sum log-probs
                if ref_model.loss_options[option] != self.loss_options[option]:
                    raise ValueError(f"ref_model has {option}={ref_model.loss_options[option]!r} but the policy "
                                     f"{option}={self.loss_options[option]!r}: they must match")
            ref_model.requires_grad_(False).eval()
        # A plain attribute, not a submodule: the reference's weights stay out of parameters(), the optimizer,
        # DDP/FSDP wrapping and the policy's state dict.
        self.__dict__["ref_model"] = ref_model
        self.ref_adapters_off = ref_adapters_off
        if check_head:
            check_fused_head(self)

    @property
    def config(self):
        return self.model.config

    @property
    def _no_split_modules(self):
        """The model's decoder-layer classes: accelerate's FSDP2 auto-wrap shards them one by one."""
        return getattr(self.model, "_no_split_modules", None)

    def tie_weights(self):
        """Re-tie the model's tied weights (LM head ↔ input embeddings). accelerate's FSDP2 preparation moves the
        model to the meta device and loads the full state dict with assign=True, either of which unties them, then
        calls `tie_weights()` on what it prepares: this wrapper. The reference is no submodule: it is not prepared."""
        if hasattr(self.model, "tie_weights"):
            self.model.tie_weights()

    @property
    def attn_implementation(self) -> str:
        return str(getattr(self.model.config, "_attn_implementation", None) or "eager")

    @property
    def varlen_attention(self) -> bool:
        """flash-attn kernels attend within each packed sequence at no cost for the row's length."""
        return "flash" in self.attn_implementation

    def hidden_states(self, batch) -> torch.Tensor:
        """Final hidden states [N, D] of the packed row; attention stays inside each sequence.

        A prefix-shared batch (with branch_ids) gets its mask from `prefix_attention`. Otherwise, with no
        attention mask and restarting position_ids, transformers builds the packed (document-causal)
        mask for sdpa, eager and flex_attention, and flash-attn runs varlen from the positions. Without flash-attn
        the sequences are first folded into rows as long as the longest one (`fold_into_rows`): a dense mask over
        one row of N tokens would cost N² in attention.
        """
        input_ids, position_ids, mask, token_index = batch["input_ids"], batch["position_ids"], None, None
        cu_seqlens = batch.get("cu_seqlens")
        if batch.get("branch_ids") is not None:  # prefix-shared segments: an explicit mask
            attention = prefix_attention(batch, self.model.config, self.model.get_input_embeddings().weight.dtype)
            input_ids, position_ids = attention.input_ids, attention.position_ids
            mask, token_index = attention.attention_mask, attention.token_index
        elif cu_seqlens is not None and cu_seqlens.numel() > 2 and not self.varlen_attention:
            layout = fold_into_rows(cu_seqlens)
            input_ids = input_ids.reshape(-1)[layout.input_index.clamp(min=0)]
            position_ids, token_index = layout.position_ids, layout.token_index
        output = self.decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=False)
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        return hidden if token_index is None else hidden[token_index]

    def _head_tensors(self, hidden):
        """(hidden, weight, bias) in one dtype: under autocast the autocast dtype, as nn.Linear would run in."""
        weight, bias = head_parameters(self.head)
        device_type = hidden.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype = weight.dtype
        return tuple(t if t is None or t.dtype == dtype else t.to(dtype) for t in (hidden, weight, bias))

    def sequence_logps(self, batch) -> torch.Tensor:
        """Per-sequence log-probs [S] (fp32) of the batch's targets; differentiable unless under no_grad."""
        hidden, weight, bias = self._head_tensors(self.hidden_states(batch))
        return linear_logprobs(hidden, weight, batch["targets"], bias, cu_seqlens=batch["cu_seqlens"],
                               ignore_index=self.loss_options["ignore_index"],
                               reduction=self.loss_options["reduction"], temperature=self.transform.temperature,
                               softcap=self.transform.softcap, backend=self.loss_options["backend"])

    def reference_logps(self, batch) -> torch.Tensor | None:
        """ref_logps [S]: from the batch (precomputed), else from the reference model (or this model with its
        adapters off), else None (reference-free)."""
        if batch.get("ref_logps") is not None:
            return batch["ref_logps"]
        if self.ref_adapters_off:
            was_training = self.model.training
            self.model.eval()  # as a separate reference runs: no dropout, whatever the policy keeps
            try:
                with torch.no_grad(), adapters_disabled(self.model):
                    return self.sequence_logps(batch)
            finally:
                self.model.train(was_training)
        if self.ref_model is None:
            return None
        with torch.no_grad():
            return self.ref_model.sequence_logps(batch)

    def forward(self, batch):
        """(loss, metrics): the group preference loss of the packed batch, computed without logits."""
        hidden, weight, bias = self._head_tensors(self.hidden_states(batch))
        options = dict(self.loss_options)
        extra = {key: batch[key] for key in ("scores", "weights") if batch.get(key) is not None}
        return fused_linear_preference_loss(
            hidden, weight, batch["targets"], batch["groups"], bias=bias, cu_seqlens=batch["cu_seqlens"],
            ref_logps=self.reference_logps(batch), temperature=self.transform.temperature,
            softcap=self.transform.softcap, num_strong=batch["num_strong"], **options, **extra,
        )


@torch.no_grad()
def check_fused_head(wrapper: PreferenceModel, num_tokens: int = 8) -> None:
    """Refuse a model whose logits are not softcap((hidden · Wᵀ + b) / temperature), compared with its own forward
    on a probe of `num_tokens` tokens."""
    model = wrapper.model
    was_training = model.training
    model.eval()
    try:
        weight, bias = head_parameters(wrapper.head)
        device, vocab = weight.device, weight.shape[0]
        ids = (torch.arange(num_tokens, device=device) * 7919 + 11).remainder(vocab).unsqueeze(0)
        positions = torch.arange(num_tokens, device=device).unsqueeze(0)
        expected = model(input_ids=ids, position_ids=positions, use_cache=False).logits[0].double()
        hidden = wrapper.hidden_states({"input_ids": ids, "position_ids": positions})
        logits = torch.nn.functional.linear(hidden, weight, bias).double()
        logits = logits / wrapper.transform.temperature
        if wrapper.transform.softcap is not None:
            logits = wrapper.transform.softcap * torch.tanh(logits / wrapper.transform.softcap)
    finally:
        model.train(was_training)
    error = (logits - expected).abs().max().item() / (expected.abs().max().item() + 1.0)
    tolerance = PROBE_TOLERANCE.get(weight.dtype, 2e-2)
    if not error <= tolerance:
        raise ValueError(
            f"{type(model).__name__}: its logits are not softcap((hidden · Wᵀ + b) / temperature) with "
            f"temperature={wrapper.transform.temperature}, softcap={wrapper.transform.softcap} (relative error "
            f"{error:.2e} > {tolerance:.0e} on a probe): the head does something the fused kernel cannot reproduce"
        )
