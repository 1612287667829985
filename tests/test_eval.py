"""tmdiff.eval: batch- and device-invariant ELBO, judges against independent baselines, WER,
the eval and sweep CLIs end to end on a tiny prepared dataset."""
import json
import math
import os

import jax
import numpy as np
import pytest
from flax import nnx

from tmdiff.configs.base import get_base_config
from tmdiff.data import sources
from tmdiff.data import vocab as vocab_lib
from tmdiff.diffusion import objective as obj_lib
from tmdiff.eval import elbo
from tmdiff.model.transformer import Transformer
from tmdiff.train.trainer import Trainer, make_mesh


def tiny_config():
  c = get_base_config()
  c.model.d_model, c.model.n_layers, c.model.d_ff, c.model.base_width = 32, 1, 64, 32
  c.model.n_heads, c.model.n_kv_heads, c.model.head_dim = 2, 2, 16
  c.model.dtype = "float32"
  c.vocab.text_size, c.vocab.image_size, c.vocab.audio_size = 64, 32, 32
  c.data.seq_len, c.data.global_batch, c.data.eval_batches = 32, 8, 2
  return c


# --- ELBO ------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["padded", "packed"])
def elbo_setup(request):
  c = tiny_config()
  if request.param == "packed":   # several pairs a row, beside text
    c.data.seq_len, c.data.pack_pairs = 64, True
  layout = vocab_lib.VocabLayout.from_config(c.vocab)
  host_params = nnx.to_pure_dict(nnx.state(Transformer(c.model, layout, rngs=nnx.Rngs(0))))
  rows = elbo.validation_rows(c, 12)
  return c, host_params, rows


@pytest.fixture(scope="module")
def per_row_runs(elbo_setup):
  """Per-row sums keyed by (devices, eval batch)."""
  c, host_params, rows = elbo_setup
  out = {}
  for n_devices, batch_size in ((1, 1), (1, 4), (1, 16), (8, 4)):
    trainer = Trainer(c, make_mesh(c, jax.devices()[:n_devices]))
    params = jax.device_put(host_params, trainer.state_sharding["params"])
    out[(n_devices, batch_size)] = elbo.per_row_sums(trainer, params, rows, batch_size=batch_size)
  return out


def test_validation_rows_do_not_depend_on_how_many_are_read(elbo_setup):
  c, _, rows = elbo_setup
  fewer = elbo.validation_rows(c, 5)
  for k in rows:
    np.testing.assert_array_equal(fewer[k], rows[k][:5])


def test_elbo_is_the_same_for_batch_1_4_16_and_on_1_or_8_devices(elbo_setup, per_row_runs):
  c, _, rows = elbo_setup
  ref = per_row_runs[(1, 1)]
  runs = {k: v for k, v in per_row_runs.items() if k != (1, 1)}
  ref_summary = elbo.summarize_rows(ref)
  for key, sums in runs.items():
    np.testing.assert_array_equal(sums["tokens"], ref["tokens"])
    np.testing.assert_array_equal(sums["masked"], ref["masked"])  # same masks per row
    # Float32 matmuls of other shapes round differently: ~2e-7 relative has been seen.
    np.testing.assert_allclose(sums["nll"], ref["nll"], rtol=1e-6, atol=1e-6, err_msg=str(key))
    summary = elbo.summarize_rows(sums)
    for name, value in summary.items():
      assert value == pytest.approx(ref_summary[name], rel=1e-6), (key, name)
  assert ref["tokens"].sum() == rows["loss_mask"].sum()
  if c.data.pack_pairs:   # the rows hold several pairs
    assert max(len(np.unique(s[m > 0])) for s, m in zip(rows["segment_ids"],
                                                         rows["cond_mask"])) >= 2


