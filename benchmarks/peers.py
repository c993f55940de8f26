"""Peer implementations for the benchmark harness: other libraries' ways to compute the same outputs.

Every adapter is fn(hidden [N, D], weight [V, D], targets [N], cu_seqlens [S+1]) → the case's output, exactly
the function the harness's reference computes, so that the correctness gate compares like with like:
logprobs: per-sequence SUM of token log-probs [S] fp32; dpo / epa: the mean over prompts of the preference
loss on summed sequence log-probs and the case's precomputed reference log-probs. Differentiable w.r.t. hidden
and weight. A peer that cannot run here is "skipped: <reason>". Every adapter applies the case's softcap
(z ← c·tanh(z / c)) or is skipped saying it cannot.

- reference-compile: the materialised reference (logits = h @ Wᵀ, log_softmax, gather) under torch.compile.
- liger (liger-kernel, written against 0.8.5): logprobs → `liger_fused_linear_cross_entropy(...,
  reduction="none")` (Triton, CUDA only), −NLL summed per sequence. dpo → its chunked `LigerFusedLinearDPOFunction`
  (pure PyTorch, chunk_size=1 pair, loss_type="sigmoid", summed log-probs, no NLL term) on Liger's chosen-first
  padded [2P, T, D] layout. Liger takes no precomputed reference log-probs (it runs a reference model itself), so
  a subclass feeds ours to its per-chunk loss from Python; that is why it runs with compiled=False (torch.compile
  would specialise on the chunk index). epa: skipped, Liger has no multi-negative loss. Softcap: its fused linear
  cross entropy takes `softcap=` (logprobs); its DPO has none (skipped).
- liger-per-token (liger-kernel 0.8.5): `liger_kernel.ops.LigerFusedLinearScaledCrossEntropyFunction.apply(h, W,
  targets)`, Liger's fused-linear per-token NLL (+ entropy on request, not used here: the log-probs are what is
  compared), −NLL summed per sequence; for loss cases the loss head below on top. It is the only per-token
  log-prob/NLL op in 0.8.5 (searched: `liger_kernel.ops`, `.transformers.functional`, `.chunked_loss` for
  per_token / logprob / selective / nll / entropy; the others are GRPO's `fused_selective_log_softmax` on given
  logits and `chunked_loss.fused_linear_ppo._ChunkedSelectiveLogProbFunction`, a private chunked-torch helper).
  Liger dispatches it to a CuTe-DSL kernel on compute capability 9.0 (H100/H200: bf16 only, needs the
  `nvidia-cutlass-dsl` package, no softcap, validates targets with a host sync by default) and elsewhere to a
  512-token PyTorch fallback adapted from verl. Only the kernel is timed: CUDA sm_90 in bf16; anything else is
  skipped with the reason (the fallback is what the tests check the adapter with, on CPU).
- cce (cut-cross-entropy, written against 25.1.1): `linear_cross_entropy(e, c, targets, reduction="none")`, −NLL
  summed per sequence; "cce" is its Triton kernel (CUDA only, default filter_eps="high"), "cce-torch-compile" its
  impl="torch_compile" fallback (logits + cross_entropy under torch.compile). Softcap: `softcap=`.
- trl (trl, written against 1.16.0): `trl.kernels.ChunkedLogProbFunction`, what TRL's trainers call through
  `add_fused_lm_head` (vocabulary tiles of 32768, torch tiles where Triton/CUDA is absent), summed per sequence.
  Softcap: its `final_logit_softcapping` argument.

For loss cases the log-prob peers (reference-compile, cce, trl) add the loss on top of their log-probs: DPO written
out as TRL's trainer does (−log σ(β·Δ), mean over pairs), EPA from `epa_kernels.preference_loss` (no peer has it).
Compared: output and gradients with the reference (by the harness), then time and memory.
"""
from __future__ import annotations

import functools
import importlib
import shutil
from collections.abc import Callable

import torch
import torch.nn.functional as F

from epa_kernels import preference_loss

PIP = "pip install 'epa-kernels[bench]'"
# trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE in trl 1.16 (importing that module takes seconds longer)
TRL_VOCAB_CHUNK = 32768


