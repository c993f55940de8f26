#!/usr/bin/env bash
# One lent-GPU session, in one call (the device time is short): the CUDA tests of the kernels, the long-context
# training-memory comparison against TRL, and the main kernel benchmark. Every stage has its own time limit and
# writes its log as it goes, so a stage that fails or runs long leaves the others' results.
#
#   bash benchmarks/gpu_session.sh            # on the GPU machine, from the repository root; OUT=<dir> for results
#
# Expects, carried beside the tree: .whl/ (trl, datasets, dill, multiprocess, liger-kernel, cut-cross-entropy
# wheels: the machine has no registry) and .gpu/smollm2/ (SmolLM2-135M's config and tokenizer; the weights are too
# large to carry, so the model is built from the config with seeded random weights: memory and step time do not
# depend on the values).
set -u
# Logs and results gather in $LOGS; after every stage they are packed into $OUT/gpu-session.tar.gz (the device tool
# returns at most 8 files), so a stage killed at its limit still leaves the earlier stages' results.
OUT=${OUT:-bench-out}
LOGS=/tmp/gpu-session
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD" EPA_REQUIRE_BACKENDS="triton torch"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$LOGS/install.log" 2>&1 || { echo "wheel install failed"; tail "$LOGS/install.log"; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$LOGS/env.txt"
python3 -c "import torch, triton, transformers, trl; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'trl', trl.__version__)" 2>&1 | tee -a "$LOGS/env.txt"

stage() {  # stage NAME SECONDS COMMAND...: run with a limit, log to $LOGS/NAME.log, print the tail
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - start)) s"
    tail -n 6 "$LOGS/$name.log"
    tar czf "$OUT/gpu-session.tar.gz" -C /tmp gpu-session
}

# The model: SmolLM2-135M's architecture, seeded random weights, saved as a plain transformers directory.
stage model 60 python3 -c "
import torch, transformers
torch.manual_seed(0)
config = transformers.AutoConfig.from_pretrained('.gpu/smollm2')
model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
model.save_pretrained('/tmp/smollm2')
transformers.AutoTokenizer.from_pretrained('.gpu/smollm2').save_pretrained('/tmp/smollm2')
print(sum(p.numel() for p in model.parameters()), 'parameters')"

# 1. Correctness of the Triton kernels on the GPU (the interpreter is the only place they ran before).
stage tests 100 python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_logprobs.py tests/test_fused_loss.py \
    tests/test_losses.py tests/test_memory.py tests/test_prefix_sharing.py

# 2. The kernel benchmark against the peers (Liger-Kernel, Cut Cross-Entropy, TRL's loss), the GPU's first numbers:
#    an 8B-class head (D = 4096, V = 128256) over 8192 tokens in bf16.
stage bench 90 python3 -m benchmarks.run --device cuda --cases logprobs dpo epa-1+3+60 --tokens 8192 \
    --hidden 4096 --vocab 128256 --dtype bfloat16 --impls reference triton torch liger cce trl --repeats 10 \
    --warmup 3 --out "$LOGS/bench"

# 3. Long context against TRL: a 6k prompt at 1+1 and 1+3, and the longest prompt within 24 GiB.
stage train-memory 220 python3 -m benchmarks.train_memory --model /tmp/smollm2 --device cuda \
    --prompt-tokens 6144 16384 32768 65536 --response-tokens 1024 --responses 2 4 \
    --impls epa-shared-gc trl-gc-precompute epa-gc --budget-gib 24 --warmup 1 --out "$LOGS/train-memory"

# 4. Past the dense mask's reach: prefix sharing under FlexAttention (block-sparse mask) at 1+3.
stage train-memory-flex 70 python3 -m benchmarks.train_memory --model /tmp/smollm2 --device cuda \
    --prompt-tokens 65536 131072 --response-tokens 1024 --responses 4 --impls epa-shared-gc-flex --budget-gib 24 \
    --warmup 1 --out "$LOGS/train-memory-flex"
cat "$LOGS/train-memory/results.md" "$LOGS/train-memory-flex/results.md" 2>/dev/null | grep -v "^|---"