def test_per_row_elbo_equals_the_objective_on_each_row_alone(elbo_setup, per_row_runs):
  """Second code path: objective.corrupt on a one-row batch, logits, numpy log-softmax."""
  c, host_params, rows = elbo_setup
  sums = per_row_runs[(1, 4)]
  trainer = Trainer(c, make_mesh(c, jax.devices()[:1]))
  model = nnx.merge(trainer.eval_graphdef, host_params)
  bias = obj_lib.modality_logit_bias(trainer.layout)
  key = elbo.eval_key(c.seed)
  times = elbo.time_uniforms(c.seed, len(rows["tokens"]), c.data.max_segments)
  # Stratified: each slot's uniforms put exactly one row in each of the N strata.
  np.testing.assert_array_equal(np.sort(np.floor(times * len(times)), 0),
                                np.tile(np.arange(len(times))[:, None], (1, times.shape[1])))
  for r in range(len(rows["tokens"])):
    row = {k: v[r:r + 1] for k, v in rows.items()}
    corruption = obj_lib.corrupt(row, jax.random.fold_in(key, r), trainer.eval_objective,
                                 c.data.max_segments, time_uniforms=times[r:r + 1])
    logits = np.asarray(model.logits(model(corruption.tokens, row["positions"],
                                           row["segment_ids"], row["modality"])), np.float64)
    logits = logits + bias[row["modality"]]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    target = np.take_along_axis(logp, row["tokens"][..., None], -1)[..., 0]
    supervised = np.asarray(corruption.supervised)
    nll = -np.where(supervised, target, 0.0) * np.where(supervised, corruption.weight, 0.0)
    expected = [nll[row["modality"] == m].sum() for m in range(3)]
    np.testing.assert_allclose(sums["nll"][r], expected, rtol=2e-5, atol=1e-5)
    assert sums["masked"][r].sum() == np.asarray(corruption.supervised).sum()


# --- WER and text metrics --------------------------------------------------------------------
def test_word_error_rate_against_hand_counted_edits():
  from tmdiff.eval import speech_judge as sj
  assert sj.edit_distance("kitten", "sitting") == 3
  assert sj.edit_distance([], ["a", "b"]) == 2
  # ref 4 words: 1 substitution (cat->hat); ref 3 words: 1 deletion + 1 insertion.
  out = sj.word_error_rate(["The cat sat down.", "to be or"], ["the hat sat down", "to or not"])
  assert (out["errors"], out["words"]) == (1 + 2, 7)
  assert out["wer"] == pytest.approx(3 / 7)
  assert sj.word_error_rate(["What's this?"], ["what's this"])["wer"] == 0.0
  assert sj.ctc_greedy(np.array([0, 9, 9, 0, 10, 0, 0, 1, 10, 10])) == "hi i"
  lexicon = sj.Lexicon({"thou": 10, "though": 3, "art": 5})
  assert lexicon.correct_text("thoo art xyzzyq") == "thou art xyzzyq"


def test_unigram_entropy_closed_form():
  from tmdiff.eval import text_judge
  assert text_judge.unigram_entropy_bits(np.array([1, 2, 3, 4])) == pytest.approx(2.0)
  assert text_judge.unigram_entropy_bits(np.array([7] * 9)) == pytest.approx(0.0)
  assert text_judge.unigram_entropy_bits(np.array([1, 1, 2, 2, 2, 2])) == pytest.approx(
      -(1 / 3) * math.log2(1 / 3) - (2 / 3) * math.log2(2 / 3))


def test_unigram_bits_per_token_counts_scored_tokens_by_modality():
  rows = {"tokens": np.array([[1, 2, 3, 4, 9, 9], [7, 7, 7, 7, 5, 6]]),
          "modality": np.array([[0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]]),
          "loss_mask": np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]])}
  # text: 1, 2, 3, 4 once each (the unscored 9s, 5 and 6 do not count); image: one id; no audio
  assert elbo.unigram_bits_per_token(rows) == {"unigram_bits_per_token/text": pytest.approx(2.0),
                                               "unigram_bits_per_token/image": 0.0}


