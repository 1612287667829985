"""Samplers for absorbing-state masked diffusion: jitted, batched loops over a denoiser.

A denoiser is a plain function `denoise_fn(tokens, positions, segment_ids, modality) -> logits`
([B, L] int32 inputs, [B, L, V] float32 logits), or, when `params` is passed to `sample`,
`denoise_fn(params, tokens, positions, segment_ids, modality)` so weights stay jit arguments.

Every position that holds `<mask>` on entry is generated; every other position (prompt,
condition, boundaries, padding) is returned unchanged. Logits are restricted per position
modality by `logit_bias` ([3, V], 0 allowed / -inf not). Time runs from t = 1 (all masked)
to t = 0 over `steps` fixed steps; step k goes from t_k = 1 - k/steps to s = 1 - (k+1)/steps;
the last step reveals whatever is still masked, so no `<mask>` is left.

Methods (`SamplerSettings.method`, each a reveal rule in `REVEAL`):
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

Semi-autoregressive blocks (`block_length` > 0, as LLaDA's semi-AR remasking): a row's masked
positions, taken in order, are cut into blocks of `block_length` (the last may be shorter), so
blocks count masked positions, not row positions (an infilling gap or a prompt takes no block
room). Blocks are generated left to right: while block b runs, blocks < b are fixed context
(never remasked) and blocks > b stay `<mask>`. `steps` is the total over all blocks, split as
evenly as integers allow (block b runs steps ceil(b S / n) .. ceil((b+1) S / n) - 1 of S steps
for n blocks), and every block gets at least one step (S = max(steps, n)). Within a block the
method runs its own clock from t = 1 to 0 over the block's steps, so the denoiser budget is the
same with or without blocks. Rows of a batch may have different block counts; each row spreads
the same S steps over its own blocks. block_length = 0 is one block holding every masked position.

Confidence (`SamplerSettings.confidence`): 'sampled' = probability of the drawn token (MaskGIT,
LLaDA); 'max_prob' = the position's largest probability. 'max_prob' does not depend on the
drawn value, so the choice of positions does not bias the revealed values; 'sampled' favours
modes (a sharper, not an exact, sampler).

Classifier-free guidance: with `cond_mask` in the inputs and cfg_scale != 1, logits are
uncond + cfg_scale * (cond - uncond), the unconditional pass seeing `<mask>` on the condition
positions (as in training's condition dropout); outside `cfg_window` (a t interval; with
blocks, the block's clock) the scale is 1. Scale 0 is the unconditional model, scale 1 the
conditional one. With scale 1 (or no cond_mask) the loop runs one denoiser pass per step.

Cost per step: one denoiser call (two stacked on the batch with guidance) plus a few passes
over the [B, L, V] logits (bias, temperature, one inverse-CDF draw; top-p adds a 3-10 pass
search, top-k a lax.top_k); the loop is one `lax.fori_loop` with no host transfer inside.
Step k's randomness comes from fold_in(key, k), split into draw, reveal, remask and noise keys.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tmdiff.data import vocab as vocab_lib
from tmdiff.diffusion import objective as obj_lib
from tmdiff.diffusion import schedules as schedules_lib

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
  block_length: int = 0            # semi-autoregressive blocks of masked positions, 0 = off
  poly_exponent: float = 2.0       # schedule='polynomial': p; from config.diffusion (training's)

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
    need(self.poly_exponent > 0, "poly_exponent", f"must be > 0, got {self.poly_exponent}")
    need(isinstance(self.block_length, int) and self.block_length >= 0, "block_length",
         f"must be an int >= 0 (0 = no blocks), got {self.block_length!r}")
    need(self.remask_eta == 0 or self.method == "ancestral", "remask_eta",
         f"remasking is implemented for method='ancestral' only, not {self.method!r}")

  def replace(self, **changes) -> "SamplerSettings":
    return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


# Settings a `config.sampling.<modality>` block holds; schedule parameters (poly_exponent) come
# from config.diffusion, so sampling uses the schedule the model was trained with.
FIELDS = tuple(f.name for f in dataclasses.fields(SamplerSettings) if f.name != "poly_exponent")


def settings_from_config(config, modality: str) -> SamplerSettings:
  """SamplerSettings from `config.sampling.<modality>` (text | image | audio), with the schedule
  parameters of `config.diffusion`."""
  if modality not in vocab_lib.MODALITIES:
    raise SamplerError(f"unknown modality {modality!r}; choose from {vocab_lib.MODALITIES}")
  block = config.sampling[modality]
  values = {k: block[k] for k in FIELDS if k in block}
  if "cfg_window" in values:
    values["cfg_window"] = tuple(values["cfg_window"])
  return SamplerSettings(**values, poly_exponent=float(config.diffusion.poly_exponent))


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
    logits = jnp.where(logits > nucleus_floor(logits, top_p), logits, NEG_INF)
  return logits


# Nucleus search: split points per pass over the vocabulary, and a bound on the passes.
NUCLEUS_WAYS = 4
NUCLEUS_MAX_PASSES = 24


def nucleus_floor(logits, top_p):
  """[..., 1] value below the nucleus: top-p keeps exactly the ids with logits above it.

  The nucleus is the ids whose strictly more probable ids hold less than top_p of the mass
  (ties at the cutoff are kept), i.e. the logits >= a cutoff logit tau. XLA's sort of V logits
  per position costs more than a model call, so this brackets tau instead, lo < tau <= hi with
  mass(logits > lo) >= top_p and mass(logits > hi) < top_p: each pass reads the logits once (one
  variadic reduction) for the mass above NUCLEUS_WAYS split points of (lo, hi) and the spread of
  the logits inside (lo, hi]. Once (lo, hi] holds one distinct value in every row, that value is
  tau and `logits > lo` is the exact nucleus (typically 3-10 passes). Starts from hi = max and
  lo = max + log((1 - top_p) S / V) - 1 (S = sum exp(logit - max)), below which less than
  1 - top_p of the mass can lie. After NUCLEUS_MAX_PASSES (logits within float rounding of the
  cutoff) those few ids are kept too."""
  vocab = logits.shape[-1]
  top = jnp.max(logits, axis=-1, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  weights = jnp.exp(logits - top)
  total = jnp.sum(weights, axis=-1, keepdims=True)
  need = top_p * total                       # the mass above the cutoff stays below this
  lo = top + jnp.log(jnp.maximum((1.0 - top_p) * total / vocab, 1e-30)) - 1.0
  fractions = [(w + 1) / (NUCLEUS_WAYS + 1) for w in range(NUCLEUS_WAYS)]

  def combine(a, b):
    sums = tuple(x + y for x, y in zip(a[:-2], b[:-2]))
    return sums + (jnp.minimum(a[-2], b[-2]), jnp.maximum(a[-1], b[-1]))

  def refine(carry):
    lo, hi, passes, _ = carry
    taus = [lo + (hi - lo) * f for f in fractions]
    inside = (logits > lo) & (logits <= hi)
    operands = tuple(jnp.where(logits > tau, weights, 0.0) for tau in taus) + (
        jnp.where(inside, logits, jnp.inf), jnp.where(inside, logits, NEG_INF))
    inits = tuple(jnp.float32(x) for x in (0.0,) * NUCLEUS_WAYS + (jnp.inf, -jnp.inf))
    *masses, low, high = jax.lax.reduce(operands, inits, combine, (logits.ndim - 1,))
    settled = ~jnp.any(high > low)           # (lo, hi] held at most one value: done
    new_lo, new_hi = lo, hi
    for tau, mass in zip(taus, masses):
      below_cutoff = mass[..., None] >= need
      new_lo = jnp.where(below_cutoff, jnp.maximum(new_lo, tau), new_lo)
      new_hi = jnp.where(below_cutoff, new_hi, jnp.minimum(new_hi, tau))
    return (jnp.where(settled, lo, new_lo), jnp.where(settled, hi, new_hi), passes + 1, settled)

  def searching(carry):
    return ~carry[3] & (carry[2] < NUCLEUS_MAX_PASSES)

  lo, *_ = jax.lax.while_loop(searching, refine, (lo, top, jnp.int32(0), jnp.bool_(False)))
  return lo


def draw(key, logits, *, chunk: int = 256):
  """One id per row of the last axis with probability softmax(logits), by inverse CDF.

  Two uniforms per row instead of jax.random.categorical's V Gumbel draws (14-27x slower on CPU
  at V = 2560): the first picks a chunk of `chunk` ids with probability its mass, the second an
  id inside it with probability its share of the chunk, so float32 cumulative sums resolve
  probabilities to ~2^-23 of a chunk's mass rather than of the row's. Ids with -inf logits are
  never drawn. Returns (ids [...] int32, logsumexp(logits) [...])."""
  *lead, vocab = logits.shape
  top = jnp.max(logits, axis=-1, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  weights = jnp.exp(logits - top)
  pad = (-vocab) % chunk
  if pad:
    weights = jnp.pad(weights, [(0, 0)] * len(lead) + [(0, pad)])
  weights = weights.reshape(*lead, -1, chunk)
  chunk_cum = jnp.cumsum(jnp.sum(weights, axis=-1), axis=-1)   # [..., n_chunks]
  k_chunk, k_inner = jax.random.split(key)

  def pick(k, cum):
    """Index of the first cumulative mass above u * total, capped at the last one with mass."""
    total = cum[..., -1:]
    u = jax.random.uniform(k, total.shape, jnp.float32) * total
    return jnp.minimum(jnp.sum(cum <= u, axis=-1), jnp.sum(cum < total, axis=-1))

  c = pick(k_chunk, chunk_cum)                          # P(chunk) = its mass / S
  inner_weights = jnp.take_along_axis(weights, c[..., None, None], axis=-2)[..., 0, :]
  i = pick(k_inner, jnp.cumsum(inner_weights, axis=-1))  # P(id | chunk) = w / chunk mass
  ids = (c * chunk + i).astype(jnp.int32)
  return ids, top[..., 0] + jnp.log(chunk_cum[..., -1])


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


# --- reveal rules: which masked positions take their drawn token at a step ------------------
class Step(NamedTuple):
  """A step as a reveal rule sees it: [B, L] arrays, and [B, 1] for the block's clock."""
  j: jax.Array                       # step j of n within the current block
  n: jax.Array
  last: jax.Array                    # the block's last step
  alpha_t: jax.Array                 # alpha at the step's start t and at its end s
  alpha_s: jax.Array
  in_block: jax.Array                # the current block's generated positions
  masked: jax.Array
  active: jax.Array                  # masked and in the block: may be revealed now
  score: jax.Array | None            # log confidence of each drawn token; None for ancestral
  confidence_of_revealed: jax.Array  # remasking: each token's drawn log-probability
  keys: tuple                        # PRNG keys (reveal, remask, noise)


