"""Image judge: a CNN (Flax NNX) that reads procedural shape images cell by cell.

For each cell of the 3x3 grid (`sources.POSITIONS`) it predicts occupancy, shape, colour and
size, with one network shared by the cells reading each cell's window at full resolution. It
trains on fresh images from `sources.draw_image` (seeds disjoint from prepare's), each also
passed through the image tokenizer (encode -> decode; `reconstructed_fraction` of them) so that it
reads decoded samples as well as clean pixels, mirrored left-right at random (`flip`). A generated image matches its caption (GenEval-like) when
the predicted object count equals the caption's and every captioned object's cell is occupied
with the captioned shape and colour; size is scored alongside but not required.
Sanity figures: the same scores on held-out real images and on their tokenizer round trips.
"""
from __future__ import annotations

import dataclasses
import math
import re

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tmdiff.data import sources
from tmdiff.eval import judges as judges_lib

NAME = "image"
JUDGE_VERSION = 2  # the per-cell classifier (a cached judge of another version is retrained)
CELLS = list(sources.POSITIONS)          # cell index -> position name
SHAPES = list(sources.SHAPES)
COLOURS = list(sources.COLOURS)
SIZES = list(sources.SIZES)
HEADS = {"occupied": 2, "shape": len(SHAPES), "colour": len(COLOURS), "size": len(SIZES)}
DEFAULTS = dict(images=8000, held_out=400, steps=3000, batch_size=64, learning_rate=2e-3,
                channels=0, hidden=256, reconstructed_fraction=1.0, flip=True, seed=0)
TRAIN_STREAM, HELD_OUT_STREAM = 0x1D6E, 0x1D6F  # rng streams apart from prepare's images


def settings_dict(**overrides) -> dict:
  unknown = set(overrides) - set(DEFAULTS)
  if unknown:
    raise judges_lib.JudgeError(f"unknown image judge settings {sorted(unknown)}; "
                                f"known {sorted(DEFAULTS)}")
  return {**DEFAULTS, **overrides}


# --- captions and labels ---------------------------------------------------------------------
_OBJECT = re.compile(r"(small|large) (\w+) (\w+) (top left|top right|bottom left|bottom right|"
                     r"top|bottom|left|right|center)")


def parse_caption(caption: str) -> list[dict]:
  """Objects {size, colour, shape, position} of a `sources.caption_of` caption."""
  objects = [dict(size=m[0], colour=m[1], shape=m[2], position=m[3])
             for m in _OBJECT.findall(caption)]
  for o in objects:
    if o["shape"] not in SHAPES or o["colour"] not in COLOURS:
      raise judges_lib.JudgeError(f"caption {caption!r}: unknown shape or colour in {o}")
  if not objects:
    raise judges_lib.JudgeError(f"caption {caption!r} names no object this judge knows")
  return objects


def labels_of(objects: list[dict]) -> np.ndarray:
  """[9, 4] int32 per cell: occupied, shape, colour, size (attributes 0 where empty)."""
  out = np.zeros((len(CELLS), 4), np.int32)
  for o in objects:
    c = CELLS.index(o["position"])
    out[c] = (1, SHAPES.index(o["shape"]), COLOURS.index(o["colour"]), SIZES.index(o["size"]))
  return out


def match(objects: list[dict], predicted: np.ndarray) -> dict[str, float]:
  """Per-attribute agreement of one image's predicted cells [9, 4] with captioned objects.

  position: the object's cell is occupied; shape / colour / size: occupied with that value;
  count: as many occupied cells as objects; all: count and every object's shape and colour."""
  hits = {"position": 0, "shape": 0, "colour": 0, "size": 0}
  for o in objects:
    occ, shape, colour, size = predicted[CELLS.index(o["position"])]
    if occ:
      hits["position"] += 1
      hits["shape"] += int(SHAPES[shape] == o["shape"])
      hits["colour"] += int(COLOURS[colour] == o["colour"])
      hits["size"] += int(SIZES[size] == o["size"])
  n = len(objects)
  count_ok = int(predicted[:, 0].sum()) == n
  out = {k: v / n for k, v in hits.items()}
  out["count"] = float(count_ok)
  out["all"] = float(count_ok and hits["shape"] == n and hits["colour"] == n)
  return out


def mean_scores(per_image: list[dict]) -> dict[str, float]:
  keys = ("all", "position", "shape", "colour", "size", "count")
  return {k: round(float(np.mean([m[k] for m in per_image])), 4) for k in keys} if per_image \
      else {}


