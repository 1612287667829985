"""The Grain input pipeline: sources -> rows (text packed, pairs padded) -> mixture -> batches.

  make_dataset(config, split) -> grain.IterDataset of numpy batch dicts (tmdiff.data.batch)

Per source (`text`, `image_text`, `audio_text`) one dataset of *examples* (one document or
pair each, laid out in unified ids), sharded per host, shuffled (train) and repeated; then
  text:   packed into rows; documents longer than the room left are split at the row end,
          each piece its own segment (positions restart); at most data.max_segments per row.
  pairs:  one pair per row, `<bos> caption <boi> image <eoi> <eos>` (audio: <boa> ... <eoa>),
          padded to data.seq_len; cond_mask = 1 on `<bos> caption`.
Rows of the sources are mixed with `grain.IterDataset.mix` by data.mixture (sampling weight
of each source, per row), or, with data.exact_mix, each batch takes a fixed number of rows
from each source. The final iterator records the realised per-modality token fractions
(`iterator.token_fractions()`), and its state (get_state/set_state, or Grain's Orbax
checkpoint handler) restores the exact continuation.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

import grain
import numpy as np
from grain._src.python.dataset import dataset as grain_dataset

from tmdiff.data import records as records_lib
from tmdiff.data import vocab as vocab_lib
from tmdiff.data.batch import FIELDS
from tmdiff.data.records import RecordError

SOURCES = records_lib.SOURCES
SOURCE_MODALITY = {"text": vocab_lib.TEXT, "image_text": vocab_lib.IMAGE,
                   "audio_text": vocab_lib.AUDIO}
# Shortest piece a document is split into at a row end (shorter: pad the row instead).
MIN_SPLIT_TOKENS = 8
# Record-level problems are raised (default) or, with data.on_bad_record='skip', counted.
BAD_RECORD_POLICIES = ("error", "skip")


class DataConfigError(ValueError):
  """A data config that cannot work (names the key)."""


# ----------------------------------------------------------------------------------------
# Examples: one document or pair in unified ids.

def text_example(text_ids: np.ndarray, layout: vocab_lib.VocabLayout) -> dict[str, np.ndarray]:
  """`<bos> text <eos>`; text_ids are unified."""
  tokens = np.concatenate([[layout.bos], text_ids, [layout.eos]]).astype(np.int32)
  return {"tokens": tokens, "modality": np.zeros_like(tokens),
          "cond_mask": np.zeros_like(tokens)}


def pair_example(cond_ids: np.ndarray, target_ids: np.ndarray, target_modality: int,
                 layout: vocab_lib.VocabLayout) -> dict[str, np.ndarray]:
  """`<bos> cond <boX> target <eoX> <eos>`; ids are unified. cond_mask on `<bos> cond`."""
  begin, end = ((layout.boi, layout.eoi) if target_modality == vocab_lib.IMAGE
                else (layout.boa, layout.eoa))
  n_cond = 1 + len(cond_ids)
  tokens = np.concatenate([[layout.bos], cond_ids, [begin], target_ids, [end, layout.eos]])
  modality = np.zeros(len(tokens), np.int32)
  modality[n_cond + 1:n_cond + 1 + len(target_ids)] = target_modality
  cond = np.zeros(len(tokens), np.int32)
  cond[:n_cond] = 1
  return {"tokens": tokens.astype(np.int32), "modality": modality, "cond_mask": cond}


def _bad(message: str) -> dict[str, Any]:
  return {"bad": message}


class RecordToExample:
  """Validates a decoded record of `source` and lays it out in unified ids.

  Raises RecordError naming file and record, or with policy 'skip' returns a marker that
  the row builders count and drop.
  """

  def __init__(self, source: str, layout: vocab_lib.VocabLayout, policy: str,
               image_tokens: int | None):
    self.source, self.layout, self.policy, self.image_tokens = source, layout, policy, image_tokens

  def _fail(self, message: str):
    if self.policy == "skip":
      return _bad(message)
    raise RecordError(message)

  def __call__(self, item) -> dict[str, Any]:
    arrays, meta = item
    if arrays is None:   # unreadable record (see TolerantReader)
      return _bad(meta["error"])
    where = meta.get("_where", "record")
    local = {}
    for name, modality_name in records_lib.SOURCE_FIELDS[self.source]:
      if name not in arrays:
        return self._fail(f"{where}: no field {name!r} (source {self.source!r}, fields "
                          f"{sorted(arrays)})")
      ids = arrays[name]
      modality = vocab_lib.MODALITIES.index(modality_name)
      start, stop = self.layout.range_of(modality)
      if ids.size and (ids.min() < 0 or ids.max() >= stop - start):
        return self._fail(f"{where}: {name} id outside its {modality_name} range "
                          f"[0, {stop - start}): min {ids.min()}, max {ids.max()}")
      local[name] = ids.astype(np.int64) + start
    L = self.layout
    if self.source == "text":
      if local["text"].size == 0:
        return self._fail(f"{where}: empty text document")
      return text_example(local["text"], L)
    cond_name, target_name = (("caption", "image") if self.source == "image_text"
                              else ("transcript", "audio"))
    if local[cond_name].size == 0:
      return self._fail(f"{where}: empty {cond_name}")
    if local[target_name].size == 0:
      return self._fail(f"{where}: empty {target_name} token sequence")
    if self.source == "image_text" and self.image_tokens and local["image"].size != self.image_tokens:
      return self._fail(f"{where}: image has {local['image'].size} tokens, expected "
                        f"{self.image_tokens} (image of the wrong size?)")
    return pair_example(local[cond_name], local[target_name], SOURCE_MODALITY[self.source], L)


class TolerantReader:
  """Wraps a ShardReader for data.on_bad_record='skip': unreadable records become markers."""

  def __init__(self, reader: records_lib.ShardReader):
    self._reader = reader

  def __len__(self) -> int:
    return len(self._reader)

  def __getitem__(self, index):
    try:
      return self._reader[index]
    except RecordError as e:
      return None, {"error": str(e)}


# ----------------------------------------------------------------------------------------
# Rows: packing (text) and padding (pairs), with checkpointable state.

def _empty_row(seq_len: int, pad: int) -> dict[str, np.ndarray]:
  row = {f: np.zeros((seq_len,), np.int32) for f in FIELDS}
  row["tokens"][:] = pad
  return row


def _place(row, example, start: int, offset: int, count: int, segment: int) -> None:
  dst, src = slice(start, start + count), slice(offset, offset + count)
  row["tokens"][dst] = example["tokens"][src]
  row["modality"][dst] = example["modality"][src]
  row["cond_mask"][dst] = example["cond_mask"][src]
  row["segment_ids"][dst] = segment
  row["positions"][dst] = np.arange(count, dtype=np.int32)
  row["loss_mask"][dst] = 1


class _RowIterator(grain_dataset.DatasetIterator):
  """Shared bookkeeping: counts and logs skipped bad records."""

  def __init__(self, parent, seq_len: int, pad: int, name: str):
    super().__init__(parent)
    self._seq_len, self._pad, self._name = seq_len, pad, name
    self._skipped = 0

  def _next_example(self):
    while True:
      example = next(self._parent)
      if "bad" not in example:
        return example
      self._skipped += 1
      if self._skipped <= 10 or self._skipped % 1000 == 0:
        logging.warning("data: skipped bad %s record (%d so far): %s", self._name,
                        self._skipped, example["bad"])

  @property
  def skipped_records(self) -> int:
    return self._skipped


class _PackIterator(_RowIterator):
  """Greedy in-order packing; the document that does not fit is split at the row end."""

  def __init__(self, parent, seq_len: int, pad: int, max_segments: int):
    super().__init__(parent, seq_len, pad, "text")
    self._max_segments = max_segments
    self._pending = None           # (example, offset of its first unplaced token)
    self._pending_state = None     # parent state from before the pending example was read

  def __next__(self):
    row, filled, segments = _empty_row(self._seq_len, self._pad), 0, 0
    while filled < self._seq_len and segments < self._max_segments:
      if self._pending is None:
        state = self._parent.get_state()
        try:
          example = self._next_example()
        except StopIteration:
          if filled:
            break
          raise
        self._pending, self._pending_state = (example, 0), state
      example, offset = self._pending
      remaining, room = len(example["tokens"]) - offset, self._seq_len - filled
      if remaining > room and filled and room < MIN_SPLIT_TOKENS:
        break
      count = min(remaining, room)
      segments += 1
      _place(row, example, filled, offset, count, segments)
      filled += count
      self._pending = None if count == remaining else (example, offset + count)
    return row

  def get_state(self):
    pending = self._pending is not None
    return {"parent": self._pending_state if pending else self._parent.get_state(),
            "pending_offset": self._pending[1] if pending else -1, "skipped": self._skipped}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._skipped = state["skipped"]
    self._pending = self._pending_state = None
    if state["pending_offset"] >= 0:
      self._pending_state = state["parent"]
      self._pending = (self._next_example(), state["pending_offset"])


class _PadIterator(_RowIterator):
  """One pair per row, padded; a pair longer than seq_len is a clear error."""

  def __init__(self, parent, seq_len: int, pad: int, name: str):
    super().__init__(parent, seq_len, pad, name)

  def __next__(self):
    example = self._next_example()
    n = len(example["tokens"])
    if n > self._seq_len:
      raise DataConfigError(
          f"a {self._name} pair has {n} tokens > data.seq_len={self._seq_len}; raise "
          f"data.seq_len or rerun prepare with --max_pair_tokens={self._seq_len}")
    row = _empty_row(self._seq_len, self._pad)
    _place(row, example, 0, 0, n, 1)
    return row

  def get_state(self):
    return {"parent": self._parent.get_state(), "skipped": self._skipped}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._skipped = state["skipped"]


class RowDataset(grain.IterDataset):
  """Examples of one source -> [seq_len] rows (packed text or padded pairs)."""

  def __init__(self, parent: grain.IterDataset, source: str, seq_len: int, pad: int,
               max_segments: int):
    super().__init__(parent)
    self._source, self._seq_len, self._pad, self._max_segments = source, seq_len, pad, max_segments

  def __iter__(self):
    parent = self._parent.__iter__()
    if self._source == "text":
      return _PackIterator(parent, self._seq_len, self._pad, self._max_segments)
    return _PadIterator(parent, self._seq_len, self._pad, self._source)


# ----------------------------------------------------------------------------------------
# Exact per-batch composition.

def exact_counts(weights: dict[str, float], batch_size: int) -> dict[str, int]:
  """Rows per source in every batch: largest-remainder apportionment of batch_size."""
  total = sum(weights.values())
  quotas = {k: w / total * batch_size for k, w in weights.items()}
  counts = {k: int(np.floor(q)) for k, q in quotas.items()}
  by_remainder = sorted(weights, key=lambda k: (-(quotas[k] - counts[k]), list(weights).index(k)))
  for k in by_remainder[:batch_size - sum(counts.values())]:
    counts[k] += 1
  return counts


class _ExactMixIterator(grain_dataset.DatasetIterator):

  def __init__(self, parents: dict[str, Any], counts: dict[str, int]):
    super().__init__(list(parents.values()))
    self._named, self._counts = parents, counts

  def __next__(self):
    rows = [next(it) for name, it in self._named.items() for _ in range(self._counts[name])]
    return {f: np.stack([r[f] for r in rows]) for f in FIELDS}

  def get_state(self):
    return {name: it.get_state() for name, it in self._named.items()}

  def set_state(self, state):
    for name, it in self._named.items():
      it.set_state(state[name])


class ExactMixDataset(grain.IterDataset):
  """Batches holding exactly counts[name] rows of each named row dataset, in fixed order."""

  def __init__(self, parents: dict[str, grain.IterDataset], counts: dict[str, int]):
    super().__init__(list(parents.values()))
    self._named, self._counts = parents, counts

  def __iter__(self):
    return _ExactMixIterator({k: ds.__iter__() for k, ds in self._named.items()}, self._counts)


# ----------------------------------------------------------------------------------------
# Realised composition.

def batch_token_counts(batch) -> np.ndarray:
  """Non-pad tokens per modality (text, image, audio) in a batch, int64 [3]."""
  live = np.asarray(batch["segment_ids"]) > 0
  modality = np.asarray(batch["modality"])[live]
  return np.bincount(modality, minlength=3)[:3].astype(np.int64)


def batch_row_counts(batch) -> np.ndarray:
  """Rows per source (text, image_text, audio_text): a row's source is its richest modality."""
  modality = np.asarray(batch["modality"])
  return np.bincount(modality.max(axis=1), minlength=3)[:3].astype(np.int64)


