"""Top device ops of a JAX profiler trace: where a step's GPU time goes.

  python benchmarks/profile_summary.py TRACE_DIR [--top=10] [--steps=N]

Reads the Perfetto JSON that `jax.profiler.trace(dir, create_perfetto_trace=True)` writes
(`**/perfetto_trace.json.gz`), keeps complete events on device (GPU) tracks, and sums their
durations by kernel name. With --steps, times are per traced step.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os


def load_events(trace_dir: str) -> list[dict]:
  paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                           recursive=True))
  if not paths:
    raise SystemExit(f"{trace_dir}: no perfetto_trace.json.gz (trace with "
                     "create_perfetto_trace=True)")
  with gzip.open(paths[-1], "rt") as f:
    data = json.load(f)
  return data["traceEvents"] if isinstance(data, dict) else data


def device_kernel_times(events: list[dict]) -> collections.Counter:
  names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device_pids = {pid for pid, name in names.items() if "GPU" in name or "gpu" in name}
  totals = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in device_pids and "dur" in e:
      totals[e["name"]] += float(e["dur"])
  return totals


def table(totals: collections.Counter, top: int, steps: int) -> str:
  busy = sum(totals.values())
  lines = [f"device-busy {busy / 1e3 / steps:.1f} ms per step over {len(totals)} kernels",
           "| rank | kernel | ms/step | share |", "|---|---|---|---|"]
  for rank, (name, us) in enumerate(totals.most_common(top), 1):
    lines.append(f"| {rank} | `{name[:90]}` | {us / 1e3 / steps:.2f} | {us / busy:.1%} |")
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser()
  p.add_argument("trace_dir")
  p.add_argument("--top", type=int, default=10)
  p.add_argument("--steps", type=int, default=1)
  args = p.parse_args()
  print(table(device_kernel_times(load_events(args.trace_dir)), args.top, args.steps))


if __name__ == "__main__":
  main()
