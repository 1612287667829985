"""Topology compile check: compile a scaling point's train step ahead of time for its target
hardware, without that hardware, and report per-device memory and FLOPs against the device's HBM.

  python -m tmdiff.scaling.topology --config=experiments/ladder.py:size=3b            # its hw: h100x64
  python -m tmdiff.scaling.topology --config=experiments/ladder.py:size=3b,hw=v5p-128 # TPU, via libtpu
  python -m tmdiff.scaling.topology --all            # every ladder point on its own hw
  python -m tmdiff.scaling.topology --all --tpu      # ... on the v5p slice with as many chips
  python -m tmdiff.scaling.topology --config=experiments/tiny.py --hw=h100x8 --hbm_gb=0.01  # fails

Targets (tmdiff/scaling/ladder.py HARDWARE):
  v5p-N     abstract TPU devices from libtpu (`jax.experimental.topologies`), the whole slice; the
            compile is the real TPU compiler's, so its memory and FLOPs are what the pod would see.
  h100xN / h200xN  local GPUs when there are enough, else fake CPU devices. With more GPUs than one
            host holds, the check compiles one host's slice: the mesh's fsdp/tensor part (the ladder
            puts fsdp inside a host, data across hosts) with that host's share of the batch. Per
            device, parameters, optimizer state and activations are then the same as on the full
            mesh (parameters are replicated across the data axis). On fake CPU devices the figures
            are INDICATIVE: XLA's CPU compiler differs from the GPU one, and attention falls back to
            'xla', which materialises the T x T scores that the GPU's flash kernel never stores.
Memory per device = arguments + outputs + temporaries - aliased (donated) bytes, from
`memory_analysis()`; it must fit in HBM x --usable (default 0.9; on GPU set
XLA_PYTHON_CLIENT_MEM_FRACTION accordingly, JAX preallocates 75% by default). A point that does not
fit fails with the reason and what to change (fsdp, microbatches, remat). FLOPs per device per step
come from `cost_analysis()` (a loop body such as gradient accumulation counts once there) beside the
analytic count (tmdiff/train/flops.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

from tmdiff.scaling import ladder
from tmdiff.scaling import sweep as sweep_lib

GB = 1e9
# HBM per device, GB (datasheets).
HBM_GB = {"h100": 80.0, "h200": 141.0, "v5p": 95.0, "cpu": 0.0}
# v5p slices: chips -> topology (chips per dimension).
V5P_TOPOLOGIES = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
                  256: "4x8x8"}


class TopologyError(RuntimeError):
  """A point that cannot be compiled for, or does not fit, its target; the message says why."""


@dataclasses.dataclass(frozen=True)
class Target:
  hw: str
  platform: str           # gpu | tpu | cpu
  chip: str               # key of HBM_GB
  devices: int
  devices_per_host: int

  @property
  def hbm_bytes(self) -> float:
    return HBM_GB[self.chip] * GB


def target_of(hw: str) -> Target:
  if hw not in ladder.HARDWARE:
    raise TopologyError(f"unknown hw {hw!r}; choose from {list(ladder.HARDWARE)}")
  h = ladder.HARDWARE[hw]
  chip = hw.split("x")[0] if hw.startswith("h") else hw.split("-")[0]
  platform = {"v5p": "tpu", "cpu": "cpu"}.get(chip, "gpu")
  return Target(hw, platform, chip, h.devices, h.devices_per_host)


def tpu_equivalent(hw: str) -> str:
  """The v5p slice with as many chips as `hw` has devices (at least v5p-8)."""
  chips = max(4, target_of(hw).devices)
  name = f"v5p-{2 * chips}"
  if name not in ladder.HARDWARE:
    raise TopologyError(f"no v5p slice with {chips} chips in tmdiff/scaling/ladder.py HARDWARE")
  return name


def tpu_devices(chips: int):
  """Abstract v5p devices from libtpu's topology description (no TPU needed)."""
  if chips not in V5P_TOPOLOGIES:
    raise TopologyError(f"no v5p topology for {chips} chips; known: {sorted(V5P_TOPOLOGIES)}")
  # libtpu holds a lock file per machine; compiling next to other JAX processes needs this.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    from jax.experimental import topologies
    topo = topologies.get_topology_desc(topology_name=f"v5p:{V5P_TOPOLOGIES[chips]}",
                                        platform="tpu")
  except Exception as e:  # noqa: BLE001 -- ImportError, RuntimeError, JaxRuntimeError
    raise TopologyError(f"no TPU topology from libtpu ({type(e).__name__}: {e}); install "
                        "libtpu (pip install 'jax[tpu]')") from None
  return list(topo.devices)


