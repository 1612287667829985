"""The training loop: data, compiled step, checkpoints, metrics, periodic eval."""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from tmdiff.configs import validate as validate_lib
from tmdiff.configs.derived import derive
from tmdiff.data import batch as batch_lib
from tmdiff.data import pipeline as pipeline_lib
from tmdiff.eval import elbo as elbo_lib
from tmdiff.train import checkpoint as ckpt_lib
from tmdiff.train import distributed as dist_lib
from tmdiff.train import flops as flops_lib
from tmdiff.train import resilience
from tmdiff.train.trainer import Trainer, make_mesh

METRICS_FILE = "metrics.jsonl"
LAST_VALUE = ("lr", "grad_norm", "param_norm")  # logged as of the step, not averaged
EVAL_REPORT = "eval_report.json"


class MetricWriter:
  """Appends metrics to workdir/metrics.jsonl and TensorBoard event files (process 0 only)."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, METRICS_FILE)
    self.tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      try:
        from tensorboardX import SummaryWriter
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:
        logging.warning("tensorboardX not installed: no TensorBoard events")

  def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": prefix, **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self.tb is not None:
      for k, v in metrics.items():
        self.tb.add_scalar(f"{prefix}/{k}", float(v), int(step))
      self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()


def rows_config(config, rows: int):
  """A copy of `config` whose data pipeline yields `rows` rows per global batch."""
  copy = config.copy_and_resolve_references()
  copy.data.global_batch = rows
  return copy


def make_iterator(config, split: str, rows: int, data_shards: int | None = None):
  """This process's rows of `data_shards` shards (default: one per process)."""
  shard_config = rows_config(config, rows)
  return dist_lib.ShardedIterator(
      lambda index, count: iter(pipeline_lib.make_dataset(
          shard_config, split, process_index=index, process_count=count)), data_shards)


def evaluate(trainer: Trainer, eval_step, params, config) -> dict:
  """Per-modality negative ELBO on the first data.eval_batches x data.global_batch validation
  rows; invariant to the eval batch and the mesh (tmdiff.eval.elbo)."""
  rows = elbo_lib.validation_rows(config, elbo_lib.default_num_rows(config))
  return elbo_lib.evaluate_rows(trainer, params, rows, batch_size=config.data.global_batch,
                                eval_step=eval_step)


def train(config, workdir: str, *, stop_after: int | None = None, devices=None,
          data_shards: int | None = None) -> dict:
  """Trains (resuming from workdir if it holds a checkpoint); returns the final eval metrics.

  `stop_after` ends the run after that global step as if it were killed there (tests).
  `data_shards` (default: the process count) fixes how the data is split over hosts; runs with
  the same value see the same global batches whatever their process count.
  SIGTERM, SIGINT or SIGUSR1 end the run after the step in progress, with a checkpoint of that
  step (tmdiff.train.resilience); it then returns {} without evaluating.
  """
  with resilience.StopRequest() as stop:
    return _train(config, workdir, stop, stop_after, devices, data_shards)


