"""Checks a config before anything is built; each error names the key at fault."""
from __future__ import annotations

from tmdiff.configs import sharding
from tmdiff.configs import derived
from tmdiff.configs.derived import ConfigError, derive
from tmdiff.diffusion import objective, schedules
from tmdiff.kernels import attention
from tmdiff.model.transformer import REMAT

OPTIM_SCHEDULES = ("cosine", "wsd", "constant")
LOSS_IMPLS = ("auto", "logits", "fused")
DTYPES = ("float32", "bfloat16", "float16")
ON_NONFINITE = ("error", "skip", "rollback")
ON_BAD_CHECKPOINT = ("fallback", "error")


def _require(ok: bool, key: str, message: str):
  if not ok:
    raise ConfigError(f"config.{key}: {message}")


def _positive_ints(section, name, keys):
  for k in keys:
    v = section[k]
    _require(isinstance(v, int) and v > 0, f"{name}.{k}", f"must be a positive integer, got {v!r}")


def mesh_shape(config, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) with -1 filled from the device count."""
  sizes = [config.mesh[a] for a in sharding.MESH_AXES]
  fill = [i for i, s in enumerate(sizes) if s == -1]
  _require(len(fill) <= 1, "mesh", f"at most one axis may be -1, got {dict(zip(sharding.MESH_AXES, sizes))}")
  for axis, s in zip(sharding.MESH_AXES, sizes):
    _require(s == -1 or (isinstance(s, int) and s > 0), f"mesh.{axis}", f"must be -1 or positive, got {s!r}")
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
  m, d, data, o, sde, t = (config.model, config.diffusion, config.data, config.optim, config.sde,
                           config.train)
  _positive_ints(config.vocab, "vocab", ("text_size", "image_size", "audio_size"))
  for name, value in (config.get("seeds") or {}).items():
    _require(name in derived.SEED_PURPOSES, f"seeds.{name}",
             f"unknown seed purpose; known {derived.SEED_PURPOSES}")
    _require(isinstance(value, int) and value >= -1, f"seeds.{name}",
             f"must be an int >= -1 (-1: config.seed), got {value!r}")
  _positive_ints(m, "model", ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                              "base_width", "base_depth"))
  _require(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads",
           f"{m.n_kv_heads} must divide model.n_heads={m.n_heads}")
  _require(m.head_dim % 2 == 0, "model.head_dim", f"must be even for RoPE, got {m.head_dim}")
  _require(m.dtype in DTYPES, "model.dtype", f"{m.dtype!r} not in {DTYPES}")
  _require(m.param_dtype in DTYPES, "model.param_dtype", f"{m.param_dtype!r} not in {DTYPES}")
  _require(m.attention_impl in attention.IMPLS, "model.attention_impl",
           f"{m.attention_impl!r} not in {attention.IMPLS}")
  _require(m.remat in REMAT, "model.remat", f"{m.remat!r} not in {REMAT}")
  _require(isinstance(m.scan_layers, bool), "model.scan_layers",
           f"must be true or false, got {m.scan_layers!r}")
  _require(m.loss_impl in LOSS_IMPLS, "model.loss_impl", f"{m.loss_impl!r} not in {LOSS_IMPLS}")
  _require(m.init_std > 0, "model.init_std", "must be > 0")

  for name in ("text", "image", "audio"):
    _require(d.schedule[name] in schedules.SCHEDULES, f"diffusion.schedule.{name}",
             f"{d.schedule[name]!r} not in {schedules.SCHEDULES}")
  _require(0.0 < d.t_min < 0.5, "diffusion.t_min", f"must be in (0, 0.5), got {d.t_min}")
  _require(d.time_sampling in objective.TIME_SAMPLING, "diffusion.time_sampling",
           f"{d.time_sampling!r} not in {objective.TIME_SAMPLING}")
  _require(d.noise_keys in objective.NOISE_KEYS, "diffusion.noise_keys",
           f"{d.noise_keys!r} not in {objective.NOISE_KEYS}")
  _require(d.loss_norm in objective.LOSS_NORMS, "diffusion.loss_norm",
           f"{d.loss_norm!r} not in {objective.LOSS_NORMS}")
  for k in ("cond_target_only_prob", "cond_drop_prob"):
    _require(0.0 <= d[k] <= 1.0, f"diffusion.{k}", f"must be in [0, 1], got {d[k]}")
  _require(d.cond_target_only_prob + d.cond_drop_prob <= 1.0, "diffusion.cond_drop_prob",
           "cond_target_only_prob + cond_drop_prob must be <= 1")

  _positive_ints(data, "data", ("seq_len", "global_batch", "max_segments", "eval_batches"))
  for name, w in data.mixture.items():
    _require(isinstance(w, (int, float)) and w > 0, f"data.mixture.{name}",
             f"mixture weights must be positive, got {w!r}")
  _require(data.source in ("synthetic", "prepared"), "data.source",
           f"{data.source!r} not in ('synthetic', 'prepared')")
  _require(data.source != "prepared" or bool(data.data_dir), "data.data_dir",
           "data.source='prepared' needs data.data_dir (run python -m tmdiff.data.prepare)")
  _require(isinstance(data.pack_pairs, bool), "data.pack_pairs",
           f"must be True or False, got {data.pack_pairs!r}")
  _require(not data.pack_pairs or data.max_segments >= 2, "data.max_segments",
           f"data.pack_pairs puts several pairs in a row; needs >= 2, got {data.max_segments}")
  if d.anti_masking:
    _require(data.global_batch % 2 == 0, "data.global_batch",
             f"anti-masking pairs rows, so the batch must be even, got {data.global_batch}")

  for k in ("lr", "beta1", "beta2", "eps"):
    _require(o[k] > 0, f"optim.{k}", f"must be > 0, got {o[k]}")
  _require(o.beta1 < 1 and o.beta2 < 1, "optim.beta2", "betas must be < 1")
  _require(o.schedule in OPTIM_SCHEDULES, "optim.schedule", f"{o.schedule!r} not in {OPTIM_SCHEDULES}")
  _require(0 <= o.warmup_frac < 1, "optim.warmup_frac", f"must be in [0, 1), got {o.warmup_frac}")
  _require(0 <= o.decay_frac <= 1 and o.warmup_frac + o.decay_frac <= 1, "optim.decay_frac",
           "warmup_frac + decay_frac must be <= 1")
  _require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
  _require(0 <= o.ema_decay < 1, "optim.ema_decay", "must be in [0, 1)")
  _require(o.clip_norm >= 0, "optim.clip_norm", "must be >= 0 (0 disables clipping)")
  _require(isinstance(o.grad_accum, int) and o.grad_accum >= 1, "optim.grad_accum",
           f"must be a positive integer, got {o.grad_accum!r}")
  _require(data.global_batch % o.grad_accum == 0, "optim.grad_accum",
           f"{o.grad_accum} must divide data.global_batch={data.global_batch}")
  if sde.enabled:
    for k in ("batch_base", "tokens_base", "gamma"):
      _require(sde[k] > 0, f"sde.{k}", f"must be > 0, got {sde[k]}")
  _require(t.steps > 0 or t.tokens > 0, "train.steps", "set train.steps or train.tokens")
  for k in ("log_every", "ckpt_every", "keep_checkpoints"):
    _require(t[k] >= 1, f"train.{k}", f"must be >= 1, got {t[k]}")
  _require(t.on_nonfinite in ON_NONFINITE, "train.on_nonfinite",
           f"{t.on_nonfinite!r} not in {ON_NONFINITE}")
  _require(t.on_bad_checkpoint in ON_BAD_CHECKPOINT, "train.on_bad_checkpoint",
           f"{t.on_bad_checkpoint!r} not in {ON_BAD_CHECKPOINT}")
  for k in ("nonfinite_limit", "preemption_check_every"):
    _require(isinstance(t[k], int) and t[k] >= 1, f"train.{k}",
             f"must be an integer >= 1, got {t[k]!r}")
  _require(isinstance(t.rollback_skip, int) and t.rollback_skip >= 0, "train.rollback_skip",
           f"must be an integer >= 0, got {t.rollback_skip!r}")
  _require(config.mesh.rules in sharding.RULES, "mesh.rules",
           f"{config.mesh.rules!r} not in {sorted(sharding.RULES)}")

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
  derive(config)  # raises on a batch above the critical batch
