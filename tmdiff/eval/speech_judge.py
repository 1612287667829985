"""Speech judge: a CTC character recogniser (Flax NNX) on log-mel frames, plus a lexicon.

Input: the audio tokenizer's log-mel frames ([T, n_mels], 62.5 frames/s by default), pooled
as the stored speech judge assets are (tmdiff.data.speech_assets.features: 2 frames x 2 bands)
and normalised per utterance and band. Model: two 1-D convolutions, a bidirectional
transformer, and per-step logits over blank + 28 characters (space, a-z, apostrophe); greedy
CTC decoding. Each decoded word that is not in the lexicon (words of the prepared text train
split) is replaced by the nearest lexicon word by edit distance when that is within a third
of its length (ties: the more frequent word).

Training data (train split only, all read from the data dir: no espeak-ng, no network): the
clean speech that prepare stored under judge_assets/speech/, and the prepared audio records,
their tokens decoded back to log-mel by the audio tokenizer (the domain generated audio comes
from), with random band and time masking. Sanity figures: WER on the stored clean validation
utterances, clean, through the tokenizer to log-mel (their validation records' tokens), and
through the tokenizer to a waveform (Griffin-Lim).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tmdiff.data import speech_assets
from tmdiff.eval import judges as judges_lib
from tmdiff.eval.text_judge import rms_norm

NAME = "speech"
ALPHABET = " abcdefghijklmnopqrstuvwxyz'"   # id = index + 1; 0 = CTC blank
BLANK = 0
LEXICON_FILE = "lexicon.json"
FRAME_BUCKET = 64  # frames are padded to a multiple of this (fewer compiled shapes)
DEFAULTS = dict(clean_utterances=12_000, tokenized_utterances=12_000, held_out=300,
                steps=2500, batch_size=16, learning_rate=2e-3, channels=128, n_layers=2,
                n_heads=4, band_masks=1, band_width=6, time_masks=1, time_width=4, seed=0)


def settings_dict(**overrides) -> dict:
  unknown = set(overrides) - set(DEFAULTS)
  if unknown:
    raise judges_lib.JudgeError(f"unknown speech judge settings {sorted(unknown)}; "
                                f"known {sorted(DEFAULTS)}")
  return {**DEFAULTS, **overrides}


# --- text ------------------------------------------------------------------------------------
def normalize_words(text: str) -> list[str]:
  """Lower-case words of letters and apostrophes (punctuation and digits dropped)."""
  return [w for w in re.sub(r"[^a-z' ]", " ", text.lower()).split() if w.strip("'")]


def edit_distance(a, b) -> int:
  """Levenshtein distance between two sequences (substitution, insertion, deletion cost 1)."""
  row = list(range(len(b) + 1))
  for i, x in enumerate(a, 1):
    previous, row[0] = row[0], i
    for j, y in enumerate(b, 1):
      previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (x != y))
  return row[-1]


def word_error_rate(references: list[str], hypotheses: list[str]) -> dict:
  """Corpus WER: total word edit distance / total reference words (normalised words)."""
  if len(references) != len(hypotheses):
    raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
  errors = words = 0
  for ref, hyp in zip(references, hypotheses):
    r = normalize_words(ref)
    errors += edit_distance(r, normalize_words(hyp))
    words += len(r)
  return {"wer": errors / max(words, 1), "errors": errors, "words": words}


def encode_chars(text: str) -> np.ndarray:
  return np.array([ALPHABET.index(ch) + 1 for ch in " ".join(normalize_words(text))], np.int32)


def ctc_greedy(ids: np.ndarray) -> str:
  """Best path: merge repeats, drop blanks."""
  out, last = [], BLANK
  for i in ids:
    if i != last and i != BLANK:
      out.append(ALPHABET[i - 1])
    last = i
  return " ".join("".join(out).split())


class Lexicon:
  """Word list with counts; `correct` snaps a word to its nearest entry (vectorised DP)."""

  def __init__(self, counts: dict[str, int]):
    self.counts = dict(counts)
    self.words = sorted(self.counts, key=lambda w: (-self.counts[w], w))
    self.lengths = np.array([len(w) for w in self.words])
    width = max(self.lengths, default=1)
    self.chars = np.full((len(self.words), width), -1, np.int32)
    for i, w in enumerate(self.words):
      self.chars[i, :len(w)] = [ord(c) for c in w]

  def correct(self, word: str) -> str:
    if word in self.counts or not self.words:
      return word
    near = np.abs(self.lengths - len(word)) <= max(1, len(word) // 3)
    if not near.any():
      return word
    chars, lengths = self.chars[near], self.lengths[near]
    n, width = chars.shape
    # dist[:, j] = edit distance between word[:i] and candidate[:j], all candidates at once.
    dist = np.tile(np.arange(width + 1), (n, 1))
    for i, ch in enumerate(word, 1):
      new = np.empty_like(dist)
      new[:, 0] = i
      sub = dist[:, :-1] + (chars != ord(ch))
      for j in range(1, width + 1):
        new[:, j] = np.minimum(np.minimum(dist[:, j] + 1, new[:, j - 1] + 1), sub[:, j - 1])
      dist = new
    best = dist[np.arange(n), lengths]
    k = int(np.argmin(best))  # candidates are in frequency order: ties go to the commoner word
    return self.words[np.flatnonzero(near)[k]] if best[k] <= max(1, len(word) // 3) else word

  def correct_text(self, text: str) -> str:
    return " ".join(self.correct(w) for w in text.split())


# --- features and model ----------------------------------------------------------------------
def normalize_features(pooled: np.ndarray) -> np.ndarray:
  """Per-utterance, per-band mean / std normalisation of pooled log-mel [T, bands]."""
  pooled = np.asarray(pooled, np.float32)
  return (pooled - pooled.mean(0)) / (pooled.std(0) + 1e-3)


def judge_features(log_mel: np.ndarray) -> np.ndarray:
  """The tokenizer's log-mel [T, n_mels] -> the recogniser's input (pooled, normalised)."""
  return normalize_features(speech_assets.features(log_mel))


def _sinusoids(length: int, dim: int) -> jnp.ndarray:
  position = jnp.arange(length)[:, None]
  freq = jnp.exp(-math.log(10_000.0) * jnp.arange(0, dim, 2) / dim)[None]
  return jnp.concatenate([jnp.sin(position * freq), jnp.cos(position * freq)], -1)


class EncoderBlock(nnx.Module):
  def __init__(self, d: int, heads: int, rngs: nnx.Rngs):
    self.heads = heads
    self.qkv = nnx.Linear(d, 3 * d, rngs=rngs)
    self.proj = nnx.Linear(d, d, rngs=rngs)
    self.up = nnx.Linear(d, 2 * d, rngs=rngs)
    self.down = nnx.Linear(2 * d, d, rngs=rngs)

  def __call__(self, x, valid):
    b, t, d = x.shape
    q, k, v = jnp.split(self.qkv(rms_norm(x)), 3, -1)
    split = lambda z: z.reshape(b, t, self.heads, d // self.heads)
    scores = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / math.sqrt(d // self.heads)
    scores = jnp.where(valid[:, None, None, :], scores, -1e30)
    att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, -1), split(v)).reshape(b, t, d)
    x = x + self.proj(att)
    return x + self.down(jax.nn.gelu(self.up(rms_norm(x))))


class CTCRecogniser(nnx.Module):
  """features [B, T, bands], valid [B, T] -> logits [B, T, 1 + len(ALPHABET)]."""

  def __init__(self, n_mels: int, channels: int, layers: int, heads: int, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(n_mels, channels, (5,), rngs=rngs)
    self.conv2 = nnx.Conv(channels, channels, (5,), rngs=rngs)
    self.blocks = nnx.List([EncoderBlock(channels, heads, rngs) for _ in range(layers)])
    self.out = nnx.Linear(channels, 1 + len(ALPHABET), rngs=rngs)

  def __call__(self, features, valid):
    x = nnx.silu(self.conv1(features))
    x = nnx.silu(self.conv2(x)) + _sinusoids(x.shape[1], x.shape[2])[None]
    for block in self.blocks:
      x = block(x, valid)
    return self.out(rms_norm(x)), valid


def _ctc_loss(model, features, valid, labels, label_valid):
  logits, steps_valid = model(features, valid)
  loss = optax.ctc_loss(logits, 1.0 - steps_valid.astype(jnp.float32), labels,
                        1.0 - label_valid.astype(jnp.float32), blank_id=BLANK)
  return (loss / jnp.maximum(label_valid.sum(-1), 1)).mean()


@nnx.jit
def _best_path(model, features, valid):
  logits, steps_valid = model(features, valid)
  return jnp.where(steps_valid, jnp.argmax(logits, -1), BLANK)


def _pad_batch(features: list[np.ndarray], frames: int | None = None):
  frames = frames or max(FRAME_BUCKET, -(-max(len(f) for f in features) // FRAME_BUCKET)
                         * FRAME_BUCKET)
  n_mels = features[0].shape[1]
  out = np.zeros((len(features), frames, n_mels), np.float32)
  valid = np.zeros((len(features), frames), bool)
  for i, f in enumerate(features):
    f = f[:frames]
    out[i, :len(f)] = f
    valid[i, :len(f)] = True
  return out, valid


@dataclasses.dataclass
class SpeechJudge:
  model: CTCRecogniser
  lexicon: Lexicon
  info: dict

  def save(self, directory: str) -> None:
    judges_lib.save_judge(directory, self.model, self.info)
    with open(os.path.join(directory, LEXICON_FILE), "w") as f:
      json.dump(self.lexicon.counts, f)

  def transcribe_features(self, log_mels: list[np.ndarray], batch_size: int = 32,
                          use_lexicon: bool = True) -> list[str]:
    """Transcripts of log-mel [T, n_mels] arrays (the audio tokenizer's log_mel space)."""
    out = []
    for i in range(0, len(log_mels), batch_size):
      part = [judge_features(m) for m in log_mels[i:i + batch_size]]
      part += [part[0]] * (batch_size - len(part))   # one compiled batch size per length
      feats, valid = _pad_batch(part)
      best = np.asarray(_best_path(self.model, feats, valid))
      out += [ctc_greedy(row) for row in best[:min(batch_size, len(log_mels) - i)]]
    return [self.lexicon.correct_text(t) for t in out] if use_lexicon else out

  def wer(self, log_mels: list[np.ndarray], references: list[str]) -> dict:
    return wer_report(self.transcribe_features(log_mels), references)

  def transcribe_pooled(self, pooled: list[np.ndarray], **kwargs) -> list[str]:
    """Transcripts of already pooled log-mel (the stored assets' features)."""
    return self.transcribe_features([_unpool(p) for p in pooled], **kwargs)


def _unpool(pooled: np.ndarray) -> np.ndarray:
  """Pooled [T, B] -> [T * TIME_POOL, B * BAND_POOL] that features() maps back to `pooled`."""
  return np.repeat(np.repeat(np.asarray(pooled, np.float32), speech_assets.TIME_POOL, 0),
                   speech_assets.BAND_POOL, 1)


def wer_report(hyps: list[str], references: list[str]) -> dict:
  return {**word_error_rate(references, hyps),
          "character_error_rate": character_error_rate(references, hyps)}


def character_error_rate(references, hypotheses) -> float:
  errors = sum(edit_distance(" ".join(normalize_words(r)), " ".join(normalize_words(h)))
               for r, h in zip(references, hypotheses))
  return errors / max(1, sum(len(" ".join(normalize_words(r))) for r in references))


def _lexicon(data_dir: str, text_tokenizer) -> Lexicon:
  counts = collections.Counter()
  for arrays, _ in judges_lib.read_records(data_dir, "text", "train"):
    counts.update(normalize_words(text_tokenizer.decode(arrays["text"])))
  return Lexicon(counts)


def _build(bands: int, s: dict) -> CTCRecogniser:
  from tmdiff.data.tokenizers import _nn
  return _nn.build(lambda: CTCRecogniser(bands, s["channels"], s["n_layers"], s["n_heads"],
                                         nnx.Rngs(0)), s["seed"])


def _clean_split(data_dir: str, split: str, audio_tok):
  """(pooled features, transcripts, ids) of the stored clean speech of `split`."""
  try:
    return speech_assets.load_split(data_dir, split, audio_tok)
  except speech_assets.AssetError as e:
    raise judges_lib.JudgeError(str(e)) from None


def _spec_augment(f: np.ndarray, rng: np.random.Generator, s: dict) -> np.ndarray:
  """Zeroes `band_masks` blocks of < band_width bands and `time_masks` of < time_width steps."""
  f = f.copy()
  for _ in range(s["band_masks"]):
    b0, bw = rng.integers(0, f.shape[1]), rng.integers(0, s["band_width"] + 1)
    f[:, b0:b0 + bw] = 0.0
  for _ in range(s["time_masks"]):
    t0, tw = rng.integers(0, len(f)), rng.integers(0, s["time_width"] + 1)
    f[t0:t0 + tw] = 0.0
  return f


def train(data_dir: str, **overrides) -> SpeechJudge:
  from tmdiff.data import tokenizers
  from tmdiff.data.tokenizers import _nn
  s = settings_dict(**overrides)
  toks = tokenizers.load_prepared(data_dir, ("text", "audio"))
  if "audio" not in toks or "text" not in toks:
    raise judges_lib.JudgeError(f"{data_dir}: the speech judge needs the text and audio "
                                "tokenizers of the prepared data")
  audio_tok = toks["audio"]
  clean, clean_texts, _ = _clean_split(data_dir, "train", audio_tok)
  held, refs, held_ids = _clean_split(data_dir, "validation", audio_tok)
  feats, texts = list(clean[:s["clean_utterances"]]), list(clean_texts[:s["clean_utterances"]])
  judges_lib.log(NAME, "decoding the prepared audio train records to log-mel")
  records = judges_lib.read_records(data_dir, "audio_text", "train", s["tokenized_utterances"])
  for arrays, meta in records:
    feats.append(speech_assets.features(audio_tok.decode_mel(arrays["audio"])))
    texts.append(meta["transcript"])
  labels = [encode_chars(t) for t in texts]
  keep = [i for i, (f, l) in enumerate(zip(feats, labels)) if 0 < len(l) < len(f) - 1]
  feats = [normalize_features(feats[i]) for i in keep]
  labels = [labels[i] for i in keep]
  if not feats:
    raise judges_lib.JudgeError(f"{data_dir}: no usable speech to train the speech judge on")
  frames = max(FRAME_BUCKET, -(-max(len(f) for f in feats) // FRAME_BUCKET) * FRAME_BUCKET)
  max_label = max(len(l) for l in labels)
  judges_lib.log(NAME, f"training on {len(feats)} utterances ({min(len(clean), s['clean_utterances'])}"
                       f" clean, {len(records)} through the tokenizer), {s['steps']} steps")
  bands = feats[0].shape[1]
  model = _build(bands, s)

  def sample_batch(rng):
    idx = rng.integers(0, len(feats), s["batch_size"])
    x, valid = _pad_batch([_spec_augment(feats[i], rng, s) for i in idx], frames)
    lab = np.zeros((len(idx), max_label), np.int32)
    lab_valid = np.zeros((len(idx), max_label), bool)
    for row, i in enumerate(idx):
      lab[row, :len(labels[i])] = labels[i]
      lab_valid[row, :len(labels[i])] = True
    return {"features": x, "valid": valid, "labels": lab, "label_valid": lab_valid}
  _nn.fit(model, lambda m, b: _ctc_loss(m, b["features"], b["valid"], b["labels"],
                                        b["label_valid"]),
          sample_batch, s["steps"], s["learning_rate"], s["seed"], "judge speech")
  judge = SpeechJudge(model, _lexicon(data_dir, toks["text"]),
                      {"settings": s, "bands": int(bands)})
  judge.info["sanity"] = sanity(judge, data_dir, audio_tok, held[:s["held_out"]],
                                refs[:s["held_out"]], held_ids[:s["held_out"]])
  return judge


def sanity(judge: SpeechJudge, data_dir: str, audio_tok, held, refs, ids) -> dict:
  """WER on clean held-out speech, and on the same utterances through the tokenizer (their
  validation records' tokens) to log-mel and to a waveform."""
  judges_lib.log(NAME, f"held-out check on {len(held)} clean validation utterances")
  tokens = {meta["id"]: arrays["audio"]
            for arrays, meta in judges_lib.read_records(data_dir, "audio_text", "validation")}
  paired = [(r, tokens[i]) for r, i in zip(refs, ids) if i in tokens]
  via_refs = [r for r, _ in paired]
  via_tokens = [audio_tok.decode_mel(t) for _, t in paired]
  via_wave = [audio_tok.log_mel(audio_tok.decode(t)) for _, t in paired]
  hyps = judge.transcribe_pooled(held)
  return {
      "held_out_utterances": len(held),
      "clean": _rounded(wer_report(hyps, refs)),
      "clean_without_lexicon": round(word_error_rate(
          refs, judge.transcribe_pooled(held, use_lexicon=False))["wer"], 4),
      "tokenizer_utterances": len(paired),
      "tokenizer_log_mel": _rounded(judge.wer(via_tokens, via_refs)),
      "tokenizer_waveform": _rounded(judge.wer(via_wave, via_refs)),
      "examples": [{"reference": r, "clean": h} for r, h in zip(refs[:3], hyps[:3])]}


def _rounded(d: dict) -> dict:
  return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


def load(directory: str, info: dict) -> SpeechJudge:
  if "bands" not in info:
    raise judges_lib.JudgeError(f"{directory} holds a speech judge of an older format; "
                                "retrain it (python -m tmdiff.eval.judges --only=speech --retrain)")
  model = _build(int(info["bands"]), info["settings"])
  judges_lib.load_params_into(model, directory)
  path = os.path.join(directory, LEXICON_FILE)
  if not os.path.isfile(path):
    raise judges_lib.JudgeError(f"speech judge lexicon missing: {path}")
  with open(path) as f:
    return SpeechJudge(model, Lexicon(json.load(f)), info)
