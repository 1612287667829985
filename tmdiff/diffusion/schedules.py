"""Masking schedules: alpha(t) = probability that a token is still clean at time t in [0, 1].

Each schedule gives alpha(t), alpha'(t) and the ELBO weight -alpha'(t) / (1 - alpha(t)),
with alpha(0) = 1 (clean) and alpha(1) ~ 0 (fully masked).
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp


class Schedule:
  name: str

  def alpha(self, t):
    raise NotImplementedError

  def dalpha(self, t):
    raise NotImplementedError

  def weight(self, t):
    """ELBO weight of a masked token at time t: -alpha'(t) / (1 - alpha(t))."""
    return -self.dalpha(t) / (1.0 - self.alpha(t))


@dataclasses.dataclass(frozen=True)
class Linear(Schedule):
  name = "linear"

  def alpha(self, t):
    return 1.0 - t

  def dalpha(self, t):
    return -jnp.ones_like(t)

  def weight(self, t):
    return 1.0 / t


@dataclasses.dataclass(frozen=True)
class Cosine(Schedule):
  """alpha = 1 - cos(pi/2 (1 - t)): the masked fraction sin(pi t / 2) rises faster than linear
  at first (0.156 at t = 0.1, against 0.1) and flattens near t = 1 (0.988 at t = 0.9). Sampling
  (t from 1 to 0) thus reveals few tokens in its first steps and many in its last (MaskGIT)."""
  name = "cosine"

  def alpha(self, t):
    return 1.0 - jnp.cos(0.5 * math.pi * (1.0 - t))

  def dalpha(self, t):
    return -0.5 * math.pi * jnp.sin(0.5 * math.pi * (1.0 - t))

  def weight(self, t):
    return 0.5 * math.pi * jnp.tan(0.5 * math.pi * (1.0 - t))


@dataclasses.dataclass(frozen=True)
class Polynomial(Schedule):
  """alpha = 1 - t^p; p > 1 keeps tokens clean longer."""
  exponent: float = 2.0
  name = "polynomial"

  def alpha(self, t):
    return 1.0 - t ** self.exponent

  def dalpha(self, t):
    return -self.exponent * t ** (self.exponent - 1.0)

  def weight(self, t):
    return self.exponent / t


@dataclasses.dataclass(frozen=True)
class LogLinear(Schedule):
  """MDLM's log-linear noise: total noise sigma(t) = -log(1 - (1 - eps) t), alpha = exp(-sigma)."""
  eps: float = 1e-3
  name = "loglinear"

  def alpha(self, t):
    return 1.0 - (1.0 - self.eps) * t

  def dalpha(self, t):
    return -(1.0 - self.eps) * jnp.ones_like(t)

  def weight(self, t):
    return 1.0 / t


@dataclasses.dataclass(frozen=True)
class Geometric(Schedule):
  """alpha = exp(-sigma_min^(1-t) sigma_max^t)."""
  sigma_min: float = 1e-4
  sigma_max: float = 20.0
  name = "geometric"

  def _sigma(self, t):
    return self.sigma_min ** (1.0 - t) * self.sigma_max ** t

  def alpha(self, t):
    return jnp.exp(-self._sigma(t))

  def dalpha(self, t):
    return -self.alpha(t) * self._sigma(t) * math.log(self.sigma_max / self.sigma_min)

  def weight(self, t):
    sigma = self._sigma(t)
    return sigma * math.log(self.sigma_max / self.sigma_min) / jnp.expm1(sigma)


# The registry: config names are the classes' `name`s; validators take SCHEDULES from here.
BY_NAME = {cls.name: cls for cls in (Linear, Cosine, Polynomial, LogLinear, Geometric)}
SCHEDULES = tuple(BY_NAME)


def make_schedule(name: str, *, poly_exponent: float = 2.0) -> Schedule:
  if name not in BY_NAME:
    raise ValueError(f"unknown schedule {name!r}; choose from {SCHEDULES}")
  if BY_NAME[name] is Polynomial:
    return Polynomial(poly_exponent)
  return BY_NAME[name]()


def from_config(name: str, params) -> Schedule:
  """Schedule `name` with the parameters the model was trained with. `params`: config.diffusion,
  or SamplerSettings (which carry them from there), anything with a `poly_exponent`."""
  return make_schedule(name, poly_exponent=float(params.poly_exponent))
