"""The masked-diffusion objective against exact enumeration and closed forms."""
import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmdiff.data import vocab as vocab_lib
from tmdiff.diffusion import objective as obj_lib
from tmdiff.diffusion import schedules as sched_lib

LAYOUT = vocab_lib.VocabLayout(text_size=3, image_size=3, audio_size=3)


@pytest.mark.parametrize("name", sched_lib.SCHEDULES)
def test_schedule_derivative_and_weight(name):
  s = sched_lib.make_schedule(name, poly_exponent=3.0)
  t = jnp.linspace(0.02, 0.98, 25)
  dalpha = jax.vmap(jax.grad(lambda x: s.alpha(x)))(t)
  np.testing.assert_allclose(s.dalpha(t), dalpha, rtol=1e-4, atol=1e-6)
  t_mid = t[t > 0.1]  # away from 1 - alpha ~ 0, where the float32 reference cancels
  np.testing.assert_allclose(s.weight(t_mid), -s.dalpha(t_mid) / (1 - s.alpha(t_mid)), rtol=1e-3)
  assert abs(float(s.alpha(jnp.float32(0.0))) - 1.0) < 1e-3
  assert float(s.alpha(jnp.float32(1.0))) < 1e-3
  assert np.all(np.diff(np.asarray(s.alpha(t))) < 0)


def test_schedule_names_and_closed_forms():
  assert all(sched_lib.make_schedule(n).name == n for n in sched_lib.SCHEDULES)
  with pytest.raises(ValueError, match="choose from"):
    sched_lib.make_schedule("cosinus")
  t = np.array([0.1, 0.5, 0.9], np.float32)
  # Cosine masks faster than linear early and flattens late: 1 - alpha = sin(pi t / 2).
  masked = 1 - np.asarray(sched_lib.make_schedule("cosine").alpha(t))
  np.testing.assert_allclose(masked, [0.156434, 0.707107, 0.987688], atol=1e-6)
  poly = sched_lib.make_schedule("polynomial", poly_exponent=3.0)
  np.testing.assert_allclose(poly.alpha(t), 1 - t ** 3, atol=1e-7)


def _denoiser_log_probs(noisy, targets, modality, bias):
  """A fixed denoiser: logits depend on the position and on every noisy token."""
  vocab = bias.shape[1]
  length = noisy.shape[-1]
  table = jax.random.normal(jax.random.key(7), (length, length, vocab, vocab))
  one_hot = jax.nn.one_hot(noisy, vocab)
  logits = jnp.einsum("...jv,ijvw->...iw", one_hot, table)
  return obj_lib.target_log_probs(logits, targets, modality, bias)


def _exact_nelbo(tokens, modality, schedules, t_min, t_max, reversed_schedules=False):
  """Sum over all 2^L mask patterns of the time integral, by Gauss-Legendre quadrature."""
  bias = obj_lib.modality_logit_bias(LAYOUT)
  nodes, weights = np.polynomial.legendre.leggauss(400)
  t = 0.5 * (t_max - t_min) * nodes + 0.5 * (t_max + t_min)
  w_t = 0.5 * (t_max - t_min) * weights
  length = len(tokens)
  alpha, wgt = [], []
  for i in range(length):
    s = schedules[modality[i]]
    if reversed_schedules:  # beta(u) = 1 - alpha(1 - u)
      a = 1.0 - np.asarray(s.alpha(1.0 - t))
      w = -np.asarray(s.dalpha(1.0 - t)) / (1.0 - a)
    else:
      a = np.asarray(s.alpha(t))
      w = np.asarray(s.weight(t))
    alpha.append(a)
    wgt.append(w)
  total = 0.0
  for pattern in itertools.product([0, 1], repeat=length):
    mask = np.array(pattern, bool)
    if not mask.any():
      continue
    noisy = np.where(mask, LAYOUT.mask, tokens)
    logp = np.asarray(_denoiser_log_probs(jnp.asarray(noisy), jnp.asarray(tokens),
                                          jnp.asarray(modality), bias))
    prob = np.ones_like(t)
    for i in range(length):
      prob = prob * ((1 - alpha[i]) if mask[i] else alpha[i])
    for i in np.flatnonzero(mask):
      total += np.sum(w_t * prob * wgt[i]) * -logp[i]
  return total


