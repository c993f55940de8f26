"""Kernel backends of the fused LM-head log-prob op, one file per family, each with its launcher.

`torch_logprobs` documents the contract all of them implement (`forward`, `backward`).
"""
