"""The EPA training run: data → plan → reference → optimizer steps → checkpoints → saved model.

One process or many (accelerate / torchrun): every rank builds the same plan from the seed and trains on its
shard of each step. A rank's loss is its prompts' mean scaled by (its prompts × ranks / the update's prompts),
so after DDP's average and gradient accumulation the gradient is exactly that of the mean over every prompt of
the update, however unevenly the token budget split them.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch

from epa_kernels.transformers import (
    PreferenceModel,
    ReferenceCache,
    adapters_disabled,
    data_fingerprint,
    disable_dropout,
    fill_reference_cache,
    model_fingerprint,
)
from epa_kernels.transformers.batching import plan_digest
from training.epa import lora
from training.epa.checkpoint import (
    check_resume,
    crash_point,
    find_resume_point,
    load_checkpoint,
    save_checkpoint,
    trainable_checkpoints,
)
from training.epa.cli import DTYPES, TrainError, loss_options
from training.epa.logs import MetricsLog, plot_curves
from training.epa.plan import Split, choose_attention, data_report, load_split, run_fingerprint
from training.models import load_causal_lm, load_config, load_tokenizer

METRICS = ("loss", "margin", "accuracy", "reward_positive", "reward_strong", "reward_weak", "positive_prob")


def progress_bar(accelerator, args, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(disable=args.no_progress or not accelerator.is_main_process, dynamic_ncols=True, **kwargs)


def attach_reference(accelerator, args, split: Split, steps, reference, model_hash: str, name: str) -> int:
    """Fill (or reuse) the on-disk reference cache for every sequence the steps will score; returns how many
    log-probs were computed now. model_hash: `model_fingerprint` of the reference's weights."""
    fingerprint = {"model": model_hash, "data": data_fingerprint(split.examples),
                   "max_length": args.max_length, "reduction": reference.loss_options["reduction"],
                   "bf16": args.bf16, "dtype": args.dtype}
    directory = Path(args.ref_cache_dir or Path(args.output_dir) / "reference-cache")
    split.cache = ReferenceCache(directory, fingerprint)
    keys = [key for step in steps for shard in step.shards for key in split.planner.sequence_keys(shard)]
    return fill_reference_cache(
        split.cache, reference, split.planner, keys, max_tokens=args.max_tokens_per_batch,
        device=accelerator.device, autocast=accelerator.autocast,
        progress=lambda total: progress_bar(accelerator, args, total=total, desc=f"reference log-probs ({name})"))


def reduce_metrics(accelerator, sums: torch.Tensor) -> dict:
    """sums [len(METRICS), 2] of (Σ value·prompts, Σ prompts) → the mean over every rank's prompts."""
    totals = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()
    return {name: (totals[i, 0] / totals[i, 1]).item() for i, name in enumerate(METRICS) if totals[i, 1] > 0}


def accumulate(sums, loss, metrics, prompts):
    for i, name in enumerate(METRICS):
        value = loss if name == "loss" else metrics.get(name)
        if value is not None:
            sums[i, 0] += float(value) * prompts
            sums[i, 1] += prompts


@torch.no_grad()
def evaluate(accelerator, wrapper, split: Split, steps) -> dict:
    wrapper.eval()
    sums = torch.zeros(len(METRICS), 2, dtype=torch.float64)
    for step in steps:
        shard = step.shards[accelerator.process_index]
        with accelerator.autocast():
            loss, metrics = wrapper(split.batch(shard, accelerator.device))
        accumulate(sums, loss, metrics, len(shard))
    wrapper.train()
    return reduce_metrics(accelerator, sums)


def make_optimizer(wrapper, args, total_updates):
    from transformers import get_scheduler

    # As transformers' Trainer: no weight decay on biases and norm weights (1-D parameters).
    params = [p for p in wrapper.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr)
    warmup = round(args.warmup_ratio * total_updates)
    scheduler = get_scheduler(args.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_updates)
    return optimizer, scheduler


def save_model(accelerator, wrapper, tokenizer, path: Path, merged: Path | None = None) -> None:
    """save_pretrained of the trained causal LM (full state dict gathered from DDP/FSDP shards), with `use_cache`
    back on in its config: training turned the KV cache off, generation wants it. A peft model saves its adapters
    (adapter_config.json, adapter_model.safetensors); `merged`: also the base with the adapters merged in."""
    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(wrapper)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(wrapper).model
        state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
        model.config.use_cache = True
        model.save_pretrained(path, state_dict=state)  # peft keeps the adapters' entries of it
        tokenizer.save_pretrained(path)
        if merged is not None:
            model.merge_and_unload().save_pretrained(merged)
            tokenizer.save_pretrained(merged)
    accelerator.wait_for_everyone()


def checkpoint_due(accelerator, args, done: int, total: int, since: float) -> bool:
    """--save-steps, or --save-minutes since the last checkpoint (not at the last update: the model is saved then).
    Every rank must agree, since saving is collective: the main process's clock decides for all."""
    if args.save_steps and done % args.save_steps == 0:
        return True
    if not args.save_minutes or done == total:
        return False
    due = torch.tensor([float(time.monotonic() - since >= 60 * args.save_minutes)], device=accelerator.device)
    return bool(accelerator.reduce(due, reduction="max").item()) if accelerator.num_processes > 1 else bool(due)


