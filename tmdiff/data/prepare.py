"""Prepare step: raw sources -> tokenizers -> tokenized ArrayRecord shards + manifest.json.

  python -m tmdiff.data.prepare --out=DIR                    # embedded default dataset
  python -m tmdiff.data.prepare --out=DIR --tokenizers=TOK   # reuse trained tokenizers
  python -m tmdiff.data.prepare --out=DIR --text_files='books/*.txt,more.jsonl' \
      --image_dir=imgs --image_captions=imgs/captions.jsonl \
      --audio_dir=wavs [--audio_transcripts=wavs/transcripts.jsonl]

Without --tokenizers, the tokenizers are trained on the train split and saved under
DIR/tokenizers/{text,image,audio}. Resumable: finished shards (and saved tokenizers) are
kept; rerunning after an interruption only does what is missing. Record schema and
directory layout: tmdiff/data/records.py.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import logging
import os
import shutil
import sys
import time
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from tmdiff.data import records as records_lib
from tmdiff.data import sources as sources_lib
from tmdiff.data import verify as verify_lib
from tmdiff.data import vocab as vocab_lib

MODALITY_DIRS = ("text", "image", "audio")
DEFAULTS = dict(num_images=4000, num_val_images=200, num_utterances=1200,
                num_val_utterances=80, image_size=32, max_seconds=3.0, shard_records=1024,
                text_vocab_size=512, max_pair_tokens=128, seed=0,
                # First-run budget (prepare + tiny training in 15 min on 2 cores); raise
                # both for better reconstructions.
                image_tokenizer_steps=1200, audio_tokenizer_steps=1200,
                voices=",".join(sources_lib.VOICES), rate_range="150,190", pitch_range="")
# `--preset=full`: the same sources, large enough for a 25-100M-parameter model; explicit
# flags still override.
PRESETS = {
    "default": {},
    "full": dict(num_images=40000, num_val_images=1000, num_utterances=24000,
                 num_val_utterances=400, image_tokenizer_steps=3000, audio_tokenizer_steps=3000,
                 voices=",".join(sources_lib.MORE_VOICES), rate_range="130,210",
                 pitch_range="20,80"),
}


class PrepareError(ValueError):
  """A prepare run that cannot proceed (names the input or output at fault)."""


# ----------------------------------------------------------------------------------------
# Tokenizers: load, or train with the functions of tmdiff.data.tokenizers.

def _call_with_supported(fn: Callable, *args, **kwargs):
  """Calls fn with only the keyword arguments its signature accepts (None values dropped)."""
  params = inspect.signature(fn).parameters
  if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
    kwargs = {k: v for k, v in kwargs.items() if k in params}
  return fn(*args, **{k: v for k, v in kwargs.items() if v is not None})


def load_tokenizer(directory: str):
  """Loads a tokenizer directory through the tokenizers registry."""
  from tmdiff.data import tokenizers
  if hasattr(tokenizers, "load_tokenizer"):
    return tokenizers.load_tokenizer(directory)
  raise PrepareError("tmdiff.data.tokenizers.load_tokenizer is not available; cannot load "
                     f"{directory}")


def _tokenizer_complete(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, "tokenizer.json"))


TRAIN_FUNCTIONS = {"text": ("tmdiff.data.tokenizers.text", "train_text_tokenizer"),
                   "image": ("tmdiff.data.tokenizers.image", "train_image_tokenizer"),
                   "audio": ("tmdiff.data.tokenizers.audio", "train_audio_tokenizer")}


def train_tokenizer(modality: str, samples, args) -> Any:
  """Trains the `modality` tokenizer on train-split samples with the tokenizers package."""
  import importlib
  module_name, fn_name = TRAIN_FUNCTIONS[modality]
  try:
    train_fn = getattr(importlib.import_module(module_name), fn_name)
  except (ImportError, AttributeError) as e:
    raise PrepareError(f"cannot train the {modality} tokenizer: {module_name}.{fn_name} is not "
                       f"available ({e}); pass --tokenizers=DIR holding "
                       f"{modality}/tokenizer.json") from None
  if modality == "text":
    return _call_with_supported(train_fn, samples, vocab_size=args.text_vocab_size,
                                seed=args.seed)
  if modality == "image":
    return _call_with_supported(train_fn, np.stack(samples), steps=args.image_tokenizer_steps,
                                seed=args.seed)
  return _call_with_supported(train_fn, samples, steps=args.audio_tokenizer_steps,
                              seed=args.seed)


QUALITY_ITEMS = {"text": 200, "image": 200, "audio": 40}


def tokenizer_quality(toks: dict, raw) -> dict:
  """Held-out (validation split) reconstruction figures of the tokenizers in use."""
  from tmdiff.data.tokenizers import audio as audio_tok
  from tmdiff.data.tokenizers import image as image_tok
  quality = {}
  if "text" in toks:
    docs = [d["text"] for d in raw("text", "validation")[:QUALITY_ITEMS["text"]]]
    exact = sum(toks["text"].decode(toks["text"].encode(d)) == d for d in docs)
    chars = sum(len(d) for d in docs)
    ids = sum(len(toks["text"].encode(d)) for d in docs)
    quality["text"] = {"exact_round_trips": f"{exact}/{len(docs)}",
                       "chars_per_token": round(chars / max(ids, 1), 3)}
  if "image" in toks and isinstance(toks["image"], image_tok.ImageTokenizer):
    images = np.stack([d["image"] for d in raw("image_text", "validation")[:QUALITY_ITEMS["image"]]])
    quality["image"] = {"held_out_psnr_db": round(image_tok.image_psnr(toks["image"], images), 2),
                        "images": len(images)}
  if "audio" in toks and isinstance(toks["audio"], audio_tok.AudioTokenizer):
    waves = [d["audio"] for d in raw("audio_text", "validation")[:QUALITY_ITEMS["audio"]]]
    report = audio_tok.audio_reconstruction_report(toks["audio"], waves)
    quality["audio"] = {k: round(float(v), 4) for k, v in report.items()}
    quality["audio"]["utterances"] = len(waves)
  logging.info("prepare: tokenizer quality on held-out data: %s", json.dumps(quality))
  return quality


def _encode_many(tokenizer, items: list, what: str, desc: str, batched: bool) -> list[np.ndarray]:
  """Encodes items, with the tokenizer's encode_batch where it has one."""
  from tqdm import tqdm
  out = []
  chunk = 256
  use_batch = batched and hasattr(tokenizer, "encode_batch")
  with tqdm(total=len(items), desc=desc, unit=what, leave=False, file=sys.stderr,
            disable=None) as bar:
    for i in range(0, len(items), chunk):
      part = items[i:i + chunk]
      if use_batch:
        encoded = tokenizer.encode_batch(np.stack(part) if isinstance(part[0], np.ndarray)
                                         and part[0].ndim == 3 else part)
        out.extend(np.asarray(e, np.int32) for e in encoded)
      else:
        out.extend(np.asarray(tokenizer.encode(x), np.int32) for x in part)
      bar.update(len(part))
  return out


