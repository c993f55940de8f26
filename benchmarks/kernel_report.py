"""Registers, spills and shared memory of every shipped Triton config, compiled for real GPUs without one.

    python -m benchmarks.kernel_report                       # every variant × sm_80, sm_86, sm_89, sm_90a
    python -m benchmarks.kernel_report --targets sm_90a --out bench-out/kernel-report

Triton compiles ahead of time for any NVIDIA target on a machine with no GPU (`triton.compile` of an
`ASTSource` with a `GPUTarget`); the `cuobjdump` shipped in Triton's NVIDIA backend reads the cubin's
resource usage. Each *variant* is one kernel (forward or backward) with one shipped tile config, one input
dtype and one set of compile-time flags, exactly as the launchers in `epa_kernels/ops/triton_logprobs.py` pick
them: the hot path (no bias, no softcap, D a multiple of the tile, exact gradient) and the path with every
flag on (bias, softcap, entropy, gradient filter, ragged D), which needs the most registers. Reported per
target: registers per thread, stack frame (bytes spilled to local memory per thread), dynamic shared memory
per block and whether it fits the target's per-block limit. Cut Cross-Entropy's forward and backward kernels
(when installed) are compiled the same way at their default configs, for comparison. Takes about 5 s per compile
on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from epa_kernels.ops import triton_logprobs as kernels
from epa_kernels.provenance import environment

# Compute capability of each target; sm_90 compiles as sm_90a (wgmma, TMA).
TARGETS = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90a": 90}
# The most dynamic shared memory one block may opt into (CUDA C++ Programming Guide, "Technical Specifications
# per Compute Capability"): 163 KB on sm_80, 99 KB on sm_86 / sm_89, 227 KB on sm_90.
SHARED_PER_BLOCK = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Variant:
    """One compiled form of a kernel: its tile config, input dtype and compile-time flags."""

    name: str
    kernel: str  # "forward" or "backward"
    dtype: torch.dtype
    num_tokens: int  # a token count that makes the launcher pick this config
    flags: dict = field(default_factory=dict)  # bias, softcap, entropy, filter, even_d, stored (the scheme)

    @property
    def config(self):
        if self.kernel == "forward":
            return kernels._gpu_config(self.num_tokens, self.dtype, kernels._FORWARD_CONFIG,
                                       kernels._FORWARD_CONFIG_FEW_TOKENS)
        return kernels._gpu_config(self.num_tokens, self.dtype, kernels._BACKWARD_CONFIG,
                               kernels._BACKWARD_CONFIG_FEW_TOKENS)

    def jit(self):
        return _jit_function(kernels._forward_kernel if self.kernel == "forward" else kernels._backward_kernel)

    def arguments(self) -> tuple[dict, dict]:
        return _arguments(self)

    def divisible_ints(self) -> set:
        """Integer arguments the JIT sees divisible by 16 at the hot shapes (M = 8192 or 64, V = 128256, D = 4096;
        v_per_split is a multiple of BLOCK_V); the ragged-D variant has D % 16 != 0."""
        return {"M", "V", "v_per_split"} | ({"D"} if self.flags.get("even_d", True) else set())


@dataclass(frozen=True)
class PeerVariant:
    """A peer's Triton kernel at its shipped default config, compiled exactly like ours for comparison."""

    name: str
    module: str
    kernel: str  # attribute of `module`
    types: dict  # runtime argument types; None: a None argument (constexpr)
    constants: dict  # constexpr values, including integer arguments the JIT specialises (== 1)
    config: kernels._Config
    divisible: frozenset = frozenset()  # integer arguments divisible by 16 at the hot shape

    def jit(self):
        import importlib

        return _jit_function(getattr(importlib.import_module(self.module), self.kernel))

    def arguments(self) -> tuple[dict, dict]:
        return self.types, self.constants

    def divisible_ints(self) -> set:
        return set(self.divisible)


ALL_ON = {"bias": True, "softcap": True, "entropy": True, "filter": True, "even_d": False}


def shipped_variants() -> list[Variant]:
    """Every config the launchers ship, on its hot path, and the bf16 ones with every flag on."""
    many, few = 8192, kernels._FEW_TOKENS
    variants = []
    for dtype in (torch.bfloat16, torch.float16):
        tag = TRITON_TYPES[dtype]
        variants += [
            Variant(f"forward {tag}", "forward", dtype, many),
            Variant(f"forward {tag} + entropy", "forward", dtype, many, {"entropy": True}),
            Variant(f"forward {tag}, few tokens", "forward", dtype, few),
            Variant(f"backward {tag}", "backward", dtype, many),
            Variant(f"backward {tag}, few tokens", "backward", dtype, few),
        ]
    variants += [
        Variant("forward bf16, every flag", "forward", torch.bfloat16, many, ALL_ON),
        Variant("backward bf16, every flag", "backward", torch.bfloat16, many, ALL_ON),
        Variant("backward bf16, stored scheme", "backward", torch.bfloat16, many, {"stored": True}),
        Variant("forward fp32", "forward", torch.float32, many),
        Variant("backward fp32", "backward", torch.float32, many),
    ]
    return variants


