"""Launchers: dry runs print exactly what would run; flag bundles parse; preflight fails clearly."""
import importlib.util
import os
import shlex
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch", "launch.py")
CONFIG = "--config=experiments/tiny.py:synthetic"
OVERRIDES = ["--config.train.steps=17", "--config.optim.lr=0.002"]


def launch(*args, env=None, check=True):
  result = subprocess.run([sys.executable, LAUNCH, *args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": ROOT, **(env or {})},
                          timeout=120)
  if check:
    assert result.returncode == 0, result.stderr + result.stdout
  return result


def load_launcher():
  spec = importlib.util.spec_from_file_location("tmdiff_launch", LAUNCH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def train_part(line):
  """The `python -m tmdiff.train ...` words of a shell line."""
  words = shlex.split(line)
  return words[words.index("-m") - 1:]


def test_local_multi_process_dry_run():
  out = launch("local", CONFIG, "--workdir=runs/t", "--num_processes=2",
               "--devices_per_process=4", "--port=4321", "--dry_run", *OVERRIDES).stdout
  lines = [l for l in out.splitlines() if not l.startswith("#")]
  assert len(lines) == 2
  for pid, line in enumerate(lines):
    assert (f"TMDIFF_COORDINATOR=127.0.0.1:4321 TMDIFF_NUM_PROCESSES=2 TMDIFF_PROCESS_ID={pid} "
            in line)
    assert "JAX_PLATFORMS=cpu XLA_FLAGS=--xla_force_host_platform_device_count=4" in line
    argv = train_part(line)
    assert argv[1:] == ["-m", "tmdiff.train", CONFIG,
                        f"--workdir={os.path.join(ROOT, 'runs', 't')}", *OVERRIDES]


def test_local_single_process_dry_run_has_no_distributed_env():
  out = launch("local", CONFIG, "--workdir=/tmp/x", "--dry_run", *OVERRIDES).stdout
  line, = [l for l in out.splitlines() if not l.startswith("#")]
  assert "TMDIFF_" not in line and line.endswith(" ".join(OVERRIDES))


def test_slurm_script():
  script = launch("slurm", CONFIG, "--workdir=/ckpt/run", "--nodes=4", "--gpus_per_node=8",
                  "--partition=h100", "--remote_dir=~/tmdiff", "--env=NCCL_DEBUG=WARN",
                  "--dry_run", *OVERRIDES).stdout
  for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
               "#SBATCH --partition=h100", "cd ~/tmdiff", "export NCCL_DEBUG=WARN",
               "#SBATCH --signal=USR1@120"):
    assert line in script.splitlines(), script
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in script
  srun, = [l for l in script.splitlines() if l.startswith("srun")]
  assert train_part(srun) == ["python", "-m", "tmdiff.train", CONFIG, "--workdir=/ckpt/run",
                              *OVERRIDES]
  assert "--kill-on-bad-exit=1" in srun
  # The script is valid bash.
  subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_slurm_validates_the_mesh_for_the_job_size():
  ok = ["--config.mesh.data=1", "--config.mesh.fsdp=-1"]
  launch("slurm", CONFIG, "--workdir=/w", "--nodes=2", "--gpus_per_node=4", "--dry_run",
         "--validate_devices", *ok)
  bad = launch("slurm", CONFIG, "--workdir=/w", "--nodes=3", "--gpus_per_node=4", "--dry_run",
               "--validate_devices", "--config.mesh.data=8", check=False)
  assert bad.returncode != 0 and "config invalid for 12 devices" in bad.stderr


def test_xpk_and_gcloud_commands():
  out = launch("xpk", CONFIG, "--workdir=gs://b/run", "--cluster=c1", "--workload=w1",
               "--tpu_type=v5p-64", "--num_slices=2", "--docker_image=gcr.io/p/tmdiff:1",
               "--project=p", "--zone=z", "--dry_run", *OVERRIDES).stdout
  words = shlex.split(out)
  assert words[:3] == ["xpk", "workload", "create"]
  for flag in ("--cluster=c1", "--workload=w1", "--tpu-type=v5p-64", "--num-slices=2",
               "--docker-image=gcr.io/p/tmdiff:1", "--project=p", "--zone=z"):
    assert flag in words
  command, = [w[len("--command="):] for w in words if w.startswith("--command=")]
  inner = shlex.split(command)
  assert "TMDIFF_DISTRIBUTED=tpu" in inner
  assert any(w.startswith("LIBTPU_INIT_ARGS=--xla_tpu_") for w in inner)
  assert inner[inner.index("-m") - 1:] == ["python3", "-m", "tmdiff.train", CONFIG,
                                            "--workdir=gs://b/run", *OVERRIDES]

  out = launch("gcloud", CONFIG, "--workdir=gs://b/run", "--tpu_name=pod", "--zone=z",
               "--remote_dir=/opt/tmdiff", "--dry_run", *OVERRIDES).stdout
  words = shlex.split(out)
  assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
  assert "--worker=all" in words and "--zone=z" in words
  command, = [w[len("--command="):] for w in words if w.startswith("--command=")]
  assert command.startswith("cd /opt/tmdiff && ")
  assert shlex.split(command)[-len(OVERRIDES):] == OVERRIDES


def test_jobset_yaml():
  yaml = pytest.importorskip("yaml")
  text = launch("jobset", CONFIG, "--workdir=/ckpt/run", "--nodes=2", "--gpus_per_node=8",
                "--image=img:1", "--job_name=tm", "--dry_run", *OVERRIDES).stdout
  doc = yaml.safe_load(text)
  job = doc["spec"]["replicatedJobs"][0]["template"]["spec"]
  assert job["parallelism"] == job["completions"] == 2 and job["completionMode"] == "Indexed"
  container = job["template"]["spec"]["containers"][0]
  assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
  env = {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
  assert env["TMDIFF_NUM_PROCESSES"] == "2"
  assert env["TMDIFF_COORDINATOR"] == "tm-workers-0-0.tm:12355"
  assert "job-completion-index" in env["TMDIFF_PROCESS_ID"]["fieldRef"]["fieldPath"]
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in env["XLA_FLAGS"]
  assert train_part(container["command"][2]) == ["python", "-m", "tmdiff.train", CONFIG,
                                                "--workdir=/ckpt/run", *OVERRIDES]
  # The scheduler's SIGTERM reaches python (exec'd as PID 1), with time to save.
  assert container["command"][2].startswith("exec python ")
  assert job["template"]["spec"]["terminationGracePeriodSeconds"] == 120


def test_config_typos_and_missing_files_fail_before_launching():
  bad = launch("slurm", CONFIG, "--workdir=/w", "--nodes=1", "--dry_run",
               "--config.train.stepz=3", check=False)
  assert bad.returncode != 0 and 'Did you mean "steps"' in bad.stderr
  bad = launch("local", "--config=experiments/nope.py", "--workdir=/w", "--dry_run", check=False)
  assert bad.returncode != 0 and "no experiment file 'experiments/nope.py'" in bad.stderr


def test_gpu_flag_bundle_parses_in_the_installed_xla():
  launch_lib = load_launcher()
  flags = " ".join(launch_lib.XLA_FLAG_BUNDLES["gpu"]["flags"])
  code = "import jax; jax.numpy.ones(2).block_until_ready()"
  subprocess.run([sys.executable, "-c", code], check=True, timeout=120,
                 env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags})
  bad = subprocess.run([sys.executable, "-c", code], timeout=120, capture_output=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_bogus=1"})
  assert bad.returncode != 0  # so the check above means something


def test_tpu_flag_bundle_parses_in_libtpu():
  pytest.importorskip("libtpu")
  launch_lib = load_launcher()
  code = ("from jax.experimental import topologies; "
          "topologies.get_topology_desc(topology_name='v5p:2x2x1', platform='tpu')")
  for flags, ok in ((" ".join(launch_lib.XLA_FLAG_BUNDLES["tpu"]["flags"]), True),
                    ("--xla_tpu_bogus=true", False)):
    result = subprocess.run([sys.executable, "-c", code], timeout=120, capture_output=True,
                            text=True, env={**os.environ, "LIBTPU_INIT_ARGS": flags,
                                                     "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"})
    assert (result.returncode == 0) == ok, result.stderr[-2000:]


def test_preflight_reports_and_fails_on_a_failed_check():
  out = launch("preflight", "--expect_devices=8", CONFIG, "--config.mesh.data=8").stdout
  for name in ("version jax", "version flax", "version optax", "version orbax-checkpoint",
               "version grain", "devices", "device count", "host memory", "config"):
    assert any(l.split(None, 1)[1].startswith(name) for l in out.splitlines()[1:-1]), out
  assert out.strip().endswith("all checks passed")
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  bad = launch("preflight", "--expect_devices=3", f"--coordinator=127.0.0.1:{port}",
               "--timeout=0.5", check=False)
  assert bad.returncode == 1
  assert "FAIL  device count" in bad.stdout and "8 found, 3 expected" in bad.stdout
  assert f"coordinator 127.0.0.1:{port} unreachable" in bad.stdout
  assert "FAILED: coordinator, device count" in bad.stdout
