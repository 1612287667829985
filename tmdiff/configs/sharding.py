"""Sharding-rule presets: logical axis name -> mesh axes.

Mesh axes are ('data', 'fsdp', 'tensor'). The batch is split over data and fsdp; 'fsdp'
also shards weights (gathered per layer by XLA); 'tensor' splits heads and MLP width.
"""
from __future__ import annotations

import flax.linen as nn
import jax
from flax import nnx

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

_ACTIVATIONS = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),      # the stacked-blocks axis of model.scan_layers
)

RULES = {
    # Weights sharded over fsdp on their model dimension; activations over the batch.
    "fsdp": _ACTIVATIONS + (("embed", "fsdp"), ("vocab", "tensor")),
    # Pure data parallelism: weights replicated (tensor axis still splits heads / mlp).
    "data": _ACTIVATIONS + (("embed", None), ("vocab", "tensor")),
}


def rules_for(name: str):
  if name not in RULES:
    raise ValueError(f"unknown sharding rules {name!r}; choose from {sorted(RULES)}")
  return RULES[name]


def is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def logical_axes(state):
  """Pytree of logical-axis tuples, one per parameter of an nnx.State (pure-dict shaped)."""
  axes = jax.tree.map(lambda v: v.get_metadata().get("logical_axes"), state, is_leaf=is_variable)
  return nnx.to_pure_dict(axes) if isinstance(axes, nnx.State) else axes


def param_shardings(state, mesh, rules):
  """NamedSharding per parameter (pure-dict shaped), from the parameters' logical axes."""
  def to_sharding(variable):
    spec = nn.logical_to_mesh_axes(variable.get_metadata().get("logical_axes"), rules)
    return jax.sharding.NamedSharding(mesh, spec)
  return nnx.to_pure_dict(jax.tree.map(to_sharding, state, is_leaf=is_variable))


def batch_sharding(mesh):
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(BATCH_AXES, None))