def reveal_ancestral(step: Step, settings: SamplerSettings, values: dict):
  """Reveal with probability (alpha_s - alpha_t) / (1 - alpha_t); with remasking, remask
  sigma_t of the block's generated tokens and reveal with (alpha_s - (1 - sigma_t) alpha_t) /
  (1 - alpha_t). Returns (reveal, remask or None)."""
  k_reveal, k_remask, _ = step.keys
  a_t, a_s = step.alpha_t, step.alpha_s
  remask = None
  if settings.remask_eta > 0:
    sigma = jnp.minimum(values["remask_eta"], (1.0 - a_s) / jnp.maximum(a_t, 1e-12))
    sigma = jnp.where(step.last, 0.0, sigma)
    remask = _remask_least_confident(step, sigma, k_remask)
    reveal_prob = (a_s - (1.0 - sigma) * a_t) / (1.0 - a_t)
  else:
    reveal_prob = (a_s - a_t) / (1.0 - a_t)
  reveal_prob = jnp.where(step.last, 1.0, jnp.clip(reveal_prob, 0.0, 1.0))
  return step.active & (jax.random.uniform(k_reveal, step.masked.shape) < reveal_prob), remask


def _remask_least_confident(step: Step, sigma, key):
  """Which of the block's generated tokens to remask: sigma times their number in expectation,
  the least confident most likely."""
  candidates = step.in_block & ~step.masked
  n_candidates = candidates.sum(-1, keepdims=True)
  weights = jax.nn.softmax(jnp.where(candidates, -step.confidence_of_revealed, NEG_INF), -1)
  weights = jnp.where(candidates, weights, 0.0)
  remask_prob = jnp.clip(sigma * n_candidates * weights, 0.0, 1.0)
  return candidates & (jax.random.uniform(key, step.masked.shape) < remask_prob)


