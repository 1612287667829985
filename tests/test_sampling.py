"""Samplers against hand-built denoisers whose exact distributions are known.

Tolerance: for N draws from the predicted distribution, Pearson's statistic sum (O - E)^2 / E
is chi-square with (cells - constraints) degrees of freedom. Each check fails when it exceeds
the 1 - 1e-4 quantile, so a correct sampler fails a given seed with probability 1e-4, while
the power checks below show the same bound rejects samplers that are off by a few percent.
"""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from tmdiff.configs.base import get_base_config
from tmdiff.data import vocab as vocab_lib
from tmdiff.diffusion import objective as obj_lib
from tmdiff.diffusion import sampling
from tmdiff.diffusion import schedules as schedules_lib

LAYOUT = vocab_lib.VocabLayout(text_size=6, image_size=4, audio_size=4)
MASK = LAYOUT.mask
TEXT0 = LAYOUT.text_range[0]
V = LAYOUT.size  # the hand-built denoisers emit the unpadded vocabulary (fewer flops)
BIAS = sampling.logit_bias(LAYOUT)[:, :V]
N = 10_000
FAR = -1e9  # finite "impossible" logit, so guidance differences stay finite

# Independent tokens: position i (1..3) takes text id TEXT0 + j with probability INDEP[i-1, j].
INDEP = np.array([[0.40, 0.25, 0.15, 0.10, 0.06, 0.04],
                  [0.05, 0.05, 0.10, 0.20, 0.25, 0.35],
                  [0.32, 0.02, 0.30, 0.02, 0.28, 0.06]])
# A dependent pair over 3 text ids: JOINT[a, b] = P(x1 = TEXT0 + a, x2 = TEXT0 + b).
JOINT = np.array([[0.30, 0.02, 0.03],
                  [0.02, 0.05, 0.18],
                  [0.10, 0.25, 0.05]])


def _chi2_bound(df):
  return stats.chi2.ppf(1 - 1e-4, df)


def _pearson(counts, expected_probs):
  expected = expected_probs * counts.sum()
  return float(((counts - expected) ** 2 / expected).sum())


def _rows(tokens, modality=None):
  tokens = np.asarray(tokens, np.int32)
  b, length = tokens.shape
  return {"tokens": tokens,
          "positions": np.tile(np.arange(length, dtype=np.int32), (b, 1)),
          "segment_ids": np.ones_like(tokens),
          "modality": np.zeros_like(tokens) if modality is None else np.asarray(modality, np.int32)}


def independent_denoiser(tokens, positions, segment_ids, modality):
  """Fixed categorical per position; a large logit on an image id that the bias must remove."""
  table = np.full((4, V), FAR, np.float32)
  table[1:, TEXT0:TEXT0 + 6] = np.log(INDEP)
  table[:, LAYOUT.image_range[0]] = 5.0
  return jnp.asarray(table)[positions]


def joint_denoiser(tokens, positions, segment_ids, modality):
  """Exact conditionals of JOINT at positions 1, 2 given whichever of them is unmasked."""
  p1, p2 = JOINT.sum(1), JOINT.sum(0)
  x1_given_x2 = np.log(JOINT / p2[None, :]).T  # [x2, x1]
  x2_given_x1 = np.log(JOINT / p1[:, None])    # [x1, x2]
  x1, x2 = tokens[:, 1], tokens[:, 2]

  def row_logits(log_probs):  # [B, 3] -> [B, V]
    out = jnp.full((log_probs.shape[0], V), FAR, jnp.float32)
    return out.at[:, TEXT0:TEXT0 + 3].set(log_probs)

  idx1 = jnp.clip(x1 - TEXT0, 0, 2)
  idx2 = jnp.clip(x2 - TEXT0, 0, 2)
  l1 = jnp.where((x2 == MASK)[:, None], jnp.log(p1)[None], jnp.asarray(x1_given_x2)[idx2])
  l2 = jnp.where((x1 == MASK)[:, None], jnp.log(p2)[None], jnp.asarray(x2_given_x1)[idx1])
  out = jnp.full(tokens.shape + (V,), FAR, jnp.float32)
  return out.at[:, 1].set(row_logits(l1)).at[:, 2].set(row_logits(l2))


