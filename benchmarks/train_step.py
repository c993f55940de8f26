"""One full preference-training step of a real causal LM: the fused loss against materialised logits.

    python -m benchmarks.train_step                     # SmolLM2-135M, 1 prompt of 256 + 4 responses of 512
    python -m benchmarks.train_step --impls fused unfused fused-gc unfused-gc --out bench-out/train-step
    python -m benchmarks.train_step --prompt-tokens 2048 --response-tokens 256 --responses 16 \
        --impls fused-gc shared-gc --what time      # prefix sharing: one 2k prompt, 1 + 3 + 12 responses
    python -m benchmarks.train_step --impls shared-gc --lora --lora-r 16 --what time   # LoRA adapters only

Each implementation runs in fresh processes: the process loads the model, makes AdamW, and runs warm-up steps, so
the optimizer state exists; then it measures steps (forward, backward, optimizer step, zero_grad). On CPU, memory
and time come from two processes: memory under the harness's glibc settings (every block ≥ 64 KiB is its own
mapping, so the resident set tracks live memory), time under the default allocator (those settings fault every
page of every activation in again and slow a step down several-fold). Reported per step:
- peak memory above the model and optimizer state (RSS on CPU; `max_memory_allocated` on CUDA);
- the median step time and the loss. Both implementations must agree on the loss, which is checked.

- `fused`: `PreferenceModel` (decoder → final hidden states → `fused_linear_preference_loss`), no logits;
- `unfused`: the model's own forward to logits [N, V], log_softmax, gather, per-sequence sums, then
  `preference_loss` (what a plain transformers loop does);
- `shared`: `fused` with prefix sharing: the prompt once, each response as a branch that sees it
  (`epa_kernels.transformers.prefix_sharing`), so far fewer tokens go through the model;
- `-gc` suffix: the same with gradient checkpointing of the decoder layers.
`fused` and `unfused` pack every sequence as prompt ⊕ response into one row (position_ids restart per
sequence), the same batch for both; `shared` packs the same sequences in the prefix-shared layout.

`--lora` trains LoRA adapters instead of the weights: `peft.get_peft_model` with `LoraConfig(task_type="CAUSAL_LM",
r=--lora-r, lora_alpha=--lora-alpha, target_modules=--lora-target-modules, lora_dropout=0)` (default r 16, α 32,
"all-linear": every linear layer but the LM head), wrapped in `PreferenceModel` like the plain model (its fused head
then computes no weight gradient: the head is frozen). AdamW holds the adapters' state only; the reference log-probs
are given as before (with adapters the reference is the base model: the adapters disabled). Results then carry the
LoRA settings, `trainable_params` and `trainable_bytes`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.harness import CPU_MEMORY_ENV, _proc_status, cpu_memory_exact
from epa_kernels.provenance import environment

IMPLS = ("fused", "unfused", "shared", "fused-gc", "unfused-gc", "shared-gc")
TEXT = ("Preference optimisation trains a language model to rank the responses people prefer above the ones "
        "they reject. Each prompt comes with several answers: a good one, some weaker ones, and answers written "
        "for other questions. The model learns from all of them at once, which costs memory at every token. ")


def build_batch(tokenizer, prompt_tokens: int, response_tokens: int, responses: int, device, *,
                prefix_sharing: bool = False):
    """One prompt and `responses` responses of real text, packed (prefix-shared or not)."""
    from epa_kernels.transformers import BatchPlanner, PreferenceExample

    ids = tokenizer(TEXT * (1 + (prompt_tokens + responses * response_tokens) // 40))["input_ids"]
    prompt = tuple(ids[:prompt_tokens])
    answers = tuple(tuple(ids[prompt_tokens + i * 7 : prompt_tokens + i * 7 + response_tokens])
                    for i in range(responses))
    example = PreferenceExample(row=0, prompt=prompt, responses=answers)
    planner = BatchPlanner([example], max_tokens_per_batch=(prompt_tokens + response_tokens) * responses,
                           prefix_sharing=prefix_sharing)
    batch = planner.collate(planner.plan_epoch(0)[0].shards[0], device)
    # Fixed reference log-probs near what a 135M model gives per token (≈ −2.5): the loss is in its usual range.
    batch["ref_logps"] = -2.5 * response_tokens + torch.arange(responses, dtype=torch.float64, device=device)
    return batch


class UnfusedStep(torch.nn.Module):
    """Materialised logits → per-sequence log-probs → preference_loss: the plain transformers way."""

    def __init__(self, model, **loss_kw):
        super().__init__()
        self.model, self.loss_kw = model, loss_kw

    def forward(self, batch):
        from epa_kernels import preference_loss

        logits = self.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        logits = logits[0].float()
        targets = batch["targets"]
        valid = targets != -100
        token_logps = torch.log_softmax(logits, dim=-1).gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
        token_logps = torch.where(valid, token_logps, 0.0)
        seq_ids = torch.repeat_interleave(torch.arange(batch["cu_seqlens"].numel() - 1, device=logits.device),
                                          batch["cu_seqlens"].diff().long())
        logps = torch.zeros(seq_ids.max() + 1, dtype=torch.float64, device=logits.device).index_add(
            0, seq_ids, token_logps.double())
        return preference_loss(logps, batch["ref_logps"], batch["groups"], num_strong=batch["num_strong"],
                               **self.loss_kw)


def add_lora_arguments(parser, switch: bool = True) -> None:
    """--lora (unless not `switch`) and its settings: this worker's, benchmarks.trl_step's and train_memory's."""
    if switch:
        parser.add_argument("--lora", action="store_true", help="train LoRA adapters (peft) instead of the weights")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (default 32)")
    parser.add_argument("--lora-target-modules", nargs="+", default=["all-linear"],
                        help="module names to adapt (default all-linear: every linear layer but the LM head)")


