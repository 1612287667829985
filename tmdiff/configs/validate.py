"""Checks a config before anything is built; each error names the key at fault.

Every leaf must keep the type of its base-config default (ints fit in int32, floats are finite)
and lie in its range (`RANGES`) or among its choices (`CHOICES`); keys are patterns, `*` any
name. Checks that span keys follow.
"""
from __future__ import annotations

import difflib
import fnmatch
import math
import re

from tmdiff.configs import sharding
from tmdiff.configs.base import get_base_config
from tmdiff.configs.derived import ConfigError, derive
from tmdiff.data import pipeline
from tmdiff.diffusion import objective, sampling, schedules
from tmdiff.kernels import attention
from tmdiff.model.transformer import REMAT

OPTIM_SCHEDULES = ("cosine", "wsd", "constant")
LOSS_IMPLS = ("auto", "logits", "fused")
DTYPES = ("float32", "bfloat16", "float16")
ON_NONFINITE = ("error", "skip", "rollback")
ON_BAD_CHECKPOINT = ("fallback", "error")
DATA_SOURCES = ("synthetic", "prepared")
INT_MAX = 2**31 - 1  # integers end up in int32 arrays (steps, sizes, seeds)

CHOICES = {
    "model.dtype": DTYPES, "model.param_dtype": DTYPES, "model.attention_impl": attention.IMPLS,
    "model.loss_impl": LOSS_IMPLS, "model.remat": REMAT,
    "diffusion.schedule.*": schedules.SCHEDULES, "diffusion.time_sampling": objective.TIME_SAMPLING,
    "diffusion.noise_keys": objective.NOISE_KEYS, "diffusion.loss_norm": objective.LOSS_NORMS,
    "data.source": DATA_SOURCES, "data.on_bad_record": pipeline.BAD_RECORD_POLICIES,
    "optim.schedule": OPTIM_SCHEDULES, "train.on_nonfinite": ON_NONFINITE,
    "train.on_bad_checkpoint": ON_BAD_CHECKPOINT, "mesh.rules": tuple(sorted(sharding.RULES)),
}  # sampling.*: tmdiff.diffusion.sampling.SamplerSettings checks its own settings

# Closed "[" or open "(" interval ends; inf for none.
RANGES = {
    "seed": "[0, inf)", "seeds.*": "[-1, inf)", "vocab.*": "[1, inf)",
    "model.d_model": "[1, inf)", "model.n_layers": "[1, inf)", "model.n_heads": "[1, inf)",
    "model.n_kv_heads": "[1, inf)", "model.head_dim": "[1, inf)", "model.d_ff": "[1, inf)",
    "model.base_width": "[1, inf)", "model.base_depth": "[1, inf)",
    "model.rope_theta": "(0, inf)", "model.norm_eps": "(0, inf)", "model.init_std": "(0, inf)",
    "model.depth_alpha": "[0, inf)",
    "diffusion.poly_exponent": "(0, inf)", "diffusion.t_min": "(0, 0.5)",
    "diffusion.cond_target_only_prob": "[0, 1]", "diffusion.cond_drop_prob": "[0, 1]",
    "data.seq_len": "[8, inf)", "data.global_batch": "[1, inf)", "data.max_segments": "[1, inf)",
    "data.mixture.*": "(0, inf)", "data.worker_count": "[0, inf)", "data.eval_batches": "[1, inf)",
    "data.log_fractions_every": "[0, inf)",
    "optim.lr": "(0, inf)", "optim.beta1": "(0, 1)", "optim.beta2": "(0, 1)",
    "optim.eps": "(0, inf)", "optim.weight_decay": "[0, inf)", "optim.clip_norm": "[0, inf)",
    "optim.warmup_frac": "[0, 1)", "optim.decay_frac": "[0, 1]", "optim.min_lr_ratio": "[0, 1]",
    "optim.ema_decay": "[0, 1)", "optim.grad_accum": "[1, inf)",
    "sde.batch_base": "[1, inf)", "sde.tokens_base": "(0, inf)", "sde.gamma": "(0, inf)",
    "sde.critical_steps": "[0, inf)",
    "train.tokens": "[0, inf)", "train.steps": "[0, inf)", "train.log_every": "[1, inf)",
    "train.eval_every": "[0, inf)", "train.ckpt_every": "[1, inf)",
    "train.keep_checkpoints": "[1, inf)", "train.nonfinite_limit": "[1, inf)",
    "train.rollback_skip": "[0, inf)", "train.preemption_check_every": "[1, inf)",
}  # mesh axes: -1 or positive (mesh_shape)


