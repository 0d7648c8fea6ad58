#!/usr/bin/env bash
# Reproduces the CPU tables and plots of bench/README.md (about 21 minutes on 2 idle cores, 13 of them full attention
# at 128K; more on a busy machine).
#
#   bash bench/cpu.sh          # writes bench/results/cpu-20m/ and bench/results/cpu-100m/
#
# 20M-parameter Llama shape, float32, 2 threads, 4K to 128K tokens, every method, full attention included.
# Then the 100M shape's chunk prefill against the matmul rate.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# On a machine shared with other work, OpenMP threads that spin at barriers stall whenever a core is taken
# (measured here: decode 190 ms/token instead of 15). Passive waiting costs little on an idle machine.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
$PY bench/bench.py --shape 20m --lengths 4096,16384,32768,131072 --full-max 131072 --chunk-batch 8 \
    --threads 2 --out bench/results/cpu-20m
$PY bench/bench.py --shape 100m --lengths 16384 --methods one,many --chunk-batch 8 \
    --threads 2 --out bench/results/cpu-100m