def token_fractions(counts) -> dict[str, float]:
  counts = np.asarray(counts, np.float64)
  total = max(counts.sum(), 1.0)
  return {name: float(c / total) for name, c in zip(vocab_lib.MODALITIES, counts)}


class _RecordingIterator(grain_dataset.DatasetIterator):

  def __init__(self, parent, log_every: int):
    super().__init__(parent)
    self._tokens = np.zeros(3, np.int64)
    self._rows = np.zeros(3, np.int64)
    self._batches = 0
    self._log_every = log_every

  def __next__(self):
    batch = next(self._parent)
    self._tokens += batch_token_counts(batch)
    self._rows += batch_row_counts(batch)
    self._batches += 1
    if self._log_every and self._batches % self._log_every == 0:
      logging.info("data: %d batches, realised token fractions %s, rows per source %s",
                   self._batches, self.token_fractions(), self.row_counts())
    return batch

  def token_fractions(self) -> dict[str, float]:
    """Realised fraction of non-pad tokens per modality since the start of training."""
    return token_fractions(self._tokens)

  def row_counts(self) -> dict[str, int]:
    return {name: int(c) for name, c in zip(SOURCES, self._rows)}

  def skipped_records(self) -> int:
    """Bad records skipped so far (data.on_bad_record='skip'), summed over sources."""
    def total(state):
      if isinstance(state, dict):
        return int(state.get("skipped", 0)) + sum(total(v) for k, v in state.items()
                                                   if k != "skipped")
      return 0
    return total(self._parent.get_state())

  def stats(self) -> dict[str, Any]:
    return {"batches": self._batches, "token_fractions": self.token_fractions(),
            "tokens": {m: int(c) for m, c in zip(vocab_lib.MODALITIES, self._tokens)},
            "rows": self.row_counts(), "skipped_records": self.skipped_records()}

  def get_state(self):
    return {"parent": self._parent.get_state(), "batches": self._batches,
            "tokens": [int(x) for x in self._tokens], "rows": [int(x) for x in self._rows]}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._batches = int(state["batches"])
    self._tokens = np.asarray(state["tokens"], np.int64)
    self._rows = np.asarray(state["rows"], np.int64)


