#!/usr/bin/env bash
# The GPU check of issue #29, one command, under 10 minutes on one H100:
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]        # from the repository root; OUT_DIR default: gpu-check-out
#
# 1. pytest -m gpu: CUDA parity with diffusers in fp16 / bf16 on the tiny models (tests/test_gpu.py)
# 2. train.py smoke run on one GPU, bf16 mixed precision (configs/train/smoke.yaml, configs/accelerate/1gpu.yaml)
# 3. latentdiff generate --prompts on one GPU (a 2-prompt file, the tiny random preset: no weights needed)
# 4. the SD 1.5-size benchmark against diffusers fp16 with SDPA on the same GPU (benchmarks/bench_vs_diffusers.py:
#    512 px, 20 steps, Euler a, CFG 7.5, medians of 2; writes seeded random weights once, ~1 min)
# Every step's output goes to OUT_DIR/<step>.log; the script stops at the first failure and says which step.
# PYTHON (default: python) must have torch with CUDA, diffusers and accelerate (pip install -e '.[test]').
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-gpu-check-out}")
PY=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's latentdiff, not an installed one
export LATENTDIFF_BENCH_CACHE="$OUT/bench-cache"

step() {  # step NAME TIMEOUT_S CMD...: run CMD with a time limit, log to OUT/NAME.log, say how it went
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    echo "== $name (limit ${limit}s): $*"
    if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
        echo "   ok in $((SECONDS - t0)) s"
    else
        echo "   FAILED (exit $?) after $((SECONDS - t0)) s; the last lines of $OUT/$name.log:"
        tail -n 30 "$OUT/$name.log"
        exit 1
    fi
}

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"

step 1-pytest-gpu 180 "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_gpu.py
grep -q " passed" "$OUT/1-pytest-gpu.log" && ! grep -q "skipped" "$OUT/1-pytest-gpu.log" \
    || { echo "   pytest -m gpu skipped or ran nothing: see $OUT/1-pytest-gpu.log"; exit 1; }
tail -n 1 "$OUT/1-pytest-gpu.log"

step 2-train-smoke 180 "$PY" -m accelerate.commands.launch --config_file configs/accelerate/1gpu.yaml \
    train.py --config configs/train/smoke.yaml --mixed_precision=bf16 --output_dir="$OUT/runs" --run_name=gpu-smoke
test -s "$OUT/runs/gpu-smoke/final.safetensors" || { echo "   no final.safetensors from the smoke run"; exit 1; }
tail -n 1 "$OUT/runs/gpu-smoke/log.jsonl"

printf 'a red circle\na blue square\n' >"$OUT/prompts.txt"
step 3-generate-prompts 120 "$PY" -m latentdiff generate --random-preset tiny-sd15 --device cuda \
    --prompts "$OUT/prompts.txt" --out-dir "$OUT/generated" --steps 4 -q
test "$(find "$OUT/generated" -name '*.png' | wc -l)" -eq 2 || { echo "   expected 2 images in $OUT/generated"; exit 1; }

step 4-bench-sd15-fp16 420 "$PY" benchmarks/bench_vs_diffusers.py --device cuda --full --diffusers-dtype fp16 \
    --ours-dtype fp16 --repeats 2 --out-dir "$OUT/bench-images"
sed -n '/^SD 1.5 architecture/,$p' "$OUT/4-bench-sd15-fp16.log"
echo "all GPU checks passed; logs in $OUT"
