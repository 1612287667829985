"""Ablation experiments: each file defines VARIANTS {name: overrides} on a size-ladder point.

An ablation file's argument is `VARIANT[,ladder arguments]`, the ladder arguments being those of
experiments/ladder.py (size, hw, tokens, batch, seq, sde, data), e.g.
  python -m tmdiff.train --config=experiments/ablations/mixing.py:text_heavy,size=s,data=runs/data ...
and `python -m tmdiff.scaling.sweep --sweep=experiments/sweeps/ablations.py:mixing,size=s,...`
runs every variant of one ablation side by side.
"""
from experiments import ladder as ladder_exp
from tmdiff.scaling.sweep import apply_overrides


def split_arg(arg: str, default_variant: str) -> tuple[str, str]:
  """'VARIANT,k=v,...' -> ('VARIANT', 'k=v,...'); no leading variant -> the default."""
  head, _, rest = (arg or "").partition(",")
  if "=" in head or not head:
    return default_variant, arg or ""
  return head, rest


def variant_config(arg: str, variants: dict, default_variant: str, where: str):
  """The ladder point of `arg` with the overrides of its variant applied."""
  variant, ladder_arg = split_arg(arg, default_variant)
  if variant not in variants:
    raise ValueError(f"{where}: unknown variant {variant!r}; choose from {list(variants)}")
  config = ladder_exp.get_config(ladder_arg)
  return apply_overrides(config, variants[variant], where=f"{where}:{variant}")
