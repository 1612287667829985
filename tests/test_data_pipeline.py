"""Pipeline tests on the synthetic source: batch contract, packing, mixing, state."""
import numpy as np
import pytest

from tmdiff.configs.base import get_base_config
from tmdiff.data import batch as batch_lib
from tmdiff.data import pipeline
from tmdiff.data import vocab as vocab_lib


def _config(**data):
  c = get_base_config()
  with c.unlocked():
    pass
  for k, v in data.items():
    if k == "mixture":
      for name, w in v.items():
        c.data.mixture[name] = w
    else:
      c.data[k] = v
  return c


def _layout(c):
  return vocab_lib.VocabLayout.from_config(c.vocab)


def check_invariants(batch, c):
  """Everything the batch contract and the layouts promise, row by row."""
  layout = _layout(c)
  batch_lib.check_batch(batch, batch_size=c.data.global_batch, seq_len=c.data.seq_len,
                        layout=layout, max_segments=c.data.max_segments)
  for r in range(batch["tokens"].shape[0]):
    tok, seg, pos, mod, loss, cond = (batch[f][r] for f in batch_lib.FIELDS)
    live = seg > 0
    # Padding only at the end; segments numbered 1, 2, ... in order.
    n = live.sum()
    assert live[:n].all() and not live[n:].any()
    assert np.all(np.diff(seg[:n]) >= 0) and np.all(np.diff(seg[:n]) <= 1) and seg[0] == 1
    assert np.array_equal(loss, live.astype(np.int32))
    for s in np.unique(seg[live]):
      idx = np.nonzero(seg == s)[0]
      assert np.array_equal(pos[idx], np.arange(len(idx)))   # restart per segment
    text_lo, text_hi = layout.text_range
    is_special = tok < layout.num_special
    assert np.all((mod[live] != vocab_lib.TEXT) | is_special[live] |
                  ((tok[live] >= text_lo) & (tok[live] < text_hi)))
    if mod.max() == vocab_lib.TEXT:   # packed text row
      assert not cond.any()
      continue
    # A pair: one segment, <bos> cond <boX> target <eoX> <eos>, then pad.
    assert seg.max() == 1
    m = mod.max()
    begin, end = (layout.boi, layout.eoi) if m == vocab_lib.IMAGE else (layout.boa, layout.eoa)
    t = tok[:n]
    assert t[0] == layout.bos and t[-1] == layout.eos and t[-2] == end
    b = int(np.nonzero(t == begin)[0][0])
    assert cond[:b].all() and not cond[b:].any() and b >= 2
    assert np.all(mod[b + 1:n - 2] == m) and not np.any(mod[:b + 1]) and not np.any(mod[n - 2:])
    assert np.all(tok[n:] == layout.pad)


def test_batches_meet_contract_and_layouts():
  c = _config(seq_len=64, global_batch=16, max_segments=4)
  it = iter(pipeline.make_dataset(c, "train"))
  saw = set()
  for _ in range(20):
    batch = next(it)
    check_invariants(batch, c)
    saw |= set(np.unique(batch["modality"]).tolist())
    assert batch["segment_ids"].max() <= 4
  assert saw == {0, 1, 2}


def test_packing_splits_long_documents_and_fills_rows():
  c = _config(seq_len=32, global_batch=8, mixture=dict(text=1.0, image_text=0.0,
                                                       audio_text=0.0))
  it = iter(pipeline.make_dataset(c, "train"))
  fill = []
  for _ in range(10):
    b = next(it)
    check_invariants(b, c)
    fill.append((b["segment_ids"] > 0).mean())
  # Synthetic docs run up to 2 * seq_len, so they are split; rows are nearly full.
  assert np.mean(fill) > 0.9