def _run(denoiser, inputs, settings, seed=0, bias=BIAS):
  # RBG keys: the sampler takes any key type, and these compile faster on CPU than threefry.
  key = jax.random.key(seed, impl="rbg")
  out = sampling.sample(denoiser, inputs, key, settings, mask_id=MASK, logit_bias=bias)
  return np.asarray(out)


def _independent_inputs():
  return _rows(np.tile([LAYOUT.bos, MASK, MASK, MASK], (N, 1)))


def _independent_statistic(out):
  total = 0.0
  for i in range(3):
    counts = np.bincount(out[:, i + 1] - TEXT0, minlength=6)[:6]
    assert counts.sum() == N, "a sample left the allowed text ids"
    total += _pearson(counts, INDEP[i])
  return total


_S = sampling.SamplerSettings
# Exact for independent tokens: ancestral, and confidence rankings that ignore the drawn value.
EXACT_FOR_INDEPENDENT = [
    _S(method="ancestral", steps=8, schedule="linear"),
    _S(method="ancestral", steps=5, schedule="cosine"),
    _S(method="confidence", steps=3, schedule="linear", confidence="max_prob"),
    _S(method="confidence", steps=2, schedule="cosine", confidence="max_prob"),
    _S(method="maskgit", steps=3, schedule="cosine", confidence="max_prob"),
    _S(method="threshold", steps=3, threshold=0.3, confidence="max_prob"),
]


@pytest.mark.parametrize("settings", EXACT_FOR_INDEPENDENT,
                         ids=lambda s: f"{s.method}-{s.schedule}")
def test_independent_marginals_are_reproduced(settings):
  out = _run(independent_denoiser, _independent_inputs(), settings)
  assert not np.any(out == MASK)
  assert np.all(out[:, 0] == LAYOUT.bos)
  assert _independent_statistic(out) < _chi2_bound(3 * 5)


def test_sampled_token_confidence_is_detectably_biased():
  """Power check: ranking by the drawn token's probability favours modes, and the bound sees it."""
  settings = sampling.SamplerSettings(method="confidence", steps=3, confidence="sampled")
  out = _run(independent_denoiser, _independent_inputs(), settings)
  assert _independent_statistic(out) > 10 * _chi2_bound(15)


def _joint_counts(out):
  a, b = out[:, 1] - TEXT0, out[:, 2] - TEXT0
  assert np.all((a >= 0) & (a < 3) & (b >= 0) & (b < 3))
  return np.bincount(3 * a + b, minlength=9).reshape(3, 3)


@pytest.mark.parametrize("schedule,steps", [("linear", 4), ("cosine", 6), ("linear", 32)])
def test_ancestral_reproduces_the_joint_of_its_step_count(schedule, steps):
  """Ancestral sampling with finitely many steps draws the pair from JOINT, except when both
  tokens are revealed in the same step (probability q = sum_k r_k^2): then independently from
  the marginals. So the exact law is (1 - q) JOINT + q p1 p2^T."""
  settings = sampling.SamplerSettings(method="ancestral", steps=steps, schedule=schedule)
  r = sampling.reveal_step_probabilities(settings)
  assert abs(r.sum() - 1) < 1e-6
  q = float((r ** 2).sum())
  predicted = (1 - q) * JOINT + q * np.outer(JOINT.sum(1), JOINT.sum(0))
  out = _run(joint_denoiser, _rows(np.tile([LAYOUT.bos, MASK, MASK], (N, 1))), settings)
  counts = _joint_counts(out)
  assert _pearson(counts, predicted) < _chi2_bound(8)
  if q > 0.1:  # power: the same bound rejects the wrong law
    assert _pearson(counts, JOINT) > _chi2_bound(8)


def test_one_reveal_per_step_reproduces_the_joint_exactly():
  settings = sampling.SamplerSettings(method="confidence", steps=2, confidence="max_prob")
  out = _run(joint_denoiser, _rows(np.tile([LAYOUT.bos, MASK, MASK], (N, 1))), settings)
  assert _pearson(_joint_counts(out), JOINT) < _chi2_bound(8)