def _batch(tokens, modality, rows):
  length = len(tokens)
  tile = lambda x: jnp.tile(jnp.asarray(x, jnp.int32)[None], (rows, 1))
  return {"tokens": tile(tokens), "segment_ids": tile(np.ones(length)),
          "positions": tile(np.arange(length)), "modality": tile(modality),
          "loss_mask": tile(np.ones(length)), "cond_mask": tile(np.zeros(length))}


def _mc_nelbo_per_row(obj, tokens, modality, rows, draws):
  bias = obj_lib.modality_logit_bias(LAYOUT)
  batch = _batch(tokens, modality, rows)

  def one(key):
    c = obj_lib.corrupt(batch, key, obj, max_segments=1)
    logp = _denoiser_log_probs(c.tokens, batch["tokens"], batch["modality"], bias)
    return jnp.sum(jnp.where(c.supervised, -logp * c.weight, 0.0), axis=1)
  return np.asarray(jax.lax.map(one, jax.random.split(jax.random.key(0), draws)))  # [draws, rows]


TOKENS = np.array([LAYOUT.text_range[0], LAYOUT.text_range[0] + 2, LAYOUT.image_range[0] + 1,
                   LAYOUT.image_range[0]])
MODALITY = np.array([0, 0, 1, 1])


@pytest.mark.parametrize("sampling", ["iid", "stratified"])
@pytest.mark.parametrize("image_schedule", ["linear", "cosine"])
def test_estimator_matches_exact_elbo(sampling, image_schedule):
  schedules = (sched_lib.Linear(), sched_lib.make_schedule(image_schedule), sched_lib.Linear())
  obj = obj_lib.Objective(schedules, LAYOUT.mask, t_min=0.01, time_sampling=sampling)
  exact = _exact_nelbo(TOKENS, MODALITY, schedules, obj.t_min, obj.t_max)
  est = _mc_nelbo_per_row(obj, TOKENS, MODALITY, rows=8, draws=3000).reshape(-1)
  stderr = est.std() / math.sqrt(est.size)
  assert abs(est.mean() - exact) < 4 * stderr + 1e-3, (est.mean(), exact, stderr)


@pytest.mark.parametrize("image_schedule", ["linear", "cosine"])
def test_anti_masking_pairs_are_complements_and_unbiased(image_schedule):
  schedules = (sched_lib.Linear(), sched_lib.make_schedule(image_schedule), sched_lib.Linear())
  obj = obj_lib.Objective(schedules, LAYOUT.mask, t_min=0.01, anti_masking=True)
  batch = _batch(TOKENS, MODALITY, rows=8)
  c = obj_lib.corrupt(batch, jax.random.key(3), obj, max_segments=1)
  sup = np.asarray(c.supervised)
  np.testing.assert_array_equal(sup[0::2], ~sup[1::2])  # every token supervised once per pair
  np.testing.assert_array_equal(np.asarray(c.t)[0::2], np.asarray(c.t)[1::2])

  est = _mc_nelbo_per_row(obj, TOKENS, MODALITY, rows=8, draws=3000)
  first, second = est[:, 0::2].reshape(-1), est[:, 1::2].reshape(-1)
  exact_first = _exact_nelbo(TOKENS, MODALITY, schedules, obj.t_min, obj.t_max)
  exact_second = _exact_nelbo(TOKENS, MODALITY, schedules, obj.t_min, obj.t_max,
                              reversed_schedules=True)
  for est_rows, exact in ((first, exact_first), (second, exact_second)):
    stderr = est_rows.std() / math.sqrt(est_rows.size)
    assert abs(est_rows.mean() - exact) < 4 * stderr + 1e-3, (est_rows.mean(), exact, stderr)
  if image_schedule == "linear":  # one linear family: both rows estimate the same bound
    assert abs(exact_first - exact_second) < 1e-6
  # Anti-masking lowers the variance of the pair mean.
  iid = _mc_nelbo_per_row(obj_lib.Objective(schedules, LAYOUT.mask, t_min=0.01), TOKENS, MODALITY,
                          rows=8, draws=3000)
  assert (first + second).var() / 4 < iid[:, 0::2].reshape(-1).var() / 2 * 1.05


