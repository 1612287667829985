"""Preemption signals, the stop step every process agrees on, and the workdir preflight.

A preemption notice (SIGTERM from SLURM or Kubernetes, SIGINT, SIGUSR1 from SLURM's
`--signal=USR1@N`) only sets a flag; the loop finishes its step, saves a checkpoint
synchronously and returns. With several processes the flag is all-gathered every
`train.preemption_check_every` steps, so every process stops (and saves) at the same step; JAX's
preemption sync point (TPU maintenance events, where the runtime exposes them) is consulted every
step.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading

import jax
import numpy as np

PREEMPT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


class WorkdirError(RuntimeError):
  """The workdir cannot hold the run's checkpoints; the message names the path."""


class NonFiniteError(FloatingPointError):
  """Training met non-finite steps that train.on_nonfinite says stop on; names the steps."""


class StopRequest:
  """Context manager recording the first preemption signal received.

  A second signal of the same kind goes to the handler that was there before (Ctrl-C twice
  interrupts at once).
  """

  def __init__(self, signals=PREEMPT_SIGNALS):
    self.signals = [getattr(signal, s) for s in signals if hasattr(signal, s)]
    self.received: str | None = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      logging.warning("not the main thread: preemption signals are not handled")
      return self
    for s in self.signals:
      self._previous[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if self.received is None:
      self.received = name
      logging.warning("received %s: finishing this step, then saving a checkpoint and exiting",
                      name)
      return
    self._restore()
    signal.raise_signal(signum)

  def _restore(self):
    for s, handler in self._previous.items():
      signal.signal(s, signal.SIG_DFL if handler is None else handler)
    self._previous = {}

  def __exit__(self, *exc):
    self._restore()
    return False


def should_stop(request: StopRequest, step: int, every: int) -> bool:
  """Whether the run stops after `step`; the same answer on every process (a collective when
  several processes run: all must call it at every step)."""
  if jax.process_count() == 1:
    return request.received is not None
  from jax.experimental import multihost_utils
  try:
    if multihost_utils.reached_preemption_sync_point(step):
      if request.received is None:
        request.received = "a preemption notice from the JAX runtime"
      return True
  except RuntimeError:  # no preemption service in this runtime
    pass
  if step % every:
    return False
  flags = multihost_utils.process_allgather(np.int32(request.received is not None))
  if np.any(flags) and request.received is None:
    request.received = "another process's stop request"
  return bool(np.any(flags))


def state_bytes(abstract_state) -> int:
  return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
             for a in jax.tree.leaves(abstract_state))


def check_workdir(workdir: str, checkpoint_bytes: int, copies: int = 2) -> None:
  """Raises WorkdirError unless `workdir` (a local path) is writable and has room for `copies`
  checkpoints of `checkpoint_bytes` each. Remote paths (scheme://) are not checked."""
  if "://" in workdir:
    return
  path = os.path.abspath(workdir)
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".write_test_"):
      pass
  except OSError as e:
    raise WorkdirError(f"workdir {path} is not writable: {e.strerror or e}") from None
  free = shutil.disk_usage(path).free
  needed = copies * checkpoint_bytes
  if free < needed:
    raise WorkdirError(
        f"workdir {path} has {_size(free)} free; checkpoints need about {_size(needed)} "
        f"({copies} x the {_size(checkpoint_bytes)} train state): free space there or choose "
        "another --workdir")


def _size(n: int) -> str:
  return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