def _train(config, workdir, stop, stop_after, devices, data_shards) -> dict:
  devices = jax.devices() if devices is None else devices
  if jax.process_count() > 1:
    logging.info("config sha256 %s agreed by %d processes", dist_lib.check_same_config(config),
                 jax.process_count())
  validate_lib.validate(config, len(devices))
  hp = derive(config)
  t = config.train
  logging.info("hyperparameters: %s", hp.summary())
  mesh = make_mesh(config, devices)
  logging.info("mesh: %s", dict(mesh.shape))
  trainer = Trainer(config, mesh)
  counts = flops_lib.param_counts(config.model, trainer.layout.padded_size())
  logging.info("parameters: %s", {k: f"{v:,}" for k, v in counts.items()})
  resilience.check_workdir(workdir, resilience.state_bytes(trainer.abstract_state))

  it = make_iterator(config, "train", hp.examples_per_step, data_shards)
  manager = ckpt_lib.make_manager(workdir, keep=t.keep_checkpoints,
                                  async_save=t.async_checkpointing)
  if manager.latest_step() is not None:
    start, state, data_state = ckpt_lib.restore(manager, workdir, trainer.abstract_state,
                                                config=config)
    if data_state is not None:
      it.set_state(data_state)
    logging.info("resuming at step %d", start)
  else:
    start, state = 0, trainer.init_state()
  train_step = trainer.compile_train_step()
  eval_step = trainer.compile_eval_step(config.data.global_batch)
  writer = MetricWriter(workdir)
  flops_per_step = flops_lib.train_flops_per_token(
      config.model, trainer.layout.padded_size(), hp.seq_len) * hp.tokens_per_step
  peak = flops_lib.peak_flops(devices[0])
  last = min(hp.steps, stop_after) if stop_after is not None else hp.steps

  tick, tick_step = time.perf_counter(), start
  eval_metrics, interval, tracker = {}, None, _new_tracker()
  rollbacks, step, stopping = 0, start, False
  while step < last and not stopping:
    step += 1
    batch = next(it)
    if step == start + 1:
      batch_lib.check_batch(batch, seq_len=hp.seq_len, layout=trainer.layout,
                            max_segments=config.data.max_segments)
    state, metrics = train_step(state, trainer.put_batch(batch))
    interval, tracker = _accumulate(interval, tracker, metrics, np.int32(step))
    stopping = resilience.should_stop(stop, step, t.preemption_check_every)
    log_now = step % t.log_every == 0 or step == last or stopping
    save_now = step % t.ckpt_every == 0 or step == last or stopping
    bad = 0
    if log_now or save_now:  # the non-finite policy acts before anything is logged or saved
      seen = jax.device_get(tracker)
      bad = int(seen["count"])
      if bad:
        _nonfinite_policy(t, seen, rollbacks)
        tracker = _new_tracker(run=seen["run"])
        if t.on_nonfinite == "rollback":
          rollbacks += 1
          bad_step = step
          step, state, it = _rollback(config, trainer, manager, workdir, seen, rollbacks,
                                      hp.examples_per_step, data_shards)
          writer.write(bad_step, {"nonfinite_steps": bad, "rolled_back_to": step},
                       prefix="rollback")
          interval, tick, tick_step = None, time.perf_counter(), step
          if stopping:
            logging.warning("stopped by %s after rolling back to checkpoint %d in %s",
                            stop.received, step, ckpt_lib.checkpoint_dir(workdir))
          continue
    if log_now:
      # Means over the logging interval's finite steps; lr and norms as of this step.
      now, sums = jax.device_get((metrics, interval))
      good = step - tick_step - int(sums.pop("nonfinite"))
      metrics = {k: float(v) / good if good else float("nan") for k, v in sums.items()}
      metrics.update({k: float(now[k]) for k in LAST_VALUE})
      metrics["nonfinite_steps"] = float(bad)
      interval = None
      elapsed = time.perf_counter() - tick
      tokens_per_s = (step - tick_step) * hp.tokens_per_step / elapsed
      metrics["tokens_per_s_per_device"] = tokens_per_s / len(devices)
      metrics["real_tokens_per_s_per_device"] = (metrics["tokens_per_s_per_device"]
                                                 * metrics["real_token_fraction"])
      if peak:
        metrics["mfu"] = flops_per_step * (step - tick_step) / elapsed / (peak * len(devices))
      writer.write(step, metrics)
      logging.info(
          "step %d/%d loss %.4f bits/tok text %.3f image %.3f audio %.3f | %.0f tok/s/dev "
          "(%.0f%% real)%s | lr %.3g", step, hp.steps, metrics["loss"],
          metrics["bits_per_token/text"], metrics["bits_per_token/image"],
          metrics["bits_per_token/audio"], metrics["tokens_per_s_per_device"],
          100 * metrics["real_token_fraction"],
          f" MFU {metrics['mfu']:.1%}" if "mfu" in metrics else "", metrics["lr"])
      tick, tick_step = time.perf_counter(), step
    if save_now:
      # Every process's iterator state, gathered: Orbax writes JSON items from process 0 only.
      ckpt_lib.save(manager, step, state, dist_lib.gather_data_state(it.get_state()), config)
      rollbacks = 0
    if stopping:
      ckpt_lib.wait(manager)
      logging.warning("stopped by %s after step %d: checkpoint %d saved in %s; run the same "
                      "command to resume", stop.received, step, step,
                      ckpt_lib.checkpoint_dir(workdir))
    elif (t.eval_every and step % t.eval_every == 0) or step == hp.steps:
      eval_metrics = evaluate(trainer, eval_step, state["params"], config)
      writer.write(step, eval_metrics, prefix="eval")
      logging.info("eval step %d: %s", step, _format_eval(eval_metrics))
  ckpt_lib.wait(manager)
  manager.close()
  writer.close()
  if stopping:
    return {}
  if eval_metrics and jax.process_index() == 0:
    with open(os.path.join(workdir, EVAL_REPORT), "w") as f:
      json.dump({"step": last, **eval_metrics}, f, indent=2)
  return eval_metrics


