#!/usr/bin/env bash
# One lent-GPU session, the must-haves first: the gemm backend (cuBLAS GEMMs on chunks with fused Triton row kernels)
# against its 4- and 3-GEMM floors, the Triton tile kernels and the peers at the four shapes of the speed goals
# (Llama-3-8B's head at N = 512, 8k and 32k, Qwen's at 16k, Gemma's with softcap 30 at 8k), then the losses over
# plain log-probs: those stages fit 6 minutes of one call. After them, in the time left: the GPU-only training
# paths (FlexAttention prefix sharing, FSDP2 through accelerate), then the tile kernels' sweep and gradient filter.
#
#   bash benchmarks/prepare_gpu_session.sh     # here, once: .whl/ and .gpu/ (wheels, SmolLM2's config, activations)
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl", ".gpu"], timeout_s=570)   # the device call
#   bash benchmarks/gpu_session.sh --dry-run   # every stage on this CPU at tiny shapes (the tests run it)
#   bash benchmarks/gpu_session.sh --only peers-llama,losses     # some stages
#
# Every stage has its own time limit (a cold Triton cache compiles each kernel first), and as soon as it ends its
# logs and results are packed into $OUT/gpu-session.tar.gz and its status line and tables appended to
# $OUT/summary.md (the two files the device call returns), so a stage killed at its limit, or by the call's own
# limit, loses only itself (the archive is written under another name and then moved, so a kill while packing
# leaves the previous one whole). Within a stage each implementation's line is logged as soon as it is timed.
set -u
cd "$(dirname "$0")/.." || exit 1
DRY=0
ONLY=""
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --only) ONLY=",$2,"; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "unknown argument $1 (--dry-run, --only STAGE[,STAGE])" >&2; exit 2 ;;
    esac
    shift
done
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
    OUT=${OUT:-bench-out/gpu-session-dry}
    DEVICE=cpu
    export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
else
    OUT=${OUT:-bench-out/gpu-session}
    DEVICE=cuda
fi
LOGS=$(mktemp -d)/gpu-session
mkdir -p "$OUT" "$LOGS"
SUMMARY=$OUT/summary.md
echo "# GPU session $(date -u '+%Y-%m-%d %H:%M UTC')$([ "$DRY" = 1 ] && echo ' (dry run: CPU, tiny shapes)')" > "$SUMMARY"
FAILED=0