def run(args) -> dict:
    """Train as the options say; returns the summary also written to OUTPUT_DIR/train_summary.json."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed

    started = time.perf_counter()
    # cpu=True without an accelerator: otherwise accelerate ignores torchrun's ranks on a CPU-only machine.
    accelerator = Accelerator(mixed_precision="bf16" if args.bf16 else "no", cpu=not torch.accelerator.is_available())
    if args.use_peft and accelerator.distributed_type == DistributedType.FSDP:  # every rank stops here, together
        raise TrainError("--use-peft under FSDP is not supported yet: train adapters with DDP (accelerate's "
                         "MULTI_GPU/MULTI_CPU) or in one process; the adapters' memory rarely needs sharding")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    set_seed(args.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    say = accelerator.print

    tokenizer = load_tokenizer(args.model, args.gguf_file, online=args.online)
    config = load_config(args.model, args.gguf_file, online=args.online)
    if args.use_peft:
        try:
            lora.check_targets(config, args)
        except ValueError as error:
            raise TrainError(str(error)) from None
    attn, sharing, why_not = choose_attention(args, accelerator.device, config)
    if not sharing:
        say(f"prefix sharing off: {why_not}")
    train = load_split(args.data, args.data_split, tokenizer, args, world, shuffle=True, prefix_sharing=sharing)
    evaluation = (load_split(args.eval_data, args.eval_split, tokenizer, args, world, shuffle=False,
                             prefix_sharing=sharing) if args.eval_data else None)
    steps = [step for epoch in range(args.epochs) for step in train.planner.plan_epoch(epoch)]
    eval_steps = evaluation.planner.plan_epoch(0) if evaluation else []
    steps_per_epoch = [sum(1 for step in steps if step.epoch == epoch) for epoch in range(args.epochs)]
    accum = args.gradient_accumulation_steps
    total_updates = math.ceil(len(steps) / accum)
    if args.max_steps is not None:
        total_updates = min(total_updates, args.max_steps)
    fingerprint = run_fingerprint(args, train, world, sharing, attn)
    resume_path = find_resume_point(out, args.resume) if args.resume else None
    start = check_resume(resume_path, fingerprint, steps, accum, total_updates) if resume_path else 0
    data_line, data_record = data_report(train)
    say(f"data: {data_line}")
    say(f"{len(steps)} steps of ≤ {args.max_tokens_per_batch} tokens per rank × {world} rank(s) → "
        f"{total_updates} optimizer updates")
    if sharing and steps:
        shards = [train.planner.sequence_keys(shard) for step in steps for shard in step.shards]
        shared = sum(train.planner.packed_length(keys) for keys in shards)
        unshared = sum(sum(map(len, train.planner.sequence_tokens(key))) for keys in shards for key in keys)
        say(f"prefix sharing: {shared} tokens through the model instead of {unshared} ({shared / unshared:.2f}×)")
    weak_drawn = [len(p.weak) for step in steps for shard in step.shards for p in shard]
    if args.num_weak and sum(weak_drawn) < args.num_weak * len(weak_drawn):
        say(f"warning: {args.num_weak} weak negatives asked per prompt, {sum(weak_drawn) / len(weak_drawn):.2f} "
            "drawn on average: steps with few prompts have few other responses (raise --max-tokens-per-batch)")

    dtype = DTYPES[args.dtype]
    model = load_causal_lm(args.model, args.gguf_file, attn=args.attn, dtype=dtype, device=accelerator.device,
                           online=args.online, masks=sharing)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if args.disable_dropout:
        disable_dropout(model)  # before the hash (as the reference computes); PreferenceModel does it again
    # The reference cache is keyed by the reference's weights: with adapters, the base model's, before wrapping.
    base_hash = model_fingerprint(model) if args.ref == "precompute" and not args.ref_model else None
    adapters_off = args.use_peft and not args.ref_model  # the reference: this model with its adapters disabled
    if args.use_peft:
        model = lora.apply(model, args)
    options = dict(loss=args.loss, backend=args.backend, **loss_options(args))
    ref_model = None
    if (args.ref == "model" and not adapters_off) or (args.ref == "precompute" and args.ref_model):
        ref_model = PreferenceModel(
            load_causal_lm(args.ref_model or args.model, args.gguf_file if not args.ref_model else None,
                           attn=args.attn, dtype=dtype, device=accelerator.device, online=args.online, masks=sharing),
            **options)
    filtering = {"filter_eps": args.filter_eps} if args.filter_eps else {}  # the policy's gradient only
    wrapper = PreferenceModel(model, ref_model=ref_model if args.ref == "model" else None,
                              ref_adapters_off=adapters_off and args.ref == "model",
                              disable_dropout=args.disable_dropout, **options, **filtering)

    computed = 0
    if args.ref == "precompute":
        reference = ref_model or wrapper
        model_hash = model_fingerprint(ref_model.model) if ref_model else base_hash  # before any step
        with adapters_disabled(model) if adapters_off else contextlib.nullcontext():
            computed = attach_reference(accelerator, args, train, steps[: total_updates * accum], reference,
                                        model_hash, "train")
            if evaluation:
                computed += attach_reference(accelerator, args, evaluation, eval_steps, reference, model_hash,
                                             "eval")
        say(f"reference: {computed} log-probs computed now, the others read from {train.cache.path.parent}")
        del reference, ref_model  # training holds one model

    optimizer, scheduler = make_optimizer(wrapper, args, total_updates)
    wrapper, optimizer = accelerator.prepare(wrapper, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # stepped by us: one step per optimizer update
    if args.use_peft:
        trainable_checkpoints(accelerator)

    log = MetricsLog(out, enabled=accelerator.is_main_process)
    # A resumed run drops the records past its checkpoint (written again); a fresh one those of any earlier run.
    log.truncate_after(start if resume_path else -1)
    if resume_path:
        load_checkpoint(accelerator, resume_path, trainable_only=args.use_peft)
        say(f"resumed from {resume_path} at update {start}")

    bar = progress_bar(accelerator, args, total=total_updates, initial=start, desc="training")
    wrapper.train()
    last, last_save = {}, time.monotonic()
    for update in range(start, total_updates):
        micro = steps[update * accum : (update + 1) * accum]
        prompts_total = sum(step.num_prompts for step in micro)
        sums = torch.zeros(len(METRICS), 2, dtype=torch.float64)
        tokens = torch.zeros(1, dtype=torch.float64)
        tic = time.perf_counter()
        for i, step in enumerate(micro):
            shard = step.shards[rank]
            batch = train.batch(shard, accelerator.device)
            tokens += batch["input_ids"].numel()
            sync = contextlib.nullcontext() if i == len(micro) - 1 else accelerator.no_sync(wrapper)
            with sync:
                with accelerator.autocast():
                    loss, metrics = wrapper(batch)
                accelerator.backward(loss * (len(shard) * world / prompts_total))
            accumulate(sums, loss.detach(), metrics, len(shard))
        crash_point("mid-step", update + 1)  # gradients computed, the optimizer not stepped
        grad_norm = (accelerator.clip_grad_norm_(wrapper.parameters(), args.max_grad_norm)
                     if args.max_grad_norm > 0 else None)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        done = update + 1
        last = reduce_metrics(accelerator, sums)
        seconds = time.perf_counter() - tic
        tokens = accelerator.reduce(tokens.to(accelerator.device), reduction="sum").item()
        epoch = micro[-1].epoch + (micro[-1].index + 1) / steps_per_epoch[micro[-1].epoch]
        record = {"split": "train", "step": done, "epoch": epoch, **last, "lr": scheduler.get_last_lr()[0],
                  "tokens": int(tokens), "seconds": seconds, "tokens_per_second": tokens / seconds}
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        if done % args.logging_steps == 0 or done == total_updates:
            log.write(record)
        bar.set_postfix(loss=f"{last['loss']:.4f}", margin=f"{last.get('margin', float('nan')):.3f}",
                        acc=f"{last.get('accuracy', float('nan')):.2f}")
        bar.update(1)
        if evaluation and args.eval_steps and done % args.eval_steps == 0 and done < total_updates:
            log.write({"split": "eval", "step": done, **evaluate(accelerator, wrapper, evaluation, eval_steps)})
        if checkpoint_due(accelerator, args, done, total_updates, last_save):
            save_checkpoint(accelerator, out, done, fingerprint, plan_digest(steps[: done * accum]),
                            args.save_total_limit)
            last_save = time.monotonic()
    bar.close()

    final_eval = evaluate(accelerator, wrapper, evaluation, eval_steps) if evaluation else None
    if final_eval is not None:
        log.write({"split": "eval", "step": total_updates, **final_eval})
    log.close()
    save_model(accelerator, wrapper, tokenizer, out / "model",
               merged=out / "merged-model" if args.merge_adapter else None)
    summary = {"updates": total_updates, "resumed_from": start, "train": last, "eval": final_eval,
               "data": data_record, "weak_negatives_per_prompt": sum(weak_drawn) / len(weak_drawn),
               "reference_logps_computed": computed, "seconds": time.perf_counter() - started,
               "world_size": world, "attention": model.config._attn_implementation,
               "prefix_sharing": {"on": sharing, "why_not": why_not or None},
               "options": dict(vars(args))}
    if accelerator.is_main_process:
        (out / "train_summary.json").write_text(json.dumps(summary, indent=1, default=str))
        if (out / "metrics.jsonl").is_file():
            plot_curves(out / "metrics.jsonl", out / "curves.png", title=f"{args.loss} on {Path(args.data).name}")
    say(f"saved {out / 'model'}; final train loss {last.get('loss', float('nan')):.4f}"
        + (f", eval loss {final_eval['loss']:.4f}" if final_eval else ""))
    return summary
