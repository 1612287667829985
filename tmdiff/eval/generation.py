"""Generation for evaluation: a restored checkpoint, prompts from the validation split, sampling
with one key per sample, and the three generation metrics.

  run = restore(workdir)                                    # config, params, mesh, tokenizers
  text = text_task(run, judge, num=16, settings=..., seed=0, batch_size=16)
  t2i = t2i_task(run, judge, num=16, ...); t2s = t2s_task(run, judge, num=16, ...)

Sample i is drawn with key fold_in(key(seed ^ task salt), i), the sampler vmapped over rows
and the model computing in float32, so a sample does not depend on the batch it is generated
in (batch size, device count) beyond float32 rounding.
Prompts (deterministic): text is unconditional (`<bos>` then masks up to data.seq_len); T2I
captions are the first validation image_text records' (their attributes are known); T2S
transcripts are the first validation audio_text records', each given its reference
utterance's number of audio tokens.
"""
from __future__ import annotations

import contextlib
import dataclasses

import jax
import numpy as np
from absl import logging

from tmdiff.data import vocab as vocab_lib
from tmdiff.diffusion import prompts as prompts_lib
from tmdiff.diffusion.prompts import SampleError
from tmdiff.train import restore as restore_lib

TASK_SALT = {"text": 0x7E47, "t2i": 0x7217, "t2s": 0x7255}


class EvalError(ValueError):
  """A user-facing eval problem (workdir, data dir, task); the message says what to fix."""


@dataclasses.dataclass
class Restored(restore_lib.Restored):
  data_dir: str | None          # None: synthetic data (no tokenizers, no prompts)
  tokenizers: dict
  sampling_defaults: dict       # what <workdir>/sampling_defaults.json applied


def restore(workdir: str, *, step: int | None = None, data_dir: str | None = None,
            devices=None) -> Restored:
  """The checkpoint's config and parameters on a data-parallel mesh of `devices` (all)."""
  from tmdiff.data import tokenizers
  from tmdiff.eval import elbo as elbo_lib
  config, tuned = restore_lib.load_config(workdir, step)
  config.model.dtype = elbo_lib.EVAL_DTYPE  # sampling too: see tmdiff.eval.elbo
  resolved = None
  if config.data.source == "prepared" or data_dir:
    try:
      resolved = restore_lib.resolve_data_dir(config, workdir, data_dir)
    except SampleError as e:
      raise EvalError(f"the checkpoint was trained on prepared data but {e}") from None
    config.data.source, config.data.data_dir = "prepared", resolved
  run = restore_lib.restore(workdir, step=step, config=config, devices=devices)
  toks = tokenizers.load_prepared(resolved) if resolved else {}
  return Restored(**{f.name: getattr(run, f.name) for f in dataclasses.fields(run)},
                  data_dir=resolved, tokenizers=toks, sampling_defaults=tuned)


def settings_for(run: Restored, modality: str, overrides: dict | None = None):
  from tmdiff.diffusion import sampling
  return sampling.settings_from_config(run.config, modality).replace(
      **(overrides or {}))


# --- prompts and sampling --------------------------------------------------------------------
def stack_prompts(prompts: list, pad_id: int) -> dict[str, np.ndarray]:
  """Prompts of different lengths -> sampler inputs, right-padded with `<pad>` in segment 0
  (what the training pipeline pads pairs with), so padding is neither seen nor generated."""
  length = max(len(p.tokens) for p in prompts)
  n = len(prompts)
  out = {"tokens": np.full((n, length), pad_id, np.int32),
         "positions": np.zeros((n, length), np.int32),
         "segment_ids": np.zeros((n, length), np.int32),
         "modality": np.zeros((n, length), np.int32),
         "cond_mask": np.zeros((n, length), np.int32)}
  for i, p in enumerate(prompts):
    k = len(p.tokens)
    out["tokens"][i, :k] = p.tokens
    out["positions"][i, :k] = np.arange(k)
    out["segment_ids"][i, :k] = 1
    out["modality"][i, :k] = p.modality
    out["cond_mask"][i, :k] = p.cond_mask
  return out