def test_caption_parsing_round_trips_the_generator():
  from tmdiff.eval import image_judge
  rng = np.random.default_rng(3)
  for _ in range(20):
    _, caption, attributes = sources.draw_image(rng)
    parsed = image_judge.parse_caption(caption)
    want = [{k: o[k] for k in ("size", "colour", "shape", "position")}
            for o in attributes["objects"]]
    assert parsed == want
  with pytest.raises(image_judge.judges_lib.JudgeError, match="names no object"):
    image_judge.parse_caption("a photo of nothing")


@pytest.mark.parametrize("size", [16, 32, 40])
def test_image_judge_cell_windows_hold_their_cells(size):
  from tmdiff.eval import image_judge
  starts, side = image_judge.cell_windows(size)
  m, cell = image_judge.CROP_MARGIN, size / 3.0
  for k, start in enumerate(starts):  # every pixel of cell k lies in window k (padded coords)
    first, last = math.floor(k * cell) + m, math.ceil((k + 1) * cell) - 1 + m
    assert 0 <= start <= first and last < start + side <= size + 2 * m, (k, start, side)
  model = image_judge.CellClassifier(size, 0, 8, nnx.Rngs(0))
  x = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
  padded = np.pad(x, ((0, 0), (m, m), (m, m), (0, 0)), mode="edge")
  crops = np.asarray(model.crops(x)).reshape(2, 9, side, side, 3)
  for cell_index, (r, c) in enumerate(sources.POSITIONS.values()):
    want = padded[:, starts[r]:starts[r] + side, starts[c]:starts[c] + side]
    np.testing.assert_array_equal(crops[:, cell_index], want)


def test_image_judge_mirror_matches_a_mirrored_caption():
  from tmdiff.eval import image_judge
  swap = {"left": "right", "right": "left"}
  def mirrored(position):
    return " ".join(swap.get(w, w) for w in position.split())
  rng = np.random.default_rng(1)
  drawn = [sources.draw_image(rng) for _ in range(30)]
  images = np.stack([d[0] for d in drawn])
  labels = np.stack([image_judge.labels_of(d[2]["objects"]) for d in drawn])
  flipped, flipped_labels = image_judge.mirror(images, labels)
  np.testing.assert_array_equal(flipped, images[:, :, ::-1])
  for i, (_, _, attributes) in enumerate(drawn):
    objects = [dict(o, position=mirrored(o["position"])) for o in attributes["objects"]]
    np.testing.assert_array_equal(flipped_labels[i], image_judge.labels_of(objects))


# --- the tiny prepared dataset, checkpoint and judges ----------------------------------------
JUDGE_SETTINGS = {
    "text": dict(d_model=32, n_layers=1, context=32, steps=150, batch_size=32),
    "image": dict(images=1000, held_out=300, steps=200, channels=16, batch_size=64,
                  reconstructed_fraction=0.2),
    "speech": dict(clean_utterances=4, held_out=2, steps=4, channels=32, n_layers=1,
                   batch_size=4),
}


SOURCES = "text,image_text,audio_text" if sources.espeak_available() else "text,image_text"
PREPARE_ARGS = [f"--sources={SOURCES}", "--num_images=60", "--num_val_images=8",
                "--num_utterances=12", "--num_val_utterances=4", "--image_size=16",
                "--max_text_docs=60", "--max_seconds=2.0", "--max_pair_tokens=128"]


def prepared_config(data_dir):
  """tiny_config on the prepared data dir `data_dir`, with its vocabulary sizes."""
  manifest = json.load(open(os.path.join(data_dir, "manifest.json")))
  c = tiny_config()
  for k in ("text_size", "image_size", "audio_size"):
    c.vocab[k] = int(manifest["vocab"].get(k, c.vocab[k]))
  c.data.source, c.data.data_dir, c.data.seq_len = "prepared", str(data_dir), 128
  if "audio_text" not in SOURCES:
    c.data.mixture.audio_text = 0.0
  return c


