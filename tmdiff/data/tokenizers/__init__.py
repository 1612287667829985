"""Tokenizers for text, image and audio behind one interface (`base.Tokenizer`).

`load_tokenizer(directory)` reads `directory/tokenizer.json` and dispatches on its `kind`;
`load_prepared(data_dir)` loads those a prepared data dir's manifest lists. Kinds:
  sentencepiece  text.TextTokenizer    (text.model: any SentencePiece model with byte fallback)
  fsq_image      image.ImageTokenizer  (params.npz + config)
  fsq_audio      audio.AudioTokenizer  (params.npz + config)
A kind of the form "package.module:ClassName" imports that class, so an externally trained
tokenizer plugs in by shipping a class implementing `base.Tokenizer` and a tokenizer.json.
"""
from __future__ import annotations

import importlib

from tmdiff.data.tokenizers.base import TokenizerLoadError, Tokenizer, read_manifest

_BUILTIN = {
    "sentencepiece": ("tmdiff.data.tokenizers.text", "TextTokenizer"),
    "fsq_image": ("tmdiff.data.tokenizers.image", "ImageTokenizer"),
    "fsq_audio": ("tmdiff.data.tokenizers.audio", "AudioTokenizer"),
}
_REGISTERED: dict[str, type] = {}


def register_tokenizer(kind: str, cls: type) -> None:
  """Makes `load_tokenizer` return `cls.load(directory)` for manifests of this kind."""
  if not (isinstance(cls, type) and issubclass(cls, Tokenizer)):
    raise TypeError(f"{cls!r} does not implement tmdiff.data.tokenizers.base.Tokenizer")
  _REGISTERED[kind] = cls


def tokenizer_class(kind: str, source: str = "") -> type:
  if kind in _REGISTERED:
    return _REGISTERED[kind]
  if kind in _BUILTIN:
    module, name = _BUILTIN[kind]
  elif ":" in kind:
    module, name = kind.split(":", 1)
  else:
    known = sorted(set(_BUILTIN) | set(_REGISTERED))
    raise TokenizerLoadError(f"unknown tokenizer kind {kind!r} in {source}; known: {known} "
                             "or 'package.module:ClassName'")
  try:
    cls = getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError) as e:
    raise TokenizerLoadError(f"cannot import tokenizer class {module}:{name} for {source}: {e}") from e
  if not (isinstance(cls, type) and issubclass(cls, Tokenizer)):
    raise TokenizerLoadError(f"{module}:{name} (named in {source}) is not a Tokenizer subclass")
  return cls


def load_tokenizer(directory: str) -> Tokenizer:
  """Loads whichever tokenizer `directory/tokenizer.json` describes."""
  manifest = read_manifest(directory)
  return tokenizer_class(manifest["kind"], f"{directory}/tokenizer.json").load(directory)


def load_prepared(data_dir: str, names=("text", "image", "audio")) -> dict[str, Tokenizer]:
  """The prepared data's tokenizers, those named that its manifest lists (paths relative to
  `data_dir`: `Manifest.tokenizer_dir`); a listed tokenizer that is missing is an error."""
  from tmdiff.data import records
  manifest = records.Manifest.load(data_dir)
  out = {}
  for name in names:
    path = manifest.tokenizer_dir(data_dir, name)
    if path is not None:
      out[name] = load_tokenizer(path)
  return out


__all__ = ["Tokenizer", "TokenizerLoadError", "load_prepared", "load_tokenizer",
           "register_tokenizer", "tokenizer_class"]