def reveal_most_confident(step: Step, settings: SamplerSettings, values: dict):
  """The most confident masked positions, leaving floor(n_block (1 - alpha_s)) of the block
  masked; at least one per step."""
  rank = _rank_descending(jnp.where(step.active, step.score, NEG_INF))
  n_masked = step.active.sum(-1, keepdims=True)
  n_block = step.in_block.sum(-1, keepdims=True)
  target = jnp.floor(n_block * (1.0 - step.alpha_s) + 1e-4).astype(jnp.int32)
  target = jnp.where(step.last, 0, jnp.minimum(target, n_block))
  n_reveal = jnp.maximum(n_masked - target, jnp.minimum(n_masked, 1))
  return step.active & (rank < n_reveal), None


def reveal_maskgit(step: Step, settings: SamplerSettings, values: dict):
  """reveal_most_confident on scores plus Gumbel noise of scale choice_temperature *
  (1 - progress)."""
  score = step.score
  if settings.choice_temperature > 0:
    noise_scale = values["choice_temperature"] * (1.0 - (step.j + 1) / step.n)
    score = score + noise_scale * jax.random.gumbel(step.keys[2], score.shape)
  return reveal_most_confident(step._replace(score=score), settings, values)


def reveal_threshold(step: Step, settings: SamplerSettings, values: dict):
  """Every masked position whose confidence exceeds `threshold`, and at least the most
  confident one."""
  rank = _rank_descending(jnp.where(step.active, step.score, NEG_INF))
  confident = jnp.exp(step.score) > values["threshold"]
  return step.active & (confident | (rank < 1) | step.last), None


