"""Embedded raw sources: determinism, splits, checkable captions, speech."""
import numpy as np
import pytest

from tmdiff.data import sources


def test_images_are_deterministic_and_captions_match_attributes():
  a = list(sources.captioned_images("train", 20, seed=1))
  b = list(sources.captioned_images("train", 20, seed=1))
  v = list(sources.captioned_images("validation", 20, seed=1))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
  assert all(not np.array_equal(x["image"], y["image"]) for x, y in zip(a, v))
  for item in a:
    img, attrs = item["image"], item["attributes"]
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert 1 <= attrs["count"] <= 3 == max(3, attrs["count"])
    assert sources.caption_of(attrs["objects"]) == item["caption"]
    for o in attrs["objects"]:
      # The object's colour is present at its centre.
      cy, cx = (int(round(c)) for c in o["center"])
      assert tuple(img[cy, cx]) == sources.COLOURS[o["colour"]], (item["caption"], o)
      assert o["position"] in item["caption"] and o["shape"] in item["caption"]


def test_image_size_is_configurable():
  item = next(sources.captioned_images("train", 1, spec=sources.ImageSpec(size=64)))
  assert item["image"].shape == (64, 64, 3)


def test_text_documents_split_and_deterministic():
  train = sources.text_documents("train", seed=0)
  val = sources.text_documents("validation", seed=0)
  assert len(train) > 1000 and len(val) > 10
  assert not {d["id"] for d in train} & {d["id"] for d in val}
  assert sources.text_documents("validation", seed=0) == val
  assert all(d["text"].strip() for d in train[:100])


@pytest.mark.skipif(not sources.espeak_available(),
                    reason="espeak-ng not installed (apt-get install -y espeak-ng); CI installs it")
def test_speech_pairs_are_exact_short_and_16k():
  items = list(sources.spoken_sentences("train", 6, seed=0, max_seconds=3.0))
  again = list(sources.spoken_sentences("train", 6, seed=0, max_seconds=3.0))
  assert len({it["voice"] for it in items}) >= 2
  for it, jt in zip(items, again):
    assert it["audio"].dtype == np.float32 and it["audio"].ndim == 1
    assert 0.2 < it["seconds"] <= 3.0 and np.abs(it["audio"]).max() > 0.01
    assert it["transcript"] == jt["transcript"]
    np.testing.assert_array_equal(it["audio"], jt["audio"])
  val = list(sources.spoken_sentences("validation", 3, seed=0))
  assert not {v["transcript"] for v in val} & {it["transcript"] for it in items}


def test_wav_round_trip_and_resample(tmp_path):
  t = np.arange(22050) / 22050
  x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
  sources.write_wav(str(tmp_path / "a.wav"), x, rate=22050)
  y, rate = sources.parse_wav((tmp_path / "a.wav").read_bytes(), "a.wav")
  assert rate == 22050 and np.abs(y - x).max() < 1e-3
  z = sources.resample(y, rate)
  assert abs(len(z) - 16000) <= 1
  with pytest.raises(sources.SourceError, match="b.wav: not a RIFF/WAVE"):
    sources.parse_wav(b"garbage" * 10, "b.wav")


def test_drawn_captions_follow_the_grammar_and_others_are_named():
  from tmdiff.data import sources
  rng = np.random.default_rng(1)
  assert not [c for c in (sources.draw_image(rng)[1] for _ in range(500))
              if sources.caption_problems(c)]
  assert sources.caption_problems("a red circle")
  assert any("huge" in p for p in sources.caption_problems("one shape: huge red circle center."))
  assert any("count" in p for p in sources.caption_problems("two shapes: large red circle top."))
  assert any("row by row" in p for p in sources.caption_problems(
      "two shapes: large red circle bottom, small blue square top."))
  for word in (*sources.SHAPES, *sources.COLOURS, *sources.POSITIONS, *sources.SIZES):
    assert word in sources.CAPTION_GRAMMAR