def test_linear_schedule_closed_form():
  """Linear schedule, t_min -> 0: a pattern with k of L masked has weight (k-1)!(L-k)!/L!."""
  schedules = (sched_lib.Linear(),) * 3
  tokens, modality = TOKENS[:3], np.zeros(3, int)
  tokens = np.array([LAYOUT.text_range[0] + i for i in (0, 1, 2)])
  bias = obj_lib.modality_logit_bias(LAYOUT)
  closed = 0.0
  for pattern in itertools.product([0, 1], repeat=3):
    mask = np.array(pattern, bool)
    k = mask.sum()
    if not k:
      continue
    logp = np.asarray(_denoiser_log_probs(jnp.asarray(np.where(mask, LAYOUT.mask, tokens)),
                                          jnp.asarray(tokens), jnp.asarray(modality), bias))
    closed += math.factorial(k - 1) * math.factorial(3 - k) / math.factorial(3) * -logp[mask].sum()
  quad = _exact_nelbo(tokens, modality, schedules, 1e-7, 1.0)
  assert abs(quad - closed) < 1e-3 * closed


def test_stratified_times_cover_every_stratum():
  obj = obj_lib.Objective((sched_lib.Linear(),) * 3, 0, t_min=0.0 + 1e-9)
  t = np.asarray(obj_lib.sample_times(jax.random.key(1), 64, 3, obj))
  for slot in range(3):
    counts = np.histogram(t[:, slot], bins=64, range=(0, 1))[0]
    assert counts.max() == 1, counts  # exactly one time per 1/64 stratum


def test_stream_times_are_exact_fixed_point_and_even_in_every_window():
  slots, shift_key = 9, jax.random.key(5)
  ids = np.array([0, 1, 2, 77, 2**20 + 3, 2**31 + 11, 2**32 - 1], np.uint32)
  u = np.asarray(obj_lib.stream_time_uniforms(shift_key, ids, slots))
  # Reference: frac(shift + (g + 1) / phi) in exact rationals, truncated to 24 bits.
  shift = [int(x) for x in np.asarray(jax.random.bits(shift_key, (slots,), jnp.uint32))]
  inv_phi = 2 / (1 + math.sqrt(5))
  for i, g in enumerate(ids.tolist()):
    for s in range(slots):
      a = round(inv_phi * 2**32)
      assert u[i, s] == ((shift[s] + (g + 1) * a) % 2**32 >> 8) / 2**24
      if g < 2**20:   # and close to the float64 value where that is exact enough
        assert abs(u[i, s] - (shift[s] / 2**32 + (g + 1) * inv_phi) % 1.0) < 1e-6
  # Any window of n consecutive ids spreads over [0, 1): no 1/n-bin holds more than 3.
  for n, start in ((16, 0), (64, 1000), (128, 2**30)):
    w = np.asarray(obj_lib.stream_time_uniforms(shift_key, np.arange(start, start + n), slots))
    assert 0.0 <= w.min() and w.max() < 1.0
    for s in range(slots):
      assert np.histogram(w[:, s], bins=n, range=(0, 1))[0].max() <= 3, (n, s)