def test_conditioning_on_a_given_token_gives_the_conditional():
  """Infilling: x1 given, x2 generated from JOINT[x1, :] / p1[x1]."""
  settings = sampling.SamplerSettings(method="ancestral", steps=4)
  out = _run(joint_denoiser, _rows(np.tile([LAYOUT.bos, TEXT0 + 2, MASK], (N, 1))), settings)
  assert np.all(out[:, 1] == TEXT0 + 2)
  counts = np.bincount(out[:, 2] - TEXT0, minlength=3)
  assert _pearson(counts, JOINT[2] / JOINT[2].sum()) < _chi2_bound(2)


ALL_METHODS = [EXACT_FOR_INDEPENDENT[0], EXACT_FOR_INDEPENDENT[3],
    sampling.SamplerSettings(method="ancestral", steps=6, remask_eta=0.5),
    sampling.SamplerSettings(method="maskgit", steps=4, schedule="cosine"),
    sampling.SamplerSettings(method="threshold", steps=2, threshold=0.99),
    sampling.SamplerSettings(method="ancestral", steps=1, top_p=0.5, temperature=0.7),
    sampling.SamplerSettings(method="confidence", steps=7, top_k=2, temperature=0.0),
]


def mixed_denoiser(tokens, positions, segment_ids, modality):
  """Random-looking logits that depend on the input, over the whole padded vocabulary."""
  h = (tokens[..., None] * 31 + positions[..., None] * 7 + jnp.arange(V)) % 97
  return jnp.sin(h.astype(jnp.float32)) * 3.0


def _check_invariants(settings, b=16, length=24, seed=0):
  """Random rows (all modalities, given tokens, <bos>, trailing padding): no mask is left, given
  positions are unchanged, generated tokens lie in their modality's range (strict bias)."""
  rng = np.random.default_rng(seed)
  modality = rng.integers(0, 3, (b, length)).astype(np.int32)
  tokens = np.zeros((b, length), np.int32)
  for m in range(3):
    start, stop = LAYOUT.range_of(m)
    tokens = np.where(modality == m, rng.integers(start, stop, (b, length)), tokens)
  tokens = np.where(rng.random((b, length)) < 0.6, MASK, tokens)
  tokens[:, 0] = LAYOUT.bos
  segment_ids = np.ones_like(tokens)
  segment_ids[:, -3:] = 0  # padding
  tokens[:, -3:] = LAYOUT.pad
  modality[:, -3:] = 0
  inputs = _rows(tokens, modality)
  inputs["segment_ids"] = segment_ids
  out = _run(mixed_denoiser, inputs, settings, seed=seed,
             bias=sampling.logit_bias(LAYOUT, strict=True)[:, :V])
  assert not np.any(out == MASK)
  given = tokens != MASK
  np.testing.assert_array_equal(out[given], tokens[given])
  for m in range(3):  # strict bias: generated tokens lie in their modality's range
    start, stop = LAYOUT.range_of(m)
    sel = (~given) & (modality == m)
    ok = (out[sel] >= start) & (out[sel] < stop)
    if m == vocab_lib.TEXT:
      ok |= out[sel] == LAYOUT.eos
    assert np.all(ok)


@pytest.mark.parametrize("settings", ALL_METHODS, ids=lambda s: f"{s.method}-{s.steps}")
def test_all_positions_end_unmasked_and_given_positions_never_change(settings):
  _check_invariants(settings)


def test_same_key_same_samples_other_key_other_samples():
  settings = EXACT_FOR_INDEPENDENT[4]  # maskgit; same program as above, so no new compilation
  inputs = _independent_inputs()
  a = _run(independent_denoiser, inputs, settings, seed=3)
  b = _run(independent_denoiser, inputs, settings, seed=3)
  c = _run(independent_denoiser, inputs, settings, seed=4)
  np.testing.assert_array_equal(a, b)
  assert np.any(a != c)


