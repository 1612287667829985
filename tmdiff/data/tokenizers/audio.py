"""Speech tokenizer: FSQ over log-mel frames (Flax NNX), with Griffin-Lim back to a waveform.

waveform (16 kHz) -> log-mel [T, n_mels] (numpy STFT) -> 1-D conv encoder that merges
`frames_per_step` frames into one step carrying `codes_per_step` FSQ codes -> ids, flattened
step-major. Decoding: ids -> conv decoder -> log-mel -> linear magnitude (pseudo-inverse of the
mel filterbank) -> Griffin-Lim phase. Defaults: hop 256 at 16 kHz (62.5 frames/s), 4 frames per
step, 2 codes per step -> 31.25 tokens per second, codebook 1000.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
import wave as wave_lib

import jax
import jax.numpy as jnp
import numpy as np
import scipy.fft
import scipy.signal
from flax import nnx

from tmdiff.data import vocab
from tmdiff.data.tokenizers import _nn, base
from tmdiff.data.tokenizers.fsq import FSQ

KIND = "fsq_audio"
SAMPLE_RATE = 16000
LOG_FLOOR = 1e-4  # magnitude floor before the log (about -80 dB below full scale)


# ----------------------------------------------------------------------------- signal helpers

def read_wav(path: str) -> tuple[np.ndarray, int]:
  """Reads a PCM WAV file -> (mono float32 in [-1, 1], sample rate)."""
  with wave_lib.open(path, "rb") as f:
    rate, channels, width = f.getframerate(), f.getnchannels(), f.getsampwidth()
    raw = f.readframes(f.getnframes())
  if width == 2:
    data = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
  elif width == 4:
    data = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648.0
  elif width == 1:
    data = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
  else:
    raise ValueError(f"unsupported WAV sample width {width} bytes in {path}")
  return data.reshape(-1, channels).mean(axis=1).astype(np.float32), rate


def write_wav(path: str, waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> None:
  pcm = np.round(np.clip(waveform, -1, 1) * 32767).astype("<i2")
  with wave_lib.open(path, "wb") as f:
    f.setnchannels(1)
    f.setsampwidth(2)
    f.setframerate(sample_rate)
    f.writeframes(pcm.tobytes())


def resample(waveform: np.ndarray, from_rate: int, to_rate: int = SAMPLE_RATE) -> np.ndarray:
  """Polyphase resampling (e.g. espeak-ng's 22050 Hz -> 16 kHz)."""
  waveform = np.asarray(waveform, np.float32)
  if from_rate == to_rate:
    return waveform
  g = math.gcd(int(from_rate), int(to_rate))
  return scipy.signal.resample_poly(waveform, to_rate // g, from_rate // g).astype(np.float32)


def _window(n_fft: int) -> np.ndarray:
  return scipy.signal.get_window("hann", n_fft).astype(np.float32)  # periodic Hann


def stft(waveform: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
  """Centred STFT (reflect padding) -> complex [1 + len // hop, n_fft // 2 + 1]."""
  x = np.asarray(waveform, np.float32)
  pad = n_fft // 2
  x = np.pad(x, pad, mode="reflect" if len(x) > pad else "constant")
  n_frames = 1 + (len(x) - n_fft) // hop
  frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop][:n_frames]
  return np.fft.rfft(frames * _window(n_fft), axis=-1)


def istft(spec: np.ndarray, n_fft: int, hop: int, length: int | None = None) -> np.ndarray:
  """Inverse of `stft` by windowed overlap-add (least-squares, Griffin & Lim 1984)."""
  frames = np.fft.irfft(spec, n=n_fft, axis=-1) * _window(n_fft)
  n_frames = frames.shape[0]
  total = n_fft + hop * (n_frames - 1)
  out = np.zeros(total, np.float64)
  norm = np.zeros(total, np.float64)
  win_sq = _window(n_fft).astype(np.float64) ** 2
  for i in range(n_frames):
    out[i * hop:i * hop + n_fft] += frames[i]
    norm[i * hop:i * hop + n_fft] += win_sq
  out = out / np.where(norm > 1e-8, norm, 1.0)
  out = out[n_fft // 2:]
  length = hop * (n_frames - 1) if length is None else length
  return np.pad(out[:length], (0, max(0, length - len(out)))).astype(np.float32)


def griffin_lim(magnitude: np.ndarray, n_fft: int, hop: int, iterations: int = 32,
                momentum: float = 0.99, length: int | None = None, seed: int = 0) -> np.ndarray:
  """Waveform whose STFT magnitude approximates `magnitude` [T, n_fft // 2 + 1].

  Fast Griffin-Lim (Perraudin et al. 2013): alternate projections with momentum.
  """
  rng = np.random.default_rng(seed)
  angles = np.exp(2j * np.pi * rng.random(magnitude.shape))
  rebuilt = np.zeros_like(angles)
  length = hop * (magnitude.shape[0] - 1) if length is None else length
  for _ in range(iterations):
    previous = rebuilt
    rebuilt = stft(istft(magnitude * angles, n_fft, hop, length), n_fft, hop)
    angles = rebuilt - (momentum / (1 + momentum)) * previous
    angles = angles / (np.abs(angles) + 1e-8)
  return istft(magnitude * angles, n_fft, hop, length)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                   fmax: float | None = None) -> np.ndarray:
  """Triangular filters on the HTK mel scale, area-normalised: [n_mels, n_fft // 2 + 1]."""
  fmax = sample_rate / 2 if fmax is None else fmax
  to_mel = lambda f: 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)
  to_hz = lambda m: 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)
  edges = to_hz(np.linspace(to_mel(fmin), to_mel(fmax), n_mels + 2))
  freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
  lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
  rising = (freqs - lower) / (centre - lower)
  falling = (upper - freqs) / (upper - centre)
  bank = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (upper - lower))
  return bank.astype(np.float32)