def cce_variants() -> list[PeerVariant]:
    """Cut Cross-Entropy's forward (log-sum-exp) and backward kernels as `linear_cross_entropy(e, c, targets)`
    launches them by default (bf16, mean reduction, filter_eps="high", no softcap, no ignored tokens, no vocabulary
    sorting, contiguous inputs), at the configs it uses when not autotuning (`cut_cross_entropy/tl_autotune.py`).
    Empty when cut-cross-entropy is not installed."""
    import importlib.util

    if importlib.util.find_spec("cut_cross_entropy") is None:
        return []
    i32 = "i32"
    hot = frozenset({"B", "V", "D", "stride_eb", "stride_cv"})  # at B = 8192, V = 128256, D = 4096
    forward = PeerVariant(
        "CCE forward bf16 (peer)", "cut_cross_entropy.cce_lse_forward", "_cce_lse_forward_kernel",
        types={"E": "*bf16", "C": "*bf16", "LSE": "*fp32", "LA": None, "Locks": "*u32", "Valids": None,
               "softcap": None, "B": i32, "V": i32, "D": i32, "stride_eb": i32, "stride_cv": i32,
               "num_locks": i32, "B_BIN": i32},
        constants={"stride_ed": 1, "stride_cd": 1, "stride_lse_b": 1, "stride_vb": 1, "HAS_VALIDS": False,
                   "BLOCK_B": 256, "BLOCK_V": 128, "BLOCK_D": 32, "GROUP_B": 8, "EVEN_D": True,
                   "HAS_SOFTCAP": False, "HAS_LA": False, "DOT_PRECISION": "ieee"},
        config=kernels._Config(block_m=256, block_v=128, block_d=32, num_warps=8, num_stages=3), divisible=hot)
    backward = PeerVariant(
        "CCE backward bf16 (peer)", "cut_cross_entropy.cce_backward", "_cce_backward_kernel",
        types={"E": "*bf16", "C": "*bf16", "LSE": "*fp32", "dOut": "*fp32", "grad_scale": "fp32", "Valids": None,
               "VocabOrdering": None, "softcap": None, "Targets": "*i64", "dE": "*bf16", "dELocks": "*i32",
               "dC": "*bf16", "dCLocks": "*i32", "B": i32, "D": i32, "V": i32, "n_de_locks_0": i32,
               "n_de_locks_1": i32, "n_dc_locks_0": i32, "n_dc_locks_1": i32, "stride_eb": i32, "stride_cv": i32,
               "filter_eps": "fp32", "B_BIN": i32},
        constants={"stride_ed": 1, "stride_cd": 1, "stride_vb": 1, "BLOCK_B": 128, "BLOCK_V": 128, "BLOCK_D": 32,
                   "MM_BACK_BLOCK_D": 64, "GROUP_B": 8, "EVEN_D": True, "MM_BACK_EVEN_D": True, "ITEM_DO": True,
                   "HAS_VALIDS": False, "HAS_VOCAB_ORDERING": False, "FILTER_GRAD": True, "HAS_TARGETS": True,
                   "HAS_SOFTCAP": False, "SHIFT": False, "REQUIRES_GRAD": True},
        config=kernels._Config(block_m=128, block_v=128, block_d=32, num_warps=4, num_stages=4), divisible=hot)
    return [forward, backward]


def _jit_function(kernel):
    """The JITFunction under the @triton.heuristics wrappers."""
    import triton

    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def _arguments(variant: Variant) -> tuple[dict, dict]:
    """(runtime argument types, constexpr values) as the launcher would pass them; None pointers are constexpr."""
    dtype, flags, cfg = TRITON_TYPES[variant.dtype], variant.flags, variant.config
    pointer = f"*{dtype}"
    common = {
        "hidden_ptr": pointer, "weight_ptr": pointer, "bias_ptr": pointer if flags.get("bias") else None,
        "targets_ptr": "*i64", "M": "i32", "V": "i32", "D": "i32", "inv_temp": "fp32",
        "softcap": "fp32" if flags.get("softcap") else None,
    }
    constants = {
        "HAS_BIAS": bool(flags.get("bias")), "HAS_SOFTCAP": bool(flags.get("softcap")),
        "EVEN_D": flags.get("even_d", True), "DOT_PRECISION": kernels._dot_precision(variant.dtype),
        "UPCAST_DOT": False, "BLOCK_M": cfg.block_m, "BLOCK_V": cfg.block_v, "BLOCK_D": cfg.block_d,
    }
    if variant.kernel == "forward":
        types = {**common, "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32", "part_tgt_ptr": "*fp32",
                 "part_ez_ptr": "*fp32" if flags.get("entropy") else None, "v_per_split": "i32"}
        constants["HAS_ENTROPY"] = bool(flags.get("entropy"))
    else:
        stored = bool(flags.get("stored"))  # the stored scheme: da to a buffer, no gradient atomics
        types = {**common, "lse_ptr": "*fp32", "coef_a_ptr": "*fp32", "coef_b_ptr": "*fp32",
                 "coef_c_ptr": "*fp32" if flags.get("entropy") else None,
                 "d_hidden_ptr": None if stored else "*fp32", "d_weight_ptr": None if stored else "*fp32",
                 "d_bias_ptr": "*fp32" if flags.get("bias") else None, "da_ptr": pointer if stored else None,
                 "filter_eps": "fp32" if flags.get("filter") else None}
        constants.update(HAS_COEF_C=bool(flags.get("entropy")), HAS_FILTER=bool(flags.get("filter")),
                         NEED_HIDDEN=not stored, NEED_WEIGHT=not stored, NEED_BIAS=bool(flags.get("bias")),
                         STORE_DA=stored, GROUP_M=kernels._BACKWARD_GROUP_M)
    return types, constants


