"""Fused masked cross-entropy vs materialised logits (Pallas in interpret mode on CPU)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tmdiff.kernels.cross_entropy import masked_cross_entropy

PALLAS = dict(tile_n=16, tile_d=16, tile_v=64)


def _data(seed, n, d, v, dtype):
  ks = jax.random.split(jax.random.key(seed), 4)
  h = jax.random.normal(ks[0], (n, d), jnp.float32).astype(dtype)
  w = (jax.random.normal(ks[1], (d, v), jnp.float32) / np.sqrt(d)).astype(dtype)
  t = jax.random.randint(ks[2], (n,), 0, v)
  wt = jax.random.uniform(ks[3], (n,)) * (jax.random.uniform(ks[3], (n,)) > 0.3)
  return h, w, t, wt


def _run(impl, h, w, t, wt, vr=None, block_v=128):
  kw = PALLAS if impl == "pallas" else {}
  f = lambda h, w, wt: masked_cross_entropy(h, w, t, wt, vocab_range=vr, impl=impl,
                                            block_v=block_v, reduction="sum", **kw)
  rows = jax.jit(lambda h, w, wt: masked_cross_entropy(h, w, t, wt, vocab_range=vr, impl=impl,
                                                        block_v=block_v, **kw))(h, w, wt)
  val, g = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(h, w, wt)
  return rows, val, g


@pytest.mark.parametrize("impl", ["blockwise", "pallas"])
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.sampled_from([32, 64]), v=st.sampled_from([300, 700]),
       use_range=st.booleans())
def test_matches_reference_f32(impl, seed, n, v, use_range):
  h, w, t, wt = _data(seed, n, 32, v, jnp.float32)
  vr = None
  if use_range:  # each row restricted to a random window that holds its target
    rng = np.random.default_rng(seed)
    lo = np.minimum(np.asarray(t), rng.integers(0, v, n))
    hi = np.maximum(np.asarray(t) + 1, rng.integers(0, v + 1, n))
    vr = jnp.asarray(np.stack([lo, hi], 1), jnp.int32)
  rows, val, g = _run(impl, h, w, t, wt, vr)
  rrows, rval, rg = _run("reference", h, w, t, wt, vr)
  np.testing.assert_allclose(rows, rrows, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(val, rval, rtol=1e-5)
  for a, b in zip(g, rg):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["blockwise", "pallas"])
def test_bf16_tolerance(impl):
  h, w, t, wt = _data(7, 64, 64, 1000, jnp.bfloat16)
  rows, val, g = _run(impl, h, w, t, wt, block_v=256)
  rrows, rval, rg = _run("reference", h, w, t, wt)
  np.testing.assert_allclose(rows, rrows, rtol=1e-2, atol=1e-2)
  for a, b in zip(g, rg):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.all(np.isfinite(a))
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 2e-2


def test_zero_weight_rows_and_errors():
  h, w, t, wt = _data(1, 16, 8, 50, jnp.float32)
  wt = wt.at[:8].set(0.0)
  rows = masked_cross_entropy(h, w, t, wt, impl="blockwise", block_v=16)
  assert np.all(np.asarray(rows[:8]) == 0) and np.all(np.asarray(rows[8:]) >= 0)
  with pytest.raises(ValueError):
    masked_cross_entropy(h, w, t, wt, impl="nope")


def test_chunked_sum():
  h, w, t, wt = _data(9, 64, 32, 300, jnp.float32)
  vr = jnp.stack([jnp.zeros(64, jnp.int32), jnp.maximum(t + 1, 200)], 1).astype(jnp.int32)
  f = lambda impl: jax.value_and_grad(
      lambda h, w, wt: masked_cross_entropy(h, w, t, wt, vocab_range=vr, impl=impl, block_n=16,
                                            reduction="sum"), argnums=(0, 1, 2))(h, w, wt)
  (val, g), (rval, rg) = f("chunked"), f("reference")
  np.testing.assert_allclose(val, rval, rtol=1e-5)
  for a, b in zip(g, rg):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError):
    masked_cross_entropy(h, w, t, wt, impl="chunked")