def local_devices(platform: str, count: int):
  """`count` devices of `platform`, or fake CPU devices when there are not that many."""
  import jax
  try:
    real = jax.devices(platform)
  except RuntimeError:
    real = []
  if len(real) >= count:
    return real[:count], False
  cpus = jax.devices("cpu")
  if len(cpus) < count:
    raise TopologyError(
        f"needs {count} devices: only {len(real)} {platform} and {len(cpus)} CPU devices here; "
        f"set XLA_FLAGS=--xla_force_host_platform_device_count={count} before JAX starts (the "
        "command line does)")
  return cpus[:count], True


@dataclasses.dataclass
class Report:
  point: str
  hw: str
  compiled_on: str        # what the compile ran for, e.g. "tpu v5p:4x4x4 (64 chips)"
  indicative: bool        # figures from fake CPU devices
  mesh: dict
  rows_per_device: int
  params_total: int
  argument_gb: float
  output_gb: float
  temp_gb: float
  alias_gb: float
  peak_gb: float
  hbm_gb: float
  usable_gb: float
  xla_flops_per_device: float | None
  analytic_flops_per_device: float
  compile_s: float
  fits: bool
  advice: str = ""

  def line(self) -> str:
    flops = "-" if self.xla_flops_per_device is None else f"{self.xla_flops_per_device:.3g}"
    return (f"| {self.point} | {self.hw} | {self.compiled_on}{' (indicative)' * self.indicative} | "
            f"{'x'.join(str(v) for v in self.mesh.values())} | {self.rows_per_device} | "
            f"{self.argument_gb:.2f} | {self.temp_gb:.2f} | {self.output_gb - self.alias_gb:.2f} | "
            f"{self.peak_gb:.2f} | {self.hbm_gb:.0f} | {'yes' if self.fits else 'NO'} | {flops} | "
            f"{self.analytic_flops_per_device:.3g} | {self.compile_s:.0f} |")