@pytest.mark.parametrize("anti_masking", [False, True])
def test_example_keyed_masks_do_not_depend_on_the_batch(anti_masking):
  obj = obj_lib.Objective((sched_lib.Linear(),) * 3, LAYOUT.mask, t_min=0.01,
                          anti_masking=anti_masking, noise_keys="example")
  per = 2 if anti_masking else 1
  rng = np.random.default_rng(0)
  tokens = rng.integers(*LAYOUT.text_range, size=(8, 12))
  batch = _batch(tokens[0], np.zeros(12), 8 * per)
  batch["tokens"] = jnp.asarray(np.repeat(tokens, per, axis=0), jnp.int32)
  key = jax.random.key(7)
  corrupt = jax.jit(obj_lib.step_corruption, static_argnums=(3, 4))
  whole = corrupt(batch, jnp.int32(0), key, obj, 1)
  halves = [corrupt(jax.tree.map(lambda x: x[h * 4 * per:(h + 1) * 4 * per], batch),
                    jnp.int32(h), key, obj, 1) for h in range(2)]
  for field in whole._fields:
    np.testing.assert_array_equal(np.asarray(getattr(whole, field)), np.concatenate(
        [np.asarray(getattr(h, field)) for h in halves]), err_msg=field)
  if anti_masking:
    np.testing.assert_array_equal(np.asarray(whole.supervised)[0::2],
                                  ~np.asarray(whole.supervised)[1::2])
  step_keyed = corrupt(batch, jnp.int32(0), key, dataclasses.replace(obj, noise_keys="step"), 1)
  assert not np.array_equal(np.asarray(step_keyed.t), np.asarray(whole.t))


def test_fixed_loss_norm_makes_the_batch_loss_the_mean_of_its_examples_losses():
  """With per-example masks, a batch's train loss under loss_norm 'fixed' is the mean of its
  rows' losses taken one row per step, so is its gradient (the normaliser is a constant): a
  token weighs the same at any batch size. 'tokens' breaks this when rows differ in length."""
  obj = obj_lib.Objective((sched_lib.Linear(),) * 3, LAYOUT.mask, t_min=0.01,
                          noise_keys="example")
  bias = obj_lib.modality_logit_bias(LAYOUT)
  rng = np.random.default_rng(3)
  rows, length = 6, 10
  batch = _batch(np.zeros(length), np.zeros(length), rows)
  batch["tokens"] = jnp.asarray(rng.integers(*LAYOUT.text_range, size=(rows, length)), jnp.int32)
  lengths = np.array([10, 4, 7, 10, 2, 6])  # padding after each row's tokens
  batch["loss_mask"] = jnp.asarray(np.arange(length)[None] < lengths[:, None], jnp.int32)
  key = jax.random.key(5)

  def loss(b, step, norm):
    c = obj_lib.step_corruption(b, jnp.int32(step), key, obj, 1)
    logp = _denoiser_log_probs(c.tokens, b["tokens"], b["modality"], bias)
    nll = jnp.sum(jnp.where(c.supervised, -logp * c.weight, 0.0))
    return float(nll / obj_lib.loss_normaliser(c, norm))
  for norm, equal in (("fixed", True), ("tokens", False)):
    whole = loss(batch, 0, norm)
    alone = np.mean([loss(jax.tree.map(lambda x: x[i:i + 1], batch), i, norm)
                     for i in range(rows)])
    assert np.isclose(whole, alone, rtol=1e-5) == equal, (norm, whole, alone)
  c = obj_lib.step_corruption(batch, jnp.int32(0), key, obj, 1)
  assert float(obj_lib.loss_normaliser(c, "tokens")) == lengths.sum()
  assert float(obj_lib.loss_normaliser(c, "fixed")) == rows * length
  with pytest.raises(ValueError, match="unknown loss_norm"):
    obj_lib.loss_normaliser(c, "rows")


@pytest.mark.parametrize("sampling", ["iid", "stratified"])
def test_example_keyed_estimator_matches_exact_elbo(sampling):
  schedules = (sched_lib.Linear(), sched_lib.make_schedule("cosine"), sched_lib.Linear())
  obj = obj_lib.Objective(schedules, LAYOUT.mask, t_min=0.01, time_sampling=sampling,
                          noise_keys="example")
  bias = obj_lib.modality_logit_bias(LAYOUT)
  batch = _batch(TOKENS, MODALITY, 8)

  def one(step):
    c = obj_lib.step_corruption(batch, step, jax.random.key(2), obj, max_segments=1)
    logp = _denoiser_log_probs(c.tokens, batch["tokens"], batch["modality"], bias)
    return jnp.sum(jnp.where(c.supervised, -logp * c.weight, 0.0), axis=1)
  est = np.asarray(jax.jit(lambda steps: jax.lax.map(one, steps))(jnp.arange(2000))).reshape(-1)
  exact = _exact_nelbo(TOKENS, MODALITY, schedules, obj.t_min, obj.t_max)
  stderr = est.std() / math.sqrt(est.size)
  assert abs(est.mean() - exact) < 4 * stderr + 1e-3, (est.mean(), exact, stderr)


