"""Generate from a checkpoint: text, text-to-image, text-to-speech, or infilling.

  python -m tmdiff.sample --workdir=runs/tiny --task=t2i --prompt="one shape: large red circle center." --out=/tmp/a.png
  python -m tmdiff.sample --workdir=runs/tiny --task=t2s --prompt="hello there" --out=/tmp/a.wav
  python -m tmdiff.sample --workdir=runs/tiny --task=text --prompt="KING." --out=/tmp/a.txt
  python -m tmdiff.sample --workdir=runs/tiny --task=infill --prompt="To be, ____ be" --out=b.txt

The model is rebuilt from the config saved with the checkpoint (latest, or --step), restored
onto all local devices (a data-parallel mesh), and sampled with the per-modality defaults of
`config.sampling` (base config defaults when the checkpoint predates them), updated by
`<workdir>/sampling_defaults.json` when `python -m tmdiff.eval.sweep` wrote one; flags
override them. Tokenizers come from the data directory's manifest (`config.data.data_dir`, or
--data_dir). The same --seed gives the same output. Layouts follow the training pipeline:
  text    <bos> prompt <mask>...                       (--length tokens in all)
  t2i     <bos> caption <boi> <mask> x image_tokens <eoi> <eos>
  t2s     <bos> transcript <boa> <mask> x N <eoa> <eos> (N from the data's audio/transcript ratio)
  infill  <bos> text with each `____` -> --infill_tokens masks <eos>
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time

import numpy as np
from absl import app, flags, logging

from tmdiff.data.sources import CAPTION_GRAMMAR, caption_problems
from tmdiff.diffusion.prompts import PLACEHOLDER, TASK_MODALITY, TASKS, SampleError, build_prompt

_WORKDIR = flags.DEFINE_string("workdir", None, "run directory holding checkpoints/")
_TASK = flags.DEFINE_string("task", None, f"one of {TASKS}")
_PROMPT = flags.DEFINE_string(
    "prompt", "", "prompt text / caption / transcript. A t2i caption for the embedded images "
    f"follows their grammar (others are flagged as out of distribution): {CAPTION_GRAMMAR}")
_OUT = flags.DEFINE_string("out", None, "output file (.txt for text/infill, .png t2i, .wav t2s)")
_NUM = flags.DEFINE_integer("num", 1, "samples (a PNG grid; WAVs get -i suffixes)")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
_DATA_DIR = flags.DEFINE_string("data_dir", None,
                                "prepared data dir (default: config.data.data_dir)")
_LENGTH = flags.DEFINE_integer("length", None, "text: total tokens (default: data.seq_len)")
_INFILL_TOKENS = flags.DEFINE_integer("infill_tokens", 8, f"infill: masks per {PLACEHOLDER!r}")
_AUDIO_TOKENS = flags.DEFINE_integer("audio_tokens", None, "t2s: audio tokens (default: estimated)")
_SCALE = flags.DEFINE_integer("png_scale", 4, "t2i: nearest-neighbour upscaling of the PNG")
_STEPS = flags.DEFINE_integer("steps", None, "override sampling.<modality>.steps")
_METHOD = flags.DEFINE_string("method", None, "override sampling.<modality>.method")
_SCHEDULE = flags.DEFINE_string("schedule", None, "override sampling.<modality>.schedule")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "override sampling.<modality>.temperature")
_TOP_K = flags.DEFINE_integer("top_k", None, "override sampling.<modality>.top_k")
_TOP_P = flags.DEFINE_float("top_p", None, "override sampling.<modality>.top_p")
_CFG_SCALE = flags.DEFINE_float("cfg_scale", None, "override sampling.<modality>.cfg_scale")


# --- data ------------------------------------------------------------------------------------
def audio_tokens_per_text_token(manifest) -> float:
  """Audio tokens per transcript token in the prepared training data (duration estimate)."""
  try:
    counts = manifest.tokens["audio_text"]["train"]
    return counts["audio"] / max(counts["transcript"], 1)
  except (KeyError, TypeError):
    return 31.25 / 6.0  # fallback: 31.25 tokens/s at ~6 text tokens per second of speech


# --- outputs ---------------------------------------------------------------------------------
def decode_text(ids: np.ndarray, layout, text_tokenizer) -> str:
  """Text ids up to the first <eos>; other special tokens are dropped."""
  from tmdiff.data import vocab as vocab_lib
  ids = np.asarray(ids)
  eos = np.flatnonzero(ids == layout.eos)
  if eos.size:
    ids = ids[:eos[0]]
  start, stop = layout.text_range
  ids = ids[(ids >= start) & (ids < stop)]
  return text_tokenizer.decode(layout.to_local(ids, vocab_lib.TEXT))


def _suffixed(path: str, i: int, n: int) -> str:
  if n == 1:
    return path
  root, ext = os.path.splitext(path)
  return f"{root}-{i}{ext}"


# --- sampling --------------------------------------------------------------------------------
def run(workdir: str, task: str, prompt_text: str, out: str, *, num: int = 1, seed: int = 0,
        step: int | None = None, data_dir: str | None = None, length: int | None = None,
        infill_tokens: int = 8, audio_tokens: int | None = None, png_scale: int = 4,
        overrides: dict | None = None) -> dict:
  """Restores, samples, decodes and writes `out`; returns a summary dict."""
  if task not in TASKS:
    raise SampleError(f"unknown task {task!r}; choose from {TASKS}")
  if num < 1:
    raise SampleError(f"--num must be >= 1, got {num}")
  expected_ext = {"text": ".txt", "infill": ".txt", "t2i": ".png", "t2s": ".wav"}[task]
  if not out or os.path.splitext(out)[1].lower() != expected_ext:
    raise SampleError(f"task {task} writes {expected_ext}; got --out={out!r}")
  import flax.linen as nn
  import jax
  from tmdiff.data import records
  from tmdiff.data import tokenizers
  from tmdiff.data import vocab as vocab_lib
  from tmdiff.diffusion import sampling
  from tmdiff.train import restore as restore_lib

  config, _ = restore_lib.load_config(workdir, step)
  layout = vocab_lib.VocabLayout.from_config(config.vocab)
  data_dir = restore_lib.resolve_data_dir(config, workdir, data_dir)
  manifest = records.Manifest.load(data_dir)
  needed = {"text": ("text",), "infill": ("text",), "t2i": ("text", "image"),
            "t2s": ("text", "audio")}[task]
  toks = tokenizers.load_prepared(data_dir, needed)
  for name in needed:
    if name not in toks:
      raise SampleError(f"{data_dir}/{records.MANIFEST} lists no {name} tokenizer (got "
                        f"{manifest.tokenizers.get(name)!r}); prepare the data with one")

  image_tokens = int(toks["image"].tokens_per_image) if "image" in toks else 0
  if task == "t2s":
    multiple = int(getattr(getattr(toks["audio"], "config", None), "codes_per_step", 1))
    if audio_tokens is None:  # duration estimate from the transcript, whole token steps
      n_text = len(toks["text"].encode(prompt_text)) if prompt_text else 0
      estimate = audio_tokens_per_text_token(manifest) * n_text
      audio_tokens = max(8, multiple * int(round(estimate / multiple)))
    if audio_tokens < 1 or audio_tokens % multiple:
      raise SampleError(f"--audio_tokens={audio_tokens} must be a positive multiple of the audio "
                        f"tokenizer's codes_per_step ({multiple})")
  problems = caption_problems(prompt_text) if task == "t2i" else []
  if problems and manifest.extra.get("image_captions", "procedural") == "procedural":
    logging.warning("--prompt is out of distribution for the training captions (%s); they follow "
                    "`COUNT shape(s): SIZE COLOUR SHAPE POSITION, ...`, e.g. 'one shape: large "
                    "red circle center.' (--helpfull shows the grammar)", "; ".join(problems))
  prompt = build_prompt(task, prompt_text, layout, toks["text"],
                        length=length or int(config.data.seq_len), image_tokens=image_tokens,
                        audio_tokens=audio_tokens or 0, infill_tokens=infill_tokens)

  modality_name = TASK_MODALITY[task]
  settings = sampling.settings_from_config(config, modality_name)
  settings = settings.replace(**(overrides or {}))

  run = restore_lib.restore(workdir, step=step, config=config)
  trainer, mesh, params = run.trainer, run.mesh, run.params
  n_rows = len(prompt.tokens)
  batch = {
      "tokens": np.tile(prompt.tokens, (num, 1)),
      "positions": np.tile(np.arange(n_rows, dtype=np.int32), (num, 1)),
      "segment_ids": np.ones((num, n_rows), np.int32),
      "modality": np.tile(prompt.modality, (num, 1)),
      "cond_mask": np.tile(prompt.cond_mask, (num, 1)),
  }
  data_size = mesh.shape["data"]
  sharding = trainer.batch_sharding if num % data_size == 0 else trainer.replicated
  batch = {k: jax.device_put(v, sharding) for k, v in batch.items()}
  denoise = restore_lib.model_denoiser(trainer.graphdef)
  started = time.time()
  with contextlib.ExitStack() as stack:
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(trainer.rules))
    out_tokens = sampling.sample(denoise, batch, jax.random.key(seed), settings,
                                 mask_id=layout.mask, params=params,
                                 logit_bias=sampling.logit_bias(layout, strict=True))
    out_tokens = np.asarray(jax.device_get(out_tokens))
  seconds = time.time() - started

  generated = out_tokens[:, prompt.target]
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  written, texts = [], []
  if task in ("text", "infill"):
    texts = [decode_text(row, layout, toks["text"]) for row in generated]
    with open(out, "w") as f:
      for i, text in enumerate(texts):
        if num > 1:
          f.write(f"=== sample {i} ===\n")
        f.write(text.rstrip("\n") + "\n")
    written.append(out)
  elif task == "t2i":
    from tmdiff.data.tokenizers import image as image_lib
    images = np.stack([toks["image"].decode(layout.to_local(row, vocab_lib.IMAGE))
                       for row in generated])
    image_lib.write_png(out, image_lib.image_grid(images, scale=png_scale))
    written.append(out)
  else:
    from tmdiff.data.tokenizers import audio as audio_lib
    rate = int(manifest.extra.get("audio_sample_rate", audio_lib.SAMPLE_RATE))
    for i, row in enumerate(generated):
      wave = toks["audio"].decode(layout.to_local(row, vocab_lib.AUDIO))
      path = _suffixed(out, i, num)
      audio_lib.write_wav(path, wave, rate)
      written.append(path)
  summary = {"task": task, "prompt": prompt_text, "checkpoint_step": run.step,
             "settings": dataclasses.asdict(settings), "num": num, "seed": seed,
             "sequence_tokens": n_rows, "generated_tokens": int(generated.shape[1]),
             "sampling_seconds": round(seconds, 3), "outputs": written}
  if texts:
    summary["texts"] = texts
  if task == "t2i":
    summary["caption_problems"] = problems
  if task == "t2s":
    summary["audio_seconds"] = round(generated.shape[1] / float(
        manifest.extra.get("audio_tokens_per_second", 31.25)), 2)
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value or not _TASK.value or not _OUT.value:
    raise app.UsageError("--workdir, --task and --out are required")
  overrides = {"steps": _STEPS.value, "method": _METHOD.value, "schedule": _SCHEDULE.value,
               "temperature": _TEMPERATURE.value, "top_k": _TOP_K.value, "top_p": _TOP_P.value,
               "cfg_scale": _CFG_SCALE.value}
  summary = run(_WORKDIR.value, _TASK.value, _PROMPT.value, _OUT.value, num=_NUM.value,
                seed=_SEED.value, step=_STEP.value, data_dir=_DATA_DIR.value,
                length=_LENGTH.value, infill_tokens=_INFILL_TOKENS.value,
                audio_tokens=_AUDIO_TOKENS.value, png_scale=_SCALE.value, overrides=overrides)
  print(json.dumps(summary, indent=2))


def user_errors() -> tuple:
  from tmdiff.configs.derived import ConfigError
  from tmdiff.data.records import RecordError
  from tmdiff.data.tokenizers import TokenizerLoadError
  from tmdiff.diffusion.sampling import SamplerError
  from tmdiff.train.checkpoint import CheckpointError
  return (SampleError, SamplerError, CheckpointError, RecordError, TokenizerLoadError,
          ConfigError)


if __name__ == "__main__":
  from tmdiff import entry
  entry.run_app(main, "tmdiff.sample", user_errors())
