"""Fused masked-position cross-entropy: hidden [N, D] @ w_unembed [D, V] -> weighted NLL [N].

`masked_cross_entropy(hidden, w_unembed, targets, weights, *, vocab_range=None, impl, block_v,
reduction)` where hidden holds the final hidden states of the gathered masked positions.
Returns weights * (logsumexp(logits) - logits[target]) per row (reduction='none') or its sum.
`vocab_range` [N, 2] int32 optionally restricts row i's softmax to columns [start, stop).

Backends:
  'reference'  materialises [N, V] float32 logits (the oracle).
  'blockwise'  lax.fori_loop over vocabulary tiles with an online logsumexp; custom VJP that
               recomputes each tile's logits in the backward pass (dh, dW, d weights). Never holds
               more than [N, block_v] logits. Any platform.
  'chunked'    reduction='sum' only: one pass over row chunks of block_n rows with the full
               [block_n, V] logits, computing the loss and both gradients in the forward pass
               (3 matmuls instead of 4; the backward pass only rescales). Any platform.
  'pallas'     Pallas GPU (Triton) forward kernel: logits tile by tile in registers/SMEM, online
               logsumexp and target logit fused; backward as in 'blockwise' (XLA matmuls per tile).
               interpret=True off-GPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from tmdiff.kernels import _compat

pl = _compat.pl
_NEG = -1e30
IMPLS = ("auto", "reference", "blockwise", "chunked", "pallas")
AUTO = {"gpu": "blockwise", "tpu": "blockwise", "cpu": "blockwise"}


def _ranges(vocab_range, n, v):
  if vocab_range is None:
    return jnp.zeros((n,), jnp.int32), jnp.full((n,), v, jnp.int32)
  vr = vocab_range.astype(jnp.int32)
  return vr[:, 0], jnp.minimum(vr[:, 1], v)


def cross_entropy_reference(hidden, w_unembed, targets, weights, vocab_range=None):
  """Materialised float32 logits."""
  n, v = hidden.shape[0], w_unembed.shape[1]
  logits = jnp.dot(hidden, w_unembed, preferred_element_type=jnp.float32)
  lo, hi = _ranges(vocab_range, n, v)
  col = jnp.arange(v)[None]
  logits = jnp.where((col >= lo[:, None]) & (col < hi[:, None]), logits, -jnp.inf)
  lse = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, targets[:, None].astype(jnp.int32), axis=-1)[:, 0]
  return weights.astype(jnp.float32) * (lse - tgt)


# ------------------------------------------------------------------------------------- blockwise
def _tile(w, j, bv):
  return lax.dynamic_slice_in_dim(w, j * bv, bv, axis=1)


def _tile_logits(h, wj, j, bv, lo, hi):
  z = jnp.dot(h, wj, preferred_element_type=jnp.float32)
  col = j * bv + jnp.arange(bv, dtype=jnp.int32)[None]
  ok = (col >= lo[:, None]) & (col < hi[:, None])
  return jnp.where(ok, z, _NEG), ok, col


def _online_update(m, l, tgt, z, ok, col, targets):
  """One vocabulary tile into the running max m, scaled sum l and target logit tgt."""
  m_new = jnp.maximum(m, jnp.max(z, axis=1))
  l = l * jnp.exp(m - m_new) + jnp.sum(jnp.where(ok, jnp.exp(z - m_new[:, None]), 0.0), axis=1)
  tgt = tgt + jnp.sum(jnp.where(col == targets[:, None], z, 0.0), axis=1)
  return m_new, l, tgt


def _blockwise_stats(h, w, targets, lo, hi, bv):
  """Online logsumexp and target logit over vocabulary tiles: (lse [N], target logit [N])."""
  n = h.shape[0]

  def body(j, c):
    m, l, tgt = c
    z, ok, col = _tile_logits(h, _tile(w, j, bv), j, bv, lo, hi)
    return _online_update(m, l, tgt, z, ok, col, targets)

  init = (jnp.full((n,), _NEG, jnp.float32), jnp.zeros((n,), jnp.float32),
          jnp.zeros((n,), jnp.float32))
  m, l, tgt = lax.fori_loop(0, w.shape[1] // bv, body, init)
  lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), 0.0)
  return lse, tgt


def _blockwise_bwd(h, w, targets, lo, hi, lse, coef, bv):
  """Gradients (dh, dW) of sum_i coef_i * (lse_i - z_i[target_i]), tile by tile."""

  def body(j, c):
    dh, dw = c
    wj = _tile(w, j, bv)
    z, ok, col = _tile_logits(h, wj, j, bv, lo, hi)
    p = jnp.where(ok, jnp.exp(z - lse[:, None]), 0.0)
    dz = (coef[:, None] * (p - (col == targets[:, None]))).astype(h.dtype)
    dh = dh + jnp.dot(dz, wj.T, preferred_element_type=jnp.float32)
    dwj = jnp.dot(h.T, dz, preferred_element_type=jnp.float32).astype(w.dtype)
    return dh, lax.dynamic_update_slice_in_dim(dw, dwj, j * bv, axis=1)

  init = (jnp.zeros(h.shape, jnp.float32), jnp.zeros(w.shape, w.dtype))
  dh, dw = lax.fori_loop(0, w.shape[1] // bv, body, init)
  return dh.astype(h.dtype), dw


# --------------------------------------------------------------------------------------- chunked
def _chunked_fwd_grads(h, w, targets, weights, lo, hi, cn):
  """Loss sum and its gradients in one pass over row chunks (3 matmuls, [cn, V] logits live).

  Needs a scalar loss (reduction='sum'): dW sums over rows, so it cannot be rescaled per row.
  """
  n, d = h.shape
  v = w.shape[1]
  col = jnp.arange(v, dtype=jnp.int32)[None]
  wf = weights.astype(jnp.float32)

  def body(i, c):
    loss, dh, dw, nll_all = c
    hc = lax.dynamic_slice_in_dim(h, i * cn, cn)
    tc = lax.dynamic_slice_in_dim(targets, i * cn, cn)
    wc = lax.dynamic_slice_in_dim(wf, i * cn, cn)
    ok = (col >= lax.dynamic_slice_in_dim(lo, i * cn, cn)[:, None]) & (
        col < lax.dynamic_slice_in_dim(hi, i * cn, cn)[:, None])
    z = jnp.where(ok, jnp.dot(hc, w, preferred_element_type=jnp.float32), _NEG)
    m = jnp.max(z, axis=1, keepdims=True)
    e = jnp.where(ok, jnp.exp(z - m), 0.0)
    l = jnp.sum(e, axis=1, keepdims=True)
    hit = col == tc[:, None]
    nll = (m + jnp.log(l))[:, 0] - jnp.sum(jnp.where(hit, z, 0.0), axis=1)
    dz = (wc[:, None] * (e / l - hit)).astype(h.dtype)
    dhc = jnp.dot(dz, w.T, preferred_element_type=jnp.float32).astype(h.dtype)
    dw = dw + jnp.dot(hc.T, dz, preferred_element_type=jnp.float32)
    return (loss + jnp.sum(wc * nll), lax.dynamic_update_slice_in_dim(dh, dhc, i * cn, 0), dw,
            lax.dynamic_update_slice_in_dim(nll_all, nll, i * cn, 0))

  init = (jnp.float32(0), jnp.zeros_like(h), jnp.zeros((d, v), jnp.float32),
          jnp.zeros((n,), jnp.float32))
  loss, dh, dw, nll = lax.fori_loop(0, n // cn, body, init)
  return loss, dh, dw.astype(w.dtype), nll


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _chunked(h, w, targets, weights, rng, cn):
  return _chunked_fwd_grads(h, w, targets, weights, *rng, cn)[0]


def _chunked_fwd(h, w, targets, weights, rng, cn):
  loss, dh, dw, nll = _chunked_fwd_grads(h, w, targets, weights, *rng, cn)
  return loss, (dh, dw, nll, weights)


def _chunked_bwd(cn, res, g):
  dh, dw, nll, weights = res
  return ((g * dh).astype(dh.dtype), (g * dw).astype(dw.dtype), None,
          (g * nll).astype(weights.dtype), (None, None))


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


# ------------------------------------------------------------------------- Pallas forward (GPU)
def _pallas_fwd_kernel(h_ref, w_ref, t_ref, lo_ref, hi_ref, lse_ref, tgt_ref, *, bv, bd, nv, nd):
  bn = h_ref.shape[0]
  t = t_ref[...]
  lo = lo_ref[...]
  hi = hi_ref[...]

  def vbody(j, c):
    m, l, tgt = c
    vs = pl.ds(j * bv, bv)

    def dbody(i, z):
      ds = pl.ds(i * bd, bd)
      return z + lax.dot_general(h_ref[:, ds], w_ref[ds, vs], (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)

    z = lax.fori_loop(0, nd, dbody, jnp.zeros((bn, bv), jnp.float32))
    col = j * bv + lax.broadcasted_iota(jnp.int32, (bn, bv), 1)
    ok = (col >= lo[:, None]) & (col < hi[:, None])
    z = jnp.where(ok, z, _NEG)
    return _online_update(m, l, tgt, z, ok, col, t)

  init = (jnp.full((bn,), _NEG, jnp.float32), jnp.zeros((bn,), jnp.float32),
          jnp.zeros((bn,), jnp.float32))
  m, l, tgt = lax.fori_loop(0, nv, vbody, init)
  ok = l > 0
  lse_ref[...] = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), 0.0)
  tgt_ref[...] = tgt


def _pallas_stats(h, w, targets, lo, hi, bv, cfg):
  n, d = h.shape
  bn, bd = min(cfg["tile_n"], n), min(cfg["tile_d"], d)
  if n % bn or d % bd:
    raise ValueError(f"pallas cross-entropy needs N % {bn} == 0 and D % {bd} == 0")
  kern = functools.partial(_pallas_fwd_kernel, bv=bv, bd=bd, nv=w.shape[1] // bv, nd=d // bd)
  row = pl.BlockSpec((bn,), lambda i: (i,))
  return pl.pallas_call(
      kern, grid=(n // bn,),
      in_specs=[pl.BlockSpec((bn, d), lambda i: (i, 0)),
                pl.BlockSpec(w.shape, lambda i: (0, 0)), row, row, row],
      out_specs=[row, row],
      out_shape=[jax.ShapeDtypeStruct((n,), jnp.float32)] * 2,
      compiler_params=_compat.triton_params(cfg["warps"], cfg["stages"]),
      interpret=cfg["interpret"], name="tmdiff_fused_ce_fwd",
  )(h, w, targets, lo, hi)



# ------------------------------------------------------------------------------------ custom vjp
@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _fused(h, w, targets, weights, rng, bv, use_pallas, cfg_items):
  return _fused_fwd(h, w, targets, weights, rng, bv, use_pallas, cfg_items)[0]


def _fused_fwd(h, w, targets, weights, rng, bv, use_pallas, cfg_items):
  lo, hi = rng
  if use_pallas:
    cfg = dict(cfg_items)
    lse, tgt = _pallas_stats(h, w, targets, lo, hi, cfg["tile_v"], cfg)
  else:
    lse, tgt = _blockwise_stats(h, w, targets, lo, hi, bv)
  nll = lse - tgt
  return weights.astype(jnp.float32) * nll, (h, w, targets, weights, lo, hi, lse, nll)


def _fused_bwd(bv, use_pallas, cfg_items, res, g):
  h, w, targets, weights, lo, hi, lse, nll = res
  coef = g * weights.astype(jnp.float32)
  dh, dw = _blockwise_bwd(h, w, targets, lo, hi, lse, coef, bv)
  dweights = (g * nll).astype(weights.dtype)
  return dh, dw, None, dweights, (None, None)


_fused.defvjp(_fused_fwd, _fused_bwd)

PALLAS_CFG = dict(tile_v=128, tile_n=64, tile_d=64, warps=4, stages=3, interpret=None)


def masked_cross_entropy(hidden, w_unembed, targets, weights, *, vocab_range=None,
                         impl: str = "auto", block_v: int = 8192, reduction: str = "none",
                         block_n: int = 1024, **pallas_cfg):
  """Weighted NLL of `targets` under softmax(hidden @ w_unembed), without [N, V] logits.

  hidden [N, D], w_unembed [D, V], targets [N] int, weights [N] float (0 drops a row),
  vocab_range optional [N, 2] int32 [start, stop). Returns float32 [N] ('none') or scalar ('sum').
  """
  n, v = hidden.shape[0], w_unembed.shape[1]
  if impl == "auto":  # chunked is fastest when the loss is a sum (docs/benchmarks.md)
    impl = AUTO.get(_compat.platform(), "blockwise")
    if reduction == "sum" and n % min(block_n, n) == 0:
      impl = "chunked"
  targets = targets.astype(jnp.int32)
  if impl == "reference":
    out = cross_entropy_reference(hidden, w_unembed, targets, weights, vocab_range)
  elif impl == "chunked":
    if reduction != "sum":
      raise ValueError("impl='chunked' computes gradients in the forward pass: reduction='sum' only")
    cn = min(block_n, n)
    if n % cn:
      raise ValueError(f"impl='chunked' needs N % block_n == 0, got N={n}, block_n={cn}")
    return _chunked(hidden, w_unembed, targets, weights, _ranges(vocab_range, n, v), cn)
  elif impl in ("blockwise", "pallas"):
    cfg = dict(PALLAS_CFG, **pallas_cfg)
    bv = min(block_v, v)
    if impl == "pallas":
      bv = min(block_v, -(-v // cfg["tile_v"]) * cfg["tile_v"])
    if impl == "pallas" and bv % cfg["tile_v"]:
      raise ValueError(f"block_v {bv} must be a multiple of the kernel tile {cfg['tile_v']}")
    vp = -(-v // bv) * bv
    w = w_unembed if vp == v else jnp.pad(w_unembed, ((0, 0), (0, vp - v)))
    rng = _ranges(vocab_range, n, v)  # stop <= V also masks the padded columns
    if cfg["interpret"] is None:
      cfg["interpret"] = _compat.platform() != "gpu"
    out = _fused(hidden, w, targets, weights, rng, bv, impl == "pallas",
                 tuple(sorted(cfg.items())))
  else:
    raise ValueError(f"unknown cross-entropy impl {impl!r}; choose from {IMPLS}")
  if reduction == "sum":
    return jnp.sum(out)
  if reduction != "none":
    raise ValueError(f"reduction must be 'none' or 'sum', got {reduction!r}")
  return out