def _require(ok: bool, key: str, message: str):
  if not ok:
    raise ConfigError(f"config.{key}: {message}")


def _leaves(config, prefix: str = ""):
  """(dotted key, value) for every leaf of a ConfigDict (or dict), depth first."""
  for k, v in config.items():
    if hasattr(v, "items"):
      yield from _leaves(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def _type_error(value, default) -> str | None:
  """Why `value` cannot stand where the base config has `default`; None if it can."""
  if isinstance(default, bool):
    ok, want = isinstance(value, bool), "True or False"
  elif isinstance(default, int):
    ok = isinstance(value, int) and not isinstance(value, bool) and abs(value) <= INT_MAX
    want = f"an integer of magnitude <= {INT_MAX}"
  elif isinstance(default, float):
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))
    want = "a finite number"
  elif isinstance(default, tuple):
    ok = (isinstance(value, tuple) and len(value) == len(default)
          and not any(_type_error(v, d) for v, d in zip(value, default)))
    want = f"a tuple like {default!r}"
  else:
    ok, want = isinstance(value, type(default)), f"a {type(default).__name__}"
  return None if ok else f"must be {want}, got {value!r}"


def _check_structure(config) -> None:
  """Keys as in the base config (a section replaced by --config.x={...} may drop or add some),
  each of its default's type."""
  want, have = dict(_leaves(get_base_config())), dict(_leaves(config))
  for key in sorted(have.keys() - want.keys()):
    parent = key.rpartition(".")[0]
    siblings = [k for k in want if k.rpartition(".")[0] == parent]
    close = difflib.get_close_matches(key, siblings, n=1)
    _require(False, key, "unknown key" + (f"; did you mean {close[0]}?" if close else ""))
  for key, default in want.items():
    _require(key in have, key, f"missing (base default {default!r})")
    problem = _type_error(have[key], default)
    _require(problem is None, key, problem)


def _interval(spec: str):
  """'[0, 1)' -> (test, wording)."""
  lo_end, lo, hi, hi_end = re.fullmatch(r"([\[(])(\S+), (\S+)([\])])", spec).groups()
  low, high = float(lo), float(hi)

  def test(v):
    return (low <= v if lo_end == "[" else low < v) and (v <= high if hi_end == "]" else v < high)

  if hi == "inf":
    return test, f"must be {'>=' if lo_end == '[' else '>'} {lo}"
  return test, f"must be in {spec}"


def _check_values(config) -> None:
  values = dict(_leaves(config))
  for pattern, spec in RANGES.items():
    test, wording = _interval(spec)
    for key in fnmatch.filter(values, pattern):
      _require(test(values[key]), key, f"{wording}, got {values[key]!r}")
  for pattern, options in CHOICES.items():
    for key in fnmatch.filter(values, pattern):
      _require(values[key] in options, key, f"{values[key]!r} not in {tuple(options)}")
  for modality in config.sampling:
    try:
      sampling.settings_from_config(config, modality)
    except sampling.SamplerError as e:
      m = re.fullmatch(r"sampler setting (\w+): (.*)", str(e))
      _require(False, f"sampling.{modality}" + (f".{m[1]}" if m else ""), m[2] if m else str(e))


