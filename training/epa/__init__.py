"""`python -m training.epa`: align a transformers causal LM with the fused multi-negative EPA loss; from Python,
`train(EPAConfig(...))` with the same options.

cli.py (options), lora.py (LoRA adapters), api.py (the Python API), trainer.py (the run), checkpoint.py (atomic
checkpoints, resume), logs.py (metrics, curves).
"""
from training.epa.api import EPAConfig, train
from training.epa.cli import TrainError

__all__ = ["EPAConfig", "TrainError", "train"]
