#!/usr/bin/env bash
# The GPU checks of issues 3 and 4, as one script for a lent GPU machine (see shared/gpu/README.md).
#
# Prepare here (a machine with PyPI), then hand the working tree to the GPU machine:
#   make gpu-bundle      # wheels of what the service imports -> .whl/, tokenizer files -> .gpu/
# On the GPU machine, from the repository root:
#   bash bench/gpu/run_checks.sh
# Output: a short table per check on stdout; everything under $OUT (or ./gpu-out).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export OUT
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
TOK=.gpu/smollm2-tokenizer
python3 bench/gpu/transformers_cuda.py --tokenizer-dir "$TOK" 2>&1 | tee "$OUT/transformers_cuda.log" | tail -20
python3 bench/gpu/telemetry_cuda.py --tokenizer-dir "$TOK" 2>&1 | tee "$OUT/telemetry_cuda.log" | tail -12
