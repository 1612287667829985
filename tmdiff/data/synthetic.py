"""A tiny in-memory tri-modal source (data.source='synthetic'): no prepare step, no files.

Random but structured sequences, so a model can learn something in a few steps:
  text:        arithmetic progressions over the text ids (start, stride random);
  image_text:  a short caption; the image ids are a fixed function of the caption;
  audio_text:  a short transcript; 3 audio ids per transcript token, a function of it.
Records have the fields of prepared records (local ids), so the rest of the pipeline
(validation, layout, packing, padding, mixing, state) is exercised unchanged.
"""
from __future__ import annotations

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


def make_record(source: str, index: int, *, split: str, seed: int, seq_len: int,
                layout: vocab_lib.VocabLayout) -> dict[str, np.ndarray]:
  """Record `index` of `source` in local ids, with the fields of prepared records
  (tmdiff.data.records.SOURCE_FIELDS)."""
  from tmdiff.data import records
  rng = np.random.default_rng([seed, ("train", "validation").index(split),
                               records.SOURCES.index(source), index])
  max_cond, image_tokens = _sizes(seq_len)
  if source == "text":
    n = int(rng.integers(4, 2 * seq_len))
    start, stride = int(rng.integers(layout.text_size)), int(rng.integers(1, 4))
    return {"text": ((start + stride * np.arange(n)) % layout.text_size).astype(np.int32)}
  cond = rng.integers(0, min(64, layout.text_size), size=int(rng.integers(1, max_cond + 1)))
  if source == "image_text":
    base, stride = int(cond.sum()), int(cond[0]) + 1
    target = (base + stride * np.arange(image_tokens)) % layout.image_size
    return {"caption": cond.astype(np.int32), "image": target.astype(np.int32)}
  if source == "audio_text":
    target = ((np.repeat(cond, AUDIO_PER_TEXT_TOKEN) * 7
               + np.tile(np.arange(AUDIO_PER_TEXT_TOKEN), len(cond))) % layout.audio_size)
    return {"transcript": cond.astype(np.int32), "audio": target.astype(np.int32)}
  raise ValueError(f"unknown source {source!r}; known {records.SOURCES}")


class SyntheticRecords:
  """The records of one source and split, made on first use and kept (a few thousand).

  The record-source protocol of the pipeline (like records.ShardReader): __len__,
  read_many(indices) and where(index).
  """

  def __init__(self, config, split: str, source: str, layout: vocab_lib.VocabLayout):
    self._args = dict(split=split, seed=int(config.seed), seq_len=int(config.data.seq_len),
                      layout=layout)
    _sizes(self._args["seq_len"])
    self._source, self._split = source, split
    self._made: dict[int, dict[str, np.ndarray]] = {}

  def __len__(self) -> int:
    return EXAMPLES_PER_SPLIT[self._split]

  def where(self, index: int) -> str:
    return f"synthetic {self._source}/{self._split} record {int(index) % len(self)}"

  def read_many(self, indices) -> list[dict[str, np.ndarray]]:
    out = []
    for i in np.asarray(indices, np.int64) % len(self):
      i = int(i)
      if i not in self._made:
        self._made[i] = make_record(self._source, i, **self._args)
      out.append(self._made[i])
    return out