# --- the model -------------------------------------------------------------------------------
CROP_MARGIN = 1  # pixels of context around each cell (objects lie inside their cell)


def cell_windows(size: int) -> tuple[list[int], int]:
  """Top-left offsets (rows = cols) of the 3 cell windows in an image padded by CROP_MARGIN on
  each side, and the window side: ceil(size / 3) + 2 * CROP_MARGIN."""
  cell = size / 3.0
  side = math.ceil(cell) + 2 * CROP_MARGIN
  starts = [min(int(math.floor(k * cell)), size + 2 * CROP_MARGIN - side) for k in range(3)]
  return starts, side


class CellClassifier(nnx.Module):
  """[B, S, S, 3] uint8 -> logits per cell and head: {head: [B, 9, classes]}.

  One network, shared by the cells, reads each cell's window at full resolution: an optional
  3x3 convolution of `channels` (0: none), then two dense layers of `hidden`. A cell's answer
  depends on its own pixels only, and every image gives nine training examples."""

  def __init__(self, size: int, channels: int, hidden: int, rngs: nnx.Rngs):
    self.starts, self.side = cell_windows(size)
    self.conv = nnx.Conv(3, channels, (3, 3), rngs=rngs) if channels else None
    flat = self.side ** 2 * (channels or 3)
    self.hidden1 = nnx.Linear(flat, hidden, rngs=rngs)
    self.hidden2 = nnx.Linear(hidden, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, sum(HEADS.values()), rngs=rngs)

  def crops(self, x):
    """[B, S, S, C] -> [B * 9, side, side, C], cells in row-major order."""
    m, k = CROP_MARGIN, self.side
    x = jnp.pad(x, ((0, 0), (m, m), (m, m), (0, 0)), mode="edge")
    cells = [x[:, r:r + k, c:c + k] for r in self.starts for c in self.starts]
    return jnp.stack(cells, axis=1).reshape(-1, k, k, x.shape[-1])

  def __call__(self, images):
    b = images.shape[0]
    x = self.crops(jnp.asarray(images, jnp.float32) / 127.5 - 1.0)
    if self.conv is not None:
      x = nnx.silu(self.conv(x))
    x = nnx.silu(self.hidden1(x.reshape(x.shape[0], -1)))
    x = nnx.silu(self.hidden2(x))
    logits = self.out(x).reshape(b, len(CELLS), -1)
    out, start = {}, 0
    for head, n in HEADS.items():
      out[head] = logits[..., start:start + n]
      start += n
    return out


def _loss(model, images, labels):
  logits = model(images)
  occupied = labels[..., 0].astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits["occupied"], labels[..., 0]).mean()
  for i, head in enumerate(("shape", "colour", "size"), start=1):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[head], labels[..., i])
    loss += (ce * occupied).sum() / jnp.maximum(occupied.sum(), 1.0)
  return loss


@nnx.jit
def _predict(model, images):
  logits = model(images)
  return jnp.stack([jnp.argmax(logits[h], -1) for h in HEADS], axis=-1)