TABLE_HEAD = ("| point | target | compiled for | mesh (data x fsdp x tensor) | rows/device | "
              "args GB | temps GB | out GB (not aliased) | peak GB | HBM GB | fits | "
              "XLA FLOPs/device/step | analytic FLOPs/device/step | compile s |\n"
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def advice(config, report_bytes: dict, budget: float, devices_in_mesh: int) -> str:
  """What to change when a point does not fit: shard the state, or cut activations."""
  args, temp = report_bytes["argument"], report_bytes["temp"]
  out = report_bytes["output"] - report_bytes["alias"]
  fsdp, tensor = config.mesh.fsdp, config.mesh.tensor
  tips = []
  if args + out >= budget:
    need = 2 ** math.ceil(math.log2((args + out) / budget * max(fsdp, 1)))
    tips.append(f"the train state alone ({(args + out) / GB:.1f} GB/device) exceeds the budget: "
                f"shard it over more devices (mesh.fsdp={need}, or mesh.tensor={2 * tensor}), "
                "which needs that many devices per data replica")
  else:
    factor = temp / max(budget - args - out, 1.0)
    accum = 2 ** math.ceil(math.log2(max(factor, 1.0) * config.optim.grad_accum))
    tips.append(f"activations ({temp / GB:.1f} GB/device of temporaries) exceed the "
                f"{(budget - args - out) / GB:.1f} GB left after the state: microbatch with "
                f"optim.grad_accum={accum}")
    if config.model.remat == "none":
      tips.append("recompute blocks in the backward pass (model.remat=block)")
    tips.append("or more fsdp/data devices for fewer rows per device "
                f"(mesh.fsdp={2 * max(fsdp, 1)})")
  return "; ".join(tips)


def compile_point(config, hw: str, *, point: str = "", host_slice: bool = True,
                  hbm_gb: float | None = None, usable: float = 0.9) -> Report:
  """Compiles `config`'s train step for `hw` and measures it; never raises for not fitting."""
  import jax
  from tmdiff.configs.derived import derive
  from tmdiff.data.vocab import VocabLayout
  from tmdiff.train import flops as flops_lib
  from tmdiff.train.trainer import Trainer, make_mesh

  target = target_of(hw)
  config = config.copy_and_resolve_references()
  n = target.devices
  if target.platform == "tpu":
    devices, indicative = tpu_devices(n), False
    compiled_on = f"tpu v5p:{V5P_TOPOLOGIES[n]} ({n} chips)"
  else:
    hosts = n // target.devices_per_host if n > target.devices_per_host else 1
    if hosts > 1 and host_slice:
      inside = config.mesh.fsdp * config.mesh.tensor
      if inside != target.devices_per_host:
        raise TopologyError(
            f"{point}: a host slice needs fsdp*tensor = {target.devices_per_host} devices per "
            "host, "
            f"the config has mesh.fsdp={config.mesh.fsdp}, mesh.tensor={config.mesh.tensor}; "
            "pass --full_mesh")
      if config.data.global_batch % hosts:
        raise TopologyError(f"{point}: data.global_batch={config.data.global_batch} does not "
                            f"split over {hosts} hosts")
      config.data.global_batch //= hosts
      config.mesh.data, n = 1, target.devices_per_host
    devices, indicative = local_devices(target.platform, n)
    where = "cpu (fake devices)" if indicative else target.platform
    compiled_on = f"{where}, {n} devices" + (f" = 1 host of {hosts}" if hosts > 1 and
                                             n < target.devices else "")
  if indicative:  # the GPU run's choices, where they lower for CPU
    if config.model.attention_impl in ("auto", "pallas_gpu", "cudnn", "pallas_tpu"):
      config.model.attention_impl = "xla"  # GPU kernels do not lower for CPU
    if config.model.loss_impl == "auto":
      config.model.loss_impl = "fused"  # as off CPU: no [B, L, V] logits
  mesh = make_mesh(config, devices)
  hp = derive(config)

  start = time.perf_counter()
  trainer = Trainer(config, mesh)
  compiled = trainer.compile_train_step()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  if mem is None:
    raise TopologyError(f"{point}: the {compiled_on} compiler gives no memory analysis")
  sizes = {k: float(getattr(mem, f"{k}_size_in_bytes", 0) or 0)
           for k in ("argument", "output", "temp", "alias")}
  peak = sizes["argument"] + sizes["output"] + sizes["temp"] - sizes["alias"]
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  xla_flops = float(cost["flops"]) if isinstance(cost, dict) and "flops" in cost else None
  vocab = VocabLayout.from_config(config.vocab).padded_size()
  analytic = (flops_lib.train_flops_per_token(config.model, vocab, hp.seq_len)
              * hp.tokens_per_step / len(devices))
  hbm = (hbm_gb * GB) if hbm_gb is not None else target.hbm_bytes
  budget = hbm * usable
  fits = peak <= budget
  report = Report(
      point=point, hw=hw, compiled_on=compiled_on, indicative=indicative,
      mesh=dict(mesh.shape), rows_per_device=hp.batch // (mesh.shape["data"] * mesh.shape["fsdp"]),
      params_total=flops_lib.param_counts(config.model, vocab)["total"],
      argument_gb=sizes["argument"] / GB, output_gb=sizes["output"] / GB,
      temp_gb=sizes["temp"] / GB, alias_gb=sizes["alias"] / GB, peak_gb=peak / GB,
      hbm_gb=hbm / GB, usable_gb=budget / GB, xla_flops_per_device=xla_flops,
      analytic_flops_per_device=analytic, compile_s=compile_s, fits=fits)
  if not fits:
    report.advice = (f"{point} does not fit {hw}: {peak / GB:.2f} GB per device needed, "
                     f"{budget / GB:.2f} GB usable ({hbm / GB:.0f} GB HBM x {usable}); "
                     + advice(config, sizes, budget, len(devices)))
    if indicative:
      report.advice += (" (figures from a CPU compile, which overstates temporaries: confirm "
                        "on the GPUs or on the TPU equivalent with --tpu)")
  return report


def check(config, hw: str, **kw) -> Report:
  """compile_point, raising TopologyError with the advice when the point does not fit."""
  report = compile_point(config, hw, **kw)
  if not report.fits:
    raise TopologyError(report.advice)
  return report


def _hw_from_arg(config_arg: str) -> str | None:
  _, _, arg = config_arg.partition(":")
  for item in arg.split(","):
    key, _, value = item.partition("=")
    if key == "hw":
      return value
  return None


def points_to_check(args) -> list[tuple[str, object, str]]:
  """(name, config, hw) for --all or --config."""
  if args.all:
    out = []
    for size in ladder.ORDER:
      hw = ladder.SIZES[size].hw
      hw = tpu_equivalent(hw) if args.tpu else hw
      out.append((size, ladder.build(size, hw), hw))
    return out
  config = sweep_lib.load_config(args.config)
  hw = args.hw or _hw_from_arg(args.config)
  if hw is None:
    _, _, arg = args.config.partition(":")
    size = dict(i.partition("=")[::2] for i in arg.split(",") if "=" in i).get("size")
    if size in ladder.SIZES:
      hw = ladder.SIZES[size].hw
  if hw is None:
    raise TopologyError(f"--config={args.config}: no target; pass --hw (e.g. h100x8, v5p-64)")
  if args.tpu and not hw.startswith("v5p"):
    hw = tpu_equivalent(hw)
  if args.hw or args.tpu:  # the ladder's mesh rule for the new target
    ladder.apply_mesh(config, ladder.HARDWARE[hw])
  return [(args.config, config, hw)]


def _literal(text: str):
  """'3' -> 3, '0.5' -> 0.5, 'true' -> True, anything else stays a string."""
  lowered = text.lower()
  if lowered in ("true", "false"):
    return lowered == "true"
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return text


def fake_devices_needed(hws, full_mesh: bool) -> int:
  """CPU devices the GPU targets need (must be requested before JAX starts its CPU backend)."""
  counts = [1]
  for hw in hws:
    t = target_of(hw)
    if t.platform != "tpu":
      counts.append(t.devices if full_mesh else min(t.devices, t.devices_per_host))
  return max(counts)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--config", help="experiment file[:arg]")
  p.add_argument("--all", action="store_true", help="every size of the ladder")
  p.add_argument("--hw", help="target hardware (default: the config's hw= or the size's default)")
  p.add_argument("--tpu", action="store_true", help="check on the v5p slice with as many chips")
  p.add_argument("--full_mesh", action="store_true",
                 help="GPU targets: compile the whole mesh, not one host's slice")
  p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, e.g. model.attention_impl=xla (repeatable)")
  p.add_argument("--hbm_gb", type=float, help="override the device memory (GB)")
  p.add_argument("--usable", type=float, default=0.9, help="usable fraction of HBM")
  p.add_argument("--json", help="write the reports to this file")
  args = p.parse_args(argv)
  if bool(args.all) == bool(args.config):
    p.error("give exactly one of --config and --all")

  points = points_to_check(args)
  overrides = {}
  for item in args.override:
    key, sep, value = item.partition("=")
    if not sep:
      p.error(f"--override {item!r}: expected KEY=VALUE")
    overrides[key] = _literal(value)
  for _, config, _ in points:
    sweep_lib.apply_overrides(config, overrides, where="--override")
  need = fake_devices_needed([hw for _, _, hw in points], args.full_mesh)
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags and need > 1:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={need}".strip()

  print(TABLE_HEAD)
  reports, failures = [], []
  for name, config, hw in points:
    try:
      r = compile_point(config, hw, point=name, host_slice=not args.full_mesh,
                        hbm_gb=args.hbm_gb, usable=args.usable)
    except TopologyError as e:
      failures.append(str(e))
      print(f"| {name} | {hw} | FAILED: {e} |", flush=True)
      continue
    reports.append(r)
    print(r.line(), flush=True)
    if not r.fits:
      failures.append(r.advice)
  if args.json:
    with open(args.json, "w") as f:
      json.dump([dataclasses.asdict(r) for r in reports], f, indent=1)
  for message in failures:
    print(f"topology: {message}", file=sys.stderr)
  return 1 if failures else 0


if __name__ == "__main__":
  from tmdiff.scaling import topology as topology_module  # shared classes, as for the sweep CLI
  sys.exit(topology_module.main())
