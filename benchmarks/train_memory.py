"""Training memory at long context: this project's trainer step against plain transformers and TRL's DPOTrainer.

    python -m benchmarks.train_memory                                    # the full sweep (hours on a CPU)
    python -m benchmarks.train_memory --prompt-tokens 6144 --response-tokens 1024 --responses 2 4 \\
        --impls epa-shared-gc trl-gc-precompute --out bench-out/train-memory
    python -m benchmarks.train_memory --prompt-tokens 2048 --response-tokens 256 --responses 4 \
        --impls epa-shared-gc-lora trl-gc-lora epa-shared-gc trl-gc --out bench-out/train-memory-lora

One full training step (forward, backward, AdamW step) of SmolLM2-135M (real weights) per case: one prompt of
`--prompt-tokens` and 1 + K responses of `--response-tokens`. Implementations (each case of each in its own process):
- `epa-shared-gc`: `PreferenceModel` with the fused EPA loss, gradient checkpointing and prefix sharing;
- `epa-shared-gc-flex`: the same under FlexAttention (a block-sparse mask instead of a dense [T, T] one; CUDA);
- `epa-gc`: the same without prefix sharing (every response repeats the prompt);
- `unfused-gc`: the model's own logits → log_softmax → `preference_loss`, gradient checkpointing;
- `trl-gc`: TRL's `DPOTrainer` with its defaults (gradient checkpointing on, reference model resident, its fused LM
  head), the K negatives expanded into K (chosen, rejected) pairs as TRL's maintainers recommend;
- `trl-gc-precompute`: the same with `precompute_ref_log_probs` (no reference model during training);
- `-lora` suffix (`epa-shared-gc-lora`, `trl-gc-lora`, `trl-gc-precompute-lora`): LoRA adapters trained instead of
  the weights, the same `peft.LoraConfig` for both (`--lora-r`, default 16; `--lora-alpha`, 32;
  `--lora-target-modules`, all-linear: every linear layer but the LM head; no dropout); ours wraps the PEFT model in
  `PreferenceModel`, TRL gets it as `peft_config`. The optimizer holds adapter state only. With LoRA, TRL keeps no
  reference model: its reference is the policy with the adapters disabled, a no_grad forward in every step of
  `trl-gc-lora`, none in `trl-gc-precompute-lora`.
The EPA implementations take reference log-probs as given (precomputed), like `trl-gc-precompute`.

Each measured step is, by default, the process's first (`--warmup 0`), after the AdamW state was created on zero
gradients (`benchmarks.train_step.prime_optimizer`): a warm-up step would double hours of CPU time. Memory is the whole
process's peak (CPU: peak RSS, VmHWM; CUDA: `max_memory_allocated`), model and optimizer state included, since TRL
keeps a second model where this project keeps none. For each implementation and number of responses, the sweep
stops at the first prompt length whose peak passes `--budget-gib` (or that fails), and the table reports the
longest prompt that fit. Results: results.json, results.md and memory.png in `--out`.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.train_step import add_lora_arguments, check_lora_arguments
from epa_kernels.provenance import environment

IMPLS = {  # name → (worker module, worker arguments)
    "epa-shared-gc": ("benchmarks.train_step", ["--worker", "shared-gc", "--measure", "time"]),
    "epa-shared-gc-flex": ("benchmarks.train_step", ["--worker", "shared-gc", "--measure", "time",
                                                     "--attn", "flex_attention"]),
    "epa-gc": ("benchmarks.train_step", ["--worker", "fused-gc", "--measure", "time"]),
    "unfused-gc": ("benchmarks.train_step", ["--worker", "unfused-gc", "--measure", "time"]),
    "trl-gc": ("benchmarks.trl_step", ["--gradient-checkpointing", "--measure", "time"]),
    "trl-gc-precompute": ("benchmarks.trl_step", ["--gradient-checkpointing", "--precompute-ref", "--measure", "time"]),
    "epa-shared-gc-lora": ("benchmarks.train_step", ["--worker", "shared-gc", "--measure", "time", "--lora"]),
    "trl-gc-lora": ("benchmarks.trl_step", ["--gradient-checkpointing", "--lora", "--measure", "time"]),
    "trl-gc-precompute-lora": ("benchmarks.trl_step", ["--gradient-checkpointing", "--precompute-ref", "--lora",
                                                       "--measure", "time"]),
}
DEFAULT_PROMPTS = (1024, 2048, 4096, 8192, 16384, 32768)


def run_case(impl: str, prompt_tokens: int, args, responses: int) -> dict:
    """One step of one implementation in a fresh process; {"error": ...} when it fails (e.g. out of memory)."""
    module, extra = IMPLS[impl]
    cmd = [sys.executable, "-m", module, *extra, "--model", args.model, "--prompt-tokens", str(prompt_tokens),
           "--response-tokens", str(args.response_tokens), "--responses", str(responses),
           "--warmup", str(args.warmup),
           "--repeats", "1", "--device", args.device]
    if "--lora" in extra:
        cmd += ["--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha),
                "--lora-target-modules", *args.lora_target_modules]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=dict(os.environ))
    case = {"impl": impl, "prompt_tokens": prompt_tokens, "response_tokens": args.response_tokens,
            "responses": responses}
    if done.returncode < 0:  # killed: on CPU usually SIGKILL from the kernel's OOM killer, with no traceback
        name = signal.Signals(-done.returncode).name
        return {**case, "error": f"killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        return {**case, "error": lines[-1] if lines else f"exit code {done.returncode}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**case, "tokens": result["tokens"], "step_s": result["step_s"],
            "peak_bytes": result["process_peak_bytes"], "loss": result["loss"],
            **{key: result[key] for key in ("trainable_params", "optimizer_state_bytes", "lora") if key in result}}


def sweep(args) -> list[dict]:
    budget = args.budget_gib * 2**30
    results = []
    for responses in args.responses:
        for impl in args.impls:
            for prompt_tokens in args.prompt_tokens:
                result = run_case(impl, prompt_tokens, args, responses)
                results.append(result)
                print(json.dumps(result), flush=True)
                if "error" in result or result["peak_bytes"] > budget:
                    break  # longer prompts need more: the sweep of this implementation ends here
    return results


def markdown(results: list[dict], args, env: dict) -> str:
    budget = args.budget_gib * 2**30
    lines = ["| responses | prompt tokens | implementation | tokens through the model | step s | peak MiB | "
             "× first peak | × first time |", "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for responses in args.responses:
        for prompt_tokens in args.prompt_tokens:
            rows = [r for r in results if r["responses"] == responses and r["prompt_tokens"] == prompt_tokens]
            base = next((r for r in rows if "error" not in r), None)
            for r in rows:
                if "error" in r:
                    lines.append(f"| 1 + {responses - 1} | {prompt_tokens} | {r['impl']} | — | — | — | — | — "
                                 f"(error: {r['error'][:80]}) |")
                    continue
                lines.append(
                    f"| 1 + {responses - 1} | {prompt_tokens} | {r['impl']} | {r['tokens']} | {r['step_s']:.1f} | "
                    f"{r['peak_bytes'] / 2**20:.0f} | {r['peak_bytes'] / base['peak_bytes']:.2f} | "
                    f"{r['step_s'] / base['step_s']:.2f} |")
    lines += ["", f"Longest prompt within {args.budget_gib:g} GiB (among those tried):", "",
              "| responses | " + " | ".join(args.impls) + " |", "|---:|" + "---:|" * len(args.impls)]
    for responses in args.responses:
        cells = []
        for impl in args.impls:
            fits = [r["prompt_tokens"] for r in results if r["impl"] == impl and r["responses"] == responses
                    and "error" not in r and r["peak_bytes"] <= budget]
            cells.append(str(max(fits)) if fits else "—")
        lines.append(f"| 1 + {responses - 1} | " + " | ".join(cells) + " |")
    lines += ["", f"{env['device']}; torch {env['torch']}; commit {env['commit']}; {env['date']}. Model "
              f"{args.model}; responses of {args.response_tokens} tokens; one measured step per process, after "
              f"{args.warmup} warm-up step(s) (the AdamW state created on zero gradients when none); peak = the "
              "whole process (CPU: peak RSS; CUDA: max_memory_allocated); ratios against the first implementation "
              "listed for the case."]
    lora = next((r for r in results if r.get("lora")), None)
    if lora:
        settings = lora["lora"]
        lines[-1] += (f" `-lora`: LoRA adapters only (r {settings['r']}, α {settings['alpha']}, targets "
                      f"{settings['target_modules']}, {lora['trainable_params']:,} trainable parameters), the same "
                      "peft.LoraConfig for both; TRL's reference is the policy with its adapters disabled.")
    return "\n".join(lines)


def plot(results: list[dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(args.responses), figsize=(5 * len(args.responses), 4), squeeze=False)
    for axis, responses in zip(axes[0], args.responses, strict=True):
        for impl in args.impls:
            points = [(r["prompt_tokens"], r["peak_bytes"] / 2**30) for r in results
                      if r["impl"] == impl and r["responses"] == responses and "error" not in r]
            if points:
                axis.plot(*zip(*points, strict=True), marker="o", label=impl)
        axis.axhline(args.budget_gib, color="grey", linestyle="--", linewidth=1)
        axis.set(title=f"1 + {responses - 1} responses of {args.response_tokens}", xlabel="prompt tokens",
                 ylabel="peak memory (GiB)", xscale="log")
        axis.grid(alpha=0.3)
    axes[0][0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", help="model directory, .gguf, or 'smollm2' (default)")
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=list(DEFAULT_PROMPTS))
    parser.add_argument("--response-tokens", type=int, default=1024)
    parser.add_argument("--responses", type=int, nargs="+", default=[2, 4, 16],
                        help="1 + K responses per prompt (default 1+1, 1+3, 1+15 = 1+3 strong + 12 weak)")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    parser.add_argument("--budget-gib", type=float, default=20.0, help="the memory budget of 'longest that fits'")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=0,
                        help="untimed steps before the measured one (default 0: hours of CPU time; 1 on a GPU "
                             "keeps CUDA start-up and kernel selection out of the time)")
    add_lora_arguments(parser, switch=False)  # the settings of the `-lora` implementations
    parser.add_argument("--out", help="directory for results.json, results.md and memory.png")
    args = parser.parse_args(argv)
    if min(args.prompt_tokens) < 1 or args.response_tokens < 1:
        parser.error("--prompt-tokens and --response-tokens must be ≥ 1")
    if min(args.responses) < 2:
        parser.error("--responses must be ≥ 2 (a positive and a negative)")
    if args.warmup < 0:
        parser.error("--warmup must be ≥ 0")
    if not args.budget_gib > 0:
        parser.error("--budget-gib must be > 0")
    args.lora = any("--lora" in IMPLS[impl][1] for impl in args.impls)
    check_lora_arguments(parser, args)
    args.prompt_tokens = sorted(set(args.prompt_tokens))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    results = sweep(args)
    env = environment(torch.device(args.device))
    table = markdown(results, args, env)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"environment": env, "options": vars(args),
                                                      "results": results}, indent=1))
        (out / "results.md").write_text(table + "\n")
        plot(results, args, out / "memory.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
