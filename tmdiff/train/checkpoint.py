"""Orbax checkpoints: train state, data-iterator state and config in one step directory.

Restores always go into an abstract target carrying the target shardings, so a checkpoint
written on one mesh resumes (or evaluates) on another.

Integrity: once a step is complete, the sha256 and size of each of its files go into
`<step>/sha256.process_<i>.json` (the files split over the processes). A restore checks them,
and that the step's JSON files parse; a damaged step (or one Orbax cannot read) is reported in
one line naming the step and the file, and the restore falls back to the newest intact step
(train.on_bad_checkpoint='error' refuses instead). Half-written steps (Orbax temporary
directories from a kill during a save) are removed when the manager opens.
"""
from __future__ import annotations

import fnmatch
import glob
import json
import logging
import os
import re
import shutil

import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec

from tmdiff.data import vocab as vocab_lib
from tmdiff.data.verify import sha256
from tmdiff.model import transformer
from tmdiff.train import distributed as dist_lib

STATE, DATA, CONFIG, VOCAB = "state", "data", "config", "vocab"
DIGESTS = "sha256.process_{}.json"
DAMAGED = "damaged_checkpoints"
JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding", "metadata", "process_*")
# Keys that may change on resume: compute choices, not the state's shapes.
RESUME_FREE_KEYS = ("model.dtype", "model.attention_impl", "model.loss_impl", "model.remat",
                    "model.scan_layers")


