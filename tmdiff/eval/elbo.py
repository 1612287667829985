"""Per-modality negative ELBO on the validation split that does not move with the eval batch
size or the device count.

  rows = validation_rows(config, num_rows)          # a fixed row sequence (host numpy)
  result = evaluate_rows(trainer, params, rows, batch_size=16)

How the invariance is obtained:
  * rows: the validation pipeline is read once on the host as one process, in blocks of the
    training batch (`data.global_batch`, which fixes the composition when `data.exact_mix` is
    on); the first `num_rows` rows are the eval set, whatever the eval batch or mesh.
  * randomness: row r's masks come from fold_in(key(seed ^ EVAL_SEED_SALT), r), drawn row by
    row. Its times (one per segment slot s) are stratified over the fixed eval set of N rows,
    not over a batch: u[r, s] = (perm_s(r) + jitter[r, s]) / N with one permutation of the N
    rows per slot, all drawn on the host from (seed, N) (`time_uniforms`). Neither depends
    on which batch or device the row lands in. The estimate is still noisy on few rows: on
    the tiny embedded-default model, 64 rows, 3 eval seeds spanned 0.42 / 0.21 / 0.57 bits
    (text / image / audio) with these times, 0.08 / 0.69 / 1.44 with iid ones; raise the
    row count (`--num_rows`) for tighter figures.
  * sums: the compiled step returns per-row, per-modality sums; the host adds them in float64
    in row order. Padding rows (to fill the last batch or a multiple of the batch shards)
    have no loss-mask tokens and are dropped on the host.
  * arithmetic: the eval forward pass computes in float32 (EVAL_DTYPE) whatever the training
    dtype. A row's matmuls still run in batches of other shapes, whose float32 rounding differs
    by ~1e-7 relative; in bfloat16 the same reordering moved the tiny model's per-row sums by
    up to 1% (summary 2e-4) between eval batches 4 and 16 on one CPU device.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from absl import logging

from tmdiff.configs import derived
from tmdiff.data import batch as batch_lib
from tmdiff.data import vocab as vocab_lib
from tmdiff.diffusion import objective as obj_lib

EVAL_SEED_SALT = 0x5EED
EVAL_DTYPE = "float32"  # compute dtype of the eval forward pass (parameters are unchanged)
SUM_KEYS = ("nll", "tokens", "masked")


def eval_key(seed: int):
  """The base key every eval row's randomness is folded from."""
  return jax.random.key(int(seed) ^ EVAL_SEED_SALT)


def time_uniforms(seed: int, num_rows: int, max_segments: int) -> np.ndarray:
  """[num_rows, max_segments + 1] float32 in [0, 1): per segment slot, stratified over rows."""
  rng = np.random.default_rng([int(seed), EVAL_SEED_SALT, num_rows])
  slots = max_segments + 1
  strata = np.stack([rng.permutation(num_rows) for _ in range(slots)], axis=1)
  u = (strata + rng.random((num_rows, slots))) / num_rows
  return np.minimum(u, np.nextafter(np.float32(1), np.float32(0))).astype(np.float32)


def row_elbo_sums(target_logp, corruption: obj_lib.Corruption, modality) -> dict:
  """`objective.elbo_sums` per row: {nll, tokens, masked} each [B, 3]."""
  def one(logp, c, m):
    return obj_lib.elbo_sums(logp[None], jax.tree.map(lambda x: x[None], c), m[None])
  return jax.vmap(one)(target_logp, corruption, modality)