@pytest.mark.parametrize("settings", [
    sampling.SamplerSettings(method="ancestral", steps=3, top_k=1),
    sampling.SamplerSettings(method="maskgit", steps=3, top_k=1, schedule="cosine"),
    sampling.SamplerSettings(method="ancestral", steps=3, temperature=0.0),
], ids=["ancestral-top1", "maskgit-top1", "greedy"])
def test_top_k_one_and_greedy_give_the_argmax_of_allowed_ids(settings):
  out = _run(independent_denoiser, _rows(np.tile([LAYOUT.bos, MASK, MASK, MASK], (32, 1))),
             settings)
  expected = TEXT0 + INDEP.argmax(1)  # the image id's larger logit is not allowed at text positions
  np.testing.assert_array_equal(out[:, 1:], np.tile(expected, (32, 1)))


def test_filter_logits_top_p_and_top_k():
  logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
  kept = lambda **kw: np.isfinite(np.asarray(sampling.filter_logits(logits, **kw)))
  np.testing.assert_array_equal(kept(top_p=0.7), [1, 1, 0, 0])
  np.testing.assert_array_equal(kept(top_p=0.85), [1, 1, 1, 0])
  np.testing.assert_array_equal(kept(top_p=0.1), [1, 0, 0, 0])
  np.testing.assert_array_equal(kept(top_k=3), [1, 1, 1, 0])
  np.testing.assert_array_equal(kept(top_k=2, top_p=0.99), [1, 1, 0, 0])


def _nucleus_reference(logits, top_p):
  """Plain float64 nucleus: ids whose strictly more probable ids hold less than top_p."""
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  before = (p[..., None, :] * (p[..., None, :] > p[..., :, None])).sum(-1)
  return (before < top_p) & np.isfinite(logits)


def test_nucleus_search_matches_the_sorted_definition():
  rng = np.random.default_rng(0)
  v = 300
  rows = np.stack([3 * rng.normal(size=v), np.zeros(v), 1e-3 * rng.normal(size=v),
                   np.round(rng.normal(size=v), 1),  # many ties
                   np.where(rng.random(v) < 0.5, -np.inf, rng.normal(size=v)),
                   4 * rng.standard_t(2, size=v), 20 * rng.normal(size=v)])
  for top_p in (0.1, 0.5, 0.9, 0.95, 0.999):
    kept = np.isfinite(np.asarray(sampling.filter_logits(jnp.asarray(rows, jnp.float32),
                                                         top_p=jnp.float32(top_p))))
    # float32 sums may differ from float64 only for an id whose predecessors' mass is within
    # rounding of top_p: bracket by the reference at top_p -/+ 1e-5.
    assert np.all(_nucleus_reference(rows, top_p - 1e-5) <= kept)
    assert np.all(kept <= _nucleus_reference(rows, top_p + 1e-5))
  assert kept.sum(-1)[1] == v and kept.sum(-1)[-1] <= 3


def test_inverse_cdf_draw_follows_the_softmax():
  rng = np.random.default_rng(1)
  v = 300  # not a multiple of the chunk: the padding must never be drawn
  logits = np.full(v, -np.inf)
  live = rng.choice(v, 12, replace=False)
  live[0] = v - 1  # the last id, next to the padding
  logits[live] = rng.normal(size=12)
  probs = np.exp(logits - logits[live].max())
  probs /= probs.sum()
  n = 20_000
  ids, log_norm = sampling.draw(jax.random.key(2, impl="rbg"),
                                jnp.tile(jnp.asarray(logits, jnp.float32), (n, 1)), chunk=64)
  counts = np.bincount(np.asarray(ids), minlength=v)
  assert counts.sum() == n and counts[probs == 0].sum() == 0
  assert _pearson(counts[live], probs[live]) < _chi2_bound(11)
  np.testing.assert_allclose(log_norm, np.log(np.exp(logits[live]).sum()), rtol=1e-5)


# --- classifier-free guidance -----------------------------------------------------------------
COND_ON = np.array([0.7, 0.2, 0.1])   # target law when the condition token is present
COND_OFF = np.array([0.1, 0.3, 0.6])  # ... when it is masked out


