"""Scaling sweeps: expand a sweep file into runs, run them here in sequence or print their launch
commands, then collect one runs table and fit scaling laws to it.

  # run every point here, one after another (resumable: finished runs are skipped), then
  # collect runs.csv / runs.json and write fits.json and plots into --out
  python -m tmdiff.scaling.sweep --sweep=experiments/sweeps/tiny_ladder.py:runs/data \\
      --root=runs/sweeps/tiny --out=docs/img/tiny_ladder
  # print one launch/launch.py command per run instead (local | slurm | xpk)
  python -m tmdiff.scaling.sweep --sweep=experiments/sweeps/ladder.py --root=/shared/ladder \\
      --emit=slurm --launch_args="--partition=p --account=a"
  # only collect and fit what the workdirs hold
  python -m tmdiff.scaling.sweep --sweep=experiments/sweeps/tiny_ladder.py --root=... --collect_only

A sweep file is a python file with `get_sweep(arg) -> Sweep`: a name and a list of `Run`s, each an
experiment file[:arg] plus overrides `{"section.key": value}` (the same as `--config.section.key=value`
on the command line). `product(config, size={...}, horizon={...})` builds the runs of a grid; each
axis maps a name fragment to its overrides, and a run's name joins its fragments. Every run gets its own workdir
`root/<run name>` holding `sweep_run.json` (how it was made) and `config.json` (the resolved config).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import shlex
import sys
import time

from tmdiff.scaling.run_files import CONFIG_FILE, RUN_FILE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EMIT_TARGETS = ("local", "slurm", "xpk")


class SweepError(ValueError):
  """A sweep that cannot run; the message names the sweep file, the run and the key."""


@dataclasses.dataclass(frozen=True)
class Run:
  name: str                 # workdir name under the sweep root
  config: str               # experiment file[:arg], relative to the repository root or cwd
  overrides: dict = dataclasses.field(default_factory=dict)   # {"section.key": value}
  hw: str = ""              # target hardware (tmdiff.scaling.ladder.HARDWARE) for --emit
  meta: dict = dataclasses.field(default_factory=dict)        # free-form tags, e.g. size, horizon


@dataclasses.dataclass(frozen=True)
class Sweep:
  name: str
  runs: list
  evals_per_run: int = 0    # > 0: train.eval_every = ceil(steps / evals_per_run)
  description: str = ""


def product(config: str, *, hw: str = "", common: dict | None = None, **axes: dict) -> list[Run]:
  """The grid over named `axes` (each {fragment: overrides}, in the order given); a run's name
  joins its fragments with '_' and its meta records {axis: fragment}."""
  runs = []
  for combo in itertools.product(*(axis.items() for axis in axes.values())):
    overrides = dict(common or {})
    for _, o in combo:
      overrides.update(o)
    runs.append(Run("_".join(name for name, _ in combo), config, overrides, hw,
                    {axis: name for axis, (name, _) in zip(axes, combo)}))
  return runs


# ----------------------------------------------------------------------------- loading

def _resolve_path(path: str) -> str:
  for candidate in (path, os.path.join(ROOT, path)):
    if os.path.isfile(candidate):
      return candidate
  raise SweepError(f"no such file {path!r} (paths are relative to the cwd or the repository root)")


def load_module(path: str):
  path = _resolve_path(path)
  if ROOT not in sys.path:  # experiment files import tmdiff and experiments.*
    sys.path.insert(0, ROOT)
  name = "tmdiff_file_" + os.path.abspath(path).replace(os.sep, "_").replace(".", "_")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_sweep(sweep_arg: str) -> Sweep:
  path, _, arg = sweep_arg.partition(":")
  module = load_module(path)
  if not hasattr(module, "get_sweep"):
    raise SweepError(f"{path}: no get_sweep(arg) function")
  sweep = module.get_sweep(arg) if arg else module.get_sweep()
  if not isinstance(sweep, Sweep) or not sweep.runs:
    raise SweepError(f"{path}: get_sweep must return a Sweep with at least one Run")
  names = [r.name for r in sweep.runs]
  dupes = sorted({n for n in names if names.count(n) > 1})
  if dupes:
    raise SweepError(f"{path}: run names must be unique, repeated: {dupes}")
  for n in names:
    if not n or "/" in n or n.startswith("."):
      raise SweepError(f"{path}: bad run name {n!r} (it becomes a directory name)")
  return sweep


def apply_overrides(config, overrides: dict, where: str = "config"):
  """Sets {"a.b.c": value} on a locked ConfigDict; an unknown key or a wrong type names itself."""
  for key, value in overrides.items():
    node, parts = config, key.split(".")
    try:
      for part in parts[:-1]:
        node = node[part]
      node[parts[-1]] = value
    except (KeyError, AttributeError, TypeError) as e:
      detail = e.args[0] if e.args else e
      raise SweepError(f"{where}: override {key}={value!r}: {detail}") from None
  return config


def load_config(config_arg: str, overrides: dict | None = None):
  """experiment file[:arg] -> its config with `overrides` applied."""
  path, _, arg = config_arg.partition(":")
  module = load_module(path)
  if not hasattr(module, "get_config"):
    raise SweepError(f"{path}: no get_config(arg) function")
  config = module.get_config(arg) if arg else module.get_config()
  return apply_overrides(config, overrides or {}, where=config_arg)


@dataclasses.dataclass
class Resolved:
  run: Run
  config: object            # ConfigDict, validated
  overrides: dict           # the run's overrides plus the derived eval cadence
  steps: int


def resolve(sweep: Sweep) -> list[Resolved]:
  """Every run's config, with the derived eval cadence, validated before anything runs."""
  from tmdiff.configs import validate as validate_lib
  from tmdiff.configs.derived import derive
  out = []
  for run in sweep.runs:
    where = f"sweep {sweep.name!r}, run {run.name!r}"
    config = load_config(run.config, run.overrides)
    overrides = dict(run.overrides)
    steps = derive(config).steps
    if sweep.evals_per_run > 0:
      every = max(1, math.ceil(steps / sweep.evals_per_run))
      overrides["train.eval_every"] = every
      apply_overrides(config, overrides, where)
    try:
      validate_lib.validate(config)
    except ValueError as e:
      raise SweepError(f"{where}: {e}") from None
    out.append(Resolved(run, config, overrides, steps))
  return out