def check_lora_arguments(parser, args) -> None:
    if args.lora and (args.lora_r < 1 or not args.lora_alpha > 0):
        parser.error("--lora-r must be ≥ 1 and --lora-alpha > 0")


def lora_settings(args) -> dict | None:
    """The LoRA settings a result records (None without --lora)."""
    if not args.lora:
        return None
    targets = args.lora_target_modules
    return {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": 0.0,
            "target_modules": targets[0] if targets == ["all-linear"] else list(targets)}


def lora_config(args):
    """The `peft.LoraConfig` of --lora-r/--lora-alpha/--lora-target-modules; both workers build theirs here."""
    from peft import LoraConfig

    settings = lora_settings(args)
    return LoraConfig(task_type="CAUSAL_LM", r=settings["r"], lora_alpha=settings["alpha"],
                      lora_dropout=settings["dropout"], target_modules=settings["target_modules"])


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    """The parameters the optimizer steps (those that require grad: with LoRA, the adapters')."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise SystemExit("no trainable parameters")
    return trainable


def check_adapters_only(model) -> None:
    """With LoRA only the adapter matrices may train: a trainable base weight would be a full-weight step."""
    others = [name for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name]
    if others or not any("lora_" in name for name, _ in model.named_parameters()):
        raise SystemExit(f"LoRA: trainable parameters other than the adapters (or no adapters): {others[:5]}")


def prime_optimizer(optimizer, parameters) -> None:
    """Create the AdamW state without a training step (one step on zero gradients), so that a measured first step
    runs above a resident optimizer state like every later one, at the cost of no warm-up step (minutes on CPU at
    long context)."""
    parameters = [p for p in parameters if p.requires_grad]
    for p in parameters:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(impl: str, args) -> dict:
    """Run in a fresh process: load, warm up, then run `args.repeats` measured steps (`args.measure`: time,
    memory, or both)."""
    from epa_kernels.transformers import PreferenceModel
    from training.models import load_causal_lm, load_tokenizer

    device = torch.device(args.device)
    tokenizer = load_tokenizer(args.model)
    model = load_causal_lm(args.model, device=device, attn=args.attn)
    if impl.endswith("-gc"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if args.lora:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(args))
        check_adapters_only(model)
    model.train()
    loss_kw = {"loss": "epa", "beta": 0.1}
    step_module = UnfusedStep(model, **loss_kw) if impl.startswith("unfused") else PreferenceModel(model, **loss_kw)
    trainable = trainable_parameters(model)
    optimizer = torch.optim.AdamW(trainable, lr=1e-7)
    batch = build_batch(tokenizer, args.prompt_tokens, args.response_tokens, args.responses, device,
                        prefix_sharing=impl.startswith("shared"))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())

    def step():
        loss, _ = step_module(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(args.warmup):
        step()
    if args.warmup == 0:
        prime_optimizer(optimizer, model.parameters())
    optimizer_state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                          if torch.is_tensor(t))
    times, peaks, process_peaks, losses = [], [], [], []
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            base = _proc_status()["VmRSS"]
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # the peak resident set restarts from the current one
        tic = time.perf_counter()
        losses.append(step())
        if device.type == "cuda":
            torch.cuda.synchronize()
            process_peaks.append(torch.cuda.max_memory_allocated())
        else:
            process_peaks.append(_proc_status()["VmHWM"])
        peaks.append(process_peaks[-1] - base)
        times.append(time.perf_counter() - tic)
    if not all(map(math.isfinite, losses)):  # a broken step is a failure, not a data point
        raise SystemExit(f"{impl}: non-finite loss {losses} at {batch['input_ids'].numel()} tokens")
    # process_peak_bytes: the whole process's peak during the measured steps (model, optimizer state and all); an
    # upper bound of live memory on CPU even under the default allocator, which may keep freed pages resident.
    result = {"impl": impl, "loss": losses[0], "tokens": batch["input_ids"].numel(), "weights_bytes": weights,
              "trainable_params": sum(p.numel() for p in trainable),
              "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
              "optimizer_state_bytes": optimizer_state, "process_peak_bytes": max(process_peaks),
              "lora": lora_settings(args)}
    if args.measure in ("time", "both"):
        result.update(step_s=statistics.median(times), times_s=times)
    if args.measure in ("memory", "both"):
        result["peak_bytes"] = max(peaks)
    return result


def run_in_subprocess(impl: str, argv: list[str], measure_what: str) -> dict:
    env = {**os.environ, **(CPU_MEMORY_ENV if measure_what == "memory" else {})}
    done = subprocess.run([sys.executable, "-m", "benchmarks.train_step", "--worker", impl, "--measure",
                           measure_what, *argv], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"impl": impl, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_implementation(impl: str, argv: list[str], device: torch.device, what: str = "both") -> dict:
    """Time and/or memory of one implementation: one process on CUDA, two on CPU (see the module docstring)."""
    if device.type == "cuda" or what == "time":
        return run_in_subprocess(impl, argv, what)
    if what == "memory":
        return run_in_subprocess(impl, argv, "memory")
    timed = run_in_subprocess(impl, argv, "time")
    if "error" in timed:
        return timed
    measured = run_in_subprocess(impl, argv, "memory")
    if "error" in measured:
        return measured
    return {**measured, **timed, "loss_memory_run": measured["loss"],
            "process_peak_bytes": measured["process_peak_bytes"]}


def markdown(results: list[dict], args, env: dict) -> str:
    """The table; ratios are against the first implementation listed."""
    base = next((r for r in results if "error" not in r), None)
    name = base["impl"] if base else "first"
    lines = [f"| implementation | tokens | step s | × {name} time | peak MiB above model + optimizer | "
             f"× {name} memory | process peak MiB | loss |", "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def cells(r, key, scale, digits):
        if key not in r or key not in base:
            return "—", "—"
        return f"{r[key] / scale:.{digits}f}", f"{r[key] / base[key]:.2f}"

    for r in results:
        if "error" in r:
            lines.append(f"| {r['impl']} | — | — | — | — | — | — | error: {r['error']} |")
            continue
        step, step_ratio = cells(r, "step_s", 1, 2)
        peak, peak_ratio = cells(r, "peak_bytes", 2**20, 0)
        lines.append(f"| {r['impl']} | {r['tokens']} | {step} | {step_ratio} | {peak} | {peak_ratio} | "
                     f"{r['process_peak_bytes'] / 2**20:.0f} | {r['loss']:.6f} |")
    first = next(r for r in results if "error" not in r)
    lora = first.get("lora")
    trained = (f"LoRA adapters (r {lora['r']}, α {lora['alpha']:g}, targets {lora['target_modules']}: "
               f"{first['trainable_params']:,} parameters)" if lora else "all weights")
    lines += ["", f"{env['device']}; torch {env['torch']}; commit {env['commit']}; {env['date']}. Model "
              f"{args.model}: weights {first['weights_bytes'] / 2**20:.0f} MiB, trained: {trained}, AdamW state "
              f"{first['optimizer_state_bytes'] / 2**20:.0f} MiB (fp32). One prompt of {args.prompt_tokens} tokens "
              f"and {args.responses} responses of {args.response_tokens}; EPA "
              f"loss, β = 0.1; median of {args.repeats} step(s) after {args.warmup} warm-up; memory = peak during a "
              "step (forward, backward, AdamW step) above the resident model and optimizer state, gradients "
              "included; process peak = the whole process (model, optimizer state, everything; from the memory run "
              "when there is one); each implementation in its own processes (CPU: one for time, one for memory)."]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="model directory, .gguf, or 'smollm2' (default)")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--response-tokens", type=int, default=512)
    parser.add_argument("--responses", type=int, default=4, help="1 positive + K negatives (default 1 + 3)")
    parser.add_argument("--impls", nargs="+", default=["fused", "unfused"], choices=IMPLS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--attn", default="auto", help="attention implementation (training.models.ATTENTION; "
                        "default auto: the model's default, sdpa; the weights are fp32, so never flash-attn)")
    parser.add_argument("--what", choices=("both", "time", "memory"), default="both",
                        help="measure time, memory or both (CPU: both takes two processes per implementation)")
    add_lora_arguments(parser)
    parser.add_argument("--out", help="directory for results.json and results.md")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=("time", "memory", "both"), default="both", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("prompt_tokens", "response_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be ≥ 1")
    if args.warmup < 0:
        parser.error("--warmup must be ≥ 0 (0: the AdamW state is created on zero gradients instead)")
    if args.responses < 2:
        parser.error("--responses must be ≥ 2 (a positive and a negative)")
    check_lora_arguments(parser, args)
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        if torch.device(args.device).type == "cpu" and args.measure != "time" and not cpu_memory_exact():
            raise SystemExit("a memory worker must run under benchmarks.harness.CPU_MEMORY_ENV")
        print(json.dumps(measure(args.worker, args)))
        return 0
    passthrough = [a for a in argv if a not in args.impls and a != "--impls"]
    results = [run_implementation(impl, passthrough, torch.device(args.device), args.what) for impl in args.impls]
    env = environment(torch.device(args.device))
    ok = [r for r in results if "error" not in r]
    if len(ok) > 1:
        spread = max(abs(r["loss"] - ok[0]["loss"]) for r in ok)
        if spread > 1e-3 * max(1.0, abs(ok[0]["loss"])):
            raise SystemExit(f"the implementations disagree on the loss by {spread:.2e}: not timing a wrong step")
    table = markdown(results, args, env)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"environment": env, "options": vars(args),
                                                      "results": results}, indent=1))
        (out / "results.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