@pytest.fixture(scope="module")
def prepared_run(tmp_path_factory):
  """A tiny prepared dataset (a trained SentencePiece, untrained image and audio FSQ
  tokenizers: real encode / decode, no training compile) and a checkpoint of a freshly
  initialised tiny model on it (saved directly: no train-step compile)."""
  import shutil

  from tmdiff.data import prepare
  from tmdiff.data.tokenizers import audio, image, text
  from tmdiff.train import checkpoint
  root = tmp_path_factory.mktemp("evalrun")
  data, toks = str(root / "data"), root / "tokenizers"
  docs = [d["text"] for d in sources.text_documents("train")[:60]]
  text.train_text_tokenizer(docs, vocab_size=400).save(str(toks / "text"))
  for name, tok in (("image", image.ImageTokenizer(image.ImageTokenizerConfig(image_size=16))),
                    ("audio", audio.AudioTokenizer(audio.AudioTokenizerConfig()))):
    os.makedirs(toks / name)
    tok.save(str(toks / name))
  prepare.prepare(prepare.parse_args([f"--out={data}", f"--tokenizers={toks}"] + PREPARE_ARGS))
  shutil.rmtree(toks)  # the data dir carries its own copies
  c = prepared_config(data)
  trainer = Trainer(c, make_mesh(c, jax.devices()[:1]))
  params = nnx.to_pure_dict(nnx.state(Transformer(c.model, trainer.layout, rngs=nnx.Rngs(0))))
  workdir = str(root / "run")
  manager = checkpoint.make_manager(workdir, async_save=False)
  checkpoint.save(manager, 1, trainer._init_state_unsharded(params), None, c)
  checkpoint.wait(manager)
  manager.close()
  return data, workdir


def test_text_judge_beats_a_numpy_unigram_model(prepared_run):
  from tmdiff.eval import judges
  data, _ = prepared_run
  judge = judges.load_or_train("text", data, **JUDGE_SETTINGS["text"])
  train = [a["text"] for a, _ in judges.read_records(data, "text", "train")]
  val = [a["text"] for a, _ in judges.read_records(data, "text", "validation")]
  vocab = judge.vocab + 2
  counts = np.bincount(np.concatenate(train), minlength=vocab) + 1.0
  unigram = float(np.exp(-np.log(counts / counts.sum())[np.concatenate(val)].mean()))
  ppl = judge.perplexity(val)
  assert ppl < 0.9 * unigram, (ppl, unigram)
  # judge.nll against the model's logits and a numpy log-softmax on one window.
  seq = val[0][:judge.context - 1]
  ids = np.concatenate([[judge.vocab], seq])[None].astype(np.int32)
  logits = np.asarray(judge.model(ids[:, :-1]), np.float64)[0]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  expected = -logp[np.arange(len(seq)), seq].sum()
  total, count = judge.nll([seq])
  assert count == len(seq) and total == pytest.approx(expected, rel=1e-4)
  # Cached: a second call loads the same judge.
  again = judges.load_or_train("text", data, **JUDGE_SETTINGS["text"])
  assert again.perplexity(val) == pytest.approx(ppl, rel=1e-5)


def test_image_judge_beats_closed_form_chance_on_fresh_images(prepared_run):
  from scipy import stats

  from tmdiff.eval import image_judge, judges
  data, _ = prepared_run
  judge = judges.load_or_train("image", data, **JUDGE_SETTINGS["image"])
  images, objects = image_judge.fresh_images(0xABC, 300, 5, judge.image_size)
  labels = np.stack([image_judge.labels_of(o) for o in objects])
  predicted = judge.predict(images)
  occupied = labels[..., 0] == 1
  n = int(occupied.sum())
  # Chance: the majority answer per cell (empty: 1 - E[count]/9 = 7/9), uniform shape / colour.
  for name, column, chance, mask in (("occupancy", 0, 7 / 9, np.ones_like(occupied)),
                                     ("shape", 1, 1 / 4, occupied),
                                     ("colour", 2, 1 / 8, occupied)):
    hits = int((predicted[..., column] == labels[..., column])[mask].sum())
    trials = int(mask.sum())
    p_value = stats.binom.sf(hits - 1, trials, chance)
    assert p_value < 1e-6, (name, hits / trials, chance)
  assert n > 0
  sanity = judge.info["sanity"]
  assert set(sanity) >= {"real", "tokenizer_round_trip", "chance_all"}


