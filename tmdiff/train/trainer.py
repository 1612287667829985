"""Train state, the pure train step, the eval step, and their shardings on a mesh.

The train state is a plain dict {step, params, opt_state[, ema]} with params as a pure dict
(nnx.to_pure_dict), so Orbax saves and restores it onto any mesh. Masks and times of step s are
drawn from fold_in(key(seed), s), or per example from its stream index
(diffusion.noise_keys): a run is reproducible across restarts and mesh changes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tmdiff.configs import derived
from tmdiff.configs import sharding as sharding_lib
from tmdiff.configs import validate as validate_lib
from tmdiff.configs.derived import Hyperparams, derive
from tmdiff.data import batch as batch_lib
from tmdiff.data import vocab as vocab_lib
from tmdiff.diffusion import objective as obj_lib
from tmdiff.eval import elbo as elbo_lib
from tmdiff.kernels import cross_entropy
from tmdiff.model.transformer import Transformer
from tmdiff.train import optimizer as optimizer_lib

P = jax.sharding.PartitionSpec


def make_mesh(config, devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  shape = validate_lib.mesh_shape(config, len(devices))
  return jax.make_mesh(shape, sharding_lib.MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def _dict_path(path) -> tuple:
  return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


@dataclasses.dataclass
class Trainer:
  """Everything static about a run: model graph, objective, optimizer, mesh and shardings."""
  config: object
  mesh: jax.sharding.Mesh

  def __post_init__(self):
    c = self.config
    self.layout = vocab_lib.VocabLayout.from_config(c.vocab)
    self.hp: Hyperparams = derive(c)
    self.rules = sharding_lib.rules_for(c.mesh.rules)
    self.objective = obj_lib.Objective.from_config(c.diffusion, self.layout)
    # Eval times come from tmdiff.eval.elbo.time_uniforms (stratified over the eval rows).
    self.eval_objective = dataclasses.replace(
        self.objective, anti_masking=False, cond_target_only_prob=0.0, cond_drop_prob=0.0)
    self.logit_bias = obj_lib.modality_logit_bias(self.layout)
    self.vocab_ranges = obj_lib.modality_vocab_ranges(self.layout)
    self.loss_impl = c.model.loss_impl
    if self.loss_impl == "auto":
      self.loss_impl = "logits" if self.mesh.devices.flat[0].platform == "cpu" else "fused"

    abstract_model = nnx.eval_shape(
        lambda: Transformer(c.model, self.layout, rngs=nnx.Rngs(0)))
    self.graphdef, abstract_vars = nnx.split(abstract_model)
    # The eval step computes in elbo_lib.EVAL_DTYPE (same parameters, another graph).
    eval_model_cfg = c.model.copy_and_resolve_references()
    eval_model_cfg.dtype = elbo_lib.EVAL_DTYPE
    self.eval_graphdef = nnx.split(nnx.eval_shape(
        lambda: Transformer(eval_model_cfg, self.layout, rngs=nnx.Rngs(0))))[0]
    self.param_classes = nnx.to_pure_dict(jax.tree.map(
        lambda v: v.get_metadata()["param_class"], abstract_vars,
        is_leaf=sharding_lib.is_variable))
    self.param_sharding = sharding_lib.param_shardings(abstract_vars, self.mesh, self.rules)
    self.tx = optimizer_lib.make_optimizer(c, self.hp, self.param_classes)
    self.lr_multiplier = optimizer_lib.lr_multiplier(c.optim, self.hp)
    self.batch_sharding = sharding_lib.batch_sharding(self.mesh)
    self.row_id_sharding = jax.sharding.NamedSharding(self.mesh, P(sharding_lib.BATCH_AXES))
    self.replicated = jax.sharding.NamedSharding(self.mesh, P())

    abstract_params = nnx.to_pure_dict(abstract_vars)
    abstract_state = jax.eval_shape(self._init_state_unsharded, abstract_params)
    self.state_sharding = self._state_shardings(abstract_state)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state, self.state_sharding)

  # --- state -------------------------------------------------------------------------------
  def _init_state_unsharded(self, params):
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": self.tx.init(params)}
    if self.config.optim.ema_decay > 0:
      state["ema"] = jax.tree.map(jnp.copy, params)
    return state

  def _state_shardings(self, abstract_state):
    """Parameters and their param-shaped optimizer slots follow the parameter shardings."""
    by_path = {}
    jax.tree_util.tree_map_with_path(
        lambda path, s: by_path.__setitem__(_dict_path(path), s), self.param_sharding)

    def pick(path, leaf):
      # A state leaf follows the parameter whose path ends its own: params/<p>, opt_state/.../<p>.
      keys = _dict_path(path)
      sharding = next((by_path[keys[i:]] for i in range(len(keys)) if keys[i:] in by_path), None)
      if sharding is not None and len(sharding.spec) <= leaf.ndim:
        return sharding
      return self.replicated
    return jax.tree_util.tree_map_with_path(pick, abstract_state)

  def init_state(self):
    """Fresh train state, created directly in its shardings."""
    c = self.config

    @functools.partial(jax.jit, out_shardings=self.state_sharding)
    def init():
      model = Transformer(c.model, self.layout, rngs=nnx.Rngs(derived.seed_for(c, "init")))
      return self._init_state_unsharded(nnx.to_pure_dict(nnx.state(model)))
    with self._context():
      return init()

  def _context(self):
    """Mesh and logical-axis rules for tracing model code."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nn.logical_axis_rules(self.rules))
    return stack

  # --- loss ----------------------------------------------------------------------------------
  def _target_logp(self, params, batch, corruption, graphdef=None):
    """[B, L] log p(clean token | corrupted row) under the modality-restricted softmax."""
    model = nnx.merge(self.graphdef if graphdef is None else graphdef, params)
    hidden = model(corruption.tokens, batch["positions"], batch["segment_ids"], batch["modality"])
    if self.loss_impl == "fused":  # never materialises [B, L, V] logits
      b, length, d = hidden.shape
      ranges = jnp.asarray(self.vocab_ranges)[batch["modality"]].reshape(b * length, 2)
      # Padding targets lie outside every range; clamp them (they are never supervised).
      targets = jnp.clip(batch["tokens"].reshape(-1), ranges[:, 0], ranges[:, 1] - 1)
      nll = cross_entropy.masked_cross_entropy(
          hidden.reshape(b * length, d), model.unembedding().astype(hidden.dtype), targets,
          jnp.ones((b * length,), jnp.float32), vocab_range=ranges)
      logp = -nll.reshape(b, length)
    else:
      logits = model.logits(hidden)
      logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
      logp = obj_lib.target_log_probs(logits, batch["tokens"], batch["modality"], self.logit_bias)
    return logp

  def _elbo_sums(self, params, batch, corruption):
    return obj_lib.elbo_sums(self._target_logp(params, batch, corruption), corruption,
                             batch["modality"])

  def _prepare(self, batch):
    batch = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}
    if self.objective.anti_masking:
      batch = jax.tree.map(lambda x: jnp.repeat(x, 2, axis=0), batch)
    return jax.lax.with_sharding_constraint(batch, self.batch_sharding)

  def _train_step(self, state, batch):
    c = self.config
    step = state["step"]
    batch = self._prepare(batch)
    corruption = obj_lib.step_corruption(batch, step, jax.random.key(derived.seed_for(c, "masks")),
                                         self.objective, c.data.max_segments)
    total_tokens = obj_lib.loss_normaliser(corruption, "tokens")
    normaliser = obj_lib.loss_normaliser(corruption, c.diffusion.loss_norm)

    grads, sums = self._grads(state, batch, corruption, normaliser)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = {"step": step + 1, "params": params, "opt_state": opt_state}
    if "ema" in state:
      d = c.optim.ema_decay
      new_state["ema"] = jax.tree.map(lambda e, p: d * e + (1 - d) * p, state["ema"], params)
    metrics = obj_lib.summarize(sums)
    metrics["grad_norm"] = optax.tree.norm(grads)
    # On device, every step: the loop reads it at its log and checkpoint steps.
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    if c.train.on_nonfinite != "error":
      # A non-finite step leaves params, optimizer state and EMA as they were; its step counts.
      keep = lambda new, old: jnp.where(finite, new, old)
      new_state = {k: v if k == "step" else jax.tree.map(keep, v, state[k])
                   for k, v in new_state.items()}
      metrics = jax.tree.map(lambda m: jnp.where(finite, m, 0.0), metrics)
    metrics["param_norm"] = optax.tree.norm(new_state["params"])
    metrics["lr"] = self.hp.lr * self.lr_multiplier(step)
    metrics["masked_fraction"] = sums["masked"].sum() / total_tokens
    metrics["real_token_fraction"] = jnp.mean((batch["segment_ids"] > 0).astype(jnp.float32))
    metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
    return new_state, metrics

  def _grads(self, state, batch, corruption, normaliser):
    """-> (gradients of the normalised loss, ELBO sums), over optim.grad_accum microbatches."""
    c = self.config

    def loss_fn(params, micro_batch, micro_corruption):
      sums = self._elbo_sums(params, micro_batch, micro_corruption)
      return sums["nll"].sum() / normaliser, sums

    grad_fn = jax.grad(loss_fn, has_aux=True)
    accum = c.optim.grad_accum
    if accum == 1:
      return grad_fn(state["params"], batch, corruption)

    def split(x):  # microbatch a = rows a, a + accum, ...: every device keeps its share
      x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
      return jax.lax.with_sharding_constraint(
          x, jax.sharding.NamedSharding(self.mesh, P(None, sharding_lib.BATCH_AXES)))
    micro = jax.tree.map(split, (batch, corruption))

    def body(carry, mb):
      g, s = grad_fn(state["params"], *mb)
      return jax.tree.map(jnp.add, carry, (g, s)), None
    zeros = jax.tree.map(jnp.zeros_like, (state["params"], jax.eval_shape(
        lambda: self._elbo_sums(state["params"], *jax.tree.map(lambda x: x[0], micro)))))
    (grads, sums), _ = jax.lax.scan(body, zeros, micro)
    return grads, sums

  def _eval_row_sums(self, params, batch, row_ids, time_uniforms):
    """Per-row sums {nll, tokens, masked} [B, 3]; row i's masks from its global index, its
    times from time_uniforms[i] (tmdiff.eval.elbo)."""
    batch = jax.lax.with_sharding_constraint(
        {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}, self.batch_sharding)
    corruption = obj_lib.corrupt_examples(
        batch, row_ids, elbo_lib.eval_key(derived.seed_for(self.config, "eval")),
        self.eval_objective, self.config.data.max_segments, time_uniforms=time_uniforms)
    logp = self._target_logp(params, batch, corruption, self.eval_graphdef)
    return elbo_lib.row_elbo_sums(logp, corruption, batch["modality"])

  # --- compiled entry points ---------------------------------------------------------------
  def abstract_batch(self, rows: int):
    shape = (rows, self.config.data.seq_len)
    return {f: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding)
            for f in batch_lib.FIELDS}

  def compile_train_step(self):
    """Compiles ahead of the loop; logs the per-device memory analysis."""
    jitted = jax.jit(self._train_step, in_shardings=(self.state_sharding, self.batch_sharding),
                     out_shardings=(self.state_sharding, self.replicated), donate_argnums=0)
    with self._context():
      compiled = jitted.lower(self.abstract_state,
                              self.abstract_batch(self.hp.examples_per_step)).compile()
    log_memory("train_step", compiled)
    return compiled

  def compile_eval_step(self, rows: int):
    """(params, batch of `rows` rows, row_ids [rows] int32, time uniforms [rows, max_segments
    + 1] float32) -> per-row sums (tmdiff.eval.elbo)."""
    jitted = jax.jit(self._eval_row_sums,
                     in_shardings=(self.state_sharding["params"], self.batch_sharding,
                                   self.row_id_sharding, self.batch_sharding),
                     out_shardings=self.replicated)
    slots = self.config.data.max_segments + 1
    with self._context():
      return jitted.lower(
          self.abstract_state["params"], self.abstract_batch(rows),
          jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=self.row_id_sharding),
          jax.ShapeDtypeStruct((rows, slots), jnp.float32, sharding=self.batch_sharding)
      ).compile()

  def put_batch(self, batch):
    """Host numpy batch (this process's rows) -> global array sharded over the batch axes."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v, np.int32))
            for k, v in batch.items()}


def log_memory(name, compiled):
  try:
    mem = compiled.memory_analysis()
  except Exception:  # some backends have no analysis
    mem = None
  if mem is None:
    logging.info("%s: no memory analysis on this backend", name)
    return None
  fields = {k: getattr(mem, k, 0) for k in (
      "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
      "generated_code_size_in_bytes", "alias_size_in_bytes")}
  total = (fields["argument_size_in_bytes"] + fields["output_size_in_bytes"]
           + fields["temp_size_in_bytes"] - fields["alias_size_in_bytes"])
  logging.info("%s memory per device: args %.1f MiB, temps %.1f MiB, out %.1f MiB, "
               "peak ~%.1f MiB", name, fields["argument_size_in_bytes"] / 2**20,
               fields["temp_size_in_bytes"] / 2**20, fields["output_size_in_bytes"] / 2**20,
               total / 2**20)
  return fields