def test_conditional_masking_and_condition_dropout():
  rows, length = 4000, 6
  tokens = np.array([LAYOUT.bos, LAYOUT.text_range[0], LAYOUT.boi] + [LAYOUT.image_range[0]] * 3)
  batch = _batch(tokens, [0, 0, 0, 1, 1, 1], rows)
  batch["cond_mask"] = jnp.tile(jnp.array([1, 1, 1, 0, 0, 0], jnp.int32)[None], (rows, 1))
  obj = obj_lib.Objective((sched_lib.Linear(),) * 3, LAYOUT.mask, cond_target_only_prob=0.5,
                          cond_drop_prob=0.1)
  c = obj_lib.corrupt(batch, jax.random.key(0), obj, max_segments=1)
  cond = np.asarray(batch["cond_mask"]).astype(bool)
  noisy, sup, cover = np.asarray(c.tokens), np.asarray(c.supervised), np.asarray(c.elbo_mask)
  dropped = np.all(noisy[:, :3] == LAYOUT.mask, axis=1) & ~np.any(sup[:, :3], axis=1)
  frozen = ~cover[:, 0]
  assert abs(frozen.mean() - 0.6) < 0.03       # target-only (0.5) + dropped (0.1)
  assert abs(dropped.mean() - 0.1) < 0.02
  assert not np.any(sup & ~cover)              # nothing outside the covered tokens is scored
  kept = frozen & ~dropped                      # target-only rows keep the condition clean
  np.testing.assert_array_equal(noisy[kept][:, :3], np.tile(tokens[:3], (kept.sum(), 1)))
  assert np.any(sup[~frozen][:, :3])           # joint rows also learn the condition
  assert not np.any(sup[:, :][cond & frozen[:, None]])


# ----------------------------------------------------------------------------------------
# A packed row: a text piece (segment 1) and two pairs (2: caption + image, 3: transcript +
# audio), positions restarting per segment.
TXT, IMG, AUD = LAYOUT.text_range[0], LAYOUT.image_range[0], LAYOUT.audio_range[0]
PACKED = {"tokens": np.array([TXT, TXT + 2, TXT + 1, IMG + 1, IMG, TXT, AUD + 2, AUD + 1]),
          "segment_ids": np.array([1, 1, 2, 2, 2, 3, 3, 3]),
          "positions": np.array([0, 1, 0, 1, 2, 0, 1, 2]),
          "modality": np.array([0, 0, 0, 1, 1, 0, 2, 2]),
          "cond_mask": np.array([0, 0, 1, 0, 0, 1, 0, 0])}


_PACKED_TABLE = np.random.default_rng(11).standard_normal(
    (len(PACKED["tokens"]),) * 2 + (obj_lib.modality_logit_bias(LAYOUT).shape[1],) * 2
).astype(np.float32)


def _packed_log_probs(noisy, row, local: bool, xp=jnp):
  """A fixed denoiser over a packed row (xp: jnp, or np for the enumeration). local: token i
  sees the tokens of its own segment, by their positions inside it (what segment attention
  and restarting positions give the model); otherwise every token of the row, by column."""
  bias = obj_lib.modality_logit_bias(LAYOUT)
  index = np.asarray(row["positions"]) if local else np.arange(len(row["tokens"]))
  table = _PACKED_TABLE[index[:, None], index[None, :]]
  if local:
    same = np.asarray(row["segment_ids"])[:, None] == np.asarray(row["segment_ids"])[None, :]
    table = table * same[:, :, None, None]
  one_hot = (xp.asarray(noisy)[..., None] == np.arange(bias.shape[1])).astype(np.float32)
  logits = xp.einsum("...jv,ijvw->...iw", one_hot, xp.asarray(table), optimize=True)
  logits = logits + bias[np.asarray(row["modality"])]
  top = logits.max(axis=-1, keepdims=True)
  log_z = xp.log(xp.exp(logits - top).sum(axis=-1)) + top[..., 0]
  target = xp.take_along_axis(logits, xp.broadcast_to(
      xp.asarray(row["tokens"]), xp.shape(noisy))[..., None], axis=-1)[..., 0]
  return target - log_z


