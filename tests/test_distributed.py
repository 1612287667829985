"""Multi-process training: 2 processes x 4 CPU devices on 127.0.0.1 against 1 process x 8.

Also run as a script: `python tests/test_distributed.py worker SPEC_JSON` is one process of a
multi-process run (the environment says which).
"""
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {  # tests/test_train.py's tiny_config on experiments/tiny.py
    "model.d_model": 64, "model.n_layers": 2, "model.d_ff": 128, "model.n_heads": 4,
    "model.n_kv_heads": 2, "model.head_dim": 16, "model.base_width": 64, "model.dtype": "float32",
    "vocab.text_size": 128, "vocab.image_size": 64, "vocab.audio_size": 64,
    "data.seq_len": 32, "data.global_batch": 8, "data.eval_batches": 2, "optim.lr": 1e-2,
    "train.steps": 6, "train.log_every": 1, "train.ckpt_every": 3, "train.eval_every": 0,
    "train.async_checkpointing": False, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}


def make_config(overrides=OVERRIDES):
  import experiments.tiny as tiny
  c = tiny.get_config()
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(pid, port, n=2, **extra):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "TMDIFF_COORDINATOR": f"127.0.0.1:{port}", "TMDIFF_NUM_PROCESSES": str(n),
         "TMDIFF_PROCESS_ID": str(pid), "TMDIFF_INIT_TIMEOUT": "60"}
  env.update(extra)
  return env


def run_processes(commands, envs, timeout=300):
  """Starts one process per command; -> [(returncode, output)]; kills all on timeout."""
  procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for cmd, env in zip(commands, envs)]
  deadline, results = time.time() + timeout, []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=max(1, deadline - time.time()))
      results.append((p.returncode, out))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return results


def worker(spec):
  """One process: join, then run each phase (`stop_after` or None) of training in `workdir`."""
  from tmdiff.train import distributed
  distributed.initialize_from_env()
  from tmdiff.train import checkpoint, loop
  config = make_config({**OVERRIDES, **spec.get("overrides", {})})
  for stop_after in spec["phases"]:
    start = checkpoint.make_manager(spec["workdir"], read_only=True).latest_step() if \
        os.path.isdir(checkpoint.checkpoint_dir(spec["workdir"])) else None
    tick = time.time()
    loop.train(config, spec["workdir"], stop_after=stop_after, data_shards=spec["data_shards"])
    print(f"PHASE from checkpoint {start} to {stop_after or 'the end'}: {time.time() - tick:.1f} s",
          flush=True)


def read_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in records if r["split"] == "train"}


def test_two_processes_train_checkpoint_and_resume_like_one_process(tmp_path):
  import jax
  from tmdiff.train import loop
  assert len(jax.devices()) == 8 and jax.process_count() == 1
  spec = {"workdir": str(tmp_path / "two"), "phases": [4, None], "data_shards": 2}
  port = free_port()
  cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jit_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  cmd = [sys.executable, os.path.abspath(__file__), "worker", json.dumps(spec)]
  procs = [subprocess.Popen(cmd, cwd=ROOT, env=process_env(pid, port, **cache),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for pid in range(2)]
  # The 1-process x 8-device reference, with the same 2 data shards, while they run.
  loop.train(make_config(), str(tmp_path / "one"), data_shards=2)
  outputs = []
  for p in procs:
    out, _ = p.communicate(timeout=600)  # 95 s alone on 2 cores; more when the host is shared
    outputs.append(out)
    assert p.returncode == 0, out[-3000:]
  one, two = read_losses(tmp_path / "one"), read_losses(tmp_path / "two")
  assert sorted(one) == sorted(two) == [1, 2, 3, 4, 5, 6]
  print("1x8 losses", [one[s] for s in one], "\n2x4 losses", [two[s] for s in one])
  np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=1e-5)
  # Phase 1 stopped after step 4 (checkpoint 4); phase 2 restored it, iterator state included.
  for out in outputs:
    assert "PHASE from checkpoint None to 4" in out and "PHASE from checkpoint 4 to the end" in out
    print("\n".join(line for line in out.splitlines() if line.startswith("PHASE")))
  with open(tmp_path / "one" / loop.EVAL_REPORT) as f1, \
       open(tmp_path / "two" / loop.EVAL_REPORT) as f2:
    e1, e2 = json.load(f1), json.load(f2)
  assert e1["step"] == e2["step"] == 6
  np.testing.assert_allclose([e2[k] for k in e1], [e1[k] for k in e1], rtol=1e-5)


