"""Training curves as a PNG, from a workdir's metrics.jsonl (no TensorBoard needed).

  tmdiff plot --workdir=runs/tiny                 # -> runs/tiny/curves.png
  tmdiff plot --workdir=runs/tiny --out=a.png --metrics=loss,lr

One panel per metric: the train records as a line, the eval records as points.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from tmdiff.train.loop import METRICS_FILE


class MetricsError(ValueError):
  """A workdir without readable metrics, or a metric it never logged."""


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    raise MetricsError(f"no {METRICS_FILE} in {workdir} (is it a training workdir?)")
  records = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise MetricsError(f"{path}:{number}: not a JSON record ({e.msg})") from None
  if not records:
    raise MetricsError(f"{path} holds no records yet")
  return records


def series(records: list[dict], metric: str) -> dict[str, tuple[list, list]]:
  """split -> (steps, values) of `metric`."""
  out = {}
  for r in records:
    if metric in r:
      steps, values = out.setdefault(r.get("split", "train"), ([], []))
      steps.append(r["step"])
      values.append(r[metric])
  return out


def plot(records: list[dict], metrics: list[str], out: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  logged = sorted({k for r in records for k in r} - {"step", "split"})
  missing = [m for m in metrics if not any(m in r for r in records)]
  if missing:
    raise MetricsError(f"--metrics: never logged: {', '.join(missing)}; logged: "
                       f"{', '.join(logged)}")
  fig, axes = plt.subplots(len(metrics), 1, figsize=(7, 2.4 * len(metrics)), sharex=True,
                           squeeze=False)
  for ax, metric in zip(axes[:, 0], metrics):
    for split, (steps, values) in sorted(series(records, metric).items()):
      style = dict(marker="o", linestyle="none") if split == "eval" else dict(linewidth=1)
      ax.plot(steps, values, label=split, **style)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
  axes[-1, 0].set_xlabel("step")
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="tmdiff plot", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="a training workdir (holds metrics.jsonl)")
  p.add_argument("--out", default="", help="the PNG to write (default: WORKDIR/curves.png)")
  p.add_argument("--metrics", default="loss,lr,grad_norm",
                 help="metrics to draw, one panel each (any key of metrics.jsonl)")
  args = p.parse_args(argv)
  try:
    out = plot(read_metrics(args.workdir), args.metrics.split(","),
               args.out or os.path.join(args.workdir, "curves.png"))
  except MetricsError as e:
    print(f"tmdiff plot: MetricsError: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