def test_eval_cli_end_to_end_and_batch_invariance(prepared_run, tmp_path):
  from tmdiff.eval import judges
  from tmdiff.eval.__main__ import main, run_eval
  data, workdir = prepared_run
  for name in ("text", "image", "speech"):  # tiny judges, cached for the CLI to load
    if name != "speech" or sources.espeak_available():
      judges.load_or_train(name, data, **JUDGE_SETTINGS[name])
  out = tmp_path / "b1"
  main([f"--workdir={workdir}", "--batch_size=1", "--num_samples=3", "--num_rows=6",
        f"--out={out}"])
  one = json.load(open(out / "eval.json"))
  eight = run_eval(workdir, batch_size=4, num_samples=3, num_rows=6, out=str(tmp_path / "b4"),
                   parts=("elbo", "text"), devices=jax.devices()[:8], judge_settings=JUDGE_SETTINGS)
  assert eight["devices"] == 8
  for k, v in one["metrics"]["elbo"].items():
    assert v == pytest.approx(eight["metrics"]["elbo"][k], rel=1e-6), k
  assert one["samples"]["text"]["texts"] == eight["samples"]["text"]["texts"]
  assert one["metrics"]["text"] == pytest.approx(eight["metrics"]["text"], rel=1e-5)
  expected_parts = {"elbo", "text", "t2i"} | ({"t2s"} if sources.espeak_available() else set())
  assert set(one["metrics"]) == expected_parts
  assert one["metrics"]["elbo"]["bits_per_token/all"] > 0
  assert len(one["samples"]["t2i"]["captions"]) == 3
  assert (out / "t2i_grid.png").read_bytes()[:4] == b"\x89PNG"
  assert "judge_perplexity" in (out / "eval.md").read_text()
  if "t2s" in expected_parts:
    assert len(os.listdir(out / "t2s")) == 3
    assert 0 <= one["metrics"]["t2s"]["wer"]
  else:
    assert "t2s" in one["skipped"]


def test_sweep_writes_defaults_that_eval_and_sample_apply(prepared_run, tmp_path):
  from tmdiff.diffusion.prompts import SampleError
  from tmdiff.eval import generation, sweep
  from tmdiff.train import restore
  data, workdir = prepared_run
  report = sweep.sweep(workdir, "image", grid=[{}, {"steps": 4}],
                       num_samples=3, batch_size=1, out=str(tmp_path),
                       judge_settings=JUDGE_SETTINGS, devices=jax.devices()[:1])
  assert len(report["results"]) == 2 and (tmp_path / "sweep_image.md").exists()
  path = os.path.join(workdir, restore.SAMPLING_DEFAULTS_FILE)
  tuned = json.load(open(path))
  assert tuned["image"] == json.loads(json.dumps(report["best_settings"]))
  try:
    run = generation.restore(workdir, devices=jax.devices()[:1])
    assert generation.settings_for(run, "image").steps == report["best_settings"]["steps"]
    json.dump({"image": {"stepz": 3}}, open(path, "w"))
    with pytest.raises(SampleError, match="stepz"):
      generation.restore(workdir, devices=jax.devices()[:1])
  finally:
    os.remove(path)


