"""The tokenizer interface every modality implements.

A tokenizer maps raw data to *local* ids in [0, vocab_size); `VocabLayout.to_unified`
places them in the shared vocabulary. Each tokenizer saves to and loads from a local
directory, so externally trained tokenizers plug in the same way.
"""
from __future__ import annotations

import abc
import json
import os
from typing import Any

import numpy as np


class Tokenizer(abc.ABC):
  modality: int  # tmdiff.data.vocab.TEXT / IMAGE / AUDIO

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of local ids."""

  @abc.abstractmethod
  def encode(self, x: Any) -> np.ndarray:
    """Raw item -> int32 local ids, 1-D."""

  @abc.abstractmethod
  def decode(self, ids: np.ndarray) -> Any:
    """Local ids -> raw item (str, HxWx3 uint8 image, float32 waveform)."""

  @abc.abstractmethod
  def save(self, directory: str) -> None:
    """Writes everything needed to `load` into `directory`."""

  @classmethod
  @abc.abstractmethod
  def load(cls, directory: str) -> "Tokenizer":
    """Restores a tokenizer written by `save` (or an external one in the same format)."""

  # Helpers shared by all tokenizers (concrete; implementations need not override).
  def unified_range(self, layout) -> tuple[int, int]:
    """[start, stop) of this tokenizer's ids in the unified vocabulary `layout`."""
    start, stop = layout.range_of(self.modality)
    if self.vocab_size > stop - start:
      raise ValueError(f"tokenizer has {self.vocab_size} ids but the vocabulary layout reserves "
                       f"{stop - start} for modality {self.modality}")
    return start, stop

  def encode_unified(self, x: Any, layout) -> np.ndarray:
    """Raw item -> int32 unified-vocabulary ids."""
    self.unified_range(layout)
    return layout.to_unified(self.encode(x), self.modality)

  def decode_unified(self, ids: np.ndarray, layout) -> Any:
    return self.decode(layout.to_local(ids, self.modality))


MANIFEST = "tokenizer.json"


class TokenizerLoadError(ValueError):
  """A tokenizer directory or file that is missing, incomplete or corrupt (message names the path)."""


def write_manifest(directory: str, kind: str, fields: dict) -> None:
  with open(os.path.join(directory, MANIFEST), "w") as f:
    json.dump({"kind": kind, **fields}, f, indent=2, sort_keys=True)
    f.write("\n")


def read_manifest(directory: str, expected_kind: str | None = None) -> dict:
  """Reads `directory/tokenizer.json`; raises TokenizerLoadError naming the path on any problem."""
  if not os.path.isdir(directory):
    raise TokenizerLoadError(f"tokenizer directory not found: {directory}")
  path = os.path.join(directory, MANIFEST)
  if not os.path.isfile(path):
    raise TokenizerLoadError(f"tokenizer manifest missing: {path} (expected a JSON with a 'kind')")
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise TokenizerLoadError(f"corrupt tokenizer manifest {path}: {e}") from e
  if not isinstance(manifest, dict) or not isinstance(manifest.get("kind"), str):
    raise TokenizerLoadError(f"tokenizer manifest {path} has no string 'kind' field")
  if expected_kind is not None and manifest["kind"] != expected_kind:
    raise TokenizerLoadError(
        f"tokenizer manifest {path} has kind {manifest['kind']!r}, expected {expected_kind!r}")
  return manifest


def read_bytes(path: str) -> bytes:
  if not os.path.isfile(path):
    raise TokenizerLoadError(f"tokenizer file missing: {path}")
  with open(path, "rb") as f:
    return f.read()
