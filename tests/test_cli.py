"""The `tmdiff` command and its plumbing: library INFO kept out of the log, user errors as one
line with exit status 2, tracebacks only on --verbosity=1."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tmdiff import entry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.d_model=64", "--config.model.d_ff=128", "--config.model.n_heads=4",
        "--config.model.n_kv_heads=2", "--config.model.head_dim=16",
        "--config.model.base_width=64", "--config.data.seq_len=32",
        "--config.data.global_batch=8", "--config.train.log_every=1",
        "--config.train.eval_every=0"]


def tmdiff(*args, timeout=300):
  """`tmdiff ARGS` as a console script would run it (tmdiff.__main__), from the repo root."""
  env = {**os.environ, "PYTHONPATH": ROOT}
  return subprocess.run([sys.executable, "-c", "from tmdiff.__main__ import main; main()", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("args, expected", [
    (["--config.train.stepz=10"],
     'AttributeError: \'stepz\'; Did you mean "steps" instead of "stepz"? (in --config.train.stepz=10)'),
    (["--config.train.steps=abc"], "flag --config.train.steps=abc: invalid literal for int()"),
    (["--bogus=1"], "Unknown command line flag 'bogus'"),
])
def test_train_user_errors_are_one_line(tmp_path, args, expected):
  out = tmdiff("train", "--config=experiments/tiny.py", f"--workdir={tmp_path}", *args)
  assert out.returncode == entry.USAGE_ERROR, out.stderr
  assert "Traceback" not in out.stderr, out.stderr
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert lines[-1].startswith("tmdiff.train: ") and expected in lines[-1], lines


def test_missing_config_file_names_it_and_verbosity_brings_the_traceback(tmp_path):
  out = tmdiff("train", "--config=experiments/nope.py", f"--workdir={tmp_path}")
  assert out.returncode == entry.USAGE_ERROR and "Traceback" not in out.stderr, out.stderr
  assert out.stderr.strip().splitlines()[-1] == (
      "tmdiff.train: ConfigFileError: --config=experiments/nope.py: cannot load it "
      "([Errno 2] No such file or directory: 'experiments/nope.py')")
  out = tmdiff("train", "--config=experiments/nope.py", f"--workdir={tmp_path}", "--verbosity=1")
  assert out.returncode != 0 and "Traceback" in out.stderr


def test_unknown_command_and_usage():
  out = tmdiff("nope")
  assert out.returncode == 2 and "unknown command 'nope'" in out.stderr
  out = tmdiff()
  assert out.returncode == 0
  assert all(name in out.stdout for name in ("prepare", "train", "sample", "eval"))


def test_training_log_holds_our_lines_and_no_library_info(tmp_path):
  """A run that checkpoints: Orbax's INFO and JAX's backend probing stay out; ours stay in."""
  out = tmdiff("train", "--config=experiments/tiny.py", f"--workdir={tmp_path}", *TINY,
               "--config.train.steps=4", "--config.train.ckpt_every=2")
  assert out.returncode == 0, out.stderr[-3000:]
  log = out.stderr.splitlines()
  assert any("step 4/4" in l for l in log), log
  assert (tmp_path / "checkpoints" / "4").is_dir()
  noisy = [l for l in log if "Unable to initialize backend" in l or "orbax" in l.lower()
           or "checkpoint_manager" in l or "CheckpointManagerOptions" in l]
  assert not noisy, noisy[:5]
  assert len(log) < 30, len(log)


def test_message_unwraps_ml_collections_key_errors():
  wrapped = AttributeError(KeyError("'stepz'\nDid you mean \"steps\" instead of \"stepz\"?"))
  assert entry.message(wrapped) == '\'stepz\'; Did you mean "steps" instead of "stepz"?'
  assert entry.message(ValueError("a\n  b")) == "a; b"