@dataclasses.dataclass
class ImageJudge:
  model: CellClassifier
  image_size: int
  info: dict

  def save(self, directory: str) -> None:
    judges_lib.save_judge(directory, self.model, self.info)

  def predict(self, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """[N, S, S, 3] uint8 -> [N, 9, 4] int32 (occupied, shape, colour, size per cell)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
      raise judges_lib.JudgeError(f"image judge wants [N, {self.image_size}, {self.image_size}, 3]"
                                  f" images, got {images.shape}")
    out = []
    for i in range(0, len(images), batch_size):
      part = images[i:i + batch_size]
      padded = np.pad(part, ((0, batch_size - len(part)), (0, 0), (0, 0), (0, 0)))
      out.append(np.asarray(_predict(self.model, padded))[:len(part)])
    return np.concatenate(out).astype(np.int32) if out else np.zeros((0, 9, 4), np.int32)

  def score(self, images: np.ndarray, captions: list) -> dict:
    """Mean per-attribute agreement of images with their captions (str or object lists)."""
    objects = [parse_caption(c) if isinstance(c, str) else c for c in captions]
    predicted = self.predict(images)
    per_image = [match(o, p) for o, p in zip(objects, predicted)]
    return {**mean_scores(per_image), "images": len(per_image), "per_image_all":
            [m["all"] for m in per_image]}


def fresh_images(stream: int, num: int, seed: int, size: int):
  """`num` procedural images with their objects, from an rng stream apart from prepare's."""
  spec = sources.ImageSpec(size=size)
  items = [sources.draw_image(np.random.default_rng([seed, stream, i]), spec) for i in range(num)]
  return np.stack([x[0] for x in items]), [x[2]["objects"] for x in items]


def mirror(images: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Images [B, S, S, 3] mirrored left-right and their cell labels [B, 9, 4] to match: every
  shape is symmetric about its vertical axis, so a mirrored image is another valid drawing."""
  cells = labels.reshape(-1, 3, 3, labels.shape[-1])[:, :, ::-1]
  return images[:, :, ::-1], cells.reshape(labels.shape)


def _build(size: int, s: dict) -> CellClassifier:
  from tmdiff.data.tokenizers import _nn
  return _nn.build(lambda: CellClassifier(size, s["channels"], s["hidden"], nnx.Rngs(0)),
                   s["seed"])


def _round_trip(tokenizer, images: np.ndarray) -> np.ndarray:
  return tokenizer.decode_batch(tokenizer.encode_batch(images))


def train(data_dir: str, **overrides) -> ImageJudge:
  from tmdiff.data import records, tokenizers
  from tmdiff.data.tokenizers import _nn
  s = settings_dict(**overrides)
  size = int(records.Manifest.load(data_dir).extra.get("image_size", 32))
  tokenizer = tokenizers.load_prepared(data_dir, ("image",)).get("image")
  judges_lib.log(NAME, f"drawing {s['images']} training images ({size}x{size})")
  images, objects = fresh_images(TRAIN_STREAM, s["images"], s["seed"], size)
  labels = np.stack([labels_of(o) for o in objects])
  pool, pool_labels = images, labels
  if tokenizer is not None and s["reconstructed_fraction"] > 0:
    n_rec = int(round(len(images) * s["reconstructed_fraction"]))
    judges_lib.log(NAME, f"adding {n_rec} of them passed through the image tokenizer")
    pool = np.concatenate([images, _round_trip(tokenizer, images[:n_rec])])
    pool_labels = np.concatenate([labels, labels[:n_rec]])
  model = _build(size, s)

  def sample_batch(rng):
    idx = rng.integers(0, len(pool), s["batch_size"])
    batch, batch_labels = pool[idx], pool_labels[idx]
    if s["flip"]:
      flip = rng.random(len(idx)) < 0.5
      mirrored, mirrored_labels = mirror(batch, batch_labels)
      batch = np.where(flip[:, None, None, None], mirrored, batch)
      batch_labels = np.where(flip[:, None, None], mirrored_labels, batch_labels)
    return {"images": batch, "labels": batch_labels}
  _nn.fit(model, lambda m, b: _loss(m, b["images"], b["labels"]), sample_batch, s["steps"],
          s["learning_rate"], s["seed"], "judge image")
  judge = ImageJudge(model, size, {"settings": s, "image_size": size})
  held_images, held_objects = fresh_images(HELD_OUT_STREAM, s["held_out"], s["seed"], size)
  sanity = {"held_out_images": len(held_images),
            "real": _without_lists(judge.score(held_images, held_objects)),
            "chance_all": round(chance_all(held_objects), 6)}
  if tokenizer is not None:
    sanity["tokenizer_round_trip"] = _without_lists(
        judge.score(_round_trip(tokenizer, held_images), held_objects))
  judge.info["sanity"] = sanity
  return judge


def _without_lists(scores: dict) -> dict:
  return {k: v for k, v in scores.items() if not isinstance(v, list)}


def chance_all(objects_per_image: list[list[dict]]) -> float:
  """Probability that uniform guessing per cell (occupancy 1/2, shape 1/4, colour 1/8) scores
  `all` on these images: the n captioned cells occupied and the 9 - n others empty (2^-9),
  and each captioned object's shape and colour right."""
  p = [0.5 ** len(CELLS) * (1 / len(SHAPES) / len(COLOURS)) ** len(o) for o in objects_per_image]
  return float(np.mean(p))


def load(directory: str, info: dict) -> ImageJudge:
  model = _build(int(info["image_size"]), info["settings"])
  judges_lib.load_params_into(model, directory)
  return ImageJudge(model, int(info["image_size"]), info)