# The methods: (step, static settings, traced values) -> (reveal, remask or None), [B, L] bool.
REVEAL = {"ancestral": reveal_ancestral, "confidence": reveal_most_confident,
          "maskgit": reveal_maskgit, "threshold": reveal_threshold}
METHODS = tuple(REVEAL)


# --- the loop --------------------------------------------------------------------------------
# Settings that only change values, not the program: traced, so sweeps reuse one compilation.
DYNAMIC = ("steps", "temperature", "top_p", "cfg_scale", "cfg_window", "choice_temperature",
           "threshold", "remask_eta", "block_length")


def _split_settings(s: SamplerSettings):
  """-> (static settings with canonical dynamic values, dict of traced values). The static part
  keeps what changes the program: greedy or not, nucleus on/off, guidance on/off, remasking."""
  static = dataclasses.replace(
      s, steps=1, temperature=0.0 if s.temperature == 0 else 1.0,
      top_p=1.0 if s.top_p >= 1.0 else 0.5, cfg_scale=1.0 if s.cfg_scale == 1.0 else 0.0,
      cfg_window=(0.0, 1.0), choice_temperature=float(s.choice_temperature > 0), threshold=0.5,
      remask_eta=float(s.remask_eta > 0), block_length=0)
  values = {k: jnp.asarray(getattr(s, k), jnp.int32 if k in ("steps", "block_length")
                           else jnp.float32) for k in DYNAMIC}
  return static, values