class RecordingDataset(grain.IterDataset):
  """Passes batches through; its iterator exposes token_fractions() / stats()."""

  def __init__(self, parent: grain.IterDataset, log_every: int = 0):
    super().__init__(parent)
    self._log_every = log_every

  def __iter__(self):
    return _RecordingIterator(self._parent.__iter__(), self._log_every)


# ----------------------------------------------------------------------------------------
# Entry point.

def mixture_weights(config) -> dict[str, float]:
  mixture = dict(config.data.mixture)
  unknown = set(mixture) - set(SOURCES)
  if unknown:
    raise DataConfigError(f"data.mixture has unknown sources {sorted(unknown)}; known {SOURCES}")
  weights = {k: float(mixture.get(k, 0.0)) for k in SOURCES}
  if any(w < 0 for w in weights.values()) or not any(w > 0 for w in weights.values()):
    raise DataConfigError(f"data.mixture weights must be >= 0 with one > 0, got {weights}")
  return {k: w for k, w in weights.items() if w > 0}


def local_batch_size(config, process_count: int) -> int:
  global_batch = int(config.data.global_batch)
  if global_batch % process_count:
    raise DataConfigError(f"data.global_batch={global_batch} is not divisible by "
                          f"process_count={process_count}")
  return global_batch // process_count


