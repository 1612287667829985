"""Ablation: the physical batch at a fixed logical batch, two ways.

  python -m tmdiff.train --config=experiments/ablations/physical_batch.py:sde_b32,size=s,data=runs/data \\
      --workdir=runs/ablations/physical_batch_sde_b32
  python -m tmdiff.scaling.sweep --sweep=experiments/sweeps/ablations.py:physical_batch,size=s \\
      --root=runs/ablations/physical_batch

Argument: VARIANT[,ladder arguments] (experiments/ladder.py). Variants:
  accumK    gradient accumulation: the global batch stays the ladder's, split into K microbatches
            per step; the same computation in less memory (losses should match up to float
            rounding; only memory and throughput change).
  sde_bB    SDE reparameterisation: physical batch B rows at the same token horizon, with
            kappa = (D_base / D)^gamma * B / B_base rescaling lr, betas and eps (sde.*); steps
            D / (L B). Below the critical batch the loss should not depend on B.
  const_bB  control: physical batch B with the base hyperparameters left as they are (sde off),
            showing what the reparameterisation corrects.
"""
from experiments.ablations import variant_config

ACCUM = (1, 2, 4, 8)
SDE_BATCHES = (16, 32, 64, 128, 256)
CONST_BATCHES = (16, 256)

VARIANTS = {
    **{f"accum{k}": {"optim.grad_accum": k} for k in ACCUM},
    **{f"sde_b{b}": {"data.global_batch": b, "sde.enabled": True} for b in SDE_BATCHES},
    **{f"const_b{b}": {"data.global_batch": b, "sde.enabled": False} for b in CONST_BATCHES},
}
DEFAULT = "accum1"


def get_config(arg: str = DEFAULT):
  return variant_config(arg, VARIANTS, DEFAULT, "experiments/ablations/physical_batch.py")