def _exact_per_segment(row, schedules, t_min, t_max, local, target_only=0.0, drop=0.0):
  """Expected weighted NLL of each segment of `row`, exactly: a sum over every conditioning
  decision of every pair (joint / target-only / condition dropped) and every mask of the row,
  each segment's time integrated by Gauss-Legendre quadrature on its own."""
  tokens, seg = np.asarray(row["tokens"]), np.asarray(row["segment_ids"])
  modality, cond = np.asarray(row["modality"]), np.asarray(row["cond_mask"]).astype(bool)
  nodes, weights = np.polynomial.legendre.leggauss(300)
  t = 0.5 * (t_max - t_min) * nodes + 0.5 * (t_max + t_min)
  w_t = 0.5 * (t_max - t_min) * weights
  alpha = np.stack([np.asarray(schedules[m].alpha(t)) for m in modality])    # [L, T]
  wgt = np.stack([np.asarray(schedules[m].weight(t)) for m in modality])
  n_seg, length = int(seg.max()), len(tokens)
  pairs = [s for s in range(1, n_seg + 1) if cond[seg == s].any()]
  choices = {"joint": 1.0 - target_only - drop, "target_only": target_only, "drop": drop}
  out = np.zeros(n_seg)
  for decision in itertools.product(choices, repeat=len(pairs)):
    p_decision = np.prod([choices[d] for d in decision])
    if p_decision == 0:
      continue
    frozen, dropped = np.zeros(length, bool), np.zeros(length, bool)
    for s, d in zip(pairs, decision):
      frozen |= (seg == s) & cond & (d != "joint")
      dropped |= (seg == s) & cond & (d == "drop")
    free = np.flatnonzero(~frozen)
    masks = np.zeros((2 ** len(free), length), bool)
    masks[:, free] = np.array(list(itertools.product([0, 1], repeat=len(free))), bool)
    noisy = np.where(masks | dropped, LAYOUT.mask, tokens)
    logp = _packed_log_probs(noisy, row, local, xp=np).astype(np.float64)   # [P, L]
    prob = np.ones((len(masks), n_seg, len(t)))   # P(segment's pattern | its time)
    for j in free:
      prob[:, seg[j] - 1] *= np.where(masks[:, j, None], 1 - alpha[j], alpha[j])
    mass = prob @ w_t / (t_max - t_min)           # [P, S]: t uniform on [t_min, t_max]
    for i in free:
      s = seg[i] - 1
      others = np.prod(np.delete(mass, s, axis=1), axis=1)
      term = (prob[:, s] * wgt[i]) @ w_t
      out[s] += p_decision * np.sum(masks[:, i] * term * others * -logp[:, i])
  return out


def _segment(row, s):
  """Segment s of a packed row alone, as a one-segment (padded-layout) row."""
  sel = np.asarray(row["segment_ids"]) == s
  out = {k: np.asarray(v)[sel] for k, v in row.items()}
  out["segment_ids"] = np.ones(sel.sum(), int)
  return out


@pytest.mark.parametrize("sampling,local,target_only,drop",
                         [("stratified", True, 0.3, 0.1), ("iid", False, 0.0, 0.0)])
