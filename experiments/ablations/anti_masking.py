"""Ablation: anti-masking on / off at equal compute.

  python -m tmdiff.train --config=experiments/ablations/anti_masking.py:on,size=s,data=runs/data \\
      --workdir=runs/ablations/anti_masking_on
  python -m tmdiff.scaling.sweep --sweep=experiments/sweeps/ablations.py:anti_masking,size=s,data=runs/data \\
      --root=runs/ablations/anti_masking

Argument: VARIANT[,ladder arguments] (experiments/ladder.py). Both variants train the same number
of rows per step (data.global_batch) for the same steps, so compute is equal: with anti-masking on,
half of those rows are loaded and each is trained twice, once with a mask and once with its
complement (the paper reports FID 18.69 -> 17.81 at no extra compute).
"""
from experiments.ablations import variant_config

VARIANTS = {
    "off": {"diffusion.anti_masking": False},
    "on": {"diffusion.anti_masking": True},
}
DEFAULT = "off"


def get_config(arg: str = DEFAULT):
  return variant_config(arg, VARIANTS, DEFAULT, "experiments/ablations/anti_masking.py")
