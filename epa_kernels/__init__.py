"""epa-kernels: fused LM-head log-prob and preference-loss kernels for preference alignment.

Main entry point: `linear_logprobs(hidden, weight, targets, ...)`. `backends()` reports which
kernel backends (triton, native C++, chunked torch) this installation can run.
"""
from epa_kernels.dispatch import BackendInfo, backends
from epa_kernels.fused_loss import FusedLinearDPOLoss, FusedLinearEPALoss, fused_linear_preference_loss
from epa_kernels.groups import make_groups
from epa_kernels.logprobs import LogProbs, linear_logprobs
from epa_kernels.losses import LOSS_OPTIONS, LOSSES, preference_loss

__version__ = "0.1.0"

__all__ = [
    "LOSSES", "LOSS_OPTIONS", "BackendInfo", "FusedLinearDPOLoss", "FusedLinearEPALoss", "LogProbs", "backends",
    "fused_linear_preference_loss", "linear_logprobs", "make_groups", "preference_loss", "__version__",
]
