"""Absorbing-state masked diffusion: corruption and the continuous-time ELBO, inside jit.

Negative ELBO per sequence:  E_t E_xt [ sum_{i masked} w_m(i)(t) * -log p(x0_i | xt) ],
w_m(t) = -alpha_m'(t) / (1 - alpha_m(t)) with one schedule per modality m, applied per token
inside one packed sequence. Each segment (document or pair) draws its own t, uniform on
[t_min, t_max]; the integral over [0, t_min) is left out (it vanishes as t_min -> 0). A pair's
conditioning decision (target-only masking, condition dropout) is drawn per segment too, so a
pair is treated the same whether it shares its row with others or fills a padded row; a
token's ELBO weight depends only on its segment's time and its modality.

Anti-masking: rows 2k and 2k+1 carry the same example (the train step duplicates each loaded
row), the same t and the same uniform draws; row 2k+1 masks exactly the complement of row 2k. The complement is
a forward-process draw at time 1 - t of the reversed schedule beta_m(s) = 1 - alpha_m(1 - s),
whose ELBO weight is -alpha_m'(t) / alpha_m(t); with one shared schedule (or any linear
schedules) both rows estimate the same ELBO, so every token is supervised once per pair.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tmdiff.data import vocab as vocab_lib
from tmdiff.diffusion import schedules as schedules_lib

TIME_SAMPLING = ("iid", "stratified")
NOISE_KEYS = ("step", "example")
LOSS_NORMS = ("tokens", "fixed")
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class Objective:
  schedules: tuple  # one Schedule per modality (text, image, audio)
  mask_id: int
  t_min: float = 1e-3
  time_sampling: str = "stratified"
  anti_masking: bool = False
  cond_target_only_prob: float = 0.0
  cond_drop_prob: float = 0.0
  noise_keys: str = "step"

  @classmethod
  def from_config(cls, diffusion_cfg, layout: vocab_lib.VocabLayout) -> "Objective":
    d = diffusion_cfg
    scheds = tuple(schedules_lib.from_config(d.schedule[m], d) for m in vocab_lib.MODALITIES)
    return cls(scheds, layout.mask, float(d.t_min), d.time_sampling, bool(d.anti_masking),
               float(d.cond_target_only_prob), float(d.cond_drop_prob), d.noise_keys)

  @property
  def t_max(self) -> float:
    return 1.0 - self.t_min if self.anti_masking else 1.0


class Corruption(NamedTuple):
  tokens: jax.Array      # [B, L] noisy input (masked positions hold <mask>)
  supervised: jax.Array  # [B, L] bool: masked target tokens that enter the loss
  weight: jax.Array      # [B, L] float32 ELBO weight of each supervised token
  elbo_mask: jax.Array   # [B, L] bool: tokens whose likelihood the estimate covers
  t: jax.Array           # [B, L] float32 time of each token's segment


def sample_times(rng, rows: int, slots: int, obj: Objective) -> jax.Array:
  """[rows, slots] times in [t_min, t_max]; 'stratified' spreads each slot over the batch."""
  if obj.time_sampling == "iid":
    u = jax.random.uniform(rng, (rows, slots))
  elif obj.time_sampling == "stratified":
    offset_rng, perm_rng = jax.random.split(rng)
    offsets = jax.random.uniform(offset_rng, (1, slots))
    strata = jnp.arange(rows, dtype=jnp.float32)[:, None] / rows
    u = (offsets + strata) % 1.0
    u = jax.random.permutation(perm_rng, u, axis=0, independent=True)
  else:
    raise ValueError(f"unknown time_sampling {obj.time_sampling!r}; choose from {TIME_SAMPLING}")
  return obj.t_min + (obj.t_max - obj.t_min) * u


GOLDEN_FRACTION = round((math.sqrt(5.0) - 1.0) / 2.0 * 2**32)   # 1/phi in 32-bit fixed point


def stream_time_uniforms(key, example_ids, slots: int) -> jax.Array:
  """[n, slots] in [0, 1): the golden-ratio sequence over the stream index g,
  u[g, s] = frac(shift_s + (g + 1) / phi), with a random shift per slot from `key`. Any run of
  n consecutive examples spreads evenly over [0, 1) in every slot (its gaps take at most three
  lengths, by the three-gap theorem), whatever the batch the run is cut into. Slots of one row
  are offset by fixed shifts rather than independent. 32-bit fixed point: exact for g < 2^32,
  where the ids wrap."""
  shift = jax.random.bits(key, (slots,), jnp.uint32)
  g = jnp.asarray(example_ids).astype(jnp.uint32)[:, None] + jnp.uint32(1)
  fixed = shift[None] + g * jnp.uint32(GOLDEN_FRACTION)   # wraps mod 2^32: the fraction
  return (fixed >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


def corrupt_examples(batch, example_ids, key, obj: Objective, max_segments: int,
                     time_uniforms=None) -> "Corruption":
  """`corrupt` applied to each example alone (a row, or with anti-masking its pair of rows):
  its draws from fold_in(key, example_ids[i]), its times from time_uniforms[i] ([slots]) when
  given. An example's masks then depend on its id, not on the batch or device it lands in."""
  per = 2 if obj.anti_masking else 1
  fields = {k: batch[k].reshape(-1, per, batch[k].shape[-1])
            for k in ("tokens", "segment_ids", "modality", "loss_mask", "cond_mask")}

  def one(example, example_id, u):
    return corrupt(example, jax.random.fold_in(key, example_id), obj, max_segments,
                   time_uniforms=None if u is None else u[None])
  if time_uniforms is None:
    out = jax.vmap(lambda e, i: one(e, i, None))(fields, example_ids)
  else:
    out = jax.vmap(one)(fields, example_ids, time_uniforms)
  return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), out)


