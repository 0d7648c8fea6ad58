#!/usr/bin/env bash
# One call on a lent GPU (sized for an H200, under 8 minutes): Llama-3-8B-shaped random weights in bfloat16 at
# 32K / 64K / 128K tokens, full attention vs ParallelComp (1 and 16 chunks per forward, each with and without
# KV compression): prefill seconds, peak GPU memory, decode ms/token, % of the measured bf16 matmul rate.
# Then, next to the paper's Table 7 (Llama-2-7B, 23 chunks in parallel + compression), the Llama-2-7B shape
# at 128K with 23 chunks per forward, if time is left.
#
#   bash bench/gpu.sh                 # results in $OUT/llama3-8b and $OUT/llama2-7b (8 files in all)
#   DRY_RUN=1 bash bench/gpu.sh       # the same code path on CPU with the tiny shape (seconds)
#
# Needs a python3 whose torch sees the GPU (or PYTHON=...). Random weights: nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [[ -n "${DRY_RUN:-}" ]]; then
    BIG=tiny; LLAMA2=tiny; LENGTHS=512,1024,2048; LONGEST=2048; DEV=(--device cpu --dtype bfloat16 --isolate no)
else
    BIG=llama3-8b; LLAMA2=llama2-7b; LENGTHS=32768,65536,131072; LONGEST=131072; DEV=(--device cuda --dtype bfloat16)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
fi
mkdir -p "$OUT"

# Llama-3-8B: about 2 minutes on an H200 (full attention at 128K is the longest step, ~15-30 s).
timeout 330 $PY bench/bench.py --shape $BIG "${DEV[@]}" --lengths $LENGTHS --chunk-batch 16 --decode-tokens 16 \
    --out "$OUT/$BIG" \
    || echo "$BIG: failed or timed out; $OUT/$BIG/results.csv holds the rows measured so far"

# Llama-2-7B at 128K (no GQA: its full KV cache at 128K is 64 GiB), only if time is left.
if (( SECONDS < 300 )); then
    timeout $(( 450 - SECONDS )) $PY bench/bench.py --shape $LLAMA2 "${DEV[@]}" --lengths $LONGEST --chunk-batch 23 \
        --decode-tokens 16 --no-plots --out "$OUT/$LLAMA2-table7" \
        || echo "$LLAMA2: failed or timed out; $OUT/$LLAMA2-table7/results.csv holds the rows measured so far"
else
    echo "skipped $LLAMA2: ${SECONDS}s already used"
fi
echo "gpu.sh done in ${SECONDS}s"
