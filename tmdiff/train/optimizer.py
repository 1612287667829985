"""AdamW with CompleteP per-class multipliers and token-horizon LR schedules (optax)."""
from __future__ import annotations

import optax

from tmdiff.configs.derived import Hyperparams
from tmdiff.model import completep as cp_lib


def lr_multiplier(optim_cfg, hp: Hyperparams) -> optax.Schedule:
  """Schedule of the learning-rate multiplier in [0, 1]; phases are fractions of the horizon."""
  warmup, steps, floor = hp.warmup_steps, hp.steps, optim_cfg.min_lr_ratio
  warm = optax.linear_schedule(0.0, 1.0, max(warmup, 1))
  if optim_cfg.schedule == "constant":
    main = optax.constant_schedule(1.0)
  elif optim_cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(1.0, max(steps - warmup, 1), alpha=floor)
  elif optim_cfg.schedule == "wsd":
    stable = max(steps - warmup - hp.decay_steps, 0)
    main = optax.join_schedules(
        [optax.constant_schedule(1.0), optax.linear_schedule(1.0, floor, max(hp.decay_steps, 1))],
        [stable])
  else:
    raise ValueError(f"unknown optim.schedule {optim_cfg.schedule!r}")
  if warmup == 0:
    return main
  return optax.join_schedules([warm, main], [warmup])


def make_optimizer(config, hp: Hyperparams, param_classes) -> optax.GradientTransformation:
  """`param_classes`: pytree like the params holding each leaf's CompleteP class."""
  o = config.optim
  cp = cp_lib.CompleteP.from_config(config.model)
  multiplier = lr_multiplier(o, hp)

  def group(param_class):
    lr_mult = cp.lr_mult(param_class)
    parts = [optax.scale_by_adam(hp.beta1, hp.beta2, eps=hp.eps * cp.eps_mult(param_class))]
    if o.weight_decay > 0 and param_class != cp_lib.NORM:
      parts.append(optax.add_decayed_weights(o.weight_decay * cp.weight_decay_mult(param_class)))
    parts.append(optax.scale_by_learning_rate(lambda step: hp.lr * lr_mult * multiplier(step)))
    return optax.chain(*parts)

  classes = sorted(set(cp_lib.PARAM_CLASSES))
  tx = optax.multi_transform({c: group(c) for c in classes}, param_classes)
  if o.clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.clip_norm), tx)
  return tx