class CheckpointError(RuntimeError):
  """A missing or unreadable checkpoint; the message names the directory."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def existing_checkpoint_dir(workdir: str) -> str:
  """`checkpoint_dir(workdir)`, an error naming it when it does not exist."""
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise CheckpointError(f"no checkpoint directory {directory} (is --workdir={workdir!r} a "
                          "training run?)")
  return directory


def make_manager(workdir: str, *, keep: int = 3, async_save: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
  if not read_only:
    for tmp in sorted(glob.glob(os.path.join(checkpoint_dir(workdir), "*.orbax-checkpoint-tmp*"))):
      logging.warning("removing half-written checkpoint %s (a save that did not finish)", tmp)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, enable_async_checkpointing=async_save, read_only=read_only,
      create=not read_only, cleanup_tmp_directories=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=(STATE, DATA, CONFIG, VOCAB))


def save(manager: ocp.CheckpointManager, step: int, state, data_state, config) -> None:
  """Starts saving `step` (asynchronously if the manager is); digests the previous save first."""
  wait(manager)
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
            with_data: bool = True, config=None, fallback: bool | None = None):
  """-> (step, state, data_state or None), state placed as `abstract_state`'s shardings say.

  Without `step`, a damaged newest step falls back to the newest intact one (moving the damaged
  ones to workdir/damaged_checkpoints) unless `fallback` is False (default: `config`'s
  train.on_bad_checkpoint, else True). With `config`, a step whose model differs is refused.
  """
  if fallback is None:
    fallback = config is None or config.train.on_bad_checkpoint == "fallback"
  first = _resolve_step(manager, workdir, step)
  candidates = [first] if step is not None else sorted(
      (s for s in manager.all_steps() if s <= first), reverse=True)
  damaged, problems = [], []
  for s in candidates:
    item_dir = os.path.join(checkpoint_dir(workdir), str(s))
    problem = check_step(item_dir)
    if problem is None:
      _check_vocab(manager, workdir, s)
      if config is not None:
        _check_config(manager, workdir, s, config)
      try:
        result = _restore_step(manager, s, item_dir, abstract_state, with_data)
      except Exception as e:  # orbax raises many types; name the checkpoint and the file
        result, problem = None, _describe(e, item_dir)
      problem = _agree(problem)
    if problem is None:
      if damaged:
        _move_aside(manager, workdir, damaged)
      logging.info("restored step %d from %s", s, item_dir)
      return result
    problems.append(f"step {s} ({item_dir}/{problem})")
    if not fallback or step is not None:
      raise CheckpointError(
          f"cannot restore step {s}: {item_dir}/{problem}" +
          ("; train.on_bad_checkpoint='fallback' restores the newest intact step instead"
           if step is None and len(candidates) > 1 else ""))
    damaged.append(s)
    logging.warning("checkpoint step %d is damaged (%s/%s); falling back to %s", s, item_dir,
                    problem, f"step {candidates[len(damaged)]}" if len(damaged) < len(
                        candidates) else "nothing")
  raise CheckpointError(f"no intact checkpoint in {checkpoint_dir(workdir)}: "
                        f"{'; '.join(problems)}")


def _restore_step(manager, step, item_dir, abstract_state, with_data):
  saved_target, convert = _in_saved_layout(os.path.join(item_dir, STATE), abstract_state)
  args = {STATE: ocp.args.StandardRestore(saved_target)}
  has_data = os.path.isdir(os.path.join(item_dir, DATA))
  if with_data and has_data:
    args[DATA] = ocp.args.JsonRestore()
  restored = manager.restore(step, args=ocp.args.Composite(**args))
  data_state = restored[DATA] if (with_data and has_data) else None
  return step, convert(restored[STATE]), data_state


def _saved_layout(state_dir: str) -> str | None:
  with ocp.PyTreeCheckpointer() as checkpointer:
    meta = checkpointer.metadata(state_dir).item_metadata
  return transformer.layer_layout(getattr(meta, "tree", meta))


def _in_saved_layout(state_dir: str, target):
  """-> (`target` in the saved step's layer layout, a function taking a restore of it to the
  target's layout and shardings)."""
  saved, wanted = _saved_layout(state_dir), transformer.layer_layout(target)
  if saved is None or wanted is None or saved == wanted:
    return target, lambda tree: tree

  def moved(leaf, shape, spec):
    return jax.ShapeDtypeStruct(shape, leaf.dtype,
                                sharding=NamedSharding(leaf.sharding.mesh, PartitionSpec(*spec)))

  def one_layer(leaf):
    n, spec = leaf.shape[0], tuple(leaf.sharding.spec)[1:]
    return [moved(leaf, leaf.shape[1:], spec)] * n

  def stacked(leaves):
    return moved(leaves[0], (len(leaves),) + leaves[0].shape,
                 (None,) + tuple(leaves[0].sharding.spec))
  if wanted == "scanned":
    saved_target = transformer.unstack_layers(target, unstack=one_layer)
    change = transformer.stack_layers
  else:
    saved_target = transformer.stack_layers(target, stack=stacked)
    change = transformer.unstack_layers
  shardings = jax.tree.map(lambda leaf: leaf.sharding, target)
  logging.info("converting the %s layers of %s to %s", saved, state_dir, wanted)
  return saved_target, jax.jit(change, out_shardings=shardings)


def _check_config(manager, workdir, step, config) -> None:
  path = os.path.join(checkpoint_dir(workdir), str(step), CONFIG, "metadata")
  if not os.path.isdir(os.path.join(checkpoint_dir(workdir), str(step), CONFIG)):
    return
  saved = manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
  diff = config_mismatch(saved[CONFIG], config)
  if diff:
    raise CheckpointError(
        f"step {step} ({path}) was written by a run with another model: "
        f"{'; '.join(diff[:5])}{'; ...' if len(diff) > 5 else ''}; resume with the same model "
        "config or use another --workdir")


def restore_params(workdir: str, abstract_params, *, step=None):
  """Parameters only (for eval and sampling), onto the shardings of `abstract_params`."""
  directory = existing_checkpoint_dir(workdir)
  manager = make_manager(workdir, read_only=True)
  step = _resolve_step(manager, workdir, step)
  problem = check_step(os.path.join(directory, str(step)))
  if problem is not None:
    raise CheckpointError(f"cannot restore step {step}: {os.path.join(directory, str(step))}/"
                          f"{problem}")
  _check_vocab(manager, workdir, step)
  item_dir = os.path.join(directory, str(step), STATE)
  target, convert = _in_saved_layout(item_dir, {"params": abstract_params})
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  try:
    with ocp.PyTreeCheckpointer() as checkpointer:
      restored = checkpointer.restore(item_dir, args=ocp.args.PyTreeRestore(
          item=target, restore_args=restore_args, partial_restore=True))
  except Exception as e:  # orbax raises many types; name the checkpoint
    raise CheckpointError(f"cannot restore parameters from {item_dir}: {e}") from e
  return step, convert(restored)["params"]


def read_config(workdir: str, step=None) -> dict:
  """The config saved with a checkpoint, as a dict."""
  existing_checkpoint_dir(workdir)
  manager = make_manager(workdir, read_only=True)
  step = _resolve_step(manager, workdir, step)
  restored = manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))
  return restored[CONFIG]


def wait(manager) -> None:
  """Waits for the save in flight, then writes the digests of every step lacking them."""
  manager.wait_until_finished()
  jax.effects_barrier()
  for step in manager.all_steps():
    write_digests(os.path.join(str(manager.directory), str(step)))


# ---- integrity ----

def _step_files(step_dir: str) -> list[str]:
  """Relative paths of the step's files, digests excluded, sorted."""
  out = []
  for root, _, files in os.walk(step_dir):
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if not re.fullmatch(DIGESTS.format(r"\d+"), rel):
        out.append(rel)
  return sorted(out)


