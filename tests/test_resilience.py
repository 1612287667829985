"""Runs that survive faults: preemption signals, non-finite steps, damaged checkpoints, preflight.

Every resumed or recovered run is compared with an independent reference: an uninterrupted run
of the same config, or the compiled step fed the expected batches by hand.
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_train import read_losses, tiny_config
from tmdiff.configs import validate as validate_lib
from tmdiff.configs.derived import ConfigError
from tmdiff.train import checkpoint as ckpt_lib
from tmdiff.train import loop, resilience
from tmdiff.train.trainer import Trainer, make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE = jax.devices()[:1]


def _wait_for_step(workdir, step, proc=None, timeout=300):
  """Polls metrics.jsonl until it logs `step`."""
  path, deadline = os.path.join(workdir, loop.METRICS_FILE), time.time() + timeout
  while True:
    if os.path.exists(path) and max(read_losses(workdir), default=0) >= step:
      return
    assert proc is None or proc.poll() is None, "training exited before the signal"
    assert time.time() < deadline, f"no step {step} within {timeout} s"
    time.sleep(0.02)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  """An uninterrupted 6-step run (tiny_config) with checkpoints at steps 3 and 6."""
  work = tmp_path_factory.mktemp("saved") / "run"
  loop.train(tiny_config(), str(work), devices=ONE)
  return work


# ---- preemption ----

def test_sigusr1_in_process_saves_the_step_in_progress_and_resumes_bitwise(saved_run, tmp_path,
                                                                          monkeypatch):
  work = str(tmp_path / "stopped")
  original = resilience.should_stop

  def signal_during_step_2(request, step, every):  # step 2 is dispatched, not yet finished
    if step == 2:
      signal.raise_signal(signal.SIGUSR1)
    return original(request, step, every)
  monkeypatch.setattr(resilience, "should_stop", signal_during_step_2)
  assert loop.train(tiny_config(), work, devices=ONE) == {}
  monkeypatch.undo()
  assert max(read_losses(work)) == 2
  assert ckpt_lib.make_manager(work, read_only=True).all_steps() == [2]  # the stop's save
  assert not os.path.exists(os.path.join(work, loop.EVAL_REPORT))
  assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handlers restored
  loop.train(tiny_config(), work, devices=ONE)
  straight, resumed = read_losses(saved_run), read_losses(work)
  assert sorted(resumed) == list(range(1, 7))
  assert [resumed[s] for s in range(3, 7)] == [straight[s] for s in range(3, 7)]  # bitwise


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
  """The real CLI, 2 processes x 4 CPU devices; SIGTERM reaches process 1 only. Both exit 0
  after saving the same step; the resume (1 process x 8 devices, same 2 data shards) continues
  as an uninterrupted run does."""
  from tests import test_distributed as td
  overrides = {**td.OVERRIDES, "train.steps": 16, "train.ckpt_every": 1000,
               "train.preemption_check_every": 4}
  port = td.free_port()
  work = tmp_path / "two"
  cmd = [sys.executable, "-m", "tmdiff.train", "--config=experiments/tiny.py",
         f"--workdir={work}", "--data_shards=2",
         *[f"--config.{k}={v}" for k, v in overrides.items()]]
  procs = [subprocess.Popen(cmd, cwd=ROOT, env=td.process_env(pid, port),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for pid in range(2)]
  try:
    _wait_for_step(work, 3, procs[1])
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  stops = []
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
    line = next(l for l in out.splitlines() if "stopped by" in l)
    stops.append(int(line.split("after step ")[1].split(":")[0]))
  assert "stopped by SIGTERM" in outs[1] and "another process's stop request" in outs[0]
  n = stops[0]
  assert stops == [n, n] and n % 4 == 0 and n < 16, stops
  assert ckpt_lib.make_manager(str(work), read_only=True).all_steps() == [n]
  assert max(read_losses(work)) == n
  config = td.make_config(overrides)
  loop.train(config, str(work), data_shards=2)
  loop.train(config, str(tmp_path / "straight"), data_shards=2)
  straight, resumed = read_losses(tmp_path / "straight"), read_losses(work)
  assert sorted(resumed) == list(range(1, 17))
  np.testing.assert_allclose([resumed[s] for s in range(n + 1, 17)],
                             [straight[s] for s in range(n + 1, 17)], rtol=1e-5)


# ---- non-finite steps ----

def _nan_grads_when(monkeypatch, bad):
  """Makes the step's gradients NaN where bad(state, batch) (a traced bool)."""
  original = Trainer._grads

  def grads(self, state, batch, corruption, normaliser):
    g, sums = original(self, state, batch, corruption, normaliser)
    poison = jnp.where(bad(state, batch), jnp.nan, 1.0)
    return jax.tree.map(lambda x: x * poison, g), sums
  monkeypatch.setattr(Trainer, "_grads", grads)


