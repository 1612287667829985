"""The training loop: data, compiled step, checkpoints, metrics, periodic eval."""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import numpy as np

from tmdiff.configs import validate as validate_lib
from tmdiff.configs.derived import derive
from tmdiff.data import batch as batch_lib
from tmdiff.data import pipeline as pipeline_lib
from tmdiff.eval import elbo as elbo_lib
from tmdiff.train import checkpoint as ckpt_lib
from tmdiff.train import distributed as dist_lib
from tmdiff.train import flops as flops_lib
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
  """
  devices = jax.devices() if devices is None else devices
  if jax.process_count() > 1:
    logging.info("config sha256 %s agreed by %d processes", dist_lib.check_same_config(config),
                 jax.process_count())
  validate_lib.validate(config, len(devices))
  hp = derive(config)
  logging.info("hyperparameters: %s", hp.summary())
  mesh = make_mesh(config, devices)
  logging.info("mesh: %s", dict(mesh.shape))
  trainer = Trainer(config, mesh)
  counts = flops_lib.param_counts(config.model, trainer.layout.padded_size())
  logging.info("parameters: %s", {k: f"{v:,}" for k, v in counts.items()})

  it = make_iterator(config, "train", hp.examples_per_step, data_shards)
  manager = ckpt_lib.make_manager(workdir, keep=config.train.keep_checkpoints,
                                  async_save=config.train.async_checkpointing)
  if manager.latest_step() is not None:
    start, state, data_state = ckpt_lib.restore(manager, workdir, trainer.abstract_state)
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
  eval_metrics, interval = {}, None
  for step in range(start + 1, last + 1):
    batch = next(it)
    if step == start + 1:
      batch_lib.check_batch(batch, seq_len=hp.seq_len, layout=trainer.layout,
                            max_segments=config.data.max_segments)
    state, metrics = train_step(state, trainer.put_batch(batch))
    interval = metrics if interval is None else jax.tree.map(jax.numpy.add, interval, metrics)
    if step % config.train.log_every == 0 or step == last:
      # Means over the logging interval; lr and norms as of this step.
      now, sums = jax.device_get((metrics, interval))
      metrics = {k: float(v) / (step - tick_step) for k, v in sums.items()}
      metrics.update({k: float(now[k]) for k in LAST_VALUE})
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
      if not np.isfinite(metrics["loss"]):
        raise FloatingPointError(f"loss is {metrics['loss']} at step {step}")
      tick, tick_step = time.perf_counter(), step
    if step % config.train.ckpt_every == 0 or step == last:
      # Every process's iterator state, gathered: Orbax writes JSON items from process 0 only.
      ckpt_lib.save(manager, step, state, dist_lib.gather_data_state(it.get_state()), config)
    if (config.train.eval_every and step % config.train.eval_every == 0) or step == hp.steps:
      eval_metrics = evaluate(trainer, eval_step, state["params"], config)
      writer.write(step, eval_metrics, prefix="eval")
      logging.info("eval step %d: %s", step, _format_eval(eval_metrics))
  ckpt_lib.wait(manager)
  manager.close()
  writer.close()
  if eval_metrics and jax.process_index() == 0:
    with open(os.path.join(workdir, EVAL_REPORT), "w") as f:
      json.dump({"step": last, **eval_metrics}, f, indent=2)
  return eval_metrics


def _format_eval(metrics: dict) -> str:
  return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("bits"))
