"""One training step of TRL's `DPOTrainer` on a causal LM: the preference-training baseline for our own trainer.

    python -m benchmarks.trl_step --model smollm2 --prompt-tokens 256 --response-tokens 512 --responses 4 \
        --gradient-checkpointing --precompute-ref --measure time

One prompt with 1 + K responses becomes K (chosen, rejected_k) rows of TRL's standard (non-conversational)
preference format, all K pairs in one batch of one optimizer step (TRL packs them as 2K padded rows, each with its
own copy of the prompt). TRL's defaults are kept (its fused LM head, padding, AdamW, gradient clipping) apart from
what a benchmark must pin: fp32 (bf16 off), a tiny learning rate, sigmoid loss with β = 0.1, no eval, no saving.

The steps run in `trainer.train()`; a callback brackets each optimizer step (`on_step_begin` → `on_step_end`, i.e.
forward, backward, clipping, optimizer step; the batch is collated before `on_step_begin`). After `--warmup`
discarded steps (AdamW state exists from then on) it reports per measured step:
- `step_s`/`times_s`: wall time (median / all);
- `peak_bytes`: the process's peak during the step (CPU: VmHWM after resetting it at step begin, so the process must
  run under benchmarks.harness.CPU_MEMORY_ENV; CUDA: `max_memory_allocated` after resetting it); `base_bytes`: what
  was resident at step begin (model, optimizer state, the reference model when TRL keeps one);
- `loss` of the first measured step, `tokens` (the collated `input_ids` elements, padding included), `pairs`,
  `weights_bytes` (policy parameters, adapters included).
With `--precompute-ref`, TRL computes the reference log-probs in `DPOTrainer.__init__`, before any step.

`--lora` (with `--lora-r`, `--lora-alpha`, `--lora-target-modules`, as in benchmarks.train_step, which builds the
same `peft.LoraConfig`) passes `peft_config` to `DPOTrainer`, which wraps the model with `get_peft_model` itself and,
under gradient checkpointing, enables input gradients itself. No reference model is passed: TRL's reference is then
the policy with its adapters disabled, run under no_grad in every step (`--precompute-ref`: once, in `__init__`).
The optimizer holds the adapters' state only; the result adds the LoRA settings, `trainable_params`,
`trainable_bytes` and `optimizer_state_bytes` (all runs).
The last stdout line is the JSON result.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import tempfile
import time

import torch

from benchmarks.harness import CPU_MEMORY_ENV, _proc_status, cpu_memory_exact
from benchmarks.train_step import (
    TEXT,
    add_lora_arguments,
    check_adapters_only,
    check_lora_arguments,
    lora_config,
    lora_settings,
    prime_optimizer,
    trainable_parameters,
)

SEED = 0


def impl_name(args) -> str:
    return ("trl" + ("-gc" if args.gradient_checkpointing else "") + ("-precompute" if args.precompute_ref else "")
            + ("-lora" if args.lora else ""))


def build_dataset(tokenizer, prompt_tokens: int, response_tokens: int, responses: int):
    """K = responses − 1 rows (prompt, chosen, rejected_k): one prompt, 1 + K distinct responses, exact token counts."""
    from datasets import Dataset

    ids = tokenizer(TEXT * (2 + (prompt_tokens + response_tokens + 7 * responses) // 40),
                    add_special_tokens=False)["input_ids"]
    prompt = tokenizer.decode(ids[:prompt_tokens])
    # Each response starts 7 tokens further into the paragraph, so no two are equal.
    answers = [tokenizer.decode(ids[prompt_tokens + 7 * i : prompt_tokens + 7 * i + response_tokens])
               for i in range(responses)]
    return Dataset.from_dict({"prompt": [prompt] * (responses - 1), "chosen": [answers[0]] * (responses - 1),
                              "rejected": answers[1:]})


def check_tokenization(dataset, args) -> None:
    """TRL re-tokenizes the texts (adding EOS, maybe BOS; merges across the prompt/response boundary shift a token):
    fail if its lengths are far from the request, or if `max_length` would truncate."""
    prompt = {len(ids) for ids in dataset["prompt_ids"]}
    answers = [len(ids) for column in ("chosen_ids", "rejected_ids") for ids in dataset[column]]
    print(f"TRL tokenization: prompt {sorted(prompt)} tokens, responses {min(answers)}–{max(answers)} tokens "
          f"(EOS included)", file=sys.stderr)

    def close(got, wanted):
        return abs(got - wanted) <= max(2, 0.05 * wanted)

    if not all(close(p, args.prompt_tokens) for p in prompt) or not all(
            close(a, args.response_tokens + 1) for a in answers):
        raise SystemExit(f"TRL tokenized to prompt {sorted(prompt)} / responses {min(answers)}–{max(answers)} tokens, "
                         f"asked {args.prompt_tokens} / {args.response_tokens}")
    if max(prompt) + max(answers) > max_length(args):
        raise SystemExit("max_length would truncate the sequences")


def max_length(args) -> int:
    return args.prompt_tokens + args.response_tokens + 16  # room for EOS, BOS and boundary merges: never truncates


def run(args) -> dict:
    """Build the trainer, run warm-up + measured steps through `trainer.train()`, return the result."""
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from training.models import load_causal_lm, load_tokenizer

    device = torch.device(args.device)
    measure_memory = args.measure in ("memory", "both")
    if measure_memory and device.type == "cpu" and not cpu_memory_exact():
        raise SystemExit(f"measuring CPU memory: the process must run under benchmarks.harness.CPU_MEMORY_ENV "
                         f"({' '.join(f'{k}={v}' for k, v in CPU_MEMORY_ENV.items())})")
    print(f"seed {SEED}", file=sys.stderr)
    torch.manual_seed(SEED)
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model, device=device)
    # Without precomputation TRL rebuilds the reference from `config._name_or_path`, which a de-quantized GGUF
    # (`smollm2`) lacks; an untouched copy of the policy is the same reference TRL would build. With LoRA there is
    # none: TRL disables the adapters to get the reference.
    ref_model = None if args.precompute_ref or args.lora else copy.deepcopy(model)
    dataset = build_dataset(tokenizer, args.prompt_tokens, args.response_tokens, args.responses)
    pairs = args.responses - 1

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    class StepMeter(TrainerCallback):
        """Time, base and peak memory of each optimizer step; the loss logged after the first measured one."""

        def __init__(self):
            self.steps, self.loss, self.optimizer_state = [], None, None

        def on_train_begin(self, _args, state, control, optimizer=None, **kwargs):
            if args.warmup == 0:  # the Trainer has built its optimizer: give it its state before the measured step
                prime_optimizer(optimizer, trainer.model.parameters())

        def on_step_begin(self, _args, state, control, optimizer=None, **kwargs):
            if len(self.steps) == args.warmup:  # the first measured step: the AdamW state exists by now
                self.optimizer_state = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                                           for t in s.values() if torch.is_tensor(t))
            sync()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            else:
                base = _proc_status()["VmRSS"]
                with open("/proc/self/clear_refs", "w") as clear:
                    clear.write("5")  # the peak resident set restarts from the current one
            self.steps.append({"base": base, "start": time.perf_counter()})

        def on_step_end(self, _args, state, control, **kwargs):
            sync()
            step = self.steps[-1]
            step["time"] = time.perf_counter() - step["start"]
            step["peak"] = torch.cuda.max_memory_allocated() if device.type == "cuda" else _proc_status()["VmHWM"]

        def on_log(self, _args, state, control, logs=None, **kwargs):
            if state.global_step == args.warmup + 1 and logs and "loss" in logs:
                self.loss = logs["loss"]

    meter = StepMeter()
    with tempfile.TemporaryDirectory() as output_dir:
        config = DPOConfig(
            output_dir=output_dir, per_device_train_batch_size=pairs, gradient_accumulation_steps=1,
            max_steps=args.warmup + args.repeats, max_length=max_length(args), learning_rate=1e-7, beta=0.1,
            loss_type=["sigmoid"], eval_strategy="no", save_strategy="no", report_to=[], logging_steps=1,
            use_cpu=device.type == "cpu", dataloader_num_workers=0, bf16=False, fp16=False, seed=SEED,
            data_seed=SEED, gradient_checkpointing=args.gradient_checkpointing,
            precompute_ref_log_probs=args.precompute_ref, disable_tqdm=True)
        trainer = DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=dataset,
                             processing_class=tokenizer, callbacks=[meter],
                             peft_config=lora_config(args) if args.lora else None)
        del ref_model  # the trainer holds it (or, precomputing or with LoRA, there is none)
        if args.lora:
            check_adapters_only(trainer.model)
        trainable = trainable_parameters(trainer.model)
        weights = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
        check_tokenization(trainer.train_dataset, args)
        # Record the shape of every batch the Trainer's dataloader collates: the tokens a step really runs.
        shapes, collate = [], trainer.data_collator

        def recording_collate(examples):
            batch = collate(examples)
            shapes.append(tuple(batch["input_ids"].shape))
            return batch

        trainer.data_collator = recording_collate
        trainer.train()
    measured = meter.steps[args.warmup:]
    if len(measured) != args.repeats or shapes[args.warmup][0] != 2 * pairs:
        raise SystemExit(f"expected {args.repeats} measured steps of {2 * pairs} rows; got {len(measured)} steps, "
                         f"batches {shapes}")
    if meter.loss is None or not math.isfinite(meter.loss):  # a broken step is a failure, not a data point
        raise SystemExit(f"TRL logged no finite loss for the first measured step: {meter.loss}")
    # process_peak_bytes: the whole process's peak during the measured steps, whatever --measure says (an upper
    # bound of live memory on CPU under the default allocator, which may keep freed pages resident).
    result = {"impl": impl_name(args), "pairs": pairs, "tokens": shapes[args.warmup][0] * shapes[args.warmup][1],
              "loss": meter.loss, "weights_bytes": weights, "trainable_params": sum(p.numel() for p in trainable),
              "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
              "optimizer_state_bytes": meter.optimizer_state,
              "process_peak_bytes": max(step["peak"] for step in measured), "lora": lora_settings(args)}
    if args.measure in ("time", "both"):
        times = [step["time"] for step in measured]
        result.update(step_s=statistics.median(times), times_s=times)
    if measure_memory:
        highest = max(measured, key=lambda step: step["peak"])
        result.update(peak_bytes=highest["peak"], base_bytes=highest["base"])
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="model directory, .gguf, or 'smollm2' (default)")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--response-tokens", type=int, default=512)
    parser.add_argument("--responses", type=int, default=4, help="1 chosen + K rejected → K pairs (default 1 + 3)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--precompute-ref", action="store_true",
                        help="TRL's precompute_ref_log_probs: reference log-probs computed before training")
    add_lora_arguments(parser)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--measure", choices=("time", "memory", "both"), default="both")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    for name in ("prompt_tokens", "response_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be ≥ 1")
    if args.warmup < 0:
        parser.error("--warmup must be ≥ 0 (0: the AdamW state is created on zero gradients instead)")
    if args.responses < 2:
        parser.error("--responses must be ≥ 2 (a chosen and a rejected response)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    check_lora_arguments(parser, args)
    return args


def main(argv=None) -> int:
    print(json.dumps(run(parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
