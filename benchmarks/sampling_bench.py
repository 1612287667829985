"""Sampling throughput: the jitted sampler on a batch of generations, timed after compilation.

  python -m benchmarks.sampling_bench --config=experiments/tiny.py --batch=8 --length=1024 --steps=64

GPU, one line from the repo root (device tool; grain and ml-collections carried as wheels):

  python3 -m benchmarks.sampling_bench --config=experiments/ladder.py:size=m,hw=h100x1 --batch=8 --length=1024 --steps=64 --method=ancestral

The model is built from the config with fresh random weights (nothing is restored), its
parameters placed in the training shardings on all local devices (data-parallel mesh), compute
in `model.dtype` (bf16 by default; override with --config.model.dtype=float32). Each row is
`<bos>`, --prompt - 1 given text tokens, then `<mask>` up to --length; the sampler fills every
mask with the per-modality settings of `config.sampling.<--modality>` and the flags that
override them. Timings are medians of --repeats calls after one compiling call, synchronised with
`block_until_ready` (on CPU also the process CPU time, steadier on a shared host); `denoiser` is
one bare model call on the same batch (the share of the step the sampler cannot avoid).
tokens/s = batch * length / time of one sampling call. With blocks, steps = max(--steps,
blocks). Prints a markdown row for docs/benchmarks.md.
"""
from __future__ import annotations

import contextlib
import datetime
import functools
import os
import platform
import sys
import time

import flax.linen as nn
import jax
import numpy as np
from absl import flags
from flax import nnx
from ml_collections import config_flags

from benchmarks._timing import bench
from tmdiff.configs import validate as validate_lib
from tmdiff.data import vocab as vocab_lib
from tmdiff.diffusion import sampling
from tmdiff.model.transformer import Transformer
from tmdiff.train import flops as flops_lib
from tmdiff.train.restore import model_denoiser
from tmdiff.train.trainer import Trainer, make_mesh

# Own flag registry, apart from the global one that the tmdiff commands define their flags in.
FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file("config", "experiments/tiny.py", "experiment file[:arg]",
                                          flag_values=FLAGS)
