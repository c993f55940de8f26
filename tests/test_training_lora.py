"""LoRA adapters (peft) in the fused head and in `python -m training.epa --use-peft`: the reference with the
adapters off, the frozen head's skipped weight gradient, a LoRA'd or fully trained head, saving, merging,
evaluation of an adapter directory, the options' refusals, DDP and kill-and-resume."""
import json
import os
import subprocess
import sys
from pathlib import Path

import peft  # the test and train extras install it
import pytest
import torch
from tiny_models import tiny_causal_lm
from training_fixtures import SEED, cli, metrics, saved_weights

from epa_kernels.transformers import PreferenceModel, adapters_disabled, head_parameters
from training import models as models_module
from training.epa.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
LORA = ("--use-peft", "--lora-r", "4", "--lora-alpha", "8")


def one_line_error(capsys) -> str:
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1, error
    return error


def lora_model(seed=SEED, **config):
    torch.manual_seed(seed)
    options = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", **config}
    model = peft.get_peft_model(tiny_causal_lm("llama", seed=seed), peft.LoraConfig(task_type="CAUSAL_LM", **options))
    with torch.no_grad():  # B = 0 at initialisation would make the adapters the identity: move them
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model


def packed_batch(vocab=320, seed=0):
    """Two prompts, each with a positive and one strong negative, packed as the collator lays them out."""
    g = torch.Generator().manual_seed(seed)
    lengths = [9, 7, 8, 6]
    ids = torch.randint(0, vocab, (sum(lengths),), generator=g)
    positions = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    targets = torch.full_like(ids, -100)
    for s, n in enumerate(lengths):
        start = int(cu[s])
        targets[start + 3 : start + n - 1] = ids[start + 4 : start + n]
    return {"input_ids": ids[None], "position_ids": positions[None], "cu_seqlens": cu, "targets": targets,
            "groups": torch.tensor([[0, 1], [2, 3]]), "num_strong": 1}


