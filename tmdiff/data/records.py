"""Record schema and ArrayRecord I/O for prepared (tokenized) data.

A prepared dataset directory holds:

  manifest.json                                  see `Manifest` below; every path in it is
                                                 relative to the directory, so it can move
  tokenizers/{text,image,audio}/                 the tokenizers its ids come from
  <source>/<split>-<i:05d>-of-<n:05d>.array_record
  <source>/<split>-<i:05d>-of-<n:05d>.json       sidecar: records and tokens in that shard

Sources and the int32 arrays each record holds (all ids are *local* to their tokenizer,
i.e. in [0, vocab_size); the pipeline maps them into the unified vocabulary):

  text        text        text ids of one document
  image_text  caption     text ids of the caption
              image       image-tokenizer ids of the image (row-major codes)
  audio_text  transcript  text ids of the transcript
              audio       audio-tokenizer ids of the utterance

Each record also carries a JSON `meta` dict (e.g. document id; image attributes; voice).

Record bytes (schema version 1):
  b"TMR1" | u32 header_len | header (JSON utf-8) | array bytes | u32 crc32(everything before)
The header is {"fields": [[name, dtype, length], ...], "meta": {...}}; arrays follow in
that order, little-endian. The CRC turns silent corruption into a clear error.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import struct
import zlib
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
MAGIC = b"TMR1"
SOURCES = ("text", "image_text", "audio_text")
SPLITS = ("train", "validation")
# Fields of each source: (name, modality of its ids).
SOURCE_FIELDS = {
    "text": (("text", "text"),),
    "image_text": (("caption", "text"), ("image", "image")),
    "audio_text": (("transcript", "text"), ("audio", "audio")),
}
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"   # what a saved tokenizer directory holds (tmdiff.data.tokenizers)
# ArrayRecordReader options for random access: no read-ahead past the record; one thread
# (parallelism comes from Grain worker processes, data.worker_count).
READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:1"


class RecordError(ValueError):
  """A record or shard that cannot be read or does not match the schema."""


def encode_record(arrays: dict[str, np.ndarray], meta: dict[str, Any] | None = None) -> bytes:
  fields, payload = [], []
  for name, arr in arrays.items():
    arr = np.ascontiguousarray(arr)
    if arr.ndim != 1:
      raise ValueError(f"record field {name!r} must be 1-D, got shape {arr.shape}")
    arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    fields.append([name, arr.dtype.str, int(arr.shape[0])])
    payload.append(arr.tobytes())
  header = json.dumps({"fields": fields, "meta": meta or {}}, separators=(",", ":")).encode()
  body = MAGIC + struct.pack("<I", len(header)) + header + b"".join(payload)
  return body + struct.pack("<I", zlib.crc32(body))


def decode_record(data: bytes, where: str = "record", *, copy: bool = True,
                  meta: bool = True) -> tuple[dict[str, np.ndarray], dict]:
  """Parses bytes written by `encode_record`; `where` names the file and record in errors.

  copy=False returns read-only arrays over `data` (no copy on little-endian hosts);
  meta=False skips parsing the meta dict (returned empty), most of a header's parse time.
  """
  if len(data) < 12 or data[:4] != MAGIC:
    raise RecordError(f"{where}: not a tmdiff record (bad magic or too short: {len(data)} bytes)")
  end = len(data) - 4
  if zlib.crc32(memoryview(data)[:end]) != struct.unpack_from("<I", data, end)[0]:
    raise RecordError(f"{where}: checksum mismatch (corrupt or truncated record)")
  (header_len,) = struct.unpack_from("<I", data, 4)
  try:
    text = data[8:8 + header_len].decode()
    if not meta and text.startswith(_FIELDS_PREFIX):  # parse the fields list alone
      header = {"fields": _JSON.raw_decode(text, len(_FIELDS_PREFIX))[0], "meta": {}}
    else:
      header = json.loads(text)
  except ValueError as e:
    raise RecordError(f"{where}: unreadable header ({e})") from None
  offset, arrays = 8 + header_len, {}
  for name, dtype, length in header["fields"]:
    dt = _dtype(dtype)
    nbytes = dt.itemsize * length
    if offset + nbytes > end:
      raise RecordError(f"{where}: field {name!r} runs past the end of the record")
    array = np.frombuffer(data, dt, length, offset)
    arrays[name] = array.astype(dt.newbyteorder("=")) if copy or not dt.isnative else array
    offset += nbytes
  if offset != end:
    raise RecordError(f"{where}: {end - offset} trailing bytes after the last field")
  return arrays, header["meta"]


_FIELDS_PREFIX = '{"fields":'
_JSON = json.JSONDecoder()


@functools.lru_cache(maxsize=64)
def _dtype(name: str) -> np.dtype:
  return np.dtype(name)


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.array_record"


def write_shard(path: str, records: list[bytes], info: dict[str, Any]) -> None:
  """Writes a shard atomically (tmp + rename) with its sidecar, so resuming can trust it."""
  from array_record.python import array_record_module
  tmp = path + ".tmp"
  writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
  for r in records:
    writer.write(r)
  writer.close()
  with open(path[:-len(".array_record")] + ".json", "w") as f:
    json.dump(dict(info, records=len(records)), f)
  os.replace(tmp, path)


def shard_complete(path: str) -> dict | None:
  """The sidecar of a finished shard, or None when the shard must be (re)written."""
  sidecar = path[:-len(".array_record")] + ".json"
  if not (os.path.exists(path) and os.path.exists(sidecar)):
    return None
  with open(sidecar) as f:
    return json.load(f)


class ShardReader:
  """Random access to the records of one or more shards of a source, with clear errors.

  Implements the grain RandomAccessDataSource protocol (__len__, __getitem__), returning
  (arrays, meta) tuples. Readers open lazily, so it pickles for worker processes.
  """

  def __init__(self, paths: list[str], expected_counts: list[int] | None = None,
               options: str | None = None):
    self._paths = list(paths)
    self._options = READER_OPTIONS if options is None else options
    self._readers: list[Any] = [None] * len(self._paths)
    counts = []
    for i, path in enumerate(self._paths):
      if not os.path.exists(path):
        raise RecordError(f"missing shard {path} (listed in the manifest; rerun prepare)")
      n = self._reader(i).num_records()
      if expected_counts is not None and n != expected_counts[i]:
        raise RecordError(f"{path}: holds {n} records, manifest says {expected_counts[i]} "
                          "(truncated or replaced shard; rerun prepare)")
      counts.append(n)
    self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

  def _reader(self, i: int):
    if self._readers[i] is None:
      from array_record.python import array_record_module
      try:
        self._readers[i] = array_record_module.ArrayRecordReader(self._paths[i], self._options)
      except Exception as e:  # array_record raises plain RuntimeError/ValueError
        raise RecordError(f"{self._paths[i]}: cannot open shard ({e})") from None
    return self._readers[i]

  def __getstate__(self):
    return dict(self.__dict__, _readers=[None] * len(self._paths))

  def __len__(self) -> int:
    return int(self._starts[-1])

  def locate(self, index: int) -> tuple[str, int]:
    shard = int(np.searchsorted(self._starts, index, side="right")) - 1
    return self._paths[shard], int(index - self._starts[shard])

  def where(self, index: int) -> str:
    """'<shard path> record <i>': how errors name record `index`."""
    path, local = self.locate(int(index) % len(self))
    return f"{path} record {local}"

  def __getitem__(self, index: int):
    index = int(index) % len(self)
    shard = int(np.searchsorted(self._starts, index, side="right")) - 1
    local = int(index - self._starts[shard])
    where = f"{self._paths[shard]} record {local}"
    try:
      data = self._reader(shard).read([local])[0]
    except Exception as e:
      raise RecordError(f"{where}: unreadable ({e})") from None
    arrays, meta = decode_record(data, where)
    return arrays, dict(meta, _where=where)

  def read_many(self, indices) -> list:
    """Arrays of records `indices` in order, one ArrayRecord read per shard touched.

    A record that cannot be read or decoded comes back as a RecordError naming its file and
    record (returned, not raised: the caller's bad-record policy decides).
    """
    indices = np.asarray(indices, np.int64) % len(self)
    shards = np.searchsorted(self._starts, indices, side="right") - 1
    locals_ = indices - self._starts[shards]
    out: list = [None] * len(indices)
    for shard in np.unique(shards):
      slots = np.nonzero(shards == shard)[0]
      wanted = locals_[slots].tolist()
      try:
        blobs = self._reader(int(shard)).read(wanted)
      except Exception:  # find the unreadable record(s) one by one
        blobs = []
        for local in wanted:
          try:
            blobs.append(self._reader(int(shard)).read([local])[0])
          except Exception as e:
            blobs.append(RecordError(f"{self._paths[shard]} record {local}: unreadable ({e})"))
      for slot, local, blob in zip(slots.tolist(), wanted, blobs):
        if isinstance(blob, RecordError):
          out[slot] = blob
          continue
        try:
          out[slot] = decode_record(blob, f"{self._paths[shard]} record {local}", copy=False,
                                    meta=False)[0]
        except RecordError as e:
          out[slot] = e
    return out


@dataclasses.dataclass
class Manifest:
  """Contents of manifest.json (written by prepare, checked by the pipeline)."""
  schema_version: int
  vocab: dict[str, int]                       # text_size / image_size / audio_size
  tokenizers: dict[str, str]                  # modality -> tokenizer dir, relative to the data dir
  shards: dict[str, dict[str, list[str]]]     # source -> split -> shard file names
  counts: dict[str, dict[str, int]]           # source -> split -> records
  tokens: dict[str, dict[str, dict[str, int]]]  # source -> split -> field -> local tokens
  records_per_shard: dict[str, dict[str, list[int]]]
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  def save(self, directory: str) -> None:
    tmp = os.path.join(directory, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
      json.dump(dataclasses.asdict(self), f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(directory, MANIFEST))

  @classmethod
  def load(cls, directory: str) -> "Manifest":
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
      raise RecordError(f"no {MANIFEST} in {directory!r}: run `python -m tmdiff.data.prepare "
                        f"--out={directory}` first, or set data.source='synthetic'")
    with open(path) as f:
      raw = json.load(f)
    if raw.get("schema_version") != SCHEMA_VERSION:
      raise RecordError(f"{path}: schema_version {raw.get('schema_version')} != supported "
                        f"{SCHEMA_VERSION}; rerun prepare")
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in known})

  def tokenizer_dir(self, directory: str, modality: str) -> str | None:
    """The `modality` tokenizer's directory for the data dir `directory`; None when the
    manifest lists none (or one prepare held in memory only).

    Entries are relative to the data dir, so a prepared dir can be moved or copied. An
    absolute entry (older manifests) is used where it exists; else the same place inside the
    data dir (the shortest tail of the entry, e.g. tokenizers/text, that holds a tokenizer)."""
    entry = self.tokenizers.get(modality)
    if not entry or entry.startswith("<in-memory"):
      return None
    if not os.path.isabs(entry):
      path = os.path.join(directory, entry)
      if os.path.isdir(path):
        return path
      raise RecordError(f"{os.path.join(directory, MANIFEST)} lists the {modality} tokenizer at "
                        f"{entry!r}, but {path} does not exist; copy the whole prepared "
                        "directory, or rerun prepare")
    if os.path.isdir(entry):
      return entry
    parts = [p for p in entry.replace("\\", "/").split("/") if p]
    for k in range(1, len(parts) + 1):
      candidate = os.path.join(directory, *parts[-k:])
      if os.path.isfile(os.path.join(candidate, TOKENIZER_FILE)):
        return candidate
    raise RecordError(f"{os.path.join(directory, MANIFEST)} lists the {modality} tokenizer at "
                      f"{entry!r}, which does not exist, and no tail of that path under {directory} "
                      f"holds a {TOKENIZER_FILE} (expected "
                      f"{os.path.join(directory, 'tokenizers', modality)}); copy the tokenizer "
                      "there, or rerun prepare")

  def shard_paths(self, directory: str, source: str, split: str) -> list[str]:
    try:
      names = self.shards[source][split]
    except KeyError:
      raise RecordError(f"{os.path.join(directory, MANIFEST)} lists no {source!r} shards for "
                        f"split {split!r}") from None
    return [os.path.join(directory, source, n) for n in names]


VOCAB_KEYS = ("text_size", "image_size", "audio_size")


def vocab_sizes(directory: str) -> dict[str, int] | None:
  """{text_size, image_size, audio_size} from the manifest of a prepared directory; None where
  it holds no manifest yet (a config built before `prepare` has run)."""
  if not os.path.exists(os.path.join(directory, MANIFEST)):
    return None
  vocab = Manifest.load(directory).vocab
  return {k: int(vocab[k]) for k in VOCAB_KEYS}
