"""Image tokenizer: a small convolutional autoencoder with an FSQ bottleneck (Flax NNX).

An HxWx3 uint8 image becomes an (H/f)x(W/f) grid of codebook ids (row-major), f = downsample;
the codebook is the FSQ product grid, prod(levels) ids. Defaults: 32x32 -> 8x8 = 64 tokens of
a 1000-entry codebook (levels 8,5,5,5).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import struct
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tmdiff.data import vocab
from tmdiff.data.tokenizers import _nn, base
from tmdiff.data.tokenizers.fsq import FSQ

KIND = "fsq_image"


@dataclasses.dataclass(frozen=True)
class ImageTokenizerConfig:
  image_size: int = 32
  downsample: int = 4          # power of two; tokens per side = image_size / downsample
  levels: tuple[int, ...] = (8, 5, 5, 5)
  channels: tuple[int, ...] = (16, 32, 64)  # one per resolution, full res first

  def __post_init__(self):
    stages = int(round(math.log2(self.downsample)))
    if 2 ** stages != self.downsample or stages < 1:
      raise ValueError(f"downsample must be a power of two >= 2, got {self.downsample}")
    if len(self.channels) != stages + 1:
      raise ValueError(f"channels needs {stages + 1} entries for downsample {self.downsample}, "
                       f"got {self.channels}")
    if self.image_size % self.downsample:
      raise ValueError(f"image_size {self.image_size} is not divisible by {self.downsample}")
    object.__setattr__(self, "levels", tuple(int(l) for l in self.levels))
    object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))

  @property
  def grid(self) -> int:
    return self.image_size // self.downsample

  @property
  def tokens_per_image(self) -> int:
    return self.grid ** 2


class ResBlock(nnx.Module):
  def __init__(self, channels: int, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(channels, channels, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(channels, channels, (3, 3), rngs=rngs)

  def __call__(self, x):
    return x + self.conv2(nnx.silu(self.conv1(nnx.silu(x))))


class ImageAutoencoder(nnx.Module):
  """Encoder: pixels in [-1, 1] -> latents [B, g, g, len(levels)]; decoder: codes -> pixels."""

  def __init__(self, config: ImageTokenizerConfig, rngs: nnx.Rngs):
    ch, dim = config.channels, len(config.levels)
    self.enc_in = nnx.Conv(3, ch[0], (3, 3), rngs=rngs)
    self.enc_down = nnx.List([nnx.Conv(ch[i], ch[i + 1], (4, 4), strides=2, rngs=rngs)
                              for i in range(len(ch) - 1)])
    self.enc_res = ResBlock(ch[-1], rngs)
    self.enc_out = nnx.Conv(ch[-1], dim, (1, 1), rngs=rngs)
    self.dec_in = nnx.Conv(dim, ch[-1], (3, 3), rngs=rngs)
    self.dec_res = ResBlock(ch[-1], rngs)
    self.dec_up = nnx.List([nnx.Conv(ch[i + 1], ch[i], (3, 3), rngs=rngs)
                            for i in reversed(range(len(ch) - 1))])
    self.dec_out = nnx.Conv(ch[0], 3, (3, 3), rngs=rngs)

  def encode(self, x):
    h = self.enc_in(x)
    for conv in self.enc_down:
      h = conv(nnx.silu(h))
    return self.enc_out(nnx.silu(self.enc_res(h)))

  def decode(self, codes):
    h = self.dec_res(self.dec_in(codes))
    for conv in self.dec_up:
      h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
      h = conv(nnx.silu(h))
    return self.dec_out(nnx.silu(h))


def write_png(path: str, image: np.ndarray) -> None:
  """HxWx3 uint8 -> an 8-bit RGB PNG (zlib + struct; no imaging library needed)."""
  image = np.ascontiguousarray(image, np.uint8)
  if image.ndim != 3 or image.shape[2] != 3:
    raise ValueError(f"write_png wants HxWx3 uint8, got shape {image.shape}")
  height, width, _ = image.shape
  raw = b"".join(b"\x00" + image[y].tobytes() for y in range(height))  # filter type 0 per row

  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
  header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def image_grid(images: np.ndarray, scale: int = 1, gap: int = 2) -> np.ndarray:
  """[N, H, W, 3] -> one image, ceil(sqrt(N)) columns, white gaps, nearest upscaling."""
  images = np.repeat(np.repeat(images, scale, axis=1), scale, axis=2)
  n, h, w, _ = images.shape
  cols = int(np.ceil(np.sqrt(n)))
  rows = -(-n // cols)
  grid = np.full((rows * h + (rows - 1) * gap, cols * w + (cols - 1) * gap, 3), 255, np.uint8)
  for i, img in enumerate(images):
    r, c = divmod(i, cols)
    grid[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = img
  return grid


def _to_unit(images) -> jax.Array:
  return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def _to_uint8(x) -> np.ndarray:
  return np.asarray(jnp.round((jnp.clip(x, -1, 1) + 1) * 127.5)).astype(np.uint8)


def _reconstruction_loss(model: ImageAutoencoder, fsq: FSQ, batch: dict):
  x = _to_unit(batch["images"])
  recon = model.decode(fsq.quantize(model.encode(x)))
  return jnp.mean((recon - x) ** 2)


@functools.lru_cache(maxsize=8)
def _compiled(config: ImageTokenizerConfig):
  """Jitted encode / decode / loss shared by every tokenizer of this config (one compile each)."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: ImageAutoencoder(config, nnx.Rngs(0))))
  fsq = FSQ(config.levels)

  @jax.jit
  def encode_fn(state, images):
    model = nnx.merge(graphdef, state)
    return fsq.codes_to_indices(fsq.quantize(model.encode(_to_unit(images))))

  @jax.jit
  def decode_fn(state, ids):
    return nnx.merge(graphdef, state).decode(fsq.indices_to_codes(ids))

  @jax.jit
  def loss_fn(state, images):
    return _reconstruction_loss(nnx.merge(graphdef, state), fsq, {"images": images})

  return encode_fn, decode_fn, loss_fn


