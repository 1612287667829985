#!/bin/bash
# Device-call driver for the train-step figures in docs/benchmarks.md. Sections (args):
#   check   attention backends vs the reference; tiny-model training per attention backend
#   peer    ~1B ladder point (d2048, 22 layers, GQA 4) on 1 GPU: JAX per backend, then PyTorch
#   scale   the same point with FSDP on 1, 2, 4 GPUs (as many as there are; 8 rows per GPU),
#           then the 3B point with FSDP over all GPUs
#   scan    scanned layers: the 1B point (profiled) beside the PyTorch peer, the 3B point for
#           20 steps with remat, and compile time at 8, 22 and 44 layers
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD:$PYTHONPATH
export NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
PY=${PY:-python3}
ONE_B="--d_model=2048 --n_layers=22 --kv_ratio=4 --ff_mult=4.125 --seq_len=2048"
THREE_B="--d_model=3072 --n_layers=30 --kv_ratio=3 --ff_mult=4 --seq_len=2048"
log() { tee -a $OUT/$1.log | grep -v -i "^\s*$\|tpu\|warning"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | log env
date -u | log env
for section in "$@"; do case $section in
check)
  $PY benchmarks/attention_check.py --trials 8 2>&1 | log check
  for impl in cudnn pallas_gpu xla; do
    echo "== tiny training, attention $impl" | log check
    CUDA_VISIBLE_DEVICES=0 $PY -m tmdiff.train --config=experiments/tiny.py --workdir=/tmp/tiny_$impl \
      --config.model.attention_impl=$impl --config.train.steps=300 --config.train.log_every=100 \
      2>&1 | grep -E "step (100|200|300)/|eval step|Error|error" | log check
  done ;;
peer)
  for impl in ${IMPLS:-cudnn pallas_gpu}; do
    CUDA_VISIBLE_DEVICES=0 $PY benchmarks/train_step_bench.py $ONE_B --batch=8 --steps=10 \
      --attention=$impl 2>&1 | log peer
  done
  CUDA_VISIBLE_DEVICES=0 $PY benchmarks/torch_peer.py $ONE_B --batch=8 --steps=10 2>&1 | log peer ;;
scale)
  gpus=$(nvidia-smi -L | wc -l)
  for n in 1 2 4; do
    [ $n -gt $gpus ] && break
    CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) $PY benchmarks/train_step_bench.py $ONE_B \
      --batch=$((8 * n)) --fsdp=$n --steps=10 --attention=cudnn 2>&1 | log scale
  done
  $PY benchmarks/train_step_bench.py $THREE_B --batch=$((4 * gpus)) --fsdp=$gpus --steps=5 --remat=block \
    --attention=cudnn 2>&1 | log scale ;;
scan)
  set -o pipefail
  bench="timeout 200 $PY benchmarks/train_step_bench.py --attention=cudnn --scan_layers"
  echo "== 1B scanned, remat dots, profiled" | log scan
  CUDA_VISIBLE_DEVICES=0 $bench $ONE_B --batch=8 --steps=10 --remat=dots --profile=/tmp/trace 2>&1 | log scan
  echo "== PyTorch peer" | log scan
  CUDA_VISIBLE_DEVICES=0 timeout 200 $PY benchmarks/torch_peer.py $ONE_B --batch=8 --steps=10 2>&1 | log scan
  echo "== 3B scanned, 20 steps, remat dots (block if dots does not fit)" | log scan
  CUDA_VISIBLE_DEVICES=0 $bench $THREE_B --batch=8 --steps=20 --remat=dots 2>&1 | log scan ||
    CUDA_VISIBLE_DEVICES=0 $bench $THREE_B --batch=8 --steps=20 --remat=block 2>&1 | log scan
  for n in 8 22 44; do  # compile time against depth
    echo "== 1B shape, $n layers, scanned, remat ${REMAT:-dots}" | log scan
    CUDA_VISIBLE_DEVICES=0 $bench ${ONE_B/--n_layers=22/--n_layers=$n} --batch=8 --steps=3 \
      --remat=${REMAT:-dots} 2>&1 | log scan
  done ;;
esac; done
