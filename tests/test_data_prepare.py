"""Prepare step + pipeline over prepared shards, with tiny fake tokenizers; bad inputs."""
import argparse
import json
import os

import numpy as np
import pytest

from tmdiff.configs.base import get_base_config
from tmdiff.data import pipeline, prepare, records, sources
from tmdiff.data import vocab as vocab_lib
from tmdiff.data.tokenizers import base

IMAGE_SIZE = 16


class FakeText(base.Tokenizer):
  """Bytes, folded into 200 ids."""
  modality = vocab_lib.TEXT
  vocab_size = 200

  def encode(self, x):
    return np.frombuffer(x.encode(), np.uint8).astype(np.int32) % 200

  def encode_batch(self, xs):
    return [self.encode(x) for x in xs]

  def decode(self, ids):
    return bytes(np.asarray(ids, np.uint8)).decode(errors="replace")

  def save(self, directory):
    pass

  @classmethod
  def load(cls, directory):
    return cls()


class FakeImage(FakeText):
  """Mean brightness of 4x4 patches, 64 levels."""
  modality = vocab_lib.IMAGE
  vocab_size = 64
  tokens_per_image = (IMAGE_SIZE // 4) ** 2

  def encode(self, x):
    x = np.asarray(x, np.float32).mean(-1)
    patches = x.reshape(IMAGE_SIZE // 4, 4, IMAGE_SIZE // 4, 4).mean((1, 3))
    return np.minimum(patches.reshape(-1) / 4, 63).astype(np.int32)

  def encode_batch(self, xs):
    return [self.encode(x) for x in xs]


class FakeAudio(FakeText):
  """RMS of 40 ms frames, 32 levels."""
  modality = vocab_lib.AUDIO
  vocab_size = 32

  def encode(self, x):
    frames = np.asarray(x)[:len(x) // 640 * 640].reshape(-1, 640)
    return np.minimum(np.sqrt((frames ** 2).mean(1)) * 200, 31).astype(np.int32)


FAKES = {"text": FakeText(), "image": FakeImage(), "audio": FakeAudio()}


def _args(out, **kw):
  argv = [f"--out={out}", "--num_images=40", "--num_val_images=8", "--num_utterances=12",
          "--num_val_utterances=4", f"--image_size={IMAGE_SIZE}", "--shard_records=16",
          "--max_text_docs=60", "--max_seconds=2.0", "--max_pair_tokens=256"]
  return prepare.parse_args(argv + [f"--{k}={v}" for k, v in kw.items()])


def _config(data_dir, **data):
  c = get_base_config()
  c.vocab.text_size, c.vocab.image_size, c.vocab.audio_size = 200, 64, 32
  c.data.source, c.data.data_dir, c.data.seq_len, c.data.global_batch = "prepared", str(data_dir), 256, 6
  for k, v in data.items():
    c.data[k] = v
  return c


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  out = tmp_path_factory.mktemp("prepared")
  srcs = "text,image_text,audio_text" if sources.espeak_available() else "text,image_text"
  manifest = prepare.prepare(_args(out, sources=srcs), tokenizers=FAKES)
  return out, manifest


def test_manifest_and_shards(prepared):
  out, manifest = prepared
  with open(os.path.join(out, "manifest.json")) as f:
    raw = json.load(f)
  assert raw["schema_version"] == records.SCHEMA_VERSION
  assert raw["vocab"]["text_size"] == 200 and raw["vocab"]["image_size"] == 64
  assert manifest.counts["image_text"] == {"train": 40, "validation": 8}
  assert len(manifest.shards["image_text"]["train"]) == 3   # 40 records, 16 per shard
  assert manifest.tokens["image_text"]["train"]["image"] == 40 * 16
  assert manifest.counts["text"]["train"] == 60
  reader = records.ShardReader(manifest.shard_paths(str(out), "image_text", "train"))
  arrays, meta = reader[0]
  assert set(arrays) == {"caption", "image"} and arrays["image"].dtype == np.int32
  assert meta["attributes"]["count"] >= 1 and meta["caption"].startswith(
      ("one", "two", "three"))


def test_pipeline_over_prepared_data(prepared):
  from test_data_pipeline import check_invariants
  out, manifest = prepared
  mixture_sources = manifest.shards.keys()
  c = _config(out)
  for s in pipeline.SOURCES:
    c.data.mixture[s] = 1.0 if s in mixture_sources else 0.0
  for split in ("train", "validation"):
    it = iter(pipeline.make_dataset(c, split))
    for _ in range(5):
      check_invariants(next(it), c)
  assert all(v > 0 for k, v in it.row_counts().items() if k in mixture_sources)


def test_prepare_resumes_and_skips_finished_shards(prepared, tmp_path):
  out = tmp_path / "resume"
  args = _args(out, sources="text,image_text")
  prepare.prepare(args, tokenizers=FAKES)
  shard = out / "image_text" / records.shard_name("train", 1, 3)
  first_mtime = shard.stat().st_mtime_ns
  os.remove(out / "image_text" / records.shard_name("train", 2, 3))   # "interrupted"
  manifest = prepare.prepare(args, tokenizers=FAKES)
  assert shard.stat().st_mtime_ns == first_mtime
  assert manifest.counts["image_text"]["train"] == 40
  with pytest.raises(prepare.PrepareError, match=r"other options \(\['seed'\]"):
    prepare.prepare(_args(out, sources="text,image_text", seed=3), tokenizers=FAKES)
  manifest = prepare.prepare(argparse.Namespace(**dict(vars(args), seed=3, overwrite=True)),
                             tokenizers=FAKES)
  assert manifest.extra["seed"] == 3 and shard.stat().st_mtime_ns != first_mtime


# --- Bad input -----------------------------------------------------------------------------

def _copy_prepared(src, dst):
  import shutil
  shutil.copytree(src, dst)
  return dst


def _first_shard(out, source, split):
  import pathlib
  return pathlib.Path(records.Manifest.load(str(out)).shard_paths(str(out), source, split)[0])


def _text_only(c):
  c.data.mixture.text, c.data.mixture.image_text, c.data.mixture.audio_text = 1.0, 0.0, 0.0
  return c


def test_missing_shard_is_named(prepared, tmp_path):
  out = _copy_prepared(prepared[0], tmp_path / "d")
  name = records.shard_name("train", 0, 3)
  os.remove(out / "image_text" / name)
  with pytest.raises(records.RecordError, match=f"missing shard .*{name}"):
    pipeline.make_dataset(_config(out), "train")


def test_truncated_shard_is_named(prepared, tmp_path):
  out = _copy_prepared(prepared[0], tmp_path / "d")
  path = out / "image_text" / records.shard_name("train", 1, 3)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(records.RecordError, match=str(path.name)):
    c = _config(out)
    c.data.mixture.text = c.data.mixture.audio_text = 0.0
    it = iter(pipeline.make_dataset(c, "train"))
    for _ in range(20):
      next(it)


def _rewrite_record(path, index, mutate):
  """Rewrites record `index` of shard `path` via mutate(arrays, meta) -> bytes."""
  reader = records.ShardReader([str(path)])
  recs = [reader._reader(0).read([i])[0] for i in range(len(reader))]
  arrays, meta = records.decode_record(recs[index])
  recs[index] = mutate(arrays, meta)
  os.remove(path)
  records.write_shard(str(path), recs, json.load(open(str(path)[:-13] + ".json")))


def test_corrupt_record_is_named_and_skippable(prepared, tmp_path):
  out = _copy_prepared(prepared[0], tmp_path / "d")
  path = _first_shard(out, "text", "validation")

  def flip_byte(arrays, meta):
    data = bytearray(records.encode_record(arrays, meta))
    data[-10] ^= 0xFF
    return bytes(data)

  _rewrite_record(path, 2, flip_byte)
  c = _text_only(_config(out))
  with pytest.raises(records.RecordError, match=f"{path.name} record 2: checksum mismatch"):
    it = iter(pipeline.make_dataset(c, "validation"))
    for _ in range(30):
      next(it)
  c.data.on_bad_record = "skip"
  it = iter(pipeline.make_dataset(c, "validation"))
  for _ in range(30):
    next(it)
  assert it.stats()["skipped_records"] >= 1


def test_text_id_out_of_range_is_named(prepared, tmp_path):
  out = _copy_prepared(prepared[0], tmp_path / "d")
  path = _first_shard(out, "text", "validation")

  def bad_id(arrays, meta):
    arrays["text"][3] = 10_000
    return records.encode_record(arrays, meta)

  _rewrite_record(path, 0, bad_id)
  with pytest.raises(records.RecordError, match=f"{path.name} record 0: text id outside"):
    next(iter(pipeline.make_dataset(_text_only(_config(out)), "validation")))


def test_wrong_image_size_in_records_is_named(prepared, tmp_path):
  out = _copy_prepared(prepared[0], tmp_path / "d")
  path = _first_shard(out, "image_text", "validation")

  def short_image(arrays, meta):
    arrays["image"] = arrays["image"][:5]
    return records.encode_record(arrays, meta)

  _rewrite_record(path, 0, short_image)
  c = _config(out)
  c.data.mixture.text = c.data.mixture.audio_text = 0.0
  with pytest.raises(records.RecordError, match="record 0: image has 5 tokens, expected 16"):
    next(iter(pipeline.make_dataset(c, "validation")))


def test_vocab_mismatch_is_named(prepared):
  c = _config(prepared[0])
  c.vocab.image_size = 256
  with pytest.raises(pipeline.DataConfigError, match="image_size=64 but config.vocab.image_size=256"):
    pipeline.make_dataset(c, "train")


def test_missing_manifest_is_named(tmp_path):
  with pytest.raises(records.RecordError, match="no manifest.json"):
    pipeline.make_dataset(_config(tmp_path), "train")


def test_user_data_and_its_errors(tmp_path):
  rng = np.random.default_rng(0)
  img_dir = tmp_path / "imgs"
  img_dir.mkdir()
  lines = []
  for i in range(30):
    np.save(img_dir / f"{i}.npy", rng.integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8))
    lines.append(json.dumps({"file": f"{i}.npy", "caption": f"noise number {i}"}))
  (img_dir / "captions.jsonl").write_text("\n".join(lines))
  wav_dir = tmp_path / "wavs"
  wav_dir.mkdir()
  for i in range(30):
    sources.write_wav(str(wav_dir / f"{i}.wav"), 0.3 * np.sin(np.arange(8000 + 800 * i) / 9.0),
                      rate=22050)
    (wav_dir / f"{i}.txt").write_text(f"tone {i}")
  (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} " * 40})
                                                 for i in range(100)))
  out = tmp_path / "out"
  args = _args(out, text_files=str(tmp_path / "docs.jsonl"), image_dir=img_dir,
               image_captions=img_dir / "captions.jsonl", audio_dir=wav_dir,
               user_validation_fraction=0.3)
  manifest = prepare.prepare(args, tokenizers=FAKES)
  assert manifest.counts["text"]["validation"] > 0 and manifest.counts["image_text"]["validation"] > 0
  assert sum(manifest.counts["audio_text"].values()) == 30

  np.save(img_dir / "3.npy", np.zeros((IMAGE_SIZE + 1, IMAGE_SIZE, 3), np.uint8))
  with pytest.raises(sources.SourceError, match=r"3.npy: image is \(17, 16, 3\)"):
    for split in ("train", "validation"):
      list(sources.user_captioned_images(str(img_dir), str(img_dir / "captions.jsonl"), split,
                                         image_size=IMAGE_SIZE))
  (wav_dir / "4.txt").write_text("  ")
  with pytest.raises(sources.SourceError, match="4.txt: empty transcript for 4.wav"):
    for split in ("train", "validation"):
      list(sources.user_spoken_utterances(str(wav_dir), split))


