#!/bin/bash
# Runs a job that outlasts one device call (10 minutes) across back-to-back calls of one lease.
#   bash benchmarks/run_gpu_detached.sh NAME WAIT_S COMMAND...
# The first call starts COMMAND in its own process session (it survives the call's end), with
# OUT=/tmp/detached/NAME/out. Every call, the first included, waits up to WAIT_S seconds for it
# to finish, then copies what it wrote so far into the call's $OUT. A later call with the same
# NAME only waits and copies. /tmp/detached/NAME/rc holds its exit status once it is done.
NAME=${1:?usage: run_gpu_detached.sh NAME WAIT_S COMMAND...}
WAIT_S=${2:?usage: run_gpu_detached.sh NAME WAIT_S COMMAND...}
shift 2
DIR=/tmp/detached/$NAME
if [ ! -d $DIR ]; then
  [ $# -gt 0 ] || { echo "run_gpu_detached.sh: no job $NAME yet, and no COMMAND to start it"; exit 2; }
  mkdir -p $DIR/out
  echo "== started $NAME at $(date -u +%T): $*"
  OUT=$DIR/out setsid nohup bash -c '"$@"; echo $? > '$DIR/rc bash "$@" > $DIR/log 2>&1 < /dev/null &
fi
t0=$(date +%s)
while [ ! -e $DIR/rc ] && [ $(( $(date +%s) - t0 )) -lt $WAIT_S ]; do sleep 2; done
cp -r $DIR/out/. ${OUT:-/tmp/out}/ 2>/dev/null
cp $DIR/log ${OUT:-/tmp/out}/detached.log
if [ -e $DIR/rc ]; then echo "== $NAME finished, exit $(cat $DIR/rc)"; else echo "== $NAME still running after ${WAIT_S}s"; fi
tail -40 $DIR/log