def check_manifest_vocab(manifest: records_lib.Manifest, config, data_dir: str) -> None:
  for key in sorted(manifest.vocab):
    have, want = int(manifest.vocab[key]), int(config.vocab[key])
    if have != want:
      raise DataConfigError(
          f"{os.path.join(data_dir, records_lib.MANIFEST)}: tokenizers have {key}={have} but "
          f"config.vocab.{key}={want}; set --config.vocab.{key}={have} (or re-prepare)")


def _example_datasets(config, split: str, layout: vocab_lib.VocabLayout, sources,
                      process_index: int, process_count: int) -> dict[str, grain.MapDataset]:
  """Per source: a MapDataset of examples, this host's shard, not yet shuffled."""
  if config.data.source == "synthetic":
    from tmdiff.data import synthetic
    return {s: synthetic.example_dataset(config, split, s, layout)[process_index::process_count]
            for s in sources}
  if config.data.source != "prepared":
    raise DataConfigError(f"data.source must be 'synthetic' or 'prepared', got "
                          f"{config.data.source!r}")
  data_dir = config.data.data_dir
  if not data_dir:
    raise DataConfigError("data.source='prepared' needs data.data_dir (a prepare --out dir)")
  policy = config.data.on_bad_record
  if policy not in BAD_RECORD_POLICIES:
    raise DataConfigError(f"data.on_bad_record must be one of {BAD_RECORD_POLICIES}, "
                          f"got {policy!r}")
  manifest = records_lib.Manifest.load(data_dir)
  check_manifest_vocab(manifest, config, data_dir)
  out = {}
  for s in sources:
    paths = manifest.shard_paths(data_dir, s, split)
    reader = records_lib.ShardReader(paths, manifest.records_per_shard[s][split])
    if len(reader) < process_count:
      raise DataConfigError(f"{s}/{split} has {len(reader)} records, fewer than "
                            f"process_count={process_count}")
    to_example = RecordToExample(s, layout, policy, manifest.extra.get("image_tokens"))
    source = TolerantReader(reader) if policy == "skip" else reader
    out[s] = grain.MapDataset.source(source)[process_index::process_count].map(to_example)
  return out