def test_user_text_split_is_disjoint_and_independent_of_location(tmp_path):
  paragraphs = "\n\n".join(f"paragraph {i} " + "word " * (40 + 7 * i) for i in range(60))
  jsonl = "\n".join(json.dumps({"text": f"doc {i}"}) for i in range(80))
  splits = []
  for where in ("a", "b/c"):
    d = tmp_path / where
    d.mkdir(parents=True)
    (d / "first.txt").write_text(paragraphs)
    (d / "second.txt").write_text(paragraphs.replace("word", "other"))
    (d / "docs.jsonl").write_text(jsonl)
    files = [str(d / "*.txt"), str(d / "docs.jsonl")]
    splits.append({s: [doc["text"] for doc in sources.user_text_documents(
        files, s, validation_fraction=0.3)] for s in ("train", "validation")})
  assert splits[0] == splits[1]
  train, val = (set(splits[0][s]) for s in ("train", "validation"))
  assert train and val and not train & val
  everything = sources.user_text_documents(files, "train", validation_fraction=0.0)
  assert train | val == {doc["text"] for doc in everything} and len(everything) == len(train | val)


def test_record_codec_round_trip_and_errors():
  data = records.encode_record({"a": np.arange(5, dtype=np.int32)}, {"id": "x"})
  arrays, meta = records.decode_record(data)
  np.testing.assert_array_equal(arrays["a"], np.arange(5))
  assert meta == {"id": "x"}
  with pytest.raises(records.RecordError, match="f.ar record 7: checksum mismatch"):
    records.decode_record(data[:-6] + data[-4:], "f.ar record 7")
  with pytest.raises(records.RecordError, match="bad magic"):
    records.decode_record(b"junkjunkjunkjunk", "f.ar record 0")