def test_skip_leaves_params_and_optimizer_state_untouched(monkeypatch):
  _nan_grads_when(monkeypatch, lambda state, batch: state["step"] == 1)  # the 2nd step
  c = tiny_config(**{"train.on_nonfinite": "skip", "optim.ema_decay": 0.9})
  trainer = Trainer(c, make_mesh(c, ONE))
  step = trainer.compile_train_step()
  it = loop.make_iterator(c, "train", c.data.global_batch)
  state = trainer.init_state()
  history, flags = [], []
  for _ in range(3):
    state, metrics = step(state, trainer.put_batch(next(it)))
    history.append(jax.device_get(state))
    flags.append(float(metrics["nonfinite"]))
  assert flags == [0.0, 1.0, 0.0]
  assert [int(h["step"]) for h in history] == [1, 2, 3]
  for key in ("params", "opt_state", "ema"):
    jax.tree.map(np.testing.assert_array_equal, history[1][key], history[0][key])
    assert not all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(history[2][key]), jax.tree.leaves(history[1][key])))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(history[2]))


def test_skip_counts_and_stops_after_the_limit_in_a_row(tmp_path, monkeypatch):
  _nan_grads_when(monkeypatch, lambda state, batch: state["step"] >= 2)  # steps 3, 4, ...
  c = tiny_config(**{"train.on_nonfinite": "skip", "train.nonfinite_limit": 3,
                     "train.steps": 8, "train.ckpt_every": 100})
  with pytest.raises(resilience.NonFiniteError,
                     match=r"3 non-finite steps in a row, up to step 5 \(train.nonfinite_limit=3"):
    loop.train(c, str(tmp_path), devices=ONE)
  with open(tmp_path / loop.METRICS_FILE) as f:
    records = {r["step"]: r for r in map(json.loads, f)}
  assert sorted(records) == [1, 2, 3, 4]  # step 5's check stopped the run before its log
  assert [records[s]["nonfinite_steps"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
  assert np.isfinite(records[4]["param_norm"]) and records[4]["param_norm"] == \
      records[3]["param_norm"] == records[2]["param_norm"]
  assert not os.path.isdir(os.path.join(tmp_path, "checkpoints", "5"))


def test_error_policy_names_the_first_bad_step_before_saving(tmp_path, monkeypatch):
  _nan_grads_when(monkeypatch, lambda state, batch: state["step"] == 3)  # step 4
  c = tiny_config(**{"train.steps": 8, "train.log_every": 100, "train.ckpt_every": 6})
  with pytest.raises(resilience.NonFiniteError,
                     match=r"not finite at step 4 \(3 steps up to step 6\) \(train.on_nonfinite="):
    loop.train(c, str(tmp_path), devices=ONE)  # found at step 6, before its save
  assert ckpt_lib.make_manager(str(tmp_path), read_only=True).all_steps() == []
  with pytest.raises(ConfigError, match="config.train.on_nonfinite: 'ignore' not in"):
    validate_lib.validate(tiny_config(**{"train.on_nonfinite": "ignore"}))


def test_rollback_restores_the_checkpoint_and_skips_the_bad_batch(tmp_path, monkeypatch):
  c = tiny_config(**{"train.on_nonfinite": "rollback", "train.rollback_skip": 2,
                     "train.steps": 8, "train.ckpt_every": 3})
  it = loop.make_iterator(c, "train", c.data.global_batch)
  batches = [next(it) for _ in range(10)]  # batch i feeds step i + 1 of a run without faults
  sums = [int(b["tokens"].sum()) for b in batches]
  assert len(set(sums)) == len(sums)
  _nan_grads_when(monkeypatch, lambda state, batch: batch["tokens"].sum() == sums[4])
  loop.train(c, str(tmp_path), devices=ONE)
  with open(tmp_path / loop.METRICS_FILE) as f:
    rollbacks = [r for r in map(json.loads, f) if r["split"] == "rollback"]
  assert rollbacks == [{"step": 5, "split": "rollback", "nonfinite_steps": 1.0,
                        "rolled_back_to": 3.0}]
  # Reference: the compiled step fed batches 1-3, then 6-10 (batches 4 and 5 skipped).
  trainer = Trainer(c, make_mesh(c, ONE))
  step, state, expected = trainer.compile_train_step(), trainer.init_state(), []
  for i in (0, 1, 2, 5, 6, 7, 8, 9):
    state, metrics = step(state, trainer.put_batch(batches[i]))
    expected.append(float(metrics["loss"]))
  got = read_losses(tmp_path)  # the last record of each step
  assert [got[s] for s in range(1, 9)] == expected


# ---- damaged checkpoints ----

def _copy(saved_run, tmp_path):
  work = tmp_path / "run"
  shutil.copytree(saved_run, work)
  return work


def _restore(work, config=None, **kw):
  config = tiny_config() if config is None else config
  trainer = Trainer(config, make_mesh(config, ONE))
  manager = ckpt_lib.make_manager(str(work), async_save=False)
  return ckpt_lib.restore(manager, str(work), trainer.abstract_state, config=config, **kw)


def _largest_data_file(step_dir):
  return max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")),
             key=os.path.getsize)


def _scribble(path):  # same size, different bytes in the middle
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.seek(size // 2)
    f.write(bytes(255 - b for b in f.read(256)))


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage, named", [
    (lambda d: _scribble(_largest_data_file(d)), "sha256 differs"),
    (lambda d: _truncate(_largest_data_file(d)), "(truncated?)"),
    (lambda d: _truncate(os.path.join(d, "state", "_METADATA")), "state/_METADATA: not valid JSON"),
])
def test_damaged_latest_step_falls_back_to_the_newest_intact_one(saved_run, tmp_path, caplog,
                                                                damage, named):
  work = _copy(saved_run, tmp_path)
  step6 = os.path.join(ckpt_lib.checkpoint_dir(str(work)), "6")
  damage(step6)
  with pytest.raises(ckpt_lib.CheckpointError, match=r"cannot restore step 6: .*/checkpoints/6/"):
    _restore(work, config=tiny_config(**{"train.on_bad_checkpoint": "error"}))
  trainer = Trainer(tiny_config(), make_mesh(tiny_config(), ONE))
  with pytest.raises(ckpt_lib.CheckpointError, match=r"cannot restore step 6: .*/checkpoints/6/"):
    ckpt_lib.restore_params(str(work), trainer.abstract_state["params"])  # eval and sampling
  step, state, _ = _restore(work)
  assert step == 3 and int(state["step"]) == 3
  lines = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert len(lines) == 1 and "step 6" in lines[0] and named in lines[0] and \
      "falling back to step 3" in lines[0], lines
  assert os.path.isdir(work / ckpt_lib.DAMAGED / "6")