def cond_denoiser(tokens, positions, segment_ids, modality):
  """Position 2's law depends on whether the condition (position 1) is visible."""
  present = (tokens[:, 1] != MASK)[:, None]
  law = jnp.where(present, jnp.log(COND_ON)[None], jnp.log(COND_OFF)[None])
  out = jnp.full(tokens.shape + (V,), FAR, jnp.float32)
  return out.at[:, 2, TEXT0:TEXT0 + 3].set(law).at[:, 1, TEXT0:TEXT0 + 3].set(0.0)


def cond_hidden_denoiser(tokens, positions, segment_ids, modality):
  return cond_denoiser(tokens.at[:, 1].set(MASK), positions, segment_ids, modality)


def _cond_inputs(n):
  inputs = _rows(np.tile([LAYOUT.bos, TEXT0 + 4, MASK], (n, 1)))
  inputs["cond_mask"] = np.tile([1, 1, 0], (n, 1)).astype(np.int32)
  return inputs


def test_guided_logits_scale_zero_is_unconditional_and_one_is_conditional():
  inputs = _cond_inputs(4)
  args = [jnp.asarray(inputs[k]) for k in ("tokens", "positions", "segment_ids", "modality")]
  cond_mask = jnp.asarray(inputs["cond_mask"]).astype(bool)
  for scale, reference in ((0.0, cond_hidden_denoiser), (1.0, cond_denoiser)):
    guided = sampling.guided_logits(cond_denoiser, *args, cond_mask, mask_id=MASK, scale=scale,
                                    use_guidance=True)
    np.testing.assert_allclose(guided, reference(*args), rtol=1e-6)
  guided = sampling.guided_logits(cond_denoiser, *args, cond_mask, mask_id=MASK, scale=3.0,
                                  use_guidance=True)
  expected = np.log(COND_OFF) + 3.0 * (np.log(COND_ON) - np.log(COND_OFF))
  np.testing.assert_allclose(guided[:, 2, TEXT0:TEXT0 + 3], np.tile(expected, (4, 1)), rtol=1e-5)


def test_cfg_sampling_scale_zero_and_one():
  n = 3000
  inputs = _cond_inputs(n)
  plain = {k: v for k, v in inputs.items() if k != "cond_mask"}
  base = sampling.SamplerSettings(method="ancestral", steps=4)
  uncond = _run(cond_denoiser, inputs, base.replace(cfg_scale=0.0), seed=7)
  # Scale 0 is exactly the sampler run on a model that never sees the condition.
  np.testing.assert_array_equal(uncond, _run(cond_hidden_denoiser, plain, base, seed=7))
  assert np.all(uncond[:, 1] == TEXT0 + 4)  # the condition itself is kept
  cond = _run(cond_denoiser, inputs, base.replace(cfg_scale=1.0), seed=7)
  np.testing.assert_array_equal(cond, _run(cond_denoiser, plain, base, seed=7))
  for out, law in ((uncond, COND_OFF), (cond, COND_ON)):
    counts = np.bincount(out[:, 2] - TEXT0, minlength=3)
    assert _pearson(counts, law) < _chi2_bound(2)
  # A window that never contains t: no guidance at all.
  outside = _run(cond_denoiser, inputs, base.replace(cfg_scale=0.0, cfg_window=(2.0, 3.0)), seed=7)
  np.testing.assert_array_equal(outside, cond)


def test_settings_come_from_the_config_and_bad_settings_name_the_key():
  c = get_base_config()
  for modality in vocab_lib.MODALITIES:
    assert sampling.settings_from_config(c, modality).steps == c.sampling[modality].steps
  with pytest.raises(sampling.SamplerError, match="method"):
    sampling.SamplerSettings(method="beam")
  with pytest.raises(sampling.SamplerError, match="top_p"):
    sampling.SamplerSettings(top_p=0.0)
  with pytest.raises(sampling.SamplerError, match="remask_eta"):
    sampling.SamplerSettings(method="maskgit", remask_eta=0.1)
  with pytest.raises(sampling.SamplerError, match="modality"):
    sampling.settings_from_config(c, "video")
  with pytest.raises(sampling.SamplerError, match="block_length"):
    sampling.SamplerSettings(block_length=-1)
  c.sampling.text.block_length = 32
  assert sampling.settings_from_config(c, "text").block_length == 32