def test_split_document_continues_in_next_row():
  # A doc split at the row end resumes at the start of the next row (its own segment).
  c = _config(seq_len=16, global_batch=1, mixture=dict(text=1.0, image_text=0.0,
                                                       audio_text=0.0))
  it = iter(pipeline.make_dataset(c, "validation"))
  rows = [next(it)["tokens"][0] for _ in range(30)]
  layout = _layout(c)
  stream = np.concatenate([r[r != layout.pad] for r in rows])
  # Reassembled, the stream is a sequence of <bos> ... <eos> documents.
  bos = np.nonzero(stream == layout.bos)[0]
  eos = np.nonzero(stream == layout.eos)[0]
  assert len(bos) >= 2 and np.all(eos[:len(bos) - 1] > bos[:len(eos)][:len(bos) - 1])


def test_mixing_ratio_within_two_percent_over_10k_examples():
  weights = dict(text=0.5, image_text=0.3, audio_text=0.2)
  c = _config(seq_len=32, global_batch=500, mixture=weights)
  it = iter(pipeline.make_dataset(c, "train"))
  for _ in range(20):   # 10k rows
    next(it)
  rows = it.row_counts()
  total = sum(rows.values())
  assert total == 10_000
  for name, w in weights.items():
    assert abs(rows[name] / total - w) < 0.02, (name, rows)
  fractions = it.token_fractions()
  assert abs(sum(fractions.values()) - 1) < 1e-9


def test_exact_mix_holds_each_batch_composition():
  weights = dict(text=0.5, image_text=0.3, audio_text=0.2)
  c = _config(seq_len=32, global_batch=10, mixture=weights, exact_mix=True)
  it = iter(pipeline.make_dataset(c, "train"))
  for _ in range(15):
    b = next(it)
    check_invariants(b, c)
    counts = pipeline.batch_row_counts(b)
    assert counts.tolist() == [5, 3, 2]
  assert pipeline.exact_counts(dict(a=1, b=1, c=1), 8) == dict(a=3, b=3, c=2)


def test_restored_iterator_yields_same_continuation():
  c = _config(seq_len=32, global_batch=4)
  ds = pipeline.make_dataset(c, "train")
  it = iter(ds)
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(5)]
  restored = iter(pipeline.make_dataset(c, "train"))
  restored.set_state(state)
  for a, b in zip(expected, (next(restored) for _ in range(5))):
    for f in batch_lib.FIELDS:
      np.testing.assert_array_equal(a[f], b[f])
  assert restored.stats()["batches"] == it.stats()["batches"]


def test_grain_checkpoint_handler_round_trip(tmp_path):
  grain = pytest.importorskip("grain")
  c = _config(seq_len=32, global_batch=4, exact_mix=True)
  it = iter(pipeline.make_dataset(c, "train"))
  next(it)
  handler = grain.checkpoint.CheckpointHandler()
  (tmp_path / "data").mkdir()  # Orbax creates the item directory before the handler runs
  handler.save(tmp_path / "data", item=it)
  expected = next(it)
  restored = iter(pipeline.make_dataset(c, "train"))
  handler.restore(tmp_path / "data", item=restored)
  np.testing.assert_array_equal(next(restored)["tokens"], expected["tokens"])


def test_hosts_get_disjoint_shards_of_half_the_batch():
  c = _config(seq_len=32, global_batch=8, mixture=dict(text=0.0, image_text=1.0,
                                                       audio_text=0.0))
  a = next(iter(pipeline.make_dataset(c, "validation", process_index=0, process_count=2)))
  b = next(iter(pipeline.make_dataset(c, "validation", process_index=1, process_count=2)))
  assert a["tokens"].shape == (4, 32) == b["tokens"].shape
  rows_a = {r.tobytes() for r in a["tokens"]}
  assert not rows_a & {r.tobytes() for r in b["tokens"]}


def test_config_errors_are_named():
  with pytest.raises(pipeline.DataConfigError, match="global_batch"):
    pipeline.make_dataset(_config(global_batch=6), "train", process_count=4)
  with pytest.raises(pipeline.DataConfigError, match="mixture"):
    pipeline.make_dataset(_config(mixture=dict(text=0.0, image_text=0.0, audio_text=0.0)),
                          "train")
  with pytest.raises(pipeline.DataConfigError, match="data.source"):
    pipeline.make_dataset(_config(source="hub"), "train")
  with pytest.raises(pipeline.DataConfigError, match="split"):
    pipeline.make_dataset(_config(), "test")
