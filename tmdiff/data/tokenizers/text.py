"""Text tokenizer: SentencePiece (BPE or unigram) with byte fallback and exact round trip.

Training uses the identity normalization, no dummy prefix and no whitespace collapsing, so
`decode(encode(s)) == s` for every string: characters outside the learned pieces become
UTF-8 byte pieces. SentencePiece writes spaces as U+2581 ("▁") inside pieces, so a literal
U+2581 in the input is encoded as its byte pieces and decoding is done here, piece by piece.
"""
from __future__ import annotations

import io
import os
import re
from typing import Iterable

import numpy as np
import sentencepiece as spm

from tmdiff.data import vocab
from tmdiff.data.tokenizers import base

KIND = "sentencepiece"
MODEL_FILE = "text.model"
_SPACE_MARK = "\u2581"
_BYTE_PIECE = re.compile(r"^<0x([0-9A-F]{2})>$")


class TextTokenizer(base.Tokenizer):
  modality = vocab.TEXT

  def __init__(self, model_proto: bytes, source: str = "<memory>"):
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.load_from_serialized_proto(model_proto)
    except Exception as e:  # sentencepiece raises RuntimeError/OSError variants
      raise base.TokenizerLoadError(f"corrupt SentencePiece model {source}: {e}") from e
    self._model_proto = bytes(model_proto)
    pieces = [self._sp.id_to_piece(i) for i in range(self._sp.get_piece_size())]
    # Per id: the byte value for byte pieces, -1 otherwise; the surface text for others.
    self._byte_of = np.full(len(pieces), -1, np.int32)
    self._surface = []
    for i, piece in enumerate(pieces):
      match = _BYTE_PIECE.match(piece)
      if match:
        self._byte_of[i] = int(match.group(1), 16)
      self._surface.append("" if self._sp.is_control(i) or self._sp.is_unknown(i)
                           else piece.replace(_SPACE_MARK, " "))
    missing = [b for b in range(256) if b not in set(self._byte_of.tolist())]
    if missing:
      raise base.TokenizerLoadError(
          f"SentencePiece model {source} lacks byte-fallback pieces (e.g. <0x{missing[0]:02X}>); "
          "train with byte_fallback=True for an exact round trip")
    self._id_of_byte = np.zeros(256, np.int32)
    self._id_of_byte[self._byte_of[self._byte_of >= 0]] = np.nonzero(self._byte_of >= 0)[0]
    self._mark_ids = self._id_of_byte[list(_SPACE_MARK.encode("utf-8"))].tolist()

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def encode(self, x: str) -> np.ndarray:
    if not isinstance(x, str):
      raise TypeError(f"TextTokenizer.encode expects str, got {type(x).__name__}")
    ids: list[int] = []
    for k, chunk in enumerate(x.split(_SPACE_MARK)):
      if k:
        ids.extend(self._mark_ids)
      if chunk:
        ids.extend(self._sp.encode(chunk))
    return np.asarray(ids, np.int32)

  def encode_batch(self, texts: Iterable[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode(self, ids) -> str:
    ids = np.asarray(ids, np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f"text id out of range [0, {self.vocab_size}): {ids.min()}..{ids.max()}")
    out: list[str] = []
    pending = bytearray()
    for i in ids.tolist():
      byte = self._byte_of[i]
      if byte >= 0:
        pending.append(int(byte))
        continue
      if pending:
        out.append(pending.decode("utf-8", errors="replace"))
        pending.clear()
      out.append(self._surface[i])
    if pending:
      out.append(pending.decode("utf-8", errors="replace"))
    return "".join(out)

  def save(self, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, MODEL_FILE), "wb") as f:
      f.write(self._model_proto)
    base.write_manifest(directory, KIND, {"model_file": MODEL_FILE, "vocab_size": self.vocab_size})

  @classmethod
  def load(cls, directory: str) -> "TextTokenizer":
    manifest = base.read_manifest(directory, KIND)
    path = os.path.join(directory, manifest.get("model_file", MODEL_FILE))
    proto = base.read_bytes(path)
    return cls(proto, source=path)

  @classmethod
  def from_model_file(cls, path: str) -> "TextTokenizer":
    """Wraps an externally trained SentencePiece model (needs byte fallback)."""
    return cls(base.read_bytes(path), source=path)


def _training_lines(texts: Iterable[str] | str) -> list[str]:
  if isinstance(texts, str):
    if not os.path.isfile(texts):
      raise FileNotFoundError(f"text corpus file not found: {texts}")
    with open(texts, encoding="utf-8") as f:
      texts = [f.read()]
  lines = []
  for text in texts:
    lines.extend(line for line in text.splitlines() if line.strip())
  if not lines:
    raise ValueError("no non-empty lines to train the text tokenizer on")
  return lines


def train_text_tokenizer(texts: Iterable[str] | str, vocab_size: int = 2048,
                         model_type: str = "bpe", max_lines: int = 200_000,
                         seed: int = 0) -> TextTokenizer:
  """Trains SentencePiece on strings (or a UTF-8 file path); returns the tokenizer.

  The vocabulary holds <unk>, the 256 byte pieces and learned pieces, so vocab_size must
  exceed 257. Training is single-threaded and seeded, hence deterministic.
  """
  if vocab_size <= 257 + 8:
    raise ValueError(f"vocab_size must exceed 265 (256 byte pieces + <unk>), got {vocab_size}")
  lines = _training_lines(texts)
  if len(lines) > max_lines:  # deterministic, evenly spaced subsample
    lines = [lines[i] for i in np.linspace(0, len(lines) - 1, max_lines).astype(int)]
  spm.set_random_generator_seed(seed)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
      model_type=model_type, normalization_rule_name="identity", byte_fallback=True,
      add_dummy_prefix=False, remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
      split_digits=True, character_coverage=1.0, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
      num_threads=1, shuffle_input_sentence=False, hard_vocab_limit=False, minloglevel=2)
  return TextTokenizer(model.getvalue())
