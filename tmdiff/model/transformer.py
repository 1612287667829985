"""The bidirectional transformer over the unified token stream (Flax NNX).

Pre-norm RMSNorm, QK-norm, RoPE, SwiGLU, CompleteP scaling, bf16 compute with fp32 params.
Every parameter carries `logical_axes` (mapped to mesh axes by tmdiff.configs.sharding) and
`param_class` (CompleteP's init / learning-rate class); every large activation is constrained
by logical axis names.

With `model.scan_layers` the blocks' parameters are stacked on a leading "layers" axis and the
blocks run under `jax.lax.scan`, so compile time does not grow with depth. The parameter trees of
the two layouts differ only under "blocks": {0: block, 1: block, ...} unrolled, one block of
[n_layers, ...] arrays scanned; `stack_layers` / `unstack_layers` convert any tree holding them.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from tmdiff.data import vocab as vocab_lib
from tmdiff.kernels import attention as attention_lib
from tmdiff.model import completep as cp_lib

NUM_MODALITIES = len(vocab_lib.MODALITIES)


def _dots_and_attention(prim, *args, **params) -> bool:
  return (prim.name in attention_lib.FORWARD_PRIMITIVES or
          jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params))


# model.remat: what the backward pass keeps of each block's forward. none: everything; block:
# only the block's input (the whole block is recomputed); dots: the outputs of the weight
# matmuls and of the attention kernel (norms, RoPE and SwiGLU's elementwise work are recomputed).
REMAT_POLICIES = {"none": None, "block": jax.checkpoint_policies.nothing_saveable,
                  "dots": _dots_and_attention}
REMAT = tuple(REMAT_POLICIES)
LAYER_AXIS = "layers"


def _param(rngs, shape, std, axes, param_class, dtype):
  value = std * jax.random.truncated_normal(rngs.params(), -3.0, 3.0, shape, jnp.float32)
  return nnx.Param(value.astype(dtype), logical_axes=axes, param_class=param_class)


def _constrain(x, axes):
  return nn.with_logical_constraint(x, axes)


class RMSNorm(nnx.Module):

  def __init__(self, dim, axis_name, *, eps, param_dtype):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=(axis_name,),
                           param_class=cp_lib.NORM)

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * inv * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope(x, positions, theta):
  """Rotary embedding over the last axis of x [B, T, H, D] at integer positions [B, T]."""
  d = x.shape[-1]
  freqs = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) / (d // 2))
  angles = positions[..., None].astype(jnp.float32) * freqs  # [B, T, D/2]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Attention(nnx.Module):

  def __init__(self, cfg, cp: cp_lib.CompleteP, *, rngs):
    d, h, k, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    pd = jnp.dtype(cfg.param_dtype)
    std_in = cp.init_std_for(cp_lib.HIDDEN)
    std_out = cp.init_std_for(cp_lib.HIDDEN, fan_in_mult=h * hd / d)
    self.wq = _param(rngs, (d, h, hd), std_in, ("embed", "heads", "head_dim"), cp_lib.HIDDEN, pd)
    self.wk = _param(rngs, (d, k, hd), std_in, ("embed", "kv_heads", "head_dim"), cp_lib.HIDDEN, pd)
    self.wv = _param(rngs, (d, k, hd), std_in, ("embed", "kv_heads", "head_dim"), cp_lib.HIDDEN, pd)
    self.wo = _param(rngs, (h, hd, d), std_out, ("heads", "head_dim", "embed"), cp_lib.HIDDEN, pd)
    self.q_norm = RMSNorm(hd, "head_dim", eps=cfg.norm_eps, param_dtype=pd)
    self.k_norm = RMSNorm(hd, "head_dim", eps=cfg.norm_eps, param_dtype=pd)
    self.rope_theta = cfg.rope_theta
    self.impl = cfg.attention_impl
    self.dtype = jnp.dtype(cfg.dtype)

  def __call__(self, x, positions, segment_ids):
    dt = self.dtype
    q = jnp.einsum("btd,dhk->bthk", x, self.wq[...].astype(dt))
    k = jnp.einsum("btd,dhk->bthk", x, self.wk[...].astype(dt))
    v = jnp.einsum("btd,dhk->bthk", x, self.wv[...].astype(dt))
    q = rope(self.q_norm(q), positions, self.rope_theta)
    k = rope(self.k_norm(k), positions, self.rope_theta)
    q = _constrain(q, ("batch", "length", "heads", "head_dim"))
    k = _constrain(k, ("batch", "length", "kv_heads", "head_dim"))
    v = _constrain(v, ("batch", "length", "kv_heads", "head_dim"))
    o = attention_lib.attend(q, k, v, segment_ids, impl=self.impl)
    out = jnp.einsum("bthk,hkd->btd", o, self.wo[...].astype(dt))
    return _constrain(out, ("batch", "length", "embed"))


class SwiGLU(nnx.Module):

  def __init__(self, cfg, cp: cp_lib.CompleteP, *, rngs):
    d, f = cfg.d_model, cfg.d_ff
    pd = jnp.dtype(cfg.param_dtype)
    std_in = cp.init_std_for(cp_lib.HIDDEN)
    std_out = cp.init_std_for(cp_lib.HIDDEN, fan_in_mult=f / d)
    self.w_gate = _param(rngs, (d, f), std_in, ("embed", "mlp"), cp_lib.HIDDEN, pd)
    self.w_up = _param(rngs, (d, f), std_in, ("embed", "mlp"), cp_lib.HIDDEN, pd)
    self.w_down = _param(rngs, (f, d), std_out, ("mlp", "embed"), cp_lib.HIDDEN, pd)
    self.dtype = jnp.dtype(cfg.dtype)

  def __call__(self, x):
    dt = self.dtype
    gate = x @ self.w_gate[...].astype(dt)
    up = x @ self.w_up[...].astype(dt)
    hidden = _constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
    return _constrain(hidden @ self.w_down[...].astype(dt), ("batch", "length", "embed"))


class Block(nnx.Module):

  def __init__(self, cfg, cp: cp_lib.CompleteP, *, rngs):
    pd = jnp.dtype(cfg.param_dtype)
    self.attn_norm = RMSNorm(cfg.d_model, "embed", eps=cfg.norm_eps, param_dtype=pd)
    self.attn = Attention(cfg, cp, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, "embed", eps=cfg.norm_eps, param_dtype=pd)
    self.mlp = SwiGLU(cfg, cp, rngs=rngs)
    self.residual_scale = cp.residual_scale

  def __call__(self, x, positions, segment_ids):
    x = x + self.residual_scale * self.attn(self.attn_norm(x), positions, segment_ids)
    return x + self.residual_scale * self.mlp(self.mlp_norm(x))


class Transformer(nnx.Module):
  """tokens, positions, segment_ids, modality [B, T] -> final hidden states [B, T, d_model].

  `logits(hidden)` maps hidden states to unified-vocabulary logits (padded vocabulary).
  """

  def __init__(self, model_cfg, layout: vocab_lib.VocabLayout, *, rngs: nnx.Rngs):
    cfg = model_cfg
    cp = cp_lib.CompleteP.from_config(cfg)
    pd = jnp.dtype(cfg.param_dtype)
    vocab = layout.padded_size()
    self.embed = _param(rngs, (vocab, cfg.d_model), cp.init_std_for(cp_lib.EMBEDDING),
                        ("vocab", "embed"), cp_lib.EMBEDDING, pd)
    self.modality_embed = _param(rngs, (NUM_MODALITIES, cfg.d_model),
                                 cp.init_std_for(cp_lib.EMBEDDING), (None, "embed"),
                                 cp_lib.EMBEDDING, pd)
    self.scan_layers = bool(cfg.scan_layers)
    if self.scan_layers:
      self.blocks = _stacked_blocks(cfg, cp, rngs)
    else:
      self.blocks = nnx.List([Block(cfg, cp, rngs=rngs) for _ in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, "embed", eps=cfg.norm_eps, param_dtype=pd)
    self.unembed = _param(rngs, (cfg.d_model, vocab), cp.init_std_for(cp_lib.UNEMBEDDING),
                          ("embed", "vocab"), cp_lib.UNEMBEDDING, pd)
    self.logit_scale = cp.logit_scale
    self.remat = cfg.remat
    self.dtype = jnp.dtype(cfg.dtype)

  def __call__(self, tokens, positions, segment_ids, modality):
    return self.final_norm(self.residual_stream(tokens, positions, segment_ids, modality))

  def residual_stream(self, tokens, positions, segment_ids, modality):
    """The residual stream after the last block, before the final norm."""
    x = self.embed[...][tokens] + self.modality_embed[...][modality]
    x = _constrain(x.astype(self.dtype), ("batch", "length", "embed"))
    policy = REMAT_POLICIES[self.remat]
    if self.scan_layers:
      graphdef, layers = nnx.split(self.blocks)

      def body(y, layer):
        return nnx.merge(graphdef, layer)(y, positions, segment_ids), None
      if policy is not None:
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
      x, _ = jax.lax.scan(body, x, layers)
      return x
    for block in self.blocks:
      if policy is not None:
        x = nnx.remat(lambda blk, y: blk(y, positions, segment_ids), policy=policy)(block, x)
      else:
        x = block(x, positions, segment_ids)
    return x

  def unembedding(self):
    """Unembedding matrix [d_model, V] with the CompleteP logit multiplier folded in."""
    return self.unembed[...] * self.logit_scale

  def logits(self, hidden):
    """hidden [..., d_model] -> float32 logits [..., V_padded]."""
    w = self.unembedding().astype(self.dtype)
    return jnp.dot(hidden.astype(self.dtype), w, preferred_element_type=jnp.float32)


def _stacked_blocks(cfg, cp, rngs) -> Block:
  """One Block whose parameters carry a leading [n_layers] axis, each layer its own init key."""
  @nnx.split_rngs(splits=cfg.n_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(layer_rngs):
    return Block(cfg, cp, rngs=layer_rngs)
  blocks = make(rngs)
  for _, node in nnx.iter_graph(blocks):
    if isinstance(node, nnx.Variable):
      axes = tuple(node.get_metadata()["logical_axes"])
      node.set_metadata(logical_axes=(LAYER_AXIS,) + axes)
  return blocks


def _is_unrolled(blocks) -> bool:
  return bool(blocks) and all(str(k).isdigit() for k in blocks)


def _map_blocks(tree, fn):
  """Applies fn to the value under every "blocks" key of the dicts in `tree`."""
  holds_blocks = lambda x: isinstance(x, dict) and "blocks" in x
  return jax.tree.map(lambda d: {**d, "blocks": fn(d["blocks"])} if holds_blocks(d) else d,
                      tree, is_leaf=holds_blocks)


def layer_layout(tree) -> str | None:
  """'scanned', 'unrolled', or None (no "blocks" in the tree) for a params-holding tree."""
  found = []
  holds_blocks = lambda x: isinstance(x, dict) and "blocks" in x
  for d in jax.tree.leaves(tree, is_leaf=holds_blocks):
    if holds_blocks(d):
      found.append("unrolled" if _is_unrolled(d["blocks"]) else "scanned")
  return found[0] if found else None


def stack_layers(tree, stack=None):
  """Unrolled -> scanned: {0: block, ..., n-1: block} becomes one block of stacked leaves.

  `stack` combines the per-layer leaves (default jnp.stack), e.g. to stack abstract shapes.
  """
  stack = stack or (lambda xs: jnp.stack(xs))

  def fn(blocks):
    if not _is_unrolled(blocks):
      return blocks
    layers = [blocks[k] for k in sorted(blocks, key=int)]
    return jax.tree.map(lambda *xs: stack(xs), *layers)
  return _map_blocks(tree, fn)


def unstack_layers(tree, unstack=None, key=int):
  """Scanned -> unrolled: one block of [n_layers, ...] leaves becomes {0: block, ...}.

  `unstack(leaf)` returns the list of per-layer leaves (default: slices of the leading axis);
  `key(i)` names layer i (int, as nnx.to_pure_dict writes them; str, as Orbax reads them).
  Blocks without leaves (optax's masked slots) are repeated per layer.
  """
  unstack = unstack or (lambda x: list(x))
  holds_blocks = lambda x: isinstance(x, dict) and "blocks" in x
  sizes = {len(unstack(leaf)) for d in jax.tree.leaves(tree, is_leaf=holds_blocks)
           if holds_blocks(d) and not _is_unrolled(d["blocks"])
           for leaf in jax.tree.leaves(d["blocks"])[:1]}
  if len(sizes) > 1:
    raise ValueError(f"stacked blocks disagree on the number of layers: {sorted(sizes)}")

  def fn(blocks):
    if _is_unrolled(blocks) or not sizes:
      return blocks
    leaves, treedef = jax.tree.flatten(blocks)
    per_leaf = [unstack(x) for x in leaves]
    return {key(i): jax.tree.unflatten(treedef, [p[i] for p in per_leaf])
            for i in range(next(iter(sizes)))}
  return _map_blocks(tree, fn)
