"""Launch tmdiff training here, on a TPU pod, or on a GPU cluster; check a machine first.

  python launch/launch.py local   --config=experiments/tiny.py --workdir=runs/x [--num_processes=2]
  python launch/launch.py xpk     --config=experiments/x.py:size=m --workdir=gs://b/x \\
      --cluster=C --workload=W --tpu_type=v5p-64 --docker_image=IMG
  python launch/launch.py gcloud  --config=... --workdir=... --tpu_name=N --zone=Z --project=P
  python launch/launch.py slurm   --config=... --workdir=... --nodes=4 --gpus_per_node=8
  python launch/launch.py jobset  --config=... --workdir=... --nodes=4 --gpus_per_node=8 --image=IMG
  python launch/launch.py preflight [--hardware=gpu] [--expect_devices=8] [--coordinator=h:p]

Any `--config.a.b=value` argument is an override passed to every process. `--dry_run` prints
exactly what would run (commands, environment, scripts) and runs nothing. Every launcher parses
the experiment file with its overrides first, so a typo fails here rather than on the pod.
"""
from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_MODULE = "tmdiff.train"

# XLA flag bundles per hardware: the environment variable that carries them, and the flags.
# GPU flags are checked against the installed jaxlib and TPU flags against libtpu in
# tests/test_launch.py (XLA aborts on an unknown flag).
XLA_FLAG_BUNDLES = {
    "cpu": {"env": "XLA_FLAGS", "flags": []},
    "gpu": {"env": "XLA_FLAGS", "flags": [
        "--xla_gpu_enable_latency_hiding_scheduler=true",  # overlap collectives with compute
        "--xla_gpu_enable_triton_gemm=false",  # cuBLAS GEMMs
        "--xla_gpu_enable_highest_priority_async_stream=true",
        "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
        "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
        "--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864",
        "--xla_gpu_enable_pipelined_all_gather=true",  # FSDP gathers ahead of the layer
        "--xla_gpu_enable_pipelined_reduce_scatter=true",
        "--xla_gpu_enable_pipelined_all_reduce=true",
        "--xla_gpu_enable_while_loop_double_buffering=true",
    ]},
    "tpu": {"env": "LIBTPU_INIT_ARGS", "flags": [
        "--xla_tpu_enable_async_collective_fusion=true",
        "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
        "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
        "--xla_tpu_overlap_compute_collective_tc=true",
        "--xla_enable_async_all_gather=true",
        "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
        "--xla_tpu_data_parallel_opt_different_sized_ops=true",
    ]},
}
VERSIONED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
                      "ml_collections", "tensorstore")
REQUIRED_PACKAGES = ("jax", "flax", "optax", "orbax-checkpoint", "grain")
# Seconds between a scheduler's stop notice and its kill: tmdiff.train then finishes its step
# and saves a checkpoint (SLURM: SIGUSR1 before the time limit; Kubernetes: SIGTERM's grace).
PREEMPT_NOTICE_S = 120


class LaunchError(SystemExit):
  def __init__(self, message):
    super().__init__(f"launch: {message}")


# ---- shared pieces ----

def split_overrides(argv):
  """-> (other args, ['--config.a.b=v', ...]); an override needs '=value'."""
  rest, overrides = [], []
  for arg in argv:
    if arg.startswith("--config."):
      if "=" not in arg:
        raise LaunchError(f"override {arg!r} needs a value: --config.section.key=value")
      overrides.append(arg)
    else:
      rest.append(arg)
  return rest, overrides


def check_config(config_arg: str, overrides, num_devices: int | None = None):
  """Parses the experiment file with the overrides (and validates for `num_devices` if known)."""
  path = config_arg.split(":", 1)[0]
  if not os.path.isfile(os.path.join(ROOT, path)) and not os.path.isfile(path):
    raise LaunchError(f"no experiment file {path!r} (paths are relative to the repository root)")
  from absl import flags
  from ml_collections import config_flags
  sys.path.insert(0, ROOT)
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "experiment", flag_values=values,
                                  lock_config=True)
  cwd = os.getcwd()
  try:
    os.chdir(ROOT if os.path.isfile(os.path.join(ROOT, path)) else cwd)
    values([sys.argv[0], f"--config={config_arg}", *overrides])
    config = values.config
  except Exception as e:  # absl/ml_collections raise several types; name the input
    detail = e.args[0] if isinstance(e, KeyError) and e.args else e
    raise LaunchError(f"bad config {config_arg!r} with overrides {overrides}: {detail}") from None
  finally:
    os.chdir(cwd)
  if num_devices:
    from tmdiff.configs import validate
    try:
      validate.validate(config, num_devices)
    except Exception as e:
      raise LaunchError(f"config invalid for {num_devices} devices: {e}") from None
  return config


