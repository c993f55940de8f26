"""Training programs for epa-kernels (run from the repo root, e.g. ``python -m training.active_learning``).

Not part of the installed wheel, like flash-attention's ``training/``.
"""
