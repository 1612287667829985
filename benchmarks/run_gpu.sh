#!/bin/bash
# One device call: environment, cross-entropy bench, attention bench (+ pallas sweep).
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/env.txt
$PY -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a $OUT/env.txt
date -u | tee -a $OUT/env.txt
$PY benchmarks/cross_entropy_bench.py --out $OUT/ce.json 2>&1 | tee $OUT/ce.log | grep -v "^\s*$"
$PY benchmarks/attention_check.py 2>&1 | tee $OUT/check.log
$PY benchmarks/attention_bench.py ${ATTN_ARGS:---sweep} --out $OUT/attn.json 2>&1 | tee $OUT/attn.log