def test_reference_with_adapters_off_is_the_base_model():
    """ref_adapters_off scores with the base model's function: equal to a plain copy of the base, while the
    policy (adapters on) differs; no second model is held."""
    model = lora_model()
    base = tiny_causal_lm("llama", seed=SEED)
    batch = packed_batch()
    wrapper = PreferenceModel(model, ref_adapters_off=True, backend="torch")
    expected = PreferenceModel(base, backend="torch").sequence_logps(batch)
    torch.testing.assert_close(wrapper.reference_logps(batch), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(wrapper.sequence_logps(batch), expected, atol=1e-3)
    assert wrapper.ref_model is None and wrapper.model.training  # the reference pass restores train mode


def test_frozen_head_gets_no_weight_gradient_and_adapters_do():
    """all-linear leaves the LM head out: it stays frozen, the fused backward skips d weight (3 GEMMs, not 4)."""
    wrapper = PreferenceModel(lora_model(), ref_adapters_off=True, backend="native")
    loss, _ = wrapper(packed_batch())
    loss.backward()
    assert wrapper.head.weight.grad is None
    grads = [p.grad for n, p in wrapper.named_parameters() if "lora_" in n]
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    frozen = [n for n, p in wrapper.named_parameters() if "lora_" not in n and p.grad is not None]
    assert not frozen, frozen


@pytest.mark.parametrize("config", [{"target_modules": ["q_proj", "lm_head"]}, {"modules_to_save": ["lm_head"]}],
                         ids=["lora-on-head", "head-trained-in-full"])
def test_a_targeted_head_trains_through_the_fused_kernel(config):
    """LoRA on the head (W + s·B·A) or the head in modules_to_save: the fused loss and its gradients equal those
    of the peft model's own logits, and the adapters-off reference uses the original head."""
    model = lora_model(**config)
    wrapper = PreferenceModel(model, ref_adapters_off=True, backend="torch")
    batch = packed_batch()
    hidden = wrapper.hidden_states(batch)
    weight, bias = head_parameters(wrapper.head)
    torch.testing.assert_close(torch.nn.functional.linear(hidden, weight, bias), wrapper.head(hidden))
    assert weight.requires_grad
    with adapters_disabled(model):
        off, _ = head_parameters(wrapper.head)
    torch.testing.assert_close(off, tiny_causal_lm("llama", seed=SEED).lm_head.weight)

    loss, _ = wrapper(batch)
    loss.backward()
    fused = {n: p.grad.clone() for n, p in wrapper.named_parameters() if p.grad is not None}
    wrapper.zero_grad()
    logits = wrapper.head(wrapper.hidden_states(batch)).float().log_softmax(-1)
    mask = batch["targets"] != -100
    token = torch.zeros_like(batch["targets"], dtype=torch.float32)
    token[mask] = logits[mask].gather(1, batch["targets"][mask, None])[:, 0]
    cu = batch["cu_seqlens"].tolist()
    logps = torch.stack([token[a:b].sum() for a, b in zip(cu[:-1], cu[1:], strict=True)])
    from epa_kernels import preference_loss

    ref = wrapper.reference_logps(batch)
    expected, _ = preference_loss(logps, ref, batch["groups"], loss="epa", beta=0.1, num_strong=1)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert fused.keys() == {n for n, p in wrapper.named_parameters() if p.grad is not None}
    for name, grad in fused.items():
        torch.testing.assert_close(grad, dict(wrapper.named_parameters())[name].grad, rtol=1e-4, atol=1e-6,
                                   msg=name)


def test_ref_adapters_off_needs_a_peft_model():
    with pytest.raises(ValueError, match="ref_adapters_off needs a peft model"):
        PreferenceModel(tiny_causal_lm("llama"), ref_adapters_off=True)


def test_lora_run_saves_adapters_merges_and_both_reference_modes_agree(workdir, tmp_path):
    """--ref precompute (adapters off, cached before the first step) and --ref model (adapters off in each step)
    give the same losses; OUTPUT_DIR/model is an adapter with the tokenizer; --merge-adapter writes the merged
    model, which equals base + adapters; the checkpoints hold the adapters only."""
    runs = {}
    for mode in ("precompute", "model"):
        out = tmp_path / mode
        assert main(cli(workdir, out, *LORA, "--max-steps", "2", "--ref", mode, "--merge-adapter",
                        "--save-steps", "1")) == 0
        runs[mode] = out
    for a, b in zip(metrics(runs["precompute"]), metrics(runs["model"]), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["margin"] == pytest.approx(b["margin"], abs=1e-5)
    out = runs["precompute"]
    names = {p.name for p in (out / "model").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= names
    assert "model.safetensors" not in names
    config = json.loads((out / "model" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((workdir / "model").resolve()) and config["r"] == 4
    adapters = saved_weights(out)
    assert adapters and all("lora_" in k for k in adapters)
    assert any(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k)  # trained away from B = 0
    checkpoint = sorted((out / "checkpoints").glob("step-*"))[-1] / "model.safetensors"
    from safetensors import safe_open

    with safe_open(str(checkpoint), framework="pt") as saved:
        assert all("lora_" in k for k in saved.keys())

    merged = models_module.load_causal_lm(str(out / "merged-model"))
    via_peft = models_module.load_policy(str(out / "model"))
    for name, value in merged.state_dict().items():
        torch.testing.assert_close(value, via_peft.state_dict()[name], msg=name)
    base = models_module.load_causal_lm(str(workdir / "model"))
    assert not torch.equal(merged.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


@pytest.fixture
def bf16_state():
    """accelerate keeps one process-wide state: a bf16 run in this process needs it reset, before and after."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_lora_works_with_prefix_sharing_checkpointing_bf16_and_weak_negatives(workdir, tmp_path, bf16_state):
    """The same first step with prefix sharing on and off, with and without gradient checkpointing (bf16,
    --max-prompt-length and weak negatives on throughout)."""
    common = (*LORA, "--max-steps", "1", "--bf16", "--max-prompt-length", "24", "--num-weak", "2")
    losses = {}
    for name, extra in {"shared": ("--prefix-sharing", "on"), "unshared": ("--prefix-sharing", "off"),
                        "checkpointed": ("--prefix-sharing", "on", "--gradient-checkpointing")}.items():
        out = tmp_path / name
        assert main(cli(workdir, out, *common, *extra)) == 0
        losses[name] = metrics(out)[0]["loss"]
        assert json.loads((out / "train_summary.json").read_text())["weak_negatives_per_prompt"] > 0
    assert losses["unshared"] == pytest.approx(losses["shared"], rel=2e-2)  # bf16: packing changes rounding
    assert losses["checkpointed"] == pytest.approx(losses["shared"], rel=1e-6)


def test_evaluate_reads_an_adapter_directory(workdir, tmp_path):
    """training.evaluate --policy ADAPTER: the base comes from the adapter's config (or --reference); the result
    equals evaluating the merged model against the base."""
    from training.evaluate import main as evaluate

    out = tmp_path / "run"
    assert main(cli(workdir, out, *LORA, "--max-steps", "2", "--merge-adapter")) == 0
    ranked = tmp_path / "ranked.jsonl"
    ranked.write_text("".join(json.dumps({"prompt": f"Question {i}?", "completions": ["Yes.", "No.", "Maybe so."],
                                          "scores": [1.0, -1.0, 0.2]}) + "\n" for i in range(3)))
    results = {}
    for name, policy, reference in (("adapter", out / "model", None),
                                    ("adapter+reference", out / "model", workdir / "model"),
                                    ("merged", out / "merged-model", workdir / "model")):
        args = ["--policy", str(policy), "--data", str(ranked), "--output", str(tmp_path / name),
                "--max-length", "64", "--num-generate", "0"]
        assert evaluate(args + (["--reference", str(reference)] if reference else [])) == 0
        results[name] = json.loads((tmp_path / name / "linearity.json").read_text())["per_prompt"]
    for name in ("adapter", "adapter+reference"):
        for a, b in zip(results[name], results["merged"], strict=True):
            assert a["implicit"] == pytest.approx(b["implicit"], abs=1e-5)
    assert any(abs(x) > 1e-4 for p in results["merged"] for x in p["implicit"])


def test_evaluate_needs_a_reference_for_a_full_model(workdir, tmp_path, capsys):
    from training.evaluate import main as evaluate

    assert evaluate(["--policy", str(workdir / "model"), "--data", "x.jsonl", "--output", str(tmp_path)]) == 2
    assert "--reference is required" in one_line_error(capsys)


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: the refusals must come before."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    from training.epa import trainer as train_module

    monkeypatch.setattr(train_module, "load_causal_lm", refuse)


@pytest.mark.parametrize("extra, message", [
    (("--lora-r", "8"), "--lora-r configure LoRA adapters: add --use-peft"),
    (("--lora-target-modules", "q_proj"), "--lora-target-modules configure LoRA adapters"),
    (("--merge-adapter",), "--merge-adapter merges LoRA adapters, and this run trains none"),
    ((*LORA, "--lora-dropout", "0.1"), "--lora-dropout 0.1 would be switched off by --disable-dropout"),
    ((*LORA, "--lora-target-modules", "all-linear", "q_proj"), "all-linear stands alone"),
    ((*LORA, "--lora-target-modules", "q_proj", "qkv_proj"), "--lora-target-modules: qkv_proj not in this model; "
                                                              "its linear layers are down_proj, gate_proj, k_proj"),
    ((*LORA, "--lora-modules-to-save", "score"), "--lora-modules-to-save: score not in this model"),
])
def test_bad_lora_options_are_one_line_before_any_model_loads(workdir, tmp_path, capsys, no_model_loads, extra,
                                                              message):
    try:
        code = main(cli(workdir, tmp_path / "run", *extra))  # a refusal after parsing returns 2
    except SystemExit as stop:  # one while parsing exits 2
        code = stop.code
    assert code == 2
    error = one_line_error(capsys)
    assert message in error, error


def test_use_peft_without_peft_names_the_extra(workdir, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(SystemExit):
        main(cli(workdir, tmp_path / "run", *LORA))
    assert "pip install 'epa-kernels[train]'" in one_line_error(capsys)


def test_lora_under_fsdp_is_refused_before_loading(workdir, tmp_path, capsys, monkeypatch, no_model_loads):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    assert main(cli(workdir, tmp_path / "run", *LORA)) == 2
    assert "--use-peft under FSDP is not supported" in one_line_error(capsys)


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun on CPU is exercised on Linux")
def test_lora_torchrun_two_ranks_equals_one_process(workdir, tmp_path):
    """DDP (gloo, 2 ranks) with adapters: one update over a step both ranks share equals one process."""
    budget = (*LORA, "--max-tokens-per-batch", "4000", "--max-steps", "1", "--backend", "torch", "--ref", "model")
    single = tmp_path / "single"
    assert main(cli(workdir, single, *budget)) == 0
    args = cli(workdir, tmp_path / "ddp", *budget)
    args[args.index("--max-tokens-per-batch", args.index("--no-progress")) + 1] = "2000"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                           "training.epa", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert metrics(tmp_path / "ddp")[0]["loss"] == pytest.approx(metrics(single)[0]["loss"], rel=1e-5)
    expected, got = saved_weights(single), saved_weights(tmp_path / "ddp")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)

