"""Clean reference speech for the speech judge, built at prepare time into the data dir.

  python -m tmdiff.data.speech_assets --data_dir=DIR [--max_train=N]

The speech judge (tmdiff.eval.speech_judge) trains on clean speech and reports its WER on
clean held-out speech; neither may need espeak-ng or a network at eval time. So prepare
stores, under `DIR/judge_assets/speech/` (a path relative to the data dir), the log-mel
frames of the raw (clean) utterances of each split: the validation split's are the judge's
held-out set, the train split's (the first `max_train`) its clean training speech.

Storage (`train.npz`, `validation.npz`, compressed): the audio tokenizer's log-mel
([T, n_mels], natural log) mean-pooled over TIME_POOL frames and BAND_POOL bands, quantised
to uint8 over [LOG_LO, LOG_HI]; about 2.3 KB per second of speech, with transcripts and
record ids. `features(log_mel)` pools a log-mel the same way, so the judge sees generated
audio in the space it was trained in. The CLI (re)builds the assets of a prepared dir from
the options in its prepare_state.json (needs espeak-ng for the embedded speech).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import numpy as np

ASSET_DIR = os.path.join("judge_assets", "speech")
INFO_FILE = "info.json"
SPLIT_FILES = {"train": "train.npz", "validation": "validation.npz"}
TIME_POOL, BAND_POOL = 2, 2
LOG_LO, LOG_HI = float(np.log(1e-4)), 3.0   # the tokenizer log floor; above espeak-ng speech (< 1)
DEFAULT_MAX_TRAIN = 12_000
FORMAT_VERSION = 1


class AssetError(ValueError):
  """Speech judge assets that are missing or do not match the data dir (one line)."""


def build_command(data_dir: str) -> str:
  return f"python -m tmdiff.data.speech_assets --data_dir={data_dir}"


def features(log_mel: np.ndarray) -> np.ndarray:
  """Log-mel [T, n_mels] -> pooled [T // TIME_POOL, n_mels // BAND_POOL] float32."""
  x = np.asarray(log_mel, np.float32)
  t, b = x.shape[0] // TIME_POOL * TIME_POOL, x.shape[1] // BAND_POOL * BAND_POOL
  x = x[:t, :b].reshape(t // TIME_POOL, TIME_POOL, b // BAND_POOL, BAND_POOL)
  return x.mean((1, 3))


def _quantise(x: np.ndarray) -> np.ndarray:
  q = np.round((np.clip(x, LOG_LO, LOG_HI) - LOG_LO) * (255.0 / (LOG_HI - LOG_LO)))
  return q.astype(np.uint8)


def _dequantise(q: np.ndarray) -> np.ndarray:
  return q.astype(np.float32) * ((LOG_HI - LOG_LO) / 255.0) + LOG_LO


def asset_dir(data_dir: str) -> str:
  return os.path.join(data_dir, ASSET_DIR)


def mel_config(audio_tokenizer) -> dict:
  """The tokenizer settings the stored log-mel depends on."""
  c = audio_tokenizer.config
  return {"sample_rate": int(c.sample_rate), "n_fft": int(c.n_fft), "hop": int(c.hop),
          "n_mels": int(c.n_mels)}


def write_split(data_dir: str, split: str, items: list[dict], audio_tokenizer) -> dict:
  """Stores pooled, quantised log-mel of items {"id", "audio", "transcript"}; returns stats."""
  out = asset_dir(data_dir)
  os.makedirs(out, exist_ok=True)
  frames = [_quantise(features(audio_tokenizer.log_mel(it["audio"]))) for it in items]
  lengths = np.array([len(f) for f in frames], np.int32)
  path = os.path.join(out, SPLIT_FILES[split])
  tmp = path + ".tmp.npz"
  np.savez_compressed(tmp, frames=np.concatenate(frames) if frames else np.zeros((0, 0), np.uint8),
                      lengths=lengths, transcripts=np.array([it["transcript"] for it in items]),
                      ids=np.array([it["id"] for it in items]))
  os.replace(tmp, path)
  return {"utterances": len(items), "bytes": os.path.getsize(path),
          "seconds": round(float(lengths.sum()) * TIME_POOL * audio_tokenizer.config.hop
                           / audio_tokenizer.config.sample_rate, 1)}


def write_info(data_dir: str, audio_tokenizer, stats: dict, max_train: int, key: str) -> None:
  info = {"format_version": FORMAT_VERSION, "mel": mel_config(audio_tokenizer),
          "time_pool": TIME_POOL, "band_pool": BAND_POOL, "log_range": [LOG_LO, LOG_HI],
          "max_train": max_train, "source_key": key, "splits": stats}
  with open(os.path.join(asset_dir(data_dir), INFO_FILE), "w") as f:
    json.dump(info, f, indent=1, sort_keys=True)


def complete(data_dir: str, audio_tokenizer, max_train: int, key: str) -> bool:
  """Whether the assets exist for this tokenizer's log-mel, `max_train` and the raw speech
  that `key` names (the prepare options)."""
  try:
    info = read_info(data_dir)
  except AssetError:
    return False
  return (info["mel"] == mel_config(audio_tokenizer)
          and info.get("max_train") == max_train and info.get("source_key") == key
          and all(os.path.isfile(os.path.join(asset_dir(data_dir), f))
                  for f in SPLIT_FILES.values()))


def build(data_dir: str, raw, audio_tokenizer, max_train: int = DEFAULT_MAX_TRAIN,
          key: str = "") -> dict:
  """Writes the assets from `raw(split)` -> clean items of the audio_text source; `key`
  names the raw speech (prepare's options), so a rerun with other options rebuilds."""
  stats = {}
  for split in ("validation", "train"):
    items = raw(split)
    if split == "train":
      items = items[:max_train]
    stats[split] = write_split(data_dir, split, items, audio_tokenizer)
  write_info(data_dir, audio_tokenizer, stats, max_train, key)
  logging.info("prepare: speech judge assets: %s", json.dumps(stats))
  return stats


def read_info(data_dir: str) -> dict:
  path = os.path.join(asset_dir(data_dir), INFO_FILE)
  if not os.path.isfile(path):
    raise AssetError(f"speech judge assets missing: {path}; build them with "
                     f"`{build_command(data_dir)}` (needs espeak-ng) or rerun prepare")
  with open(path) as f:
    info = json.load(f)
  if info.get("format_version") != FORMAT_VERSION:
    raise AssetError(f"{path} has format {info.get('format_version')}, expected "
                     f"{FORMAT_VERSION}; rebuild with `{build_command(data_dir)}`")
  return info


def load_split(data_dir: str, split: str, audio_tokenizer=None):
  """(features [pooled float32 arrays], transcripts, ids) of a stored split."""
  info = read_info(data_dir)
  if audio_tokenizer is not None and info["mel"] != mel_config(audio_tokenizer):
    raise AssetError(f"{asset_dir(data_dir)} holds log-mel for {info['mel']}, but the data "
                     f"dir's audio tokenizer has {mel_config(audio_tokenizer)}; rebuild with "
                     f"`{build_command(data_dir)}`")
  path = os.path.join(asset_dir(data_dir), SPLIT_FILES[split])
  if not os.path.isfile(path):
    raise AssetError(f"speech judge assets missing: {path}; build them with "
                     f"`{build_command(data_dir)}` (needs espeak-ng) or rerun prepare")
  with np.load(path) as z:
    frames, lengths = _dequantise(z["frames"]), z["lengths"]
    transcripts, ids = [str(t) for t in z["transcripts"]], [str(i) for i in z["ids"]]
  bounds = np.concatenate([[0], np.cumsum(lengths)])
  return [frames[a:b] for a, b in zip(bounds[:-1], bounds[1:])], transcripts, ids


def main(argv=None) -> None:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  p = argparse.ArgumentParser(prog="python -m tmdiff.data.speech_assets", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data_dir", required=True)
  p.add_argument("--max_train", type=int, default=None,
                 help=f"train utterances to store (default {DEFAULT_MAX_TRAIN}, as prepare)")
  a = p.parse_args(argv)
  from tmdiff.data import prepare
  state_path = os.path.join(a.data_dir, "prepare_state.json")
  if not os.path.isfile(state_path):
    sys.exit(f"speech_assets: {state_path} missing: not a prepared data dir")
  with open(state_path) as f:
    options = json.load(f)["options"]
  args = prepare.parse_args([f"--out={a.data_dir}"])
  for k, v in options.items():
    setattr(args, k, v)
  max_train = DEFAULT_MAX_TRAIN if a.max_train is None else a.max_train
  from tmdiff.data import records, tokenizers
  tok_dir = records.Manifest.load(a.data_dir).tokenizer_dir(a.data_dir, "audio")
  if tok_dir is None:
    sys.exit(f"speech_assets: {a.data_dir} has no audio tokenizer")
  build(a.data_dir, lambda split: prepare.raw_items("audio_text", split, args),
        tokenizers.load_tokenizer(tok_dir), max_train, options_key(options))


def options_key(options: dict) -> str:
  import hashlib
  return hashlib.sha1(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]


if __name__ == "__main__":
  main()