def step_corruption(batch, step, key, obj: Objective, max_segments: int) -> "Corruption":
  """The training step's masks. noise_keys 'step': one draw for the batch from
  fold_in(key, step) (stratified times spread over the batch). 'example': per example, keyed
  by its index in the data stream (step * examples per step + row), stratified times from
  `stream_time_uniforms`: the same example gets the same masks and time whatever the
  physical batch, so runs that differ only in batch size share their randomness."""
  if obj.noise_keys == "step":
    return corrupt(batch, jax.random.fold_in(key, step), obj, max_segments)
  n = batch["tokens"].shape[0] // (2 if obj.anti_masking else 1)
  ids = step.astype(jnp.uint32) * jnp.uint32(n) + jnp.arange(n, dtype=jnp.uint32)
  time_key, draw_key = jax.random.split(key)
  u = (stream_time_uniforms(time_key, ids, max_segments + 1)
       if obj.time_sampling == "stratified" else None)
  return corrupt_examples(batch, ids, draw_key, obj, max_segments, time_uniforms=u)


def _per_modality(values_by_modality, modality):
  out = values_by_modality[0]
  for m in range(1, len(values_by_modality)):
    out = jnp.where(modality == m, values_by_modality[m], out)
  return out


def corrupt(batch, rng, obj: Objective, max_segments: int, time_uniforms=None) -> Corruption:
  """Masks the batch for one training step. All randomness comes from `rng`, except the
  times when `time_uniforms` ([groups, max_segments + 1] in [0, 1)) gives them (eval)."""
  tokens, segment_ids, modality = batch["tokens"], batch["segment_ids"], batch["modality"]
  loss_mask = batch["loss_mask"].astype(bool)
  cond = batch["cond_mask"].astype(bool)
  b, length = tokens.shape
  groups = b // 2 if obj.anti_masking else b
  t_rng, r_rng, flag_rng = jax.random.split(rng, 3)

  def per_row(x):  # one draw per example (pair) -> one per row
    return jnp.repeat(x, 2, axis=0) if obj.anti_masking else x

  if time_uniforms is None:
    t_groups = sample_times(t_rng, groups, max_segments + 1, obj)
  else:
    t_groups = obj.t_min + (obj.t_max - obj.t_min) * jnp.asarray(time_uniforms, jnp.float32)
  t_slots = per_row(t_groups)
  t = jnp.take_along_axis(t_slots, segment_ids, axis=1)
  r = per_row(jax.random.uniform(r_rng, (groups, length)))
  # One conditioning decision per segment (a pair), like its time.
  flag_slots = per_row(jax.random.uniform(flag_rng, (groups, max_segments + 1)))
  flag = jnp.take_along_axis(flag_slots, segment_ids, axis=1)
  drop_cond = flag < obj.cond_drop_prob
  target_only = (flag >= obj.cond_drop_prob) & (
      flag < obj.cond_drop_prob + obj.cond_target_only_prob)

  alpha = _per_modality([s.alpha(t) for s in obj.schedules], modality)
  dalpha = _per_modality([s.dalpha(t) for s in obj.schedules], modality)
  masked = r < 1.0 - alpha
  weight = _per_modality([s.weight(t) for s in obj.schedules], modality)
  if obj.anti_masking:
    complement = (jnp.arange(b) % 2 == 1)[:, None]
    masked = jnp.where(complement, ~masked, masked)
    weight = jnp.where(complement, -dalpha / alpha, weight)

  # t is uniform on [t_min, t_max]: the interval's length turns the mean into the integral.
  weight = weight * (obj.t_max - obj.t_min)
  frozen_cond = cond & (drop_cond | target_only)
  elbo_mask = loss_mask & ~frozen_cond
  supervised = masked & elbo_mask
  noisy = jnp.where(supervised | (cond & drop_cond), obj.mask_id, tokens)
  weight = jnp.where(supervised, weight, 0.0).astype(jnp.float32)
  return Corruption(noisy, supervised, weight, elbo_mask, t.astype(jnp.float32))