# ----------------------------------------------------------------------------------------
# Raw items per source and split.

def raw_items(source: str, split: str, args) -> list[dict]:
  """Raw items of `source` for `split`, from user data when given, else embedded."""
  if source == "text":
    if args.text_files:
      entries = [e for e in args.text_files.split(",") if e]
      files = [e for e in entries if not e.startswith("seqio:")]
      docs = sources_lib.user_text_documents(files, split, seed=args.seed,
                                             validation_fraction=args.user_validation_fraction
                                             ) if files else []
      for spec in (e for e in entries if e.startswith("seqio:")):   # tmdiff.data.seqio_bridge
        from tmdiff.data import seqio_bridge
        docs += seqio_bridge.task_documents(spec, split, seed=args.seed,
                                            validation_fraction=args.user_validation_fraction)
    else:
      docs = sources_lib.text_documents(split, seed=args.seed)
    if args.max_text_docs:
      docs = docs[:args.max_text_docs]
    return docs
  if source == "image_text":
    if args.image_dir:
      if not args.image_captions:
        raise PrepareError("--image_dir needs --image_captions (JSONL of {file, caption})")
      return list(sources_lib.user_captioned_images(
          args.image_dir, args.image_captions, split, image_size=args.image_size, seed=args.seed,
          validation_fraction=args.user_validation_fraction))
    num = args.num_images if split == "train" else args.num_val_images
    return list(sources_lib.captioned_images(
        split, num, seed=args.seed, spec=sources_lib.ImageSpec(size=args.image_size)))
  if source == "audio_text":
    if args.audio_dir:
      return list(sources_lib.user_spoken_utterances(
          args.audio_dir, split, transcripts_jsonl=args.audio_transcripts, seed=args.seed,
          validation_fraction=args.user_validation_fraction, max_seconds=args.max_seconds))
    num = args.num_utterances if split == "train" else args.num_val_utterances
    from tqdm import tqdm
    speech = sources_lib.spoken_sentences(
        split, num, seed=args.seed, max_seconds=args.max_seconds,
        voices=tuple(v for v in args.voices.split(",") if v), rates=_int_range(args.rate_range),
        pitches=_int_range(args.pitch_range) if args.pitch_range else None)
    return list(tqdm(speech,
                     total=num, desc=f"speech {split}", unit="utt", leave=False,
                     file=sys.stderr, disable=None))
  raise PrepareError(f"unknown source {source!r}")