def sample_rows(run: Restored, inputs: dict[str, np.ndarray], settings, *, seed: int,
                batch_size: int, progress: str = "") -> np.ndarray:
  """Fills every `<mask>` of inputs; row i with key fold_in(key(seed), i). [N, L] int32."""
  import flax.linen as nn

  from tmdiff.diffusion import sampling
  from tmdiff.eval import elbo as elbo_lib
  trainer = run.trainer
  n = len(inputs["tokens"])
  physical = elbo_lib.physical_batch(trainer, batch_size)
  denoise = restore_lib.model_denoiser(trainer.graphdef)
  bias = sampling.logit_bias(run.layout, strict=True)
  base = jax.random.key(seed)

  def one(row, index):
    single = {k: v[None] for k, v in row.items()}
    return sampling.sample(denoise, single, jax.random.fold_in(base, index), settings,
                           mask_id=run.layout.mask, params=run.params, logit_bias=bias)[0]
  out = []
  with contextlib.ExitStack() as stack:
    stack.enter_context(jax.set_mesh(trainer.mesh))
    stack.enter_context(nn.logical_axis_rules(trainer.rules))
    for start in range(0, n, physical):
      stop = min(n, start + physical)
      idx = np.arange(start, start + physical) % n  # the last batch repeats rows; dropped below
      rows = {k: jax.device_put(v[idx], trainer.batch_sharding) for k, v in inputs.items()}
      ids = jax.device_put(np.arange(start, start + physical, dtype=np.int32),
                           trainer.row_id_sharding)
      out.append(np.asarray(jax.device_get(jax.vmap(one)(rows, ids)))[:stop - start])
      if progress:
        logging.info("%s: %d/%d samples", progress, stop, n)
  return np.concatenate(out)


# --- the three tasks -------------------------------------------------------------------------
def _need(run: Restored, *names):
  if run.data_dir is None:
    raise EvalError("synthetic-data checkpoint: no tokenizers to decode samples with")
  missing = [n for n in names if n not in run.tokenizers]
  if missing:
    raise EvalError(f"{run.data_dir} has no {missing} tokenizer")


def text_task(run: Restored, judge, *, num: int, settings, seed: int, batch_size: int) -> dict:
  """Unconditional text: judge perplexity, unigram entropy of each sample vs reference text."""
  from tmdiff.eval import judges as judges_lib
  from tmdiff.eval import text_judge
  _need(run, "text")
  layout, tok = run.layout, run.tokenizers["text"]
  prompt = prompts_lib.build_prompt("text", "", layout, tok,
                                    length=int(run.config.data.seq_len), image_tokens=0,
                                    audio_tokens=0)
  inputs = stack_prompts([prompt] * num, layout.pad)
  out = sample_rows(run, inputs, settings, seed=seed ^ TASK_SALT["text"],
                    batch_size=batch_size, progress="text samples")
  sequences, texts = [], []
  for row in out[:, prompt.target]:
    eos = np.flatnonzero(row == layout.eos)
    row = row[:eos[0]] if eos.size else row
    start, stop = layout.text_range
    ids = row[(row >= start) & (row < stop)] - start
    sequences.append(ids.astype(np.int64))
    texts.append(tok.decode(ids))
  total, count = judge.nll(sequences)
  entropies = [text_judge.unigram_entropy_bits(s) for s in sequences if len(s)]
  # Reference: validation documents cut to the samples' mean length.
  mean_len = max(1, int(round(np.mean([len(s) for s in sequences]))))
  refs = [a["text"][:mean_len] for a, _ in
          judges_lib.read_records(run.data_dir, "text", "validation", 200)]
  return {"metrics": {
      "judge_perplexity": float(np.exp(total / count)) if count else float("nan"),
      "unigram_entropy_bits": float(np.mean(entropies)) if entropies else 0.0,
      "reference_unigram_entropy_bits": float(np.mean(
          [text_judge.unigram_entropy_bits(r) for r in refs])),
      "reference_judge_perplexity": judge.perplexity(refs),
      "mean_tokens": float(np.mean([len(s) for s in sequences])), "samples": num},
      "texts": texts}