def _import(module: str, package: str):
    """The module, or a "skipped: …" string naming the pip package to install."""
    try:
        return importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install failing at import
        return f"skipped: {package} not importable ({type(exc).__name__}: {exc}); {PIP} or pip install {package}"


def _has_triton() -> bool:
    try:
        from torch.utils._triton import has_triton
        return has_triton()
    except Exception:
        return False


def _compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile (inductor) cannot run on this device, or None."""
    if device.type == "cuda":
        return None if _has_triton() else "torch.compile on CUDA needs Triton (pip install triton)"
    if device.type == "cpu":
        return None if (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")) else \
            "torch.compile on CPU needs a C++ compiler (none on PATH)"
    return f"torch.compile not tried on {device.type}"


def _sequence_sums(token_values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Differentiable per-sequence sums [S] of per-token values [N] (fp32), as trainers sum a padded [B, T]."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    token_values = token_values.float()
    if len(set(lengths)) == 1:
        return token_values.view(len(lengths), lengths[0]).sum(-1)
    return torch.nn.utils.rnn.pad_sequence(list(token_values.split(lengths)), batch_first=True).sum(-1)


def _loss_head(case, device) -> Callable | None:
    """None for logprobs; otherwise per-sequence log-probs [S] → the case's scalar loss."""
    if case.kind == "logprobs":
        return None
    groups, ref_logps, options = case.loss_arguments(device)
    if case.kind == "dpo":
        chosen, rejected, beta = groups[:, 0], groups[:, 1], options["beta"]
        ref_margin = ref_logps[chosen] - ref_logps[rejected]

        def dpo(logps):  # TRL's sigmoid DPO: −log σ(β·((lp_c − ref_c) − (lp_r − ref_r))), mean over pairs
            return -F.logsigmoid(beta * (logps[chosen] - logps[rejected] - ref_margin)).mean()
        return dpo

    def epa(logps):
        return preference_loss(logps, ref_logps, groups, **options)[0]
    return epa


def _from_token_logps(token_logps_fn, head):
    """Adapter: per-token log-probs (0 at ignored tokens) → per-sequence sums → the loss head, if any."""
    def fn(hidden, weight, targets, cu_seqlens):
        logps = _sequence_sums(token_logps_fn(hidden, weight, targets), cu_seqlens)
        return logps if head is None else head(logps)
    return fn


# --- reference under torch.compile -------------------------------------------------------------------------------

def _materialised_token_logps(hidden, weight, targets, ignore_index: int = -100, softcap: float | None = None):
    logits = hidden @ weight.t()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    valid = targets != ignore_index
    token = torch.log_softmax(logits, dim=-1).gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    return token * valid


@functools.cache
def _compiled_token_logps():
    return torch.compile(_materialised_token_logps)


def _reference_compile(device, case, head):
    reason = _compile_unavailable(device)
    if reason is not None:
        return f"skipped: {reason}"
    softcap = case.softcap
    return _from_token_logps(lambda h, w, t: _compiled_token_logps()(h, w, t, softcap=softcap), head)


# --- Liger-Kernel ------------------------------------------------------------------------------------------------

@functools.cache
def _liger_dpo_function():
    """LigerFusedLinearDPOFunction whose per-chunk loss takes precomputed reference log-probs from `feed`."""
    from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOFunction

    class DPOWithReferenceLogps(LigerFusedLinearDPOFunction):
        feed = None  # [ref_chosen [P], ref_rejected [P], next pair]: set around each call, consumed chunk by chunk

        @staticmethod
        def preference_loss_fn(chosen_logps, rejected_logps, full_target, ref_chosen_logps=None,
                               ref_rejected_logps=None, **kwargs):
            feed = DPOWithReferenceLogps.feed
            if feed is None or ref_chosen_logps is not None:
                raise RuntimeError("reference log-probs must come from the feed (use_ref_model=False)")
            start, count = feed[2], chosen_logps.shape[0]
            feed[2] = start + count
            return LigerFusedLinearDPOFunction.preference_loss_fn(
                chosen_logps, rejected_logps, full_target, ref_chosen_logps=feed[0][start:start + count],
                ref_rejected_logps=feed[1][start:start + count], **kwargs)

    return DPOWithReferenceLogps


