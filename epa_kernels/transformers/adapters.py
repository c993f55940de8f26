"""PEFT adapters under the fused head: the LM head's weight as its forward applies it, and the adapters switched off.

A `peft.get_peft_model(...)` model goes into `PreferenceModel` as it is: its decoder runs the LoRA layers, and
the fused kernel needs only the head's (weight, bias). `head_parameters` reads them from whatever the head is:
- a plain `nn.Linear` (the usual case: `all-linear` leaves the output layer out), frozen, so the fused backward
  skips the weight gradient (three GEMMs instead of four);
- PEFT's `modules_to_save` wrapper: the trainable copy, or the original while the adapters are off;
- a LoRA layer on the head: W + Σ scaling·B·A, formed once per forward and differentiable in A and B (a [V, D]
  tensor, the size of W; the [N, V] logits are still never formed).

`adapters_disabled(model)` is the reference of an adapter run: the same weights with every adapter off, so no second
model is held (TRL's reference under a `peft_config`).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


def is_peft_model(model) -> bool:
    """True for a `peft.PeftModel` (checked by duck type: peft stays an optional dependency)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def head_parameters(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight [V, D], bias [V] or None) of an LM head, as its forward would apply them now.

    A ValueError names what cannot become one weight (LoRA dropout on the head in train mode, DoRA, LoRA bias).
    """
    if isinstance(head, nn.Linear):
        return head.weight, head.bias
    if hasattr(head, "modules_to_save") and hasattr(head, "original_module"):  # peft's ModulesToSaveWrapper
        active = [name for name in head.active_adapters if name in head.modules_to_save]
        inner = head.original_module if head.disable_adapters or not active else head.modules_to_save[active[0]]
        return head_parameters(inner)
    if hasattr(head, "get_base_layer") and hasattr(head, "get_delta_weight"):  # a peft LoRA layer
        weight, bias = head_parameters(head.get_base_layer())
        if head.disable_adapters or head.merged:
            return weight, bias
        for name in head.active_adapters:
            if name not in head.lora_A:
                continue
            if name in getattr(head, "lora_variant", {}) or getattr(head, "lora_bias", {}).get(name):
                raise ValueError(f"LM head adapter {name!r}: DoRA and LoRA bias on the head cannot go through the "
                                 "fused kernel; target the head with plain LoRA or leave it out")
            dropout = head.lora_dropout[name]
            if head.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
                raise ValueError(f"LM head adapter {name!r} has lora_dropout={dropout.p}: dropout on the head's "
                                 "input cannot become one weight; use lora_dropout 0 or leave the head out")
            weight = weight + head.get_delta_weight(name).to(weight.dtype)
        return weight, bias
    raise ValueError(f"the LM head must be an nn.Linear, or one wrapped by peft (LoRA, modules_to_save); got "
                     f"{type(head).__name__}: quantized or custom heads cannot go through the fused kernel")


@contextlib.contextmanager
def adapters_disabled(model):
    """Run `model` with every adapter off inside the block (the base model's function); a PEFT model only."""
    if not is_peft_model(model):
        raise ValueError(f"{type(model).__name__} is not a peft model: it has no adapters to disable")
    with model.disable_adapter():
        yield model

