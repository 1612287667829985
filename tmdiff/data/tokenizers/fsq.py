"""Finite scalar quantization (Mentzer et al. 2023, "FSQ: VQ-VAE made simple").

Each latent channel i is bounded to L_i levels with a shifted tanh, rounded with a
straight-through gradient, and rescaled to [-1, 1]. The implicit codebook is the
product grid of levels, so its size is prod(L_i); no codebook loss, no collapse.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


class FSQ:
  """Stateless quantizer over the last axis (whose size must be len(levels))."""

  def __init__(self, levels: Sequence[int], eps: float = 1e-3):
    levels = tuple(int(l) for l in levels)
    if not levels or min(levels) < 2:
      raise ValueError(f"FSQ levels must be >= 2 each, got {levels}")
    self.levels = levels
    self.eps = eps
    self._levels = np.asarray(levels, np.float32)
    # Mixed-radix place values: index = sum_i digit_i * prod_{j<i} L_j.
    self._basis = np.cumprod([1] + list(levels[:-1])).astype(np.int64)

  @property
  def dim(self) -> int:
    return len(self.levels)

  @property
  def codebook_size(self) -> int:
    return math.prod(self.levels)

  def bound(self, z: jax.Array) -> jax.Array:
    """Maps reals into an interval whose rounding gives exactly L_i integer values."""
    half = (self._levels - 1) * (1 + self.eps) / 2
    offset = np.where(self._levels % 2 == 0, 0.5, 0.0).astype(np.float32)
    shift = np.arctanh(offset / half).astype(np.float32)
    return jnp.tanh(z + shift) * half - offset

  def quantize(self, z: jax.Array) -> jax.Array:
    """Quantized codes in [-1, 1] with straight-through gradients (d out / d bound(z) = 1)."""
    bounded = self.bound(z)
    rounded = bounded + jax.lax.stop_gradient(jnp.round(bounded) - bounded)
    return rounded / (self._levels // 2).astype(np.float32)

  def codes_to_indices(self, codes: jax.Array) -> jax.Array:
    """Codes [..., dim] (as returned by `quantize`) -> int32 indices [...]."""
    digits = jnp.round(codes * (self._levels // 2) + self._levels // 2).astype(jnp.int32)
    return jnp.sum(digits * self._basis.astype(np.int32), axis=-1).astype(jnp.int32)

  def indices_to_codes(self, indices: jax.Array) -> jax.Array:
    """Int indices [...] -> codes [..., dim] in [-1, 1]."""
    indices = jnp.asarray(indices, jnp.int32)[..., None]
    digits = (indices // self._basis.astype(np.int32)) % self._levels.astype(np.int32)
    return ((digits - self._levels // 2) / (self._levels // 2)).astype(jnp.float32)
