"""The batch contract between the data pipeline and the train step.

A batch is a dict of [B, L] numpy or jax arrays:
  tokens       int32  clean unified-vocabulary ids (padding = <pad>)
  segment_ids  int32  1, 2, ... per document packed into the row; 0 on padding
  positions    int32  position inside the document, restarting at 0 per segment
  modality     int32  vocab.TEXT / IMAGE / AUDIO per token
  loss_mask    int32  1 where the token may be corrupted and is supervised; 0 on padding
  cond_mask    int32  1 on the condition part of a pair (caption, transcript); 0 elsewhere

Tokens attend only within their segment. `cond_mask` lets the step train conditional
generation (mask only the target) and classifier-free guidance (drop the condition).
"""
from __future__ import annotations

import numpy as np

from tmdiff.data import vocab as vocab_lib

FIELDS = ("tokens", "segment_ids", "positions", "modality", "loss_mask", "cond_mask")


class BatchError(ValueError):
  """A batch that breaks the contract."""


def check_batch(batch, *, batch_size: int | None = None, seq_len: int | None = None,
                layout: vocab_lib.VocabLayout | None = None, max_segments: int | None = None,
                deep: bool = True) -> None:
  """Raises BatchError naming the field and problem. `deep` also checks values (host only)."""
  missing = [f for f in FIELDS if f not in batch]
  extra = [f for f in batch if f not in FIELDS]
  if missing or extra:
    raise BatchError(f"batch fields: missing {missing}, unexpected {extra}; expected {FIELDS}")
  shape = tuple(batch["tokens"].shape)
  if len(shape) != 2:
    raise BatchError(f"batch['tokens'] must be [B, L], got shape {shape}")
  if batch_size is not None and shape[0] != batch_size:
    raise BatchError(f"batch size {shape[0]} != configured {batch_size}")
  if seq_len is not None and shape[1] != seq_len:
    raise BatchError(f"sequence length {shape[1]} != configured {seq_len}")
  for f in FIELDS:
    if tuple(batch[f].shape) != shape:
      raise BatchError(f"batch[{f!r}] has shape {tuple(batch[f].shape)}, tokens have {shape}")
    if not np.issubdtype(np.dtype(batch[f].dtype), np.integer):
      raise BatchError(f"batch[{f!r}] must be an integer array, got {batch[f].dtype}")
  if not deep:
    return
  b = {f: np.asarray(batch[f]) for f in FIELDS}
  seg = b["segment_ids"]
  if seg.min() < 0:
    raise BatchError("segment_ids must be >= 0")
  if max_segments is not None and seg.max() > max_segments:
    raise BatchError(f"a row holds segment id {seg.max()} > data.max_segments={max_segments}")
  if np.any(b["loss_mask"][seg == 0]):
    raise BatchError("loss_mask is set on padding (segment_ids == 0)")
  if not np.all(np.isin(b["modality"], (vocab_lib.TEXT, vocab_lib.IMAGE, vocab_lib.AUDIO))):
    raise BatchError("modality ids must be 0 (text), 1 (image) or 2 (audio)")
  if layout is not None:
    tok = b["tokens"]
    if tok.min() < 0 or tok.max() >= layout.size:
      raise BatchError(f"token id outside the vocabulary [0, {layout.size})")
    if np.any(tok[seg == 0] != layout.pad):
      raise BatchError("padding positions (segment_ids == 0) must hold <pad>")
    for m in (vocab_lib.IMAGE, vocab_lib.AUDIO):
      start, stop = layout.range_of(m)
      sel = b["modality"] == m
      if np.any((tok[sel] < start) | (tok[sel] >= stop)):
        raise BatchError(f"a token marked {vocab_lib.MODALITIES[m]} is outside its id range")
  # Positions restart at each segment start.
  starts = np.ones_like(seg, bool)
  starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
  if np.any(b["positions"][starts & (seg > 0)] != 0):
    raise BatchError("positions must restart at 0 at every segment start")
