#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine:
#   set-up -> build the tri-modal dataset (Shakespeare text, procedural captioned images,
#   espeak-ng speech; tokenizers trained here) -> tiny pretraining on CPU -> checkpoints,
#   metrics (JSONL + TensorBoard) and an eval report in runs/tiny.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-runs/data}
WORKDIR=${WORKDIR:-runs/tiny}

bash launch/setup_env.sh
.venv/bin/python -m tmdiff.data.prepare --out="$DATA"
.venv/bin/python -m tmdiff.train --config="experiments/tiny.py:$DATA" --workdir="$WORKDIR" "$@"
echo "eval report ($WORKDIR/eval_report.json):"
cat "$WORKDIR/eval_report.json"
