#!/usr/bin/env bash
# The GPU check of issue 31, one command, no network and no downloads: the CUDA half of the device tests, then the
# training step at SmolLM2-135M, Llama-3.2-1B and Llama-3.1-8B shapes in bf16 (random weights built from configs:
# ours, peft prompt tuning, the frozen model alone: step time, tokens/s, peak memory), then the multi-task server
# on the GPU (one task, 64 tasks mixed, peft switching adapters). It prints RESULT lines, and writes its tables
# to docs/benchmarks.md between the markers of its section. Under 8 minutes on one H200.
#
#   bash scripts/gpu_check.sh                 # on a machine with a CUDA GPU and softprompt importable
#
# A machine without internet needs softprompt's dependencies that its image lacks as wheels, downloaded here for
# its Python (scripts/gpu_wheels.sh fills .whl/), installed first when .whl/ is there.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH="/tmp/site:$PWD/src:${PYTHONPATH:-}"
else
    export PYTHONPATH="$PWD/src:${PYTHONPATH:-}"
fi
export PYTHONUNBUFFERED=1 SOFTPROMPT_CACHE="$OUT/cache"
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('#', torch.cuda.get_device_name())" \
    || exit 1

echo "== the device tests on the GPU (and the CPU)"
python3 -m pytest -q -p no:cacheprovider tests/test_devices.py 2>&1 | tee "$OUT/tests.log" | tail -3

echo "== training step, bf16, batch 8 x 512, 100 virtual tokens"
for model in smollm2-shape llama-1b llama-8b; do
    timeout 240 python3 benchmarks/step_time.py --model "$model" --bf16 --batch 8 --lengths 512 --prompts 100 \
        --repeats 5 --infer-examples 0 2>&1 | tee "$OUT/step_$model.log" | grep -E "^\||^RESULT|^#"
done

echo "== serving on the GPU: one task, 64 tasks mixed, peft switching adapters (100-token prompts)"
timeout 240 python3 benchmarks/serve.py --device cuda --model smollm2-shape --prompt-length 100 --dtypes bf16 \
    --quick 2>&1 | tee "$OUT/serve.log" | grep -E "^\||^RESULT|^#"

python3 benchmarks/gpu_report.py "$OUT" docs/benchmarks.md
