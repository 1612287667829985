"""The unified vocabulary: one id space shared by text, image and audio tokens.

Layout (contiguous, in this order):
  special tokens | text ids | image codebook ids | audio codebook ids

Every piece of code (tokenizers, pipeline, model, samplers) asks this object where a
modality's ids live; nothing hard-codes an offset.
"""
from __future__ import annotations

import dataclasses

import numpy as np

# <pad> and <mask> come first, so what a text position may predict (structural specials and
# text ids) is one contiguous range, like the image and audio codebooks.
SPECIAL_TOKENS = (
    "<pad>", "<mask>", "<bos>", "<eos>",
    "<boi>", "<eoi>", "<boa>", "<eoa>",
    "<text>", "<t2i>", "<t2s>",
)
NEVER_PREDICTED = 2  # <pad>, <mask>

# Modality ids carried per token in every batch ("modality" field).
TEXT, IMAGE, AUDIO = 0, 1, 2
MODALITIES = ("text", "image", "audio")


@dataclasses.dataclass(frozen=True)
class VocabLayout:
  text_size: int
  image_size: int
  audio_size: int

  def __post_init__(self):
    for name in ("text_size", "image_size", "audio_size"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"VocabLayout.{name} must be positive, got {getattr(self, name)}")

  @classmethod
  def from_config(cls, vocab_config) -> "VocabLayout":
    return cls(int(vocab_config.text_size), int(vocab_config.image_size),
               int(vocab_config.audio_size))

  # Special tokens.
  @property
  def num_special(self) -> int:
    return len(SPECIAL_TOKENS)

  def special(self, name: str) -> int:
    try:
      return SPECIAL_TOKENS.index(name)
    except ValueError:
      raise KeyError(f"unknown special token {name!r}; known: {SPECIAL_TOKENS}") from None

  pad = property(lambda self: self.special("<pad>"))
  bos = property(lambda self: self.special("<bos>"))
  eos = property(lambda self: self.special("<eos>"))
  mask = property(lambda self: self.special("<mask>"))
  boi = property(lambda self: self.special("<boi>"))
  eoi = property(lambda self: self.special("<eoi>"))
  boa = property(lambda self: self.special("<boa>"))
  eoa = property(lambda self: self.special("<eoa>"))

  # Modality ranges, half-open [start, stop).
  @property
  def text_range(self) -> tuple[int, int]:
    start = self.num_special
    return start, start + self.text_size

  @property
  def image_range(self) -> tuple[int, int]:
    start = self.text_range[1]
    return start, start + self.image_size

  @property
  def audio_range(self) -> tuple[int, int]:
    start = self.image_range[1]
    return start, start + self.audio_size

  def range_of(self, modality: int) -> tuple[int, int]:
    return (self.text_range, self.image_range, self.audio_range)[modality]

  @property
  def size(self) -> int:
    return self.audio_range[1]

  def padded_size(self, multiple: int = 128) -> int:
    """Embedding-table rows: the vocabulary rounded up for efficient matmuls."""
    return -(-self.size // multiple) * multiple

  # Local codes <-> unified ids.
  def to_unified(self, local_ids, modality: int) -> np.ndarray:
    start, stop = self.range_of(modality)
    local_ids = np.asarray(local_ids, dtype=np.int64)
    if local_ids.size and (local_ids.min() < 0 or local_ids.max() >= stop - start):
      raise ValueError(
          f"{MODALITIES[modality]} id out of range [0, {stop - start}): "
          f"min {local_ids.min()}, max {local_ids.max()}")
    return (local_ids + start).astype(np.int32)

  def to_local(self, unified_ids, modality: int) -> np.ndarray:
    start, stop = self.range_of(modality)
    unified_ids = np.asarray(unified_ids, dtype=np.int64)
    if unified_ids.size and (unified_ids.min() < start or unified_ids.max() >= stop):
      raise ValueError(f"ids outside the {MODALITIES[modality]} range [{start}, {stop})")
    return (unified_ids - start).astype(np.int32)

  def modality_of(self, unified_ids) -> np.ndarray:
    """Modality of each id; special tokens count as text."""
    ids = np.asarray(unified_ids)
    out = np.full(ids.shape, TEXT, np.int32)
    out[(ids >= self.image_range[0]) & (ids < self.image_range[1])] = IMAGE
    out[(ids >= self.audio_range[0]) & (ids < self.audio_range[1])] = AUDIO
    return out

  def allowed_range(self, modality: int) -> tuple[int, int]:
    """[start, stop) of the ids a position of this modality may be predicted as.

    Text positions carry the structural specials too (packed documents and pair boundaries
    are text); image and audio positions stay inside their codebooks. Never <pad> or <mask>.
    """
    if modality == TEXT:
      return NEVER_PREDICTED, self.text_range[1]
    return self.range_of(modality)

  def allowed_logits_mask(self, modality: int, padded: bool = True) -> np.ndarray:
    """Boolean [V] mask of `allowed_range(modality)`."""
    allowed = np.zeros((self.padded_size() if padded else self.size,), bool)
    start, stop = self.allowed_range(modality)
    allowed[start:stop] = True
    return allowed
