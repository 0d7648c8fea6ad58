#!/usr/bin/env bash
# The README's SmolLM2-135M tables (make eval-real), most important first; each step appends to the results
# file and a rerun skips the examples already there. Steps 1-6 take about 115 minutes on 2 idle CPU cores,
# step 7 about 30 more (n = 1-3 per cell), one job at a time; `python -m eval.report eval/runs/results.jsonl`
# prints the tables at any point.
set -euo pipefail
cd "$(dirname "$0")/.."
M=${1:-eval/cache/SmolLM2-135M-Instruct}
OUT=${OUT:-eval/runs/results.jsonl}
PPL=${PPL:-eval/runs/perplexity.jsonl}
PY=${PY:-.venv/bin/python}
export OMP_WAIT_POLICY=PASSIVE
run() { "$PY" -m eval.synthetic --ckpt "$M" --out "$OUT" "$@"; }
PC2K="--setting pc2k --chunk-size 2000"
FULL="--setting full --method full"
OTHER=number_string,kv_retrieval,niah_multikey,niah_multivalue,niah_multiquery,vt

# 1. ParallelComp with 2K chunks on passkey and the single needle, 4K to 64K; passkey at 128K
run $PC2K --tasks passkey,niah_single --lengths 4k,8k --n 2
run $PC2K --tasks passkey,niah_single --lengths 16k,32k,64k --n 3
run $PC2K --tasks passkey --lengths 128k --n 1
# 2. full attention where affordable (quadratic: minutes per example past 16K on 2 cores)
run $FULL --tasks passkey,niah_single --lengths 4k,8k --n 2
run $FULL --tasks passkey --lengths 16k --n 1
# 3. perplexity by context length, the fair protocol (eval/perplexity.py; about 10 CPU-hours at n = 20)
"$PY" -m eval.perplexity --ckpt "$M" --lengths 2k,4k,8k,16k,32k --n 20 --full-limit 16k --out "$PPL"
# 4. the real-text needle (King James Bible)
run $PC2K --tasks kjv_niah --lengths 8k,16k,32k --n 2
run $FULL --tasks kjv_niah --lengths 4k,8k --n 1
# 5. chunk size, FullKV (middle truncation to the 8,192-token window), KV eviction, calibration, at 16K
for c in 1000 4000 8000; do
  run --setting pc$((c / 1000))k --chunk-size $c --tasks passkey,kjv_niah --lengths 16k --n 1
done
run --setting fullkv --method full --full-max-tokens 8192 --tasks passkey --lengths 16k --n 1
run --setting pc2k-kv1000 --chunk-size 2000 --kv-capacity 1000 --tasks passkey --lengths 16k --n 1
run --setting pc2k-calib --chunk-size 2000 --calibration paper --tasks passkey --lengths 16k --n 1
# 6. where the instruction goes: inside the question that scores the chunks, on the 64K passkeys of step 1
run --setting pc2k-q --chunk-size 2000 --instruction-at question --tasks passkey --lengths 64k --n 3
# 7. the other tasks at 8K (ParallelComp) and 4K (full attention); more 128K; full attention at 32K
run $PC2K --tasks $OTHER --lengths 8k --n 1
run $FULL --tasks $OTHER --lengths 4k --n 1
run $PC2K --tasks passkey --lengths 128k --n 2
run $FULL --tasks passkey --lengths 32k --n 1
