"""Native CPU backend of the fused LM-head log-prob op: a thin launcher for the C++ extension `epa_kernels._C`.

Same `forward`/`backward` contract as `torch_logprobs` (the executable specification). The extension
(`csrc/linear_logprobs.cpp`) walks vocab tiles × token blocks, computes each fp32 logits tile with one ATen GEMM
and consumes it in one fused vectorised pass, so no [M, V] tensor is ever materialised.
"""
from __future__ import annotations

_EXT = None


def _ext():
    # Imported on first use so that importing epa_kernels works where the extension was not built.
    global _EXT
    if _EXT is None:
        from epa_kernels import _C

        _EXT = _C
    return _EXT


def _softcap_arg(softcap):
    return 0.0 if softcap is None else float(softcap)


def forward(hidden, weight, bias, targets, *, temperature=1.0, softcap=None, with_entropy=False):
    """hidden [M, D], weight [V, D], bias [V] | None, targets [M] int64 in [0, V).

    Returns (logp [M], lse [M], ez [M] | None), all fp32.
    """
    return _ext().forward(hidden, weight, bias, targets, float(temperature), _softcap_arg(softcap),
                          bool(with_entropy))


def backward(hidden, weight, bias, targets, lse, coef_a, coef_b, coef_c=None, *, temperature=1.0,
             softcap=None, need_hidden=True, need_weight=True, need_bias=True, filter_eps=None):
    """Gradients (d hidden [M, D] | None, d weight [V, D] | None, d bias [V] | None) in the input dtypes.

    lse, coef_a, coef_b, coef_c: [M] fp32 (coef_c None when no entropy gradient).
    `filter_eps`: drop the softmax part of d logit wherever the probability is below it, replacing the dropped
    entries' sum by the mean row of the other operand; kept entries go through sparse updates, or the GEMMs when
    a tile keeps more than 1/16 (None or 0 = exact gradient). The one-hot target terms are always exact.
    """
    return _ext().backward(hidden, weight, bias, targets, lse, coef_a, coef_b, coef_c, float(temperature),
                           _softcap_arg(softcap), bool(need_hidden), bool(need_weight), bool(need_bias),
                           float(filter_eps or 0.0))