def test_polynomial_sampling_uses_the_trained_exponent():
  """A model trained with alpha = 1 - t^3 samples with 1 - t^3, not the default 1 - t^2."""
  c = get_base_config()
  c.diffusion.schedule.text, c.diffusion.poly_exponent = "polynomial", 3.0
  c.sampling.text.schedule, c.sampling.text.steps = "polynomial", 4
  settings = sampling.settings_from_config(c, "text")
  t = np.linspace(1.0, 0.0, 5)  # the step boundaries t_k = 1 - k / 4
  trained = obj_lib.Objective.from_config(c.diffusion, LAYOUT).schedules[vocab_lib.TEXT]
  np.testing.assert_allclose(trained.alpha(t), 1 - t ** 3, atol=1e-7)
  # Ancestral: a token masked at t = 1 is revealed in step k with probability
  # alpha(t_{k+1}) - alpha(t_k) = t_k^3 - t_{k+1}^3.
  np.testing.assert_allclose(sampling.reveal_step_probabilities(settings),
                             t[:-1] ** 3 - t[1:] ** 3, atol=1e-6)
  # Confidence: floor(n t_{k+1}^3) positions stay masked after step k; each revealed token
  # records how many masks its row held when it was drawn.
  n = 40
  tokens = np.tile([ORDER_LAYOUT.bos] + [ORDER_LAYOUT.mask] * n, (2, 1))
  out = _run(mask_count_denoiser, _rows(tokens), settings.replace(method="confidence"),
             bias=sampling.logit_bias(ORDER_LAYOUT)[:, :ORDER_LAYOUT.size])
  left = [n] + [int(np.floor(n * x ** 3)) for x in t[1:]]  # 40, 16, 5, 0, 0
  expected = np.zeros(n + 1, int)
  for before, after in zip(left[:-1], left[1:]):
    expected[before] += before - after
  for row in out[:, 1:] - ORDER_TEXT0:
    np.testing.assert_array_equal(np.bincount(row, minlength=n + 1), expected)


# --- semi-autoregressive blocks --------------------------------------------------------------
def _joint4():
  """A dependent law over 4 binary positions (Ising chain with a long-range term); every cell
  >= 0.4%, so 10k draws put >= 45 expected counts in each of the 16 cells."""
  spins = 2 * np.array(list(itertools.product([0, 1], repeat=4))) - 1
  energy = (0.7 * (spins[:, :-1] * spins[:, 1:]).sum(1) - 0.5 * spins[:, 0] * spins[:, 3]
            + 0.3 * spins[:, 1])
  p = np.exp(energy)
  return (p / p.sum()).reshape(2, 2, 2, 2)


JOINT4 = _joint4()


def _conditional(joint, state, i):
  """P(x_i | the revealed entries of state) from the joint table; state entries -1 = masked."""
  sub = joint[tuple(slice(None) if v < 0 else v for v in state)]
  masked = [a for a, v in enumerate(state) if v < 0]
  others = tuple(a for a in range(len(masked)) if a != masked.index(i))
  marginal = sub.sum(axis=others)
  return marginal / marginal.sum()


def _conditional_table4():
  """[81, 4, 2] exact conditionals of JOINT4 at each position given each state (revealed
  positions get their own value with probability 1)."""
  table = np.zeros((81, 4, 2))
  for state in itertools.product((-1, 0, 1), repeat=4):
    index = sum((v + 1) * 3 ** i for i, v in enumerate(state))
    for i, v in enumerate(state):
      table[index, i] = _conditional(JOINT4, state, i) if v < 0 else np.eye(2)[v]
  return table


COND4 = np.log(np.maximum(_conditional_table4(), 1e-30)).astype(np.float32)