def test_full_preset_sizes_and_flags_override():
  full = prepare.parse_args(["--out=x", "--preset=full"])
  default = prepare.parse_args(["--out=x"])
  assert full.num_images == 10 * default.num_images and full.num_utterances >= 20000
  assert len(full.voices.split(",")) > len(default.voices.split(","))
  assert default.pitch_range == "" and full.pitch_range
  assert prepare.parse_args(["--out=x", "--preset=full", "--num_images=7"]).num_images == 7


@pytest.mark.skipif(not sources.espeak_available(), reason="needs espeak-ng")
def test_full_preset_small_counts_disjoint_splits_and_varied_speech(tmp_path):
  """The full preset's sources at a small size: counts, disjoint splits, voice/rate/pitch."""
  args = _args(tmp_path / "full", preset="full", sources="image_text,audio_text",
               num_utterances=24, num_val_utterances=6, max_seconds=3.0)
  manifest = prepare.prepare(args, tokenizers=FAKES)
  assert manifest.counts["image_text"] == {"train": 40, "validation": 8}
  assert manifest.counts["audio_text"] == {"train": 24, "validation": 6}

  def metas(source, split):
    reader = records.ShardReader(manifest.shard_paths(str(tmp_path / "full"), source, split))
    return [reader[i][1] for i in range(len(reader))]
  train, val = metas("audio_text", "train"), metas("audio_text", "validation")
  assert not {m["transcript"] for m in train} & {m["transcript"] for m in val}
  lo, hi = (int(v) for v in args.pitch_range.split(","))
  rlo, rhi = (int(v) for v in args.rate_range.split(","))
  assert all(lo <= m["pitch"] <= hi and rlo <= m["rate_wpm"] <= rhi for m in train + val)
  assert {m["voice"] for m in train} <= set(sources.MORE_VOICES)
  assert len({m["voice"] for m in train}) >= 6 and len({m["pitch"] for m in train}) >= 6


def test_verify_names_a_damaged_shard_before_training(prepared, tmp_path):
  from tmdiff.data import verify
  out = _copy_prepared(prepared[0], tmp_path / "d")
  n = sum(len(names) for splits in prepared[1].shards.values() for names in splits.values())
  assert verify.main([str(out)]) == 0 and verify.verify(str(out)) == (n, [])
  path = _first_shard(out, "text", "train")
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF  # same size: the shard's record counts still match
  path.write_bytes(bytes(data))
  assert verify.verify(str(out)) == (n, [f"{path}: sha256 differs from the manifest (damaged "
                                         "or replaced)"])
  assert verify.main([str(out)]) == 1