def _cli(workdir, **overrides):
  flags = [f"--config.{k}={v}" for k, v in {**OVERRIDES, **overrides}.items()]
  return [sys.executable, "-m", "tmdiff.train", "--config=experiments/tiny.py",
          f"--workdir={workdir}", *flags]


def test_processes_with_different_configs_fail_clearly(tmp_path):
  port = free_port()
  results = run_processes(
      [_cli(tmp_path), _cli(tmp_path, **{"optim.lr": 0.02})],
      [process_env(0, port), process_env(1, port)], timeout=120)
  for pid, (code, out) in enumerate(results):
    assert code != 0, out[-2000:]
    assert "ConfigMismatchError: processes disagree on the config" in out, out[-2000:]
    assert "processes [0]" in out and f"this is process {pid}" in out
    assert "processes [1] have config sha256" in out and "(optim.lr=0.02 vs process 0)" in out
  assert not (tmp_path / "checkpoints").exists()


def test_unreachable_coordinator_fails_quickly_and_names_it(tmp_path):
  port = free_port()  # nothing listens there
  start = time.time()
  (code, out), = run_processes([_cli(tmp_path)],
                               [process_env(1, port, TMDIFF_INIT_TIMEOUT="2")], timeout=60)
  assert code != 0
  assert f"coordinator 127.0.0.1:{port} unreachable after 2 s" in out, out[-2000:]
  assert time.time() - start < 30


def test_plan_from_env():
  from tmdiff.train import distributed as d
  assert d.plan_from_env({}).mode == "single"
  plan = d.plan_from_env({"TMDIFF_COORDINATOR": "10.0.0.1:1234", "TMDIFF_NUM_PROCESSES": "4",
                          "TMDIFF_PROCESS_ID": "3", "SLURM_PROCID": "0", "SLURM_NTASKS": "9"})
  assert plan == d.Plan("explicit", "10.0.0.1:1234", 4, 3, d.DEFAULT_TIMEOUT_S)
  plan = d.plan_from_env({"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "4097",
                          "SLURM_JOB_NODELIST": "gpu[007-010],cpu1",
                          "SLURM_STEP_NODELIST": "gpu[008-009,011]", "TMDIFF_INIT_TIMEOUT": "9"})
  assert plan == d.Plan("slurm", "gpu008:61001", 4, 2, 9)
  assert d.plan_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1",
                          "SLURM_JOB_NODELIST": "a1"}).mode == "single"
  assert d.plan_from_env({"TPU_WORKER_HOSTNAMES": "a,b"}).mode == "tpu"
  assert d.plan_from_env({"TMDIFF_DISTRIBUTED": "none", "TPU_WORKER_HOSTNAMES": "a"}).mode == "single"
  assert d.expand_nodelist("n[1-3],m[08-10,15],x") == [
      "n1", "n2", "n3", "m08", "m09", "m10", "m15", "x"]
  with pytest.raises(d.DistributedError, match="TMDIFF_PROCESS_ID"):
    d.plan_from_env({"TMDIFF_COORDINATOR": "h:1", "TMDIFF_NUM_PROCESSES": "2"})
  with pytest.raises(d.DistributedError, match="host:port"):
    d.plan_from_env({"TMDIFF_COORDINATOR": "h", "TMDIFF_NUM_PROCESSES": "2",
                     "TMDIFF_PROCESS_ID": "0"})
  with pytest.raises(d.DistributedError, match=r"outside \[0, TMDIFF_NUM_PROCESSES=2\)"):
    d.plan_from_env({"TMDIFF_COORDINATOR": "h:1", "TMDIFF_NUM_PROCESSES": "2",
                     "TMDIFF_PROCESS_ID": "2"})


def test_data_shards_fix_the_global_batch():
  """Two shards read by one process = the rows two processes would read, in order."""
  from tmdiff.data import pipeline
  from tmdiff.train import distributed as d
  c = make_config()
  both = next(d.ShardedIterator(
      lambda i, n: iter(pipeline.make_dataset(c, "train", process_index=i, process_count=n)), 2))
  halves = [next(iter(pipeline.make_dataset(c, "train", process_index=i, process_count=2)))
            for i in range(2)]
  for key, value in both.items():
    np.testing.assert_array_equal(value, np.concatenate([h[key] for h in halves]))
  with pytest.raises(d.DistributedError, match="resume with the same number of data shards"):
    d.ShardedIterator(lambda i, n: None, 3).set_state({"num_shards": 2, "shards": {}})


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
  sys.path.insert(0, ROOT)
  worker(json.loads(sys.argv[2]))
