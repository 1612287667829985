"""Pipeline tests (synthetic source unless noted): batch contract, packing against a
one-example-at-a-time reference, mixing, epoch order, state, workers, batched record reads."""
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


# ---- the vectorised pipeline against a one-example-at-a-time reference ----

def _reference_rows(source, c, n_rows):
  """Rows of `source` on the validation split (records in order), built one example at a time
  with the reference layouts (text_example / pair_example) and the greedy packing rule."""
  from tmdiff.data import synthetic
  layout, seq_len = _layout(c), c.data.seq_len
  n = synthetic.EXAMPLES_PER_SPLIT["validation"]

  def examples():
    for i in range(10**9):
      rec = synthetic.make_record(source, i % n, split="validation", seed=c.seed,
                                  seq_len=seq_len, layout=layout)
      if source == "text":
        yield pipeline.text_example(layout.to_unified(rec["text"], vocab_lib.TEXT), layout)
      else:
        (_, cond), (_, target) = rec.items()
        m = pipeline.SOURCE_MODALITY[source]
        yield pipeline.pair_example(layout.to_unified(cond, vocab_lib.TEXT),
                                    layout.to_unified(target, m), m, layout)

  stream, rows, pending = examples(), [], None
  for _ in range(n_rows):
    row = {f: np.zeros(seq_len, np.int32) for f in batch_lib.FIELDS}
    row["tokens"][:] = layout.pad
    filled = segments = 0
    while filled < seq_len and segments < c.data.max_segments:
      if pending is None:
        pending = (next(stream), 0)
      ex, offset = pending
      remaining, room = len(ex["tokens"]) - offset, seq_len - filled
      if source != "text" and filled:
        break   # pairs: one per row
      if remaining > room and filled and room < pipeline.MIN_SPLIT_TOKENS:
        break
      count = min(remaining, room)
      segments += 1
      dst, src = slice(filled, filled + count), slice(offset, offset + count)
      for f in ("tokens", "modality", "cond_mask"):
        row[f][dst] = ex[f][src]
      row["segment_ids"][dst] = segments
      row["positions"][dst] = np.arange(count)
      row["loss_mask"][dst] = 1
      filled += count
      pending = None if count == remaining else (ex, offset + count)
    rows.append(row)
  return rows