def test_training_resumes_exactly_from_the_fallback_step(saved_run, tmp_path):
  work = _copy(saved_run, tmp_path)
  original = read_losses(work)
  _scribble(_largest_data_file(os.path.join(ckpt_lib.checkpoint_dir(str(work)), "6")))
  loop.train(tiny_config(), str(work), devices=ONE)  # falls back to 3, retrains 4-6
  assert ckpt_lib.make_manager(str(work), read_only=True).all_steps() == [3, 6]
  assert read_losses(work) == original  # steps 4-6 recomputed, bitwise


def test_half_written_step_is_ignored_and_removed(saved_run, tmp_path):
  work = _copy(saved_run, tmp_path)
  ckpts = ckpt_lib.checkpoint_dir(str(work))
  half = os.path.join(ckpts, "9.orbax-checkpoint-tmp-1700000000")
  shutil.copytree(os.path.join(ckpts, "6"), half)
  _truncate(_largest_data_file(half))
  step, _, _ = _restore(work)
  assert step == 6 and not os.path.exists(half)


def test_step_from_another_model_is_refused_naming_the_file(saved_run, tmp_path):
  work = _copy(saved_run, tmp_path)
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=r"step 6 \(.*/checkpoints/6/config/metadata\) was written by a run "
                           r"with another model: model.d_ff: 128 -> 256"):
    _restore(work, config=tiny_config(**{"model.d_ff": 256}))
  step, _, _ = _restore(work, config=tiny_config(**{"train.steps": 9, "model.remat": "block"}))
  assert step == 6  # keys that leave the state's shapes alone may change


# ---- preflight ----

def test_preflight_names_an_unwritable_or_full_workdir(tmp_path, monkeypatch):
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(resilience.WorkdirError, match=f"workdir {blocker}/run is not writable"):
    loop.train(tiny_config(), str(blocker / "run"), devices=ONE)
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=0))
  with pytest.raises(resilience.WorkdirError,
                     match=f"workdir {tmp_path}/run has 0.0 MiB free; checkpoints need about"):
    loop.train(tiny_config(), str(tmp_path / "run"), devices=ONE)


# ---- chaos ----

def test_chaos_run_survives_kills_and_damage_with_bitwise_equal_losses(tmp_path):
  from tmdiff.tools import chaos
  summary = chaos.chaos(str(tmp_path / "chaos"), faults=4, steps=30, ckpt_every=5, log=print)
  print(chaos.table(summary))
  assert summary["faults"] == summary["survived"] == 4
  assert {e["kind"] for e in summary["events"]} == set(chaos.KINDS)
  assert summary["rows"]["sigterm"]["lost_beyond_last_step"] == 0
  assert summary["losses_bitwise_equal"] and summary["data_order_same"]