def joint4_denoiser(tokens, positions, segment_ids, modality):
  """Row <bos> x1..x4: the exact conditionals of JOINT4 given whichever x are unmasked."""
  x = tokens[:, 1:5]
  code = jnp.where(x == MASK, 0, jnp.clip(x - TEXT0, 0, 1) + 1)
  index = (code * jnp.array([1, 3, 9, 27])).sum(-1)
  out = jnp.full(tokens.shape + (V,), FAR, jnp.float32)
  return out.at[:, 1:5, TEXT0:TEXT0 + 2].set(jnp.asarray(COND4)[index])


def block_ancestral_law(joint, blocks, steps_per_block, schedule="linear"):
  """Exact output law of ancestral sampling run block by block (plain-numpy oracle): a
  distribution over partial states, advanced step by step; in a block's step j of n each
  masked position of the block is revealed with probability (alpha_s - alpha_t) / (1 - alpha_t)
  (1 at its last step), and the positions revealed together are drawn independently from their
  conditionals given what is revealed before the step."""
  sched = schedules_lib.make_schedule(schedule)
  dist = {(-1,) * joint.ndim: 1.0}
  for block, n in zip(blocks, steps_per_block):
    for j in range(n):
      a_t, a_s = float(sched.alpha(1 - j / n)), float(sched.alpha(1 - (j + 1) / n))
      r = 1.0 if j == n - 1 else (a_s - a_t) / (1 - a_t)
      advanced = {}
      for state, p in dist.items():
        masked = [i for i in block if state[i] < 0]
        for k in range(len(masked) + 1):
          for subset in itertools.combinations(masked, k):
            weight = p * r ** k * (1 - r) ** (len(masked) - k)
            conds = [_conditional(joint, state, i) for i in subset]
            for values in itertools.product(range(2), repeat=k):
              new = list(state)
              for i, value in zip(subset, values):
                new[i] = value
              q = weight * float(np.prod([c[value] for c, value in zip(conds, values)]))
              advanced[tuple(new)] = advanced.get(tuple(new), 0.0) + q
      dist = advanced
  law = np.zeros(joint.shape)
  for state, p in dist.items():
    law[state] += p
  return law


# (block_length, steps) -> blocks of the 4 masked positions and the steps each block gets.
BLOCK_CASES = {(0, 4): ([[0, 1, 2, 3]], [4]),
               (2, 4): ([[0, 1], [2, 3]], [2, 2]),
               (3, 5): ([[0, 1, 2], [3]], [3, 2]),
               (1, 4): ([[0], [1], [2], [3]], [1, 1, 1, 1])}


@pytest.mark.parametrize("block_length,steps", list(BLOCK_CASES), ids=str)
def test_block_ancestral_reproduces_its_exact_law(block_length, steps):
  blocks, per_block = BLOCK_CASES[(block_length, steps)]
  law = block_ancestral_law(JOINT4, blocks, per_block)
  if block_length == 1:  # one token per block: left-to-right factorisation, the joint itself
    np.testing.assert_allclose(law, JOINT4, atol=1e-12)
  settings = _S(method="ancestral", steps=steps, block_length=block_length)
  out = _run(joint4_denoiser, _rows(np.tile([LAYOUT.bos] + [MASK] * 4, (N, 1))), settings)
  x = out[:, 1:5] - TEXT0
  assert np.all((x == 0) | (x == 1))
  counts = np.bincount(x @ np.array([8, 4, 2, 1]), minlength=16)
  assert _pearson(counts, law.reshape(-1)) < _chi2_bound(15)
  # Power: the same bound rejects the law of the other plan (blocks on vs off).
  other = BLOCK_CASES[(2, 4) if block_length == 0 else (0, 4)]
  assert _pearson(counts, block_ancestral_law(JOINT4, *other).reshape(-1)) > _chi2_bound(15)


def test_block_clock_splits_steps_evenly_and_gives_every_block_one():
  for steps in range(1, 13):
    for n_blocks in range(1, 9):
      total = max(steps, n_blocks)
      plan = [tuple(int(a[0, 0]) for a in sampling.block_clock(  # numpy ints work too
          k, np.full((1, 1), n_blocks), total)) for k in range(total)]
      blocks = [b for b, _, _ in plan]
      assert blocks == sorted(blocks) and set(blocks) == set(range(n_blocks))
      sizes = np.bincount(blocks)
      assert sizes.max() - sizes.min() <= 1
      for k, (b, j, n) in enumerate(plan):  # step j of n within the block, consecutive
        assert n == sizes[b] and j == k - blocks.index(b)


