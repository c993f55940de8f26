"""What a run trains on, decided before any model loads: the attention, prefix sharing, the tokenized data and the
plan of steps, and the fingerprint a resumed run must match.
"""
from __future__ import annotations

from epa_kernels.transformers import BatchPlanner, PreferenceTokenizer, data_fingerprint, read_preference_rows
from epa_kernels.transformers.prefix_sharing import attention_windows
from training.epa.cli import DTYPES, NEEDS_SCORES, TrainError
from training.models import attention_implementation

PAIRWISE_LOSSES = ("epa", "dpo", "ipo", "simpo", "sdpo")  # need a single best response per prompt
# Options a resumed run must share with the interrupted one. Not --epochs or --max-steps: a run may be extended,
# and the plan digest checks that the steps already taken are the steps the new plan takes.
RESUME_KEYS = ("model", "gguf_file", "data_split", "loss", "beta", "weak_weight", "positive_weight", "margin",
               "label_smoothing", "score_temperature", "ref", "ref_model", "max_length", "max_prompt_length",
               "max_negatives", "num_weak", "invalid_rows", "max_tokens_per_batch", "max_prompts_per_batch", "lr",
               "weight_decay", "scheduler", "warmup_ratio", "max_grad_norm", "gradient_accumulation_steps", "seed",
               "bf16", "dtype", "disable_dropout", "use_peft", "lora_r", "lora_alpha", "lora_dropout",
               "lora_target_modules", "lora_modules_to_save", "use_rslora")


class Split:
    """One data set ready to train or evaluate on: its examples, planner and (optionally) reference cache."""

    def __init__(self, examples, stats, planner, cache=None):
        self.examples, self.stats, self.planner, self.cache = examples, stats, planner, cache

    def batch(self, prompts, device):
        batch = self.planner.collate(prompts, device)
        if self.cache is not None:
            batch["ref_logps"] = self.cache.lookup(batch["keys"])
        return batch


def use_prefix_sharing(choice: str, attn: str | None, config) -> tuple[bool, str]:
    """--prefix-sharing → (on?, why not): auto → on unless flash-attn runs the model (its varlen kernels take no
    mask) or the model's attention is one the prefix masks cannot reproduce; on → the same checks, as errors."""
    if choice == "off":
        return False, "--prefix-sharing off"
    reason = None
    if attn == "flash_attention_2":
        reason = "flash_attention_2 takes no mask (pass --attn sdpa or flex_attention to share prefixes)"
    else:
        try:
            attention_windows(config)
        except ValueError as error:
            reason = str(error)
    if reason is None:
        return True, ""
    if choice == "on":
        raise TrainError(f"--prefix-sharing on: {reason}")
    return False, reason


def choose_attention(args, device, config) -> tuple[str | None, bool, str]:
    """(attention implementation or None for the model's default, prefix sharing on?, why it is off). With
    --attn auto, prefix sharing wins where it applies (it needs a mask, which flash-attn takes none of);
    flash_attention_2 is chosen only where sharing is off and flash-attn can run (CUDA, bf16/fp16 weights)."""
    dtype = DTYPES[args.dtype]
    if args.attn == "auto":
        sharing, why_not = use_prefix_sharing(args.prefix_sharing, None, config)
        return attention_implementation("auto", device, dtype, masks=sharing), sharing, why_not
    attn = attention_implementation(args.attn, device, dtype)
    sharing, why_not = use_prefix_sharing(args.prefix_sharing, attn, config)
    return attn, sharing, why_not


def load_split(spec, split, tokenizer, args, world_size, *, shuffle, prefix_sharing=False) -> Split:
    rows = read_preference_rows(spec, split=split)
    tokenize = PreferenceTokenizer(tokenizer, max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                                   max_negatives=args.max_negatives, needs_scores=args.loss in NEEDS_SCORES,
                                   strict_positive=args.loss in PAIRWISE_LOSSES, invalid_rows=args.invalid_rows)
    examples, stats = tokenize(rows)
    planner = BatchPlanner(examples, max_tokens_per_batch=args.max_tokens_per_batch, num_weak=args.num_weak,
                           max_length=args.max_length, seed=args.seed, world_size=world_size, shuffle=shuffle,
                           max_prompts_per_batch=args.max_prompts_per_batch, prefix_sharing=prefix_sharing)
    return Split(examples, stats, planner)


def data_report(split: Split) -> tuple[str, dict]:
    """One log line and the summary's record of what tokenization changed or dropped: nothing is silent."""
    stats = split.stats
    record = {"rows": stats.rows, "prompts": len(split.examples),
              "responses": sum(len(e.responses) for e in split.examples), "rows_dropped": stats.rows_dropped,
              "skipped": dict(stats.skipped), "prompts_truncated": stats.prompts_truncated,
              "responses_truncated": stats.responses_truncated, "negatives_capped": stats.negatives_capped,
              "tied_negatives_dropped": stats.tied_negatives_dropped,
              "duplicate_negatives_merged": stats.duplicate_negatives_merged, "boundary_shifts": stats.boundary_shifts}
    line = (f"{record['prompts']} prompts, {record['responses']} responses; truncated: {stats.prompts_truncated} "
            f"prompts, {stats.responses_truncated} responses; capped negatives: {stats.negatives_capped}; duplicate "
            f"negatives merged: {stats.duplicate_negatives_merged}; prompt/response boundary shifts: "
            f"{stats.boundary_shifts}")
    if stats.skipped or stats.rows_dropped:
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(stats.skipped.items()))
        line += f"; skipped (--invalid-rows skip): {stats.rows_dropped} rows dropped; by reason: {reasons}"
    return line, record


def run_fingerprint(args, train: Split, world_size: int, prefix_sharing: bool, attn: str | None) -> dict:
    """What a resumed run must share with the interrupted one: the options, the data's content, and what the
    plan and the numbers depend on beyond the options (ranks, resolved prefix sharing and attention)."""
    return {**{key: getattr(args, key) for key in RESUME_KEYS}, "data": data_fingerprint(train.examples),
            "world_size": world_size, "prefix_sharing": prefix_sharing, "attention": attn or "model default"}