_BATCH = flags.DEFINE_integer("batch", 8, "rows generated together", flag_values=FLAGS)
_LENGTH = flags.DEFINE_integer("length", 1024, "tokens per row", flag_values=FLAGS)
_PROMPT = flags.DEFINE_integer("prompt", 1, "given tokens at the start of each row (<bos> + text)",
                               flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("steps", 64, "sampling steps", flag_values=FLAGS)
_METHOD = flags.DEFINE_string("method", None, "override sampling.<modality>.method",
                              flag_values=FLAGS)
_BLOCK = flags.DEFINE_integer("block_length", None, "override sampling.<modality>.block_length",
                              flag_values=FLAGS)
_CFG = flags.DEFINE_float("cfg_scale", None, "override sampling.<modality>.cfg_scale (!= 1 runs "
                          "the guided double pass; the prompt is the condition)",
                          flag_values=FLAGS)
_MODALITY = flags.DEFINE_string("modality", "text", "which sampling defaults: text|image|audio",
                                flag_values=FLAGS)
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed sampling calls (median)", flag_values=FLAGS)


def device_name() -> str:
  dev = jax.devices()[0]
  if dev.platform != "cpu":
    return f"{jax.device_count()} x {dev.device_kind}"
  model = platform.processor() or "cpu"
  try:
    with open("/proc/cpuinfo") as f:
      model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return f"CPU {model}, {os.cpu_count()} cores"


def rows(layout, batch: int, length: int, prompt: int, seed: int = 0) -> dict:
  if not 1 <= prompt < length:
    raise SystemExit(f"sampling_bench: --prompt={prompt} must be in [1, --length={length})")
  rng = np.random.default_rng(seed)
  start, stop = layout.text_range
  tokens = np.full((batch, length), layout.mask, np.int32)
  tokens[:, 0] = layout.bos
  tokens[:, 1:prompt] = rng.integers(start, stop, (batch, prompt - 1))
  cond_mask = np.zeros((batch, length), np.int32)
  cond_mask[:, :prompt] = 1
  return {"tokens": tokens, "positions": np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
          "segment_ids": np.ones((batch, length), np.int32),
          "modality": np.zeros((batch, length), np.int32), "cond_mask": cond_mask}


def main(argv):
  rest = FLAGS(argv)
  if len(rest) > 1:
    raise SystemExit(f"sampling_bench: unexpected arguments {rest[1:]}")
  c = _CONFIG.value
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
  c.data.global_batch = _BATCH.value  # validated below: must divide over the devices
  validate_lib.validate(c, jax.device_count())
  if _MODALITY.value not in vocab_lib.MODALITIES:
    raise SystemExit(f"sampling_bench: --modality={_MODALITY.value!r} not in "
                     f"{vocab_lib.MODALITIES}")
  settings = sampling.settings_from_config(c, _MODALITY.value).replace(
      steps=_STEPS.value, method=_METHOD.value, block_length=_BLOCK.value, cfg_scale=_CFG.value)
  trainer = Trainer(c, make_mesh(c))
  layout = trainer.layout

  @functools.partial(jax.jit, out_shardings=trainer.state_sharding["params"])
  def init_params():
    model = Transformer(c.model, layout, rngs=nnx.Rngs(c.seed))
    return nnx.to_pure_dict(nnx.state(model))

  batch_np = rows(layout, _BATCH.value, _LENGTH.value, _PROMPT.value)
  batch = {k: jax.device_put(v, trainer.batch_sharding) for k, v in batch_np.items()}
  denoise = model_denoiser(trainer.graphdef)
  bias = sampling.logit_bias(layout, strict=True)
  key = jax.random.key(0)
  with contextlib.ExitStack() as stack:
    stack.enter_context(jax.set_mesh(trainer.mesh))
    stack.enter_context(nn.logical_axis_rules(trainer.rules))
    params = init_params()
    run = lambda: sampling.sample(denoise, batch, key, settings, mask_id=layout.mask,
                                  logit_bias=bias, params=params)
    t0 = time.perf_counter()
    out = jax.block_until_ready(run())
    first_s = time.perf_counter() - t0
    walls, cpus = [], []
    for _ in range(_REPEATS.value):
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(run())
      walls.append(time.perf_counter() - t0)
      cpus.append(time.process_time() - c0)
    ms, cpu_ms = float(np.median(walls) * 1e3), float(np.median(cpus) * 1e3)
    forward = jax.jit(denoise)
    args = [batch[k] for k in ("tokens", "positions", "segment_ids", "modality")]
    denoiser_ms = bench(forward, params, *args, warmup=1, iters=max(_REPEATS.value, 3))
  left = int(np.sum(np.asarray(out) == layout.mask))
  if left:
    raise SystemExit(f"sampling_bench: {left} masks left in the output")

  steps = settings.steps  # with blocks: max(steps, blocks in a row); reported when larger
  masked = int((batch_np["tokens"] == layout.mask).sum(-1).max())
  if settings.block_length:
    steps = max(steps, -(-masked // settings.block_length))
  seconds = ms / 1e3
  tokens_per_s = _BATCH.value * _LENGTH.value / seconds
  counts = flops_lib.param_counts(c.model, layout.padded_size())
  guided = settings.cfg_scale != 1.0
  extra = (f", block {settings.block_length}" if settings.block_length else "") + (
      f", cfg {settings.cfg_scale:g}" if guided else "")
  date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
  print(f"device: {device_name()}; jax {jax.__version__}; {date}")
  print(f"config: {FLAGS['config'].config_filename}: d_model {c.model.d_model}, "
        f"{c.model.n_layers} layers, {counts['total'] / 1e6:.2f}M params, vocab "
        f"{layout.padded_size()}, dtype {c.model.dtype}; settings {settings}")
  share = (2 if guided else 1) * denoiser_ms / (ms / steps)  # guided steps run two passes
  print(f"first call (compile + run) {first_s:.1f} s; sampling {ms:.1f} ms per call "
        f"(median of {_REPEATS.value}); denoiser {denoiser_ms:.2f} ms per call"
        f"{' (x2 per guided step)' if guided else ''}")
  print(f"{tokens_per_s:,.0f} tokens/s | {steps / seconds:.2f} steps/s | {ms / steps:.2f} ms/step"
        f" | denoiser {share:.0%} of a step")
  if jax.devices()[0].platform == "cpu":  # CPU time: steadier than wall time on a shared host
    print(f"process CPU time {cpu_ms / steps:.0f} ms/step (all threads)")
  print("| device | jax | date | model | B x L | method, steps | ms/step | steps/s | tokens/s | "
        "denoiser share |")
  print(f"| {device_name()} | {jax.__version__} | {date} | {counts['total'] / 1e6:.2f}M "
        f"(d{c.model.d_model}, {c.model.n_layers} layers, {c.model.dtype}) | {_BATCH.value} x "
        f"{_LENGTH.value} | {settings.method}, {steps}{extra} | {ms / steps:.2f} | "
        f"{steps / seconds:.2f} | {tokens_per_s:,.0f} | {share:.0%} |")


if __name__ == "__main__":
  main(sys.argv)
