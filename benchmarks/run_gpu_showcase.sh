#!/bin/bash
# Device-call driver for the showcase model (experiments/showcase.py, docs/showcase.md): train,
# sweep the samplers on an intermediate checkpoint while training goes on, evaluate the final
# checkpoint with the sweep's winners, and pack what docs/showcase.md shows into $OUT.
#   bash benchmarks/run_gpu_showcase.sh ARG [SWEEP]
# ARG: the experiment argument (e.g. data=runs/data_full,steps=6500). SWEEP: modalities to sweep
# (e.g. "image audio text"; default none) on checkpoint SWEEP_STEP (default 3000; "last": the
# final checkpoint, after training), each skipped once SWEEP_DEADLINE seconds (default 330) have
# passed. Env: NUM_SAMPLES (eval, default 256), PARTS (eval parts), SWEEP_SAMPLES (default 128),
# SWEEP_FIRST (first validation prompt of a T2I/T2S sweep, default 256: past the eval's),
# GRID_<MODALITY> (JSON grid for the sweep), WAIT_FILE (the eval starts once this file exists),
# SPEECH_JUDGE (JSON settings, with JUDGE_DATA the data dir: once training is done, the speech
# judge is trained beside the sweeps, and the eval waits for it).
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONPATH=$PWD:$PYTHONPATH
export NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p $OUT
PY=${PY:-python3}
ARG=${1:?usage: run_gpu_showcase.sh ARG [SWEEP]}
WORK=${WORK:-/tmp/showcase}
SWEEP_STEP=${SWEEP_STEP:-3000}
t0=$(date +%s)
stamp() { echo "== +$(( $(date +%s) - t0 ))s $*" | tee -a $OUT/showcase.log; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import jax; print('jax', jax.__version__)"; date -u; } 2>&1 | tee -a $OUT/showcase.log
stamp "train experiments/showcase.py:$ARG"
$PY -m tmdiff.train --config=experiments/showcase.py:$ARG --workdir=$WORK \
  --config.train.keep_checkpoints=4 > $OUT/train.log 2>&1 &
train_pid=$!
sweeps() {
  for modality in $1; do
    if [ $(( $(date +%s) - t0 )) -gt ${SWEEP_DEADLINE:-330} ]; then
      stamp "sweep $modality skipped: past the ${SWEEP_DEADLINE:-330} s deadline"; continue
    fi
    stamp "sweep $modality on step ${2:-last}"
    grid_var=GRID_${modality^^}
    $PY -m tmdiff.eval.sweep --workdir=$WORK --modality=$modality ${2:+--step=$2} \
      --num_samples=${SWEEP_SAMPLES:-128} --batch_size=${SWEEP_SAMPLES:-128} \
      --first_prompt=${SWEEP_FIRST:-256} ${!grid_var:+--grid="${!grid_var}"} \
      > $OUT/sweep_$modality.log 2>&1
    grep -A16 "^# sampler sweep" $WORK/eval/sweep_$modality.md | tee -a $OUT/showcase.log
  done
}
if [ -n "$2" ] && [ "$SWEEP_STEP" != last ]; then
  while kill -0 $train_pid 2>/dev/null && [ ! -d $WORK/checkpoints/$SWEEP_STEP ]; do sleep 3; done
  sleep 3
  sweeps "$2" $SWEEP_STEP
fi
wait $train_pid; rc=$?
grep -E "parameters|memory per device|step [0-9]+/|eval step|Error|Traceback" $OUT/train.log \
  | sed 's/^I[0-9]* [0-9:.]* [0-9]* //' | tee -a $OUT/showcase.log
stamp "train exited $rc"
[ $rc -eq 0 ] || exit $rc
if [ -n "$SPEECH_JUDGE" ]; then
  stamp "speech judge: $SPEECH_JUDGE"
  WAIT_FILE=${WAIT_FILE:-/tmp/speech_judge.done}; rm -f $WAIT_FILE
  ( $PY -m tmdiff.eval.judges --data_dir=${JUDGE_DATA:?JUDGE_DATA: the data dir} --only=speech \
      --retrain --settings="{\"speech\": $SPEECH_JUDGE}" > $OUT/judge.log 2>&1
    echo $? > $WAIT_FILE ) &
fi
[ -n "$2" ] && [ "$SWEEP_STEP" = last ] && sweeps "$2"
while [ -n "$WAIT_FILE" ] && [ ! -e "$WAIT_FILE" ]; do sleep 2; done
[ -n "$SPEECH_JUDGE" ] && { stamp "speech judge exited $(cat $WAIT_FILE)"
  sed -n '/sanity/,$p' $OUT/judge.log | head -30 | tee -a $OUT/showcase.log
  tar czf $OUT/speech_judge.tgz -C $JUDGE_DATA judges/speech; }
stamp "eval"
$PY -m tmdiff.eval --workdir=$WORK --num_samples=${NUM_SAMPLES:-256} \
  --batch_size=${NUM_SAMPLES:-256} ${PARTS:+--parts=$PARTS} > $OUT/eval.log 2>&1
sed -n '/^# eval of/,$p' $OUT/eval.log | tee -a $OUT/showcase.log
stamp "done"
(cd $OUT && tar czf logs.tar.gz --remove-files train.log eval.log judge.log sweep_*.log 2>/dev/null)
cp $WORK/metrics.jsonl $OUT/ 2>/dev/null
# The eval folder with 8 of its WAVs, the sweeps, and the tuned sampler settings.
(cd $WORK && tar czf $OUT/eval.tar.gz --exclude='t2s/0[1-9]*.wav' --exclude='t2s/[1-9]*.wav' \
  eval sampling_defaults.json 2>/dev/null)
ls -la $OUT