ORDER_LAYOUT = vocab_lib.VocabLayout(text_size=64, image_size=4, audio_size=4)
ORDER_TEXT0 = ORDER_LAYOUT.text_range[0]


def mask_count_denoiser(tokens, positions, segment_ids, modality):
  """Every position surely takes text id (number of <mask> in its row when called): a revealed
  value records how far generation had got when it was drawn."""
  n_masked = (tokens == ORDER_LAYOUT.mask).sum(-1)
  value = ORDER_TEXT0 + jnp.minimum(n_masked, 63)
  out = jnp.full(tokens.shape + (ORDER_LAYOUT.size,), FAR, jnp.float32)
  return jnp.where(jnp.arange(ORDER_LAYOUT.size) == value[:, None, None], 0.0, out)


def _block_order_violations(tokens, out, block_length):
  """Generated positions not drawn while their block was current: earlier blocks all revealed
  (masks left <= M - b * block_length) and later blocks all masked (>= their size + 1)."""
  bad = 0
  for row_in, row_out in zip(tokens, out):
    where = np.flatnonzero(row_in == ORDER_LAYOUT.mask)
    m = len(where)
    for order, i in enumerate(where):
      b = order // block_length
      masks_left = row_out[i] - ORDER_TEXT0
      bad += not (max(m - (b + 1) * block_length, 0) + 1 <= masks_left <= m - b * block_length)
  return bad


@pytest.mark.parametrize("settings", [
    _S(method="ancestral", steps=16, block_length=5),
    _S(method="ancestral", steps=3, block_length=5),  # fewer steps than blocks: one per block
    _S(method="ancestral", steps=20, block_length=4, remask_eta=0.5),
    _S(method="confidence", steps=16, block_length=5),
    _S(method="maskgit", steps=12, schedule="cosine", block_length=7),
    _S(method="threshold", steps=8, threshold=0.5, block_length=5),
], ids=lambda s: f"{s.method}-{s.steps}-{s.block_length}")
def test_blocks_fill_left_to_right(settings):
  rng = np.random.default_rng(1)
  tokens = np.where(rng.random((6, 40)) < 0.7, ORDER_LAYOUT.mask,
                    rng.integers(ORDER_TEXT0, ORDER_TEXT0 + 64, (6, 40))).astype(np.int32)
  tokens[:, 0] = ORDER_LAYOUT.bos
  tokens[0, 1:] = ORDER_LAYOUT.mask  # one fully masked row (no prompt)
  bias = sampling.logit_bias(ORDER_LAYOUT)[:, :ORDER_LAYOUT.size]
  out = _run(mask_count_denoiser, _rows(tokens), settings, bias=bias)
  given = tokens != ORDER_LAYOUT.mask
  assert not np.any(out == ORDER_LAYOUT.mask)
  np.testing.assert_array_equal(out[given], tokens[given])
  assert _block_order_violations(tokens, out, settings.block_length) == 0
  if settings.method == "ancestral" and settings.remask_eta == 0:
    # Power: without blocks the same check fails.
    plain = _run(mask_count_denoiser, _rows(tokens), settings.replace(block_length=0), bias=bias)
    assert _block_order_violations(tokens, plain, settings.block_length) > 0


@pytest.mark.parametrize("seed", range(4))
def test_block_invariants_over_random_shapes_and_methods(seed):
  rng = np.random.default_rng(100 + seed)
  method = ("ancestral", "confidence", "maskgit", "threshold")[seed]
  settings = _S(method=method, steps=int(rng.integers(1, 12)),
                block_length=int(rng.integers(1, 9)),
                remask_eta=0.3 if method == "ancestral" else 0.0,
                top_p=0.8 if method == "confidence" else 1.0)
  _check_invariants(settings, b=int(rng.integers(1, 9)), length=int(rng.integers(5, 40)),
                    seed=seed)
