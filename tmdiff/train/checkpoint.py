"""Orbax checkpoints: train state, data-iterator state and config in one step directory.

Restores always go into an abstract target carrying the target shardings, so a checkpoint
written on one mesh resumes (or evaluates) on another.
"""
from __future__ import annotations

import json
import logging
import os

import jax
import orbax.checkpoint as ocp

from tmdiff.data import vocab as vocab_lib

STATE, DATA, CONFIG, VOCAB = "state", "data", "config", "vocab"


class CheckpointError(RuntimeError):
  """A missing or unreadable checkpoint; the message names the directory."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, *, keep: int = 3, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=async_save, read_only=read_only,
      create=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=(STATE, DATA, CONFIG, VOCAB))


def save(manager: ocp.CheckpointManager, step: int, state, data_state, config) -> None:
  args = {STATE: ocp.args.StandardSave(state),
          CONFIG: ocp.args.JsonSave(json.loads(config.to_json())),
          VOCAB: ocp.args.JsonSave({"special_tokens": list(vocab_lib.SPECIAL_TOKENS)})}
  if data_state is not None:
    args[DATA] = ocp.args.JsonSave(data_state)
  manager.save(step, args=ocp.args.Composite(**args))


def _resolve_step(manager, workdir, step):
  steps = manager.all_steps()
  if not steps:
    raise CheckpointError(f"no checkpoint in {checkpoint_dir(workdir)}")
  if step is None:
    return manager.latest_step()
  if step not in steps:
    raise CheckpointError(f"no checkpoint for step {step} in {checkpoint_dir(workdir)}; "
                          f"available: {sorted(steps)}")
  return step


def _check_vocab(manager, workdir, step) -> None:
  """The checkpoint's special-token layout must be the one this code uses."""
  if not os.path.isdir(os.path.join(checkpoint_dir(workdir), str(step), VOCAB)):
    return  # written before the layout was recorded
  saved = manager.restore(step, args=ocp.args.Composite(**{VOCAB: ocp.args.JsonRestore()}))[VOCAB]
  if list(saved["special_tokens"]) != list(vocab_lib.SPECIAL_TOKENS):
    raise CheckpointError(
        f"step {step} in {checkpoint_dir(workdir)} was trained with special tokens "
        f"{saved['special_tokens']}, this code uses {list(vocab_lib.SPECIAL_TOKENS)}: the ids "
        "differ, so the model would read the wrong tokens")


def restore(manager: ocp.CheckpointManager, workdir: str, abstract_state, *, step=None,
            with_data: bool = True):
  """-> (step, state, data_state or None), state placed as `abstract_state`'s shardings say."""
  step = _resolve_step(manager, workdir, step)
  _check_vocab(manager, workdir, step)
  args = {STATE: ocp.args.StandardRestore(abstract_state)}
  item_dir = os.path.join(checkpoint_dir(workdir), str(step))
  has_data = os.path.isdir(os.path.join(item_dir, DATA))
  if with_data and has_data:
    args[DATA] = ocp.args.JsonRestore()
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**args))
  except Exception as e:  # orbax raises many types; name the checkpoint
    raise CheckpointError(f"cannot restore step {step} from {item_dir}: {e}") from e
  data_state = restored[DATA] if (with_data and has_data) else None
  logging.info("restored step %d from %s", step, item_dir)
  return step, restored[STATE], data_state


def restore_params(workdir: str, abstract_params, *, step=None):
  """Parameters only (for eval and sampling), onto the shardings of `abstract_params`."""
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise CheckpointError(f"no checkpoint directory {directory}")
  manager = make_manager(workdir, read_only=True)
  step = _resolve_step(manager, workdir, step)
  _check_vocab(manager, workdir, step)
  item_dir = os.path.join(directory, str(step), STATE)
  target = {"params": abstract_params}
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  try:
    with ocp.PyTreeCheckpointer() as checkpointer:
      restored = checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(
          item=target, restore_args=restore_args, partial_restore=True))
  except Exception as e:  # orbax raises many types; name the checkpoint
    raise CheckpointError(f"cannot restore parameters from {item_dir}: {e}") from e
  return step, restored["params"]


def read_config(workdir: str, step=None) -> dict:
  """The config saved with a checkpoint, as a dict."""
  manager = make_manager(workdir, read_only=True)
  step = _resolve_step(manager, workdir, step)
  restored = manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
  return restored[CONFIG]


def wait(manager) -> None:
  manager.wait_until_finished()
  jax.effects_barrier()
