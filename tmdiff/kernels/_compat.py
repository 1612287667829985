"""Import guards for Pallas APIs that moved between JAX 0.10 and 0.12."""
from __future__ import annotations

import jax

try:
  from jax.experimental import pallas as pl
except ImportError:  # pragma: no cover
  pl = None

try:  # Triton backend: deprecated in 0.11, may disappear later.
  from jax.experimental.pallas import triton as pltriton
except ImportError:  # pragma: no cover
  pltriton = None

try:
  from jax.experimental.pallas import tpu as pltpu
except ImportError:  # pragma: no cover
  pltpu = None

try:
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
except ImportError:  # pragma: no cover
  splash = splash_mask = None

try:
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_fa
except ImportError:  # pragma: no cover
  cudnn_fa = None

# Squeezed block dimension: `pl.squeezed` (newer) or `None` (older).
SQ = getattr(pl, "squeezed", None) if pl is not None else None


def platform() -> str:
  """The platform being compiled for: that of the mesh set with `jax.set_mesh` (e.g. abstract TPU
  devices in an ahead-of-time compile on a CPU host), else the default backend."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return getattr(device, "platform", None) or jax.default_backend()


def triton_params(num_warps: int, num_stages: int):
  if pltriton is None:
    raise RuntimeError("Pallas Triton backend unavailable in this JAX")
  return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