def _padded_call(fn, state, batch: np.ndarray) -> np.ndarray:
  """fn(state, batch) with the batch padded to a power of two: few shapes, few compiles."""
  n = len(batch)
  padded = np.concatenate([batch, np.repeat(batch[-1:], (1 << (n - 1).bit_length()) - n, axis=0)])
  return np.asarray(fn(state, padded))[:n]


class ImageTokenizer(_nn.NeuralTokenizerIO, base.Tokenizer):
  modality = vocab.IMAGE
  kind = KIND
  config_class = ImageTokenizerConfig

  def __init__(self, config: ImageTokenizerConfig, seed: int = 0):
    self.config = config
    self.fsq = FSQ(config.levels)
    self.model = _nn.build(lambda: ImageAutoencoder(config, nnx.Rngs(0)), seed)
    self._encode_fn, self._decode_fn, self._loss_fn = _compiled(config)

  @property
  def vocab_size(self) -> int:
    return self.fsq.codebook_size

  @property
  def tokens_per_image(self) -> int:
    return self.config.tokens_per_image

  def _check_images(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    size = self.config.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3):
      raise ValueError(f"expected images of shape [N, {size}, {size}, 3] (or one {size}x{size}x3), "
                       f"got {images.shape}")
    if images.dtype != np.uint8:
      raise ValueError(f"expected uint8 images, got {images.dtype}")
    return images

  def encode_batch(self, images: np.ndarray, chunk: int = 256) -> np.ndarray:
    """[N, H, W, 3] uint8 -> [N, tokens_per_image] int32."""
    images = self._check_images(images)
    state = nnx.state(self.model)
    out = [_padded_call(self._encode_fn, state, images[i:i + chunk])
           for i in range(0, len(images), chunk)]
    out = np.concatenate(out) if out else np.zeros((0, self.config.grid, self.config.grid), np.int32)
    return out.reshape(len(images), -1).astype(np.int32)

  def decode_batch(self, ids: np.ndarray, chunk: int = 256) -> np.ndarray:
    """[N, tokens_per_image] ids -> [N, H, W, 3] uint8."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] != self.tokens_per_image:
      raise ValueError(f"expected ids of shape [N, {self.tokens_per_image}], got {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f"image id out of range [0, {self.vocab_size}): {ids.min()}..{ids.max()}")
    grid = ids.reshape(-1, self.config.grid, self.config.grid).astype(np.int32)
    state = nnx.state(self.model)
    out = [_to_uint8(_padded_call(self._decode_fn, state, grid[i:i + chunk]))
           for i in range(0, len(grid), chunk)]
    size = self.config.image_size
    return np.concatenate(out) if out else np.zeros((0, size, size, 3), np.uint8)

  def encode(self, x: np.ndarray) -> np.ndarray:
    return self.encode_batch(np.asarray(x)[None])[0]

  def decode(self, ids: np.ndarray) -> np.ndarray:
    return self.decode_batch(np.asarray(ids).reshape(1, -1))[0]


def reconstruction_loss(tokenizer: ImageTokenizer, images: np.ndarray) -> float:
  """Mean squared error (pixels scaled to [-1, 1]) of the round trip through the FSQ bottleneck."""
  images = tokenizer._check_images(images)
  return float(tokenizer._loss_fn(nnx.state(tokenizer.model), images))


def image_psnr(tokenizer: ImageTokenizer, images: np.ndarray) -> float:
  """Mean per-image PSNR (dB, peak 255) of images -> tokens -> uint8 images."""
  images = tokenizer._check_images(images)
  recon = tokenizer.decode_batch(tokenizer.encode_batch(images))
  mse = np.mean((recon.astype(np.float64) - images) ** 2, axis=(1, 2, 3))
  return float(np.mean(10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))))


def train_image_tokenizer(images: np.ndarray, steps: int = 1200, batch_size: int = 32,
                          learning_rate: float = 4e-3, seed: int = 0,
                          config: ImageTokenizerConfig | None = None,
                          log_every: int = 0) -> ImageTokenizer:
  """Trains an FSQ autoencoder on [N, H, W, 3] uint8 images (MSE loss); returns the tokenizer.

  Random horizontal flips augment the batches. Deterministic given `seed` (on one backend).
  """
  images = np.asarray(images)
  if images.ndim != 4 or len(images) == 0:
    raise ValueError(f"expected a non-empty [N, H, W, 3] uint8 image array, got shape {images.shape}")
  config = config or ImageTokenizerConfig(image_size=images.shape[1])
  tokenizer = ImageTokenizer(config, seed=seed)
  images = tokenizer._check_images(images)

  def sample_batch(rng: np.random.Generator) -> dict:
    batch = images[rng.integers(0, len(images), batch_size)]
    flip = rng.random(batch_size) < 0.5
    return {"images": np.where(flip[:, None, None, None], batch[:, :, ::-1], batch)}

  def loss_fn(model, batch):
    return _reconstruction_loss(model, tokenizer.fsq, batch)

  start = time.time()
  tokenizer.train_losses = _nn.fit(tokenizer.model, loss_fn, sample_batch, steps, learning_rate,
                                   seed, "image tokenizer", log_every)
  tokenizer.train_seconds = time.time() - start
  return tokenizer
