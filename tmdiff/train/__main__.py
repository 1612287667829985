"""Train a tri-modal masked diffusion model.

  python -m tmdiff.train --config=experiments/tiny.py --config.train.steps=200 --workdir=runs/tiny
"""
from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from tmdiff.configs.derived import ConfigError
from tmdiff.data.batch import BatchError
from tmdiff.data.pipeline import DataConfigError
from tmdiff.data.records import RecordError
from tmdiff.train import loop
from tmdiff.train.checkpoint import CheckpointError

USER_ERRORS = (ConfigError, BatchError, DataConfigError, RecordError, CheckpointError)

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment file[:arg]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, reports)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  try:
    loop.train(_CONFIG.value, _WORKDIR.value)
  except USER_ERRORS as e:
    raise SystemExit(f"tmdiff.train: {type(e).__name__}: {e}") from None


if __name__ == "__main__":
  app.run(main)
