#!/usr/bin/env bash
# The README's first SmolLM2-135M grid (make eval-real): what the n = 10 cells (plan_n10.sh) and official RULER
# (plan_ruler.sh) do not cover: full attention inside and past the model's 8,192-token window, 128K, chunk
# size, KV eviction, calibration, where the instruction goes, InfiniteBench's other retrieval tasks. n = 1-3 per
# cell: indications. Most important first; each step appends to eval/results/smollm2_grid.jsonl and a rerun skips
# what is there. About 32 minutes on 2 idle cores; its seconds are labelled "quiet" (TIMING), so run it with
# nothing else running, or say TIMING="shared CPU". `python -m eval.report eval/results/smollm2_grid.jsonl`
# prints the table at any point. (RULER's needle and variable-tracking tasks, which this grid once generated,
# are official RULER's now: plan_ruler.sh.)
set -euo pipefail
cd "$(dirname "$0")/.."
M=${1:-eval/cache/SmolLM2-135M-Instruct}
OUT=${OUT:-eval/results/smollm2_grid.jsonl}
PY=${PY:-.venv/bin/python}
TIMING=${TIMING:-quiet}
export OMP_WAIT_POLICY=PASSIVE
run() { "$PY" -m eval.synthetic --ckpt "$M" --out "$OUT" --timing "$TIMING" "$@"; }
PC2K="--setting pc2k --chunk-size 2000"
FULL="--setting full --method full"

# 1. full attention against ParallelComp on the passkey: inside the window (4K, 8K), past it (16K), and
#    middle-truncated to the window (fullkv, FullKV)
run $FULL --tasks passkey --lengths 4k,8k --n 2
run $PC2K --tasks passkey --lengths 4k,8k --n 2
run $FULL --tasks passkey --lengths 16k --n 1
run --setting fullkv --method full --full-max-tokens 8192 --tasks passkey --lengths 16k --n 1
# 2. the same on the King James Bible needle
run $FULL --tasks kjv_niah --lengths 4k,8k --n 1
run $PC2K --tasks kjv_niah --lengths 8k --n 2
# 3. 128K: the passkey at the very start, the middle and the very end
run $PC2K --tasks passkey --lengths 128k --n 3
# 4. at 16K, on example 4 of the n = 10 cells (the same prompts as those records): chunk size 1K / 4K / 8K, KV
#    eviction to half a chunk, the paper's calibration
for c in 1000 4000 8000; do
  run --setting pc$((c / 1000))k --chunk-size $c --tasks passkey,kjv_niah --lengths 16k --n 10 --examples 4
done
run --setting pc2k-kv1000 --chunk-size 2000 --kv-capacity 1000 --tasks passkey --lengths 16k --n 10 --examples 4
run --setting pc2k-calib --chunk-size 2000 --calibration paper --tasks passkey --lengths 16k --n 10 --examples 4
# 5. the instruction inside the question that scores the chunks, on the first and last 64K passkeys of the n = 10
#    cells (compare their chunk scores with those records')
run --setting pc2k-q --chunk-size 2000 --instruction-at question --tasks passkey --lengths 64k --n 10 --examples 0,9
# 6. InfiniteBench's other two retrieval tasks
run $FULL --tasks number_string,kv_retrieval --lengths 4k --n 1
run $PC2K --tasks number_string,kv_retrieval --lengths 8k --n 1