def make_dataset(config, split: str = "train", *, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
  """The input pipeline for `split` ('train' | 'validation') on this host.

  Yields numpy dicts of [global_batch / process_count, seq_len] int32 arrays per the batch
  contract. Infinite for both splits (validation repeats in a fixed order; take
  data.eval_batches). `iter(ds)` has get_state/set_state and token_fractions()/stats().
  """
  if split not in records_lib.SPLITS:
    raise DataConfigError(f"split must be one of {records_lib.SPLITS}, got {split!r}")
  if not 0 <= process_index < process_count:
    raise DataConfigError(f"process_index={process_index} outside [0, {process_count})")
  data = config.data
  seq_len, max_segments = int(data.seq_len), int(data.max_segments)
  if seq_len < 8 or max_segments < 1:
    raise DataConfigError(f"need data.seq_len >= 8 and data.max_segments >= 1, got "
                          f"{seq_len}, {max_segments}")
  layout = vocab_lib.VocabLayout.from_config(config.vocab)
  weights = mixture_weights(config)
  batch_size = local_batch_size(config, process_count)
  examples = _example_datasets(config, split, layout, list(weights), process_index,
                               process_count)
  rows = {}
  for k, (name, ds) in enumerate(examples.items()):
    if split == "train":
      ds = ds.shuffle(seed=int(config.seed) * 7919 + k + 1)
    # Reads run inline: per-record work is small, and prefetch threads on few cores cost
    # more in GIL contention than they save. Use data.worker_count for parallelism.
    ds = ds.repeat(None).to_iter_dataset(grain.ReadOptions(num_threads=0))
    rows[name] = RowDataset(ds, name, seq_len, layout.pad, max_segments)
  if data.exact_mix:
    counts = exact_counts(weights, batch_size)
    batches = ExactMixDataset({k: v for k, v in rows.items() if counts[k]}, counts)
  else:
    mixed = rows[next(iter(rows))] if len(rows) == 1 else grain.IterDataset.mix(rows, weights)
    batches = mixed.batch(batch_size, drop_remainder=True)
  if int(data.worker_count) > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain workers read absl flags; outside absl.app, use defaults
      flags.FLAGS.mark_as_parsed()
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(data.worker_count)))
  return RecordingDataset(batches, log_every=int(data.log_fractions_every))