def _int_range(text: str) -> tuple[int, int]:
  try:
    lo, hi = (int(v) for v in text.split(","))
  except ValueError:
    raise PrepareError(f"expected a range LO,HI of integers, got {text!r}") from None
  if lo > hi:
    raise PrepareError(f"range {text!r}: LO must not exceed HI")
  return lo, hi


# ----------------------------------------------------------------------------------------
# Records.

def make_records(source: str, items: list[dict], toks: dict, args, desc: str,
                 layout_sizes: dict[str, int]) -> tuple[list[bytes], dict]:
  """Tokenizes items into record bytes; returns (records, stats)."""
  stats = {"dropped_overlong": 0, "dropped_empty": 0, "tokens": {}}
  if source == "text":
    ids = _encode_many(toks["text"], [d["text"] for d in items], "doc", desc, batched=True)
    out = []
    for d, t in zip(items, ids):
      if t.size == 0:
        stats["dropped_empty"] += 1
        continue
      out.append(((("text", t),), {"id": d["id"]}))
  else:
    cond_key, cond_name, target_key, target_name, modality = (
        ("caption", "caption", "image", "image", "image") if source == "image_text"
        else ("transcript", "transcript", "audio", "audio", "audio"))
    conds = _encode_many(toks["text"], [it[cond_key] for it in items], "text", desc + " text",
                         batched=True)
    targets = _encode_many(toks[modality], [it[target_key] for it in items], modality,
                           desc + f" {modality}", batched=modality == "image")
    out = []
    for it, c, t in zip(items, conds, targets):
      if c.size == 0 or t.size == 0:
        raise PrepareError(f"{it['id']}: empty {cond_name if c.size == 0 else target_name} "
                           "after tokenization")
      if 4 + c.size + t.size > args.max_pair_tokens:
        stats["dropped_overlong"] += 1
        continue
      meta = {"id": it["id"]}
      if source == "image_text":
        meta["attributes"] = it.get("attributes", {})
        meta["caption"] = it["caption"]
      else:
        meta.update(transcript=it["transcript"], voice=it.get("voice"),
                    seconds=it.get("seconds"), rate_wpm=it.get("rate_wpm"))
        if it.get("pitch") is not None:
          meta["pitch"] = it["pitch"]
      out.append((((cond_name, c), (target_name, t)), meta))
  records = []
  for fields, meta in out:
    for (name, arr), (_, modality_name) in zip(fields, records_lib.SOURCE_FIELDS[source]):
      size = layout_sizes[modality_name]
      if arr.size and (arr.min() < 0 or arr.max() >= size):
        raise PrepareError(f"{meta['id']}: {modality_name} tokenizer produced id outside "
                           f"[0, {size})")
      stats["tokens"][name] = stats["tokens"].get(name, 0) + int(arr.size)
    records.append(records_lib.encode_record(dict(fields), meta))
  return records, stats


# ----------------------------------------------------------------------------------------
# Main.

def _fingerprint(tokenizer_dirs: dict[str, str]) -> str:
  h = hashlib.sha1()
  for m in sorted(tokenizer_dirs):
    d = tokenizer_dirs[m]
    for name in sorted(os.listdir(d)):
      path = os.path.join(d, name)
      if os.path.isfile(path):
        h.update(name.encode())
        with open(path, "rb") as f:
          h.update(f.read())
  return h.hexdigest()[:16]


def _tokenizer_in_data_dir(out: str, modality: str, directory: str) -> str:
  """The manifest's entry for a tokenizer: OUT/tokenizers/<modality> relative to OUT, copied
  there first when it lives elsewhere (--tokenizers), so the data dir carries its tokenizers."""
  inside = os.path.join(out, "tokenizers", modality)
  if os.path.realpath(directory) != os.path.realpath(inside):
    shutil.rmtree(inside, ignore_errors=True)
    shutil.copytree(directory, inside)
  return f"tokenizers/{modality}"


