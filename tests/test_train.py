"""The training stack end to end on CPU: mesh equivalence, exact resume, cross-mesh restore."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tmdiff.configs.base import get_base_config
from tmdiff.data import pipeline
from tmdiff.train import checkpoint as ckpt_lib
from tmdiff.train import loop
from tmdiff.train.trainer import Trainer, make_mesh


def tiny_config(**overrides):
  c = get_base_config()
  c.model.d_model, c.model.n_layers, c.model.d_ff = 64, 2, 128
  c.model.n_heads, c.model.n_kv_heads, c.model.head_dim = 4, 2, 16
  c.model.base_width = 64
  c.model.dtype = "float32"
  c.vocab.text_size, c.vocab.image_size, c.vocab.audio_size = 128, 64, 64
  c.data.seq_len, c.data.global_batch, c.data.eval_batches = 32, 8, 2
  c.optim.lr = 1e-2
  c.train.steps, c.train.log_every, c.train.ckpt_every = 6, 1, 3
  c.train.async_checkpointing = False
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


def read_losses(workdir):
  with open(os.path.join(workdir, loop.METRICS_FILE)) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def test_same_losses_on_one_device_and_a_2x2x2_mesh(tmp_path):
  assert len(jax.devices()) == 8
  c1 = tiny_config(**{"train.steps": 5})
  loop.train(c1, str(tmp_path / "one"), devices=jax.devices()[:1])
  c8 = tiny_config(**{"train.steps": 5, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  loop.train(c8, str(tmp_path / "mesh"))
  one, mesh = read_losses(tmp_path / "one"), read_losses(tmp_path / "mesh")
  assert sorted(one) == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([mesh[s] for s in one], [one[s] for s in one], rtol=2e-5)


def test_killed_run_resumes_bitwise(tmp_path):
  c = tiny_config(**{"train.steps": 8})
  loop.train(c, str(tmp_path / "straight"), devices=jax.devices()[:2])
  loop.train(c, str(tmp_path / "killed"), devices=jax.devices()[:2], stop_after=5)
  killed = read_losses(tmp_path / "killed")
  assert max(killed) == 5
  # The last checkpoint is step 5 (saved at the stop); step 3 was saved too.
  loop.train(c, str(tmp_path / "killed"), devices=jax.devices()[:2])
  straight, resumed = read_losses(tmp_path / "straight"), read_losses(tmp_path / "killed")
  assert [resumed[s] for s in (6, 7, 8)] == [straight[s] for s in (6, 7, 8)]  # bitwise
  with open(tmp_path / "straight" / loop.EVAL_REPORT) as f1, \
       open(tmp_path / "killed" / loop.EVAL_REPORT) as f2:
    assert json.load(f1) == json.load(f2)


def _eval_loss(config, workdir, devices):
  trainer = Trainer(config, make_mesh(config, devices))
  _, params = ckpt_lib.restore_params(str(workdir), trainer.abstract_state["params"])
  eval_step = trainer.compile_eval_step(config.data.global_batch)
  return loop.evaluate(trainer, eval_step, params, config)["loss"]


def test_restore_on_another_mesh(tmp_path):
  c8 = tiny_config(**{"train.steps": 3, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  final = loop.train(c8, str(tmp_path))
  on_one = _eval_loss(tiny_config(), tmp_path, jax.devices()[:1])
  on_four = _eval_loss(tiny_config(**{"mesh.data": 1, "mesh.fsdp": 4}), tmp_path, jax.devices()[:4])
  assert on_one == pytest.approx(final["loss"], rel=2e-5)
  assert on_four == pytest.approx(final["loss"], rel=2e-5)


def test_checkpoint_from_another_token_layout_is_refused(tmp_path, monkeypatch):
  c = tiny_config(**{"train.steps": 1})
  loop.train(c, str(tmp_path), devices=jax.devices()[:1])
  trainer = Trainer(c, make_mesh(c, jax.devices()[:1]))
  ckpt_lib.restore_params(str(tmp_path), trainer.abstract_state["params"])  # same layout: fine
  from tmdiff.data import vocab as vocab_lib
  swapped = ("<pad>", "<bos>", "<mask>") + vocab_lib.SPECIAL_TOKENS[3:]
  monkeypatch.setattr(vocab_lib, "SPECIAL_TOKENS", swapped)
  with pytest.raises(ckpt_lib.CheckpointError, match="special tokens"):
    ckpt_lib.restore_params(str(tmp_path), trainer.abstract_state["params"])


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  c = tiny_config()
  trainer = Trainer(c, make_mesh(c, jax.devices()[:1]))
  with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint"):
    ckpt_lib.restore_params(str(tmp_path / "nowhere"), trainer.abstract_state["params"])


def _two_steps_on_one_batch(config, devices, keys=("loss", "grad_norm")):
  """Metrics of two train steps on the first training batch."""
  trainer = Trainer(config, make_mesh(config, devices))
  batch = next(iter(pipeline.make_dataset(config, "train")))
  state = trainer.init_state()
  step = trainer.compile_train_step()
  history = []
  for _ in range(2):
    state, metrics = step(state, trainer.put_batch(batch))
    history.append([float(metrics[k]) for k in keys])
  return np.array(history)


def test_gradient_accumulation_and_remat_match_one_big_batch():
  one = _two_steps_on_one_batch(tiny_config(), jax.devices()[:2])
  accumulated = _two_steps_on_one_batch(
      tiny_config(**{"optim.grad_accum": 2, "model.remat": "block"}), jax.devices()[:2])
  np.testing.assert_allclose(one, accumulated, rtol=1e-5)


def test_fixed_loss_norm_scales_the_gradient_by_the_covered_fraction():
  """loss_norm 'fixed' divides by rows x seq_len instead of the covered tokens: the reported
  loss is the same, the gradient shrinks by covered / (rows x seq_len)."""
  from tmdiff.configs import derived
  from tmdiff.diffusion import objective as obj_lib
  keys = ("loss", "grad_norm")
  per_token = _two_steps_on_one_batch(tiny_config(), jax.devices()[:1], keys)
  c = tiny_config(**{"diffusion.loss_norm": "fixed"})
  fixed = _two_steps_on_one_batch(c, jax.devices()[:1], keys)
  trainer = Trainer(c, make_mesh(c, jax.devices()[:1]))
  batch = jax.tree.map(jax.numpy.asarray, next(iter(pipeline.make_dataset(c, "train"))))
  covered = float(obj_lib.step_corruption(
      batch, jax.numpy.int32(0), jax.random.key(derived.seed_for(c, "masks")), trainer.objective,
      c.data.max_segments).elbo_mask.sum())
  assert 0 < covered < batch["tokens"].size  # the tiny data has padding
  np.testing.assert_allclose(fixed[0, 0], per_token[0, 0], rtol=1e-6)
  np.testing.assert_allclose(fixed[0, 1], per_token[0, 1] * covered / batch["tokens"].size,
                             rtol=1e-5)


def test_loss_decreases_and_bits_per_modality_are_reported(tmp_path):
  c = tiny_config(**{"train.steps": 60, "train.ckpt_every": 60, "train.log_every": 10,
                     "train.eval_every": 10})
  loop.train(c, str(tmp_path))
  with open(tmp_path / loop.METRICS_FILE) as f:
    records = [json.loads(line) for line in f]
  evals = {r["step"]: r for r in records if r["split"] == "eval"}
  assert evals[60]["loss"] < 0.97 * evals[10]["loss"], evals  # eval is deterministic
  # The logged real-token fraction of each interval is the loader's over the same batches.
  it = iter(pipeline.make_dataset(c, "train"))
  for r in (r for r in records if r["split"] == "train"):
    live = [float((next(it)["segment_ids"] > 0).mean()) for _ in range(10)]
    assert r["real_token_fraction"] == pytest.approx(np.mean(live), rel=1e-5)
    assert r["real_tokens_per_s_per_device"] == pytest.approx(
        r["tokens_per_s_per_device"] * r["real_token_fraction"])
  with open(tmp_path / loop.EVAL_REPORT) as f:
    report = json.load(f)
  for name in ("text", "image", "audio"):
    assert np.isfinite(report[f"bits_per_token/{name}"]) and report[f"bits_per_token/{name}"] > 0


def test_fused_cross_entropy_loss_matches_materialised_logits():
  keys = ("loss", "grad_norm", "bits_per_token/image")
  logits = _two_steps_on_one_batch(tiny_config(**{"model.loss_impl": "logits"}),
                                   jax.devices()[:1], keys)
  fused = _two_steps_on_one_batch(tiny_config(**{"model.loss_impl": "fused"}),
                                  jax.devices()[:1], keys)
  assert np.all(np.isfinite(fused))
  np.testing.assert_allclose(logits, fused, rtol=1e-4)


def test_ema_tracks_the_parameters():
  c = tiny_config(**{"optim.ema_decay": 0.5})
  trainer = Trainer(c, make_mesh(c, jax.devices()[:1]))
  it = iter(pipeline.make_dataset(c, "train"))
  state = trainer.init_state()
  history = [jax.device_get(state["params"])]
  step = trainer.compile_train_step()
  for _ in range(2):
    state, _ = step(state, trainer.put_batch(next(it)))
    history.append(jax.device_get(state["params"]))
  expected = jax.tree.map(lambda p0, p1, p2: 0.25 * p0 + 0.25 * p1 + 0.5 * p2, *history)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               jax.device_get(state["ema"]), expected)


def test_seed_purposes_vary_only_their_own_randomness():
  """seeds.<purpose> changes that source alone: init -> parameters, data -> training batch
  order, masks -> the step's corruption, eval -> the eval masks and times."""
  from tmdiff.eval import elbo as elbo_lib

  def outcomes(need, **seeds):
    c = tiny_config(**{"model.n_layers": 1, "data.seq_len": 16, "data.global_batch": 4})
    c.seeds.update(seeds)
    trainer = Trainer(c, make_mesh(c, jax.devices()[:1]))
    state = trainer.init_state()
    batch = next(iter(pipeline.make_dataset(c, "train")))
    out = dict(params=jax.device_get(state["params"]), batch=batch)
    if "step_loss" in need:
      _, metrics = trainer.compile_train_step()(state, trainer.put_batch(batch))
      out["step_loss"] = float(metrics["loss"])
    if "eval" in need:
      rows = elbo_lib.validation_rows(c, 8)
      out["eval"] = elbo_lib.evaluate_rows(trainer, state["params"], rows, batch_size=4)["loss"]
    return out

  def same(a, b, key):
    if key in ("params", "batch"):
      return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a[key]),
                                                        jax.tree.leaves(b[key])))
    return a[key] == b[key]

  base = outcomes({"step_loss", "eval"})
  # purpose -> (what it must change, what it must leave alone)
  expect = {"init": ({"params"}, {"batch"}),
            "data": ({"batch"}, {"params", "eval"}),
            "masks": ({"step_loss"}, {"params", "batch"}),
            "eval": ({"eval"}, {"params", "batch"})}
  for purpose, (changed, kept) in expect.items():
    other = outcomes(changed | kept, **{purpose: 7})
    for key in changed:
      assert not same(base, other, key), (purpose, key)
    for key in kept:
      assert same(base, other, key), (purpose, key)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KILL_OVERRIDES = {"model.d_model": 64, "model.d_ff": 128, "model.n_heads": 4, "model.n_kv_heads": 2,
                  "model.head_dim": 16, "model.base_width": 64, "data.seq_len": 32,
                  "data.global_batch": 8, "train.steps": 60, "train.ckpt_every": 4,
                  "train.log_every": 1, "train.eval_every": 0}


