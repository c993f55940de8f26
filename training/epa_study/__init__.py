"""`make epa-study`: does EPA align better than DPO? Several arms × several seeds on SmolLM2-135M-Instruct, offline,
judged by differences from DPO-on-pairs paired by seed (DESIGN §9).

    python -m training.epa_study --out epa-study [--seeds 0 1 2] [--record benchmarks/results]
    python -m training.epa_study --out epa-study-beta0.05 --beta 0.05 --arms dpo-k5 epa-k5 epa-k5-w2
    python -m training.epa_study --out epa-study-sentiment --gold sentiment --answers-from epa-study/data
    python -m training.epa_study.frontier --studies epa-study epa-study-beta0.05 --out frontier \
        [--scope epa-study-sentiment]

A study folder holds one setting (β and the gold variant included). Read in the order `arms.py` (the arms, the
baseline, the gold reward of each variant), `study.py` (the steps, resume), `report.py` (one folder's paired tables,
the plots), `archive.py` (the setting, the portable part a record keeps, and `--restore`), then across folders
`frontier.py` (the reward–KL frontier over β, the arms at matched KL) and `scope.py` (the prompt gold against the
sentiment gold). `study.py` imports `report.py` and `archive.py`, `report.py` imports `archive.py`, `frontier.py`
imports `scope.py`, `scope.py` imports `report.py` and `archive.py`, and all take their definitions from `arms.py`:
no import goes back. The data come from `training.review_data`, each arm trains with `training.epa`
and is judged by `training.evaluate` (linearity test, greedy win rate, KL from the reference), each a program a user
would run, one process each.
"""