def modality_vocab_ranges(layout: vocab_lib.VocabLayout) -> np.ndarray:
  """[3, 2] int32: the [start, stop) each modality's predictions are restricted to."""
  return np.array([layout.allowed_range(m) for m in range(len(vocab_lib.MODALITIES))], np.int32)


def modality_logit_bias(layout: vocab_lib.VocabLayout) -> np.ndarray:
  """[3, V_padded] float32: 0 where a prediction of that modality may land, -inf elsewhere."""
  allowed = np.stack([layout.allowed_logits_mask(m) for m in range(len(vocab_lib.MODALITIES))])
  return np.where(allowed, 0.0, -np.inf).astype(np.float32)


def target_log_probs(logits, targets, modality, logit_bias):
  """log p(target) under the modality-restricted softmax. logits [..., V] float32."""
  logits = logits + jnp.asarray(logit_bias)[modality]
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return target_logit - log_z


def elbo_sums(target_logp, corruption: Corruption, modality) -> dict:
  """Per-modality sums: weighted NLL of supervised tokens, and tokens covered."""
  nll = jnp.where(corruption.supervised, -target_logp * corruption.weight, 0.0)
  one_hot = jax.nn.one_hot(modality, len(vocab_lib.MODALITIES), dtype=jnp.float32)
  return {
      "nll": jnp.einsum("bl,blm->m", nll, one_hot),
      "tokens": jnp.einsum("bl,blm->m", corruption.elbo_mask.astype(jnp.float32), one_hot),
      "masked": jnp.einsum("bl,blm->m", corruption.supervised.astype(jnp.float32), one_hot),
  }


def loss_normaliser(corruption: Corruption, loss_norm: str) -> jax.Array:
  """What the train loss divides the batch's weighted NLL by (diffusion.loss_norm): the ELBO
  tokens the batch covers ('tokens'), or every position of the batch ('fixed', a constant: a
  token's weight then does not depend on the other rows of its batch)."""
  if loss_norm == "tokens":
    return jnp.maximum(corruption.elbo_mask.sum().astype(jnp.float32), 1.0)
  if loss_norm == "fixed":
    return jnp.float32(corruption.elbo_mask.size)
  raise ValueError(f"unknown loss_norm {loss_norm!r}; choose from {LOSS_NORMS}")


def summarize(sums: dict) -> dict:
  """Loss (negative ELBO in nats per covered token) and bits per token per modality."""
  out = {"loss": sums["nll"].sum() / jnp.maximum(sums["tokens"].sum(), 1.0)}
  for m, name in enumerate(vocab_lib.MODALITIES):
    per_token = sums["nll"][m] / jnp.maximum(sums["tokens"][m], 1.0)
    out[f"bits_per_token/{name}"] = per_token / LN2
    out[f"token_fraction/{name}"] = sums["tokens"][m] / jnp.maximum(sums["tokens"].sum(), 1.0)
  out["bits_per_token/all"] = out["loss"] / LN2
  return out
