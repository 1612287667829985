"""The Grain input pipeline: records -> examples -> rows (text packed, pairs padded or packed)
-> mixture -> batches.

  make_dataset(config, split, process_index=0, process_count=1) -> grain.IterDataset of numpy
  batch dicts (tmdiff.data.batch)

Per source (`text`, `image_text`, `audio_text`) an example stream reads this host's records
(every process_count-th; shuffled per epoch for train, in order for validation; repeated),
validates them and lays them out in unified ids:
  text:   `<bos> text <eos>`, packed into rows; a document longer than the room left is split
          at the row end, each piece its own segment (positions restart); at most
          data.max_segments per row.
  pairs:  `<bos> caption <boi> image <eoi> <eos>` (audio: <boa> ... <eoa>), one pair per row,
          padded to data.seq_len; cond_mask = 1 on `<bos> caption`.
Row g of the mixture comes from the source into whose data.mixture share of [0, 1) the
golden-ratio sequence frac((g + 1/2) * 0.618...) falls (deterministic, and the realised
fractions track the weights closely over any window); with data.exact_mix each batch takes a
fixed number of rows from each source instead, in source order.
With data.pack_pairs, pairs are packed too: whole pairs and text documents, each its own
segment (positions restart), share rows, and data.mixture weights the real tokens per modality
(RowPacker); with data.exact_mix as well, each row holds one source's pairs, packed.

Speed: no Python work per token and little per example. Streams read records ahead in chunks
(one ArrayRecord read per shard touched, validation and layout as array ops over the chunk);
rows are written from piece tables with a few vectorised scatters; one Grain element is a
*block* of K batches ([6, K, B, L] int32 plus per-batch token and row counts), so Grain's
per-element cost and, with data.worker_count > 0, the worker-to-host transfer are paid once
per block. The final iterator hands out the block's batches (views), records the realised
per-modality token fractions (`iterator.token_fractions()`, `stats()`), and its state
(get_state/set_state, or Grain's Orbax checkpoint handler) restores the exact continuation.
The row stream does not depend on K. Throughput: `python -m tmdiff.data.bench`.
"""
from __future__ import annotations

import collections
import logging
import os
from typing import Any

import grain
import numpy as np
from grain._src.python.dataset import dataset as grain_dataset

from tmdiff.configs import derived
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
# Records a stream reads ahead at once.
CHUNK_RECORDS = 256
# A block holds K batches: K*B*L <= BLOCK_TOKENS and K*B <= BLOCK_ROWS where possible,
# 1 <= K <= MAX_BLOCK_BATCHES.
BLOCK_TOKENS, BLOCK_ROWS, MAX_BLOCK_BATCHES = 1 << 17, 1024, 64
# Version of the iterator state; a checkpoint of another pipeline version is refused.
STATE_FORMAT = 2
GOLDEN = 0.6180339887498949   # (sqrt(5) - 1) / 2
_TOKENS, _SEGMENTS, _POSITIONS, _MODALITY, _LOSS, _COND = range(len(FIELDS))


class DataConfigError(ValueError):
  """A data config that cannot work (names the key)."""


# ----------------------------------------------------------------------------------------
# Example layouts, one example at a time: the reference that the vectorised row builders
# below reproduce (tests compare them).

def text_example(text_ids: np.ndarray, layout: vocab_lib.VocabLayout) -> dict[str, np.ndarray]:
  """`<bos> text <eos>`; text_ids are unified."""
  tokens = np.concatenate([[layout.bos], text_ids, [layout.eos]]).astype(np.int32)
  return {"tokens": tokens, "modality": np.zeros_like(tokens),
          "cond_mask": np.zeros_like(tokens)}


def pair_example(cond_ids: np.ndarray, target_ids: np.ndarray, target_modality: int,
                 layout: vocab_lib.VocabLayout) -> dict[str, np.ndarray]:
  """`<bos> cond <boX> target <eoX> <eos>`; ids are unified. cond_mask on `<bos> cond`."""
  begin, end = _target_brackets(target_modality, layout)
  n_cond = 1 + len(cond_ids)
  tokens = np.concatenate([[layout.bos], cond_ids, [begin], target_ids, [end, layout.eos]])
  modality = np.zeros(len(tokens), np.int32)
  modality[n_cond + 1:n_cond + 1 + len(target_ids)] = target_modality
  cond = np.zeros(len(tokens), np.int32)
  cond[:n_cond] = 1
  return {"tokens": tokens.astype(np.int32), "modality": modality, "cond_mask": cond}


def _target_brackets(modality: int, layout: vocab_lib.VocabLayout) -> tuple[int, int]:
  return (layout.boi, layout.eoi) if modality == vocab_lib.IMAGE else (layout.boa, layout.eoa)


