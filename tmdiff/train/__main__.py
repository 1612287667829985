"""Train a tri-modal masked diffusion model.

  python -m tmdiff.train --config=experiments/tiny.py --config.train.steps=200 --workdir=runs/tiny
"""
from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from tmdiff.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment file[:arg]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, reports)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  loop.train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