def _ceil_div(a, b):
  return -(-a // b)


def block_plan(generated, steps, block_length):
  """Semi-autoregressive plan (jnp; traced values welcome).

  generated [B, L] bool (positions to fill), steps and block_length int scalars (0 = one block).
  Returns (block_of [B, L] int32: block index of each generated position, -1 elsewhere;
  n_blocks [B, 1] int32, at least 1; total_steps: max(steps, most blocks in a row))."""
  order = jnp.cumsum(generated, axis=-1, dtype=jnp.int32) - 1
  n_generated = generated.sum(-1, keepdims=True, dtype=jnp.int32)
  length = jnp.maximum(jnp.where(block_length > 0, block_length, n_generated), 1)
  block_of = jnp.where(generated, order // length, -1)
  n_blocks = jnp.maximum(_ceil_div(n_generated, length), 1)
  return block_of, n_blocks, jnp.maximum(steps, jnp.max(n_blocks))


def block_clock(k, n_blocks, total_steps):
  """Where global step k falls for each row: (block [B, 1], step within the block j, the
  block's step count n); block b owns steps ceil(b S / n_b) .. ceil((b+1) S / n_b) - 1."""
  block = k * n_blocks // total_steps
  first = _ceil_div(block * total_steps, n_blocks)
  n = _ceil_div((block + 1) * total_steps, n_blocks) - first
  return block, k - first, n


def _draw_and_score(key, logits, settings: SamplerSettings, need_scores: bool):
  """Drawn ids [B, L], their log-probabilities and the ranking score (both None unless
  need_scores)."""
  if settings.temperature == 0:
    drawn = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    log_norm = jax.nn.logsumexp(logits, axis=-1) if need_scores else None
  else:
    drawn, log_norm = draw(key, logits)
  if not need_scores:
    return drawn, None, None
  drawn_log_prob = jnp.take_along_axis(logits, drawn[..., None], axis=-1)[..., 0] - log_norm
  if settings.confidence == "sampled":
    return drawn, drawn_log_prob, drawn_log_prob
  return drawn, drawn_log_prob, jnp.max(logits, axis=-1) - log_norm


def _sample_impl(denoise_fn, static: SamplerSettings, mask_id: int, inputs, key, bias, params,
                 values):
  s = static
  v = values
  tokens = jnp.asarray(inputs["tokens"], jnp.int32)
  positions = jnp.asarray(inputs["positions"], jnp.int32)
  segment_ids = jnp.asarray(inputs["segment_ids"], jnp.int32)
  modality = jnp.asarray(inputs["modality"], jnp.int32)
  cond_mask = inputs.get("cond_mask")
  use_guidance = cond_mask is not None and s.cfg_scale != 1.0  # static flag
  cond_mask = (jnp.zeros_like(tokens, bool) if cond_mask is None
               else jnp.asarray(cond_mask).astype(bool))
  schedule = schedules_lib.from_config(s.schedule, s)
  generated = tokens == mask_id                       # positions this call fills
  block_of, n_blocks, total_steps = block_plan(generated, v["steps"], v["block_length"])
  position_bias = None if bias is None else jnp.asarray(bias, jnp.float32)[modality]
  reveal_rule = REVEAL[s.method]
  remasking = s.method == "ancestral" and s.remask_eta > 0
  need_scores = s.method != "ancestral" or remasking  # ancestral draws need no confidences

  def call_denoiser(*args):
    out = denoise_fn(*args) if params is None else denoise_fn(params, *args)
    return out.astype(jnp.float32)

  def step_logits(tokens, t):
    """Guided (inside cfg_window), biased, tempered and filtered logits [B, L, V]."""
    in_window = (t >= v["cfg_window"][0]) & (t <= v["cfg_window"][1])
    scale = jnp.where(in_window, v["cfg_scale"], 1.0)[..., None]
    logits = guided_logits(call_denoiser, tokens, positions, segment_ids, modality, cond_mask,
                           mask_id=mask_id, scale=scale, use_guidance=use_guidance)
    if position_bias is not None:
      logits = logits + position_bias
    if s.temperature > 0:  # static: greedy decoding ignores the temperature
      logits = logits / v["temperature"]
    return filter_logits(logits, top_k=s.top_k, top_p=v["top_p"] if s.top_p < 1.0 else 1.0)

  def step(k, carry):
    tokens, confidence_of_revealed = carry
    # Per-row clock of the current block ([B, 1]); without blocks t = 1 - k / steps.
    block, j, n = block_clock(k, n_blocks, total_steps)
    t, t_next = 1.0 - j / n, 1.0 - (j + 1) / n
    k_draw, k_reveal, k_remask, k_noise = jax.random.split(jax.random.fold_in(key, k), 4)
    drawn, drawn_log_prob, score = _draw_and_score(k_draw, step_logits(tokens, t), s,
                                                   need_scores)
    masked = tokens == mask_id
    in_block = block_of == block
    reveal, remask = reveal_rule(Step(
        j=j, n=n, last=j == n - 1, alpha_t=schedule.alpha(t), alpha_s=schedule.alpha(t_next),
        in_block=in_block, masked=masked, active=masked & in_block, score=score,
        confidence_of_revealed=confidence_of_revealed, keys=(k_reveal, k_remask, k_noise)), s, v)
    tokens = jnp.where(reveal, drawn, tokens)
    if remask is not None:
      tokens = jnp.where(remask, mask_id, tokens)
      confidence_of_revealed = jnp.where(reveal, drawn_log_prob, confidence_of_revealed)
    return tokens, confidence_of_revealed

  # The confidence carry is only read by remasking; otherwise a scalar placeholder.
  init = (tokens, jnp.zeros(tokens.shape if remasking else (), jnp.float32))
  tokens, _ = jax.lax.fori_loop(0, total_steps, step, init)
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
  schedule = schedules_lib.from_config(settings.schedule, settings)
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