# ----------------------------------------------------------------------------------------
# Epoch order: a keyed permutation of [0, n), evaluated for many indices at once in O(1)
# memory (a 4-round Feistel network on the smallest even-bit domain >= n, cycle-walking
# back into [0, n)), so shuffling needs no per-example call and no n-sized table.

def _mix64(z: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser on uint64 arrays (wrapping arithmetic)."""
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def permute(indices: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
  """Image of `indices` (in [0, n)) under the bijection of [0, n) that `keys` (uint64) pick."""
  indices = np.asarray(indices, np.int64)
  if n <= 1:
    return indices.copy()
  half = (max(2, (n - 1).bit_length()) + 1) // 2
  mask = np.uint64((1 << half) - 1)
  shift = np.uint64(half)

  def once(x):
    left, right = x >> shift, x & mask
    for key in keys:
      left, right = right, left ^ (_mix64(right ^ key) & mask)
    return (left << shift) | right

  out = indices.astype(np.uint64)
  todo = np.arange(len(out))
  while todo.size:
    out[todo] = once(out[todo])
    todo = todo[out[todo] >= np.uint64(n)]
  return out.astype(np.int64)


# ----------------------------------------------------------------------------------------
# Example streams: positions 0, 1, 2, ... of one source on this host -> laid-out examples.

class ExampleStream:
  """Position p is record `offset + stride * order_e(p mod n)`, e = p // n, of `records`
  (a records.ShardReader or synthetic.SyntheticRecords: __len__, read_many, where): this
  host's (and worker's) every stride-th record, in a fresh shuffled order each epoch when
  `shuffle_seed` is set, else in order.

  next() returns the next valid example: text: unified `<bos> ids <eos>` (int32); pairs:
  (unified cond ids, unified target ids). Bad records raise RecordError naming file and
  record (policy 'error') or are counted and skipped ('skip') when their position is
  reached. State: {"position", "skipped"}.
  """

  def __init__(self, records, source: str, layout: vocab_lib.VocabLayout, policy: str,
               image_tokens: int | None, *, offset: int, stride: int,
               shuffle_seed: int | None):
    self._records, self._source, self._layout = records, source, layout
    self._policy, self._image_tokens = policy, image_tokens
    self._offset, self._stride = offset, stride
    self._n = len(range(offset, len(records), stride))
    if self._n < 1:
      raise DataConfigError(f"{source}: no records left for this host/worker (offset "
                            f"{offset}, stride {stride}, {len(records)} records)")
    self._shuffle_seed = shuffle_seed
    self._keys: dict[int, np.ndarray] = {}
    self._ahead: collections.deque = collections.deque()
    self._position = self._next_read = 0
    self._skipped = 0

  @property
  def position(self) -> int:
    """Position of the next entry next() looks at."""
    return self._position

  @property
  def skipped(self) -> int:
    return self._skipped

  def get_state(self) -> dict[str, int]:
    return {"position": self._position, "skipped": self._skipped}

  def set_state(self, state) -> None:
    self._position = self._next_read = int(state["position"])
    self._skipped = int(state["skipped"])
    self._ahead.clear()

  def record_indices(self, positions: np.ndarray) -> np.ndarray:
    positions = np.asarray(positions, np.int64)
    epochs, within = np.divmod(positions, self._n)
    if self._shuffle_seed is not None:
      for epoch in np.unique(epochs).tolist():
        sel = epochs == epoch
        within[sel] = permute(within[sel], self._n, self._epoch_keys(epoch))
    return self._offset + self._stride * within

  def _epoch_keys(self, epoch: int) -> np.ndarray:
    if epoch not in self._keys:
      if len(self._keys) > 4:
        self._keys.clear()
      self._keys[epoch] = np.random.SeedSequence(
          [self._shuffle_seed, epoch]).generate_state(4, np.uint64)
    return self._keys[epoch]

  def next(self):
    while True:
      if not self._ahead:
        self._read_ahead()
      item = self._ahead.popleft()
      self._position += 1
      if not isinstance(item, str):
        return item
      if self._policy != "skip":
        raise RecordError(item)
      self._skipped += 1
      if self._skipped <= 10 or self._skipped % 1000 == 0:
        logging.warning("data: skipped bad %s record (%d so far): %s", self._source,
                        self._skipped, item)

  def _read_ahead(self) -> None:
    indices = self.record_indices(np.arange(self._next_read, self._next_read + CHUNK_RECORDS))
    self._next_read += CHUNK_RECORDS
    self._ahead.extend(self._examples(self._records.read_many(indices), indices))

  def _examples(self, items: list, indices: np.ndarray) -> list:
    """Validated examples of decoded records `items`; an error message (str) for bad ones."""
    source, layout = self._source, self._layout
    fields = records_lib.SOURCE_FIELDS[source]
    out: list = [None] * len(items)
    where = lambda slot: self._records.where(int(indices[slot]))  # noqa: E731
    good = []
    for slot, item in enumerate(items):
      if isinstance(item, Exception):
        out[slot] = str(item)
        continue
      missing = [name for name, _ in fields if name not in item]
      if missing:
        out[slot] = (f"{where(slot)}: no field {missing[0]!r} (source {source!r}, fields "
                     f"{sorted(item)})")
        continue
      good.append(slot)
    columns = []   # per field: lengths [len(good)], unified flat ids
    for name, modality_name in fields:
      arrays = [items[slot][name] for slot in good]
      lengths = np.fromiter(map(len, arrays), np.int64, len(arrays))
      flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int32)
      modality = vocab_lib.MODALITIES.index(modality_name)
      start, stop = layout.range_of(modality)
      if flat.size and (flat.min() < 0 or flat.max() >= stop - start):
        for k, slot in enumerate(good):   # rare: name the first offending record(s)
          ids = arrays[k]
          if out[slot] is None and ids.size and (ids.min() < 0 or ids.max() >= stop - start):
            out[slot] = (f"{where(slot)}: {name} id outside its {modality_name} range "
                         f"[0, {stop - start}): min {ids.min()}, max {ids.max()}")
      columns.append((lengths, (flat + start).astype(np.int32)))
    if source == "text":
      checks = [(columns[0][0] == 0, lambda slot: "empty text document")]
    else:
      cond_name, target_name = fields[0][0], fields[1][0]
      checks = [(columns[0][0] == 0, lambda slot: f"empty {cond_name}"),
                (columns[1][0] == 0, lambda slot: f"empty {target_name} token sequence")]
      if source == "image_text" and self._image_tokens:
        checks.append((columns[1][0] != self._image_tokens,
                       lambda slot: f"image has {len(items[slot]['image'])} tokens, expected "
                                    f"{self._image_tokens} (image of the wrong size?)"))
    for failed, message in checks:
      for k in np.flatnonzero(failed).tolist():
        if out[good[k]] is None:
          out[good[k]] = f"{where(good[k])}: {message(good[k])}"
    ends = [np.cumsum(lengths) for lengths, _ in columns]
    if source == "text":
      # <bos> ids <eos> for every record, in one flat array.
      lengths, flat = columns[0]
      sizes = lengths + 2
      starts = np.cumsum(sizes) - sizes
      laid = np.empty(int(sizes.sum()), np.int32)
      laid[starts] = layout.bos
      laid[starts + sizes - 1] = layout.eos
      inner = np.ones(len(laid), bool)
      inner[starts] = inner[starts + sizes - 1] = False
      laid[inner] = flat
      bounds = np.cumsum(sizes).tolist()
      for k, slot in enumerate(good):
        if out[slot] is None:
          out[slot] = laid[bounds[k] - int(sizes[k]):bounds[k]]
    else:
      (_, cond), (_, target) = columns
      cond_ends, target_ends = ends[0].tolist(), ends[1].tolist()
      cond_lengths, target_lengths = columns[0][0].tolist(), columns[1][0].tolist()
      for k, slot in enumerate(good):
        if out[slot] is None:
          out[slot] = (cond[cond_ends[k] - cond_lengths[k]:cond_ends[k]],
                       target[target_ends[k] - target_lengths[k]:target_ends[k]])
    return out


# ----------------------------------------------------------------------------------------
# Rows: packing (text) and padding (pairs). fill(out, rows) writes rows `rows` of a block
# out[field, row, position] that holds <pad> tokens and zeros elsewhere.

def _ragged_arange(counts: np.ndarray) -> np.ndarray:
  """0..c-1 for every c in counts, concatenated."""
  total = int(counts.sum())
  return np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)


class TextPacker:
  """Greedy in-order packing; the document that does not fit is split at the row end
  unless fewer than MIN_SPLIT_TOKENS would go into the row (then the row is padded)."""

  def __init__(self, stream: ExampleStream, seq_len: int, max_segments: int):
    self._stream, self._seq_len, self._max_segments = stream, seq_len, max_segments
    self._pending = None   # (example, offset of its first unplaced token)

  def fill(self, out: np.ndarray, rows: np.ndarray) -> None:
    seq_len, max_segments, stream = self._seq_len, self._max_segments, self._stream
    examples, pieces = [], []   # pieces: (example slot, offset, count, row, column, segment)
    pending = None
    if self._pending is not None:
      examples.append(self._pending[0])
      pending = (0, self._pending[1], len(self._pending[0]))
    for row in rows.tolist():
      filled = segments = 0
      while filled < seq_len and segments < max_segments:
        if pending is None:
          example = stream.next()
          examples.append(example)
          pending = (len(examples) - 1, 0, len(example))
        slot, offset, size = pending
        remaining, room = size - offset, seq_len - filled
        if remaining > room and filled and room < MIN_SPLIT_TOKENS:
          break
        count = min(remaining, room)
        segments += 1
        pieces.append((slot, offset, count, row, filled, segments))
        filled += count
        pending = None if count == remaining else (slot, offset + count, size)
    self._pending = None if pending is None else (examples[pending[0]], pending[1])
    if not pieces:
      return
    slot, offset, count, row, column, segment = np.array(pieces, np.int64).T
    sizes = np.fromiter(map(len, examples), np.int64, len(examples))
    flat = np.concatenate(examples) if len(examples) > 1 else examples[0]
    within = _ragged_arange(count)
    dst = np.repeat(row * seq_len + column, count) + within
    src = np.repeat((np.cumsum(sizes) - sizes)[slot] + offset, count) + within
    flat_out = out.reshape(len(FIELDS), -1)
    flat_out[_TOKENS, dst] = flat[src]
    flat_out[_SEGMENTS, dst] = np.repeat(segment, count)
    flat_out[_POSITIONS, dst] = within
    flat_out[_LOSS, dst] = 1

  def get_state(self) -> dict:
    if self._pending is None:
      return {"stream": self._stream.get_state(), "pending_offset": -1}
    # The pending document is the last one read: resume by reading it again.
    return {"stream": {"position": self._stream.position - 1, "skipped": self._stream.skipped},
            "pending_offset": self._pending[1]}

  def set_state(self, state) -> None:
    self._stream.set_state(state["stream"])
    self._pending = None
    if int(state["pending_offset"]) >= 0:
      self._pending = (self._stream.next(), int(state["pending_offset"]))


class PairPadder:
  """One pair per row, padded; a pair longer than seq_len is a clear error."""

  def __init__(self, stream: ExampleStream, seq_len: int, source: str,
               layout: vocab_lib.VocabLayout):
    self._stream, self._seq_len, self._source, self._layout = stream, seq_len, source, layout
    self._modality = SOURCE_MODALITY[source]

  def fill(self, out: np.ndarray, rows: np.ndarray) -> None:
    layout, seq_len, n = self._layout, self._seq_len, len(rows)
    items = [self._stream.next() for _ in range(n)]
    cond_len = np.fromiter((len(c) for c, _ in items), np.int64, n)
    target_len = np.fromiter((len(t) for _, t in items), np.int64, n)
    size = cond_len + target_len + 4
    if size.max() > seq_len:
      raise DataConfigError(
          f"a {self._source} pair has {size.max()} tokens > data.seq_len={seq_len}; raise "
          f"data.seq_len or rerun prepare with --max_pair_tokens={seq_len}")
    begin_at = 1 + cond_len   # column of <boX>
    begin, end = _target_brackets(self._modality, layout)
    tokens = np.full((n, seq_len), layout.pad, np.int32)
    tokens[:, 0] = layout.bos
    index = np.arange(n)
    tokens[np.repeat(index, cond_len), 1 + _ragged_arange(cond_len)] = np.concatenate(
        [c for c, _ in items])
    tokens[index, begin_at] = begin
    tokens[np.repeat(index, target_len),
           np.repeat(begin_at + 1, target_len) + _ragged_arange(target_len)] = np.concatenate(
        [t for _, t in items])
    tokens[index, begin_at + 1 + target_len] = end
    tokens[index, begin_at + 2 + target_len] = layout.eos
    column = np.arange(seq_len)[None, :]
    live = column < size[:, None]
    block = np.empty((len(FIELDS), n, seq_len), np.int32)
    block[_TOKENS] = tokens
    block[_SEGMENTS] = live
    block[_POSITIONS] = np.where(live, column, 0)
    block[_MODALITY] = ((column > begin_at[:, None]) &
                        (column <= (begin_at + target_len)[:, None])) * self._modality
    block[_LOSS] = live
    block[_COND] = column < begin_at[:, None]
    out[:, rows] = block

  def get_state(self) -> dict:
    return {"stream": self._stream.get_state()}

  def set_state(self, state) -> None:
    self._stream.set_state(state["stream"])


class RowPacker:
  """data.pack_pairs: rows of whole pairs and text documents, each its own segment.

  data.mixture weights are shares of the real tokens per modality here, counted as
  token_fraction/<modality> counts them (a pair's caption or transcript and its bracket tokens
  are text; its image or audio tokens are its target modality). Each source keeps one example
  waiting; the next segment is the waiting example of the source whose modality is furthest
  below its share of the tokens placed so far or, when that example does not fit the room left,
  of the next source still below its share; when none fits, the rest of the row is padded. A
  pair is never split; a text document is split at the row end as in TextPacker. At most
  max_segments segments a row. With one source (data.exact_mix), a row holds that source only.
  """

  def __init__(self, streams: dict[str, ExampleStream], weights: dict[str, float],
               seq_len: int, max_segments: int, layout: vocab_lib.VocabLayout):
    self._names = list(streams)
    self._streams = [streams[n] for n in self._names]
    total = sum(weights[n] for n in self._names)
    # Python scalars: the packing loop runs once per segment.
    self._shares = [weights[n] / total for n in self._names]
    self._modality = [SOURCE_MODALITY[n] for n in self._names]
    self._seq_len, self._max_segments, self._layout = seq_len, max_segments, layout
    self._text = [n == "text" for n in self._names]
    self._placed = [0] * len(vocab_lib.MODALITIES)   # real tokens per modality
    # Per source: ((tokens, cond length, target length), offset of its first unplaced token).
    self._waiting: list = [None] * len(self._names)

  def _example(self, source: int) -> tuple:
    """(unified tokens, 1 + caption length, target length) of `source`'s next example."""
    item = self._streams[source].next()
    if self._text[source]:
      return item, 0, 0
    cond, target = item
    begin, end = _target_brackets(self._modality[source], self._layout)
    tokens = np.concatenate([[self._layout.bos], cond, [begin], target,
                             [end, self._layout.eos]]).astype(np.int32)
    if len(tokens) > self._seq_len:
      raise DataConfigError(
          f"a {self._names[source]} pair has {len(tokens)} tokens > data.seq_len="
          f"{self._seq_len}; raise data.seq_len or rerun prepare with "
          f"--max_pair_tokens={self._seq_len}")
    return tokens, 1 + len(cond), len(target)

  def _pick(self, room: int, filled: int) -> int | None:
    """The source of the next segment, with its example waiting; None: pad the row."""
    placed, total = self._placed, sum(self._placed)
    order = sorted(range(len(self._names)),
                   key=lambda s: placed[self._modality[s]] / self._shares[s])
    for rank, s in enumerate(order):
      if rank and placed[self._modality[s]] > self._shares[s] * total:
        return None   # this source and the rest are above their share
      if self._waiting[s] is None:
        self._waiting[s] = (self._example(s), 0)
      (tokens, _, _), offset = self._waiting[s]
      if len(tokens) - offset <= room or (
          self._text[s] and (not filled or room >= MIN_SPLIT_TOKENS)):
        return s
    return None

  def fill(self, out: np.ndarray, rows: np.ndarray) -> None:
    seq_len = self._seq_len
    examples = {}   # id -> (tokens, modality, cond length, target length)
    pieces = []     # (example id, offset, count, row index, column, segment)
    for r in range(len(rows)):
      filled = segments = 0
      while filled < seq_len and segments < self._max_segments:
        s = self._pick(seq_len - filled, filled)
        if s is None:
          break
        (tokens, cond_len, target_len), offset = self._waiting[s]
        examples.setdefault(id(tokens), (tokens, self._modality[s], cond_len, target_len))
        count = min(len(tokens) - offset, seq_len - filled)
        segments += 1
        pieces.append((id(tokens), offset, count, r, filled, segments))
        if target_len:   # a whole pair
          self._placed[vocab_lib.TEXT] += len(tokens) - target_len
          self._placed[self._modality[s]] += target_len
        else:
          self._placed[vocab_lib.TEXT] += count
        filled += count
        self._waiting[s] = (None if offset + count == len(tokens) else
                            ((tokens, cond_len, target_len), offset + count))
    if not pieces:
      return
    slots = {key: k for k, key in enumerate(examples)}
    table = list(examples.values())
    key, offset, count, row, column, segment = np.array(pieces, np.int64).T
    slot = np.array([slots[k] for k in key.tolist()], np.int64)
    sizes = np.fromiter((len(e[0]) for e in table), np.int64, len(table))
    modality = np.array([e[1] for e in table], np.int64)
    cond_len = np.array([e[2] for e in table], np.int64)
    target_len = np.array([e[3] for e in table], np.int64)
    flat = np.concatenate([e[0] for e in table])
    within = _ragged_arange(count)
    ex = np.repeat(slot, count)
    at = np.repeat(offset, count) + within        # position inside the example
    dst = np.repeat(rows[row] * seq_len + column, count) + within
    flat_out = out.reshape(len(FIELDS), -1)
    flat_out[_TOKENS, dst] = flat[(np.cumsum(sizes) - sizes)[ex] + at]
    flat_out[_SEGMENTS, dst] = np.repeat(segment, count)
    flat_out[_POSITIONS, dst] = within
    # A pair is <bos> cond <boX> target <eoX> <eos>: its target at cond_len + 1 .. + target_len.
    is_target = (at > cond_len[ex]) & (at <= cond_len[ex] + target_len[ex])
    flat_out[_MODALITY, dst] = np.where(is_target, modality[ex], 0)
    flat_out[_LOSS, dst] = 1
    flat_out[_COND, dst] = at < cond_len[ex]

  def get_state(self) -> dict:
    # A waiting example is the last one its stream read: resume by reading it again.
    streams = {}
    for name, stream, item in zip(self._names, self._streams, self._waiting):
      state = stream.get_state()
      if item is not None:
        state = {"position": state["position"] - 1, "skipped": state["skipped"]}
      streams[name] = state
    return {"streams": streams, "placed": [int(x) for x in self._placed],
            "waiting_offsets": [-1 if w is None else int(w[1]) for w in self._waiting]}

  def set_state(self, state) -> None:
    for name, stream in zip(self._names, self._streams):
      stream.set_state(state["streams"][name])
    self._placed = [int(x) for x in state["placed"]]
    self._waiting = [None if int(offset) < 0 else (self._example(s), int(offset))
                     for s, offset in enumerate(state["waiting_offsets"])]