def train_argv(args, overrides, python="python"):
  argv = [python, "-m", TRAIN_MODULE, f"--config={args.config}", f"--workdir={args.workdir}"]
  if getattr(args, "data_shards", None):
    argv.append(f"--data_shards={args.data_shards}")
  return argv + list(overrides)


def hardware_env(hardware: str, extra=()) -> dict:
  bundle = XLA_FLAG_BUNDLES[hardware]
  env = {bundle["env"]: " ".join(bundle["flags"])} if bundle["flags"] else {}
  for item in extra:
    key, sep, value = item.partition("=")
    if not sep or not key:
      raise LaunchError(f"--env {item!r}: expected KEY=VALUE")
    if key == bundle["env"] and key in env:  # user flags come after the bundle's, so they win
      value = f"{env[key]} {value}"
    env[key] = value
  return env


def shell_line(env: dict, argv) -> str:
  exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
  return (exports + " " if exports else "") + " ".join(shlex.quote(a) for a in argv)


def cd_line(path: str) -> str:
  """`cd path`, keeping a leading ~/ unquoted so the remote shell expands it."""
  if path == "~" or path.startswith("~/"):
    return "cd ~" + ("/" + shlex.quote(path[2:]) if path[2:] else "")
  return f"cd {shlex.quote(path)}"


def local_paths(args) -> None:
  """Local processes run in the repository root: make --workdir and --config absolute."""
  args.workdir = os.path.abspath(args.workdir)
  path, sep, arg = args.config.partition(":")
  if os.path.isfile(path) and not os.path.isfile(os.path.join(ROOT, path)):
    args.config = os.path.abspath(path) + sep + arg


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def tpu_chips(tpu_type: str) -> int:
  """'v5p-64' -> 32 chips (v2-v5p count TensorCores, v5e/v6e count chips)."""
  name, _, count = tpu_type.rpartition("-")
  if not count.isdigit():
    raise LaunchError(f"--tpu_type {tpu_type!r}: expected e.g. v5p-64, v5litepod-16, v6e-8")
  cores_per_chip = 2 if name in ("v2", "v3", "v4", "v5p") else 1
  return int(count) // cores_per_chip


# ---- local ----

def cmd_local(args, overrides):
  local_paths(args)
  check_config(args.config, overrides)
  n = args.num_processes
  env = hardware_env(args.hardware, args.env)
  if n == 1:
    plans = [(env, train_argv(args, overrides, sys.executable))]
  else:
    port = args.port or free_port()
    plans = []
    for pid in range(n):
      penv = dict(env, TMDIFF_COORDINATOR=f"127.0.0.1:{port}", TMDIFF_NUM_PROCESSES=str(n),
                  TMDIFF_PROCESS_ID=str(pid))
      if args.hardware == "cpu":
        penv["JAX_PLATFORMS"] = "cpu"
        if args.devices_per_process:
          flags_ = penv.get("XLA_FLAGS", "")
          penv["XLA_FLAGS"] = (flags_ + " --xla_force_host_platform_device_count="
                               f"{args.devices_per_process}").strip()
      elif args.hardware == "gpu" and args.devices_per_process:
        first = pid * args.devices_per_process
        penv["CUDA_VISIBLE_DEVICES"] = ",".join(
            str(first + i) for i in range(args.devices_per_process))
      plans.append((penv, train_argv(args, overrides, sys.executable)))
  if args.dry_run:
    print(f"# local: {n} process(es), cwd {ROOT}")
    for env_, argv in plans:
      print(shell_line(env_, argv))
    return 0
  procs = [subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **env_}) for env_, argv in plans]
  # Wait for all; if one fails, stop the others rather than leave them blocked in a collective.
  codes = [None] * n
  while any(c is None for c in codes):
    for i, p in enumerate(procs):
      if codes[i] is None:
        codes[i] = p.poll()
        if codes[i] not in (None, 0):
          for q in procs:
            if q.poll() is None:
              q.terminate()
    time.sleep(0.2)
  bad = [(i, c) for i, c in enumerate(codes) if c]
  if bad:
    print(f"launch: processes failed (id, exit code): {bad}", file=sys.stderr)
    return 1
  return 0


# ---- TPU pod ----

