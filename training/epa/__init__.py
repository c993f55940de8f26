"""`python -m training.epa`: align a transformers causal LM with the fused multi-negative EPA loss.

cli.py (options), train.py (the run), checkpoint.py (atomic checkpoints, resume), logs.py (metrics, curves).
"""
