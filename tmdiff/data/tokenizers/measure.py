"""Figures for the README: trains each tokenizer briefly on realistic data and reports quality.

  python -m tmdiff.data.tokenizers.measure [--image-steps N] [--audio-steps N] [--out DIR]

Data: the embedded default dataset of tmdiff.data.sources (Shakespeare text, captioned 32x32
shapes, espeak-ng speech; train split for training, validation split held out). Where that
module is unavailable: the small shape generator and sentence list below, and this repository's
Python code as text. Speech needs `espeak-ng` (apt-get install -y espeak-ng).
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import tempfile
import time

import numpy as np

from tmdiff.data.tokenizers import audio as audio_lib
from tmdiff.data.tokenizers import image as image_lib
from tmdiff.data.tokenizers import text as text_lib

PALETTE = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220),
           "yellow": (235, 210, 40), "purple": (150, 60, 190), "orange": (245, 140, 30),
           "white": (245, 245, 245), "black": (15, 15, 15)}


def synthetic_shapes(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
  """[n, size, size, 3] uint8: 1-3 circles / squares / triangles on a plain background."""
  rng = np.random.default_rng(seed)
  colours = np.array(list(PALETTE.values()), np.uint8)
  yy, xx = np.mgrid[0:size, 0:size] + 0.5
  images = np.empty((n, size, size, 3), np.uint8)
  for k in range(n):
    background = rng.integers(len(colours))
    image = np.broadcast_to(colours[background], (size, size, 3)).copy()
    for _ in range(rng.integers(1, 4)):
      colour = colours[rng.choice([c for c in range(len(colours)) if c != background])]
      radius = rng.uniform(0.12, 0.3) * size
      cy, cx = rng.uniform(radius, size - radius, 2)
      shape = rng.integers(3)
      if shape == 0:
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
      elif shape == 1:
        mask = (np.abs(yy - cy) <= radius) & (np.abs(xx - cx) <= radius)
      else:  # upward triangle
        mask = (yy <= cy + radius) & (np.abs(xx - cx) <= (yy - (cy - radius)) / 2)
      image[mask] = colour
    images[k] = image
  return images


def _sources():
  try:
    from tmdiff.data import sources
    return sources
  except ImportError:
    return None


def shape_images(split: str, n: int) -> tuple[np.ndarray, str]:
  sources = _sources()
  if sources is not None and hasattr(sources, "captioned_images"):
    items = sources.captioned_images(split, n, seed=0)
    return np.stack([item["image"] for item in items]), "tmdiff.data.sources.captioned_images"
  return synthetic_shapes(n, 32, seed=0 if split == "train" else 12345), "measure.synthetic_shapes"


def speech(split: str, n: int) -> tuple[list[np.ndarray], str]:
  sources = _sources()
  if sources is not None and hasattr(sources, "spoken_sentences"):
    items = sources.spoken_sentences(split, n, seed=0)
    return [item["audio"] for item in items], "tmdiff.data.sources.spoken_sentences"
  if split == "train":
    return espeak_speech(SENTENCES[:-3], VOICES[:-2]), "measure.espeak_speech"
  return espeak_speech(SENTENCES[-3:], VOICES[-2:]), "measure.espeak_speech (unseen voices)"


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A red circle sits above a small blue square.",
    "She sells sea shells by the sea shore.",
    "How much wood would a woodchuck chuck if a woodchuck could chuck wood?",
    "Four score and seven years ago our fathers brought forth a new nation.",
    "To be or not to be, that is the question.",
    "The rain in Spain stays mainly in the plain.",
    "Please call Stella and ask her to bring these things from the store.",
    "Six spoons of fresh snow peas, five thick slabs of blue cheese.",
    "We also need a small plastic snake and a big toy frog for the kids.",
    "The yellow triangle is to the left of the green circle.",
    "Numbers like three hundred and forty two are spoken aloud.",
    "It was the best of times, it was the worst of times.",
    "All that glitters is not gold.",
    "Early to bed and early to rise makes a man healthy and wise.",
    "The orange square is larger than the purple one.",
]
VOICES = ["en-us", "en-gb", "en+f3", "en+m3", "en-us+f2", "en-gb+m5"]


def espeak_speech(sentences, voices, speeds=(150, 175)) -> list[np.ndarray]:
  """Synthesises every (sentence, voice, speed) with espeak-ng; 16 kHz float32 waveforms."""
  if shutil.which("espeak-ng") is None:
    raise RuntimeError("espeak-ng not found; install it with `apt-get install -y espeak-ng`")
  waves = []
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "out.wav")
    for sentence in sentences:
      for voice in voices:
        for speed in speeds:
          subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", path, sentence],
                         check=True, capture_output=True)
          wave, rate = audio_lib.read_wav(path)
          waves.append(audio_lib.resample(wave, rate, audio_lib.SAMPLE_RATE))
  return waves


def measure_text(vocab_size: int) -> None:
  sources = _sources()
  if sources is not None and hasattr(sources, "text_documents"):
    train = [d["text"] for d in sources.text_documents("train")]
    held_out = "\n\n".join(d["text"] for d in sources.text_documents("validation"))
    name = "tmdiff.data.sources.text_documents"
  else:
    root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
    files = sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
    corpus = "\n".join(open(f, encoding="utf-8").read() for f in files)
    train, held_out, name = [corpus[:-len(corpus) // 10]], corpus[-len(corpus) // 10:], "tmdiff/**/*.py"
  start = time.time()
  tokenizer = text_lib.train_text_tokenizer(train, vocab_size=vocab_size)
  seconds = time.time() - start
  ids = tokenizer.encode(held_out)
  exact = tokenizer.decode(ids) == held_out
  print(f"text: SentencePiece BPE, {tokenizer.vocab_size} ids, trained on {name} in {seconds:.1f}s; "
        f"held-out: {len(held_out) / max(1, len(ids)):.2f} chars/token, exact round trip: {exact}",
        flush=True)


def measure_image(steps: int, num_train: int, out: str | None) -> None:
  train, source = shape_images("train", num_train)
  held_out, _ = shape_images("validation", 500)
  tokenizer = image_lib.train_image_tokenizer(train, steps=steps, seed=0)
  psnr = image_lib.image_psnr(tokenizer, held_out)
  print(f"image: {tokenizer.tokens_per_image} tokens/image, codebook {tokenizer.vocab_size} "
        f"(levels {tokenizer.config.levels}); trained on {len(train)} images of {source} for "
        f"{steps} steps in {tokenizer.train_seconds:.0f}s; held-out PSNR {psnr:.2f} dB "
        f"({len(held_out)} validation images)", flush=True)
  if out:
    tokenizer.save(os.path.join(out, "image"))


def measure_audio(steps: int, num_train: int, out: str | None) -> None:
  start = time.time()
  train, source = speech("train", num_train)
  held_out, _ = speech("validation", 40)
  synth_seconds = time.time() - start
  seconds_of_speech = sum(len(w) for w in train) / audio_lib.SAMPLE_RATE
  tokenizer = audio_lib.train_audio_tokenizer(train, steps=steps, seed=0)
  c = tokenizer.config
  print(f"audio: {tokenizer.tokens_per_second:.2f} tokens/s, codebook {tokenizer.vocab_size} "
        f"(levels {c.levels}; {c.codes_per_step} codes per {c.frames_per_step} mel frames of "
        f"hop {c.hop} at {c.sample_rate} Hz); trained on {len(train)} utterances "
        f"({seconds_of_speech:.0f}s) of {source} (synthesis {synth_seconds:.0f}s) for {steps} "
        f"steps in {tokenizer.train_seconds:.0f}s", flush=True)
  report = audio_lib.audio_reconstruction_report(tokenizer, held_out)
  print(f"audio held-out ({len(held_out)} validation utterances): "
        + ", ".join(f"{k} {v:.3f}" for k, v in report.items()), flush=True)
  if out:
    tokenizer.save(os.path.join(out, "audio"))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--image-steps", type=int, default=1200)
  parser.add_argument("--audio-steps", type=int, default=1500)
  parser.add_argument("--num-images", type=int, default=4000)
  parser.add_argument("--num-utterances", type=int, default=300)
  parser.add_argument("--text-vocab", type=int, default=2048)
  parser.add_argument("--only", choices=["text", "image", "audio"], default=None)
  parser.add_argument("--out", default=None, help="also save the trained tokenizers here")
  args = parser.parse_args(argv)
  if args.only in (None, "text"):
    measure_text(args.text_vocab)
  if args.only in (None, "image"):
    measure_image(args.image_steps, args.num_images, args.out)
  if args.only in (None, "audio"):
    measure_audio(args.audio_steps, args.num_utterances, args.out)


if __name__ == "__main__":
  main()
