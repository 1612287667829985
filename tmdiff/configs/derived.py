"""Quantities derived from a config, computed in this one place.

SDE batch-size reparameterisation (DESIGN.md section 1): with token horizon D, physical batch
B (sequences) of length L, base point (B_base, D_base) and exponent gamma,
  kappa = (D_base / D)^gamma * (B / B_base)
  lr = lr_base sqrt(kappa), beta1 = beta1_base^kappa, beta2 = beta2_base^kappa,
  eps = eps_base / sqrt(kappa), steps S = D / (L B).
It holds below the critical batch B_crit = D / (L S_crit).
"""
from __future__ import annotations

import dataclasses
import math


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


SEED_PURPOSES = ("init", "data", "masks", "eval")


def seed_for(config, purpose: str) -> int:
  """The seed of one source of randomness: parameter init, training data order, training
  masks and times, or eval masks and times; config.seeds.<purpose>, or config.seed if -1."""
  if purpose not in SEED_PURPOSES:
    raise ValueError(f"seed purpose {purpose!r} not in {SEED_PURPOSES}")
  seeds = config.get("seeds") or {}
  value = int(seeds.get(purpose, -1))
  return int(config.seed) if value < 0 else value


@dataclasses.dataclass(frozen=True)
class Hyperparams:
  batch: int               # physical batch B (rows per step, anti-masking pairs included)
  examples_per_step: int   # rows loaded per step (B / 2 with anti-masking)
  seq_len: int
  tokens_per_step: int
  steps: int
  token_horizon: int       # D
  kappa: float
  lr: float
  beta1: float
  beta2: float
  eps: float
  warmup_steps: int
  decay_steps: int
  critical_batch: float | None

  def summary(self) -> str:
    crit = "n/a" if self.critical_batch is None else f"{self.critical_batch:.0f}"
    return (f"B={self.batch} L={self.seq_len} steps={self.steps} D={self.token_horizon:,} "
            f"kappa={self.kappa:.4g} lr={self.lr:.4g} beta1={self.beta1:.6g} "
            f"beta2={self.beta2:.6g} eps={self.eps:.4g} warmup={self.warmup_steps} "
            f"decay={self.decay_steps} B_crit={crit}")


def sde_kappa(batch: int, tokens: float, batch_base: int, tokens_base: float, gamma: float):
  return (tokens_base / tokens) ** gamma * (batch / batch_base)


def reparameterise(lr, beta1, beta2, eps, kappa):
  """Base AdamW hyperparameters -> those for kappa (identity at kappa = 1)."""
  root = math.sqrt(kappa)
  return lr * root, beta1 ** kappa, beta2 ** kappa, eps / root


def derive(config) -> Hyperparams:
  data, optim, sde, train = config.data, config.optim, config.sde, config.train
  batch, seq_len = int(data.global_batch), int(data.seq_len)
  tokens_per_step = batch * seq_len
  if train.tokens > 0:
    steps = max(1, round(train.tokens / tokens_per_step))
    horizon = int(train.tokens)
  else:
    steps = int(train.steps)
    horizon = steps * tokens_per_step
  critical_batch = None
  if sde.enabled:
    if train.tokens <= 0:
      raise ConfigError("config.sde.enabled: needs the token horizon config.train.tokens > 0")
    kappa = sde_kappa(batch, horizon, sde.batch_base, sde.tokens_base, sde.gamma)
    lr, beta1, beta2, eps = reparameterise(optim.lr, optim.beta1, optim.beta2, optim.eps, kappa)
    if sde.critical_steps > 0:
      critical_batch = horizon / (seq_len * sde.critical_steps)
      if batch > critical_batch:
        raise ConfigError(
            f"config.data.global_batch: {batch} is above the critical batch {critical_batch:.1f} "
            f"(= train.tokens / (data.seq_len * sde.critical_steps) = {horizon:,} / "
            f"({seq_len} * {sde.critical_steps})): the SDE reparameterisation does not hold "
            f"there; use a batch <= {math.floor(critical_batch)} or a longer horizon")
  else:
    kappa = 1.0
    lr, beta1, beta2, eps = optim.lr, optim.beta1, optim.beta2, optim.eps
  warmup = round(optim.warmup_frac * steps)
  decay = round(optim.decay_frac * steps) if optim.schedule == "wsd" else steps - warmup
  return Hyperparams(
      batch=batch, examples_per_step=batch // 2 if config.diffusion.anti_masking else batch,
      seq_len=seq_len, tokens_per_step=tokens_per_step, steps=steps, token_horizon=horizon,
      kappa=kappa, lr=lr, beta1=beta1, beta2=beta2, eps=eps, warmup_steps=warmup,
      decay_steps=decay, critical_batch=critical_batch)
