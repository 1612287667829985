"""seqio bridge (optional extra: `pip install -e '.[seqio]'`): seqio Tasks <-> tmdiff text.

A seqio Task as a tmdiff text source, through the prepare step's user-text path:

  python -m tmdiff.data.prepare --out=DIR --text_files='seqio:TASK'
  python -m tmdiff.data.prepare --out=DIR \
      --text_files='seqio:TASK?feature=body&module=my.tasks,more.txt'

reads the documents of a registered Task (`module` is imported first, to register it), one per
example of its source, FEATURE (default 'text') being a string feature; prepare tokenises them
with our text tokenizer into the text records the pipeline packs. The source is read as is:
the Task's preprocessors (which end in its own tokenization) are not run. Our 'train' and
'validation' splits are the Task's; for a Task without a 'validation' split both come from its
'train' split, a stable-hash share (--user_validation_fraction) held out, as for user files.

Our text as seqio Tasks, for teams with seqio registries:

  from tmdiff.data import seqio_bridge
  seqio_bridge.register_tasks("runs/data")       # a prepare --out directory
  seqio.get_mixture_or_task("tmdiff_text").get_dataset(sequence_length=None, split="train")

registers `tmdiff_text` (the directory's prepared text records) and `tmdiff_shakespeare` (the
embedded Shakespeare corpus as raw strings, tokenised by seqio's `tokenize` preprocessor), each
with one int32 feature 'text' whose vocabulary, `TextVocabulary`, wraps the directory's
SentencePiece model (our local text ids; exact round trip; no EOS).

Tests: tests/test_seqio_bridge.py (skipped unless seqio is installed; CI installs the extra).
"""
from __future__ import annotations

import functools
import importlib
import os
import urllib.parse

import numpy as np

from tmdiff.data import records as records_lib
from tmdiff.data import sources as sources_lib

SPEC_PREFIX = "seqio:"
TASK_NAMES = ("text", "shakespeare")   # registered as f"{prefix}_{name}"


class BridgeError(ValueError):
  """A seqio task or spec that cannot be read (names the task, split or feature)."""


def _seqio():
  try:
    import seqio
    import tensorflow as tf
  except ImportError as e:
    raise BridgeError(f"the seqio bridge needs the extra: pip install -e '.[seqio]' "
                      f"({e})") from None
  return seqio, tf


# ----------------------------------------------------------------------------------------
# A seqio Task -> text documents.

def parse_spec(spec: str) -> tuple[str, str, list[str]]:
  """'seqio:TASK[?feature=F&module=M]' -> (TASK, F or 'text', [M, ...])."""
  if not spec.startswith(SPEC_PREFIX):
    raise BridgeError(f"{spec!r} is not a seqio spec ('{SPEC_PREFIX}TASK[?feature=F&module=M]')")
  name, _, query = spec[len(SPEC_PREFIX):].partition("?")
  options = urllib.parse.parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
  unknown = set(options) - {"feature", "module"}
  if not name or unknown:
    raise BridgeError(f"{spec!r}: need a task name, options only feature= and module= "
                      f"(got {sorted(unknown)})")
  return name, options.get("feature", ["text"])[-1], options.get("module", [])


def get_task(name: str, modules=()):
  seqio, _ = _seqio()
  for module in modules:
    importlib.import_module(module)
  try:
    return seqio.get_mixture_or_task(name)
  except ValueError:
    known = sorted(seqio.TaskRegistry.names())
    raise BridgeError(f"no seqio task {name!r} is registered (import its module with "
                      f"?module=...); {len(known)} known, e.g. {known[:5]}") from None


def task_documents(spec: str, split: str, *, seed: int = 0,
                   validation_fraction: float = 0.02) -> list[dict]:
  """Documents {"id", "text"} of `split` ('train' | 'validation') of the Task in `spec`."""
  if split not in records_lib.SPLITS:
    raise BridgeError(f"split must be one of {records_lib.SPLITS}, got {split!r}")
  name, feature, modules = parse_spec(spec)
  task = get_task(name, modules)
  splits = list(task.source.splits)
  held_out = "validation" not in splits   # then both of ours come from its 'train' split
  if "train" not in splits:
    raise BridgeError(f"seqio task {name!r} has splits {splits}, no 'train'")
  read = "train" if held_out else split
  out = []
  dataset = task.source.get_dataset(split=read, shuffle=False)
  for i, example in enumerate(dataset.as_numpy_iterator()):
    if feature not in example:
      raise BridgeError(f"seqio task {name!r} split {read!r} has no feature {feature!r}; "
                        f"its features: {sorted(example)} (pick one with ?feature=)")
    value = example[feature]
    if not isinstance(value, bytes):
      raise BridgeError(f"seqio task {name!r} feature {feature!r} is not a string (got "
                        f"{getattr(value, 'dtype', type(value).__name__)} of shape "
                        f"{np.shape(value)}); pick a text feature with ?feature=")
    doc_id = f"{SPEC_PREFIX}{name}/{read}/{i}"
    if held_out and sources_lib._split_of(doc_id, seed, validation_fraction) != split:
      continue
    text = value.decode("utf-8")
    if text.strip():
      out.append({"id": doc_id, "text": text})
  return out


# ----------------------------------------------------------------------------------------
# Our text -> seqio Tasks.