def _validation_records(run: Restored, source: str, num: int, first: int = 0) -> list:
  """Validation records first .. first + num - 1 of a pair source (fewer if the split ends);
  an error if there are none."""
  from tmdiff.eval import judges as judges_lib
  records = judges_lib.read_records(run.data_dir, source, "validation", first + num)[first:]
  if not records:
    raise EvalError(f"{run.data_dir}: no {source} validation records"
                    + (f" from index {first} on" if first else ""))
  return records


def t2i_task(run: Restored, judge, *, num: int, settings, seed: int, batch_size: int,
             first: int = 0) -> dict:
  """Captions of held-out images -> images; the judge checks shape, colour, position, count."""
  from tmdiff.eval import image_judge
  _need(run, "text", "image")
  layout, toks = run.layout, run.tokenizers
  records = _validation_records(run, "image_text", num, first)
  captions = [meta["caption"] for _, meta in records]
  objects = [meta.get("attributes", {}).get("objects") or image_judge.parse_caption(c)
             for (_, meta), c in zip(records, captions)]
  n_image = int(toks["image"].tokens_per_image)
  prompts = [prompts_lib.build_prompt("t2i", c, layout, toks["text"], length=0,
                                      image_tokens=n_image, audio_tokens=0) for c in captions]
  out = sample_rows(run, stack_prompts(prompts, layout.pad), settings,
                    seed=seed ^ TASK_SALT["t2i"], batch_size=batch_size, progress="t2i samples")
  ids = np.stack([out[i, p.target] for i, p in enumerate(prompts)])
  images = toks["image"].decode_batch(layout.to_local(ids, vocab_lib.IMAGE))
  scores = judge.score(images, objects)
  per_image = scores.pop("per_image_all")
  return {"metrics": {f"attribute_accuracy/{k}" if k != "images" else k: v
                      for k, v in scores.items()},
          "images": images, "captions": captions, "match": per_image}


def t2s_task(run: Restored, judge, *, num: int, settings, seed: int, batch_size: int,
             first: int = 0) -> dict:
  """Transcripts of held-out utterances -> audio; the recogniser's WER against the prompt."""
  from tmdiff.eval import speech_judge
  _need(run, "text", "audio")
  layout, toks = run.layout, run.tokenizers
  records = _validation_records(run, "audio_text", num, first)
  transcripts = [meta["transcript"] for _, meta in records]
  prompts = [prompts_lib.build_prompt("t2s", t, layout, toks["text"], length=0,
                                      image_tokens=0, audio_tokens=int(a["audio"].size))
             for (a, _), t in zip(records, transcripts)]
  out = sample_rows(run, stack_prompts(prompts, layout.pad), settings,
                    seed=seed ^ TASK_SALT["t2s"], batch_size=batch_size, progress="t2s samples")
  waves, mels = [], []
  for i, p in enumerate(prompts):
    local = layout.to_local(out[i, p.target], vocab_lib.AUDIO)
    waves.append(toks["audio"].decode(local))
    mels.append(toks["audio"].log_mel(waves[-1]))
  hyps = judge.transcribe_features(mels)
  wer = speech_judge.word_error_rate(transcripts, hyps)
  return {"metrics": {"wer": wer["wer"], "word_errors": wer["errors"], "words": wer["words"],
                      "character_error_rate": speech_judge.character_error_rate(transcripts,
                                                                                hyps),
                      "samples": num},
          "waves": waves, "transcripts": transcripts, "hypotheses": hyps}
