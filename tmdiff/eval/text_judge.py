"""Text judge: a small causal transformer (Flax NNX) over the text tokenizer's local ids.

Trained on windows of the train split's documents laid end to end as `<bos> doc <eos> ...`;
scores a sequence as `<bos> ids` (no `<eos>` predicted). Generative perplexity =
exp(total NLL / total tokens) over the samples. Sanity figures: its perplexity on validation
documents (truncated to its context) next to a unigram model's (add-one smoothed, fitted on
the train split). Train or load it with `tmdiff.eval.judges.load_or_train("text", data_dir)`.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tmdiff.eval import judges as judges_lib

NAME = "text"
DEFAULTS = dict(d_model=128, n_layers=2, n_heads=4, context=128, steps=1500, batch_size=32,
                learning_rate=3e-3, seed=0)


def settings_dict(**overrides) -> dict:
  unknown = set(overrides) - set(DEFAULTS)
  if unknown:
    raise judges_lib.JudgeError(f"unknown text judge settings {sorted(unknown)}; "
                                f"known {sorted(DEFAULTS)}")
  return {**DEFAULTS, **overrides}


def rms_norm(x, eps: float = 1e-6):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


class CausalBlock(nnx.Module):
  def __init__(self, d: int, heads: int, rngs: nnx.Rngs):
    self.heads = heads
    self.qkv = nnx.Linear(d, 3 * d, rngs=rngs)
    self.proj = nnx.Linear(d, d, rngs=rngs)
    self.up = nnx.Linear(d, 4 * d, rngs=rngs)
    self.down = nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x):
    b, t, d = x.shape
    q, k, v = jnp.split(self.qkv(rms_norm(x)), 3, axis=-1)
    split = lambda z: z.reshape(b, t, self.heads, d // self.heads)
    scores = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / math.sqrt(d // self.heads)
    causal = jnp.tril(jnp.ones((t, t), bool))
    weights = jax.nn.softmax(jnp.where(causal, scores, -1e30), axis=-1)
    x = x + self.proj(jnp.einsum("bhqk,bkhd->bqhd", weights, split(v)).reshape(b, t, d))
    return x + self.down(jax.nn.gelu(self.up(rms_norm(x))))


class CausalLM(nnx.Module):
  """ids [B, T] (text ids, then <bos> = vocab, <eos> = vocab + 1) -> logits [B, T, vocab + 2]."""

  def __init__(self, vocab: int, d: int, layers: int, heads: int, context: int,
               rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab + 2, d, rngs=rngs)
    self.position = nnx.Embed(context, d, rngs=rngs)
    self.blocks = nnx.List([CausalBlock(d, heads, rngs) for _ in range(layers)])
    self.out = nnx.Linear(d, vocab + 2, rngs=rngs)

  def __call__(self, ids):
    x = self.embed(ids) + self.position(jnp.arange(ids.shape[1]))[None]
    for block in self.blocks:
      x = block(x)
    return self.out(rms_norm(x))


def _token_nll(model, ids, weights):
  """Per-sequence summed NLL of ids[:, 1:] given the prefix, weighted by weights[:, 1:]."""
  logits = model(ids[:, :-1])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:])
  return (nll * weights[:, 1:]).sum(-1)


@dataclasses.dataclass
class TextJudge:
  model: CausalLM
  vocab: int
  info: dict

  @property
  def context(self) -> int:
    return int(self.info["settings"]["context"])

  def save(self, directory: str) -> None:
    judges_lib.save_judge(directory, self.model, self.info)

  def _windows(self, sequences: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """`<bos> ids` cut into windows of `context` (each later window restarts with <bos>)."""
    bos, ctx = self.vocab, self.context
    rows, weights = [], []
    for seq in sequences:
      seq = np.asarray(seq, np.int64)
      if seq.size and (seq.min() < 0 or seq.max() >= self.vocab):
        raise judges_lib.JudgeError(f"text ids outside [0, {self.vocab}): {seq.min()}..{seq.max()}")
      for start in range(0, max(len(seq), 1), ctx - 1):
        piece = seq[start:start + ctx - 1]
        if piece.size == 0:
          continue
        row = np.zeros(ctx, np.int32)
        row[0], row[1:1 + len(piece)] = bos, piece
        w = np.zeros(ctx, np.float32)
        w[1:1 + len(piece)] = 1.0
        rows.append(row)
        weights.append(w)
    return np.array(rows, np.int32).reshape(-1, ctx), np.array(weights, np.float32).reshape(-1, ctx)

  def nll(self, sequences: list[np.ndarray], batch_size: int = 64) -> tuple[float, int]:
    """(total NLL in nats, scored tokens) of sequences of local text ids."""
    rows, weights = self._windows(sequences)
    total = 0.0
    for i in range(0, len(rows), batch_size):
      r, w = rows[i:i + batch_size], weights[i:i + batch_size]
      pad = batch_size - len(r)  # one compiled shape
      r = np.pad(r, ((0, pad), (0, 0)))
      w = np.pad(w, ((0, pad), (0, 0)))
      total += float(np.asarray(_score(self.model, r, w), np.float64).sum())
    return total, int(weights.sum())

  def perplexity(self, sequences: list[np.ndarray]) -> float:
    total, count = self.nll(sequences)
    return float(math.exp(total / count)) if count else float("nan")


@nnx.jit
def _score(model, ids, weights):
  return _token_nll(model, ids, weights)


def unigram_entropy_bits(ids: np.ndarray) -> float:
  """Entropy (bits) of the empirical token distribution of one sequence."""
  ids = np.asarray(ids).reshape(-1)
  if ids.size == 0:
    return 0.0
  p = np.unique(ids, return_counts=True)[1] / ids.size
  return float(-(p * np.log2(p)).sum())


def unigram_perplexity(train: list[np.ndarray], held_out: list[np.ndarray], vocab: int) -> float:
  """Perplexity of an add-one smoothed unigram model of `train` on `held_out`."""
  counts = np.bincount(np.concatenate(train), minlength=vocab).astype(np.float64) + 1.0
  log_p = np.log(counts / counts.sum())
  ids = np.concatenate(held_out)
  return float(np.exp(-log_p[ids].mean()))


def _documents(data_dir: str, split: str, limit: int | None = None) -> list[np.ndarray]:
  return [a["text"].astype(np.int64) for a, _ in
          judges_lib.read_records(data_dir, "text", split, limit)]


def _build(vocab: int, s: dict) -> CausalLM:
  from tmdiff.data.tokenizers import _nn
  return _nn.build(lambda: CausalLM(vocab, s["d_model"], s["n_layers"], s["n_heads"],
                                    s["context"], nnx.Rngs(0)), s["seed"])


def train(data_dir: str, **overrides) -> TextJudge:
  from tmdiff.data import records
  from tmdiff.data.tokenizers import _nn
  s = settings_dict(**overrides)
  vocab = int(records.Manifest.load(data_dir).vocab["text_size"])
  docs = _documents(data_dir, "train")
  if not docs:
    raise judges_lib.JudgeError(f"{data_dir}: the text train split is empty")
  bos, eos = vocab, vocab + 1
  stream = np.concatenate([np.concatenate([[bos], d, [eos]]) for d in docs]).astype(np.int32)
  ctx = s["context"]
  if len(stream) <= ctx + 1:
    stream = np.tile(stream, (ctx + 2) // len(stream) + 1)
  judges_lib.log(NAME, f"training on {len(docs)} documents ({len(stream)} tokens), "
                       f"{s['steps']} steps")
  model = _build(vocab, s)

  def sample_batch(rng):
    starts = rng.integers(0, len(stream) - ctx, s["batch_size"])
    ids = stream[starts[:, None] + np.arange(ctx + 1)]
    return {"ids": ids, "weights": np.ones(ids.shape, np.float32)}

  def loss_fn(m, batch):
    return _token_nll(m, batch["ids"], batch["weights"]).sum() / (
        batch["weights"][:, 1:].sum())
  _nn.fit(model, loss_fn, sample_batch, s["steps"], s["learning_rate"], s["seed"],
          "judge text")
  judge = TextJudge(model, vocab, {"settings": s, "vocab": vocab})
  val = _documents(data_dir, "validation", 200)
  judge.info["sanity"] = {
      "validation_perplexity": round(judge.perplexity(val), 3),
      "validation_unigram_perplexity": round(unigram_perplexity(docs, val, vocab + 2), 3),
      "validation_documents": len(val)}
  return judge


def load(directory: str, info: dict) -> TextJudge:
  s = info["settings"]
  vocab = int(info["vocab"])
  model = _build(vocab, s)
  judges_lib.load_params_into(model, directory)
  return TextJudge(model, vocab, info)