# ----------------------------------------------------------------------------- model

@dataclasses.dataclass(frozen=True)
class AudioTokenizerConfig:
  sample_rate: int = SAMPLE_RATE
  n_fft: int = 1024
  hop: int = 256
  n_mels: int = 80
  frames_per_step: int = 4     # mel frames merged into one token step
  codes_per_step: int = 2      # FSQ codes (tokens) per step
  levels: tuple[int, ...] = (8, 5, 5, 5)
  channels: int = 128
  mel_mean: float = 0.0        # log-mel normalisation, fitted on the training data
  mel_std: float = 1.0
  griffin_lim_iterations: int = 32

  def __post_init__(self):
    object.__setattr__(self, "levels", tuple(int(l) for l in self.levels))
    if self.frames_per_step < 1 or self.codes_per_step < 1:
      raise ValueError("frames_per_step and codes_per_step must be >= 1")

  @property
  def tokens_per_second(self) -> float:
    return self.sample_rate / self.hop / self.frames_per_step * self.codes_per_step


class ResBlock1D(nnx.Module):
  def __init__(self, channels: int, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(channels, channels, (3,), rngs=rngs)
    self.conv2 = nnx.Conv(channels, channels, (3,), rngs=rngs)

  def __call__(self, x):
    return x + self.conv2(nnx.silu(self.conv1(nnx.silu(x))))


class MelAutoencoder(nnx.Module):
  """Normalised log-mel [B, T, n_mels] <-> latents [B, T / F, codes_per_step * len(levels)]."""

  def __init__(self, config: AudioTokenizerConfig, rngs: nnx.Rngs):
    c, f, latent = config.channels, config.frames_per_step, config.codes_per_step * len(config.levels)
    self.frames_per_step = f
    self.enc_in = nnx.Conv(config.n_mels, c, (3,), rngs=rngs)
    self.enc_down = nnx.Conv(c, c, (f,), strides=f, padding="VALID", rngs=rngs)
    self.enc_res = nnx.List([ResBlock1D(c, rngs) for _ in range(2)])
    self.enc_out = nnx.Conv(c, latent, (1,), rngs=rngs)
    self.dec_in = nnx.Conv(latent, c, (3,), rngs=rngs)
    self.dec_res = nnx.List([ResBlock1D(c, rngs) for _ in range(2)])
    self.dec_up = nnx.Conv(c, c, (3,), rngs=rngs)
    self.dec_out = nnx.Conv(c, config.n_mels, (3,), rngs=rngs)

  def encode(self, mel):
    h = self.enc_down(nnx.silu(self.enc_in(mel)))
    for block in self.enc_res:
      h = block(h)
    return self.enc_out(nnx.silu(h))

  def decode(self, codes):
    h = self.dec_in(codes)
    for block in self.dec_res:
      h = block(h)
    h = jnp.repeat(h, self.frames_per_step, axis=1)
    return self.dec_out(nnx.silu(self.dec_up(nnx.silu(h))))


def _reconstruction_loss(model: MelAutoencoder, fsq: FSQ, codes_per_step: int, mel):
  latents = model.encode(mel)
  shape = latents.shape
  codes = fsq.quantize(latents.reshape(shape[0], shape[1], codes_per_step, -1)).reshape(shape)
  return jnp.mean(jnp.abs(model.decode(codes) - mel))


@functools.lru_cache(maxsize=8)
def _compiled(config: AudioTokenizerConfig):
  """Jitted encode / decode / loss shared by every tokenizer of this config (one compile each)."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: MelAutoencoder(config, nnx.Rngs(0))))
  fsq, cps = FSQ(config.levels), config.codes_per_step

  @jax.jit
  def encode_fn(state, mel):
    latents = nnx.merge(graphdef, state).encode(mel)
    return fsq.codes_to_indices(
        fsq.quantize(latents.reshape(latents.shape[0], latents.shape[1], cps, -1)))

  @jax.jit
  def decode_fn(state, ids):
    codes = fsq.indices_to_codes(ids)
    return nnx.merge(graphdef, state).decode(codes.reshape(ids.shape[0], ids.shape[1], -1))

  @jax.jit
  def loss_fn(state, mel):
    return _reconstruction_loss(nnx.merge(graphdef, state), fsq, cps, mel)

  return encode_fn, decode_fn, loss_fn


class AudioTokenizer(_nn.NeuralTokenizerIO, base.Tokenizer):
  modality = vocab.AUDIO
  kind = KIND
  config_class = AudioTokenizerConfig

  def __init__(self, config: AudioTokenizerConfig, seed: int = 0):
    self.config = config
    self.fsq = FSQ(config.levels)
    self.model = _nn.build(lambda: MelAutoencoder(config, nnx.Rngs(0)), seed)
    self.filterbank = mel_filterbank(config.sample_rate, config.n_fft, config.n_mels)
    self._inverse_filterbank = np.linalg.pinv(self.filterbank)
    self._encode_fn, self._decode_fn, self._loss_fn = _compiled(config)

  @property
  def vocab_size(self) -> int:
    return self.fsq.codebook_size

  @property
  def tokens_per_second(self) -> float:
    return self.config.tokens_per_second

  def log_mel(self, waveform: np.ndarray) -> np.ndarray:
    """[T, n_mels] natural-log mel magnitudes, T = 1 + len // hop."""
    magnitude = np.abs(stft(waveform, self.config.n_fft, self.config.hop))
    return np.log(np.maximum(magnitude @ self.filterbank.T, LOG_FLOOR)).astype(np.float32)

  def mel_to_waveform(self, log_mel: np.ndarray, length: int | None = None) -> np.ndarray:
    """Log-mel -> linear magnitude via the filterbank pseudo-inverse -> Griffin-Lim."""
    magnitude = np.maximum(np.exp(log_mel) @ self._inverse_filterbank.T, 0.0)
    return griffin_lim(magnitude, self.config.n_fft, self.config.hop,
                       self.config.griffin_lim_iterations, length=length)

  def _bucket_steps(self, steps: int) -> int:
    return max(16, -(-steps // 16) * 16)  # fewer distinct shapes to compile

  def encode_mel(self, log_mel: np.ndarray) -> np.ndarray:
    c = self.config
    frames = log_mel.shape[0]
    steps = -(-frames // c.frames_per_step)
    padded_frames = self._bucket_steps(steps) * c.frames_per_step
    mel = np.full((padded_frames, c.n_mels), np.log(LOG_FLOOR), np.float32)  # pad with silence
    mel[:frames] = log_mel
    mel = (mel - c.mel_mean) / c.mel_std
    ids = np.asarray(self._encode_fn(nnx.state(self.model), mel[None]))[0, :steps]
    return ids.reshape(-1).astype(np.int32)

  def encode(self, x: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """1-D float waveform (resampled if `sample_rate` differs) -> int32 ids, step-major."""
    waveform = np.asarray(x, np.float32)
    if waveform.ndim != 1 or waveform.size == 0:
      raise ValueError(f"expected a non-empty 1-D waveform, got shape {waveform.shape}")
    return self.encode_mel(self.log_mel(resample(waveform, sample_rate, self.config.sample_rate)))

  def decode_mel(self, ids: np.ndarray) -> np.ndarray:
    """ids -> decoded log-mel [steps * frames_per_step, n_mels]."""
    c = self.config
    ids = np.asarray(ids).reshape(-1)
    if ids.size % c.codes_per_step:
      raise ValueError(f"audio id count {ids.size} is not a multiple of codes_per_step "
                       f"{c.codes_per_step}")
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f"audio id out of range [0, {self.vocab_size}): {ids.min()}..{ids.max()}")
    steps = ids.size // c.codes_per_step
    if steps == 0:
      return np.zeros((0, c.n_mels), np.float32)
    grid = ids.reshape(steps, c.codes_per_step).astype(np.int32)
    grid = np.pad(grid, ((0, self._bucket_steps(steps) - steps), (0, 0)), mode="edge")
    mel = np.asarray(self._decode_fn(nnx.state(self.model), grid[None]))[0]
    return (mel[:steps * c.frames_per_step] * c.mel_std + c.mel_mean).astype(np.float32)

  def decode(self, ids: np.ndarray) -> np.ndarray:
    """ids -> float32 waveform at config.sample_rate (Griffin-Lim)."""
    mel = self.decode_mel(ids)
    return self.mel_to_waveform(mel, length=max(0, mel.shape[0] - 1) * self.config.hop)


# ----------------------------------------------------------------------------- training, metrics

def reconstruction_loss(tokenizer: AudioTokenizer, log_mels: list[np.ndarray]) -> float:
  """Mean L1 of normalised log-mel through the FSQ bottleneck (the training loss)."""
  c = tokenizer.config
  losses = []
  for mel in log_mels:
    frames = mel.shape[0] // c.frames_per_step * c.frames_per_step
    x = (mel[None, :frames] - c.mel_mean) / c.mel_std
    losses.append(float(tokenizer._loss_fn(nnx.state(tokenizer.model), x)))
  return float(np.mean(losses))


def train_audio_tokenizer(waveforms: list[np.ndarray], steps: int = 1500, batch_size: int = 32,
                          crop_frames: int = 128, learning_rate: float = 4e-3, seed: int = 0,
                          config: AudioTokenizerConfig | None = None,
                          sample_rate: int = SAMPLE_RATE, log_every: int = 0) -> AudioTokenizer:
  """Trains the mel FSQ autoencoder (L1 on normalised log-mel) on random crops of the waveforms."""
  config = config or AudioTokenizerConfig()
  if not len(waveforms):
    raise ValueError("no waveforms to train the audio tokenizer on")
  analysis = AudioTokenizer(config, seed=seed)
  mels = [analysis.log_mel(resample(w, sample_rate, config.sample_rate)) for w in waveforms]
  frames = np.concatenate(mels)  # utterances back to back; crops may straddle a boundary
  config = dataclasses.replace(config, mel_mean=float(frames.mean()), mel_std=float(frames.std()))
  tokenizer = AudioTokenizer(config, seed=seed)
  crop_frames = -(-crop_frames // config.frames_per_step) * config.frames_per_step
  if len(frames) < crop_frames:
    frames = np.pad(frames, ((0, crop_frames - len(frames)), (0, 0)), constant_values=np.log(LOG_FLOOR))
  normalised = (frames - config.mel_mean) / config.mel_std

  def sample_batch(rng: np.random.Generator):
    starts = rng.integers(0, len(normalised) - crop_frames + 1, batch_size)
    return normalised[starts[:, None] + np.arange(crop_frames)]

  def loss_fn(model, mel):
    return _reconstruction_loss(model, tokenizer.fsq, config.codes_per_step, mel)

  start = time.time()
  tokenizer.train_losses = _nn.fit(tokenizer.model, loss_fn, sample_batch, steps, learning_rate,
                                   seed, "audio tokenizer", log_every)
  tokenizer.train_seconds = time.time() - start
  return tokenizer


def mel_cepstral_distortion(log_mel_a: np.ndarray, log_mel_b: np.ndarray, n_coeffs: int = 13) -> float:
  """MCD-style distance in dB between two log-mel sequences (mean over frames).

  Cepstra c_d of the natural-log mel magnitudes, scaled so log S(w) = c_0 + 2 sum_d c_d cos(d w)
  (DCT-II / 2N), coefficients 1..n-1 (c_0, the level, excluded); then the usual
  (10 / ln 10) * sqrt(2 * sum_d (c_d - c'_d)^2). It comes from our 80-band mel, not from SPTK
  mel-cepstra, so compare it with itself rather than with published MCDs.
  """
  frames = min(len(log_mel_a), len(log_mel_b))
  cepstra = lambda m: scipy.fft.dct(m[:frames], type=2, axis=-1)[:, 1:n_coeffs] / (2 * m.shape[-1])
  ca, cb = cepstra(log_mel_a), cepstra(log_mel_b)
  return float(np.mean(10.0 / np.log(10.0) * np.sqrt(2.0 * np.sum((ca - cb) ** 2, axis=-1))))


def _active_frames(log_mel: np.ndarray, range_db: float = 60.0) -> np.ndarray:
  energy = np.log(np.sum(np.exp(2 * log_mel), axis=-1))  # natural log of mel power
  active = energy >= energy.max() - range_db / (10 / np.log(10))
  return active if active.any() else np.ones_like(active)


def audio_reconstruction_report(tokenizer: AudioTokenizer, waveforms: list[np.ndarray],
                                sample_rate: int = SAMPLE_RATE,
                                griffin_lim: bool = True) -> dict[str, float]:
  """Distances on held-out speech, averaged over utterances.

  tokens_mel_l1 / tokens_mcd_db: original log-mel vs the log-mel decoded from the tokens.
  gl_mel_l1: log-mel of Griffin-Lim(original mel) vs original (the vocoder alone).
  tokens_gl_mel_l1 / tokens_gl_mcd_db: log-mel of the full round trip wave -> ids -> wave.
  L1 is in natural-log units of mel magnitude; MCD in dB (see mel_cepstral_distortion).
  Only active frames count (energy within 60 dB of the utterance's loudest frame), so the
  silence around espeak-ng utterances does not dominate.
  """
  results: dict[str, list[float]] = {}

  def add(key, original, other, active):
    results.setdefault(key + "_mel_l1", []).append(float(np.mean(np.abs(other - original)[active])))
    results.setdefault(key + "_mcd_db", []).append(
        mel_cepstral_distortion(original[active], other[active]))

  for w in waveforms:
    w = resample(w, sample_rate, tokenizer.config.sample_rate)
    original = tokenizer.log_mel(w)
    frames = len(original)
    active = _active_frames(original)
    decoded = tokenizer.decode_mel(tokenizer.encode(w))[:frames]
    add("tokens", original, decoded, active)
    if griffin_lim:
      vocoded = tokenizer.log_mel(tokenizer.mel_to_waveform(original, length=len(w)))[:frames]
      add("gl", original, vocoded, active)
      round_trip = tokenizer.log_mel(tokenizer.mel_to_waveform(decoded, length=len(w)))[:frames]
      add("tokens_gl", original, round_trip, active)
  return {k: float(np.mean(v)) for k, v in results.items()}
