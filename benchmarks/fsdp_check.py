"""One training step of `python -m training.epa` under accelerate's FSDP2 plugin against the same step unsharded.

    python -m benchmarks.fsdp_check --model /tmp/smollm2 --out bench-out/fsdp       # on a CUDA machine
    python -m benchmarks.fsdp_check --model DIR --out DIR --dry-run                 # CPU: both runs unsharded

`accelerate launch` with an FSDP2 config (one process, decoder layers wrapped, full state dict, CPU-RAM-efficient
loading, which moves the model to the meta device and re-ties its weights) runs one optimizer update; so does the
plain program. The check: the same logged loss, the same saved weights (up to fp32 reduction order), and tied
input/output embeddings still tied in the saved model. accelerate's FSDP plugin needs CUDA, so `--dry-run` runs the
second step unsharded too: it checks the plumbing, not FSDP. Writes fsdp_check.json, fsdp_check.md and the two runs'
logs to --out; the two saved models (SmolLM2-135M: 540 MB each) go to a temporary directory, removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from epa_kernels.provenance import environment

QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?", "Who wrote Hamlet?",
             "Why is the sky blue?", "What is two plus two?", "Where do penguins live?"]
ANSWERS = ["Paris.", "Eight.", "Shakespeare.", "Scattering of light.", "Four.", "Antarctica.", "I do not know.",
           "It is a secret."]
FSDP2_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_processes: 1
num_machines: 1
mixed_precision: 'no'
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_cpu_ram_efficient_loading: true
  fsdp_reshard_after_forward: true
"""


def write_data(path: Path) -> None:
    """12 prompts, each with its answer and two wrong ones (a fixed, offline set)."""
    rows = [{"prompt": f"{QUESTIONS[i % len(QUESTIONS)]} ({i})", "chosen": ANSWERS[i % len(QUESTIONS)],
             "rejected": [ANSWERS[(i + 1) % len(ANSWERS)], ANSWERS[-1 - i % 2]]} for i in range(12)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def train(command: list[str], log: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(command[:6])} … failed (exit {done.returncode}); see {log}")


def compare(plain: Path, sharded: Path) -> dict:
    """Loss, weights and ties of the two saved runs."""
    import torch
    from transformers import AutoModelForCausalLM

    loss = [json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss"] for run in (plain, sharded)]
    models = [AutoModelForCausalLM.from_pretrained(run / "model", dtype=torch.float32) for run in (plain, sharded)]
    states = [model.state_dict() for model in models]
    worst = max(((a - states[1][name]).abs().max() / a.abs().max().clamp(min=1e-30)).item()
                for name, a in states[0].items())
    tied = [model.get_output_embeddings().weight is model.get_input_embeddings().weight for model in models]
    return {"loss_unsharded": loss[0], "loss_fsdp2": loss[1], "loss_relative_difference": abs(loss[0] - loss[1])
            / max(abs(loss[0]), 1e-30), "weights_max_relative_difference": worst,
            "tied_config": models[1].config.tie_word_embeddings, "tied_unsharded": tied[0], "tied_fsdp2": tied[1]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a local model directory (tied embeddings make the check)")
    parser.add_argument("--out", default="bench-out/fsdp-check")
    parser.add_argument("--dry-run", action="store_true", help="CPU: the second run unsharded too (no FSDP)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_data(out / "data.jsonl")
    (out / "fsdp2.yaml").write_text(FSDP2_CONFIG)
    program = ["-m", "training.epa", "--model", args.model, "--data", str(out / "data.jsonl"), "--max-steps", "1",
               "--num-weak", "2", "--lr", "1e-4", "--max-tokens-per-batch", "4096", "--save-minutes", "0",
               "--backend", "torch" if args.dry_run else "auto", "--no-progress"]
    with tempfile.TemporaryDirectory() as folder:
        runs = Path(folder)
        train([sys.executable, *program, "--output-dir", str(runs / "unsharded")], out / "unsharded.log")
        launcher = ([sys.executable] if args.dry_run else
                    [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(out / "fsdp2.yaml")])
        train([*launcher, *program, "--output-dir", str(runs / "fsdp2")], out / "fsdp2.log")
        result = {"environment": environment("cpu" if args.dry_run else "cuda"), "dry_run": args.dry_run,
                  **compare(runs / "unsharded", runs / "fsdp2")}
    result["ok"] = bool(result["loss_relative_difference"] < 1e-5 and result["weights_max_relative_difference"] < 1e-4
                        and result["tied_fsdp2"] == result["tied_unsharded"])
    (out / "fsdp_check.json").write_text(json.dumps(result, indent=1))
    table = "\n".join(["| check | unsharded | FSDP2 |", "|---|---:|---:|",
                       f"| loss of the update | {result['loss_unsharded']:.6f} | {result['loss_fsdp2']:.6f} |",
                       f"| weights, max relative difference | | {result['weights_max_relative_difference']:.2e} |",
                       f"| head tied to the embeddings | {result['tied_unsharded']} | {result['tied_fsdp2']} |"])
    conditions = (f"{result['environment']['device']}; torch {result['environment']['torch']}; "
                  f"commit {result['environment']['commit']}" + ("; DRY RUN: both runs unsharded" if args.dry_run else
                                                                   "; FSDP2 through accelerate launch, one GPU"))
    (out / "fsdp_check.md").write_text(f"{table}\n\n{conditions}\n")
    print(f"{table}\n\n{conditions}\n{'ok' if result['ok'] else 'MISMATCH'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