# ----------------------------------------------------------------------------------------
# Mixture: which source each row comes from.

def exact_counts(weights: dict[str, float], batch_size: int) -> dict[str, int]:
  """Rows per source in every batch: largest-remainder apportionment of batch_size."""
  total = sum(weights.values())
  quotas = {k: w / total * batch_size for k, w in weights.items()}
  counts = {k: int(np.floor(q)) for k, q in quotas.items()}
  by_remainder = sorted(weights, key=lambda k: (-(quotas[k] - counts[k]), list(weights).index(k)))
  for k in by_remainder[:batch_size - sum(counts.values())]:
    counts[k] += 1
  return counts


def mixture_sources(first_row: int, n: int, weights) -> np.ndarray:
  """Source index (into `weights`) of rows first_row .. first_row + n - 1: row g takes the
  source whose share of [0, 1) holds frac((g + 1/2) * GOLDEN)."""
  weights = np.asarray(weights, np.float64)
  edges = np.cumsum(weights) / weights.sum()
  u = np.mod((np.arange(first_row, first_row + n, dtype=np.float64) + 0.5) * GOLDEN, 1.0)
  return np.minimum(np.searchsorted(edges, u, side="right"), len(weights) - 1)


# ----------------------------------------------------------------------------------------
# Blocks of K batches.