# The positional arguments of LigerFusedLinearDPOFunction.forward (after ctx) this adapter passes.
_LIGER_DPO_ARGS = ("_input", "weight", "target", "bias", "ref_input", "ref_weight", "ref_bias", "ignore_index", "beta",
                   "compute_nll_loss", "compiled", "use_ref_model", "average_log_prob", "chunk_size", "loss_type",
                   "label_smoothing", "discopop_tau", "alpha")


def _padded(hidden, targets, cu_seqlens, ignore_index=-100):
    """[S, T, D] hidden and [S, T] targets, shorter sequences padded with ignore_index targets."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    if len(set(lengths)) == 1:
        return hidden.view(len(lengths), lengths[0], -1), targets.view(len(lengths), lengths[0])
    hs = torch.nn.utils.rnn.pad_sequence(list(hidden.split(lengths)), batch_first=True)
    ts = torch.nn.utils.rnn.pad_sequence(list(targets.split(lengths)), batch_first=True, padding_value=ignore_index)
    return hs, ts


def _liger(device, case, head):
    if case.kind == "epa":
        return "skipped: Liger-Kernel has no multi-negative preference loss (its DPO is pairwise chosen/rejected only)"
    if case.kind == "logprobs":
        if device.type != "cuda":
            return "skipped: Liger's fused linear cross entropy is a Triton kernel: needs CUDA"
        functional = _import("liger_kernel.transformers.functional", "liger-kernel")
        if isinstance(functional, str):
            return functional
        options = {}
        if case.softcap is not None:
            import inspect

            if "softcap" not in inspect.signature(functional.liger_fused_linear_cross_entropy).parameters:
                return "skipped: this liger-kernel's liger_fused_linear_cross_entropy takes no softcap"
            options["softcap"] = case.softcap

        def liger_token_logps(hidden, weight, targets):
            nll = functional.liger_fused_linear_cross_entropy(hidden, weight, targets, ignore_index=-100,
                                                               reduction="none", **options)
            return -nll.float()
        return _from_token_logps(liger_token_logps, None)

    if case.softcap is not None:
        return "skipped: Liger's LigerFusedLinearDPOFunction has no logit softcap"
    module = _import("liger_kernel.chunked_loss.dpo_loss", "liger-kernel")
    if isinstance(module, str):
        return module
    import inspect

    params = list(inspect.signature(module.LigerFusedLinearDPOFunction.forward).parameters)
    if tuple(p for p in params if p not in ("cls", "ctx")) != _LIGER_DPO_ARGS:
        return f"skipped: unsupported liger-kernel version (LigerFusedLinearDPOFunction.forward{params})"
    function = _liger_dpo_function()
    groups, ref_logps, options = case.loss_arguments(device)
    order = torch.cat([groups[:, 0], groups[:, 1]])  # Liger's layout: all chosen, then all rejected
    ref_chosen, ref_rejected = ref_logps[groups[:, 0]].float(), ref_logps[groups[:, 1]].float()
    num_pairs = groups.shape[0]

    def liger_dpo(hidden, weight, targets, cu_seqlens):
        hs, ts = _padded(hidden, targets, cu_seqlens)
        function.feed = [ref_chosen, ref_rejected, 0]
        try:
            loss, _ = function.apply(hs[order], weight, ts[order], None, None, None, None, -100, options["beta"],
                                     False, False, False, False, 1, "sigmoid", 0.0, 0.05, 1.0)
            if function.feed[2] != num_pairs:
                raise RuntimeError(f"Liger consumed {function.feed[2]} of {num_pairs} reference pairs")
        finally:
            function.feed = None
        return loss
    return liger_dpo


def _liger_per_token(device, case, head, allow_fallback: bool = False):
    """Liger's fused-linear per-token NLL; allow_fallback (tests): also where Liger runs its PyTorch fallback."""
    if case.softcap is not None:
        return "skipped: Liger's per-token op (LigerFusedLinearScaledCrossEntropyFunction) has no logit softcap"
    if not allow_fallback:
        if device.type != "cuda":
            return ("skipped: Liger's per-token op is a CuTe-DSL kernel for CUDA sm_90 only (on other devices Liger "
                    "runs a 512-token PyTorch fallback, not timed)")
        capability = torch.cuda.get_device_capability(device)
        if capability != (9, 0):
            return (f"skipped: Liger's per-token kernel is for sm_90 only; on sm_{capability[0]}{capability[1]} Liger "
                    "runs a 512-token PyTorch fallback, not timed")
        if case.dtype != "bfloat16":
            return f"skipped: Liger's sm_90 per-token kernel takes bfloat16 only, not {case.dtype}"
    module = _import("liger_kernel.ops.fused_linear_scaled_cross_entropy", "liger-kernel")
    if isinstance(module, str):
        return module
    function = getattr(module, "LigerFusedLinearScaledCrossEntropyFunction", None)
    if function is None:
        return "skipped: not in this Liger version (no LigerFusedLinearScaledCrossEntropyFunction)"
    if not allow_fallback:
        try:
            module._load_sm90_function()
        except Exception as exc:  # ImportError without nvidia-cutlass-dsl: Liger's own dispatch would raise it too
            return f"skipped: Liger's sm_90 per-token kernel is not importable ({type(exc).__name__}: {exc})"

    def liger_token_logps(hidden, weight, targets):
        return -function.apply(hidden, weight, targets, 1.0, -100).float()
    return _from_token_logps(liger_token_logps, head)