stage() {  # stage NAME SECONDS COMMAND...: run under its limit, log to $LOGS/NAME.log, then pack and summarise
    local name=$1 limit=$2
    shift 2
    if [ -n "$ONLY" ] && [[ $ONLY != *",$name,"* ]]; then return; fi
    local start=$SECONDS
    timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
    local code=$?
    [ "$code" = 0 ] || FAILED=1
    local line="== $name: exit $code after $((SECONDS - start)) s (limit $limit s)"
    echo "$line"
    tail -n 4 "$LOGS/$name.log"
    { echo; echo "## $name"; echo; echo "$line"; echo
      for table in "$LOGS/$name"/*.md; do [ -f "$table" ] && cat "$table"; done; } >> "$SUMMARY"
    tar czf "$OUT/.gpu-session.tar.gz.part" -C "$(dirname "$LOGS")" gpu-session \
        && mv "$OUT/.gpu-session.tar.gz.part" "$OUT/gpu-session.tar.gz"
}

# Wheels of what the GPU image lacks (prepare_gpu_session.sh); the dry run uses this machine's packages.
if [ "$DRY" = 0 ] && [ -d .whl ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        > "$LOGS/install.log" 2>&1 || echo "wheel install failed: see install.log"
    export PYTHONPATH="/tmp/site:$PWD"
fi
export EPA_REQUIRE_BACKENDS="triton torch"

# 0. What the machine is and its two ceilings (matrix rate, copy bandwidth), measured, not read off a datasheet.
if [ "$DRY" = 1 ]; then CEIL=(--size 256 --copy-mib 8); else CEIL=(--size 8192 --copy-mib 4096); fi
stage ceilings 20 "$PY" -m benchmarks.ceilings --device "$DEVICE" "${CEIL[@]}" --out "$LOGS/ceilings"

# 1. The kernels are right on this GPU before they are timed (the timing stages gate each result too).
if [ "$DRY" = 1 ]; then TESTS=(tests/test_logprobs.py -k "single_token and triton"); else
    TESTS=(-n 8 tests/test_gemm_backend.py tests/test_gemm_rows.py tests/test_logprobs.py tests/test_fused_loss.py); fi
stage tests 30 "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"

# linear_logprobs forward and forward+backward: the gemm backend (default, token and vocabulary chunks, logits kept),
# the Triton tile kernels, the chunked torch backend, Liger-Kernel, Cut Cross-Entropy, TRL, the eager and compiled
# references, and the 4- and 3-GEMM floors of the same run (--preset gpu-peers), one head per stage so that a stage
# stopped at its limit loses one head only.
peers() {  # peers NAME LIMIT "N [N ...]" D V [--softcap C]
    local name=$1 limit=$2 n=$3 d=$4 v=$5
    shift 5
    if [ "$DRY" = 1 ]; then n=64; d=16; v=300; fi
    local extra=()
    [ "$DRY" = 1 ] && extra=(--repeats 1 --warmup 0 --no-memory --impls reference gemm gemm-keep triton torch liger
        cce trl)
    # shellcheck disable=SC2086  # several token counts are several words
    stage "$name" "$limit" "$PY" -m benchmarks.run --device "$DEVICE" --preset gpu-peers --tokens $n --hidden "$d" \
        --vocab "$v" "$@" "${extra[@]}" --out "$LOGS/$name"
}

# 2. The four shapes of the speed goals (few tokens beside Llama 8k), then EPA 1+3+60 and DPO over plain log-probs.
peers peers-llama 70 "512 8192" 4096 128256
peers peers-llama-32k 90 32768 4096 128256
peers peers-qwen 50 16384 2048 151936
peers peers-gemma 50 8192 2304 262144 --softcap 30
if [ "$DRY" = 1 ]; then LOSSES=(--tokens 64 --hidden 16 --vocab 300 --cases logprobs dpo epa-1+3+60 --repeats 1
    --warmup 0 --no-memory --impls reference gemm triton torch); else LOSSES=(--preset gpu-losses); fi
stage losses 45 "$PY" -m benchmarks.run --device "$DEVICE" "${LOSSES[@]}" --out "$LOGS/losses"

# 3. A model for the training stages: SmolLM2-135M's architecture with seeded weights (its weights cannot travel),
#    kept out of $LOGS so that the packed logs stay small; the dry run saves the tests' tiny Llama.
MODEL=$(mktemp -d)/model
if [ "$DRY" = 1 ]; then
    stage model 20 "$PY" -c "
import sys; sys.path.insert(0, 'tests')
from tiny_models import tiny_causal_lm, tiny_tokenizer
tiny_causal_lm('llama_tied').save_pretrained('$MODEL'); tiny_tokenizer().save_pretrained('$MODEL')"
else
    stage model 20 "$PY" -c "
import torch, transformers
torch.manual_seed(0)
config = transformers.AutoConfig.from_pretrained('.gpu/smollm2')
transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained('$MODEL')
transformers.AutoTokenizer.from_pretrained('.gpu/smollm2').save_pretrained('$MODEL')"
fi

# 4. One training step with prefix sharing under FlexAttention (block-sparse mask) against sdpa's dense mask:
#    a 6k prompt with 1 + 3 + 12 responses of 256 tokens. FlexAttention has no backward on CPU: the dry run uses eager.
if [ "$DRY" = 1 ]; then STEP=(--prompt-tokens 32 --response-tokens 8 --responses 4 --what time --warmup 0
    --repeats 1); FLEX=eager; else STEP=(--prompt-tokens 6144 --response-tokens 256 --responses 16 --what both
    --warmup 1 --repeats 2); FLEX=flex_attention; fi
stage flex 70 bash -c "\"$PY\" -m benchmarks.train_step --model $MODEL --device $DEVICE --impls shared-gc \
    --attn $FLEX ${STEP[*]} --out $LOGS/flex/flex && \"$PY\" -m benchmarks.train_step --model $MODEL \
    --device $DEVICE --impls shared-gc --attn sdpa ${STEP[*]} --out $LOGS/flex/sdpa && \
    { echo '**attention $FLEX**'; cat $LOGS/flex/flex/results.md; echo; echo '**attention sdpa (dense mask)**'; \
      cat $LOGS/flex/sdpa/results.md; } > $LOGS/flex/results.md"

# 5. accelerate launch with FSDP2 on one GPU: one update equal to the unsharded one, tied embeddings still tied.
if [ "$DRY" = 1 ]; then FSDP=(--dry-run); else FSDP=(); fi
stage fsdp2 50 "$PY" -m benchmarks.fsdp_check --model "$MODEL" --out "$LOGS/fsdp2" "${FSDP[@]}"

# 6. The tile choice by measurement (every shipped config and a small grid) at the shapes the first session did not
#    sweep (Llama-3-8B's head at N = 32k, and few tokens), and the backward's cost: both schemes side by side.
if [ "$DRY" = 1 ]; then TILES=(--grid tiny); else TILES=(--grid small --samples 2 --tokens 32768 64 --hidden 4096
    --vocab 128256); fi
stage tiles 120 "$PY" -m benchmarks.tile_sweep --backward-cost "${TILES[@]}" --out "$LOGS/tiles"

# 7. Gradient filtering on SmolLM2's real activations (the carried slice; a synthetic one in the dry run): whether
#    filter_eps, a tile-kernel feature, still earns the Triton kernels their place.
if [ "$DRY" = 1 ]; then
    "$PY" -m benchmarks.activations --slice "$LOGS/activations" --tokens 64 --synthetic > /dev/null
    export EPA_BENCH_CACHE=$LOGS/activations
    FILTER=(--tokens 64 --dtype float32 --repeats 1 --warmup 0 --no-memory --impls reference torch native native@1e-5)
else
    export EPA_BENCH_CACHE=.gpu/activations
    FILTER=(--tokens 2048 --dtype bfloat16 --impls reference triton triton@1e-6 triton@1e-5 triton@3e-5)
fi
stage filter 30 "$PY" -m benchmarks.run --device "$DEVICE" --source smollm2 --cases logprobs "${FILTER[@]}" \
    --out "$LOGS/filter"

echo "results: $OUT/summary.md and $OUT/gpu-session.tar.gz"
exit $FAILED
