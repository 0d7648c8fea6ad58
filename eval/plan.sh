#!/usr/bin/env bash
# The README's SmolLM2-135M tables (make eval-real), most important first; each step appends to the results
# file and a rerun skips the examples already there. About 80 minutes on 2 busy CPU cores (n = 1-2 per cell),
# one job at a time; `python -m eval.report eval/runs/results.jsonl` prints the tables at any point.
set -euo pipefail
cd "$(dirname "$0")/.."
M=${1:-eval/cache/SmolLM2-135M-Instruct}
OUT=${OUT:-eval/runs/results.jsonl}
PY=${PY:-.venv/bin/python}
export OMP_WAIT_POLICY=PASSIVE
run() { "$PY" -m eval.synthetic --ckpt "$M" --out "$OUT" "$@"; }
PC2K="--setting pc2k --chunk-size 2000"
FULL="--setting full --method full"
OTHER=number_string,kv_retrieval,niah_multikey,niah_multivalue,niah_multiquery,vt

# 1. ParallelComp with 2K chunks and full attention on the core retrieval tasks
run $PC2K --tasks passkey,niah_single,kjv_niah --lengths 4k,8k,16k --n 2
run $FULL --tasks passkey,kjv_niah --lengths 4k,8k --n 2
run $FULL --tasks niah_single --lengths 8k --n 1
run $FULL --tasks passkey --lengths 16k --n 1
run $PC2K --tasks passkey --lengths 32k --n 2
# 2. chunk-size sensitivity on passkey at 16K
for c in 1000 4000 8000; do run --setting pc$((c / 1000))k --chunk-size $c --tasks passkey --lengths 16k --n 1; done
# 3. perplexity by context length
"$PY" -m eval.perplexity --ckpt "$M" --lengths 2k,4k,8k --full-limit 8k --out eval/runs/perplexity.jsonl
# 4. 64K, the other tasks, FullKV (middle truncation to the 8,192-token window), KV eviction, calibration
run $PC2K --tasks passkey --lengths 64k --n 1
run $PC2K --tasks $OTHER --lengths 8k --n 1
run $PC2K --tasks kjv_niah --lengths 32k --n 1
run --setting fullkv --method full --full-max-tokens 8192 --tasks passkey --lengths 16k --n 1
run --setting pc2k-kv1000 --chunk-size 2000 --kv-capacity 1000 --tasks passkey --lengths 16k --n 1
run --setting pc2k-calib --chunk-size 2000 --calibration paper --tasks passkey --lengths 16k --n 1
run $FULL --tasks $OTHER --lengths 4k --n 1
# 5. the bare question (ranking against reading), more 64K passkeys, perplexity at 16K
run $PC2K --tasks passkey_bare --lengths 64k --n 2
run $PC2K --tasks passkey --lengths 64k --n 3
"$PY" -m eval.perplexity --ckpt "$M" --lengths 16k --full-limit 16k --out eval/runs/perplexity.jsonl
run $FULL --tasks passkey_bare --lengths 8k --n 2
run $PC2K --tasks niah_single --lengths 32k --n 2