# --- Cut Cross-Entropy -------------------------------------------------------------------------------------------

def _cce(device, case, head, impl):
    if impl == "cce" and (device.type != "cuda" or not _has_triton()):
        return "skipped: CCE's Triton kernel needs CUDA (on CPU see cce-torch-compile)"
    if impl == "torch_compile":
        reason = _compile_unavailable(device)
        if reason is not None:
            return f"skipped: {reason}"
    module = _import("cut_cross_entropy", "cut-cross-entropy")
    if isinstance(module, str):
        return module

    def cce_token_logps(hidden, weight, targets):
        nll = module.linear_cross_entropy(hidden, weight, targets, ignore_index=-100, softcap=case.softcap,
                                          reduction="none", impl=impl)
        return -nll.float()
    return _from_token_logps(cce_token_logps, head)


# --- TRL ---------------------------------------------------------------------------------------------------------

def _trl(device, case, head):
    module = _import("trl.kernels.chunked_logprob", "trl")
    if isinstance(module, str):
        return module

    def trl_token_logps(hidden, weight, targets):
        valid = targets != -100  # as add_fused_lm_head's non-compact path: score every row, zero the ignored ones
        logps = module.ChunkedLogProbFunction.apply(hidden, weight, None, targets.clamp(min=0), 1.0, TRL_VOCAB_CHUNK,
                                                    case.softcap, 1.0, ("log_probs",))[0]
        return logps.float().masked_fill(~valid, 0.0)
    return _from_token_logps(trl_token_logps, head)


def peer_implementations(device: torch.device, case, names=None) -> dict[str, Callable | str]:
    """name → fn(hidden, weight, targets, cu_seqlens) → the case's output, or "skipped: <reason>".

    names: build only these (importing a peer package takes seconds; trl about 7 s).
    """
    device = torch.device(device)
    head = _loss_head(case, device)
    builders = {
        "reference-compile": lambda: _reference_compile(device, case, head),
        "liger": lambda: _liger(device, case, head),
        "liger-per-token": lambda: _liger_per_token(device, case, head),
        "cce": lambda: _cce(device, case, head, "cce"),
        "cce-torch-compile": lambda: _cce(device, case, head, "torch_compile"),
        "trl": lambda: _trl(device, case, head),
    }
    impls: dict[str, Callable | str] = {}
    for name, build in builders.items():
        if names is not None and name not in names:
            continue
        try:
            impls[name] = build()
        except Exception as exc:  # a peer that fails to set up is reported, the others go on
            impls[name] = f"skipped: setting up {name} failed ({type(exc).__name__}: {exc})"
    return impls
