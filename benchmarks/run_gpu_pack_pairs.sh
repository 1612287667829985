#!/bin/bash
# Real tokens/s per device at the `m` ladder point (seq 2048), pairs packed against padded, in one
# device call (docs/benchmarks.md, "Packed pairs"; docs/pack_pairs.md).
#   bash benchmarks/run_gpu_pack_pairs.sh DATA_DIR [STEPS]
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD:$PYTHONPATH
export NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
PY=${PY:-python3}
DATA=${1:?usage: run_gpu_pack_pairs.sh DATA_DIR [STEPS]}
STEPS=${2:-300}
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  $PY -c "import jax; print('jax', jax.__version__)"; date -u; } 2>&1 | tee -a $OUT/pack_pairs.log
for pack in False True; do
  work=/tmp/pack_pairs_m_$pack; rm -rf $work
  echo "== pack_pairs=$pack, $STEPS steps" | tee -a $OUT/pack_pairs.log
  $PY -m tmdiff.train --config=experiments/ladder.py:size=m,hw=h200x1,data=$DATA \
    --config.data.pack_pairs=$pack --config.data.worker_count=4 --config.train.tokens=0 --config.sde.enabled=False \
    --config.train.steps=$STEPS \
    --config.train.log_every=50 --config.train.eval_every=0 --config.train.ckpt_every=100000 \
    --workdir=$work > $OUT/pack_pairs_$pack.log 2>&1
  echo "exit $?" | tee -a $OUT/pack_pairs.log
  grep -E "parameters|memory per device|step [0-9]+/" $OUT/pack_pairs_$pack.log | tail -4 \
    | sed 's/^I[0-9]* [0-9:.]* [0-9]* //' | tee -a $OUT/pack_pairs.log
  tail -n 2 $work/metrics.jsonl | tee -a $OUT/pack_pairs.log
done