def test_rows_equal_the_one_example_at_a_time_reference_across_blocks():
  weights = dict(text=0.5, image_text=0.3, audio_text=0.2)
  c = _config(seq_len=48, global_batch=8, max_segments=3, mixture=weights)
  per_block = pipeline.batches_per_block(8, 48) * 8
  n_rows = 3 * per_block + 40   # crosses block boundaries; validation repeats its 256 records
  sources = pipeline.mixture_sources(0, n_rows, list(weights.values()))
  refs = {name: iter(_reference_rows(name, c, int((sources == k).sum())))
          for k, name in enumerate(weights)}
  it = iter(pipeline.make_dataset(c, "validation"))
  got = [next(it) for _ in range(n_rows // 8)]
  for g in range(n_rows // 8 * 8):
    want = next(refs[list(weights)[sources[g]]])
    for f in batch_lib.FIELDS:
      np.testing.assert_array_equal(got[g // 8][f][g % 8], want[f], err_msg=f"row {g} {f}")


def test_row_stream_does_not_depend_on_the_block_size(monkeypatch):
  c = _config(seq_len=32, global_batch=4)
  want = [next(it) for it in [iter(pipeline.make_dataset(c, "train"))] for _ in range(40)]
  monkeypatch.setattr(pipeline, "MAX_BLOCK_BATCHES", 3)
  assert pipeline.batches_per_block(4, 32) == 3
  it = iter(pipeline.make_dataset(c, "train"))
  for a in want:
    b = next(it)
    for f in batch_lib.FIELDS:
      np.testing.assert_array_equal(a[f], b[f])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 100, 1000, 4097])
def test_epoch_permutation_is_a_bijection(n):
  keys = np.random.SeedSequence([3, 0]).generate_state(4, np.uint64)
  perm = pipeline.permute(np.arange(n), n, keys)
  assert sorted(perm.tolist()) == list(range(n))
  if n >= 64:
    other = pipeline.permute(np.arange(n), n, keys + np.uint64(1))
    assert not np.array_equal(perm, np.arange(n)) and not np.array_equal(perm, other)


def test_train_stream_visits_every_record_once_per_epoch():
  from tmdiff.data import synthetic
  c = _config(seq_len=32)
  recs = synthetic.SyntheticRecords(c, "validation", "text", _layout(c))
  stream = pipeline.ExampleStream(recs, "text", _layout(c), "error", None, offset=1, stride=3,
                                  shuffle_seed=11)
  mine = np.arange(1, len(recs), 3)
  epochs = stream.record_indices(np.arange(3 * len(mine))).reshape(3, -1)
  for order in epochs:
    np.testing.assert_array_equal(np.sort(order), mine)
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[0], mine)


def test_mixture_sources_track_the_weights_in_every_window():
  w = [0.5, 0.3, 0.2]
  src = pipeline.mixture_sources(10**9, 20_000, w)   # far into a run, too
  for start in range(0, 20_000, 1000):
    counts = np.bincount(src[start:start + 1000], minlength=3) / 1000
    np.testing.assert_allclose(counts, w, atol=0.01)
  np.testing.assert_array_equal(pipeline.mixture_sources(5, 10, w),
                                pipeline.mixture_sources(0, 15, w)[5:])


def test_restore_at_every_offset_of_a_block_with_a_pending_document():
  # Text only: rows split documents, so most states hold a pending document.
  c = _config(seq_len=16, global_batch=2, mixture=dict(text=1.0, image_text=0.0,
                                                       audio_text=0.0))
  k = pipeline.batches_per_block(2, 16)
  it = iter(pipeline.make_dataset(c, "train"))
  states, batches = [], []
  for _ in range(k + 5):
    states.append(it.get_state())
    batches.append(next(it))
  for i in (0, 1, k - 1, k, k + 3):
    restored = iter(pipeline.make_dataset(c, "train"))
    restored.set_state(states[i])
    for want in batches[i:i + 2]:
      np.testing.assert_array_equal(next(restored)["tokens"], want["tokens"])


def test_state_of_another_pipeline_version_is_refused():
  it = iter(pipeline.make_dataset(_config(seq_len=32, global_batch=4), "train"))
  with pytest.raises(pipeline.DataConfigError, match="another pipeline version"):
    it.set_state({"parent": {}, "batches": 3, "tokens": [0, 0, 0], "rows": [0, 0, 0]})


def test_worker_processes_meet_the_contract_and_restore():
  c = _config(seq_len=32, global_batch=4, worker_count=2)
  it = iter(pipeline.make_dataset(c, "train"))
  for _ in range(70):   # past the first block of each worker
    check_invariants(next(it), c)
  state = it.get_state()
  want = [next(it)["tokens"] for _ in range(3)]
  restored = iter(pipeline.make_dataset(c, "train"))
  restored.set_state(state)
  for w in want:
    np.testing.assert_array_equal(next(restored)["tokens"], w)


def test_bench_reports_per_host_rates():
  from tmdiff.data import bench
  r = bench.run(_config(seq_len=32, global_batch=4), batches=3, seconds=0.0, warmup_s=0.0)
  assert r["batches"] >= 3 and r["tokens_per_s"] == pytest.approx(
      r["batches_per_s"] * 4 * 32, rel=0.01)
  assert r["real_fraction"] == pytest.approx(r["non_pad_tokens_per_s"] / r["tokens_per_s"],
                                             rel=0.01)


def test_batched_record_reads_equal_one_at_a_time_and_name_bad_records(tmp_path):
  from tmdiff.data import records
  rng = np.random.default_rng(0)
  arrays = [{"caption": rng.integers(0, 50, rng.integers(1, 9)).astype(np.int32),
             "image": rng.integers(0, 64, 16).astype(np.int32)} for _ in range(40)]
  blobs = [records.encode_record(a, {"id": i, "note": "x" * i}) for i, a in enumerate(arrays)]
  blobs[7] = blobs[7][:-5] + bytes([blobs[7][-5] ^ 1]) + blobs[7][-4:]   # corrupt one
  paths = []
  for k in range(2):
    paths.append(str(tmp_path / records.shard_name("train", k, 2)))
    records.write_shard(paths[-1], blobs[20 * k:20 * (k + 1)], {})
  reader = records.ShardReader(paths)
  order = rng.permutation(80) % 40   # wraps, both shards, repeats
  got = reader.read_many(order)
  for i, item in zip(order.tolist(), got):
    if i == 7:
      assert isinstance(item, records.RecordError)
      assert str(item).startswith(f"{paths[0]} record 7: checksum mismatch")
      continue
    want, meta = reader[i]
    assert meta["id"] == i and set(item) == set(want)
    for name in want:
      np.testing.assert_array_equal(item[name], want[name])


# ----------------------------------------------------------------------------------------
# data.pack_pairs: pairs packed beside other pairs and text.

def _segments(batch):
  """(row, segment id, column slice) of every segment of a batch, in row-major order."""
  out = []
  for r, seg in enumerate(batch["segment_ids"]):
    for s in range(1, int(seg.max()) + 1):
      idx = np.flatnonzero(seg == s)
      assert idx.size and np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), (r, s)  # one run
      out.append((r, s, slice(int(idx[0]), int(idx[-1]) + 1)))
  return out


def test_packed_pairs_are_whole_segments_in_stream_order():
  """Every pair is one whole segment, `<bos> cond <boX> target <eoX> <eos>` as pair_example lays
  out the stream's next record (validation: records in order); text pieces concatenate to the
  text documents in order; positions restart; ids stay in their modality's range."""
  from tmdiff.data import synthetic
  c = _config(seq_len=64, global_batch=4, max_segments=6, pack_pairs=True)
  layout = _layout(c)
  it = iter(pipeline.make_dataset(c, "validation"))
  pairs = {"image_text": [], "audio_text": []}
  text = []
  rows_with_two_pairs = 0
  for _ in range(12):
    b = next(it)
    check_invariants_packed(b, c)
    for r, s, cols in _segments(b):
      tok, mod, cond = b["tokens"][r, cols], b["modality"][r, cols], b["cond_mask"][r, cols]
      np.testing.assert_array_equal(b["positions"][r, cols], np.arange(len(tok)))
      if mod.max() == vocab_lib.TEXT and not cond.any():
        text.append(tok)
        continue
      name = "image_text" if mod.max() == vocab_lib.IMAGE else "audio_text"
      pairs[name].append({"tokens": tok, "modality": mod, "cond_mask": cond})
    live = b["segment_ids"] > 0
    n_pairs = np.array([len(np.unique(b["segment_ids"][r][b["cond_mask"][r] > 0]))
                        for r in range(len(live))])
    rows_with_two_pairs += int((n_pairs >= 2).sum())
  assert rows_with_two_pairs > 0 and all(len(v) > 5 for v in pairs.values()) and text
  for name, got in pairs.items():
    modality = pipeline.SOURCE_MODALITY[name]
    cond_name, target_name = (f for f, _ in pipeline.records_lib.SOURCE_FIELDS[name])
    for k, pair in enumerate(got):
      record = synthetic.make_record(name, k, split="validation", seed=c.seed,
                                     seq_len=c.data.seq_len, layout=layout)
      start = layout.range_of(vocab_lib.TEXT)[0]
      want = pipeline.pair_example(record[cond_name] + start,
                                   record[target_name] + layout.range_of(modality)[0],
                                   modality, layout)
      for f in want:
        np.testing.assert_array_equal(pair[f], want[f], err_msg=f"{name} pair {k} {f}")
  flat = np.concatenate(text)
  docs, n = [], 0
  while n < len(flat):
    record = synthetic.make_record("text", len(docs), split="validation", seed=c.seed,
                                   seq_len=c.data.seq_len, layout=layout)
    docs.append(pipeline.text_example(record["text"] + layout.text_range[0], layout)["tokens"])
    n += len(docs[-1])
  np.testing.assert_array_equal(flat, np.concatenate(docs)[:len(flat)])


def check_invariants_packed(batch, c):
  """The batch contract, and each modality's ids inside its range, segment by segment."""
  layout = _layout(c)
  batch_lib.check_batch(batch, batch_size=c.data.global_batch, seq_len=c.data.seq_len,
                        layout=layout, max_segments=c.data.max_segments)
  for r in range(batch["tokens"].shape[0]):
    seg = batch["segment_ids"][r]
    n = int((seg > 0).sum())
    assert (seg[:n] > 0).all() and np.all(np.diff(seg[:n]) == (np.diff(seg[:n]) > 0))
  for m in range(len(vocab_lib.MODALITIES)):
    tok = batch["tokens"][(batch["modality"] == m) & (batch["segment_ids"] > 0)]
    lo, hi = layout.range_of(m)
    specials = tok < layout.num_special if m == vocab_lib.TEXT else np.zeros_like(tok, bool)
    assert np.all(specials | ((tok >= lo) & (tok < hi))), vocab_lib.MODALITIES[m]


def test_packed_token_fractions_match_the_mixture_within_two_percent_over_10k_rows():
  weights = dict(text=0.5, image_text=0.3, audio_text=0.2)
  c = _config(seq_len=128, global_batch=500, mixture=weights, pack_pairs=True)
  padded = iter(pipeline.make_dataset(_config(seq_len=128, global_batch=500, mixture=weights),
                                      "train"))
  it = iter(pipeline.make_dataset(c, "train"))
  for _ in range(20):   # 10k rows
    next(it)
    next(padded)
  fractions = it.token_fractions()
  for (name, w), modality in zip(weights.items(), vocab_lib.MODALITIES):
    assert abs(fractions[modality] - w) < 0.02, (modality, fractions)
  assert it.stats()["batches"] == 20
  # Packing fills the rows that padding leaves empty.
  assert it.real_fraction() > 0.9 > padded.real_fraction()
  assert padded.real_fraction() == pytest.approx(
      sum(padded.stats()["tokens"].values()) / (10_000 * 128))


def test_packed_exact_mix_holds_each_batch_composition():
  weights = dict(text=0.5, image_text=0.3, audio_text=0.2)
  c = _config(seq_len=160, global_batch=10, mixture=weights, exact_mix=True, pack_pairs=True)
  it = iter(pipeline.make_dataset(c, "train"))
  for _ in range(6):
    b = next(it)
    check_invariants_packed(b, c)
    assert pipeline.batch_row_counts(b).tolist() == [5, 3, 2]
    pair_rows = b["modality"].max(axis=1) > 0
    assert b["segment_ids"][pair_rows].max() >= 2   # several pairs in a pair row


def test_packed_iterator_restores_the_same_continuation_and_refuses_the_other_layout():
  c = _config(seq_len=48, global_batch=4, pack_pairs=True)
  it = iter(pipeline.make_dataset(c, "train"))
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(70)]   # past the block
  restored = iter(pipeline.make_dataset(c, "train"))
  restored.set_state(state)
  for a, b in zip(expected, (next(restored) for _ in range(70))):
    for f in batch_lib.FIELDS:
      np.testing.assert_array_equal(a[f], b[f])
  assert restored.stats() == it.stats()
  padded = iter(pipeline.make_dataset(_config(seq_len=48, global_batch=4), "train"))
  with pytest.raises(pipeline.DataConfigError, match="data.pack_pairs"):
    padded.set_state(state)