def test_pair_task_prompts_start_at_first(prepared_run):
  """The sweep scores validation prompts from an offset, so it can skip the eval's prompts."""
  from tmdiff.eval import generation, judges
  data, workdir = prepared_run
  run = generation.restore(workdir, devices=jax.devices()[:1])
  judge = judges.load_or_train("image", data, **JUDGE_SETTINGS["image"])
  settings = generation.settings_for(run, "image").replace(steps=2)
  stored = [m["caption"] for _, m in judges.read_records(data, "image_text", "validation", 3)]
  assert len(set(stored)) == 3
  out = generation.t2i_task(run, judge, num=2, settings=settings, seed=0, batch_size=2, first=1)
  assert out["captions"] == stored[1:3] and len(out["images"]) == 2
  with pytest.raises(generation.EvalError, match="from index 100000"):
    generation.t2i_task(run, judge, num=2, settings=settings, seed=0, batch_size=2, first=100000)


def test_eval_errors_name_the_problem(tmp_path, prepared_run):
  from tmdiff.eval.__main__ import run_eval
  from tmdiff.eval.generation import EvalError
  from tmdiff.train.checkpoint import CheckpointError
  with pytest.raises(CheckpointError, match="no checkpoint directory"):
    run_eval(str(tmp_path / "nothing"))
  _, workdir = prepared_run
  with pytest.raises(EvalError, match="unknown --parts"):
    run_eval(workdir, parts=("elbo", "fid"))
  with pytest.raises(EvalError, match="prepared data"):
    run_eval(workdir, data_dir=str(tmp_path / "missing"), parts=("elbo",))


def test_judges_cli_reports_bad_settings_without_a_traceback(prepared_run):
  """Run as `python -m`: the judges' own JudgeError must reach the CLI's clean exit."""
  import subprocess
  import sys
  data, _ = prepared_run
  run = lambda *extra: subprocess.run(
      [sys.executable, "-m", "tmdiff.eval.judges", f"--data_dir={data}", "--only=speech", *extra],
      capture_output=True, text=True, timeout=300)
  out = run('--settings={"speech": {"bogus": 1}}')
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
  assert "JudgeError: unknown speech judge settings ['bogus']" in out.stderr
  out = run('--settings={"text": {"steps": 1}}')
  assert out.returncode == 1 and "must map judges of --only=['speech']" in out.stderr
  out = run("--settings=not json")
  assert out.returncode == 1 and "--settings is not JSON" in out.stderr


# --- a data dir that travels, an eval host with no network ------------------------------------
def _encodings(toks: dict, text: str, image: np.ndarray) -> dict:
  return {"text": np.asarray(toks["text"].encode(text)),
          "image": np.asarray(toks["image"].encode_batch(image[None])[0])}


def _image(size: int = 16) -> np.ndarray:
  return sources.draw_image(np.random.default_rng(7), sources.ImageSpec(size=size))[0]


OFFLINE_JUDGES = {  # judges trained on the offline host: only that they train and score
    "text": dict(d_model=16, n_layers=1, context=16, steps=10, batch_size=8),
    "image": dict(images=64, held_out=16, steps=10, channels=8, batch_size=16,
                  reconstructed_fraction=0.25),
}