def compile_kernel(jit, types: dict, constants: dict, capability: int, *, divisible=(), num_warps: int,
                   num_stages: int | None = None):
    """A Triton kernel compiled for sm_<capability> without a GPU, with the hints the JIT would give it: pointers
    16-byte aligned (torch allocations) and the `divisible` integer arguments divisible by 16."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jit = _jit_function(jit)
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(jit.arg_names):
        if name in constants or types.get(name) is None:
            signature[name] = "constexpr"
            constexprs[(index,)] = constants.get(name)
        else:
            signature[name] = types[name]
            # The JIT specialises what it sees divisible by 16: torch allocations (16-byte aligned) and the sizes
            # at the hot shapes. Without these hints loads are not vectorised nor the loops pipelined, and the
            # report differs from the kernel a GPU runs (one stage of shared memory, other registers and spills:
            # checked against the kernels Triton 3.6 compiled on an H200).
            if types[name].startswith("*") or name in divisible:
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=jit, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, **({"num_stages": num_stages} if num_stages is not None else {})}
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


def compile_variant(variant: Variant, capability: int):
    """The compiled kernel of `variant` for sm_<capability> (sm_90 → sm_90a)."""
    types, constants = variant.arguments()
    return compile_kernel(variant.jit(), types, constants, capability, divisible=variant.divisible_ints(),
                          num_warps=variant.config.num_warps, num_stages=variant.config.num_stages)


def resource_usage(compiled) -> dict:
    """Registers, stack frame and static shared bytes from `cuobjdump -res-usage`, plus dynamic shared memory."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        Path(path).write_bytes(compiled.asm["cubin"])
        text = subprocess.run([str(tool), "-res-usage", path], capture_output=True, text=True, check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", text)
    if match is None:
        raise RuntimeError(f"cuobjdump -res-usage gave no resource line:\n{text}")
    registers, stack, static_shared = map(int, match.groups())
    return {"registers": registers, "stack_bytes": stack,
            "shared_bytes": static_shared + int(compiled.metadata.shared)}


def report(variants, targets) -> list[dict]:
    rows = []
    for variant in variants:
        for target in targets:
            capability = TARGETS[target]
            usage = resource_usage(compile_variant(variant, capability))
            cfg = variant.config
            rows.append({"variant": variant.name, "target": target,
                         "tile": f"{cfg.block_m}×{cfg.block_v}×{cfg.block_d}, {cfg.num_warps} warps, "
                                 f"{cfg.num_stages} stages",
                         **usage, "shared_limit": SHARED_PER_BLOCK[capability],
                         "fits": usage["shared_bytes"] <= SHARED_PER_BLOCK[capability]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict], env: dict) -> str:

    lines = ["| variant | tile | target | registers | stack (spill) B | shared KiB | fits the block limit |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['tile']} | {r['target']} | {r['registers']} | {r['stack_bytes']} | "
                     f"{r['shared_bytes'] / 1024:.0f} | {'yes' if r['fits'] else 'NO'} |")
    lines += ["", f"Triton {env['triton']}, commit {env['commit']}, {env['date']}; compiled ahead of time without a "
                  "GPU; cuobjdump -res-usage."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
    parser.add_argument("--variants", nargs="+", help="substrings of variant names to keep (default: all)")
    parser.add_argument("--exact", action="store_true", help="--variants are whole names, not substrings")
    parser.add_argument("--out", help="directory for results.json and results.md")
    args = parser.parse_args(argv)
    candidates = shipped_variants() + cce_variants()
    variants = [v for v in candidates if not args.variants
                or any(s == v.name if args.exact else s in v.name for s in args.variants)]
    if not variants:
        parser.error(f"no variant matches {args.variants}; names: {[v.name for v in candidates]}")
    rows = report(variants, args.targets)
    env = environment("cpu")  # the Triton version and commit the figures depend on
    table = markdown(rows, env)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
        (out / "results.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
