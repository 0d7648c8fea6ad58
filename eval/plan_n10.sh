#!/usr/bin/env bash
# Issue 20's SmolLM2 evidence at n >= 10 (make eval-n10), most important first; every step appends to a results
# file under eval/results/ (committed) and a rerun skips what is there. Seconds are labelled with the load they were
# measured under (TIMING; say "quiet" only with nothing else running). Sizing on 2 idle cores (measured; 1 thread
# on a shared CPU takes 2-3x): step 1 about 78 minutes (one example at 16K ~32 s, 32K ~70 s, 64K ~130 s); step 2
# about 47 (a document's encoding ~34 / 63 / 126 s, then 4 questions of 3 / 4 / 8 s); step 3 about 10 CPU-hours
# (20 continuations x 5 lengths x 5 methods); step 4 (the quiet timing sample) about 16 minutes.
# STEPS="2 4" bash eval/plan_n10.sh runs only those steps.
set -euo pipefail
cd "$(dirname "$0")/.."
M=${1:-${M:-eval/cache/SmolLM2-135M-Instruct}}
PY=${PY:-.venv/bin/python}
TIMING=${TIMING:-shared CPU}
export OMP_WAIT_POLICY=PASSIVE
run() { "$PY" -m eval.synthetic --ckpt "$M" --timing "$TIMING" "$@"; }
STEPS=${STEPS:-1 2 3 4}
step() { [[ " $STEPS " == *" $1 "* ]]; }
# 1. ParallelComp (2K chunks, 1 kept) on the passkey and the King James Bible needle, 10 depths per cell
step 1 && for L in 16k 32k 64k; do
  run --setting pc2k --chunk-size 2000 --tasks passkey,kjv_niah --lengths $L --n 10 --out eval/results/smollm2_n10.jsonl
done
# 2. several questions per context (4 needles in the Bible, one question each) in a document session: the
#    context encoded once, each question over it (the same answers as one-shot runs, tested)
step 2 && for L in 16k 32k 64k; do
  run --setting pc2k --chunk-size 2000 --tasks kjv_multi --lengths $L --n 10 --session --out eval/results/smollm2_n10.jsonl
done
# 3. perplexity by context length (--n 19: its starts include the committed --n 10 run's), the fair protocol (query-selected chunks against last-k, random-k, full
#    attention; the oracle as an upper bound)
step 3 && "$PY" -m eval.perplexity --ckpt "$M" --lengths 2k,4k,8k,16k,32k --n 19 --full-limit 16k \
  --out eval/results/perplexity_smollm2.jsonl
# 4. quiet seconds: two examples of each passkey / kjv_niah cell (depths 0.22 and 0.78) and one kjv_multi document
#    at 16K rerun on 2 idle cores (both threads; start it with nothing else running), into a file of their own;
#    eval.report takes their seconds for those cells and checks their predictions against step 1's and 2's
Q=eval/results/smollm2_quiet.jsonl
step 4 && for L in 16k 32k 64k; do
  run --setting pc2k --chunk-size 2000 --tasks passkey,kjv_niah --lengths $L --n 10 --examples 2,7 --timing quiet --out $Q
done
step 4 && run --setting pc2k --chunk-size 2000 --tasks kjv_multi --lengths 16k --n 10 --examples 0 --session \
  --timing quiet --out $Q
"$PY" -m eval.report eval/results/smollm2_n10.jsonl $([ -f $Q ] && echo --seconds $Q)
