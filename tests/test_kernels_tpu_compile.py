"""The Pallas TPU attention path compiles for a real TPU (v5p) from this CPU-only machine.

Needs libtpu (`pip install 'jax[tpu]'`): abstract TPU devices from a topology description;
skipped where libtpu is missing.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("libtpu")

from tmdiff.kernels.attention import attend  # noqa: E402


def test_splash_fwd_bwd_compiles_for_v5p():
  from jax.experimental import topologies
  try:
    topo = topologies.get_topology_desc(topology_name="v5p:2x2x1", platform="tpu")
  except Exception as e:  # noqa: BLE001
    pytest.skip(f"no TPU topology: {e}")
  mesh = jax.sharding.Mesh(np.array(topo.devices[:1]), ("x",))
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  b, t, h, k, d = 2, 1024, 8, 2, 128
  spec = lambda s, dt: jax.ShapeDtypeStruct(s, dt, sharding=sh)

  def step(q, kk, v, seg):
    loss = lambda q, kk, v: attend(q, kk, v, seg, impl="pallas_tpu", interpret=False).astype(
        jnp.float32).sum()
    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, kk, v)

  compiled = jax.jit(step).trace(
      spec((b, t, h, d), jnp.bfloat16), spec((b, t, k, d), jnp.bfloat16),
      spec((b, t, k, d), jnp.bfloat16), spec((b, t), jnp.int32)).lower().compile()
  assert "splash" in compiled.as_text() or compiled.memory_analysis() is not None
