"""One attention API for the model: bidirectional attention inside packed documents.

`attend(q, k, v, segment_ids)` with q [B, T, H, D], k/v [B, T, K, D] (K divides H: grouped
query heads), segment_ids [B, T] (0 = padding). A token attends to every token of its own
segment; padding rows return zeros, never NaN.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tmdiff.kernels import _compat


def segment_mask(segment_ids: jax.Array) -> jax.Array:
  """[B, 1, T, T] True where query and key share a non-padding segment."""
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  valid = (segment_ids > 0)[:, :, None]
  return (same & valid)[:, None]


def attend_reference(q, k, v, segment_ids):
  """The oracle: plain jnp in float32."""
  b, t, h, d = q.shape
  groups = h // k.shape[2]
  k = jnp.repeat(k, groups, axis=2)
  v = jnp.repeat(v, groups, axis=2)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
  logits = logits / jnp.sqrt(jnp.float32(d))
  mask = segment_mask(segment_ids)
  logits = jnp.where(mask, logits, -jnp.inf)
  row_has_key = jnp.any(mask, axis=-1, keepdims=True)
  probs = jax.nn.softmax(jnp.where(row_has_key, logits, 0.0), axis=-1)
  probs = jnp.where(mask, probs, 0.0)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32))
  return out.astype(q.dtype)


def attend_xla(q, k, v, segment_ids):
  """XLA fused path through jax.nn.dot_product_attention; padding rows zeroed."""
  mask = segment_mask(segment_ids)
  out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
  return jnp.where((segment_ids > 0)[:, :, None, None], out, 0).astype(q.dtype)


# ------------------------------------------------------------------------------------------ cuDNN
def _runs_to_packed(segment_ids, max_segments):
  """Contiguous runs of equal ids -> cuDNN packed layout (seqlens [B, M], offsets [B, M+1]).

  JAX's convention: offsets hold each run's start and -1 after the last run, with no end
  marker (JAX flattens the rows and appends the end itself; an end marker would shift every
  later row's runs by one and leave tokens no run covers, with garbage gradients). Padding
  runs count as runs (they attend among themselves and are zeroed after), so no query row is
  empty. Returns (seqlens, offsets, n_runs).
  """
  b, t = segment_ids.shape
  start = jnp.concatenate(
      [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  run = jnp.cumsum(start, axis=1) - 1
  n_runs = run[:, -1] + 1
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  idx = jnp.where(start, run, max_segments + 1)  # non-starts go out of range and are dropped
  offsets = jnp.full((b, max_segments + 1), -1, jnp.int32)
  offsets = offsets.at[jnp.arange(b)[:, None], idx].set(pos, mode="drop")
  ends = jnp.where(jnp.arange(max_segments + 1) == n_runs[:, None], t, offsets)
  j = jnp.arange(max_segments)
  seqlens = jnp.where(j < n_runs[:, None], ends[:, 1:] - ends[:, :-1], -1)
  return seqlens.astype(jnp.int32), offsets, n_runs


CUDNN_MAX_SEGMENTS = 16


def attend_cudnn(q, k, v, segment_ids, *, max_segments: int | None = None):
  """cuDNN flash attention (GPU, sm90 for the packed layout).

  jax.nn.dot_product_attention takes no segment ids, so this calls cuDNN's packed layout
  (per-row segment offsets/lengths) from jax._src.cudnn; segments must be contiguous runs.
  A row with more than `max_segments` runs falls back to our flash kernel ('pallas_gpu': the
  fallback branch is planned in memory too, so it must not materialise [T, T] scores); a JAX
  without that API falls back to 'xla'.
  """
  m = max_segments or CUDNN_MAX_SEGMENTS
  if _compat.cudnn_fa is None:
    return attend_xla(q, k, v, segment_ids)
  seqlens, offsets, n_runs = _runs_to_packed(segment_ids, m)
  scale = 1.0 / float(q.shape[-1]) ** 0.5

  def packed(q, k, v):
    return _compat.cudnn_fa.dot_product_attention(
        q, k, v, q_seqlen=seqlens, kv_seqlen=seqlens, q_offsets=offsets, kv_offsets=offsets,
        scale=scale, mask_type=_compat.cudnn_fa.MaskType.PADDING, qkv_layout="BTNH")

  out = jax.lax.cond(jnp.all(n_runs <= m), packed,
                     lambda q, k, v: attend_pallas_gpu(q, k, v, segment_ids), q, k, v)
  return jnp.where((segment_ids > 0)[:, :, None, None], out, 0).astype(q.dtype)


# ------------------------------------------------------------------------------- Pallas GPU (own)
def attend_pallas_gpu(q, k, v, segment_ids, **cfg):
  """Own Pallas flash attention (Triton backend); interpret mode off-GPU (CPU tests)."""
  from tmdiff.kernels import flash_gpu
  cfg.setdefault("interpret", _compat.platform() != "gpu")
  return flash_gpu.flash_attention(q, k, v, segment_ids, **cfg)


# ------------------------------------------------------------------------- Pallas TPU (splash)
def _splash_blocks(t):
  bq = min(512, t)
  bkv = min(512, t)
  return _compat.splash.BlockSizes(
      block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
      block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)


def _in_tpu_interpret(fn):
  """fn traced under TPU interpret mode, its backward too (recomputed inside the mode)."""
  ctx = _compat.pltpu.force_tpu_interpret_mode

  @jax.custom_vjp
  def f(*args):
    with ctx():
      return fn(*args)

  def fwd(*args):
    return f(*args), args

  def bwd(args, g):
    with ctx():
      return jax.vjp(fn, *args)[1](g)

  f.defvjp(fwd, bwd)
  return f


def attend_pallas_tpu(q, k, v, segment_ids, *, interpret: bool | None = None):
  """JAX's splash attention (Pallas TPU) with segment ids, GQA via its MQA kernel per kv head.

  Padding (id 0) attends to padding inside the kernel (no empty rows) and is zeroed after.
  Off-TPU it runs in TPU interpret mode. T must be a multiple of 128.
  """
  sp, spm = _compat.splash, _compat.splash_mask
  if sp is None:
    raise RuntimeError("splash attention unavailable in this JAX")
  b, t, h, d = q.shape
  kh = k.shape[2]
  g = h // kh
  if t % 128:
    raise ValueError(f"pallas_tpu attention needs T % 128 == 0, got {t}")
  if interpret is None:
    interpret = _compat.platform() != "tpu"
  mask = spm.MultiHeadMask([spm.FullMask((t, t))] * g)
  kernel = sp.make_splash_mqa_single_device(mask, block_sizes=_splash_blocks(t))
  qs = (q * (1.0 / float(d) ** 0.5)).astype(q.dtype)
  qs = qs.reshape(b, t, kh, g, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, D]
  ks = k.transpose(0, 2, 1, 3)  # [B, K, T, D]
  vs = v.transpose(0, 2, 1, 3)
  seg = segment_ids.astype(jnp.int32)

  def one(qh, kh_, vh, s):
    return kernel(qh, kh_, vh, segment_ids=_compat.splash.SegmentIds(s, s))

  if interpret:
    # vmap adds grid dimensions that TPU interpret mode rejects: map sequentially instead.
    flat = lambda x: x.reshape((b * kh,) + x.shape[2:])
    segs = jnp.repeat(seg, kh, axis=0)
    mapped = lambda q_, k_, v_: jax.lax.map(lambda a: one(*a), (q_, k_, v_, segs))
    out = _in_tpu_interpret(mapped)(flat(qs), flat(ks), flat(vs))
    out = out.reshape((b, kh) + out.shape[1:])
  else:
    out = jax.vmap(jax.vmap(one, in_axes=(0, 0, 0, None)))(qs, ks, vs, seg)
  out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
  return jnp.where((segment_ids > 0)[:, :, None, None], out, 0).astype(q.dtype)


_BACKENDS = {"reference": attend_reference, "xla": attend_xla, "cudnn": attend_cudnn,
             "pallas_gpu": attend_pallas_gpu, "pallas_tpu": attend_pallas_tpu}
IMPLS = ("auto",) + tuple(_BACKENDS)
# Primitives of the kernels' forward passes, whose outputs a remat policy may keep (the
# backward then reuses them instead of running the forward again).
FORWARD_PRIMITIVES = ("dot_product_attention_fwd", "dot_product_attention_fwd_wrapper",
                      "pallas_call")

# Per-platform default. cuDNN is 2.5-3.4x faster than our Pallas kernel on H100/H200
# (docs/benchmarks.md). Its packed path once went non-finite in training: the segment offsets
# carried an end marker JAX does not expect (fixed; benchmarks/attention_check.py checks ragged
# packed rows on the device).
AUTO = {"gpu": "cudnn", "tpu": "pallas_tpu", "cpu": "xla"}


def auto_impl(q, segment_ids) -> str:
  plat = _compat.platform()
  impl = AUTO.get(plat, "xla")
  if impl == "cudnn" and (q.dtype not in (jnp.bfloat16, jnp.float16) or q.shape[-1] > 128):
    impl = "pallas_gpu"
  if impl == "pallas_tpu" and q.shape[1] % 128:
    impl = "xla"
  return impl


# Backends that are custom calls: XLA cannot partition them, so they run per device shard.
_CUSTOM_CALLS = ("cudnn", "pallas_gpu", "pallas_tpu")


def _mesh_spec(mesh, shape, logical):
  """PartitionSpec of `logical` axes under the active rules, dropping axes that don't divide."""
  spec = nn.logical_to_mesh_axes(logical)
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = 1
    for name in names:
      size *= mesh.shape[name]
    out.append(axes if names and dim % size == 0 else None)
  return jax.sharding.PartitionSpec(*out)


def _per_shard(fn, q, k, v, segment_ids):
  """fn on each device's rows and heads (shard_map over the mesh set with jax.set_mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(q, k, v, segment_ids)
  q_spec = _mesh_spec(mesh, q.shape, ("batch", "length", "heads", "head_dim"))
  kv_spec = _mesh_spec(mesh, k.shape, ("batch", "length", "kv_heads", "head_dim"))
  if q_spec[2] != kv_spec[2]:  # heads and kv heads must split alike to keep the groups
    q_spec = kv_spec = jax.sharding.PartitionSpec(q_spec[0], None, None, None)
  if q_spec[0] != kv_spec[0]:
    q_spec = kv_spec = jax.sharding.PartitionSpec(None, None, q_spec[2], None)
  seg_spec = jax.sharding.PartitionSpec(q_spec[0], None)
  return jax.shard_map(fn, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                       check_vma=False)(q, k, v, segment_ids)


def attend(q, k, v, segment_ids, *, impl: str = "auto", **options):
  """Bidirectional attention inside segments. `options` go to the backend (e.g. block sizes).

  Under a device mesh (`jax.set_mesh` with logical axis rules), custom-call backends run on
  each device's shard of the batch and heads.
  """
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"query heads {q.shape[2]} not a multiple of kv heads {k.shape[2]}")
  if impl == "auto":
    impl = auto_impl(q, segment_ids)
  if impl not in _BACKENDS:
    raise ValueError(f"unknown attention impl {impl!r}; choose from {sorted(_BACKENDS)} or 'auto'")
  fn = lambda q, k, v, s: _BACKENDS[impl](q, k, v, s, **options)
  return _per_shard(fn, q, k, v, segment_ids) if impl in _CUSTOM_CALLS else fn(q, k, v, segment_ids)
