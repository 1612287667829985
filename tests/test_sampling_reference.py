"""Every sampling method against a plain step-by-step reference, token for token.

The reference runs each row on its own in eager jnp and follows the rules of the sampling
module's docstring: the block plan, each method's reveal rule, remasking. It shares with the
sampler only the pieces tested on their own in test_sampling.py (filter_logits, draw) and the
randomness contract: step k's draws come from fold_in(key, k) split into (draw, reveal, remask,
noise) keys, each drawing one [B, L] array. The arithmetic is float32 with the sampler's
formulas, so a decision could differ only where a uniform lands within rounding of its
probability; the fixed seeds below have none.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tmdiff.data import vocab as vocab_lib
from tmdiff.diffusion import sampling
from tmdiff.diffusion import schedules as schedules_lib

LAYOUT = vocab_lib.VocabLayout(text_size=12, image_size=8, audio_size=8)
MASK = LAYOUT.mask
V = LAYOUT.size
BIAS = sampling.logit_bias(LAYOUT, strict=True)[:, :V]
F32 = np.float32


def mixed_denoiser(tokens, positions, segment_ids, modality):
  """Input-dependent logits that sees the condition: guidance changes them."""
  h = (tokens[..., None] * 31 + positions[..., None] * 7 + jnp.arange(V)) % 97
  context = (tokens * (positions % 3)).sum(-1)[:, None, None] % 11
  return jnp.sin(h.astype(jnp.float32) + context) * 3.0


def _inputs(b=6, length=26, seed=0):
  """Rows of all modalities with a prompt, a condition, trailing padding, one row all masked."""
  rng = np.random.default_rng(seed)
  modality = rng.integers(0, 3, (b, length)).astype(np.int32)
  tokens = np.zeros((b, length), np.int32)
  for m in range(3):
    start, stop = LAYOUT.range_of(m)
    tokens = np.where(modality == m, rng.integers(start, stop, (b, length)), tokens)
  cond_mask = (rng.random((b, length)) < 0.4) & (np.arange(length) < 9)
  tokens = np.where((rng.random((b, length)) < 0.7) & ~cond_mask, MASK, tokens)
  tokens[0, 1:], cond_mask[0] = MASK, False
  tokens[:, 0] = LAYOUT.bos
  segment_ids = np.ones_like(tokens)
  segment_ids[:, -3:], tokens[:, -3:] = 0, LAYOUT.pad
  return {"tokens": tokens, "positions": np.tile(np.arange(length, dtype=np.int32), (b, 1)),
          "segment_ids": segment_ids, "modality": modality,
          "cond_mask": cond_mask.astype(np.int32)}


def _plan(row_generated, steps, block_length):
  """Block of each generated position (-1 elsewhere) and the number of blocks of one row."""
  where = np.flatnonzero(row_generated)
  length = block_length or max(len(where), 1)
  block_of = np.full(len(row_generated), -1)
  block_of[where] = np.arange(len(where)) // length
  return block_of, max(math.ceil(len(where) / length), 1)


def _row_clock(k, n_blocks, total):
  """(block, step j within it, its step count n): block b owns ceil(b S / n) .. of S steps."""
  block = k * n_blocks // total
  first = math.ceil(block * total / n_blocks)
  return block, k - first, math.ceil((block + 1) * total / n_blocks) - first


def _logits(inputs, tokens, t_rows, s):
  """Guided, biased, tempered and filtered logits [B, L, V] (the shared part of a step)."""
  args = [jnp.asarray(inputs[k]) for k in ("positions", "segment_ids", "modality")]
  logits = mixed_denoiser(jnp.asarray(tokens), *args)
  if s.cfg_scale != 1.0:
    uncond = mixed_denoiser(jnp.where(inputs["cond_mask"] > 0, MASK, tokens), *args)
    window = (t_rows >= F32(s.cfg_window[0])) & (t_rows <= F32(s.cfg_window[1]))
    scale = jnp.asarray(np.where(window, F32(s.cfg_scale), F32(1.0)))[:, None, None]
    logits = uncond + scale * (logits - uncond)
  logits = logits + jnp.asarray(BIAS)[inputs["modality"]]
  if s.temperature > 0:
    logits = logits / F32(s.temperature)
  return sampling.filter_logits(logits, top_k=s.top_k, top_p=F32(s.top_p) if s.top_p < 1 else 1.0)


def _top(candidates, score, count):
  """The `count` candidates of highest score, ties to the earlier position."""
  order = sorted(np.flatnonzero(candidates), key=lambda i: (-score[i], i))
  chosen = np.zeros_like(candidates)
  chosen[order[:count]] = True
  return chosen


def reference_sample(inputs, key, s: sampling.SamplerSettings):
  tokens = np.array(inputs["tokens"])
  b, length = tokens.shape
  sched = schedules_lib.make_schedule(s.schedule, poly_exponent=s.poly_exponent)
  alpha = lambda t: F32(sched.alpha(jnp.float32(t)))
  plans = [_plan(row, s.steps, s.block_length) for row in tokens == MASK]
  total = max([s.steps] + [n for _, n in plans])
  confidence = np.zeros((b, length), F32)  # log-probability of each token when it was drawn
  for k in range(total):
    k_draw, k_reveal, k_remask, k_noise = jax.random.split(jax.random.fold_in(key, k), 4)
    clocks = [_row_clock(k, n_blocks, total) for _, n_blocks in plans]
    t_rows = np.array([F32(1) - F32(j) / F32(n) for _, j, n in clocks])
    logits = _logits(inputs, tokens, t_rows, s)
    if s.temperature == 0:
      drawn, log_norm = jnp.argmax(logits, -1), jax.nn.logsumexp(logits, -1)
    else:
      drawn, log_norm = sampling.draw(k_draw, logits)
    drawn, log_norm, logits = np.asarray(drawn), np.asarray(log_norm), np.asarray(logits)
    drawn_log_prob = np.take_along_axis(logits, drawn[..., None], -1)[..., 0] - log_norm
    score = drawn_log_prob if s.confidence == "sampled" else logits.max(-1) - log_norm
    u_reveal = np.asarray(jax.random.uniform(k_reveal, (b, length)))
    u_remask = np.asarray(jax.random.uniform(k_remask, (b, length)))
    gumbel = np.asarray(jax.random.gumbel(k_noise, (b, length)))
    new = tokens.copy()
    for r, ((block_of, _), (block, j, n)) in enumerate(zip(plans, clocks)):
      in_block = block_of == block
      masked = tokens[r] == MASK
      active = masked & in_block
      last = j == n - 1
      a_t, a_s = alpha(t_rows[r]), alpha(F32(1) - F32(j + 1) / F32(n))
      remask = np.zeros(length, bool)
      if s.method == "ancestral":
        sigma = F32(0)
        if s.remask_eta > 0 and not last:  # ReMDM cap, spread towards low confidence
          sigma = min(F32(s.remask_eta), (F32(1) - a_s) / max(a_t, F32(1e-12)))
          candidates = in_block & ~masked
          weights = np.asarray(jax.nn.softmax(jnp.where(candidates, -confidence[r], -jnp.inf)))
          prob = np.clip(sigma * F32(candidates.sum()) * np.where(candidates, weights, 0), 0, 1)
          remask = candidates & (u_remask[r] < prob)
        p = (a_s - (F32(1) - sigma) * a_t if s.remask_eta > 0 else a_s - a_t) / (F32(1) - a_t)
        reveal = active & (u_reveal[r] < (F32(1) if last else np.clip(p, 0, 1)))
      elif s.method == "threshold":
        best = _top(active, score[r], 1)
        reveal = active & ((np.exp(score[r]) > F32(s.threshold)) | best | last)
      else:  # confidence, maskgit: the block's masked count follows 1 - alpha(s)
        row_score = score[r]
        if s.method == "maskgit" and s.choice_temperature > 0:
          noise = F32(s.choice_temperature) * (F32(1) - F32(j + 1) / F32(n))
          row_score = row_score + noise * gumbel[r]
        n_block = in_block.sum()
        target = 0 if last else min(
            int(np.floor(F32(n_block) * (F32(1) - a_s) + F32(1e-4))), n_block)
        n_masked = active.sum()
        reveal = _top(active, row_score, max(n_masked - target, min(n_masked, 1)))
      new[r] = np.where(reveal, drawn[r], new[r])
      new[r] = np.where(remask, MASK, new[r])
      confidence[r] = np.where(reveal, drawn_log_prob[r], confidence[r])
    tokens = new
  return tokens


_S = sampling.SamplerSettings
CASES = [
    _S(method="ancestral", steps=6),
    _S(method="ancestral", steps=5, schedule="cosine", top_p=0.8),
    _S(method="ancestral", steps=4, schedule="polynomial", poly_exponent=3.0, top_k=4),
    _S(method="ancestral", steps=7, remask_eta=0.4, temperature=0.7),
    _S(method="ancestral", steps=9, block_length=5, remask_eta=0.3, schedule="geometric"),
    _S(method="ancestral", steps=5, cfg_scale=2.5, cfg_window=(0.3, 1.0)),
    _S(method="confidence", steps=5),
    _S(method="confidence", steps=6, block_length=4, temperature=0.0, confidence="max_prob"),
    _S(method="maskgit", steps=6, schedule="cosine"),
    _S(method="maskgit", steps=7, block_length=6, schedule="loglinear", cfg_scale=0.5),
    _S(method="threshold", steps=4, threshold=0.3),
    _S(method="threshold", steps=8, threshold=0.6, block_length=3, confidence="max_prob"),
]


@pytest.mark.parametrize("settings", CASES, ids=lambda s: f"{s.method}-{s.steps}-{s.schedule}")
def test_sampler_matches_the_reference(settings):
  inputs = _inputs()
  for seed in (0, 1):
    key = jax.random.key(seed, impl="rbg")
    got = np.asarray(sampling.sample(mixed_denoiser, inputs, key, settings, mask_id=MASK,
                                     logit_bias=BIAS))
    expected = reference_sample(inputs, key, settings)
    assert not np.any(expected == MASK)
    np.testing.assert_array_equal(got, expected)
