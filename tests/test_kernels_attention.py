"""Attention backends vs the jnp reference (Pallas kernels in interpret mode on CPU)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tmdiff.kernels import attention as A

PALLAS_SMALL = dict(block_q=32, block_k=32, bwd_block_q=32, bwd_block_k=32)
IMPLS = ["xla", "pallas_gpu", "pallas_tpu"]


def _opts(impl):
  return PALLAS_SMALL if impl == "pallas_gpu" else {}


def _qkv(key, b, t, h, kh, d, dtype):
  ks = jax.random.split(jax.random.key(key), 3)
  return (jax.random.normal(ks[0], (b, t, h, d), dtype),
          jax.random.normal(ks[1], (b, t, kh, d), dtype),
          jax.random.normal(ks[2], (b, t, kh, d), dtype))


def _layout(rng, b, t, max_docs):
  """Random packed rows: contiguous documents with random ids, optional tail padding."""
  seg = np.zeros((b, t), np.int32)
  for i in range(b):
    n = rng.integers(1, max_docs + 1)
    cuts = np.sort(rng.choice(np.arange(1, t), size=n, replace=False))
    ids = rng.permutation(np.arange(1, n + 1))
    start = 0
    for j, c in enumerate(cuts):
      seg[i, start:c] = ids[j]
      start = c
    if rng.random() < 0.5:
      seg[i, start:] = ids[-1]  # else: tail stays padding
  return jnp.asarray(seg)


def _grads(impl, q, k, v, seg, ct):
  f = lambda q, k, v: jnp.sum(A.attend(q, k, v, seg, impl=impl, **_opts(impl)).astype(jnp.float32) * ct)
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(q, k, v)


def _close(a, b, tol):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  assert np.all(np.isfinite(a))
  np.testing.assert_allclose(a, b, atol=tol, rtol=tol)


@pytest.mark.parametrize("impl", IMPLS)
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**16), heads=st.sampled_from([(2, 1), (4, 2), (2, 2)]),
       docs=st.integers(1, 4))
def test_matches_reference_f32(impl, seed, heads, docs):
  h, kh = heads
  t = 128
  q, k, v = _qkv(seed, 1, t, h, kh, 32, jnp.float32)
  seg = _layout(np.random.default_rng(seed), 1, t, docs)
  ct = jax.random.normal(jax.random.key(seed + 1), q.shape)
  out = jax.jit(lambda q, k, v: A.attend(q, k, v, seg, impl=impl, **_opts(impl)))(q, k, v)
  _close(out, A.attend_reference(q, k, v, seg), 2e-5 if impl != "xla" else 1e-4)
  val, g = _grads(impl, q, k, v, seg, ct)
  rval, rg = _grads("reference", q, k, v, seg, ct)
  for a, b in zip(g, rg):
    _close(a, b, 1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16_tolerance_and_padded_rows(impl):
  """bf16 inputs (tolerance as JAX's kernel tests: ~2e-2), one fully padded row."""
  q, k, v = _qkv(3, 2, 128, 4, 2, 64, jnp.bfloat16)
  seg = np.ones((2, 128), np.int32)
  seg[0, 50:100] = 2
  seg[0, 100:] = 0
  seg[1] = 0  # fully padded
  seg = jnp.asarray(seg)
  ct = jax.random.normal(jax.random.key(4), q.shape)
  out = jax.jit(lambda q, k, v: A.attend(q, k, v, seg, impl=impl, **_opts(impl)))(q, k, v)
  ref = A.attend_reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), seg)
  _close(out, ref, 2e-2)
  assert np.all(np.asarray(out[1], np.float32) == 0)
  _, g = _grads(impl, q, k, v, seg, ct)
  _, rg = _grads("reference", q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                 seg, ct)
  for a, b in zip(g, rg):
    a = np.asarray(a, np.float32)
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b, atol=5e-2, rtol=5e-2)
  assert np.all(np.asarray(g[0][1], np.float32) == 0)  # dq of padded row


@pytest.mark.parametrize("impl", ["reference"] + IMPLS)
def test_packed_equals_unpacked(impl):
  """Attention of a packed row == attention of each document alone (padded to full length)."""
  t, lens = 128, (40, 56, 32)
  q, k, v = _qkv(5, 1, t, 2, 1, 32, jnp.float32)
  seg = jnp.asarray(np.repeat(np.arange(1, 4), lens)[None], jnp.int32)
  run = jax.jit(lambda q, k, v, s: A.attend(q, k, v, s, impl=impl, **_opts(impl)))
  packed = run(q, k, v, seg)
  start = 0
  for n in lens:
    sl = slice(start, start + n)
    pad = lambda x: jnp.zeros_like(x).at[:, :n].set(x[:, sl])
    alone_seg = jnp.zeros((1, t), jnp.int32).at[:, :n].set(1)
    alone = run(pad(q), pad(k), pad(v), alone_seg)
    _close(packed[:, sl], alone[:, :n], 2e-5 if impl != "xla" else 1e-4)
    start += n


