"""Config: locked base, validation errors naming the key, SDE-derived hyperparameters."""
import math

import pytest

from tmdiff.configs import validate as validate_lib
from tmdiff.configs.base import get_base_config
from tmdiff.configs.derived import ConfigError, derive, reparameterise, sde_kappa


def test_base_config_is_locked():
  c = get_base_config()
  with pytest.raises(AttributeError, match="steps"):
    c.train.stepz = 3  # a typo names the close key
  with pytest.raises(AttributeError):
    c.new_section = 1


@pytest.mark.parametrize("key, value, devices, match", [
    ("data.mixture.text", 0.0, 1, "data.mixture.text"),
    ("data.mixture.image_text", -1.0, 1, "data.mixture.image_text"),
    ("data.global_batch", 6, 4, "data.global_batch.*divide over data\\*fsdp"),
    ("mesh.data", 3, 4, "config.mesh"),
    ("model.n_kv_heads", 3, 1, "model.n_kv_heads"),
    ("diffusion.schedule.image", "cosinus", 1, "diffusion.schedule.image"),
    ("diffusion.t_min", 0.0, 1, "diffusion.t_min"),
    ("optim.schedule", "step", 1, "optim.schedule"),
    ("optim.grad_accum", 3, 1, "optim.grad_accum"),
    ("model.attention_impl", "magic", 1, "model.attention_impl"),
    ("data.source", "prepared", 1, "data.data_dir"),
    ("optim.warmup_frac", 0.9, 1, "optim.decay_frac"),
])
def test_bad_values_name_their_key(key, value, devices, match):
  c = get_base_config()
  section, *rest = key.split(".")
  target = c[section]
  for part in rest[:-1]:
    target = target[part]
  target[rest[-1]] = value
  with pytest.raises(ConfigError, match=match):
    validate_lib.validate(c, num_devices=devices)


def test_anti_masking_needs_even_rows_per_device():
  c = get_base_config()
  c.diffusion.anti_masking = True
  c.data.global_batch = 8
  validate_lib.validate(c, num_devices=4)  # 2 rows per device
  with pytest.raises(ConfigError, match="even number of rows per device"):
    validate_lib.validate(c, num_devices=8)


def _sde_config(batch, tokens, critical_steps=0):
  c = get_base_config()
  c.sde.enabled = True
  c.sde.batch_base, c.sde.tokens_base, c.sde.gamma = 256, 13e9, 0.44
  c.sde.critical_steps = critical_steps
  c.optim.lr, c.optim.beta1, c.optim.beta2, c.optim.eps = 3e-3, 0.9, 0.95, 1e-8
  c.data.global_batch, c.data.seq_len = batch, 1024
  c.train.tokens = tokens
  return c


def test_kappa_one_reproduces_base_hyperparameters():
  hp = derive(_sde_config(256, 13e9))
  assert hp.kappa == pytest.approx(1.0)
  assert (hp.lr, hp.beta1, hp.beta2, hp.eps) == pytest.approx((3e-3, 0.9, 0.95, 1e-8))
  assert reparameterise(1e-3, 0.9, 0.99, 1e-8, 1.0) == (1e-3, 0.9, 0.99, 1e-8)


@pytest.mark.parametrize("batch, tokens", [(64, 13e9), (1024, 13e9), (256, 52e9), (32, 1e9),
                                           (512, 100e9), (8, 2.6e8)])
def test_derived_hyperparameters_follow_the_formulas(batch, tokens):
  hp = derive(_sde_config(batch, tokens))
  kappa = (13e9 / tokens) ** 0.44 * (batch / 256)
  assert hp.kappa == pytest.approx(kappa, rel=1e-12)
  assert hp.lr == pytest.approx(3e-3 * math.sqrt(kappa))
  assert hp.beta1 == pytest.approx(0.9 ** kappa)
  assert hp.beta2 == pytest.approx(0.95 ** kappa)
  assert hp.eps == pytest.approx(1e-8 / math.sqrt(kappa))
  assert hp.steps == round(tokens / (1024 * batch))
  assert sde_kappa(batch, tokens, 256, 13e9, 0.44) == pytest.approx(kappa)


def test_physical_batch_above_critical_is_refused():
  # B_crit = D / (L * S_crit) = 13e9 / (1024 * 49591) ~ 256.0
  derive(_sde_config(256, 13e9, critical_steps=49_000))
  with pytest.raises(ConfigError, match="critical batch"):
    derive(_sde_config(512, 13e9, critical_steps=49_000))
  with pytest.raises(ConfigError, match="critical batch"):
    validate_lib.validate(_sde_config(512, 13e9, critical_steps=49_000), num_devices=1)


def test_sde_needs_a_token_horizon():
  c = _sde_config(256, 0)
  with pytest.raises(ConfigError, match="train.tokens"):
    derive(c)


def test_schedule_phases_are_fractions_of_the_horizon():
  c = get_base_config()
  c.optim.schedule, c.optim.warmup_frac, c.optim.decay_frac = "wsd", 0.1, 0.2
  c.data.global_batch, c.data.seq_len, c.train.tokens = 4, 100, 400 * 1000
  hp = derive(c)
  assert (hp.steps, hp.warmup_steps, hp.decay_steps) == (1000, 100, 200)


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_lr_schedule_shapes(schedule):
  from tmdiff.train.optimizer import lr_multiplier
  c = get_base_config()
  c.optim.schedule, c.optim.warmup_frac, c.optim.decay_frac, c.optim.min_lr_ratio = (
      schedule, 0.1, 0.3, 0.1)
  c.train.steps = 1000
  hp = derive(c)
  f = lambda s: float(lr_multiplier(c.optim, hp)(s))
  assert f(0) == 0.0 and f(50) == pytest.approx(0.5)
  assert f(100) == pytest.approx(1.0)
  if schedule == "cosine":
    assert f(550) == pytest.approx(0.55, abs=1e-3) and f(1000) == pytest.approx(0.1)
  elif schedule == "wsd":
    assert f(699) == pytest.approx(1.0) and f(850) == pytest.approx(0.55) and f(1000) == pytest.approx(0.1)
  else:
    assert f(1000) == 1.0


def test_packed_pairs_need_room_for_two_segments():
  c = get_base_config()
  c.data.pack_pairs, c.data.max_segments = True, 1
  with pytest.raises(ConfigError, match="data.max_segments"):
    validate_lib.validate(c, num_devices=1)
  c.data.max_segments = 2
  validate_lib.validate(c, num_devices=1)
