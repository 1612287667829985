"""Tokenizer tests: text round trip, FSQ, image and audio tokenizers, Griffin-Lim, loading errors."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tmdiff.data import vocab
from tmdiff.data.tokenizers import (TokenizerLoadError, audio, image, load_tokenizer,
                                    register_tokenizer, text)
from tmdiff.data.tokenizers.fsq import FSQ

# ----------------------------------------------------------------------------- text

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A red circle sits above a small blue square; the square is green.",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind",
    "Numbers 0123456789 and    extra   spaces, tabs\tand punctuation!?",
] * 20


@pytest.fixture(scope="module")
def text_tokenizer():
  return text.train_text_tokenizer(CORPUS, vocab_size=420)


EDGE_CASES = ["", " ", "  ", "\n", "\n\n", "\t x \r\n", " leading", "trailing  ", "a  b   c",
              "\u2581", "\u2581x \u2581\u2581", "é中文🙂", "\x00\x01", "e\u0301", "ＡＢ", "\u200b",
              "The quick brown fox.", "<unk> <s> </s> <0x41>", "\ufeffbom"]


@pytest.mark.parametrize("s", EDGE_CASES)
def test_text_round_trip_edge_cases(text_tokenizer, s):
  ids = text_tokenizer.encode(s)
  assert ids.dtype == np.int32 and ids.ndim == 1
  assert text_tokenizer.decode(ids) == s


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_text_round_trip_random(text_tokenizer, s):
  ids = text_tokenizer.encode(s)
  assert ((ids >= 0) & (ids < text_tokenizer.vocab_size)).all()
  assert text_tokenizer.decode(ids) == s


def test_text_compresses_and_is_deterministic(text_tokenizer, tmp_path):
  s = CORPUS[0]
  assert len(text_tokenizer.encode(s)) < len(s) / 2  # learned merges, not bytes
  again = text.train_text_tokenizer(CORPUS, vocab_size=420)
  assert again._model_proto == text_tokenizer._model_proto
  text_tokenizer.save(str(tmp_path))
  loaded = load_tokenizer(str(tmp_path))
  assert isinstance(loaded, text.TextTokenizer)
  for s in EDGE_CASES:
    np.testing.assert_array_equal(loaded.encode(s), text_tokenizer.encode(s))
  # An externally trained SentencePiece model file plugs in directly.
  external = text.TextTokenizer.from_model_file(str(tmp_path / text.MODEL_FILE))
  assert external.vocab_size == text_tokenizer.vocab_size


def test_text_unified_ids(text_tokenizer):
  layout = vocab.VocabLayout(text_size=512, image_size=1000, audio_size=1000)
  ids = text_tokenizer.encode_unified("hello", layout)
  start, stop = layout.text_range
  assert ((ids >= start) & (ids < stop)).all()
  assert text_tokenizer.decode_unified(ids, layout) == "hello"
  with pytest.raises(ValueError, match="reserves"):
    text_tokenizer.encode_unified("x", vocab.VocabLayout(100, 1000, 1000))


# ----------------------------------------------------------------------------- FSQ

def numpy_fsq(z, levels, eps=1e-3):
  """Independent reference: per channel bound, round, rescale; mixed-radix index."""
  z = np.asarray(z, np.float64)
  codes = np.empty_like(z)
  index = np.zeros(z.shape[:-1], np.int64)
  radix = 1
  for i, n in enumerate(levels):
    half = (n - 1) * (1 + eps) / 2
    offset = 0.5 if n % 2 == 0 else 0.0
    digit = np.round(np.tanh(z[..., i] + np.arctanh(offset / half)) * half - offset)
    codes[..., i] = digit / (n // 2)
    index += (digit + n // 2).astype(np.int64) * radix
    radix *= n
  return codes, index


@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (4, 4, 4, 4), (2, 3, 7)])
def test_fsq_matches_numpy_and_is_bijective(levels):
  fsq = FSQ(levels)
  assert fsq.codebook_size == math.prod(levels)
  z = np.random.default_rng(0).normal(scale=3.0, size=(4000, len(levels))).astype(np.float32)
  codes = np.asarray(fsq.quantize(jnp.asarray(z)))
  ref_codes, ref_index = numpy_fsq(z, levels)
  np.testing.assert_allclose(codes, ref_codes, atol=1e-6)
  index = np.asarray(fsq.codes_to_indices(codes))
  np.testing.assert_array_equal(index, ref_index)
  assert index.min() >= 0 and index.max() < fsq.codebook_size
  digits = np.round(codes * (np.array(levels) // 2) + np.array(levels) // 2)
  assert (digits >= 0).all() and (digits < np.array(levels)).all()
  # Every index <-> a distinct code, and back.
  all_codes = np.asarray(fsq.indices_to_codes(jnp.arange(fsq.codebook_size)))
  assert len(np.unique(all_codes, axis=0)) == fsq.codebook_size
  np.testing.assert_array_equal(np.asarray(fsq.codes_to_indices(all_codes)),
                                np.arange(fsq.codebook_size))
  assert np.abs(all_codes).max() <= 1.0


def test_fsq_straight_through_gradient():
  fsq = FSQ((8, 5, 4))
  z = jax.random.normal(jax.random.key(1), (64, 3)) * 2
  w = jax.random.normal(jax.random.key(2), (64, 3))
  grad = jax.jit(jax.grad(lambda z: jnp.sum(fsq.quantize(z) * w)))(z)
  scale = np.array([4.0, 2.0, 2.0])  # L // 2
  grad_no_round = jax.jit(jax.grad(lambda z: jnp.sum(fsq.bound(z) / scale * w)))(z)
  np.testing.assert_allclose(grad, grad_no_round, rtol=1e-6)
  # Rounding itself passes the cotangent through unchanged (identity Jacobian).
  bounded = fsq.bound(z)
  _, vjp = jax.vjp(lambda b: b + jax.lax.stop_gradient(jnp.round(b) - b), bounded)
  np.testing.assert_array_equal(vjp(w)[0], w)


# ----------------------------------------------------------------------------- image

def shapes_images(n, size=16, seed=0):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size]
  out = np.empty((n, size, size, 3), np.uint8)
  for k in range(n):
    img = np.full((size, size, 3), rng.integers(0, 256, 3), np.uint8)
    r = rng.uniform(2, size / 3)
    cy, cx = rng.uniform(r, size - r, 2)
    mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) if rng.random() < 0.5 else (
        (abs(yy - cy) <= r) & (abs(xx - cx) <= r))
    img[mask] = rng.integers(0, 256, 3)
    out[k] = img
  return out


IMAGE_CONFIG = image.ImageTokenizerConfig(image_size=16, downsample=4, levels=(4, 4, 3),
                                          channels=(8, 16, 16))


@pytest.fixture(scope="module")
def image_tokenizer():
  return image.train_image_tokenizer(shapes_images(256), steps=60, batch_size=16,
                                     learning_rate=3e-3, config=IMAGE_CONFIG)


def test_image_encode_shapes_and_ranges(image_tokenizer):
  images = shapes_images(5, seed=7)
  ids = image_tokenizer.encode_batch(images)
  assert ids.shape == (5, 16) and ids.dtype == np.int32
  assert image_tokenizer.tokens_per_image == 16 and image_tokenizer.vocab_size == 48
  assert ids.min() >= 0 and ids.max() < 48
  np.testing.assert_array_equal(image_tokenizer.encode(images[0]), ids[0])
  recon = image_tokenizer.decode(ids[0])
  assert recon.shape == (16, 16, 3) and recon.dtype == np.uint8
  with pytest.raises(ValueError, match="shape"):
    image_tokenizer.encode(np.zeros((32, 32, 3), np.uint8))
  with pytest.raises(ValueError, match="uint8"):
    image_tokenizer.encode(np.zeros((16, 16, 3), np.float32))
  with pytest.raises(ValueError, match="out of range"):
    image_tokenizer.decode(np.full(16, 48))


def test_image_training_reduces_loss_and_save_load(image_tokenizer, tmp_path):
  held_out = shapes_images(64, seed=99)
  untrained = image.ImageTokenizer(IMAGE_CONFIG, seed=0)  # the training's starting point
  assert image.reconstruction_loss(image_tokenizer, held_out) < 0.7 * image.reconstruction_loss(
      untrained, held_out)
  assert image.image_psnr(image_tokenizer, held_out) > 12.0
  image_tokenizer.save(str(tmp_path))
  loaded = load_tokenizer(str(tmp_path))
  assert isinstance(loaded, image.ImageTokenizer) and loaded.config == IMAGE_CONFIG
  np.testing.assert_array_equal(loaded.encode_batch(held_out), image_tokenizer.encode_batch(held_out))
  ids = image_tokenizer.encode_batch(held_out[:4])
  np.testing.assert_array_equal(loaded.decode_batch(ids), image_tokenizer.decode_batch(ids))


# ----------------------------------------------------------------------------- audio

AUDIO_CONFIG = audio.AudioTokenizerConfig(n_fft=256, hop=64, n_mels=24, frames_per_step=2,
                                          codes_per_step=2, levels=(4, 4), channels=16,
                                          griffin_lim_iterations=8)


def synthetic_audio(n, seconds=0.5, rate=16000, seed=0):
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * rate)) / rate
  waves = []
  for _ in range(n):
    f0, f1 = rng.uniform(150, 2000, 2)
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t ** 2 / (2 * seconds))  # linear chirp
    envelope = np.minimum(1.0, 10 * np.minimum(t, seconds - t))
    waves.append((0.5 * envelope * np.sin(phase)).astype(np.float32))
  return waves


@pytest.fixture(scope="module")
def audio_tokenizer():
  return audio.train_audio_tokenizer(synthetic_audio(24), steps=60, batch_size=8, crop_frames=32,
                                     learning_rate=3e-3, config=AUDIO_CONFIG)


def test_audio_encode_shapes_and_ranges(audio_tokenizer):
  wave = synthetic_audio(1, seconds=0.37, seed=5)[0]
  ids = audio_tokenizer.encode(wave)
  frames = 1 + len(wave) // AUDIO_CONFIG.hop
  assert ids.dtype == np.int32 and ids.shape == (-(-frames // 2) * 2,)
  assert ids.min() >= 0 and ids.max() < audio_tokenizer.vocab_size == 16
  assert audio_tokenizer.tokens_per_second == 16000 / 64 / 2 * 2
  mel = audio_tokenizer.decode_mel(ids)
  assert mel.shape == (len(ids), 24)  # codes_per_step == frames_per_step here
  out = audio_tokenizer.decode(ids)
  assert out.dtype == np.float32 and out.ndim == 1 and np.isfinite(out).all()
  # 22050 Hz input is resampled to the tokenizer's rate first.
  wave_22k = audio.resample(wave, 16000, 22050)
  assert abs(len(audio_tokenizer.encode(wave_22k, sample_rate=22050)) - len(ids)) <= 2
  with pytest.raises(ValueError, match="multiple of codes_per_step"):
    audio_tokenizer.decode_mel(ids[:3])


def test_audio_training_reduces_loss_and_save_load(audio_tokenizer, tmp_path):
  held_out = synthetic_audio(6, seed=42)
  mels = [audio_tokenizer.log_mel(w) for w in held_out]
  untrained = audio.AudioTokenizer(audio_tokenizer.config, seed=0)
  assert audio.reconstruction_loss(audio_tokenizer, mels) < 0.8 * audio.reconstruction_loss(
      untrained, mels)
  report = audio.audio_reconstruction_report(audio_tokenizer, held_out[:2])
  assert set(report) == {f"{k}_{m}" for k in ("tokens", "gl", "tokens_gl")
                         for m in ("mel_l1", "mcd_db")}
  assert all(np.isfinite(v) for v in report.values())
  audio_tokenizer.save(str(tmp_path))
  loaded = load_tokenizer(str(tmp_path))
  assert isinstance(loaded, audio.AudioTokenizer) and loaded.config == audio_tokenizer.config
  for w in held_out:
    np.testing.assert_array_equal(loaded.encode(w), audio_tokenizer.encode(w))


def test_stft_istft_round_trip_and_mel_filterbank():
  wave = synthetic_audio(1, seed=3)[0]
  np.testing.assert_allclose(audio.istft(audio.stft(wave, 512, 128), 512, 128, len(wave)), wave,
                             atol=1e-5)
  bank = audio.mel_filterbank(16000, 512, 40)
  assert bank.shape == (40, 257) and (bank >= 0).all() and (bank.sum(axis=1) > 0).all()
  peaks = bank.argmax(axis=1)
  assert (np.diff(peaks) >= 0).all()  # filters ordered by frequency


def test_griffin_lim_recovers_tone_frequency():
  rate, freq = 16000, 440.0
  t = np.arange(rate // 2) / rate
  tone = np.sin(2 * np.pi * freq * t).astype(np.float32)
  magnitude = np.abs(audio.stft(tone, 512, 128))
  out = audio.griffin_lim(magnitude, 512, 128, iterations=32, length=len(tone))
  spectrum = np.abs(np.fft.rfft(out * np.hanning(len(out))))
  peak = np.fft.rfftfreq(len(out), 1 / rate)[spectrum.argmax()]
  assert abs(peak - freq) < 5.0
  # Its magnitude spectrogram matches the target closely.
  rebuilt = np.abs(audio.stft(out, 512, 128))
  assert np.linalg.norm(rebuilt - magnitude) < 0.2 * np.linalg.norm(magnitude)


def test_wav_io_round_trip(tmp_path):
  wave = synthetic_audio(1, seed=1)[0]
  path = str(tmp_path / "x.wav")
  audio.write_wav(path, wave, 22050)
  back, rate = audio.read_wav(path)
  assert rate == 22050
  np.testing.assert_allclose(back, wave, atol=1e-4)


# ----------------------------------------------------------------------------- loading errors

def test_load_errors_name_the_path(tmp_path, text_tokenizer):
  missing = str(tmp_path / "nope")
  with pytest.raises(TokenizerLoadError, match="nope"):
    load_tokenizer(missing)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(TokenizerLoadError, match=r"empty/tokenizer\.json"):
    load_tokenizer(str(empty))
  (empty / "tokenizer.json").write_text("{not json")
  with pytest.raises(TokenizerLoadError, match="corrupt"):
    load_tokenizer(str(empty))
  (empty / "tokenizer.json").write_text(json.dumps({"kind": "mystery"}))
  with pytest.raises(TokenizerLoadError, match="unknown tokenizer kind 'mystery'"):
    load_tokenizer(str(empty))

  text_dir = tmp_path / "text"
  text_tokenizer.save(str(text_dir))
  (text_dir / text.MODEL_FILE).write_bytes(b"garbage")
  with pytest.raises(TokenizerLoadError, match="text.model"):
    load_tokenizer(str(text_dir))
  os.remove(text_dir / text.MODEL_FILE)
  with pytest.raises(TokenizerLoadError, match="text.model"):
    load_tokenizer(str(text_dir))


def test_load_errors_for_learned_tokenizers(tmp_path):
  config = image.ImageTokenizerConfig(image_size=8, downsample=2, levels=(3, 3), channels=(4, 4))
  tokenizer = image.ImageTokenizer(config)
  directory = tmp_path / "img"
  tokenizer.save(str(directory))
  params = directory / "params.npz"
  params.write_bytes(params.read_bytes()[:100])  # truncated
  with pytest.raises(TokenizerLoadError, match="params.npz"):
    load_tokenizer(str(directory))
  os.remove(params)
  with pytest.raises(TokenizerLoadError, match="params.npz"):
    load_tokenizer(str(directory))
  # Weights that do not fit the config.
  image.ImageTokenizer(dataclasses_replace(config, channels=(4, 8))).save(str(tmp_path / "other"))
  os.replace(tmp_path / "other" / "params.npz", params)
  with pytest.raises(TokenizerLoadError, match="shape"):
    load_tokenizer(str(directory))
  manifest = json.loads((directory / "tokenizer.json").read_text())
  manifest["config"]["downsample"] = 3
  (directory / "tokenizer.json").write_text(json.dumps(manifest))
  with pytest.raises(TokenizerLoadError, match="tokenizer.json"):
    load_tokenizer(str(directory))


def dataclasses_replace(config, **changes):
  import dataclasses
  return dataclasses.replace(config, **changes)


class ReversedChars(text.base.Tokenizer):
  """A stand-in for an external tokenizer: one id per byte, reversed order."""
  modality = vocab.TEXT
  vocab_size = 256

  def encode(self, x):
    return np.frombuffer(x.encode()[::-1], np.uint8).astype(np.int32)

  def decode(self, ids):
    return bytes(np.asarray(ids, np.uint8)[::-1]).decode()

  def save(self, directory):
    os.makedirs(directory, exist_ok=True)
    text.base.write_manifest(directory, f"{__name__}:ReversedChars", {})

  @classmethod
  def load(cls, directory):
    text.base.read_manifest(directory)
    return cls()


def test_external_tokenizer_plugs_in(tmp_path):
  ReversedChars().save(str(tmp_path))
  loaded = load_tokenizer(str(tmp_path))
  assert isinstance(loaded, ReversedChars) and loaded.decode(loaded.encode("abc")) == "abc"
  register_tokenizer("reversed", ReversedChars)
  text.base.write_manifest(str(tmp_path), "reversed", {})
  assert isinstance(load_tokenizer(str(tmp_path)), ReversedChars)