def test_packed_row_estimator_matches_exact_elbo_per_segment(sampling, local, target_only, drop):
  """Two pairs and a text piece in one row, each segment with its own time and conditioning
  decision: each segment's mean estimate is its exact expected NLL, enumerated over every
  decision and mask of the row. With a segment-local denoiser, that is the exact ELBO of the
  segment alone in its own row (the padded layout)."""
  schedules = (sched_lib.Linear(), sched_lib.make_schedule("cosine"), sched_lib.Linear())
  obj = obj_lib.Objective(schedules, LAYOUT.mask, t_min=0.01, time_sampling=sampling,
                          cond_target_only_prob=target_only, cond_drop_prob=drop)
  rows, draws = 8, 3000
  batch = {k: jnp.tile(jnp.asarray(v, jnp.int32)[None], (rows, 1)) for k, v in PACKED.items()}
  batch["loss_mask"] = jnp.ones_like(batch["tokens"])
  seg = PACKED["segment_ids"]

  def one(key):
    c = obj_lib.corrupt(batch, key, obj, max_segments=3)
    logp = _packed_log_probs(c.tokens, PACKED, local)
    nll = jnp.where(c.supervised, -logp * c.weight, 0.0)
    t_spread = jnp.ptp(c.t[:, 2:5], axis=1) + jnp.ptp(c.t[:, 5:], axis=1)  # one t a segment
    return jnp.stack([nll[:, seg == s].sum(axis=1) for s in (1, 2, 3)], axis=1), t_spread, c.t
  est, spread, t = jax.jit(lambda k: jax.lax.map(one, k))(jax.random.split(jax.random.key(4),
                                                                          draws))
  assert float(jnp.max(spread)) == 0.0
  assert np.mean(np.asarray(t)[..., 0] != np.asarray(t)[..., 2]) > 0.99   # times differ
  est = np.asarray(est).reshape(-1, 3)
  exact = _exact_per_segment(PACKED, schedules, obj.t_min, obj.t_max, local, target_only, drop)
  for s in range(3):
    stderr = est[:, s].std() / math.sqrt(len(est))
    assert abs(est[:, s].mean() - exact[s]) < 4 * stderr + 1e-3, (s, est[:, s].mean(), exact)
  if local:   # the same as each segment alone in a padded row
    alone = [_exact_per_segment(_segment(PACKED, s), schedules, obj.t_min, obj.t_max, True,
                                target_only, drop)[0] for s in (1, 2, 3)]
    np.testing.assert_allclose(exact, alone, rtol=1e-6)


def test_packed_conditioning_and_anti_masking_are_per_pair():
  """Each pair draws its own conditioning decision (constant over its condition tokens,
  independent of the other pair's); anti-masking complements each pair's mask, with the same
  time and decision in both rows."""
  rows = 4000
  obj = obj_lib.Objective((sched_lib.Linear(),) * 3, LAYOUT.mask, anti_masking=True,
                          t_min=0.01, cond_target_only_prob=0.3, cond_drop_prob=0.2)
  batch = {k: jnp.tile(jnp.asarray(v, jnp.int32)[None], (rows, 1)) for k, v in PACKED.items()}
  batch["loss_mask"] = jnp.ones_like(batch["tokens"])
  c = obj_lib.corrupt(batch, jax.random.key(0), obj, max_segments=3)
  noisy, sup, cover, t = (np.asarray(x) for x in (c.tokens, c.supervised, c.elbo_mask, c.t))
  dropped = noisy[0::2][:, [2, 5]] == LAYOUT.mask            # condition token of each pair
  dropped &= ~cover[0::2][:, [2, 5]]
  frozen = ~cover[0::2][:, [2, 5]]
  for stat, p in ((dropped, 0.2), (frozen, 0.5)):
    assert np.all(np.abs(stat.mean(axis=0) - p) < 0.03), stat.mean(axis=0)
    # independent between the two pairs of a row
    assert abs(np.mean(stat[:, 0] & stat[:, 1]) - p * p) < 0.03
    assert abs(np.mean(stat[:, 0] != stat[:, 1]) - 2 * p * (1 - p)) < 0.03
  np.testing.assert_array_equal(cover[0::2], cover[1::2])    # same decision in both rows
  np.testing.assert_array_equal(t[0::2], t[1::2])
  np.testing.assert_array_equal(sup[0::2] | sup[1::2], cover[0::2])   # complements, per pair
  assert not np.any(sup[0::2] & sup[1::2])
  assert np.all(cover[:, [0, 1, 3, 4, 6, 7]])                # text and targets always covered