def batches_per_block(batch_size: int, seq_len: int) -> int:
  k = min(BLOCK_TOKENS // (batch_size * seq_len), BLOCK_ROWS // batch_size)
  return int(np.clip(k, 1, MAX_BLOCK_BATCHES))


class _BlockIterator(grain_dataset.DatasetIterator):

  def __init__(self, spec: "BlockDataset"):
    super().__init__()
    self._spec = spec
    streams = {name: ExampleStream(source["records"], name, spec.layout, spec.policy,
                                   source["image_tokens"], offset=spec.offset,
                                   stride=spec.stride, shuffle_seed=source["shuffle_seed"])
               for name, source in spec.sources.items()}
    self._mixed = spec.pack_pairs and spec.exact_counts is None
    if self._mixed:   # one packer draws every row's examples from all sources
      self._builders = {"mixed": RowPacker(streams, spec.weights, spec.seq_len,
                                           spec.max_segments, spec.layout)}
    elif spec.pack_pairs:   # data.exact_mix: each row holds one source's examples
      self._builders = {name: (TextPacker(stream, spec.seq_len, spec.max_segments)
                               if name == "text" else
                               RowPacker({name: stream}, {name: 1.0}, spec.seq_len,
                                         spec.max_segments, spec.layout))
                        for name, stream in streams.items()}
    else:
      self._builders = {name: (TextPacker(stream, spec.seq_len, spec.max_segments)
                               if name == "text" else
                               PairPadder(stream, spec.seq_len, name, spec.layout))
                        for name, stream in streams.items()}
    self._row = 0   # rows made so far

  def _row_sources(self, n: int) -> np.ndarray:
    """Index (into the builders) of the builder of each of the next n rows."""
    spec = self._spec
    if self._mixed:
      return np.zeros(n, np.int64)
    if spec.exact_counts is None:
      return mixture_sources(self._row, n, list(spec.weights.values()))
    per_batch = np.repeat(np.arange(len(spec.weights)),
                          [spec.exact_counts[k] for k in spec.weights])
    return np.tile(per_batch, n // spec.batch_size)

  def __next__(self):
    spec = self._spec
    k, b, seq_len = spec.batches, spec.batch_size, spec.seq_len
    sources = self._row_sources(k * b)
    out = np.zeros((len(FIELDS), k * b, seq_len), np.int32)
    out[_TOKENS] = spec.layout.pad
    for index, builder in enumerate(self._builders.values()):
      rows = np.flatnonzero(sources == index)
      if rows.size:
        builder.fill(out, rows)
    self._row += k * b
    fields = out.reshape(len(FIELDS), k, b, seq_len)
    live = fields[_SEGMENTS] > 0
    tokens = np.stack([((fields[_MODALITY] == m) & live).sum(axis=(1, 2))
                       for m in range(len(vocab_lib.MODALITIES))], axis=1)
    if self._mixed:   # a mixed row counts as its richest modality's source
      richest = fields[_MODALITY].max(axis=2)
      rows = np.stack([(richest == m).sum(axis=1) for m in range(len(SOURCES))], axis=1)
    else:
      by_batch = sources.reshape(k, b)
      names = list(self._builders)
      rows = np.stack([(by_batch == names.index(s)).sum(axis=1) if s in names
                       else np.zeros(k, np.int64) for s in SOURCES], axis=1)
    return {"fields": fields, "tokens": tokens.astype(np.int64), "rows": rows.astype(np.int64)}

  def get_state(self):
    return {"row": self._row, "pack_pairs": bool(self._spec.pack_pairs),
            "sources": {name: b.get_state() for name, b in self._builders.items()}}

  def set_state(self, state):
    if bool(state.get("pack_pairs", False)) != bool(self._spec.pack_pairs):
      raise DataConfigError(
          f"data iterator state written with data.pack_pairs={state.get('pack_pairs', False)}, "
          f"this pipeline has data.pack_pairs={self._spec.pack_pairs}; resume with the same "
          "setting, or restore parameters only")
    self._row = int(state["row"])
    for name, builder in self._builders.items():
      builder.set_state(state["sources"][name])


class BlockDataset(grain.IterDataset):
  """Blocks of `batches` batches: {"fields": int32 [len(FIELDS), K, B, L], "tokens": [K, 3]
  non-pad tokens per modality, "rows": [K, 3] rows per source}.

  Slicing (Grain's worker processes) gives each worker every step-th record of each source.
  """

  def __init__(self, *, sources: dict[str, dict], weights: dict[str, float],
               exact_counts: dict[str, int] | None, layout: vocab_lib.VocabLayout, policy: str,
               seq_len: int, max_segments: int, batch_size: int, batches: int, offset: int,
               stride: int, pack_pairs: bool = False):
    super().__init__([])
    self.pack_pairs = pack_pairs
    self.sources, self.weights, self.exact_counts = sources, weights, exact_counts
    self.layout, self.policy = layout, policy
    self.seq_len, self.max_segments = seq_len, max_segments
    self.batch_size, self.batches, self.offset, self.stride = batch_size, batches, offset, stride

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    start, stop, step = sl.start or 0, sl.stop, sl.step or 1
    if sequential_slice or stop is not None:
      raise ValueError(f"BlockDataset supports strided slices only, got {sl} "
                       f"(sequential={sequential_slice})")
    self.offset, self.stride = self.offset + start * self.stride, self.stride * step

  def __iter__(self):
    return _BlockIterator(self)

  def __str__(self):
    return (f"BlockDataset(sources={list(self.sources)}, batches={self.batches}, "
            f"offset={self.offset}, stride={self.stride})")


# ----------------------------------------------------------------------------------------
# Batches, and the realised composition.

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


class _BatchIterator(grain_dataset.DatasetIterator):
  """Hands out the batches of each block; state = the block's start + batches taken."""

  def __init__(self, parent, log_every: int):
    super().__init__(parent)
    self._log_every = log_every
    self._block = None
    self._block_state = None   # parent state before self._block
    self._taken = 0            # batches of self._block handed out
    self._tokens = np.zeros(3, np.int64)
    self._rows = np.zeros(3, np.int64)
    self._positions = 0        # positions handed out (real tokens: self._tokens.sum())
    self._batches = 0

  def __next__(self):
    if self._block is None or self._taken == len(self._block["tokens"]):
      self._block_state = self._parent.get_state()
      self._block, self._taken = next(self._parent), 0
    k, block = self._taken, self._block
    fields = block["fields"]
    batch = {name: fields[i, k] for i, name in enumerate(FIELDS)}
    self._tokens += block["tokens"][k]
    self._rows += block["rows"][k]
    self._positions += fields[_TOKENS, k].size
    self._taken += 1
    self._batches += 1
    if self._log_every and self._batches % self._log_every == 0:
      logging.info("data: %d batches, realised token fractions %s, rows per source %s, "
                   "real tokens %.1f%% of positions", self._batches, self.token_fractions(),
                   self.row_counts(), 100 * self.real_fraction())
    return batch

  def token_fractions(self) -> dict[str, float]:
    """Realised fraction of non-pad tokens per modality since the start of training."""
    return token_fractions(self._tokens)

  def real_fraction(self) -> float:
    """Fraction of the positions handed out that hold real tokens (not padding)."""
    return float(self._tokens.sum() / max(self._positions, 1))

  def row_counts(self) -> dict[str, int]:
    return {name: int(c) for name, c in zip(SOURCES, self._rows)}

  def skipped_records(self) -> int:
    """Bad records skipped so far (data.on_bad_record='skip'), summed over sources; counts
    the whole block being handed out."""
    def total(state):
      if isinstance(state, dict):
        return int(state.get("skipped", 0)) + sum(total(v) for k, v in state.items()
                                                   if k != "skipped")
      if isinstance(state, (list, tuple)):
        return sum(total(v) for v in state)
      return 0
    return total(self._parent.get_state())

  def stats(self) -> dict[str, Any]:
    return {"batches": self._batches, "token_fractions": self.token_fractions(),
            "real_fraction": self.real_fraction(),
            "tokens": {m: int(c) for m, c in zip(vocab_lib.MODALITIES, self._tokens)},
            "rows": self.row_counts(), "skipped_records": self.skipped_records()}

  def get_state(self):
    mid_block = self._block is not None and self._taken < len(self._block["tokens"])
    return {"format": STATE_FORMAT,
            "parent": self._block_state if mid_block else self._parent.get_state(),
            "taken": self._taken if mid_block else 0, "batches": self._batches,
            "tokens": [int(x) for x in self._tokens], "rows": [int(x) for x in self._rows],
            "positions": int(self._positions)}

  def set_state(self, state):
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
      raise DataConfigError(
          f"data iterator state of another pipeline version (format "
          f"{state.get('format') if isinstance(state, dict) else None!r}, this one reads "
          f"{STATE_FORMAT}); restore parameters only, or resume with the version that wrote it")
    self._parent.set_state(state["parent"])
    self._block, self._block_state, self._taken = None, None, 0
    if int(state["taken"]):
      self._block_state = state["parent"]
      self._block, self._taken = next(self._parent), int(state["taken"])
    self._batches = int(state["batches"])
    self._tokens = np.asarray(state["tokens"], np.int64)
    self._rows = np.asarray(state["rows"], np.int64)
    self._positions = int(state.get("positions", 0))


class BatchDataset(grain.IterDataset):
  """Batches of a block dataset; its iterator exposes token_fractions() / stats()."""

  def __init__(self, parent: grain.IterDataset, log_every: int = 0):
    super().__init__(parent)
    self._log_every = log_every

  def __iter__(self):
    return _BatchIterator(self._parent.__iter__(), self._log_every)


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


def _record_sources(config, split: str, layout: vocab_lib.VocabLayout,
                    sources) -> tuple[dict[str, Any], int | None]:
  """Per source its records (ShardReader or SyntheticRecords); the image token count."""
  if config.data.source == "synthetic":
    from tmdiff.data import synthetic
    return {s: synthetic.SyntheticRecords(config, split, s, layout) for s in sources}, None
  if config.data.source != "prepared":
    raise DataConfigError(f"data.source must be 'synthetic' or 'prepared', got "
                          f"{config.data.source!r}")
  data_dir = config.data.data_dir
  if not data_dir:
    raise DataConfigError("data.source='prepared' needs data.data_dir (a prepare --out dir)")
  manifest = records_lib.Manifest.load(data_dir)
  check_manifest_vocab(manifest, config, data_dir)
  out = {}
  for s in sources:
    paths = manifest.shard_paths(data_dir, s, split)
    out[s] = records_lib.ShardReader(paths, manifest.records_per_shard[s][split])
  return out, manifest.extra.get("image_tokens")


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
  policy = data.on_bad_record
  if policy not in BAD_RECORD_POLICIES:
    raise DataConfigError(f"data.on_bad_record must be one of {BAD_RECORD_POLICIES}, "
                          f"got {policy!r}")
  workers = int(data.worker_count)
  if workers < 0:
    raise DataConfigError(f"data.worker_count must be >= 0, got {workers}")
  layout = vocab_lib.VocabLayout.from_config(config.vocab)
  weights = mixture_weights(config)
  batch_size = local_batch_size(config, process_count)
  records, image_tokens = _record_sources(config, split, layout, list(weights))
  readers = process_count * max(workers, 1)
  sources = {}
  for k, (name, recs) in enumerate(records.items()):
    if len(recs) < readers:
      raise DataConfigError(f"{name}/{split} has {len(recs)} records, fewer than the "
                            f"{readers} readers (process_count={process_count} x "
                            f"data.worker_count={workers})")
    sources[name] = {"records": recs, "image_tokens": image_tokens,
                     "shuffle_seed": (derived.seed_for(config, "data") * 7919 + k + 1
                                      if split == "train" else None)}
  counts = exact_counts(weights, batch_size) if data.exact_mix else None
  if counts is not None:   # a source with no row in the batch is left out
    sources = {k: v for k, v in sources.items() if counts[k]}
    weights = {k: w for k, w in weights.items() if counts[k]}
  blocks = BlockDataset(sources=sources, weights=weights, exact_counts=counts, layout=layout,
                        policy=policy, seq_len=seq_len, max_segments=max_segments,
                        batch_size=batch_size, batches=batches_per_block(batch_size, seq_len),
                        offset=process_index, stride=process_count,
                        pack_pairs=bool(data.pack_pairs))
  if workers > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain workers read absl flags; outside absl.app, use defaults
      flags.FLAGS.mark_as_parsed()
    blocks = blocks.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return BatchDataset(blocks, log_every=int(data.log_fractions_every))
