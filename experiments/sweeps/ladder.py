"""The size ladder as a scaling sweep: each size at several multiples of its D*(N) horizon,
on its default hardware; meant to be emitted as cluster jobs.

  python -m tmdiff.scaling.sweep --sweep=experiments/sweeps/ladder.py:data=/data/tmdiff \\
      --root=/shared/ladder --emit=slurm --launch_args="--partition=gpu --account=A"
  python -m tmdiff.scaling.sweep --sweep=experiments/sweeps/ladder.py:sizes=l/xl,hw=v5p-64 \\
      --root=gs://bucket/ladder --emit=xpk --launch_args="--cluster=C --docker_image=IMG"
  # when the runs are done (workdirs synced locally): table, fits and plots
  python -m tmdiff.scaling.sweep --sweep=experiments/sweeps/ladder.py --root=/shared/ladder \\
      --collect_only --out=docs/img/ladder

Argument, comma-separated, all optional:
  sizes     '/'-separated ladder sizes (default xxs/xs/s/m/l/xl: 9M to 259M parameters)
  horizons  '/'-separated multiples of D*(N) = 7754 N^0.84 (default 0.25/0.5/1, 4x apart end to end)
  hw        one target for every size (default: each size's own, tmdiff/scaling/ladder.py)
  data      a prepared data directory (default: synthetic data)
Every run evaluates 10 times along its horizon (intermediate points for the fits).
"""
from tmdiff.scaling import ladder
from tmdiff.scaling.sweep import Run, Sweep

KEYS = ("sizes", "horizons", "hw", "data")
DEFAULT_SIZES = ("xxs", "xs", "s", "m", "l", "xl")
DEFAULT_HORIZONS = ("0.25", "0.5", "1")


def get_sweep(arg: str = ""):
  a = {}
  for item in filter(None, arg.split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in KEYS:
      raise ValueError(f"experiments/sweeps/ladder.py: bad argument {item!r}; keys are {KEYS}")
    a[key] = value
  sizes = a["sizes"].split("/") if "sizes" in a else DEFAULT_SIZES
  unknown = [s for s in sizes if s not in ladder.SIZES]
  if unknown:
    raise ValueError(f"experiments/sweeps/ladder.py: unknown sizes {unknown}; "
                     f"choose from {list(ladder.SIZES)}")
  horizons = a["horizons"].split("/") if "horizons" in a else DEFAULT_HORIZONS
  runs = []
  for size in sizes:
    hw = a.get("hw") or ladder.SIZES[size].hw
    for h in horizons:
      arg_items = [f"size={size}", f"hw={hw}", f"tokens={float(h):g}x"]
      arg_items += [f"data={a['data']}"] if "data" in a else []
      runs.append(Run(f"{size}_{float(h):g}x", "experiments/ladder.py:" + ",".join(arg_items),
                      hw=hw, meta={"size": size, "horizon": f"{float(h):g}x"}))
  return Sweep("ladder", runs, evals_per_run=10, description="size ladder x D*(N) multiples")
