"""The training program's test data: a saved tiny model with its tokenizer, a conversational multi-negative set,
and the command line the program tests share (the `workdir` fixture of conftest.py builds it)."""
import json
import random
from pathlib import Path

from tiny_models import tiny_causal_lm, tiny_tokenizer

SEED = 7
QUESTIONS = ["What is the capital of France?", "How many legs does a spider have?", "Who wrote Hamlet?",
             "Why is the sky blue?"]
ANSWERS = ["Paris is the capital.", "Eight legs.", "William Shakespeare.", "Light scatters.", "I love it.",
           "It is awful.", "A great tragedy.", "Blue light scatters the most."]


def make_workdir(root):
    """A saved tiny model + tokenizer and a conversational multi-negative data set (ragged K), in `root`."""
    print(f"seed {SEED}")
    model = tiny_causal_lm("llama_tied", seed=SEED)
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    rng = random.Random(SEED)
    with (root / "train.jsonl").open("w") as handle:
        for i in range(12):
            picked = rng.sample(ANSWERS, 4)
            handle.write(json.dumps({
                "prompt": [{"role": "user", "content": f"{QUESTIONS[i % 4]} ({i})"}],
                "chosen": [{"role": "assistant", "content": picked[0]}],
                "rejected": [[{"role": "assistant", "content": text}] for text in picked[1 : 2 + i % 3]],
            }) + "\n")
    return root


def cli(workdir, out, *extra):
    return ["--model", str(workdir / "model"), "--data", str(workdir / "train.jsonl"), "--output-dir", str(out),
            "--num-weak", "2", "--max-tokens-per-batch", "600", "--lr", "1e-3", "--seed", str(SEED),
            "--no-progress", *extra]


def saved_weights(path):
    """A run's saved weights: the model's, or a LoRA run's adapters."""
    from safetensors.torch import load_file

    adapter = path / "model" / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.is_file() else path / "model" / "model.safetensors"))


def metrics(out: Path) -> list[dict]:
    """A run's metrics.jsonl without its timings (they differ between any two runs)."""
    return [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "tokens_per_second")}
            for line in (out / "metrics.jsonl").read_text().splitlines()]
