"""Tiny random-weight causal LMs and an offline byte-level tokenizer for fast tests (no hub, no downloads)."""
from __future__ import annotations

import functools

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "What is the capital of France? Paris is the capital of France.",
    "How many legs does a spider have? A spider has eight legs, which is more than an insect.",
    "Who wrote Hamlet? William Shakespeare wrote it around 1600; a great and terrible tragedy.",
    "Why is the sky blue? Sunlight scatters off air molecules, and blue light scatters the most.",
    "I love this, it is wonderful and good. I hate that, it is awful and bad.",
] * 20


@functools.cache
def tiny_tokenizer():
    """A byte-level BPE tokenizer (vocab ≈ 300) with a ChatML template; eos = <|im_end|>, bos = <|bos|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>",
                                   eos_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(arch: str, vocab_size: int = 320, **overrides):
    """A 2-layer config of the named architecture (llama, qwen2, qwen3, mistral, gemma2, gemma3, gpt_neox,
    cohere, granite); gemma2/gemma3 get final-logit softcapping and a short sliding window."""
    import transformers as T

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=3)
    kv = dict(num_key_value_heads=2)
    configs = {
        "llama": lambda: T.LlamaConfig(**common, **kv),
        "llama_tied": lambda: T.LlamaConfig(**common, **kv, tie_word_embeddings=True),
        "qwen2": lambda: T.Qwen2Config(**common, **kv),
        "qwen3": lambda: T.Qwen3Config(**common, **kv, head_dim=8),
        "mistral": lambda: T.MistralConfig(**common, **kv),
        "gemma2": lambda: T.Gemma2Config(**common, **kv, head_dim=8, final_logit_softcapping=5.0,
                                         sliding_window=4),
        "gemma3": lambda: T.Gemma3TextConfig(**common, **kv, head_dim=8, final_logit_softcapping=5.0,
                                             sliding_window=4),
        "gpt_neox": lambda: T.GPTNeoXConfig(**common),
        "cohere": lambda: T.CohereConfig(**common, **kv, logit_scale=0.5),
        "granite": lambda: T.GraniteConfig(**common, **kv, logits_scaling=4.0),
    }
    config = configs[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def tiny_causal_lm(arch: str = "llama", *, seed: int = 0, dtype=torch.float32, attn: str | None = None, **overrides):
    """A random-weight causal LM in eval mode (dropout off), weights drawn from `seed`."""
    import transformers as T

    torch.manual_seed(seed)
    kwargs = {"attn_implementation": attn} if attn else {}
    model = T.AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=dtype, **kwargs)
    return model.eval()
