"""The EPA study's definitions: its arms (training file and loss options each), the baseline every arm is paired
against, and the gold reward (per gold variant, `--gold`) the held-out prompts are judged by."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arm:
    data: str  # the training file (pairs or multi)
    options: tuple[str, ...]  # the trainer's loss options
    label: str


ARMS = {
    "dpo-pairs": Arm("train_pairs.jsonl", ("--loss", "dpo"), "DPO, one Bradley–Terry pair per prompt"),
    "dpo-k5": Arm("train_multi.jsonl", ("--loss", "dpo"), "DPO averaged over the same K = 5 negatives"),
    "epa-k5": Arm("train_multi.jsonl", ("--loss", "epa", "--num-weak", "0"), "EPA, K = 5 strong, W = 0"),
    "epa-k5-w2": Arm("train_multi.jsonl", ("--loss", "epa", "--num-weak", "2"), "EPA, K = 5, W = 2 (α = 1)"),
    "epa-k5-w8": Arm("train_multi.jsonl", ("--loss", "epa", "--num-weak", "8"), "EPA, K = 5, W = 8 (α = 1)"),
    "epa-k5-w8-a0.5": Arm("train_multi.jsonl", ("--loss", "epa", "--num-weak", "8", "--weak-weight", "0.5"),
                          "EPA, K = 5, W = 8, α = 0.5"),
    # Not in the default arms: LoRA adapters learn at their own rate, so this arm runs in its own study folder with
    # its own --lr (docs/training.md, LoRA adapters).
    "epa-k5-w2-lora": Arm("train_multi.jsonl", ("--loss", "epa", "--num-weak", "2", "--use-peft"),
                          "EPA, K = 5, W = 2, LoRA adapters (r = 16, all linear layers)"),
}
DEFAULT_ARMS = [arm for arm in ARMS if not arm.endswith("-lora")]
BASELINE = "dpo-pairs"
# --gold → the evaluation's --gold-reward: the same function training.review_data scores the variant's answers with
GOLD = {"prompt": "training.review_data:gold_reward", "sentiment": "training.review_data:sentiment_reward"}
