"""Shared pieces of the learned (image, audio) tokenizers: params I/O and a jitted trainer."""
from __future__ import annotations

import dataclasses

import math
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tmdiff.data.tokenizers import base

PARAMS_FILE = "params.npz"


def build(constructor: Callable[[], nnx.Module], seed: int) -> nnx.Module:
  """Builds a module with numpy-initialised params: LeCun-normal kernels, zero biases.

  The constructor runs abstractly; XLA:CPU takes tens of seconds to compile jax.random's
  initialisers even for tiny models, numpy takes milliseconds.
  """
  graphdef, state = nnx.split(nnx.eval_shape(constructor))
  rng = np.random.default_rng(seed)

  def init(leaf):
    if len(leaf.shape) < 2:
      return jnp.zeros(leaf.shape, leaf.dtype)
    fan_in = math.prod(leaf.shape[:-1])
    return jnp.asarray(rng.normal(0.0, fan_in ** -0.5, leaf.shape), leaf.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map(init, state))


def _flat_params(model: nnx.Module) -> tuple[list, list, object]:
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  paths_and_leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
  keys = [jax.tree_util.keystr(path) for path, _ in paths_and_leaves]
  return keys, [leaf for _, leaf in paths_and_leaves], treedef


def save_params(model: nnx.Module, path: str) -> None:
  keys, leaves, _ = _flat_params(model)
  with open(path, "wb") as f:
    np.savez(f, **{k: np.asarray(v) for k, v in zip(keys, leaves)})


def load_params(model: nnx.Module, path: str) -> None:
  """Overwrites `model`'s params from an .npz written by `save_params` (shapes must match)."""
  if not os.path.isfile(path):
    raise base.TokenizerLoadError(f"tokenizer file missing: {path}")
  keys, leaves, treedef = _flat_params(model)
  try:
    with np.load(path) as stored:
      arrays = {k: stored[k] for k in stored.files}
  except Exception as e:  # zipfile / pickle / value errors on a damaged file
    raise base.TokenizerLoadError(f"corrupt parameter file {path}: {e}") from e
  new_leaves = []
  for key, leaf in zip(keys, leaves):
    if key not in arrays:
      raise base.TokenizerLoadError(f"parameter {key} missing from {path}")
    if arrays[key].shape != leaf.shape:
      raise base.TokenizerLoadError(
          f"parameter {key} in {path} has shape {arrays[key].shape}, the model expects {leaf.shape} "
          "(hyperparameters in tokenizer.json do not match the weights)")
    new_leaves.append(jnp.asarray(arrays[key], leaf.dtype))
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, new_leaves))
  nnx.update(model, state)


def write_config(directory: str, kind: str, config: dict) -> None:
  os.makedirs(directory, exist_ok=True)
  base.write_manifest(directory, kind, {"params_file": PARAMS_FILE, "config": config})


def read_config(directory: str, kind: str) -> tuple[dict, str]:
  manifest = base.read_manifest(directory, kind)
  path = os.path.join(directory, "tokenizer.json")
  if not isinstance(manifest.get("config"), dict):
    raise base.TokenizerLoadError(f"tokenizer manifest {path} has no 'config' object")
  return manifest["config"], os.path.join(directory, manifest.get("params_file", PARAMS_FILE))


def fit(model: nnx.Module, loss_fn: Callable, sample_batch: Callable[[np.random.Generator], dict],
        steps: int, learning_rate: float, seed: int, name: str, log_every: int = 0) -> list[float]:
  """Trains `model` in place with Adam + warmup-cosine; returns the per-step losses.

  `loss_fn(model, batch) -> scalar`; `sample_batch(rng) -> dict of arrays` (host side).
  Prints one progress line every `log_every` steps (0: about ten lines per run).
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, max(1, steps // 20), max(2, steps), learning_rate * 0.05)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
  opt_state = optimizer.init(params)

  @jax.jit
  def train_step(params, opt_state, batch):
    def compute_loss(p):
      return loss_fn(nnx.merge(graphdef, p, rest), batch)
    loss, grads = jax.value_and_grad(compute_loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  log_every = log_every or max(1, steps // 10)
  losses, start = [], time.time()
  for step in range(1, steps + 1):
    params, opt_state, loss = train_step(params, opt_state, sample_batch(rng))
    losses.append(loss)
    if step % log_every == 0 or step == steps:
      recent = float(np.mean([float(l) for l in losses[-log_every:]]))
      print(f"[{name}] step {step}/{steps} loss {recent:.4f} ({time.time() - start:.0f}s)",
            file=sys.stderr, flush=True)
  nnx.update(model, params)
  return [float(l) for l in losses]


class NeuralTokenizerIO:
  """save/load for a tokenizer made of a config dataclass (`config_class`) and an NNX `model`."""
  kind: str
  config_class: type

  def save(self, directory: str) -> None:
    write_config(directory, self.kind, dataclasses.asdict(self.config))
    save_params(self.model, os.path.join(directory, PARAMS_FILE))

  @classmethod
  def load(cls, directory: str):
    config_dict, params_path = read_config(directory, cls.kind)
    try:
      config = cls.config_class(**config_dict)
    except (TypeError, ValueError) as e:
      raise base.TokenizerLoadError(
          f"bad {cls.kind} tokenizer config in {directory}/tokenizer.json: {e}") from None
    tokenizer = cls(config)
    load_params(tokenizer.model, params_path)
    return tokenizer