def _check_mesh_axes(config) -> list[int]:
  sizes = [config.mesh[a] for a in sharding.MESH_AXES]
  for axis, s in zip(sharding.MESH_AXES, sizes):
    _require(s == -1 or (isinstance(s, int) and not isinstance(s, bool) and 0 < s <= INT_MAX),
             f"mesh.{axis}", f"must be -1 or positive, got {s!r}")
  _require(sizes.count(-1) <= 1, "mesh",
           f"at most one axis may be -1, got {dict(zip(sharding.MESH_AXES, sizes))}")
  return sizes


def mesh_shape(config, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with -1 filled from the device count."""
  sizes = _check_mesh_axes(config)
  fill = [i for i, s in enumerate(sizes) if s == -1]
  known = 1
  for s in sizes:
    known *= s if s != -1 else 1
  if fill:
    _require(num_devices % known == 0, "mesh",
             f"{dict(zip(sharding.MESH_AXES, sizes))} cannot fill {num_devices} devices")
    sizes[fill[0]] = num_devices // known
  _require(sizes[0] * sizes[1] * sizes[2] == num_devices, "mesh",
           f"data*fsdp*tensor = {sizes[0] * sizes[1] * sizes[2]} but there are {num_devices} devices")
  return tuple(sizes)


def validate(config, num_devices: int | None = None) -> None:
  _check_structure(config)
  _check_values(config)
  _check_mesh_axes(config)
  m, d, data, o, t = config.model, config.diffusion, config.data, config.optim, config.train
  _require(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads",
           f"{m.n_kv_heads} must divide model.n_heads={m.n_heads}")
  _require(m.head_dim % 2 == 0, "model.head_dim", f"must be even for RoPE, got {m.head_dim}")
  _require(d.cond_target_only_prob + d.cond_drop_prob <= 1.0, "diffusion.cond_drop_prob",
           "cond_target_only_prob + cond_drop_prob must be <= 1")
  _require(data.source != "prepared" or bool(data.data_dir), "data.data_dir",
           "data.source='prepared' needs data.data_dir (run python -m tmdiff.data.prepare)")
  _require(not data.pack_pairs or data.max_segments >= 2, "data.max_segments",
           f"data.pack_pairs puts several pairs in a row; needs >= 2, got {data.max_segments}")
  if d.anti_masking:
    _require(data.global_batch % 2 == 0, "data.global_batch",
             f"anti-masking pairs rows, so the batch must be even, got {data.global_batch}")
  _require(o.warmup_frac + o.decay_frac <= 1, "optim.decay_frac",
           "warmup_frac + decay_frac must be <= 1")
  _require(data.global_batch % o.grad_accum == 0, "optim.grad_accum",
           f"{o.grad_accum} must divide data.global_batch={data.global_batch}")
  _require(t.steps > 0 or t.tokens > 0, "train.steps", "set train.steps or train.tokens")

  if num_devices is not None:
    data_ax, fsdp_ax, tensor_ax = mesh_shape(config, num_devices)
    shards = data_ax * fsdp_ax
    micro = data.global_batch // o.grad_accum
    _require(micro % shards == 0, "data.global_batch",
             f"the microbatch {micro} (= data.global_batch {data.global_batch} / optim.grad_accum "
             f"{o.grad_accum}) must divide over data*fsdp = {shards} devices")
    if d.anti_masking:
      _require((micro // shards) % 2 == 0, "data.global_batch",
               f"anti-masking needs an even number of rows per device, got {micro // shards}")
    _require(m.n_kv_heads % tensor_ax == 0, "mesh.tensor",
             f"{tensor_ax} must divide model.n_kv_heads={m.n_kv_heads}")
    _require(m.d_ff % tensor_ax == 0, "mesh.tensor", f"{tensor_ax} must divide model.d_ff={m.d_ff}")
  hp = derive(config)  # raises on a batch above the critical batch
  _require(hp.steps <= INT_MAX, "train.tokens",
           f"{t.tokens:g} tokens make {float(hp.steps):.3g} steps of {hp.tokens_per_step} tokens, "
           f"more than {INT_MAX}")