# ---- non-finite steps ----

def _new_tracker(run=0):
  """Consecutive non-finite steps (`run` carries over), and the interval's count, first, last."""
  zero = np.int32(0)
  return {"run": np.int32(run), "max_run": np.int32(run), "count": zero, "first": zero,
          "last": zero}


@jax.jit
def _accumulate(interval, tracker, metrics, step):
  """Adds a step's metrics to the interval's sums and updates the non-finite tracker (device)."""
  interval = metrics if interval is None else jax.tree.map(jnp.add, interval, metrics)
  bad = metrics["nonfinite"] > 0
  run = jnp.where(bad, tracker["run"] + 1, 0)
  return interval, {
      "run": run, "max_run": jnp.maximum(tracker["max_run"], run),
      "count": tracker["count"] + bad.astype(jnp.int32),
      "first": jnp.where(bad & (tracker["first"] == 0), step, tracker["first"]),
      "last": jnp.where(bad, step, tracker["last"])}


def _nonfinite_policy(t, seen, rollbacks: int) -> None:
  """Raises NonFiniteError when train.on_nonfinite says stop; logs a skip."""
  where = f"step {seen['first']}" + (
      f" ({seen['count']} steps up to step {seen['last']})" if seen["count"] > 1 else "")
  if t.on_nonfinite == "error":
    raise resilience.NonFiniteError(
        f"loss or gradients not finite at {where} (train.on_nonfinite='error'; 'skip' or "
        "'rollback' train past such steps)")
  if t.on_nonfinite == "skip":
    if seen["max_run"] >= t.nonfinite_limit:
      raise resilience.NonFiniteError(
          f"{seen['max_run']} non-finite steps in a row, up to step {seen['last']} "
          f"(train.nonfinite_limit={t.nonfinite_limit})")
    logging.warning("skipped %s: loss or gradients not finite; parameters and optimizer state "
                    "left unchanged", where)
  elif rollbacks >= t.nonfinite_limit:
    raise resilience.NonFiniteError(
        f"loss or gradients not finite at {where} after {rollbacks} rollbacks in a row "
        f"(train.nonfinite_limit={t.nonfinite_limit})")


def _rollback(config, trainer, manager, workdir, seen, rollbacks, rows, data_shards):
  """Restores the newest checkpoint (all hold finite states: the policy runs before each save)
  and skips max(train.rollback_skip, bad step - checkpoint step) batches past it."""
  ckpt_lib.wait(manager)
  it = make_iterator(config, "train", rows, data_shards)
  if manager.latest_step() is None:
    good, state = 0, trainer.init_state()
  else:
    good, state, data_state = ckpt_lib.restore(manager, workdir, trainer.abstract_state,
                                               config=config)
    if data_state is not None:
      it.set_state(data_state)
  skip = max(config.train.rollback_skip, int(seen["last"]) - good)
  for _ in range(skip):
    next(it)
  logging.warning("loss or gradients not finite at steps %d to %d: rolled back to step %d and "
                  "skipped the next %d batches (rollback %d in a row, train.nonfinite_limit=%d)",
                  seen["first"], seen["last"], good, skip, rollbacks, config.train.nonfinite_limit)
  return good, state, it


def _format_eval(metrics: dict) -> str:
  return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("bits"))
