"""epa-kernels: fused LM-head log-prob and preference-loss kernels for preference alignment.

Main entry point: `linear_logprobs(hidden, weight, targets, ...)`. `backends()` reports which
kernel backends (triton, native C++, chunked torch) this installation can run.
"""
from epa_kernels.dispatch import BackendInfo, backends
from epa_kernels.logprobs import LogProbs, linear_logprobs

__version__ = "0.1.0"

__all__ = ["BackendInfo", "LogProbs", "backends", "linear_logprobs", "__version__"]