@pytest.mark.parametrize("t", [89, 23])
def test_pallas_gpu_lengths_off_its_tile(t):
  """Rows of a length the kernel's tiles do not divide (a T2I prompt plus its image), with
  tail padding: forward and backward equal the reference."""
  q, k, v = _qkv(7, 2, t, 2, 1, 32, jnp.float32)
  seg = np.ones((2, t), np.int32)
  seg[0, t // 3:] = 2
  seg[1, t - 5:] = 0
  seg = jnp.asarray(seg)
  ct = jax.random.normal(jax.random.key(8), q.shape)
  out = jax.jit(lambda q, k, v: A.attend(q, k, v, seg, impl="pallas_gpu", **PALLAS_SMALL))(q, k, v)
  assert out.shape == q.shape
  _close(out, A.attend_reference(q, k, v, seg), 2e-5)
  _, g = _grads("pallas_gpu", q, k, v, seg, ct)
  _, rg = _grads("reference", q, k, v, seg, ct)
  for a, b in zip(g, rg):
    _close(a, b, 1e-4)


def test_cudnn_packed_layout_offsets():
  """The cuDNN packed-layout arguments, as JAX hands them to cuDNN, tile every row's runs."""
  from jax._src.cudnn import fused_attention_stablehlo as fa
  seg = np.asarray([[1, 1, 2, 2, 2, 0, 0, 0], [3, 3, 3, 3, 3, 3, 3, 3], [0] * 8,
                    [1, 2, 2, 3, 4, 4, 0, 0]], np.int32)
  seqlens, offsets, n = A._runs_to_packed(jnp.asarray(seg), 5)
  np.testing.assert_array_equal(n, [3, 1, 1, 5])
  b, t, heads, dim = seg.shape[0], seg.shape[1], 2, 4
  q = jnp.zeros((b, t, heads, dim))
  flat_len, _, flat_off, _ = fa._fix_seqlen_offsets(seqlens, seqlens, offsets, offsets, q, q)
  flat_len, flat_off = np.ravel(flat_len), np.ravel(flat_off) // (heads * dim)
  runs = []  # the oracle: (start, length) of every run, rows laid end to end
  for r, row in enumerate(seg):
    edges = [0] + [i for i in range(1, t) if row[i] != row[i - 1]] + [t]
    runs += [(r * t + s, e - s) for s, e in zip(edges[:-1], edges[1:])]
  got = [(int(o), int(l)) for o, l in zip(flat_off, flat_len) if l > 0]
  assert got == runs


def test_auto_and_errors():
  q, k, v = _qkv(0, 1, 16, 2, 1, 8, jnp.float32)
  seg = jnp.ones((1, 16), jnp.int32)
  assert A.auto_impl(q, seg) == "xla"  # CPU
  _close(A.attend(q, k, v, seg), A.attend_reference(q, k, v, seg), 1e-4)
  with pytest.raises(ValueError):
    A.attend(q, k, v, seg, impl="nope")
  assert A.attend(jnp.concatenate([q, q[:, :, :1]], 2), k, v, seg).shape[2] == 3  # 3 heads, 1 kv
  with pytest.raises(ValueError):
    A.attend(q, jnp.concatenate([k, k, k], 2), v, seg)  # 2 heads, 3 kv heads


def test_custom_call_backend_runs_per_shard_under_a_mesh():
  """Under a (data 2, fsdp 2, tensor 2) mesh the Pallas kernel runs per shard (shard_map over
  rows and heads) and still equals the reference, forward and gradients."""
  import flax.linen as nn
  from tmdiff.configs import sharding
  mesh = jax.make_mesh((2, 2, 2), sharding.MESH_AXES, devices=jax.devices()[:8],
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  q, k, v = _qkv(3, 4, 64, 4, 2, 16, jnp.float32)
  seg = np.ones((4, 64), np.int32)
  seg[0, 20:], seg[1, 50:], seg[2, 10:30] = 2, 0, 3
  seg = jnp.asarray(seg)
  loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) * jnp.arange(16.0))
  pallas = lambda q, k, v: A.attend(q, k, v, seg, impl="pallas_gpu", block_q=16, block_k=16)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.rules_for("fsdp")):
    assert "shard_map" in str(jax.make_jaxpr(pallas)(q, k, v))
    out = jax.jit(pallas)(q, k, v)
    grads = jax.jit(jax.grad(loss(pallas), (0, 1, 2)))(q, k, v)
  reference = lambda q, k, v: A.attend_reference(q, k, v, seg)
  _close(out, reference(q, k, v), 2e-5)
  for got, want in zip(grads, jax.grad(loss(reference), (0, 1, 2))(q, k, v)):
    _close(got, want, 2e-5)
