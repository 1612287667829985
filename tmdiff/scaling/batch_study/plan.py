"""The batch study's plan: one training run (`Run`) and the study's settings (`Study`)."""
from __future__ import annotations

import dataclasses

@dataclasses.dataclass(frozen=True)
class Run:
  """One training run; its name is its workdir under OUT/runs."""
  batch: int
  tokens: int
  sde: bool = False
  kappa_mult: float = 1.0
  seed: int = 0
  clip: float = 0.0       # gradient-clipping norm (0: off, the study's setting)
  mask_seed: int = -1     # >= 0: the training masks alone take this seed

  @property
  def name(self) -> str:
    name = f"b{self.batch}_d{self.tokens}_{'sde' if self.sde else 'fixed'}_k{self.kappa_mult:g}"
    return (name + (f"_s{self.seed}" if self.seed else "")
            + (f"_m{self.mask_seed}" if self.mask_seed >= 0 else "")
            + (f"_clip{self.clip:g}" if self.clip else ""))


@dataclasses.dataclass(frozen=True)
class Study:
  data: str = "synthetic"                 # prepared data directory or 'synthetic'
  seq_len: int = 128
  # The model (experiments/batch_study.py width, layers). Width 64 runs ~2.5x faster than 128 on
  # a CPU, and the noise between runs is no larger (docs/batch_study.md): the hour buys replicates.
  width: int = 64
  layers: int = 2
  base_batch: int = 4
  base_tokens: int = 2**20
  batches: tuple = (1, 2, 4, 8, 16)
  max_batch: int = 1024
  min_steps: int = 8                      # the grid does not grow past D / (L B) < min_steps
  kappas: tuple = (0.5, 1.0, 2.0, 4.0)
  horizons: tuple = (0.25, 0.5)           # gamma: other horizons, multiples of base_tokens
  # Their k sweeps: these multiples of k0 (D_base / D)^gamma_guess (the paper's gamma), grown
  # at a winning edge like the base sweep.
  horizon_kappas: tuple = (0.5, 1.0, 2.0)
  gamma_guess: float = 0.44
  max_extend: int = 2
  tol: float = 0.015
  eval_rows: int = 1024
  # Training masks and times keyed per 'example' (by stream index: every run sees the same
  # examples with the same masks whatever its batch, so runs differ only by B and the
  # hyperparameters) or per 'step' (diffusion.noise_keys).
  noise: str = "example"
  # The train loss's normaliser (diffusion.loss_norm): 'fixed' weighs a token the same at any B.
  loss_norm: str = "fixed"
  min_lr: float = 0.1                     # the cosine floor (optim.min_lr_ratio)
  seeds: int = 0                          # base retrained with other seeds (all randomness)
  mask_seeds: int = 1                     # ... and with other training-mask seeds only
  # Every grid point again with this many other training-mask seeds: replicate i is the whole
  # grid under mask seed i. A point's loss is the mean over replicates; the scatter of the
  # replicates about the grid's pattern is the noise of the comparison.
  grid_mask_seeds: int = 3
  # A point the grid grows to (above the given batches) is first trained reparameterised under
  # this many replicates, and filled out only if the grid is still flat.
  growth_replicates: int = 2
  eval_seeds: int = 2
  clip_control: float = 0.0               # > 0: the smallest-B reparameterised run again, clipped
  # The batch grid again from these other bases (multipliers k of the defaults), e.g. 1: the
  # untuned defaults, to see whether the break follows the step count or the absolute kappa.
  other_bases: tuple = ()
  quick: bool = False

  def run(self, batch, tokens=None, sde=False, kappa_mult=1.0, seed=0, clip=0.0,
          mask_seed=-1) -> Run:
    tokens = int(self.base_tokens if tokens is None else tokens)
    if batch == self.base_batch and tokens == self.base_tokens:
      sde = False  # kappa = 1 exactly: the same run with or without the reparameterisation
    return Run(int(batch), tokens, bool(sde), float(kappa_mult), int(seed), float(clip),
               int(mask_seed))

  def arg(self, run: Run) -> str:
    """The experiments/batch_study.py argument of `run`."""
    parts = dict(batch=run.batch, tokens=run.tokens, sde=int(run.sde),
                 kappa_mult=repr(run.kappa_mult), base_batch=self.base_batch,
                 base_tokens=self.base_tokens, seq=self.seq_len, eval_rows=self.eval_rows,
                 clip=repr(run.clip), data=self.data, seed=run.seed, mask_seed=run.mask_seed,
                 noise=self.noise, loss_norm=self.loss_norm, min_lr=repr(self.min_lr),
                 width=self.width, layers=self.layers, quick=int(self.quick))
    return ",".join(f"{k}={v}" for k, v in parts.items())

  def steps(self, batch, tokens=None) -> int:
    return max(1, round((tokens or self.base_tokens) / (self.seq_len * batch)))


QUICK = dict(seq_len=32, base_batch=4, base_tokens=1024, batches=(4, 8), max_batch=8,
             kappas=(1.0,), horizons=(), max_extend=0, eval_rows=32, seeds=0, mask_seeds=0,
             grid_mask_seeds=0, eval_seeds=0,
             clip_control=0.0, other_bases=(), quick=True, data="synthetic")
