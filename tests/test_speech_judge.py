"""The speech judge's clean reference speech (stored at prepare time) and its training from the
data dir alone: no espeak-ng, no network."""
import os
import socket
import subprocess

import numpy as np
import pytest

from tmdiff.data import sources
from tmdiff.data import speech_assets as sa

needs_espeak = pytest.mark.skipif(not sources.espeak_available(), reason="needs espeak-ng")
TINY = dict(steps=2, channels=16, n_layers=1, n_heads=2, batch_size=2, held_out=3)


def test_features_pool_frames_and_bands_and_quantise_within_half_a_step():
  rng = np.random.default_rng(0)
  mel = rng.uniform(-9, 2, (9, 6)).astype(np.float32)
  pooled = sa.features(mel)
  assert pooled.shape == (4, 3)   # the odd last frame is dropped
  for t in range(4):
    for b in range(3):
      assert pooled[t, b] == pytest.approx(mel[2 * t:2 * t + 2, 2 * b:2 * b + 2].mean(), abs=1e-6)
  step = (sa.LOG_HI - sa.LOG_LO) / 255
  back = sa._dequantise(sa._quantise(pooled))
  assert np.abs(back - pooled).max() <= step / 2 + 1e-6


@pytest.fixture(scope="module")
def speech_data(tmp_path_factory):
  """A tiny prepared dir (trained SentencePiece, untrained audio FSQ tokenizer) and the clean
  validation items prepare spoke, synthesised again here for reference."""
  if not sources.espeak_available():
    pytest.skip("needs espeak-ng")
  from tmdiff.data import prepare
  from tmdiff.data.tokenizers import audio, text
  root = tmp_path_factory.mktemp("speech")
  toks = root / "tokenizers"
  docs = [d["text"] for d in sources.text_documents("train")[:40]]
  text.train_text_tokenizer(docs, vocab_size=400).save(str(toks / "text"))
  os.makedirs(toks / "audio")
  audio.AudioTokenizer(audio.AudioTokenizerConfig()).save(str(toks / "audio"))
  data = root / "data"
  prepare.prepare(prepare.parse_args([
      f"--out={data}", f"--tokenizers={toks}", "--sources=text,audio_text",
      "--num_utterances=10", "--num_val_utterances=3", "--max_text_docs=40",
      "--max_seconds=2.0"]))
  validation = list(sources.spoken_sentences("validation", 3, seed=0, max_seconds=2.0))
  return str(data), validation


def _offline(monkeypatch):
  """No socket connects, no subprocess, espeak-ng off the PATH; returns the attempts made."""
  attempts = []

  def refuse(what):
    attempts.append(what)
    raise OSError(f"offline: {what}")
  monkeypatch.setattr(socket.socket, "connect", lambda self, address: refuse(f"connect {address}"))
  monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse("connection"))
  monkeypatch.setattr(subprocess, "Popen", lambda args, *a, **k: refuse(f"subprocess {args}"))
  monkeypatch.setenv("PATH", os.pathsep.join(
      d for d in os.environ.get("PATH", "").split(os.pathsep)
      if d and not os.path.exists(os.path.join(d, "espeak-ng"))))
  assert not sources.espeak_available()
  return attempts


def test_assets_hold_the_clean_validation_speech_prepare_spoke(speech_data):
  from tmdiff.data.tokenizers import load_prepared
  from tmdiff.eval import judges
  data, validation = speech_data
  audio_tok = load_prepared(data, ("audio",))["audio"]
  feats, transcripts, ids = sa.load_split(data, "validation", audio_tok)
  assert transcripts == [v["transcript"] for v in validation]
  assert ids == [m["id"] for _, m in judges.read_records(data, "audio_text", "validation")]
  step = (sa.LOG_HI - sa.LOG_LO) / 255
  for f, v in zip(feats, validation):
    mel = audio_tok.log_mel(v["audio"])
    reference = mel[:len(mel) // 2 * 2].reshape(-1, 2, 40, 2).mean((1, 3))
    np.testing.assert_allclose(f, np.clip(reference, sa.LOG_LO, sa.LOG_HI), atol=step / 2 + 1e-5)
  train_feats, train_texts, _ = sa.load_split(data, "train", audio_tok)
  assert len(train_feats) == 10 and not set(train_texts) & set(transcripts)
  size = sum(os.path.getsize(os.path.join(sa.asset_dir(data), f)) for f in sa.SPLIT_FILES.values())
  assert size < 13 * 4000   # under 4 KB per (<= 2 s) utterance


def test_speech_judge_trains_and_checks_itself_offline(speech_data, monkeypatch, tmp_path):
  from tmdiff.eval import judges
  data, validation = speech_data
  attempts = _offline(monkeypatch)
  judge = judges.load_or_train("speech", data, directory=str(tmp_path / "judge"), **TINY)
  sanity = judge.info["sanity"]
  assert sanity["held_out_utterances"] == 3 and sanity["tokenizer_utterances"] == 3
  assert sanity["clean"]["words"] == sum(len(v["transcript"].split()) for v in validation)
  assert sanity["tokenizer_waveform"]["words"] == sanity["clean"]["words"]
  again = judges.load_or_train("speech", data, directory=str(tmp_path / "judge"), **TINY)
  mel = np.random.default_rng(1).normal(-4, 1, (90, 80)).astype(np.float32)
  assert again.transcribe_features([mel], use_lexicon=False) == \
      judge.transcribe_features([mel], use_lexicon=False)
  assert attempts == []


def test_missing_assets_name_the_file_and_the_command_that_builds_them(speech_data, tmp_path,
                                                                      monkeypatch):
  import shutil

  from tmdiff.eval import judges
  data, _ = speech_data
  copy = tmp_path / "copy"
  shutil.copytree(data, copy, ignore=shutil.ignore_patterns("judges"))
  before = {f: np.load(os.path.join(sa.asset_dir(str(copy)), f))["frames"]
            for f in sa.SPLIT_FILES.values()}
  shutil.rmtree(sa.asset_dir(str(copy)))
  with monkeypatch.context() as m:
    _offline(m)
    with pytest.raises(judges.JudgeError) as e:
      judges.load_or_train("speech", str(copy), **TINY)
  message = str(e.value)
  assert "\n" not in message
  assert os.path.join(str(copy), "judge_assets", "speech", "info.json") in message
  assert f"python -m tmdiff.data.speech_assets --data_dir={copy}" in message
  sa.main([f"--data_dir={copy}"])   # the command the error names rebuilds the same assets
  for f, frames in before.items():
    np.testing.assert_array_equal(np.load(os.path.join(sa.asset_dir(str(copy)), f))["frames"],
                                  frames)