# --- rows ------------------------------------------------------------------------------------
def validation_rows(config, num_rows: int) -> dict[str, np.ndarray]:
  """The first `num_rows` rows of the validation split, [num_rows, L] per batch field."""
  from tmdiff.data import pipeline as pipeline_lib
  if num_rows < 1:
    raise ValueError(f"num_rows must be >= 1, got {num_rows}")
  block = int(config.data.global_batch)
  it = iter(pipeline_lib.make_dataset(config, "validation", process_index=0, process_count=1))
  parts = [next(it) for _ in range(-(-num_rows // block))]
  return {f: np.concatenate([p[f] for p in parts])[:num_rows].astype(np.int32)
          for f in batch_lib.FIELDS}


def default_num_rows(config) -> int:
  return int(config.data.eval_batches) * int(config.data.global_batch)


# --- the loop --------------------------------------------------------------------------------
def physical_batch(trainer, batch_size: int) -> int:
  """Rows per compiled call: batch_size rounded up to a multiple of the batch shards."""
  if batch_size < 1:
    raise ValueError(f"eval batch size must be >= 1, got {batch_size}")
  shards = math.prod(trainer.mesh.shape[a] for a in ("data", "fsdp"))
  return -(-batch_size // shards) * shards


def _global_array(sharding, host: np.ndarray):
  """A global array from a host array every process holds in full."""
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def per_row_sums(trainer, params, rows: dict, *, batch_size: int, eval_step=None,
                 progress: bool = False) -> dict[str, np.ndarray]:
  """Per-row sums {nll, tokens, masked}, each float64 [num_rows, 3] (modality columns)."""
  n = len(rows["tokens"])
  physical = physical_batch(trainer, batch_size)
  if physical != batch_size:
    logging.info("eval: batch %d rounded up to %d rows (a multiple of the batch shards)",
                 batch_size, physical)
  eval_step = eval_step or trainer.compile_eval_step(physical)
  max_segments = int(trainer.config.data.max_segments)
  times = time_uniforms(derived.seed_for(trainer.config, "eval"), n, max_segments)
  out = {k: np.zeros((n, len(vocab_lib.MODALITIES)), np.float64) for k in SUM_KEYS}
  n_batches = -(-n // physical)
  for b in range(n_batches):
    start, stop = b * physical, min(n, (b + 1) * physical)
    host = {k: np.zeros((physical, v.shape[1]), np.int32) for k, v in rows.items()}
    for k, v in rows.items():
      host[k][:stop - start] = v[start:stop]
    row_ids = np.arange(start, start + physical, dtype=np.int32)
    host_times = np.zeros((physical, max_segments + 1), np.float32)
    host_times[:stop - start] = times[start:stop]
    batch = {k: _global_array(trainer.batch_sharding, v) for k, v in host.items()}
    ids = _global_array(trainer.row_id_sharding, row_ids)
    sums = jax.device_get(eval_step(params, batch, ids,
                                    _global_array(trainer.batch_sharding, host_times)))
    for k in SUM_KEYS:
      out[k][start:stop] = np.asarray(sums[k], np.float64)[:stop - start]
    if progress and (b + 1) % max(1, n_batches // 10) == 0:
      logging.info("eval ELBO: %d/%d batches", b + 1, n_batches)
  return out


def summarize_rows(sums: dict[str, np.ndarray]) -> dict[str, float]:
  """Per-row sums -> `objective.summarize` metrics, added in float64 in row order."""
  totals = {k: np.zeros(sums[k].shape[1], np.float64) for k in SUM_KEYS}
  for k in SUM_KEYS:
    for row in sums[k]:  # explicit row order: the result cannot depend on any batching
      totals[k] += row
  return {k: float(v) for k, v in obj_lib.summarize(
      {k: np.asarray(v, np.float64) for k, v in totals.items()}).items()}


def unigram_bits_per_token(rows: dict) -> dict[str, float]:
  """Per modality, the entropy in bits of the unigram distribution of the scored tokens in
  `rows` (loss-mask positions): the bits per token of a model that knows token frequencies
  alone, fitted to these very tokens. A model's ELBO below it has learnt context."""
  scored = rows["loss_mask"].astype(bool)
  out = {}
  for m, name in enumerate(vocab_lib.MODALITIES):
    ids = rows["tokens"][scored & (rows["modality"] == m)]
    if ids.size:
      p = np.unique(ids, return_counts=True)[1] / ids.size
      out[f"unigram_bits_per_token/{name}"] = float(-(p * np.log2(p)).sum())
  return out


def evaluate_rows(trainer, params, rows: dict, *, batch_size: int, eval_step=None,
                  progress: bool = False) -> dict[str, float]:
  """Loss, bits per token per modality and token fractions over `rows`."""
  return summarize_rows(per_row_sums(trainer, params, rows, batch_size=batch_size,
                                     eval_step=eval_step, progress=progress))
