"""Train a tri-modal masked diffusion model.

  python -m tmdiff.train --config=experiments/tiny.py --config.train.steps=200 --workdir=runs/tiny

Multi-process: set TMDIFF_COORDINATOR/TMDIFF_NUM_PROCESSES/TMDIFF_PROCESS_ID, or run under
SLURM or on a TPU pod (see tmdiff/train/distributed.py and launch/launch.py).
"""
from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from tmdiff import entry
from tmdiff.configs.derived import ConfigError
from tmdiff.data.batch import BatchError
from tmdiff.data.pipeline import DataConfigError
from tmdiff.data.records import RecordError
from tmdiff.train import distributed, loop, resilience
from tmdiff.train.checkpoint import CheckpointError

USER_ERRORS = (ConfigError, BatchError, DataConfigError, RecordError, CheckpointError,
               distributed.DistributedError, entry.ConfigFileError, resilience.NonFiniteError,
               resilience.WorkdirError)

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment file[:arg]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, reports)")
_DATA_SHARDS = flags.DEFINE_integer(
    "data_shards", None, "data shards over all hosts (default: one per process); keep it fixed "
    "to resume on another number of hosts with the same data order")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.INFO)
  config = entry.config_value(_CONFIG)
  distributed.initialize_from_env()
  loop.train(config, _WORKDIR.value, data_shards=_DATA_SHARDS.value)


if __name__ == "__main__":
  entry.run_app(main, "tmdiff.train", USER_ERRORS)
