#!/usr/bin/env bash
# Official RULER on SmolLM2-135M-Instruct (make eval-ruler): the 13 tasks generated at 4K and 16K (10 examples
# each, by the package's own generator), then ParallelComp (2K chunks) at 16K and full attention at 4K,
# round-robin over the tasks so a stopped run leaves every task with about the same n. Resumable: generation
# skips the files that exist, the run skips the examples already in the results file.
# Sizing (1 thread, shared CPU): generation about 10 minutes; one round over the 13 tasks about 33 minutes
# (ParallelComp 16K about 110 s, full 4K about 40 s per example), so N=5 is about 2.7 CPU-hours.
set -euo pipefail
cd "$(dirname "$0")/.."
M=${M:-eval/cache/SmolLM2-135M-Instruct}
OUT=${OUT:-eval/results/ruler_smollm2.jsonl}
N=${N:-5}
PY=${PY:-.venv/bin/python}
TIMING=${TIMING:-shared CPU}
export OMP_WAIT_POLICY=PASSIVE
"$PY" -m eval.ruler generate --ckpt "$M" --lengths 4k,16k --n 10 --data eval/runs/ruler
"$PY" -m eval.ruler run --ckpt "$M" --data eval/runs/ruler --cells pc2k:16k,full:4k --n "$N" --out "$OUT" \
  --timing "$TIMING"
# quiet seconds (QUIET=1, with nothing else running): example 0 of every task in both cells rerun on 2 idle cores
# into a file of their own (about 15 minutes); the report takes the columns' seconds from it and checks that its
# predictions equal the run's
Q=${Q:-eval/results/ruler_quiet.jsonl}
if [ -n "${QUIET:-}" ]; then
  "$PY" -m eval.ruler run --ckpt "$M" --data eval/runs/ruler --cells pc2k:16k,full:4k --n 1 --out "$Q" --timing quiet
fi
"$PY" -m eval.ruler report "$OUT" $([ -f "$Q" ] && echo --seconds "$Q")
