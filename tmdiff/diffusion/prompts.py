"""Sampling prompts in the training pipeline's layouts (`data.pipeline`), for each task:
  text    <bos> prompt <mask>...                       (`length` tokens in all)
  t2i     <bos> caption <boi> <mask> x image_tokens <eoi> <eos>
  t2s     <bos> transcript <boa> <mask> x audio_tokens <eoa> <eos>
  infill  <bos> text with each `____` -> infill_tokens masks <eos>
"""
from __future__ import annotations

import dataclasses

import numpy as np

from tmdiff.data import vocab as vocab_lib

TASKS = ("text", "t2i", "t2s", "infill")
PLACEHOLDER = "____"
TASK_MODALITY = {"text": "text", "infill": "text", "t2i": "image", "t2s": "audio"}


class SampleError(ValueError):
  """A user-facing problem (task, prompt, data dir, sampling defaults); the message says what
  to fix."""


@dataclasses.dataclass
class Prompt:
  """One row: unified tokens, modality and condition mask, and where the generation lands."""
  tokens: np.ndarray
  modality: np.ndarray
  cond_mask: np.ndarray
  target: slice  # the span to decode (text tasks: prompt and generation together)
  task: str


def _encode_text(text_tokenizer, layout, text: str) -> np.ndarray:
  if not text:
    return np.zeros((0,), np.int32)
  return layout.to_unified(text_tokenizer.encode(text), vocab_lib.TEXT)


def build_prompt(task: str, text: str, layout, text_tokenizer, *, length: int,
                 image_tokens: int, audio_tokens: int, infill_tokens: int = 8) -> Prompt:
  if task not in TASKS:
    raise SampleError(f"unknown task {task!r}; choose from {TASKS}")
  mask = layout.mask
  if task == "text":
    ids = _encode_text(text_tokenizer, layout, text)
    n_masks = length - 1 - len(ids)
    if n_masks < 1:
      raise SampleError(f"text prompt is {len(ids)} tokens; --length={length} leaves no room")
    tokens = np.concatenate([[layout.bos], ids, np.full(n_masks, mask)])
    return Prompt(tokens.astype(np.int32), np.zeros(len(tokens), np.int32),
                  np.zeros(len(tokens), np.int32), slice(1, len(tokens)), task)
  if task == "infill":
    if PLACEHOLDER not in text:
      raise SampleError(f"infill prompt needs at least one {PLACEHOLDER!r} placeholder")
    pieces = []
    for i, part in enumerate(text.split(PLACEHOLDER)):
      if i:
        pieces.append(np.full(infill_tokens, mask))
      pieces.append(_encode_text(text_tokenizer, layout, part))
    tokens = np.concatenate([[layout.bos], *pieces, [layout.eos]]).astype(np.int32)
    return Prompt(tokens, np.zeros(len(tokens), np.int32), np.zeros(len(tokens), np.int32),
                  slice(1, len(tokens) - 1), task)
  # Pairs: <bos> cond <boX> target <eoX> <eos>, the layout of data.pipeline.pair_example.
  if not text:
    raise SampleError(f"task {task} needs a --prompt (caption or transcript)")
  cond = _encode_text(text_tokenizer, layout, text)
  modality, n, begin, end = ((vocab_lib.IMAGE, image_tokens, layout.boi, layout.eoi)
                             if task == "t2i" else
                             (vocab_lib.AUDIO, audio_tokens, layout.boa, layout.eoa))
  tokens = np.concatenate([[layout.bos], cond, [begin], np.full(n, mask), [end, layout.eos]])
  start = len(cond) + 2
  modality_ids = np.zeros(len(tokens), np.int32)
  modality_ids[start:start + n] = modality
  cond_mask = np.zeros(len(tokens), np.int32)
  cond_mask[:len(cond) + 1] = 1
  return Prompt(tokens.astype(np.int32), modality_ids, cond_mask, slice(start, start + n), task)