def text_vocabulary(tokenizer_dir: str):
  """A seqio Vocabulary over our SentencePiece text tokenizer saved in `tokenizer_dir`."""
  seqio, tf = _seqio()
  from tmdiff.data.tokenizers import text as text_tok

  class TextVocabulary(seqio.Vocabulary):
    """Our text tokenizer as a seqio Vocabulary: ids are our local text ids, decode(encode(s))
    == s. No BOS/EOS (tmdiff adds <bos>/<eos> in its unified vocabulary). seqio's pad id 0
    is our <unk>, which byte-fallback encoding never emits, and decodes to nothing."""

    def __init__(self, directory: str):
      super().__init__(extra_ids=0)
      self.directory = os.path.abspath(directory)
      self.tokenizer = text_tok.TextTokenizer.load(self.directory)

    @property
    def eos_id(self):
      return None

    @property
    def unk_id(self):
      return 0

    @property
    def _base_vocab_size(self) -> int:
      return self.tokenizer.vocab_size

    def _encode(self, s: str):
      return self.tokenizer.encode(s).tolist()

    def _decode(self, ids) -> str:
      return self.tokenizer.decode([int(i) for i in ids])

    def _encode_tf(self, s):
      encode = lambda b: self.tokenizer.encode(np.asarray(b).item().decode("utf-8"))  # noqa: E731
      ids = tf.numpy_function(encode, [s], tf.int32, stateful=False)
      ids.set_shape([None])
      return ids

    def _decode_tf(self, ids):
      def decode(a):
        rows = a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1)
        texts = [self.tokenizer.decode(r).encode("utf-8") for r in rows]
        return np.array(texts, dtype=object).reshape(a.shape[:-1] if a.ndim else ())
      out = tf.numpy_function(decode, [ids], tf.string, stateful=False)
      out.set_shape(ids.shape[:-1] if ids.shape.rank else [])
      return out

    def __eq__(self, other):
      return isinstance(other, TextVocabulary) and other.directory == self.directory

    def __hash__(self):
      return hash(self.directory)

    def __str__(self):
      return f"TextVocabulary({self.directory}, size={self.vocab_size})"

  return TextVocabulary(tokenizer_dir)


def _records_dataset(split: str, shuffle_files: bool, seed=None, *, data_dir: str):
  """{"id", "text": local ids} per prepared text record of `split`, shards in order (or
  shuffled with shuffle_files)."""
  _, tf = _seqio()
  manifest = records_lib.Manifest.load(data_dir)
  paths = manifest.shard_paths(data_dir, "text", split)
  if shuffle_files:
    paths = [paths[i] for i in np.random.default_rng(seed).permutation(len(paths))]

  def examples():
    for path in paths:
      reader = records_lib.ShardReader([path])
      for i in range(len(reader)):
        arrays, meta = reader[i]
        yield {"id": str(meta.get("id", f"{path}:{i}")), "text": arrays["text"].astype(np.int32)}

  return tf.data.Dataset.from_generator(examples, output_signature={
      "id": tf.TensorSpec([], tf.string), "text": tf.TensorSpec([None], tf.int32)})


def _shakespeare_dataset(split: str, shuffle_files: bool, seed=None, *, corpus_seed: int):
  """{"id", "text": str} per embedded Shakespeare document of `split` (as prepare splits it)."""
  _, tf = _seqio()
  docs = sources_lib.text_documents(split, seed=corpus_seed)
  return tf.data.Dataset.from_tensor_slices({"id": [d["id"] for d in docs],
                                             "text": [d["text"] for d in docs]})


def register_tasks(data_dir: str, *, prefix: str = "tmdiff") -> list[str]:
  """Registers f"{prefix}_text" and f"{prefix}_shakespeare" over the prepared `data_dir`
  (replacing tasks of those names); returns the names."""
  seqio, tf = _seqio()
  manifest = records_lib.Manifest.load(data_dir)
  if "text" not in manifest.shards:
    raise BridgeError(f"{os.path.join(data_dir, records_lib.MANIFEST)} lists no text shards; "
                      "prepare with --sources including text")
  tokenizer_dir = os.path.join(data_dir, "tokenizers", "text")
  if not os.path.isdir(tokenizer_dir):
    raise BridgeError(f"no text tokenizer at {tokenizer_dir} (prepare saves it there)")
  features = {"text": seqio.Feature(text_vocabulary(tokenizer_dir), add_eos=False,
                                    dtype=tf.int32)}
  splits = tuple(s for s in records_lib.SPLITS if s in manifest.shards["text"])
  sources = {
      "text": (seqio.FunctionDataSource(
          functools.partial(_records_dataset, data_dir=os.path.abspath(data_dir)), splits=splits,
          num_input_examples={s: manifest.counts["text"][s] for s in splits}), []),
      "shakespeare": (seqio.FunctionDataSource(
          functools.partial(_shakespeare_dataset, corpus_seed=int(manifest.extra.get("seed", 0))),
          splits=records_lib.SPLITS), [seqio.preprocessors.tokenize]),
  }
  names = []
  for short in TASK_NAMES:
    name = f"{prefix}_{short}"
    if name in seqio.TaskRegistry.names():
      seqio.TaskRegistry.remove(name)
    source, preprocessors = sources[short]
    seqio.TaskRegistry.add(name, source=source, output_features=features,
                           preprocessors=preprocessors)
    names.append(name)
  return names