def test_moved_data_dir_trains_samples_and_evaluates_offline(prepared_run, tmp_path, monkeypatch):
  """The fixture's data dir (prepared from tokenizers in a folder since deleted), copied and
  moved: it trains, samples and evaluates (ELBO, text, T2I, judges trained there) from its new
  path, on a host with no network, espeak-ng or pip."""
  import shutil

  from offline_host import offline_host
  from tmdiff import sample as sample_lib
  from tmdiff.data import records
  from tmdiff.data.tokenizers import load_prepared, load_tokenizer
  from tmdiff.eval.__main__ import run_eval
  from tmdiff.train import loop
  fixture_data, _ = prepared_run
  first, moved = tmp_path / "first" / "data", tmp_path / "moved" / "d"
  shutil.copytree(fixture_data, first, ignore=shutil.ignore_patterns("judges"))
  moved.parent.mkdir()
  shutil.move(str(first), str(moved))
  assert not first.exists()
  manifest = records.Manifest.load(str(moved))
  for m, entry in manifest.tokenizers.items():
    assert not os.path.isabs(entry), manifest.tokenizers
    assert manifest.tokenizer_dir(str(moved), m).startswith(str(moved)), m
  # What the moved dir's tokenizers encode equals the fixture dir's, read by explicit path.
  reference = _encodings({m: load_tokenizer(os.path.join(fixture_data, "tokenizers", m))
                          for m in ("text", "image")}, "To be, or not to be", _image())
  got = _encodings(load_prepared(str(moved)), "To be, or not to be", _image())
  for k in reference:
    np.testing.assert_array_equal(got[k], reference[k])

  c = prepared_config(moved)
  c.train.steps, c.train.log_every, c.train.ckpt_every = 2, 1, 2
  c.train.async_checkpointing = False
  c.sampling.text.steps = c.sampling.image.steps = 4
  workdir = str(tmp_path / "run")
  loop.train(c, workdir, devices=jax.devices()[:1])

  blocked = offline_host(monkeypatch, tmp_path)
  report = run_eval(workdir, batch_size=2, num_samples=2, num_rows=4, out=str(tmp_path / "eval"),
                    parts=("elbo", "text", "t2i"), devices=jax.devices()[:1],
                    judge_settings=OFFLINE_JUDGES)
  assert report["data_dir"] == str(moved) and report["step"] == 2
  assert set(report["metrics"]) == {"elbo", "text", "t2i"}, report["skipped"]
  assert math.isfinite(report["metrics"]["elbo"]["bits_per_token/all"])
  assert math.isfinite(report["metrics"]["text"]["judge_perplexity"])
  assert report["metrics"]["t2i"]["images"] == 2
  assert {"text", "image"} <= set(os.listdir(moved / "judges"))
  sample_lib.run(workdir, "t2i", "one small red circle center", str(tmp_path / "s.png"),
                 num=1, seed=0)
  assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
  assert blocked.attempts == []


def test_old_manifest_with_absolute_tokenizer_paths(prepared_run, tmp_path):
  """An absolute entry is used where it exists, else the same place inside the data dir; a
  tokenizer found nowhere is a one-line error naming it and the manifest."""
  import shutil

  from tmdiff.data import records
  from tmdiff.data.tokenizers import load_prepared, load_tokenizer
  from tmdiff.eval.__main__ import run_eval
  fixture_data, workdir = prepared_run
  data = tmp_path / "copied"
  shutil.copytree(fixture_data, data, ignore=shutil.ignore_patterns("judges"))
  path = data / records.MANIFEST
  raw = json.load(open(path))
  existing = os.path.abspath(os.path.join(fixture_data, "tokenizers", "text"))
  elsewhere = "/nonexistent/old/place/data/tokenizers"
  raw["tokenizers"] = {"text": existing,                  # exists: used as it is
                       "image": f"{elsewhere}/image"}     # gone: <data>/tokenizers/image
  json.dump(raw, open(path, "w"))
  manifest = records.Manifest.load(str(data))
  assert manifest.tokenizer_dir(str(data), "text") == existing
  assert manifest.tokenizer_dir(str(data), "image") == str(data / "tokenizers" / "image")
  assert manifest.tokenizer_dir(str(data), "audio") is None
  reference = load_tokenizer(os.path.join(fixture_data, "tokenizers", "image"))
  np.testing.assert_array_equal(load_prepared(str(data))["image"].encode(_image()),
                                reference.encode(_image()))
  shutil.rmtree(data / "tokenizers" / "image")
  with pytest.raises(records.RecordError) as e:
    load_prepared(str(data))
  message = str(e.value)
  assert "\n" not in message and "image tokenizer" in message and str(path) in message
  assert f"{elsewhere}/image" in message
  with pytest.raises(records.RecordError, match="image tokenizer"):
    run_eval(workdir, data_dir=str(data), parts=("elbo",), devices=jax.devices()[:1])
