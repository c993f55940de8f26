"""`make epa-study`: does EPA align better than DPO? Several arms × several seeds on SmolLM2-135M-Instruct, offline,
judged by differences from DPO-on-pairs paired by seed (DESIGN §9).

    python -m training.epa_study --out epa-study [--seeds 0 1 2] [--record benchmarks/results]

Read in the order `arms.py` (the arms, the baseline, the gold reward), `study.py` (the steps, resume),
`report.py` (the paired table, the plots), `archive.py` (the portable part a record keeps, and `--restore`).
`study.py` imports `report.py` and `archive.py`, `report.py` imports `archive.py`, both take their definitions
from `arms.py`: no import goes back. The data come from `training.review_data` (a gold reward that depends on the
prompt), each arm trains with `training.epa` and is judged by `training.evaluate` (linearity test, greedy win rate,
KL from the reference), each a program a user would run, one process each.
"""