def _remove_shards(out: str) -> None:
  for source in records_lib.SOURCES:
    shutil.rmtree(os.path.join(out, source), ignore_errors=True)


def prepare(args, tokenizers: dict[str, Any] | None = None) -> records_lib.Manifest:
  """Runs the prepare step; `tokenizers` ({modality: Tokenizer}) skips loading/training."""
  start = time.time()
  out = args.out
  os.makedirs(out, exist_ok=True)
  sources = [s.strip() for s in args.sources.split(",") if s.strip()]
  bad = set(sources) - set(records_lib.SOURCES)
  if bad:
    raise PrepareError(f"--sources has unknown entries {sorted(bad)}; known {records_lib.SOURCES}")
  needed_modalities = {"text"} | {"image" for s in sources if s == "image_text"} | {
      "audio" for s in sources if s == "audio_text"}

  raw_cache: dict[tuple[str, str], list] = {}

  def raw(source, split):
    if (source, split) not in raw_cache:
      logging.info("prepare: reading raw %s/%s", source, split)
      raw_cache[(source, split)] = raw_items(source, split, args)
    return raw_cache[(source, split)]

  # Options that change the data: a rerun with others needs --overwrite (which also retrains
  # the tokenizers this directory holds).
  state_path = os.path.join(out, "prepare_state.json")
  options = {k: getattr(args, k) for k in sorted(vars(args))
             if k not in ("out", "tokenizers", "overwrite", "preset")}
  previous = None
  if os.path.exists(state_path):
    with open(state_path) as f:
      previous = json.load(f)
    # An option newer than the directory counts as unchanged at its default value.
    changed = sorted(k for k in options
                     if previous["options"].get(k, DEFAULTS.get(k)) != options[k])
    if changed:
      if not args.overwrite:
        raise PrepareError(f"{out} was prepared with other options ({changed}; see "
                           f"{state_path}); use a new --out or pass --overwrite")
      _remove_shards(out)
      if not args.tokenizers:
        shutil.rmtree(os.path.join(out, "tokenizers"), ignore_errors=True)
      previous = None

  # Tokenizers.
  tokenizer_root = args.tokenizers or os.path.join(out, "tokenizers")
  tokenizer_dirs = {m: os.path.join(tokenizer_root, m) for m in MODALITY_DIRS}
  toks = dict(tokenizers or {})
  for m in MODALITY_DIRS:
    if m not in needed_modalities or m in toks:
      continue
    if _tokenizer_complete(tokenizer_dirs[m]):
      toks[m] = load_tokenizer(tokenizer_dirs[m])
      continue
    if args.tokenizers:
      raise PrepareError(f"--tokenizers={args.tokenizers} has no {m}/tokenizer.json")
    logging.info("prepare: training the %s tokenizer", m)
    t0 = time.time()
    if m == "text":
      samples = [d["text"] for d in raw("text", "train")] if "text" in sources else []
      samples += [d["caption"] for d in (raw("image_text", "train") if "image_text" in sources else [])]
      samples += [d["transcript"] for d in (raw("audio_text", "train") if "audio_text" in sources else [])]
    elif m == "image":
      samples = [d["image"] for d in raw("image_text", "train")]
    else:
      samples = [d["audio"] for d in raw("audio_text", "train")]
    tok = train_tokenizer(m, samples, args)
    os.makedirs(tokenizer_dirs[m], exist_ok=True)
    tok.save(tokenizer_dirs[m])
    toks[m] = load_tokenizer(tokenizer_dirs[m])  # what training runs will see
    logging.info("prepare: %s tokenizer: %d ids, %.1f s", m, toks[m].vocab_size, time.time() - t0)
  missing = needed_modalities - set(toks)
  if missing:
    raise PrepareError(f"no tokenizer for {sorted(missing)}")
  vocab = {f"{m}_size": int(toks[m].vocab_size) for m in MODALITY_DIRS if m in toks}
  layout_sizes = {m: int(toks[m].vocab_size) for m in toks}
  if tokenizers:
    fingerprint = "in-memory:" + ",".join(f"{m}={type(t).__name__}/{t.vocab_size}"
                                          for m, t in sorted(toks.items()))
    tokenizer_paths = {m: f"<in-memory {type(t).__name__}>" for m, t in toks.items()}
  else:
    fingerprint = _fingerprint({m: tokenizer_dirs[m] for m in toks})
    tokenizer_paths = {m: _tokenizer_in_data_dir(out, m, tokenizer_dirs[m]) for m in toks}

  # Resume only onto shards written with the same tokenizers.
  state_path = os.path.join(out, "prepare_state.json")
  run_key = {"tokenizers": fingerprint, "options": options}
  if previous is not None and previous["tokenizers"] != fingerprint:
    if not args.overwrite:
      raise PrepareError(f"{out} was prepared with other tokenizers ({state_path}); use a new "
                         "--out or pass --overwrite")
    _remove_shards(out)
  with open(state_path, "w") as f:
    json.dump(run_key, f, indent=2)

  shards, counts, tokens, per_shard, dropped = {}, {}, {}, {}, {}
  for source in sources:
    os.makedirs(os.path.join(out, source), exist_ok=True)
    for split in records_lib.SPLITS:
      key = f"{source}/{split}"
      plan_path = os.path.join(out, source, f"{split}-plan.json")
      plan = None
      if os.path.exists(plan_path):
        with open(plan_path) as f:
          plan = json.load(f)
      names = [records_lib.shard_name(split, i, plan["num_shards"]) for i in
               range(plan["num_shards"])] if plan else []
      done = [records_lib.shard_complete(os.path.join(out, source, n)) for n in names]
      if plan and all(done):
        logging.info("prepare: %s complete (%d shards), skipping", key, len(names))
      else:
        items = raw(source, split)
        if not items:
          raise PrepareError(f"no {key} items (check the inputs / split fractions)")
        num_shards = max(1, -(-len(items) // args.shard_records))
        if plan and plan["num_shards"] != num_shards:
          raise PrepareError(f"{plan_path} expects {plan['num_shards']} shards, now "
                             f"{num_shards}; pass --overwrite")
        with open(plan_path, "w") as f:
          json.dump({"num_shards": num_shards, "items": len(items)}, f)
        names = [records_lib.shard_name(split, i, num_shards) for i in range(num_shards)]
        per = -(-len(items) // num_shards)
        for i, name in enumerate(names):
          path = os.path.join(out, source, name)
          if records_lib.shard_complete(path):
            continue
          part = items[i * per:(i + 1) * per]
          recs, stats = make_records(source, part, toks, args,
                                     f"{key} shard {i + 1}/{num_shards}", layout_sizes)
          records_lib.write_shard(path, recs, stats)
        done = [records_lib.shard_complete(os.path.join(out, source, n)) for n in names]
      shards.setdefault(source, {})[split] = names
      per_shard.setdefault(source, {})[split] = [d["records"] for d in done]
      counts.setdefault(source, {})[split] = sum(d["records"] for d in done)
      tok_sum: dict[str, int] = {}
      for d in done:
        for k, v in d["tokens"].items():
          tok_sum[k] = tok_sum.get(k, 0) + v
      tokens.setdefault(source, {})[split] = tok_sum
      dropped[key] = {"overlong": sum(d["dropped_overlong"] for d in done),
                      "empty": sum(d["dropped_empty"] for d in done)}
      if counts[source][split] == 0:
        raise PrepareError(f"every {key} item was dropped ({dropped[key]}); raise "
                           "--max_pair_tokens or shorten the inputs")
      if dropped[key]["overlong"]:
        logging.warning("prepare: dropped %d %s pairs longer than --max_pair_tokens=%d",
                        dropped[key]["overlong"], key, args.max_pair_tokens)
  _speech_judge_assets(out, sources, toks, options, raw)
  extra = {"seed": args.seed, "dropped": dropped, "max_pair_tokens": args.max_pair_tokens,
           "image_size": args.image_size, "audio_sample_rate": sources_lib.AUDIO_SAMPLE_RATE,
           "tokenizer_fingerprint": fingerprint, "prepare_seconds": round(time.time() - start, 1),
           "record_schema": records_lib.__doc__}
  if "image_text" in sources:  # procedural captions follow sources.CAPTION_GRAMMAR
    extra["image_captions"] = "user" if args.image_dir else "procedural"
  if "image" in toks and hasattr(toks["image"], "tokens_per_image"):
    extra["image_tokens"] = int(toks["image"].tokens_per_image)
  if "audio" in toks:
    for attr in ("tokens_per_second", "frames_per_second"):
      if hasattr(toks["audio"], attr):
        extra["audio_tokens_per_second"] = float(getattr(toks["audio"], attr))
        break
  if not tokenizers:
    extra["tokenizer_quality"] = tokenizer_quality(toks, raw)
  extra[verify_lib.DIGESTS] = verify_lib.shard_digests(out, shards)  # python -m tmdiff.data.verify
  manifest = records_lib.Manifest(
      schema_version=records_lib.SCHEMA_VERSION, vocab=vocab,
      tokenizers=tokenizer_paths,
      shards=shards, counts=counts, tokens=tokens, records_per_shard=per_shard, extra=extra)
  manifest.save(out)
  return manifest


def _speech_judge_assets(out: str, sources: list[str], toks: dict, options: dict, raw) -> None:
  """Clean reference speech for the speech judge (tmdiff.data.speech_assets)."""
  from tmdiff.data import speech_assets
  if "audio_text" not in sources or not hasattr(toks.get("audio"), "log_mel"):
    return
  key = speech_assets.options_key(options)
  if not speech_assets.complete(out, toks["audio"], speech_assets.DEFAULT_MAX_TRAIN, key):
    speech_assets.build(out, lambda split: raw("audio_text", split), toks["audio"],
                        speech_assets.DEFAULT_MAX_TRAIN, key)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m tmdiff.data.prepare", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--tokenizers", default="", help="directory with text/ image/ audio/ tokenizers"
                 " (default: train them into OUT/tokenizers)")
  p.add_argument("--sources", default=",".join(records_lib.SOURCES))
  p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
  p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                 help="data sizes: default (the quickstart's, ~4 min on 2 cores) or full "
                      "(~10x the images, 24k utterances in 14 voices, varied rate and pitch)")
  p.add_argument("--voices", default=DEFAULTS["voices"], help="comma-separated espeak-ng voices")
  p.add_argument("--rate_range", default=DEFAULTS["rate_range"], help="speech rate LO,HI (wpm)")
  p.add_argument("--pitch_range", default=DEFAULTS["pitch_range"],
                 help="espeak-ng pitch LO,HI in 0-99 (empty: each voice's own)")
  for name in ("num_images", "num_val_images", "num_utterances", "num_val_utterances",
               "image_size", "shard_records", "text_vocab_size", "max_pair_tokens"):
    p.add_argument(f"--{name}", type=int, default=DEFAULTS[name])
  p.add_argument("--max_seconds", type=float, default=DEFAULTS["max_seconds"],
                 help="longest utterance")
  p.add_argument("--max_text_docs", type=int, default=0, help="cap documents per split (0: all)")
  p.add_argument("--image_tokenizer_steps", type=int, default=DEFAULTS["image_tokenizer_steps"])
  p.add_argument("--audio_tokenizer_steps", type=int, default=DEFAULTS["audio_tokenizer_steps"])
  p.add_argument("--text_files", default="", help="comma-separated .txt/.jsonl files or globs, "
                 "or seqio:TASK[?feature=F&module=M] (tmdiff.data.seqio_bridge)")
  p.add_argument("--image_dir", default="")
  p.add_argument("--image_captions", default="", help="JSONL of {file, caption}")
  p.add_argument("--audio_dir", default="", help="folder of .wav (+ .txt transcripts)")
  p.add_argument("--audio_transcripts", default="", help="JSONL of {file, text}")
  p.add_argument("--user_validation_fraction", type=float, default=0.05,
                 help="share of user items held out for validation (by a stable hash)")
  p.add_argument("--overwrite", action="store_true",
                 help="discard shards written with other tokenizers/options")
  preset, _ = p.parse_known_args(argv)
  p.set_defaults(**PRESETS[preset.preset])
  return p.parse_args(argv)


def main(argv=None) -> None:
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  args = parse_args(argv)
  try:
    manifest = prepare(args)
  except (PrepareError, sources_lib.SourceError, records_lib.RecordError) as e:
    sys.exit(f"prepare failed: {e}")
  print(json.dumps({"out": args.out, "vocab": manifest.vocab, "counts": manifest.counts,
                    "tokens": manifest.tokens,
                    "prepare_seconds": manifest.extra["prepare_seconds"]}, indent=1))
  print(f"train with: --config.data.source=prepared --config.data.data_dir={args.out} "
        + " ".join(f"--config.vocab.{k}={v}" for k, v in manifest.vocab.items()))


if __name__ == "__main__":
  main()