def tpu_command(args, overrides) -> str:
  """The shell line every TPU worker runs; JAX detects the pod (TMDIFF_DISTRIBUTED=tpu)."""
  env = dict(hardware_env("tpu", args.env), TMDIFF_DISTRIBUTED="tpu")
  return shell_line(env, train_argv(args, overrides, "python3"))


def cmd_xpk(args, overrides):
  check_config(args.config, overrides,
               tpu_chips(args.tpu_type) * args.num_slices if args.validate_devices else None)
  argv = ["xpk", "workload", "create", f"--cluster={args.cluster}", f"--workload={args.workload}",
          f"--tpu-type={args.tpu_type}", f"--num-slices={args.num_slices}",
          f"--docker-image={args.docker_image}"]
  argv += [f"--project={args.project}"] if args.project else []
  argv += [f"--zone={args.zone}"] if args.zone else []
  argv += [f"--command={tpu_command(args, overrides)}"]
  return _run_or_print(argv, args.dry_run)


def cmd_gcloud(args, overrides):
  check_config(args.config, overrides)
  remote = f"{cd_line(args.remote_dir)} && {tpu_command(args, overrides)}"
  argv = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu_name, "--worker=all"]
  argv += [f"--zone={args.zone}"] if args.zone else []
  argv += [f"--project={args.project}"] if args.project else []
  argv += [f"--command={remote}"]
  return _run_or_print(argv, args.dry_run)


def _run_or_print(argv, dry_run: bool) -> int:
  if dry_run:
    print(" ".join(shlex.quote(a) for a in argv))
    return 0
  return subprocess.run(argv, check=False).returncode


# ---- GPU cluster ----

def slurm_script(args, overrides) -> str:
  env = hardware_env("gpu", args.env)
  lines = ["#!/bin/bash", f"#SBATCH --job-name={args.job_name}", f"#SBATCH --nodes={args.nodes}",
           "#SBATCH --ntasks-per-node=1",  # one JAX process per node drives all its GPUs
           f"#SBATCH --gpus-per-node={args.gpus_per_node}",
           f"#SBATCH --cpus-per-task={args.cpus_per_task}", f"#SBATCH --time={args.time}",
           "#SBATCH --exclusive", f"#SBATCH --output={args.log_dir}/%x-%j.out",
           # SIGUSR1 to every task before the time limit: save and exit 0 (srun forwards
           # SIGTERM from scancel or preemption too).
           f"#SBATCH --signal=USR1@{args.preempt_notice_s}"]
  lines += [f"#SBATCH --partition={args.partition}"] if args.partition else []
  lines += [f"#SBATCH --account={args.account}"] if args.account else []
  lines += ["", "set -euo pipefail", cd_line(args.remote_dir)]
  lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
  lines += ["# tmdiff.train joins via SLURM_PROCID/SLURM_NTASKS/SLURM_STEP_NODELIST "
            "(coordinator: first node)",
            f"srun --kill-on-bad-exit=1 {shell_line({}, train_argv(args, overrides, 'python'))}",
            ""]
  return "\n".join(lines)


def cmd_slurm(args, overrides):
  check_config(args.config, overrides,
               args.nodes * args.gpus_per_node if args.validate_devices else None)
  script = slurm_script(args, overrides)
  if args.dry_run:
    print(script, end="")
    return 0
  os.makedirs(args.log_dir, exist_ok=True)
  path = os.path.join(args.log_dir, f"{args.job_name}.sbatch")
  with open(path, "w") as f:
    f.write(script)
  print(f"launch: wrote {path}")
  return subprocess.run(["sbatch", path], check=False).returncode


def jobset_yaml(args, overrides) -> str:
  """A Kubernetes JobSet: one indexed pod per node; process id from the completion index."""
  name, port = args.job_name, 12355
  env = dict(hardware_env("gpu", args.env), TMDIFF_NUM_PROCESSES=str(args.nodes),
             TMDIFF_COORDINATOR=f"{name}-workers-0-0.{name}:{port}")
  # exec: python, not bash, is the container's PID 1 and receives SIGTERM.
  command = "exec " + shell_line({}, train_argv(args, overrides, "python"))
  env_lines = "".join(f"              - name: {k}\n                value: {_yaml_str(v)}\n"
                      for k, v in env.items())
  return f"""apiVersion: jobset.x-k8s.io/v1alpha2
kind: JobSet
metadata:
  name: {name}
spec:
  network:
    enableDNSHostnames: true
  failurePolicy:
    maxRestarts: {args.max_restarts}
  replicatedJobs:
  - name: workers
    replicas: 1
    template:
      spec:
        parallelism: {args.nodes}
        completions: {args.nodes}
        completionMode: Indexed
        backoffLimit: 0
        template:
          spec:
            restartPolicy: Never
            terminationGracePeriodSeconds: {args.preempt_notice_s}
            containers:
            - name: train
              image: {args.image}
              workingDir: {args.remote_dir}
              command: ["bash", "-c", {_yaml_str(command)}]
              ports:
              - containerPort: {port}
              resources:
                limits:
                  nvidia.com/gpu: {args.gpus_per_node}
              env:
              - name: TMDIFF_PROCESS_ID
                valueFrom:
                  fieldRef:
                    fieldPath: metadata.annotations['batch.kubernetes.io/job-completion-index']
{env_lines}"""