def _cli(workdir):
  flags = [f"--config.{k}={v}" for k, v in KILL_OVERRIDES.items()]
  return [sys.executable, "-m", "tmdiff.train", "--config=experiments/tiny.py",
          f"--workdir={workdir}", *flags]


def test_sigkill_mid_run_then_restart_continues_exactly(tmp_path):
  """A real kill -9 after a checkpoint; the restarted run's losses equal an uninterrupted run's."""
  env = {**os.environ, "PYTHONPATH": ROOT}
  killed = tmp_path / "killed"
  proc = subprocess.Popen(_cli(killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not (killed / "checkpoints" / "8").is_dir():
    assert proc.poll() is None, "training exited before its checkpoint at step 8"
    assert time.time() < deadline, "no checkpoint at step 8 within 300 s"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (killed / loop.EVAL_REPORT).exists(), "the run finished before it was killed"
  subprocess.run(_cli(killed), cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL, timeout=600)

  import experiments.tiny as tiny  # the same config, uninterrupted, in this process
  c = tiny.get_config()
  for key, value in KILL_OVERRIDES.items():
    section, name = key.split(".")
    c[section][name] = value
  loop.train(c, str(tmp_path / "straight"))
  straight, resumed = read_losses(tmp_path / "straight"), read_losses(killed)
  assert sorted(resumed) == list(range(1, 61))
  assert [resumed[s] for s in range(9, 61)] == [straight[s] for s in range(9, 61)]  # bitwise


def test_a_packed_pair_contributes_what_it_does_alone_in_a_padded_row():
  """Under loss_norm 'fixed', a pair packed beside others and the same pair alone in a padded
  row (same noisy tokens, time and masks) give the same loss contribution and gradient: the
  model sees only its segment, positions restart, and a token's weight depends only on its
  segment's time. Its time and weights come from its own segment's draw in both layouts."""
  from tmdiff.diffusion import objective as obj_lib
  c = tiny_config(**{"data.seq_len": 64, "data.global_batch": 4, "data.pack_pairs": True,
                     "diffusion.loss_norm": "fixed", "model.n_layers": 1})
  trainer = Trainer(c, make_mesh(c, jax.devices()[:1]))
  params = trainer.init_state()["params"]
  batch = next(iter(pipeline.make_dataset(c, "train")))
  seg, cond = batch["segment_ids"], batch["cond_mask"]
  row, s = next((r, int(s)) for r in range(len(seg)) for s in np.unique(seg[r][cond[r] > 0])
                if s > 1)   # a pair that is not its row's first segment
  cols = np.flatnonzero(seg[row] == s)
  n, (b, length) = len(cols), seg.shape
  u = np.asarray(jax.random.uniform(jax.random.key(1), (b, c.data.max_segments + 1)))
  packed = obj_lib.corrupt(jax.tree.map(jax.numpy.asarray, batch), jax.random.key(2),
                           trainer.objective, c.data.max_segments, time_uniforms=u)
  alone = {k: np.zeros_like(v) for k, v in batch.items()}
  alone["tokens"][:] = trainer.layout.pad
  for k, v in batch.items():
    alone[k][0, :n] = v[row, cols]
  alone["segment_ids"][0, :n] = 1
  shifted = {}
  for field in packed._fields:
    x = np.zeros_like(np.asarray(getattr(packed, field)))
    if field == "tokens":
      x[:] = alone["tokens"]
    x[0, :n] = np.asarray(getattr(packed, field))[row, cols]
    shifted[field] = jax.numpy.asarray(x)
  shifted = obj_lib.Corruption(**shifted)
  assert np.asarray(packed.supervised)[row, cols].any()

  def contribution(params, batch, corruption, at_row, at_cols):
    logp = trainer._target_logp(params, batch, corruption)
    nll = jax.numpy.where(corruption.supervised, -logp * corruption.weight, 0.0)
    return nll[at_row, at_cols].sum() / obj_lib.loss_normaliser(corruption, "fixed")
  grad = jax.jit(jax.value_and_grad(contribution), static_argnums=(3,))
  with trainer._context():
    v_packed, g_packed = grad(params, jax.tree.map(jax.numpy.asarray, batch), packed, row,
                              jax.numpy.asarray(cols))
    v_alone, g_alone = grad(params, jax.tree.map(jax.numpy.asarray, alone), shifted, 0,
                            jax.numpy.arange(n))
  assert float(v_packed) > 0
  np.testing.assert_allclose(float(v_packed), float(v_alone), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8),
               g_packed, g_alone)
  # The padded row's own corruption, its time drawn from the same slot value: same t, and the
  # same weight wherever both layouts supervise a token.
  u_alone = np.zeros_like(u)
  u_alone[0, 1] = u[row, s]
  own = obj_lib.corrupt(jax.tree.map(jax.numpy.asarray, alone), jax.random.key(3),
                        trainer.objective, c.data.max_segments, time_uniforms=u_alone)
  np.testing.assert_allclose(np.asarray(own.t)[0, :n], np.asarray(packed.t)[row, cols])
  both = np.asarray(own.supervised)[0, :n] & np.asarray(packed.supervised)[row, cols]
  assert both.any()
  np.testing.assert_allclose(np.asarray(own.weight)[0, :n][both],
                             np.asarray(packed.weight)[row, cols][both], rtol=1e-6)
