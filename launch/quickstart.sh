#!/usr/bin/env bash
# The main job on the embedded default, from a fresh machine:
#   set-up -> build the tri-modal dataset (Shakespeare text, procedural captioned images,
#   espeak-ng speech; tokenizers trained here) -> tiny pretraining on CPU -> checkpoints,
#   metrics (JSONL + TensorBoard) and an eval report in runs/tiny -> judges (small settings
#   that fit the 15-minute budget; JUDGE_SETTINGS overrides them) -> generation metrics
#   (text perplexity, T2I attribute accuracy, T2S word error rate) in runs/tiny/eval.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-runs/data}
WORKDIR=${WORKDIR:-runs/tiny}

bash launch/setup_env.sh
.venv/bin/python -m tmdiff.data.prepare --out="$DATA"
.venv/bin/python -m tmdiff.train --config="experiments/tiny.py:$DATA" --workdir="$WORKDIR" "$@"
echo "eval report ($WORKDIR/eval_report.json):"
cat "$WORKDIR/eval_report.json"
QUICK_JUDGES='{"text": {"steps": 150}, "image": {"steps": 1000, "images": 3000}, "speech": {"steps": 300, "held_out": 24, "clean_utterances": 800, "tokenized_utterances": 800}}'
.venv/bin/python -m tmdiff.eval.judges --data_dir="$DATA" --settings="${JUDGE_SETTINGS:-$QUICK_JUDGES}" >/dev/null
.venv/bin/python -m tmdiff.eval --workdir="$WORKDIR" --num_samples=16