def _yaml_str(value: str) -> str:
  return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def cmd_jobset(args, overrides):
  check_config(args.config, overrides,
               args.nodes * args.gpus_per_node if args.validate_devices else None)
  text = jobset_yaml(args, overrides)
  if args.dry_run:
    print(text, end="")
    return 0
  return subprocess.run(["kubectl", "apply", "-f", "-"], input=text, text=True,
                        check=False).returncode


# ---- preflight ----

def cmd_preflight(args, overrides):
  """Prints a report of checks; exit status 1 if any failed."""
  rows = []

  def check(name, ok, detail):
    rows.append((("ok" if ok else "FAIL") if ok is not None else "info", name, detail))

  from importlib import metadata
  for pkg in VERSIONED_PACKAGES:
    try:
      check(f"version {pkg}", True, metadata.version(pkg))
    except metadata.PackageNotFoundError:
      check(f"version {pkg}", False if pkg in REQUIRED_PACKAGES else None, "not installed")
  env = hardware_env(args.hardware, args.env)
  for key, value in env.items():  # flags apply to this check too
    os.environ.setdefault(key, value)
  sys.path.insert(0, ROOT)
  from tmdiff.train import distributed
  try:
    plan = distributed.plan_from_env()
    check("distributed plan", True, f"{plan.mode}, {plan.num_processes} process(es), "
          f"id {plan.process_id}, coordinator {plan.coordinator}")
  except distributed.DistributedError as e:
    plan = None
    check("distributed plan", False, str(e))
  coordinator = args.coordinator or (plan.coordinator if plan else None)
  if args.join and plan is not None:  # every process of the job must run preflight --join
    try:
      distributed.initialize_from_env()
      check("join", True, "jax.distributed initialised")
    except distributed.DistributedError as e:
      check("join", False, str(e))
  elif coordinator and not (plan and plan.process_id == 0 and not args.coordinator):
    try:
      distributed.wait_for_coordinator(coordinator, args.timeout)
      check("coordinator", True, f"{coordinator} accepts connections")
    except distributed.CoordinatorUnreachableError as e:
      check("coordinator", False, str(e))
  try:
    import jax
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    check("devices", True, f"{len(devices)} x {', '.join(kinds)} ({devices[0].platform}), "
          f"{jax.local_device_count()} local, {jax.process_count()} process(es)")
    if args.expect_devices is not None:
      check("device count", len(devices) == args.expect_devices,
            f"{len(devices)} found, {args.expect_devices} expected")
    if args.hardware != "cpu":
      check("platform", devices[0].platform == args.hardware,
            f"{devices[0].platform} found, {args.hardware} expected")
    stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
    if stats and "bytes_limit" in stats:
      gib = stats["bytes_limit"] / 2**30
      check("device memory", gib >= args.min_device_memory_gib if args.min_device_memory_gib
            else True, f"{gib:.1f} GiB per device (limit)")
    else:
      check("device memory", None, "not reported on this platform")
    x = jax.numpy.ones((256, 256))
    check("compute", bool(float((x @ x)[0, 0]) == 256.0), "256x256 matmul")
  except Exception as e:  # any backend failure is the finding
    check("devices", False, f"{type(e).__name__}: {e}")
  try:
    host_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    check("host memory", host_gib >= args.min_host_memory_gib, f"{host_gib:.1f} GiB")
  except (ValueError, OSError):
    check("host memory", None, "unknown")
  if args.config:
    try:
      check_config(args.config, overrides,
                   len(devices) if "devices" in locals() else None)
      check("config", True, f"{args.config} {' '.join(overrides)}".strip())
    except LaunchError as e:
      check("config", False, str(e.code))
  width = max(len(r[1]) for r in rows)
  print("tmdiff preflight")
  for status, name, detail in rows:
    print(f"  {status:4}  {name:<{width}}  {detail}")
  failed = [r[1] for r in rows if r[0] == "FAIL"]
  print(f"FAILED: {', '.join(failed)}" if failed else "all checks passed")
  return 1 if failed else 0