# ----------------------------------------------------------------------------- workdirs

def workdir(root: str, run: Run) -> str:
  return os.path.join(root, run.name)


def write_workdir(root: str, r: Resolved) -> str:
  path = workdir(root, r.run)
  os.makedirs(path, exist_ok=True)
  record = {"name": r.run.name, "config": r.run.config, "overrides": r.overrides,
            "hw": r.run.hw, "meta": r.run.meta, "steps": r.steps}
  with open(os.path.join(path, RUN_FILE), "w") as f:
    json.dump(record, f, indent=1)
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    f.write(r.config.to_json(indent=1))
  return path


def finished(path: str, steps: int) -> bool:
  """A run is done when its eval report is for its last step."""
  from tmdiff.train import loop
  report = os.path.join(path, loop.EVAL_REPORT)
  if not os.path.exists(report):
    return False
  with open(report) as f:
    return json.load(f).get("step") == steps


# ----------------------------------------------------------------------------- commands

def override_flags(overrides: dict) -> list[str]:
  """--config.a.b=value flags as ml_collections' config_flags parses them."""
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def launch_argv(r: Resolved, root: str, target: str, sweep_name: str,
                launch_args: list[str] = ()) -> list[str]:
  """A `launch/launch.py <target>` command for one run; nodes / TPU type follow the run's hw."""
  from tmdiff.scaling import ladder
  argv = ["python", "launch/launch.py", target, f"--config={r.run.config}",
          f"--workdir={workdir(root, r.run)}"]
  given = " ".join(launch_args)
  hw = ladder.HARDWARE.get(r.run.hw)
  job = f"{sweep_name}-{r.run.name}".replace("_", "-").lower()
  if target == "slurm":
    if hw is not None and "--nodes" not in given:
      argv += [f"--nodes={max(1, hw.devices // hw.devices_per_host)}",
               f"--gpus_per_node={hw.devices_per_host}"]
    elif "--nodes" not in given:
      raise SweepError(f"run {r.run.name!r}: hw={r.run.hw!r} is not a known target; "
                       "pass --launch_args='--nodes=N --gpus_per_node=G'")
    argv += [f"--job_name={job}"]
  elif target == "xpk":
    if "--tpu_type" not in given:
      if not r.run.hw.startswith("v5p-"):
        raise SweepError(f"run {r.run.name!r} targets hw={r.run.hw!r}, not a TPU: set a v5p-N "
                         "hw in the sweep or pass --launch_args='--tpu_type=...'")
      argv += [f"--tpu_type={r.run.hw}"]
    argv += [f"--workload={job}"]
  return argv + list(launch_args) + override_flags(r.overrides)


# ----------------------------------------------------------------------------- running

def run_local(resolved: list[Resolved], root: str, devices=None, log=print) -> list[str]:
  """Trains each run in this process, in order; finished runs are skipped, interrupted ones resume
  from their last checkpoint. Returns the names of runs that failed."""
  import jax
  from tmdiff.train import loop
  devices = jax.devices() if devices is None else devices
  failed = []
  for i, r in enumerate(resolved, 1):
    path = write_workdir(root, r)
    head = f"[{i}/{len(resolved)}] {r.run.name}"
    if finished(path, r.steps):
      log(f"{head}: finished, skipped")
      continue
    hp_line = (f"{r.steps} steps x {r.config.data.global_batch} x {r.config.data.seq_len} tokens, "
               f"d_model {r.config.model.d_model}, {r.config.model.n_layers} layers")
    log(f"{head}: {hp_line}")
    start = time.perf_counter()
    try:
      metrics = loop.train(r.config, path, devices=devices)
    except Exception as e:  # noqa: BLE001 -- one broken run must not stop the sweep
      log(f"{head}: FAILED after {time.perf_counter() - start:.0f}s: {type(e).__name__}: {e}")
      failed.append(r.run.name)
      continue
    bits = " ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in metrics.items()
                    if k.startswith("bits_per_token/"))
    log(f"{head}: done in {time.perf_counter() - start:.0f}s; eval bits/token {bits}")
  return failed