def write_digests(step_dir: str) -> None:
  """This process's share of the step's file digests (once; local file systems only)."""
  if "://" in step_dir:
    return
  out = os.path.join(step_dir, DIGESTS.format(jax.process_index()))
  if os.path.exists(out):
    return
  files = _step_files(step_dir)[jax.process_index()::jax.process_count()]
  digests = {f: [os.path.getsize(os.path.join(step_dir, f)), sha256(os.path.join(step_dir, f))]
             for f in files}
  with open(out + ".tmp", "w") as f:
    json.dump(digests, f)
  os.replace(out + ".tmp", out)


def check_step(step_dir: str) -> str | None:
  """-> None if the step is intact, else 'FILE: what is wrong' (FILE relative to the step).

  Every JSON file must parse; a file with a digest must have its size and sha256. Process i
  checks every n-th digested file; the answer is agreed by all processes (a collective).
  """
  problem, digests = None, {}
  for part in sorted(glob.glob(os.path.join(step_dir, DIGESTS.format("*")))):
    try:
      with open(part) as f:
        digests.update(json.load(f))
    except ValueError as e:
      problem = f"{os.path.basename(part)}: unreadable ({e})"
  files = _step_files(step_dir)
  for rel in files:
    if problem is None and any(fnmatch.fnmatch(os.path.basename(rel), p)
                               for p in JSON_FILES):
      try:
        with open(os.path.join(step_dir, rel)) as f:
          json.load(f)
      except (ValueError, UnicodeDecodeError) as e:
        problem = f"{rel}: not valid JSON ({e})"
  mine = sorted(digests)[jax.process_index()::jax.process_count()]
  for rel in mine:
    if problem is not None:
      break
    path = os.path.join(step_dir, rel)
    size, digest = digests[rel]
    if not os.path.exists(path):
      problem = f"{rel}: missing"
    elif os.path.getsize(path) != size:
      problem = f"{rel}: {os.path.getsize(path)} bytes, {size} when saved (truncated?)"
    elif sha256(path) != digest:
      problem = f"{rel}: sha256 differs from the one recorded when it was saved"
  return _agree(problem)


def _agree(problem: str | None) -> str | None:
  """The first process's problem, if any process has one (a collective)."""
  if jax.process_count() == 1:
    return problem
  found = [b.decode() for b in dist_lib.allgather_bytes((problem or "").encode()) if b]
  return found[0] if found else None


def _describe(error: Exception, step_dir: str) -> str:
  """'FILE: first line of the error', FILE the first path inside the step the error names."""
  text = str(error)
  files = re.findall(re.escape(step_dir) + r"/[^\s'\",)]+", text)
  if not files:
    # TensorStore specs name the kvstore path and the key separately.
    paths = re.findall(r"'path': '([^']+)'", text)
    files = [os.path.join(step_dir, p) if not p.startswith("/") else p for p in paths[-1:]]
  first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
  first = first.split(" See full TensorStore details")[0][:300]
  where = os.path.relpath(files[0], step_dir) if files else "?"
  return f"{where}: {type(error).__name__}: {first}"


def config_mismatch(saved: dict, config) -> list[str]:
  """'key: saved -> now' for the keys that shape the train state and differ."""
  now = dist_lib._flatten(json.loads(config.to_json()))  # noqa: SLF001
  old = dist_lib._flatten(saved)  # noqa: SLF001
  keys = [k for k in sorted(set(now) | set(old))
          if k.split(".")[0] in ("model", "vocab") and k not in RESUME_FREE_KEYS]
  out = [f"{k}: {old.get(k)!r} -> {now.get(k)!r}" for k in keys if old.get(k) != now.get(k)]
  if (old.get("optim.ema_decay", 0) > 0) != (now.get("optim.ema_decay", 0) > 0):
    out.append(f"optim.ema_decay: {old.get('optim.ema_decay')!r} -> {now.get('optim.ema_decay')!r}")
  return out


def _move_aside(manager, workdir: str, steps) -> None:
  """Moves damaged steps out of the checkpoint directory (they would block re-saving them)."""
  if jax.process_index() == 0:
    target = os.path.join(os.path.abspath(workdir), DAMAGED)
    os.makedirs(target, exist_ok=True)
    for step in steps:
      dest = os.path.join(target, str(step))
      n = 1
      while os.path.exists(dest):
        dest, n = os.path.join(target, f"{step}.{n}"), n + 1
      shutil.move(os.path.join(checkpoint_dir(workdir), str(step)), dest)
      logging.warning("moved damaged step %d to %s", step, dest)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("tmdiff_move_damaged_checkpoints")
  manager.reload()
