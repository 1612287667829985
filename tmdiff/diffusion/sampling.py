"""Samplers for absorbing-state masked diffusion: jitted, batched loops over a denoiser.

A denoiser is a plain function `denoise_fn(tokens, positions, segment_ids, modality) -> logits`
([B, L] int32 inputs, [B, L, V] float32 logits), or, when `params` is passed to `sample`,
`denoise_fn(params, tokens, positions, segment_ids, modality)` so weights stay jit arguments.

Every position that holds `<mask>` on entry is generated; every other position (prompt,
condition, boundaries, padding) is returned unchanged. Logits are restricted per position
modality by `logit_bias` ([3, V], 0 allowed / -inf not). Time runs from t = 1 (all masked)
to t = 0 over `steps` fixed steps; step k goes from t_k = 1 - k/steps to s = 1 - (k+1)/steps;
the last step reveals whatever is still masked, so no `<mask>` is left.

Methods (`SamplerSettings.method`):
  ancestral   the exact reverse posterior of the absorbing process: each masked token is
              revealed with probability (alpha_s - alpha_t) / (1 - alpha_t), its value drawn
              from the model's categorical. Optional ReMDM remasking (`remask_eta` > 0):
              generated tokens are remasked with probability sigma_t = min(eta, (1 - alpha_s) /
              alpha_t) spread towards low confidence, and masked tokens are revealed with
              (alpha_s - (1 - sigma_t) alpha_t) / (1 - alpha_t), so the clean fraction at s stays
              alpha_s.
  confidence  reveal the most confident masked positions; the number still masked after a
              step follows 1 - alpha(s) of `schedule` (linear, cosine, ...).
  maskgit     `confidence` whose ranking carries Gumbel noise of scale choice_temperature *
              (1 - progress), annealed to 0 (MaskGIT); use with schedule='cosine'.
  threshold   reveal every masked position whose confidence exceeds `threshold` (at least the
              most confident one per step; everything at the last step).

Confidence (`SamplerSettings.confidence`): 'sampled' = probability of the drawn token (MaskGIT,
LLaDA); 'max_prob' = the position's largest probability. 'max_prob' does not depend on the
drawn value, so the choice of positions does not bias the revealed values; 'sampled' favours
modes (a sharper, not an exact, sampler).

Classifier-free guidance: with `cond_mask` in the inputs and cfg_scale != 1, logits are
uncond + cfg_scale * (cond - uncond), the unconditional pass seeing `<mask>` on the condition
positions (as in training's condition dropout); outside `cfg_window` (a t interval) the scale
is 1. Scale 0 is the unconditional model, scale 1 the conditional one.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tmdiff.data import vocab as vocab_lib
from tmdiff.diffusion import objective as obj_lib
from tmdiff.diffusion import schedules as schedules_lib

METHODS = ("ancestral", "confidence", "maskgit", "threshold")
CONFIDENCES = ("sampled", "max_prob")
NEG_INF = -jnp.inf


class SamplerError(ValueError):
  """Invalid sampler settings or inputs; the message names the setting."""


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  method: str = "ancestral"
  steps: int = 64
  schedule: str = "linear"         # alpha(t): reveal probabilities / masked fraction per step
  temperature: float = 1.0         # 0 = greedy (argmax)
  top_k: int = 0                   # 0 = off
  top_p: float = 1.0               # 1 = off
  cfg_scale: float = 1.0           # 1 = plain conditional, 0 = unconditional
  cfg_window: tuple = (0.0, 1.0)   # guidance only while t_lo <= t <= t_hi
  confidence: str = "sampled"      # confidence / maskgit / threshold ranking
  choice_temperature: float = 4.5  # maskgit: initial Gumbel scale on the ranking
  threshold: float = 0.9           # threshold: reveal positions with confidence above this
  remask_eta: float = 0.0          # ancestral: ReMDM-cap remasking strength, 0 = off

  def __post_init__(self):
    object.__setattr__(self, "cfg_window", tuple(float(x) for x in self.cfg_window))
    self.validate()

  def validate(self) -> None:
    def need(ok, key, msg):
      if not ok:
        raise SamplerError(f"sampler setting {key}: {msg}")
    need(self.method in METHODS, "method", f"unknown {self.method!r}; choose from {METHODS}")
    need(isinstance(self.steps, int) and self.steps >= 1, "steps",
         f"must be a positive int, got {self.steps!r}")
    need(self.schedule in schedules_lib.SCHEDULES, "schedule",
         f"unknown {self.schedule!r}; choose from {schedules_lib.SCHEDULES}")
    need(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
    need(isinstance(self.top_k, int) and self.top_k >= 0, "top_k",
         f"must be an int >= 0, got {self.top_k!r}")
    need(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
    need(len(self.cfg_window) == 2 and self.cfg_window[0] <= self.cfg_window[1], "cfg_window",
         f"must be (t_lo, t_hi) with t_lo <= t_hi, got {self.cfg_window}")
    need(self.confidence in CONFIDENCES, "confidence",
         f"unknown {self.confidence!r}; choose from {CONFIDENCES}")
    need(self.choice_temperature >= 0, "choice_temperature", "must be >= 0")
    need(0 <= self.threshold <= 1, "threshold", f"must be in [0, 1], got {self.threshold}")
    need(self.remask_eta >= 0, "remask_eta", f"must be >= 0, got {self.remask_eta}")
    need(self.remask_eta == 0 or self.method == "ancestral", "remask_eta",
         f"remasking is implemented for method='ancestral' only, not {self.method!r}")

  def replace(self, **changes) -> "SamplerSettings":
    return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


FIELDS = tuple(f.name for f in dataclasses.fields(SamplerSettings))


def settings_from_config(sampling_cfg, modality: str) -> SamplerSettings:
  """SamplerSettings from `config.sampling.<modality>` (text | image | audio)."""
  if modality not in vocab_lib.MODALITIES:
    raise SamplerError(f"unknown modality {modality!r}; choose from {vocab_lib.MODALITIES}")
  block = sampling_cfg[modality]
  values = {k: block[k] for k in FIELDS if k in block}
  if "cfg_window" in values:
    values["cfg_window"] = tuple(values["cfg_window"])
  return SamplerSettings(**values)


def logit_bias(layout: vocab_lib.VocabLayout, *, strict: bool = False) -> np.ndarray:
  """[3, V_padded] additive bias. strict=False: `modality_logit_bias` (own range + structural
  specials); strict=True: image/audio positions may only take their own codebook ids, text
  positions text ids and <eos> (what a decoder can turn back into an image / wave / string)."""
  bias = obj_lib.modality_logit_bias(layout)
  if not strict:
    return bias
  bias = np.full_like(bias, -np.inf)
  for m in range(len(vocab_lib.MODALITIES)):
    start, stop = layout.range_of(m)
    bias[m, start:stop] = 0.0
  bias[vocab_lib.TEXT, layout.eos] = 0.0
  return bias


# --- logits processing --------------------------------------------------------------------
def _is(value, constant) -> bool:
  """True when `value` is a Python number equal to `constant` (a traced value never is)."""
  return isinstance(value, (int, float)) and value == constant


def filter_logits(logits, *, temperature=1.0, top_k: int = 0, top_p=1.0):
  """Temperature, then top-k, then top-p (nucleus) over the last axis; removed ids get -inf.
  temperature and top_p may be traced scalars; Python 1.0 skips the operation."""
  if not _is(temperature, 1.0):
    logits = logits / temperature
  if top_k > 0 and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, NEG_INF, logits)
  if not _is(top_p, 1.0):
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)
    cutoff = jnp.min(kept, axis=-1, keepdims=True)  # smallest kept logit
    logits = jnp.where(logits < cutoff, NEG_INF, logits)
  return logits


def guided_logits(call_denoiser, tokens, positions, segment_ids, modality, cond_mask, *,
                  mask_id: int, scale, use_guidance: bool):
  """Conditional logits, or uncond + scale * (cond - uncond) with the condition masked out."""
  if not use_guidance:
    return call_denoiser(tokens, positions, segment_ids, modality)
  uncond_tokens = jnp.where(cond_mask, mask_id, tokens)
  both = call_denoiser(*(jnp.concatenate([a, b], axis=0) for a, b in (
      (tokens, uncond_tokens), (positions, positions), (segment_ids, segment_ids),
      (modality, modality))))
  cond, uncond = jnp.split(both.astype(jnp.float32), 2, axis=0)
  return uncond + scale * (cond - uncond)


def _rank_descending(score):
  """Rank of each entry in its row, 0 = largest (ties broken by position)."""
  order = jnp.argsort(-score, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1, stable=True)


# --- the loop --------------------------------------------------------------------------------
# Settings that only change values, not the program: traced, so sweeps reuse one compilation.
DYNAMIC = ("steps", "temperature", "top_p", "cfg_scale", "cfg_window", "choice_temperature",
           "threshold", "remask_eta")


def _split_settings(s: SamplerSettings):
  """-> (static settings with canonical dynamic values, dict of traced values). The static part
  keeps what changes the program: greedy or not, nucleus on/off, guidance on/off, remasking."""
  static = dataclasses.replace(
      s, steps=1, temperature=0.0 if s.temperature == 0 else 1.0,
      top_p=1.0 if s.top_p >= 1.0 else 0.5, cfg_scale=1.0 if s.cfg_scale == 1.0 else 0.0,
      cfg_window=(0.0, 1.0), choice_temperature=float(s.choice_temperature > 0), threshold=0.5,
      remask_eta=float(s.remask_eta > 0))
  values = {k: jnp.asarray(getattr(s, k), jnp.int32 if k == "steps" else jnp.float32)
            for k in DYNAMIC}
  return static, values


def _sample_impl(denoise_fn, static: SamplerSettings, mask_id: int, inputs, key, bias, params,
                 values):
  s = static
  v = values
  steps = v["steps"]
  tokens = jnp.asarray(inputs["tokens"], jnp.int32)
  positions = jnp.asarray(inputs["positions"], jnp.int32)
  segment_ids = jnp.asarray(inputs["segment_ids"], jnp.int32)
  modality = jnp.asarray(inputs["modality"], jnp.int32)
  cond_mask = inputs.get("cond_mask")
  use_guidance = cond_mask is not None and s.cfg_scale != 1.0  # static flag
  cond_mask = (jnp.zeros_like(tokens, bool) if cond_mask is None
               else jnp.asarray(cond_mask).astype(bool))
  schedule = schedules_lib.make_schedule(s.schedule)
  generated = tokens == mask_id                       # positions this call fills
  n_generated = generated.sum(-1, keepdims=True)      # [B, 1]
  position_bias = None if bias is None else jnp.asarray(bias, jnp.float32)[modality]

  def call_denoiser(*args):
    out = denoise_fn(*args) if params is None else denoise_fn(params, *args)
    return out.astype(jnp.float32)

  def step(k, carry):
    tokens, confidence_of_revealed = carry
    t = 1.0 - k / steps
    t_next = 1.0 - (k + 1) / steps
    last = k == steps - 1
    k_draw, k_reveal, k_remask, k_noise = jax.random.split(jax.random.fold_in(key, k), 4)
    in_window = (t >= v["cfg_window"][0]) & (t <= v["cfg_window"][1])
    scale = jnp.where(in_window, v["cfg_scale"], 1.0)
    logits = guided_logits(call_denoiser, tokens, positions, segment_ids, modality, cond_mask,
                           mask_id=mask_id, scale=scale, use_guidance=use_guidance)
    if position_bias is not None:
      logits = logits + position_bias
    if s.temperature > 0:  # static: greedy decoding ignores the temperature
      logits = logits / v["temperature"]
    logits = filter_logits(logits, top_k=s.top_k,
                           top_p=v["top_p"] if s.top_p < 1.0 else 1.0)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    if s.temperature == 0:
      drawn = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
      drawn = jax.random.categorical(k_draw, logits, axis=-1).astype(jnp.int32)
    drawn_log_prob = jnp.take_along_axis(log_probs, drawn[..., None], axis=-1)[..., 0]
    if s.confidence == "sampled":
      score = drawn_log_prob
    else:
      score = jnp.max(log_probs, axis=-1)
    masked = tokens == mask_id

    if s.method == "ancestral":
      alpha_t, alpha_s = schedule.alpha(t), schedule.alpha(t_next)
      remask = jnp.zeros_like(masked)
      if s.remask_eta > 0:
        sigma = jnp.minimum(v["remask_eta"], (1.0 - alpha_s) / jnp.maximum(alpha_t, 1e-12))
        sigma = jnp.where(last, 0.0, sigma)
        # Spread the expected sigma * n remasks towards the least confident generated tokens.
        candidates = generated & ~masked
        n_candidates = candidates.sum(-1, keepdims=True)
        weights = jax.nn.softmax(jnp.where(candidates, -confidence_of_revealed, NEG_INF), -1)
        weights = jnp.where(candidates, weights, 0.0)
        remask_prob = jnp.clip(sigma * n_candidates * weights, 0.0, 1.0)
        remask = candidates & (jax.random.uniform(k_remask, masked.shape) < remask_prob)
        reveal_prob = (alpha_s - (1.0 - sigma) * alpha_t) / (1.0 - alpha_t)
      else:
        reveal_prob = (alpha_s - alpha_t) / (1.0 - alpha_t)
      reveal_prob = jnp.where(last, 1.0, jnp.clip(reveal_prob, 0.0, 1.0))
      reveal = masked & (jax.random.uniform(k_reveal, masked.shape) < reveal_prob)
    else:
      remask = jnp.zeros_like(masked)
      if s.method == "maskgit" and s.choice_temperature > 0:
        noise_scale = v["choice_temperature"] * (1.0 - (k + 1) / steps)
        score = score + noise_scale * jax.random.gumbel(k_noise, score.shape)
      rank = _rank_descending(jnp.where(masked, score, NEG_INF))
      n_masked = masked.sum(-1, keepdims=True)
      if s.method == "threshold":
        confident = jnp.exp(score) > v["threshold"]
        reveal = masked & (confident | (rank < 1) | last)
      else:
        # Masked count after this step follows 1 - alpha(s); reveal at least one per step.
        target = jnp.floor(n_generated * (1.0 - schedule.alpha(t_next)) + 1e-4).astype(jnp.int32)
        target = jnp.where(last, 0, jnp.minimum(target, n_generated))
        n_reveal = jnp.maximum(n_masked - target, jnp.minimum(n_masked, 1))
        reveal = masked & (rank < n_reveal)

    tokens = jnp.where(reveal, drawn, tokens)
    tokens = jnp.where(remask, mask_id, tokens)
    confidence_of_revealed = jnp.where(reveal, drawn_log_prob, confidence_of_revealed)
    return tokens, confidence_of_revealed

  init = (tokens, jnp.zeros(tokens.shape, jnp.float32))
  tokens, _ = jax.lax.fori_loop(0, steps, step, init)
  return tokens


_sample_jit = jax.jit(_sample_impl, static_argnums=(0, 1, 2))


def sample(denoise_fn: Callable, inputs: dict, key, settings: SamplerSettings, *, mask_id: int,
           logit_bias=None, params=None) -> jax.Array:
  """Fills every `<mask>` of inputs['tokens'] ([B, L]); returns the [B, L] int32 tokens.

  inputs: tokens, positions, segment_ids, modality, and optionally cond_mask (1 on the
  condition, used by guidance). `key` (a jax PRNG key) makes the result reproducible.
  `denoise_fn` is a jit static argument: pass the same function object to reuse compilations.
  """
  missing = [f for f in ("tokens", "positions", "segment_ids", "modality") if f not in inputs]
  if missing:
    raise SamplerError(f"sampler inputs lack {missing}")
  shape = tuple(np.shape(inputs["tokens"]))
  if len(shape) != 2:
    raise SamplerError(f"inputs['tokens'] must be [B, L], got shape {shape}")
  for name, value in inputs.items():
    if tuple(np.shape(value)) != shape:
      raise SamplerError(f"inputs[{name!r}] has shape {tuple(np.shape(value))}, tokens {shape}")
  inputs = {k: v for k, v in inputs.items()
            if k in ("tokens", "positions", "segment_ids", "modality", "cond_mask")}
  static, values = _split_settings(settings)
  return _sample_jit(denoise_fn, static, int(mask_id), inputs, key, logit_bias, params, values)


def reveal_step_probabilities(settings: SamplerSettings) -> np.ndarray:
  """[steps] probability that ancestral sampling reveals a given masked token at step k
  (no remasking); tests use it to predict the joint of tokens revealed in the same step."""
  schedule = schedules_lib.make_schedule(settings.schedule)
  still_masked, out = 1.0, []
  for k in range(settings.steps):
    t, t_next = 1.0 - k / settings.steps, 1.0 - (k + 1) / settings.steps
    if k == settings.steps - 1:
      p = 1.0
    else:
      a_t, a_s = float(schedule.alpha(t)), float(schedule.alpha(t_next))
      p = min(max((a_s - a_t) / (1.0 - a_t), 0.0), 1.0) if a_t < 1 else 1.0
    out.append(still_masked * p)
    still_masked *= 1.0 - p
  return np.asarray(out)
