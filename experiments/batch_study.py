"""One run of the batch-size study (docs/batch_study.md): a tiny model at a fixed token horizon
and physical batch, with the SDE reparameterisation on or off.

  python -m tmdiff.scaling.batch_study --out=runs/batch_study --data_dir=runs/data   # the study
  python -m tmdiff.train --config=experiments/batch_study.py:batch=16,sde=1,data=runs/data \
      --workdir=runs/bs_b16                                                       # one run

Argument: comma-separated key=value, all optional (tmdiff.scaling.batch_study.plan describes
each and holds the defaults):
  batch, tokens, sde, kappa_mult, seed, clip, mask_seed   the fields of `Run` (batch and tokens
      default to the base point (base_batch, base_tokens); sde=1 reparameterises lr, betas and
      eps from it by kappa = (D_base/D)^gamma * B/B_base; kappa_mult k reparameterises the base
      AdamW values: lr*sqrt(k), beta^k, eps/sqrt(k))
  data, seq, width, layers, base_batch, base_tokens, eval_rows, noise, loss_norm, min_lr, quick
      the `Study` settings with a run key (quick=1: a micro model on synthetic data, for tests)
  gamma   the reparameterisation's horizon exponent (default 0.44)

Expected on 2 CPU cores (unloaded), two runs at once (the study's --jobs=2): width 64 (0.43M
parameters) ~12k tokens/s each at B = 2-16 (~8.5k at B = 1, where per-step overhead shows, and
~7.5k at B = 32), so a default run (2^20 tokens) takes 90-140 s with start-up, compilation and
eval; width 128 (1.05M) ~6.5k tokens/s each.
"""
from experiments import key_values
from tmdiff.scaling.batch_study import plan


def get_config(arg: str = ""):
  values = key_values(arg, plan.RUN_KEYS, "experiments/batch_study.py")
  return plan.run_config(*plan.from_arg(values))
