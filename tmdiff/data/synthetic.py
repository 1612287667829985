"""A tiny in-memory tri-modal source (data.source='synthetic'): no prepare step, no files.

Random but structured sequences, so a model can learn something in a few steps:
  text:        arithmetic progressions over the text ids (start, stride random);
  image_text:  a short caption; the image ids are a fixed function of the caption;
  audio_text:  a short transcript; 3 audio ids per transcript token, a function of it.
Same example layouts as prepared data (pipeline.text_example / pair_example), so the rest of
the pipeline (packing, padding, mixing, state) is exercised unchanged.
"""
from __future__ import annotations

import grain
import numpy as np

from tmdiff.data import vocab as vocab_lib

EXAMPLES_PER_SPLIT = {"train": 4096, "validation": 256}
AUDIO_PER_TEXT_TOKEN = 3


def _sizes(seq_len: int) -> tuple[int, int]:
  """(longest caption/transcript, image tokens) that fit a pair into seq_len."""
  max_cond = max(1, min(10, (seq_len - 4) // (AUDIO_PER_TEXT_TOKEN + 1)))
  image_tokens = min(64, seq_len - 4 - max_cond)
  if image_tokens < 1:
    raise ValueError(f"data.seq_len={seq_len} is too short for synthetic pairs (need >= 16)")
  return max_cond, image_tokens


def make_example(source: str, index: int, *, split: str, seed: int, seq_len: int,
                 layout: vocab_lib.VocabLayout) -> dict[str, np.ndarray]:
  from tmdiff.data import pipeline  # layouts live with the pipeline
  rng = np.random.default_rng([seed, ("train", "validation").index(split),
                               pipeline.SOURCES.index(source), index])
  max_cond, image_tokens = _sizes(seq_len)
  if source == "text":
    n = int(rng.integers(4, 2 * seq_len))
    start, stride = int(rng.integers(layout.text_size)), int(rng.integers(1, 4))
    local = (start + stride * np.arange(n)) % layout.text_size
    return pipeline.text_example(layout.to_unified(local, vocab_lib.TEXT), layout)
  cond = rng.integers(0, min(64, layout.text_size), size=int(rng.integers(1, max_cond + 1)))
  if source == "image_text":
    base, stride = int(cond.sum()), int(cond[0]) + 1
    target = (base + stride * np.arange(image_tokens)) % layout.image_size
    modality = vocab_lib.IMAGE
  elif source == "audio_text":
    target = ((np.repeat(cond, AUDIO_PER_TEXT_TOKEN) * 7
               + np.tile(np.arange(AUDIO_PER_TEXT_TOKEN), len(cond))) % layout.audio_size)
    modality = vocab_lib.AUDIO
  else:
    raise ValueError(f"unknown source {source!r}; known {pipeline.SOURCES}")
  return pipeline.pair_example(layout.to_unified(cond, vocab_lib.TEXT),
                               layout.to_unified(target, modality), modality, layout)


def example_dataset(config, split: str, source: str,
                    layout: vocab_lib.VocabLayout) -> grain.MapDataset:
  """A MapDataset of examples of `source` for `split` (deterministic from config.seed)."""
  seed, seq_len = int(config.seed), int(config.data.seq_len)
  _sizes(seq_len)
  return grain.MapDataset.range(EXAMPLES_PER_SPLIT[split]).map(
      lambda i: make_example(source, int(i), split=split, seed=seed, seq_len=seq_len,
                             layout=layout))