# ---- command line ----

def parser():
  p = argparse.ArgumentParser(prog="launch.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)

  def common(sp, hardware=None):
    sp.add_argument("--config", required=True, help="experiment file[:arg]")
    sp.add_argument("--workdir", required=True, help="run directory (as the workers see it)")
    sp.add_argument("--data_shards", type=int, help="passed to tmdiff.train")
    sp.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="extra environment (XLA_FLAGS/LIBTPU_INIT_ARGS append to the bundle)")
    sp.add_argument("--dry_run", action="store_true", help="print what would run; run nothing")
    if hardware is None:
      sp.add_argument("--hardware", choices=sorted(XLA_FLAG_BUNDLES), default="cpu")
    sp.set_defaults(hardware=hardware or "cpu")

  local = sub.add_parser("local", help="single or multi-process on this host")
  common(local)
  local.add_argument("--num_processes", type=int, default=1)
  local.add_argument("--devices_per_process", type=int,
                     help="cpu: fake devices per process; gpu: GPUs per process")
  local.add_argument("--port", type=int, help="coordinator port (default: a free one)")

  for name, hw, help_ in (("xpk", "tpu", "TPU pod via xpk workload create"),
                          ("gcloud", "tpu", "TPU VM: gcloud ssh to all workers"),
                          ("slurm", "gpu", "GPU cluster: an sbatch script"),
                          ("jobset", "gpu", "GPU on Kubernetes: a JobSet")):
    sp = sub.add_parser(name, help=help_)
    common(sp, hw)
    if name in ("xpk", "slurm", "jobset"):
      sp.add_argument("--validate_devices", action="store_true",
                      help="also validate the mesh for the job's device count (imports jax)")
    if name != "xpk":
      sp.add_argument("--remote_dir", default="~/tmdiff", help="repository on the workers")
    if name == "xpk":
      sp.add_argument("--cluster", required=True)
      sp.add_argument("--workload", required=True)
      sp.add_argument("--tpu_type", required=True, help="e.g. v5p-64")
      sp.add_argument("--num_slices", type=int, default=1)
      sp.add_argument("--docker_image", required=True)
    if name == "gcloud":
      sp.add_argument("--tpu_name", required=True)
    if name in ("xpk", "gcloud"):
      sp.add_argument("--project")
      sp.add_argument("--zone")
    if name in ("slurm", "jobset"):
      sp.add_argument("--nodes", type=int, required=True)
      sp.add_argument("--gpus_per_node", type=int, default=8)
      sp.add_argument("--job_name", default="tmdiff")
      sp.add_argument("--preempt_notice_s", type=int, default=PREEMPT_NOTICE_S,
                      help="seconds from the stop signal to the kill, to save a checkpoint")
    if name == "slurm":
      sp.add_argument("--partition")
      sp.add_argument("--account")
      sp.add_argument("--time", default="24:00:00")
      sp.add_argument("--cpus_per_task", type=int, default=16)
      sp.add_argument("--log_dir", default="slurm_logs")
    if name == "jobset":
      sp.add_argument("--image", required=True)
      sp.add_argument("--max_restarts", type=int, default=3)

  pre = sub.add_parser("preflight", help="check devices, memory, coordinator, versions")
  pre.add_argument("--hardware", choices=sorted(XLA_FLAG_BUNDLES), default="cpu")
  pre.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
  pre.add_argument("--expect_devices", type=int, help="fail unless jax sees this many")
  pre.add_argument("--min_device_memory_gib", type=float, default=0.0)
  pre.add_argument("--min_host_memory_gib", type=float, default=1.0)
  pre.add_argument("--coordinator", help="host:port to check (default: from the environment)")
  pre.add_argument("--timeout", type=float, default=5.0, help="coordinator check, seconds")
  pre.add_argument("--join", action="store_true",
                   help="join the multi-process job the environment describes (run it on every "
                   "host) so device counts are global")
  pre.add_argument("--config", help="also parse and validate this experiment file")
  return p


COMMANDS = {"local": cmd_local, "xpk": cmd_xpk, "gcloud": cmd_gcloud, "slurm": cmd_slurm,
            "jobset": cmd_jobset, "preflight": cmd_preflight}


def main(argv=None) -> int:
  rest, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
  args = parser().parse_args(rest)
  if overrides and args.command == "preflight" and not args.config:
    raise LaunchError("overrides given without --config")
  return COMMANDS[args.command](args, overrides)


if __name__ == "__main__":
  sys.exit(main())
