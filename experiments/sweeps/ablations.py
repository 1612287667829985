"""Every variant of one ablation (experiments/ablations/<name>.py), side by side on one ladder point.

  python -m tmdiff.scaling.sweep --sweep=experiments/sweeps/ablations.py:mixing,size=s,data=runs/data \\
      --root=runs/ablations/mixing --no_fit                 # here, one run after another
  python -m tmdiff.scaling.sweep --sweep=experiments/sweeps/ablations.py:schedules,size=xl,hw=h100x8 \\
      --root=/shared/ablations/schedules --emit=slurm        # one sbatch line per variant

Argument: ABLATION[,ladder arguments]; ABLATION is one of mixing, schedules, anti_masking,
physical_batch; the ladder arguments (experiments/ladder.py) pick size, hw, tokens, data, ...
Each run evaluates 8 times; `--no_fit` gives the runs table (runs.csv: per-modality eval ELBO by
step) without scaling-law fits, which need several sizes.
"""
from experiments import ladder as ladder_exp
from tmdiff.scaling import ladder
from tmdiff.scaling.sweep import Run, Sweep, load_module

ABLATIONS = ("mixing", "schedules", "anti_masking", "physical_batch")


def get_sweep(arg: str = "mixing"):
  name, _, ladder_arg = arg.partition(",")
  if name not in ABLATIONS:
    raise ValueError(f"experiments/sweeps/ablations.py: unknown ablation {name!r}; "
                     f"choose from {ABLATIONS}")
  path = f"experiments/ablations/{name}.py"
  variants = load_module(path).VARIANTS
  parsed = ladder_exp.parse_arg(ladder_arg)
  hw = parsed.get("hw") or ladder.SIZES[parsed.get("size", "xs")].hw
  suffix = f",{ladder_arg}" if ladder_arg else ""
  runs = [Run(variant, f"{path}:{variant}{suffix}", hw=hw, meta={"ablation": name,
                                                                  "variant": variant})
          for variant in variants]
  return Sweep(f"ablation_{name}", runs, evals_per_run=8, description=f"ablation {name}")