def collect_and_fit(root: str, out: str, n_boot: int, plots: bool = True, log=print,
                    points: str = "all", names=None) -> dict:
  """runs.csv / runs.json in `out`, then fits.json and (optionally) the plots."""
  from tmdiff.scaling import collect
  from tmdiff.scaling import fit as fit_lib
  os.makedirs(out, exist_ok=True)
  rows = collect.collect(root, names, log=log)
  paths = collect.write_table(rows, out)
  log("wrote " + ", ".join(paths))
  runs = fit_lib.load_runs(paths[0])
  if points == "final":
    runs = runs.final()
  report = fit_lib.fit_all(runs, n_boot=n_boot)
  with open(os.path.join(out, "fits.json"), "w") as f:
    json.dump(report, f, indent=1)
  for m, r in report.items():
    law = r["law_nd"]
    log(f"[{m}] L(N, D) = {law['E']:.4g} + {law['A']:.4g}/N^{law['alpha']:.3f} + "
        f"{law['B']:.4g}/D^{law['beta']:.3f}")
    extrapolation = r.get("extrapolation", {})
    if "mean_abs_rel_error" in extrapolation:
      log(f"[{m}] fitted below N={extrapolation['n_test']:.3g}, predicting it: mean |relative "
          f"error| {extrapolation['mean_abs_rel_error']:.4f}")
  if plots:
    from tmdiff.scaling import plots as plots_lib
    for p in plots_lib.plot_all(runs, report, out):
      log("wrote " + p)
  return report


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--sweep", required=True, help="sweep file[:arg]")
  p.add_argument("--root", required=True, help="directory holding one workdir per run")
  p.add_argument("--out", help="runs table, fits and plots (default: ROOT/results)")
  p.add_argument("--emit", choices=EMIT_TARGETS, help="print launch commands instead of running")
  p.add_argument("--launch_args", default="", help="extra launch/launch.py arguments for --emit")
  p.add_argument("--collect_only", action="store_true", help="skip training; collect and fit")
  p.add_argument("--only", default="", help="comma-separated run names to train (default: all)")
  p.add_argument("--devices", type=int, default=0, help="train on the first N devices (0: all)")
  p.add_argument("--compile_cache", default=None,
                 help="persistent XLA compilation cache (default ROOT/.compile_cache; '' = off)")
  p.add_argument("--n_boot", type=int, default=100, help="bootstrap resamples for the fits")
  p.add_argument("--fit_points", choices=("all", "final"), default="all",
                 help="fit every periodic eval (intermediate points) or only each run's last")
  p.add_argument("--no_fit", action="store_true", help="collect the table only")
  p.add_argument("--no_plots", action="store_true")
  args = p.parse_args(argv)

  sweep = load_sweep(args.sweep)
  resolved = resolve(sweep)
  if args.only:
    keep = set(args.only.split(","))
    unknown = keep - {r.run.name for r in resolved}
    if unknown:
      raise SweepError(f"--only: no runs named {sorted(unknown)} in sweep {sweep.name!r}")
    resolved = [r for r in resolved if r.run.name in keep]
  print(f"sweep {sweep.name!r}: {len(resolved)} runs under {args.root}")

  if args.emit:
    extra = shlex.split(args.launch_args)
    local_root = "://" not in args.root
    for r in resolved:
      if local_root:
        write_workdir(args.root, r)
      print(" ".join(shlex.quote(a) for a in launch_argv(r, args.root, args.emit, sweep.name,
                                                         extra)))
    return 0

  failed = []
  if not args.collect_only:
    import jax
    cache = args.compile_cache
    cache = os.path.join(args.root, ".compile_cache") if cache is None else cache
    if cache:  # runs of one size share their init and eval compilations; reruns share all
      jax.config.update("jax_compilation_cache_dir", cache)
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    devices = jax.devices()[:args.devices] if args.devices else None
    start = time.perf_counter()
    failed = run_local(resolved, args.root, devices)
    print(f"sweep {sweep.name!r}: trained in {time.perf_counter() - start:.0f}s"
          + (f"; FAILED: {failed}" if failed else ""))
  out = args.out or os.path.join(args.root, "results")
  names = [run.name for run in sweep.runs]
  if args.no_fit:
    from tmdiff.scaling import collect
    print("wrote " + ", ".join(collect.write_table(collect.collect(args.root, names), out)))
  else:
    collect_and_fit(args.root, out, args.n_boot, plots=not args.no_plots, points=args.fit_points,
                    names=names)
  return 1 if failed else 0


if __name__ == "__main__":
  # Run the package module, not __main__, so sweep files share its Sweep / Run classes.
  from tmdiff.scaling import sweep as sweep_module
  try:
    sys.exit(sweep_module.main())
  except sweep_module.SweepError as e:
    raise SystemExit(f"tmdiff.scaling.sweep: {e}") from None
