"""Own Pallas GPU (Triton backend) flash attention with segment ids and a custom VJP.

Layout q [B, T, H, D], k/v [B, T, K, D]; grid (B, H, T/block). A query block skips every key
block whose segment range [min, max] (padding excluded) cannot meet its own, so packed rows
cost less than full attention. bf16 in, f32 accumulation. Backward: one kernel for dk/dv
(loop over query blocks) and one for dq (loop over key blocks); dk/dv are computed per query
head and summed over each GQA group outside the kernel.

Runs on CPU with `interpret=True` (tests).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from tmdiff.kernels._compat import SQ, pl, triton_params

_NEG = -1e30  # masked logit (finite: keeps every max/exp well defined)
_BIG = 2**30  # larger than any segment id


def _mm(a, b, ta=False, tb=False):
  """a @ b (optionally transposed) with float32 accumulation."""
  dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _seg_range(s):
  """(min, max) over non-padding segment ids of a block; empty -> (BIG, 0)."""
  return jnp.min(jnp.where(s > 0, s, _BIG)), jnp.max(s)


def _meet(a, b):
  return (a[0] <= b[1]) & (b[0] <= a[1])


def _mask(sq, sk):
  return (sq[:, None] == sk[None, :]) & (sq[:, None] > 0)


# ------------------------------------------------------------------------------------- forward
def _fwd_kernel(sq_ref, sk_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, bk, nk):
  q = q_ref[...]
  sq = sq_ref[...]
  bq, d = q.shape
  qr = _seg_range(sq)

  def body(j, carry):
    sl = pl.ds(j * bk, bk)
    sk = sk_ref[sl]

    def compute(c):
      acc, m, l = c
      s = _mm(q, k_ref[sl, :], tb=True) * scale
      mask = _mask(sq, sk)
      s = jnp.where(mask, s, _NEG)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
      alpha = jnp.exp(m - m_new)
      l = l * alpha + jnp.sum(p, axis=1)
      v = v_ref[sl, :]
      acc = acc * alpha[:, None] + _mm(p.astype(v.dtype), v)
      return acc, m_new, l

    return lax.cond(_meet(qr, _seg_range(sk)), compute, lambda c: c, carry)

  init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), _NEG, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = lax.fori_loop(0, nk, body, init)
  ok = l > 0
  o_ref[...] = jnp.where(ok[:, None], acc / jnp.where(ok, l, 1.0)[:, None], 0.0).astype(o_ref.dtype)
  # Rows with no key get a huge lse so that exp(s - lse) == 0 in the backward pass.
  lse_ref[...] = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), -_NEG)


def _fwd(q, k, v, seg, cfg):
  b, t, h, d = q.shape
  kh = k.shape[2]
  g = h // kh
  bq, bk = cfg["block_q"], cfg["block_k"]
  kern = functools.partial(_fwd_kernel, scale=1.0 / math.sqrt(d), bk=bk, nk=t // bk)
  out, lse = pl.pallas_call(
      kern,
      grid=(b, h, t // bq),
      in_specs=[
          pl.BlockSpec((SQ, bq), lambda bi, hi, i: (bi, i)),
          pl.BlockSpec((SQ, t), lambda bi, hi, i: (bi, 0)),
          pl.BlockSpec((SQ, bq, SQ, d), lambda bi, hi, i: (bi, i, hi, 0)),
          pl.BlockSpec((SQ, t, SQ, d), lambda bi, hi, i: (bi, 0, hi // g, 0)),
          pl.BlockSpec((SQ, t, SQ, d), lambda bi, hi, i: (bi, 0, hi // g, 0)),
      ],
      out_specs=[
          pl.BlockSpec((SQ, bq, SQ, d), lambda bi, hi, i: (bi, i, hi, 0)),
          pl.BlockSpec((SQ, SQ, bq), lambda bi, hi, i: (bi, hi, i)),
      ],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
      compiler_params=triton_params(cfg["warps"], cfg["stages"]),
      interpret=cfg["interpret"],
      name="tmdiff_flash_fwd",
  )(seg, seg, q, k, v)
  return out, lse


# ------------------------------------------------------------------------------------ backward
def _dkv_kernel(sk_ref, sq_ref, k_ref, v_ref, q_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref,
                *, scale, bq, nq):
  k = k_ref[...]
  v = v_ref[...]
  sk = sk_ref[...]
  bk, d = k.shape
  kr = _seg_range(sk)

  def body(i, carry):
    sl = pl.ds(i * bq, bq)
    sq = sq_ref[sl]

    def compute(c):
      dk, dv = c
      q = q_ref[sl, :]
      do = do_ref[sl, :]
      s = _mm(q, k, tb=True) * scale
      mask = _mask(sq, sk)
      p = jnp.where(mask, jnp.exp(s - lse_ref[sl][:, None]), 0.0)
      dv = dv + _mm(p.astype(do.dtype), do, ta=True)
      dp = _mm(do, v, tb=True)
      ds = p * (dp - dl_ref[sl][:, None])
      dk = dk + _mm(ds.astype(q.dtype), q, ta=True)
      return dk, dv

    return lax.cond(_meet(kr, _seg_range(sq)), compute, lambda c: c, carry)

  z = jnp.zeros((bk, d), jnp.float32)
  dk, dv = lax.fori_loop(0, nq, body, (z, z))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(sq_ref, sk_ref, q_ref, do_ref, lse_ref, dl_ref, k_ref, v_ref, dq_ref,
               *, scale, bk, nk):
  q = q_ref[...]
  do = do_ref[...]
  sq = sq_ref[...]
  lse = lse_ref[...]
  dl = dl_ref[...]
  bq, d = q.shape
  qr = _seg_range(sq)

  def body(j, dq):
    sl = pl.ds(j * bk, bk)
    sk = sk_ref[sl]

    def compute(dq):
      k = k_ref[sl, :]
      s = _mm(q, k, tb=True) * scale
      p = jnp.where(_mask(sq, sk), jnp.exp(s - lse[:, None]), 0.0)
      dp = _mm(do, v_ref[sl, :], tb=True)
      ds = p * (dp - dl[:, None])
      return dq + _mm(ds.astype(k.dtype), k)

    return lax.cond(_meet(qr, _seg_range(sk)), compute, lambda c: c, dq)

  dq = lax.fori_loop(0, nk, body, jnp.zeros((bq, d), jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _bwd(q, k, v, seg, out, lse, do, cfg):
  b, t, h, d = q.shape
  kh = k.shape[2]
  g = h // kh
  scale = 1.0 / math.sqrt(d)
  # delta_i = sum_d o_i * do_i  ([B, H, T], float32)
  delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))
  bq, bk = cfg["bwd_block_q"], cfg["bwd_block_k"]
  params = triton_params(cfg["bwd_warps"], cfg["bwd_stages"])
  row = lambda n: pl.BlockSpec((SQ, SQ, n), lambda bi, hi, i: (bi, hi, 0 if n == t else i))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, bq=bq, nq=t // bq),
      grid=(b, h, t // bk),
      in_specs=[
          pl.BlockSpec((SQ, bk), lambda bi, hi, j: (bi, j)),
          pl.BlockSpec((SQ, t), lambda bi, hi, j: (bi, 0)),
          pl.BlockSpec((SQ, bk, SQ, d), lambda bi, hi, j: (bi, j, hi // g, 0)),
          pl.BlockSpec((SQ, bk, SQ, d), lambda bi, hi, j: (bi, j, hi // g, 0)),
          pl.BlockSpec((SQ, t, SQ, d), lambda bi, hi, j: (bi, 0, hi, 0)),
          pl.BlockSpec((SQ, t, SQ, d), lambda bi, hi, j: (bi, 0, hi, 0)),
          row(t), row(t),
      ],
      out_specs=[pl.BlockSpec((SQ, bk, SQ, d), lambda bi, hi, j: (bi, j, hi, 0))] * 2,
      out_shape=[jax.ShapeDtypeStruct(q.shape, k.dtype)] * 2,
      compiler_params=params, interpret=cfg["interpret"], name="tmdiff_flash_dkv",
  )(seg, seg, k, v, q, do, lse, delta)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, bk=bk, nk=t // bk),
      grid=(b, h, t // bq),
      in_specs=[
          pl.BlockSpec((SQ, bq), lambda bi, hi, i: (bi, i)),
          pl.BlockSpec((SQ, t), lambda bi, hi, i: (bi, 0)),
          pl.BlockSpec((SQ, bq, SQ, d), lambda bi, hi, i: (bi, i, hi, 0)),
          pl.BlockSpec((SQ, bq, SQ, d), lambda bi, hi, i: (bi, i, hi, 0)),
          row(bq), row(bq),
          pl.BlockSpec((SQ, t, SQ, d), lambda bi, hi, i: (bi, 0, hi // g, 0)),
          pl.BlockSpec((SQ, t, SQ, d), lambda bi, hi, i: (bi, 0, hi // g, 0)),
      ],
      out_specs=pl.BlockSpec((SQ, bq, SQ, d), lambda bi, hi, i: (bi, i, hi, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params, interpret=cfg["interpret"], name="tmdiff_flash_dq",
  )(seg, seg, q, do, lse, delta, k, v)
  if g > 1:  # sum the per-query-head dk/dv over each group of query heads
    dk = dk.astype(jnp.float32).reshape(b, t, kh, g, d).sum(3).astype(k.dtype)
    dv = dv.astype(jnp.float32).reshape(b, t, kh, g, d).sum(3).astype(v.dtype)
  return dq, dk, dv


# ------------------------------------------------------------------------------------- custom vjp
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, seg, cfg_items):
  return _fwd(q, k, v, seg, dict(cfg_items))[0]


def _flash_fwd(q, k, v, seg, cfg_items):
  out, lse = _fwd(q, k, v, seg, dict(cfg_items))
  return out, (q, k, v, seg, out, lse)


def _flash_bwd(cfg_items, res, do):
  q, k, v, seg, out, lse = res
  dq, dk, dv = _bwd(q, k, v, seg, out, lse, do, dict(cfg_items))
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)

DEFAULT_CFG = dict(block_q=64, block_k=64, warps=4, stages=3,
                   bwd_block_q=64, bwd_block_k=64, bwd_warps=4, bwd_stages=2, interpret=False)


def _fit(block, t):
  block = min(block, t)
  while t % block:
    block //= 2
  return block


def flash_attention(q, k, v, segment_ids, **overrides):
  """Pallas GPU flash attention; kwargs override DEFAULT_CFG (block sizes, warps, interpret)."""
  cfg = dict(DEFAULT_CFG, **overrides)
  t = q.shape[1]
  if t % 16:  # the kernel's tiles need T % 16 == 0: pad with padding tokens (segment 0)
    extra = -t % 16
    widen = lambda x: jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))
    return flash_attention(widen(q), widen(k), widen(v), widen(segment_ids), **overrides)[:, :t]
  for key in ("block_q", "block_k", "bwd_block_q", "bwd_block_k"):
    cfg[key] = _fit(cfg[key], t)
  seg = segment_ids.astype(jnp.int32)
  return _flash(q, k, v, seg, tuple(sorted(cfg.items())))
