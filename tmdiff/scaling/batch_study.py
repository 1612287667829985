"""The batch-size study (issue #6 part 4), at small scale: is the final loss flat across physical
batches with the SDE reparameterisation, where is the critical batch, and what is gamma?

  python -m tmdiff.scaling.batch_study --out=runs/batch_study --data_dir=runs/data --docs=docs
  python -m tmdiff.scaling.batch_study --out=/tmp/bs --quick    # 3 micro runs (smoke test)

Every run is `experiments/batch_study.py:<arg>` trained by `tmdiff.train.loop.train` in
OUT/runs/<name>; a run whose result.json exists is skipped, an interrupted one resumes from its
checkpoint, so the command can be re-run until it completes. In order:
  1. base tuning: at (B_base, D_base), a sweep of the AdamW values reparameterised by a kappa
     multiplier k (lr*sqrt(k), beta^k, eps/sqrt(k)); the best k is the tuned base k0. The sweep
     grows at an edge that wins (at most --max_extend points per side).
  2. batch grid at D_base with the base k0: each B reparameterised (sde=1: kappa = B/B_base) and
     naive (sde=0: the base values; only the step count D/(L B) changes). The grid grows upward
     (x2) while the reparameterised losses stay within --tol of each other; a new point is
     trained reparameterised under --growth_replicates replicates first and filled out only
     while the grid is still flat.
  3. noise: the whole grid again under --grid_mask_seeds other training-mask seeds
     (replicates; masks keyed per example, --noise); the base retrained with --seeds other
     seeds (init, data order, masks); the base and the smallest-B runs re-evaluated under
     --eval_seeds other eval-mask seeds; and the smallest-B reparameterised run again with
     gradient clipping (--clip_control; the study itself trains without clipping).
  4. gamma: k sweeps at B_base for the other horizons (--horizons x D_base), centred on the
     optimum the paper's gamma predicts (k0 (D_base/D)^0.44 x {1/2, 1, 2}; grown at a winning
     edge), so that the fit, not the grid, decides.
Every run's final eval is on the same validation rows with the same per-row masks
(`eval_rows`, tmdiff.eval.elbo), so losses are comparable across batches.

Analysis (functions below, tested in tests/test_batch_study.py):
  flat level  mean reparameterised loss over B <= B_base;
  B_crit      the flat set is the points up to B_base, then each larger B while the set's
              spread stays within --tol; B_crit interpolates in log B where the spread reaches
              --tol, between the last point in the set and the first outside;
              S_crit = D / (L B_crit);
  spread      (max - min) / mean of final losses over the grid points below B_crit (a point's
              loss: the mean over its replicates);
  noise       the two-way residual of ln loss over (grid point, replicate): one run's noise
              against the other runs of its replicate;
  verdict     the spread against the tolerance; naive against reparameterised at the same B
              and replicate (the same batches and masks), ln(naive / reparam) averaged over the
              Bs below B_crit other than B_base, a paired t test over the replicates (95%);
  gamma       per horizon D, a parabola in ln k through the best point and up to two neighbours
              each side gives k*(D); gamma = -slope of ln k* vs ln D (kappa = (D_base/D)^gamma at
              B_base); uncertainty by a parametric bootstrap with the measured seed noise.
Writes OUT/report/: batch_study.md (tables), batch_study.csv (one row per run),
batch_study.json (everything), batch_study.png (loss vs B), batch_study_gamma.png. With
--docs=DIR, also copies the plots to DIR/img/ and replaces the generated block of DIR/batch_study.md.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import importlib.util
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPERIMENT = os.path.join(ROOT, "experiments", "batch_study.py")
RESULT = "result.json"
NOISE = "eval_noise.json"
MODALITIES = ("text", "image", "audio")
MIN_SPAN = 8  # the verdict asks the flat range to span at least this factor of B
DOCS_BEGIN, DOCS_END = "<!-- batch_study:begin -->", "<!-- batch_study:end -->"


# ------------------------------------------------------------------------------ the plan

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


# ------------------------------------------------------------------------------ analysis

def spread(losses) -> float:
  """(max - min) / mean; inf if any loss is (a diverged run)."""
  x = np.asarray(losses, np.float64)
  if not np.isfinite(x).all():
    return math.inf
  return float((x.max() - x.min()) / x.mean())


def critical_batch(batches, losses, base_batch: int, tol: float) -> dict:
  """Where the loss stops being flat. The flat set is the grid points up to B_base, then each
  larger B in turn while the set's spread ((max - min) / mean) stays within `tol`: below B_crit
  the runs are within `tol` of each other. B_crit interpolates in log B between the last point
  inside and the first outside, where the spread reaches `tol`.

  -> flat_level (mean over B <= B_base), rel (loss / flat - 1 per B), below (the flat set),
  b_crit (None if no point leaves: then b_crit_lower_bound is the largest B; also None, with
  flat_at_base False, if the points up to B_base alone spread by more than `tol`).
  """
  order = np.argsort(batches)
  b = np.asarray(batches, np.float64)[order]
  loss = np.asarray(losses, np.float64)[order]
  if not (b <= base_batch).any():
    raise ValueError(f"critical_batch: no batch <= base_batch={base_batch} in {list(b)}")
  at_base = b <= base_batch
  flat = float(loss[at_base & np.isfinite(loss)].mean())
  n = int(at_base.sum())
  out = dict(flat_level=flat, batches=b.tolist(), rel=(loss / flat - 1.0).tolist(), b_crit=None,
             b_crit_lower_bound=None, below=b[:n].tolist(), flat_at_base=True)
  spreads = [spread(loss[:j + 1]) for j in range(len(b))]
  if spreads[n - 1] > tol:
    out["flat_at_base"] = False
    return out
  outside = [j for j in range(n, len(b)) if spreads[j] > tol]
  if not outside:
    out["b_crit_lower_bound"] = float(b.max())
    out["below"] = b.tolist()
    return out
  j = outside[0]
  s0, s1 = spreads[j - 1], spreads[j]
  frac = (tol - s0) / (s1 - s0) if math.isfinite(s1) else 0.0
  out["b_crit"] = float(math.exp(math.log(b[j - 1]) + frac * (math.log(b[j]) - math.log(b[j - 1]))))
  out["first_above"] = float(b[j])
  out["below"] = b[:j].tolist()
  return out


def parabola_vertex(x, y) -> tuple[float, float] | None:
  """Least-squares y = a x^2 + b x + c -> (vertex x, a); None if a <= 0 (no minimum)."""
  a, b, _ = np.polyfit(np.asarray(x, np.float64), np.asarray(y, np.float64), 2)
  if a <= 0:
    return None
  return float(-b / (2 * a)), float(a)


def optimum_window(kappas, losses, half_width: int = 2) -> tuple[np.ndarray, np.ndarray]:
  """The best point and up to `half_width` neighbours each side, as (ln k, loss), k sorted."""
  order = np.argsort(kappas)
  x = np.log(np.asarray(kappas, np.float64)[order])
  y = np.asarray(losses, np.float64)[order]
  i = int(np.argmin(y))
  lo, hi = max(0, i - half_width), min(len(x), i + half_width + 1)
  return x[lo:hi], y[lo:hi]


def fit_optimum(kappas, losses, sigma: float = 0.0, n_boot: int = 0, seed: int = 0) -> dict:
  """Loss-minimising k of one sweep: vertex of a parabola in ln k near the best point.

  `sigma` (absolute loss noise) drives a parametric bootstrap of ln k*; `bracketed` says whether
  the vertex lies inside the fitted points (else it is an extrapolation).
  """
  finite = np.isfinite(np.asarray(losses, np.float64))  # diverged runs are left out
  kappas, losses = np.asarray(kappas)[finite], np.asarray(losses, np.float64)[finite]
  if len(kappas) < 3:
    return dict(ln_k=None, reason=f"{len(kappas)} finite points (need >= 3)")
  x, y = optimum_window(kappas, losses)
  if len(x) < 3:
    return dict(ln_k=None, reason="fewer than 3 points around the best one")
  fit = parabola_vertex(x, y)
  if fit is None:
    return dict(ln_k=None, reason="no curvature (parabola opens downward)")
  ln_k, curvature = fit
  coef = np.polyfit(x, y, 2)
  out = dict(ln_k=ln_k, k=math.exp(ln_k), curvature=curvature, bracketed=bool(x[0] <= ln_k <= x[-1]),
             window=[float(math.exp(v)) for v in x], coef=[float(c) for c in coef],
             loss_at_k=float(np.polyval(coef, ln_k)))
  if n_boot and sigma > 0:
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
      f = parabola_vertex(x, y + rng.normal(0.0, sigma, len(y)))
      if f is not None:
        draws.append(min(max(f[0], x[0] - 1.0), x[-1] + 1.0))  # keep wild refits finite
    out["boot_ln_k"] = draws
    out["ln_k_sd"] = float(np.std(draws)) if len(draws) > 1 else None
  return out


def fit_gamma(tokens, ln_k, boot_ln_k=None) -> dict:
  """gamma = -slope of ln k*(D) vs ln D (least squares). `boot_ln_k`: per horizon, bootstrap
  draws of ln k* (equal counts), giving gamma's bootstrap sd and 68%/95% intervals."""
  if len(tokens) < 2:
    return dict(gamma=None, reason=f"{len(tokens)} horizon(s) with an optimum (need >= 2)")
  ln_d = np.log(np.asarray(tokens, np.float64))
  slope, intercept = np.polyfit(ln_d, np.asarray(ln_k, np.float64), 1)
  out = dict(gamma=float(-slope), intercept=float(intercept))
  if boot_ln_k is not None and all(len(d) for d in boot_ln_k):
    n = min(len(d) for d in boot_ln_k)
    draws = np.array([np.asarray(d[:n]) for d in boot_ln_k])        # [horizons, n]
    gammas = -np.polyfit(ln_d, draws, 1)[0]
    out.update(gamma_sd=float(gammas.std()),
               gamma_68=[float(v) for v in np.percentile(gammas, [16, 84])],
               gamma_95=[float(v) for v in np.percentile(gammas, [2.5, 97.5])],
               n_boot=int(n))
  return out


def _loss(result) -> float:
  """Final validation loss; inf for a run that diverged."""
  return math.inf if result.get("diverged") else float(result["eval"]["loss"])


def _metric(result, key) -> float:
  return math.inf if result.get("diverged") else float(result["eval"][key])


def _clip(result) -> float:
  return float(result.get("clip", 0.0))


def _mask_seed(result) -> int:
  return int(result.get("mask_seed", -1))


def select(results: dict, study: Study) -> dict:
  """The study's groups from a {name: result} dict (runs present so far)."""
  masked = [r for r in results.values() if _mask_seed(r) >= 0 and not _clip(r)]
  rs = [r for r in results.values() if not _clip(r) and _mask_seed(r) < 0]

  def at_base(r, k=None):  # the base point (B_base, D_base), at multiplier k if given
    return (r["batch"] == study.base_batch and r["tokens"] == study.base_tokens
            and not r["sde"] and (k is None or r["kappa_mult"] == k))
  base_sweep = sorted((r for r in rs if at_base(r) and r["seed"] == 0),
                      key=lambda r: r["kappa_mult"])
  k0 = min(base_sweep, key=_loss)["kappa_mult"] if base_sweep else None

  def grid(sde, base=k0):
    runs = sorted((r for r in rs if r["tokens"] == study.base_tokens and r["seed"] == 0 and
                   r["kappa_mult"] == base and (r["sde"] == sde or r["batch"] == study.base_batch)),
                  key=lambda r: r["batch"])
    return [replicate_mean(r, masked, study.grid_mask_seeds) for r in runs]
  others = {k: dict(reparam=grid(True, k), naive=grid(False, k))
            for k in study.other_bases if k != k0}
  sweeps = {}
  for r in rs:
    if r["batch"] == study.base_batch and not r["sde"] and r["seed"] == 0:
      sweeps.setdefault(r["tokens"], []).append(r)
  seeds = {k: sorted((r for r in rs if at_base(r, k)), key=lambda r: r["seed"])
           for k in [k0] + list(others)}
  clipped = [r for r in results.values() if _clip(r)]
  # Per base: its seed-0 run, then its training-mask-seed runs.
  mask_seeds = {k: [r for r in runs if r["seed"] == 0][:1]
                + sorted((r for r in masked if at_base(r, k) and r["seed"] == 0), key=_mask_seed)
                for k, runs in seeds.items()}
  return dict(mask_seeds_by_base=mask_seeds, k0=k0, base_sweep=base_sweep, reparam=grid(True), naive=grid(False), clipped=clipped,
              others=others,
              sweeps={d: sorted(v, key=lambda r: r["kappa_mult"]) for d, v in sorted(sweeps.items())},
              seed_runs=seeds.get(k0, []), seeds_by_base=seeds)


def replicate_mean(run: dict, masked: list, replicates: int) -> dict:
  """`run` with its eval metrics averaged over its training-mask replicates 1..replicates
  (those present), or `run` itself when there are none."""
  twins = [r for r in masked if (r["batch"], r["tokens"], r["sde"], r["kappa_mult"], r["seed"])
           == (run["batch"], run["tokens"], run["sde"], run["kappa_mult"], run["seed"])
           and 1 <= _mask_seed(r) <= replicates]
  if not twins or run.get("diverged"):
    return run
  group = [run] + sorted(twins, key=_mask_seed)
  if any(r.get("diverged") for r in group):
    return dict(run, diverged=True, replicates=len(group))
  metrics = {k: float(np.mean([r["eval"][k] for r in group])) for k in run["eval"]}
  return dict(run, eval=metrics, replicates=len(group),
              replicate_losses=[_loss(r) for r in group])


def seed_noise(runs: list) -> dict:
  """Spread of the final loss over runs that differ only by seed."""
  losses = [_loss(r) for r in runs]
  many = len(losses) > 1
  return dict(losses=losses, seeds=[r["seed"] for r in runs],
              sd=float(np.std(losses, ddof=1)) if many else None,
              rel_sd=float(np.std(losses, ddof=1) / np.mean(losses)) if many else None,
              spread=spread(losses) if many else None)


def paired_noise(table) -> dict:
  """Noise of comparisons inside a replicate. `table` [points, replicates]: final losses, each
  replicate the whole grid under one training-mask seed. A replicate's common level shift
  (a factor) cancels in its comparisons; what is left is the two-way residual of ln loss,
  ln L - point mean - replicate mean + grand mean, whose sd (df (points-1)(replicates-1)) is
  one run's relative noise against the other runs of its replicate."""
  t = np.asarray(table, np.float64)
  points, reps = t.shape
  if points < 2 or reps < 2 or not (np.isfinite(t).all() and (t > 0).all()):
    return dict(sd=None, rel_sd=None, points=points, replicates=reps)
  x = np.log(t)
  resid = x - x.mean(1, keepdims=True) - x.mean(0, keepdims=True) + x.mean()
  rel_sd = float(math.sqrt((resid ** 2).sum() / ((points - 1) * (reps - 1))))
  return dict(sd=rel_sd * float(t.mean()), rel_sd=rel_sd, points=points, replicates=reps,
              level_shifts=[float(v) for v in np.exp(x.mean(0) - x.mean()) - 1.0])


def replicates(run: dict) -> int:
  return len(run.get("replicate_losses", ()))


def complete(runs: list) -> list:
  """The runs that have the most replicates any of them has (a grid point still being
  replicated, or one the study stopped at, is left out)."""
  full = max(map(replicates, runs), default=0)
  return [r for r in runs if replicates(r) == full]


def replicate_table(runs: list) -> np.ndarray | None:
  """[points, replicates] losses of the distinct grid runs that have every replicate."""
  distinct = {r["name"]: r for r in complete(runs) if replicates(r)}
  rows = [r["replicate_losses"] for r in distinct.values()]
  if len(rows) < 2:
    return None
  return np.asarray(rows, np.float64)


def naive_paired(reparam: list, naive: list, batches, base_batch: int) -> dict | None:
  """Naive against reparameterised at the same B and replicate, over `batches` other than the
  base. The two runs of a pair see the same batches with the same masks and differ only by the
  hyperparameters, so the replicates' scatter of d = ln(naive / reparam) is the noise of the
  comparison (a paired t test, replicates - 1 degrees of freedom). Per B, and pooled: each
  replicate's mean of d over the Bs. None without two replicates of every such point."""
  from scipy import stats
  rep = {r["batch"]: r for r in reparam}
  nai = {r["batch"]: r for r in naive}
  points = sorted(int(b) for b in batches if b != base_batch and b in rep and b in nai)
  if not points:
    return None
  n = replicates(rep[points[0]])
  if n < 2 or any(replicates(rep[b]) != n or replicates(nai[b]) != n for b in points):
    return None
  d = np.log([nai[b]["replicate_losses"] for b in points]) - np.log(
      [rep[b]["replicate_losses"] for b in points])

  def test(x):
    mean, se = float(x.mean()), float(x.std(ddof=1) / math.sqrt(n))
    return dict(mean=mean, se=se, t=mean / se if se > 0 else math.copysign(math.inf, mean))
  t_crit = float(stats.t.ppf(0.975, n - 1))
  pooled = test(d.mean(0))
  return dict(batches=points, replicates=n, df=n - 1, t_crit=t_crit,
              per_batch={int(b): test(d[i]) for i, b in enumerate(points)},
              pooled=pooled, per_replicate=d.mean(0).tolist(),
              worse=bool(pooled["t"] >= t_crit))


def batch_analysis(reparam: list, naive: list, study: Study) -> dict:
  """Critical batch of the reparameterised grid; spreads of both grids below it."""
  crit = critical_batch([r["batch"] for r in reparam], [_loss(r) for r in reparam],
                        study.base_batch, study.tol)
  below = set(crit["below"])
  b_crit = crit["b_crit"]
  crit["s_crit"] = (study.base_tokens / (study.seq_len * b_crit)) if b_crit else None
  crit["s_crit_upper_bound"] = (study.base_tokens / (study.seq_len * crit["b_crit_lower_bound"])
                                if crit["b_crit_lower_bound"] else None)
  rep_below = [r for r in reparam if r["batch"] in below]
  naive_below = [r for r in naive if r["batch"] in below]
  crit["reparam_spread"] = spread([_loss(r) for r in rep_below]) if len(rep_below) > 1 else None
  crit["naive_spread"] = spread([_loss(r) for r in naive_below]) if len(naive_below) > 1 else None
  crit["span"] = (max(below) / min(below)) if below else None
  crit["base_batch"] = study.base_batch
  crit["naive_rel"] = {int(r["batch"]): _loss(r) / crit["flat_level"] - 1.0 for r in naive}
  crit["kappa_at_b_crit"] = None  # total multiplier of the defaults where flatness breaks
  if b_crit and reparam:
    r0 = reparam[0]
    crit["kappa_at_b_crit"] = r0["kappa_mult"] * b_crit / study.base_batch
  full = complete(reparam + naive)
  full_names = {r["name"] for r in full}
  n_reps = replicates(full[0]) if full else 0
  # Replicate analysis over the points with every replicate; those below B_crit must all be.
  if n_reps > 1 and all(r["name"] in full_names for r in rep_below + naive_below):
    crit["incomplete"] = sorted({r["name"] for r in reparam + naive} - full_names)
    naive = [r for r in naive if r["name"] in full_names]
    crit["by_replicate"] = []
    for j in range(n_reps):
      flat_j = float(np.mean([r["replicate_losses"][j] for r in reparam
                              if r["batch"] <= study.base_batch]))
      crit["by_replicate"].append(dict(
          reparam_spread=spread([r["replicate_losses"][j] for r in rep_below])
          if len(rep_below) > 1 else None,
          naive_spread=spread([r["replicate_losses"][j] for r in naive_below])
          if len(naive_below) > 1 else None,
          naive_rel={int(r["batch"]): r["replicate_losses"][j] / flat_j - 1.0 for r in naive}))
    table = replicate_table(full)
    crit["paired_noise"] = paired_noise(table) if table is not None else None
    crit["naive_paired"] = naive_paired(rep_below, naive_below, below, study.base_batch)
  crit["per_modality"] = {
      m: dict(reparam_spread=spread([_metric(r, f"bits_per_token/{m}") for r in rep_below])
              if len(rep_below) > 1 else None,
              naive_spread=spread([_metric(r, f"bits_per_token/{m}") for r in naive_below])
              if len(naive_below) > 1 else None)
      for m in MODALITIES}
  return crit


def analyse(results: dict, study: Study, noise: dict | None = None, n_boot: int = 400) -> dict:
  g = select(results, study)
  out = dict(k0=g["k0"], tol=study.tol, seq_len=study.seq_len, base_batch=study.base_batch,
             base_tokens=study.base_tokens)
  out["seed_noise"] = seed_noise(g["seed_runs"])
  out["mask_noise"] = seed_noise(g["mask_seeds_by_base"].get(g["k0"], []))
  out["eval_noise"] = noise
  # Batch grids: from the tuned base, and from the other bases.
  rep = g["reparam"]
  out["other_bases"] = {}
  for k, grids in g["others"].items():
    if any(r["batch"] < study.base_batch for r in grids["reparam"]):
      out["other_bases"][repr(k)] = batch_analysis(grids["reparam"], grids["naive"], study)
      out["other_bases"][repr(k)]["seed_noise"] = seed_noise(g["seeds_by_base"][k])
      out["other_bases"][repr(k)]["mask_noise"] = seed_noise(g["mask_seeds_by_base"][k])
  if rep and any(r["batch"] <= study.base_batch for r in rep):
    out["batch"] = crit = batch_analysis(rep, g["naive"], study)
    unclipped = {(r["batch"], r["sde"], r["kappa_mult"]): r for r in rep}
    out["clip_control"] = [
        dict(batch=r["batch"], clip=_clip(r), loss=_loss(r),
             unclipped=_loss(unclipped[(r["batch"], r["sde"], r["kappa_mult"])]),
             rel_to_flat=_loss(r) / crit["flat_level"] - 1.0)
        for r in g["clipped"] if (r["batch"], r["sde"], r["kappa_mult"]) in unclipped]
  # Gamma. The sweeps' points share their masks like the grid's, so the grid's paired noise is
  # theirs; without replicates, the seed noise.
  paired = (out.get("batch") or {}).get("paired_noise") or {}
  sigma = paired.get("sd") or out["seed_noise"]["sd"] or out["mask_noise"]["sd"] or 0.0
  out["gamma_noise_sd"] = sigma
  optima = {}
  for tokens, runs in g["sweeps"].items():
    optima[tokens] = fit_optimum([r["kappa_mult"] for r in runs], [_loss(r) for r in runs],
                                 sigma=sigma, n_boot=n_boot, seed=int(tokens) % 9973)
  out["optima"] = {str(t): {k: v for k, v in o.items() if k != "boot_ln_k"}
                   for t, o in optima.items()}
  usable = [(t, o) for t, o in optima.items() if o.get("ln_k") is not None]
  boot = [o["boot_ln_k"] for _, o in usable] if all("boot_ln_k" in o for _, o in usable) else None
  out["gamma"] = fit_gamma([t for t, _ in usable], [o["ln_k"] for _, o in usable], boot)
  out["gamma"]["horizons"] = [int(t) for t, _ in usable]
  out["gamma"]["all_bracketed"] = all(o["bracketed"] for _, o in usable)
  out["twins"] = twins(results)
  return out


def twins(results: dict) -> list[dict]:
  """Pairs of runs with the same batch, horizon, seed and total kappa, one reached through the
  SDE reparameterisation and one through k directly: the same hyperparameters by two code paths,
  so their losses should agree to well within the seed noise."""
  groups = {}
  for r in results.values():
    total_kappa = round(math.log(r["kappa_mult"] * r["kappa"]), 9)
    key = (r["batch"], r["tokens"], r["seed"], _mask_seed(r), _clip(r), total_kappa)
    groups.setdefault(key, []).append(r)
  out = []
  for runs in groups.values():
    sde = [r for r in runs if r["sde"]]
    direct = [r for r in runs if not r["sde"]]
    if sde and direct:
      a, b = sde[0], direct[0]
      out.append(dict(batch=a["batch"], tokens=a["tokens"], sde_run=a["name"],
                      direct_run=b["name"], sde_loss=_loss(a),
                      direct_loss=_loss(b), rel_diff=_loss(a) / _loss(b) - 1.0,
                      lr_rel_diff=a["lr"] / b["lr"] - 1.0))
  return sorted(out, key=lambda t: (t["tokens"], t["batch"], t["sde_run"]))


# ------------------------------------------------------------------------------ running

@functools.cache
def _load_experiment():
  """experiments/batch_study.py, loaded from the repository root (it imports experiments.tiny)."""
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  spec = importlib.util.spec_from_file_location("batch_study_experiment", EXPERIMENT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def train_run(study: Study, run: Run, root: str, devices=None) -> dict:
  """Trains `run` (or returns its stored result); writes OUT/runs/<name>/result.json."""
  workdir = os.path.join(root, "runs", run.name)
  path = os.path.join(workdir, RESULT)
  arg = study.arg(run)
  if os.path.exists(path):
    with open(path) as f:
      result = json.load(f)
    if result["arg"] != arg:
      raise ValueError(f"batch study: {path} was trained as {result['arg']!r}, not {arg!r} "
                       "(another study's settings): use a fresh --out")
    return result
  from tmdiff.configs.derived import derive
  from tmdiff.train import loop
  config = _load_experiment().get_config(arg)
  hp = derive(config)
  resumed = os.path.isdir(os.path.join(workdir, "checkpoints"))  # wall_s: this attempt only
  os.makedirs(workdir, exist_ok=True)
  handler = logging.FileHandler(os.path.join(workdir, "train.log"))
  handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
  logging.getLogger().addHandler(handler)
  start = time.perf_counter()
  diverged = False
  try:
    metrics = loop.train(config, workdir, devices=devices)
  except FloatingPointError as e:  # the loop stops on a non-finite loss: a result, not a crash
    logging.warning("%s diverged: %s", run.name, e)
    metrics, diverged = {}, True
  finally:
    logging.getLogger().removeHandler(handler)
    handler.close()
  wall = time.perf_counter() - start
  train_loss = None
  with open(os.path.join(workdir, loop.METRICS_FILE)) as f:
    for line in f:
      record = json.loads(line)
      if record["split"] == "train":
        train_loss = record["loss"]
  result = dict(name=run.name, arg=arg, **dataclasses.asdict(run), steps=hp.steps,
                kappa=hp.kappa, lr=hp.lr, beta1=hp.beta1, beta2=hp.beta2, eps=hp.eps,
                warmup_steps=hp.warmup_steps, train_loss=train_loss, eval=metrics, wall_s=wall,
                resumed=resumed, diverged=diverged)
  with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=1)
  os.replace(path + ".tmp", path)
  return result


def eval_noise(study: Study, run: Run, root: str, devices=None) -> dict:
  """`run`'s final eval re-done under study.eval_seeds other eval seeds (same rows, other
  masks and times): the part of a loss difference that is eval noise."""
  workdir = os.path.join(root, "runs", run.name)
  path = os.path.join(workdir, NOISE)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  from tmdiff.configs import derived
  from tmdiff.eval import elbo as elbo_lib
  from tmdiff.train import checkpoint as ckpt_lib
  from tmdiff.train.trainer import Trainer, make_mesh
  config = _load_experiment().get_config(study.arg(run))
  mesh = make_mesh(config, devices)
  trainer = Trainer(config, mesh)
  _, params = ckpt_lib.restore_params(workdir, trainer.abstract_state["params"])
  rows = elbo_lib.validation_rows(config, study.eval_rows)
  losses = {}
  for k in range(1, study.eval_seeds + 1):
    seeded = config.copy_and_resolve_references()
    seeded.seeds.eval = derived.seed_for(config, "eval") + 1000 * k  # params and rows fixed
    metrics = elbo_lib.evaluate_rows(Trainer(seeded, mesh), params, rows,
                                     batch_size=min(64, study.eval_rows))
    losses[str(seeded.seeds.eval)] = metrics["loss"]
  with open(path, "w") as f:
    json.dump(losses, f, indent=1)
  return losses


class Runner:
  """Trains runs, `jobs` at a time (each in its own process when jobs > 1), printing progress;
  keeps every result by name."""

  def __init__(self, study: Study, root: str, devices=None, jobs: int = 1, child_args=()):
    self.study, self.root, self.devices, self.jobs = study, root, devices, jobs
    self.child_args = list(child_args)  # flags every child process gets (devices, jax cache)
    self.results: dict[str, dict] = {}
    self.trained = 0

  def _report(self, run: Run, result: dict, trained: bool) -> None:
    self.results[run.name] = result
    self.trained += trained
    print(f"  {'trained' if trained else 'have   '} {run.name}: loss {_loss(result):.4f} "
          f"({result['wall_s']:.0f} s)", flush=True)

  def _announce(self, run: Run) -> None:
    print(f"  training {run.name} ({self.study.steps(run.batch, run.tokens)} steps) ...", flush=True)

  def ensure(self, runs) -> list[dict]:
    runs = list(runs)
    todo = [r for r in dict.fromkeys(runs) if r.name not in self.results]
    missing = []
    for run in todo:
      if os.path.exists(os.path.join(self.root, "runs", run.name, RESULT)):
        self._report(run, train_run(self.study, run, self.root), trained=False)
      else:
        missing.append(run)
    if self.jobs <= 1:
      for run in missing:
        self._announce(run)
        self._report(run, train_run(self.study, run, self.root, self.devices), trained=True)
    else:
      self._train_in_children(missing)
    return [self.results[r.name] for r in runs]

  def _train_in_children(self, runs: list[Run]) -> None:
    pending, active, failed = list(runs), {}, []
    try:
      while pending or active:
        while pending and len(active) < self.jobs:
          run = pending.pop(0)
          self._announce(run)
          workdir = os.path.join(self.root, "runs", run.name)
          os.makedirs(workdir, exist_ok=True)
          log = open(os.path.join(workdir, "train.out"), "a")
          spec = json.dumps(dict(study=dataclasses.asdict(self.study), run=dataclasses.asdict(run)))
          cmd = [sys.executable, "-m", "tmdiff.scaling.batch_study",
                 f"--out={os.path.abspath(self.root)}", f"--train_one={spec}"] + self.child_args
          active[run] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), log)
        time.sleep(0.5)
        for run, (proc, log) in list(active.items()):
          if proc.poll() is None:
            continue
          log.close()
          del active[run]
          if proc.returncode:
            failed.append(f"{run.name} (exit {proc.returncode}; log {log.name})")
            print(f"  FAILED {failed[-1]}", flush=True)
            pending.clear()  # finish the runs in flight, start no more
          else:
            self._report(run, train_run(self.study, run, self.root), trained=True)
    finally:
      for proc, log in active.values():
        proc.terminate()
        log.close()
    if failed:
      raise RuntimeError("batch study: runs failed: " + "; ".join(failed) + ". Finished runs are "
                         "kept; re-running the command resumes.")

  def sweep(self, tokens, kappas) -> list[dict]:
    """The k sweep at (B_base, tokens), grown at a winning edge."""
    s = self.study
    kappas = sorted(kappas)
    results = self.ensure(s.run(s.base_batch, tokens, kappa_mult=k) for k in kappas)
    for _ in range(s.max_extend):
      best = min(results, key=_loss)["kappa_mult"]
      if len(kappas) < 2 or kappas[0] < best < kappas[-1]:
        break
      step = kappas[1] / kappas[0] if best == kappas[0] else kappas[-1] / kappas[-2]
      new = kappas[0] / step if best == kappas[0] else kappas[-1] * step
      kappas = sorted(kappas + [new])
      print(f"  best k={best:g} at the edge: adding k={new:g}", flush=True)
      results += self.ensure([s.run(s.base_batch, tokens, kappa_mult=new)])
    return results

  def batch_grid(self, base) -> None:
    """Reparameterised and naive runs from the base multiplier `base`, grown upward (x2) while
    the reparameterised grid stays flat. A new point is first trained reparameterised under
    study.growth_replicates replicates; only if the grid is still flat is it filled out
    (every replicate, naive too), since the analysis uses the naive runs below B_crit alone."""
    s = self.study
    batches = sorted(s.batches)
    replicas = [-1] + list(range(1, s.grid_mask_seeds + 1))

    def fill(points):
      self.ensure(s.run(b, sde=sde, kappa_mult=base, mask_seed=i)
                  for sde in (True, False) for b in points for i in replicas)
    fill(batches)
    while True:
      nxt = batches[-1] * 2
      crit = self._crit(base, batches)
      if crit["b_crit"] is not None or not crit["flat_at_base"] or nxt > s.max_batch or \
          s.steps(nxt) < s.min_steps:
        return
      first = replicas[:max(1, s.growth_replicates)]
      print(f"  reparameterised loss still flat at B={batches[-1]}: adding B={nxt} "
            f"({len(first)} replicates first)", flush=True)
      batches.append(nxt)
      self.ensure(s.run(nxt, sde=True, kappa_mult=base, mask_seed=i) for i in first)
      if self._crit(base, batches)["b_crit"] is None:
        fill([nxt])

  def _crit(self, base, batches) -> dict:
    """critical_batch of the reparameterised grid from `base` over `batches`, each point's loss
    the mean of the replicates trained so far (select's grid)."""
    g = select(self.results, self.study)
    grid = g["reparam"] if base == g["k0"] else g["others"][base]["reparam"]
    grid = [r for r in grid if r["batch"] in batches]
    return critical_batch([r["batch"] for r in grid], [_loss(r) for r in grid],
                          self.study.base_batch, self.study.tol)


def run_study(study: Study, root: str, devices=None, jobs: int = 1, child_args=()) -> dict:
  runner = Runner(study, root, devices, jobs, child_args)
  s = study
  print(f"[1/4] base tuning: k sweep at B_base={s.base_batch}, D_base={s.base_tokens:,}", flush=True)
  base = runner.sweep(s.base_tokens, s.kappas)
  k0 = min(base, key=_loss)["kappa_mult"]
  print(f"      tuned base k0={k0:g}", flush=True)
  bases = [k0] + [k for k in s.other_bases if k != k0]
  centres = {h: k0 * h ** -s.gamma_guess for h in s.horizons}
  print(f"[2/4] batch grids at D_base from the bases k={', '.join(f'{k:g}' for k in bases)}, "
        f"reparameterised and naive, B in {sorted(s.batches)}+; {s.seeds} more seeds and {s.mask_seeds} more "
        f"mask seeds of each base; "
        f"gamma k sweeps at D = {[int(h * s.base_tokens) for h in s.horizons]}", flush=True)
  # Everything that k0 decides, at once (in parallel when jobs > 1); then what grows.
  planned = [s.run(b, sde=sde, kappa_mult=k) for k in bases for b in sorted(s.batches)
             for sde in (True, False)]
  planned += [s.run(s.base_batch, kappa_mult=k, seed=i) for k in bases
              for i in range(1, s.seeds + 1)]
  planned += [s.run(s.base_batch, kappa_mult=k, mask_seed=i) for k in bases
              for i in range(1, s.mask_seeds + 1)]
  planned += [s.run(b, sde=sde, kappa_mult=k, mask_seed=i) for k in bases
              for b in sorted(s.batches) for sde in (True, False)
              for i in range(1, s.grid_mask_seeds + 1)]
  if s.clip_control:
    planned.append(s.run(min(s.batches), sde=True, kappa_mult=k0, clip=s.clip_control))
  planned += [s.run(s.base_batch, int(round(h * s.base_tokens)), kappa_mult=c * k)
              for h, c in centres.items() for k in s.horizon_kappas]
  runner.ensure(planned)
  for k in bases:
    runner.batch_grid(k)
  for h, c in centres.items():
    runner.sweep(int(round(h * s.base_tokens)), [c * k for k in s.horizon_kappas])
  noise = None
  if s.eval_seeds:
    print(f"[3/4] eval noise: the base and the smallest-B runs under {s.eval_seeds} other eval "
          "seeds", flush=True)
    g = select(runner.results, s)
    picks = [g["reparam"][0], g["naive"][0]] if g["reparam"] else []
    for r in [runner.results[s.run(s.base_batch, kappa_mult=k0).name]] + picks:
      eval_noise(s, Run(r["batch"], r["tokens"], r["sde"], r["kappa_mult"], r["seed"]), root,
                 devices)
    noise = stored_eval_noise(runner.results, s, root)
  print("[4/4] report", flush=True)
  return dict(results=runner.results, trained=runner.trained, noise=noise)


def stored_eval_noise(results: dict, study: Study, root: str) -> dict | None:
  """The eval-noise summary of every run with an eval_noise.json: its own final loss (eval
  seed "0") beside its re-evaluations, the tuned base first (the reference of the pairs)."""
  k0 = select(results, study)["k0"]
  base = study.run(study.base_batch, kappa_mult=k0).name if k0 is not None else None
  losses = {}
  for name in sorted(results, key=lambda n: n != base):
    path = os.path.join(root, "runs", name, NOISE)
    if os.path.exists(path):
      with open(path) as f:
        losses[name] = {"0": _loss(results[name]), **json.load(f)}
  return summarise_eval_noise(losses) if losses else None


def summarise_eval_noise(losses: dict) -> dict:
  """{run: {eval_seed: loss}} -> per-run relative sd, and the sd of paired differences."""
  names = list(losses)
  seeds = sorted(set.intersection(*(set(v) for v in losses.values())), key=int)
  table = np.array([[losses[n][s] for s in seeds] for n in names])  # [runs, seeds]
  out = dict(losses=losses, eval_seeds=[int(s) for s in seeds])
  if len(seeds) > 1:
    out["rel_sd"] = {n: float(table[i].std(ddof=1) / table[i].mean()) for i, n in enumerate(names)}
    diffs = {f"{names[i]} - {names[0]}": float((table[i] - table[0]).std(ddof=1) / table[0].mean())
             for i in range(1, len(names))}
    out["paired_diff_rel_sd"] = diffs
  return out


# ------------------------------------------------------------------------------ reporting

CSV_COLUMNS = ("name", "batch", "tokens", "steps", "sde", "kappa_mult", "kappa", "lr", "beta1",
               "beta2", "eps", "seed", "clip", "loss", "bits_all", "bits_text", "bits_image", "bits_audio",
               "train_loss", "wall_s")


def _row(r) -> dict:
  return dict(name=r["name"], batch=r["batch"], tokens=r["tokens"], steps=r["steps"],
              sde=int(r["sde"]), kappa_mult=r["kappa_mult"], kappa=r["kappa"], lr=r["lr"],
              beta1=r["beta1"], beta2=r["beta2"], eps=r["eps"], seed=r["seed"], clip=_clip(r),
              loss=_loss(r), bits_all=_metric(r, "bits_per_token/all"),
              bits_text=_metric(r, "bits_per_token/text"),
              bits_image=_metric(r, "bits_per_token/image"),
              bits_audio=_metric(r, "bits_per_token/audio"), train_loss=r["train_loss"],
              wall_s=r["wall_s"])


def expected_range(n: int) -> float:
  """E[max - min] of n standard normal draws: the integral of 1 - Phi^n - (1 - Phi)^n."""
  if n < 2:
    return 0.0
  x = np.linspace(-9.0, 9.0, 18001)
  cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
  return float(np.trapezoid(1.0 - cdf ** n - (1.0 - cdf) ** n, x))


def noise_alone_spread(points: int, rel_sd: float, replicates: int) -> float:
  """Expected relative spread of `points` means of `replicates` runs each, equal but for noise
  of relative sd `rel_sd` per run."""
  return expected_range(points) * rel_sd / math.sqrt(replicates)


def _pct(x) -> str:
  return "n/a" if x is None else f"{100 * x:.2f}%"


def _noise_lines(b: dict, sn: dict, mn: dict | None, tol: float, replicates: int = 1
                 ) -> list[str]:
  lines = []
  if sn["sd"] is not None:
    lines.append(f"- seed noise at this base (seeds {sn['seeds']}; init, data order, masks and "
                 f"eval masks all change): sd {_pct(sn['rel_sd'])} of the loss, spread "
                 f"{_pct(sn['spread'])}")
  if mn and mn["sd"] is not None:
    lines.append(f"- training-mask noise at this base (mask seeds: {len(mn['losses'])} runs; "
                 f"init, data order and eval fixed, as between the grid's runs): sd "
                 f"{_pct(mn['rel_sd'])}, spread {_pct(mn['spread'])}")
    sn = mn  # the noise that separates the grid's runs
  pn = b.get("paired_noise") or {}
  if pn.get("rel_sd") is not None:
    return lines + _replicate_lines(b, pn, tol)
  if sn["sd"] is not None and len(b["below"]) > 1:
    noise_spread = noise_alone_spread(len(b["below"]), sn["rel_sd"], replicates)
    each = f" (each the mean of {replicates} mask seeds)" if replicates > 1 else ""
    lines.append(
        f"- resolution: {len(b['below'])} grid points{each} differing by that noise alone would "
        f"spread by "
        f"~{_pct(noise_spread)}; against the {100 * tol:g}% tolerance the grid "
        + ("resolves flatness." if noise_spread < tol else
           "**cannot** tell flat from not flat with one seed per point: more seeds per point "
           "(or a longer horizon) are needed."))
  return lines


def naive_vs_flat(b: dict, rel_sd: float, replicates: int, base_batch: int) -> dict:
  """Per naive grid point below B_crit (other than the base run itself): its distance from the
  flat level in standard errors of that difference (a mean over `replicates` against the mean
  of the flat points)."""
  flat_points = sum(1 for x in b["batches"] if x <= base_batch)
  se = rel_sd * math.sqrt(1.0 / replicates + 1.0 / (replicates * flat_points))
  z = {k: v / se for k, v in b["naive_rel"].items() if k in b["below"] and k != base_batch}
  return dict(se=se, z=z)


def _replicate_lines(b: dict, pn: dict, tol: float) -> list[str]:
  reps = pn["replicates"]
  by = b.get("by_replicate", [])
  lines = [
      f"- replicates: the whole grid under {reps} training-mask seeds (masks keyed per example, "
      "so the runs of a replicate see the same masks); their levels differ by "
      + ", ".join(f"{100 * v:+.2f}%" for v in pn["level_shifts"])
      + f"; a run's noise relative to the other runs of its replicate (two-way residual over "
      f"{pn['points']} grid points): sd **{_pct(pn['rel_sd'])}**"
      + (f" (left out, without every replicate: {', '.join(b['incomplete'])})"
         if b.get("incomplete") else ""),
      "- per replicate, below B_crit: reparameterised spread " + " / ".join(
          _pct(x["reparam_spread"]) for x in by) + "; naive spread " + " / ".join(
          _pct(x["naive_spread"]) for x in by)]
  if len(b["below"]) > 1:
    noise_spread = noise_alone_spread(len(b["below"]), pn["rel_sd"], reps)
    lines.append(f"- resolution: {len(b['below'])} points (each a mean of {reps}) differing by "
                 f"that noise alone would spread by ~{_pct(noise_spread)}, against the "
                 f"{100 * tol:g}% tolerance")
  v = naive_vs_flat(b, pn["rel_sd"], reps, b["base_batch"])
  if v["z"]:
    lines.append("- naive runs below B_crit vs the flat level, in standard errors of that "
                 f"difference under the residual noise ({_pct(v['se'])}): " + ", ".join(
                     f"B={k} {100 * b['naive_rel'][k]:+.2f}% ({z:+.1f} se)"
                     for k, z in sorted(v["z"].items())))
  np_ = b.get("naive_paired")
  if np_:
    pooled = np_["pooled"]
    lines.append(
        "- naive vs reparameterised at the same B and replicate (same batches and masks), "
        "ln(naive / reparam), mean +- se over the replicates: " + ", ".join(
            f"B={k} {100 * x['mean']:+.2f}% +- {100 * x['se']:.2f}%"
            for k, x in np_["per_batch"].items())
        + f"; pooled over B = {', '.join(map(str, np_['batches']))}: "
        f"**{100 * pooled['mean']:+.2f}% +- {100 * pooled['se']:.2f}%** (t = {pooled['t']:.1f}, "
        f"{np_['df']} degrees of freedom; 95% two-sided critical value {np_['t_crit']:.2f})")
  flat = (b["reparam_spread"] is not None and b["reparam_spread"] <= tol
          and b["span"] >= MIN_SPAN)
  worse = bool(np_ and np_["worse"])
  lines.append(f"- **verdict**: reparameterised runs within {100 * tol:g}% of each other below "
               f"B_crit over a span of at least {MIN_SPAN}x: **{'yes' if flat else 'no'}** "
               f"({_pct(b['reparam_spread'])} over {b['span']:.0f}x); naive runs "
               "worse than reparameterised ones below B_crit (pooled paired t test, 95%): "
               f"**{'yes' if worse else 'no'}**")
  return lines


def _batch_lines(b: dict) -> list[str]:
  if b["b_crit"]:
    j = b["batches"].index(b["first_above"])
    crit = (f"B_crit ~ {b['b_crit']:.1f} sequences (S_crit ~ {b['s_crit']:.0f} steps; the first "
            f"grid point that breaks flatness: B={b['first_above']:.0f}, "
            f"{100 * b['rel'][j]:+.2f}% from the flat level; total kappa there "
            f"{b['kappa_at_b_crit']:.2g})")
  elif b.get("flat_at_base", True):
    crit = (f"B_crit > {b['b_crit_lower_bound']:.0f} (not reached; S_crit < "
            f"{b['s_crit_upper_bound']:.0f} steps)")
  else:
    crit = "no flat range: the batches up to B_base already spread by more than the tolerance"
  return [
      f"- flat level (mean reparameterised loss, B <= B_base): {b['flat_level']:.4f} nats/token",
      f"- {crit}",
      f"- below B_crit (B = {', '.join(f'{x:.0f}' for x in b['below'])}; span {b['span']:.0f}x): "
      f"reparameterised spread **{_pct(b['reparam_spread'])}**, naive spread "
      f"**{_pct(b['naive_spread'])}** ((max - min) / mean of the final validation loss)",
      "- naive runs relative to the flat level: " + ", ".join(
          f"B={k} {100 * v:+.2f}%" for k, v in sorted(b["naive_rel"].items())),
      "- per modality (bits/token), reparameterised / naive spread below B_crit: " + "; ".join(
          f"{m} {_pct(v['reparam_spread'])} / {_pct(v['naive_spread'])}"
          for m, v in b["per_modality"].items()),
      ""]


def markdown(results: dict, study: Study, report: dict) -> str:
  g = select(results, study)
  lines = []
  b = report.get("batch")
  if b:
    base = next(r for r in g["base_sweep"] if r["kappa_mult"] == g["k0"])
    lines += [
        f"Token horizon D = {study.base_tokens:,} tokens, L = {study.seq_len}, base B_base = "
        f"{study.base_batch}, base AdamW values reparameterised by k0 = {g['k0']:g} (lr "
        f"{base['lr']:.4g}, beta1 {base['beta1']:.4g}, beta2 {base['beta2']:.4g}, eps "
        f"{base['eps']:.3g}); tolerance {100 * study.tol:.1f}%.", "",
        f"From the tuned base (k0 = {g['k0']:g}):"] + _batch_lines(b)[:-1]
    lines += _noise_lines(b, report["seed_noise"], report.get("mask_noise"), study.tol,
                          1 + study.grid_mask_seeds) + [""]
    for k, other in report.get("other_bases", {}).items():
      lines += [f"From the base k = {float(k):g} (lr {3e-3 * math.sqrt(float(k)):.4g}, betas "
                f"{0.9 ** float(k):.4g} / {0.95 ** float(k):.4g}):"] + _batch_lines(other)[:-1]
      lines += _noise_lines(other, other["seed_noise"], other.get("mask_noise"), study.tol,
                            1 + study.grid_mask_seeds)
      lines += [""]
  for c in report.get("clip_control", []):
    lines.append(f"- clip control: B = {c['batch']} reparameterised with gradient clipping at "
                 f"{c['clip']:g}: loss {c['loss']:.4f} vs {c['unclipped']:.4f} without "
                 f"({_pct(c['loss'] / c['unclipped'] - 1)}; {_pct(c['rel_to_flat'])} from the "
                 "flat level)")
  en = report.get("eval_noise")
  if en and "rel_sd" in en:
    lines.append("- eval noise (same rows, other eval-mask seeds): sd " + ", ".join(
        f"{_pct(v)} ({n})" for n, v in en["rel_sd"].items()) + "; paired differences: sd " +
        ", ".join(f"{_pct(v)} ({n})" for n, v in en["paired_diff_rel_sd"].items()))
  for t in report.get("twins", []):
    lines.append(f"- same hyperparameters by two code paths: {t['sde_run']} (SDE) {t['sde_loss']:.4f}"
                 f" vs {t['direct_run']} (k directly) {t['direct_loss']:.4f}: "
                 f"{100 * t['rel_diff']:+.2f}%")
  gm = report["gamma"]
  if gm.get("gamma") is not None:
    ci = (f" +- {gm['gamma_sd']:.2f} (bootstrap sd; 68% interval {gm['gamma_68'][0]:.2f}.."
          f"{gm['gamma_68'][1]:.2f}, 95% {gm['gamma_95'][0]:.2f}..{gm['gamma_95'][1]:.2f})"
          if "gamma_sd" in gm else "")
    lines.append(f"- gamma = **{gm['gamma']:.2f}**{ci} from horizons "
                 f"{', '.join(f'{t:,}' for t in gm['horizons'])} (paper: 0.44)"
                 + ("" if gm["all_bracketed"] else "; some optima NOT bracketed by their sweep"))
  else:
    lines.append(f"- gamma: not fitted ({gm.get('reason')})")
  for t, o in report["optima"].items():
    if o.get("ln_k") is not None:
      sd = f" (ln k* sd {o['ln_k_sd']:.2f})" if o.get("ln_k_sd") is not None else ""
      lines.append(f"  - D = {int(t):,}: k* = {o['k']:.3g}{sd}"
                   + ("" if o["bracketed"] else " (extrapolated)"))
  lines += ["", "| group | B | steps | D | sde | k | kappa | lr | beta1 | beta2 | loss (nats) | "
            "text | image | audio (bits) | wall (s) |", "|" + "---|" * 15]
  groups = [("reparam", g["reparam"]), ("naive", g["naive"])]
  for k, grids in g["others"].items():
    groups += [(f"reparam k={k:g}", grids["reparam"]), (f"naive k={k:g}", grids["naive"])]
  groups += [(f"k sweep", runs) for _, runs in g["sweeps"].items()]
  groups += [(f"seed k={k:g}", [r for r in runs if r["seed"]])
             for k, runs in g["seeds_by_base"].items()]
  groups += [(f"mask seed k={k:g}", [r for r in runs if _mask_seed(r) >= 0])
             for k, runs in g["mask_seeds_by_base"].items()]
  groups += [(f"clip {_clip(r):g}", [r]) for r in g["clipped"]]
  for label, runs in groups:
    for r in runs:
      if r.get("diverged"):
        scores = "diverged | | | "
      else:
        scores = (f"{_loss(r):.4f} | " + " | ".join(
            f"{_metric(r, f'bits_per_token/{m}'):.3f}" for m in MODALITIES) + " ")
      mean_of = f" (mean of {r['replicates']})" if r.get("replicates") else ""
      lines.append(
          f"| {label}{mean_of} | {r['batch']} | {r['steps']} | {r['tokens']:,} | {int(r['sde'])} | "
          f"{r['kappa_mult']:g} | {r['kappa']:.3g} | {r['lr']:.3g} | {r['beta1']:.4f} | "
          f"{r['beta2']:.4f} | {scores}| {r['wall_s']:.0f}{'*' if r.get('resumed') else ''} |")
  walls = [r["wall_s"] for r in results.values()]
  lines += ["", f"{len(walls)} runs, {sum(walls) / 60:.1f} min of training and eval in all "
            f"(per run {min(walls):.0f}-{max(walls):.0f} s, compilation included)."]
  calls = [c for c in report.get("invocations", []) if c["trained"]]
  if calls:
    lines.append(f"The study command trained them in {len(calls)} invocation(s) taking "
                 f"{sum(c['seconds'] for c in calls) / 60:.1f} min of wall time in all ("
                 + ", ".join(f"{c['date']}: {c['seconds'] / 60:.1f} min, {c['trained']} runs, "
                             f"{c['jobs']} jobs on {c['cpus']} CPUs" for c in calls) + ").")
  if any(r.get("resumed") for r in results.values()):
    lines.append("*: resumed from a checkpoint after an interruption; the time is that of the "
                 "last attempt only.")
  return "\n".join(lines) + "\n"


def plot(results: dict, study: Study, report: dict, out_dir: str) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from tmdiff.scaling import plots
  g = select(results, study)
  paths = []
  b = report.get("batch")
  if b:
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.4))
    grids = [(g["k0"], g["reparam"], g["naive"], b)]
    grids += [(k, v["reparam"], v["naive"], report["other_bases"][repr(k)])
              for k, v in g["others"].items() if repr(k) in report["other_bases"]]
    for i, (k, reparam, naive, crit) in enumerate(grids):
      colour = f"C{i}"
      name = f"base k={k:g}" + (" (tuned)" if i == 0 else "")
      rel_sd = (crit.get("paired_noise") or {}).get("rel_sd") or 0.0
      for label, runs, style in ((f"SDE reparameterised, {name}", reparam, "o-"),
                                 (f"naive, {name}", naive, "s--")):
        runs = [r for r in runs if not r.get("diverged")]
        # +-1 se of a point's mean: the residual noise of a run over sqrt(its replicates)
        se = [_loss(r) * rel_sd / math.sqrt(max(replicates(r), 1)) for r in runs]
        axes[0].errorbar([r["batch"] for r in runs], [_loss(r) for r in runs], yerr=se,
                         fmt=style, color=colour, label=label, ms=5, capsize=2,
                         mfc=colour if style == "o-" else "white")
      seeded = [r for r in g["seeds_by_base"].get(k, []) if r["seed"] and not r.get("diverged")]
      if seeded:  # the base point's other seeds: the noise every grid point carries
        axes[0].plot([study.base_batch * 1.06 ** (i + 1) for i in range(len(seeded))],
                     [_loss(r) for r in seeded], "x", color=colour, ms=7,
                     label=f"base k={k:g}, other seeds")
      runs = [r for r in reparam if not r.get("diverged")]
      axes[1].plot([k * r["batch"] / study.base_batch for r in runs],
                   [100 * (_loss(r) / crit["flat_level"] - 1) for r in runs], "o-", color=colour,
                   label=f"SDE reparameterised, {name}", ms=5)
    # The tolerance above the lowest reparameterised point below B_crit: the points below
    # B_crit are within it of each other when all lie in this band.
    flat_set = [_loss(r) for r in g["reparam"] if r["batch"] in b["below"]]
    low, top = min(flat_set), min(flat_set) + study.tol * float(np.mean(flat_set))
    axes[0].axhspan(low, top, color="0.88",
                    label=f"{100 * study.tol:g}% above the lowest point below B_crit")
    axes[0].axvline(study.base_batch, color="0.5", ls="--", lw=0.8,
                    label=f"B_base = {study.base_batch}")
    if b["b_crit"]:
      axes[0].axvline(b["b_crit"], color="r", ls=":", label=f"B_crit ~ {b['b_crit']:.1f} (tuned)")
    axes[0].set(xscale="log", xlabel=f"physical batch B (sequences of {study.seq_len}); "
                f"D = {study.base_tokens:,}", ylabel="final val loss (nats/token)",
                title="fixed token horizon: loss vs physical batch")
    axes[0].set_xscale("log", base=2)
    flat = b["flat_level"]
    axes[1].axhspan(100 * (low / flat - 1), 100 * (top / flat - 1), color="0.88",
                    label=f"{100 * study.tol:g}% above the lowest point below B_crit")
    axes[1].set_xscale("log", base=2)
    axes[1].set(xlabel="total kappa = k B / B_base (lr x sqrt, beta^kappa of the defaults)",
                ylabel="loss - own flat level (%)", title="reparameterised runs vs total kappa")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    paths.append(plots._save(fig, os.path.join(out_dir, "batch_study.png")))
  if g["sweeps"] and any(len(v) > 1 for v in g["sweeps"].values()):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plots._colours(list(g["sweeps"]))
    for colour, (tokens, runs) in zip(colours, g["sweeps"].items()):
      runs = [r for r in runs if not r.get("diverged")]
      k = np.array([r["kappa_mult"] for r in runs])
      y = np.array([_loss(r) for r in runs])
      axes[0].plot(k, y, "o", color=colour, label=f"D = {tokens:,}")
      o = report["optima"].get(str(tokens), {})
      if o.get("ln_k") is not None:
        xs = np.linspace(math.log(o["window"][0]), math.log(o["window"][-1]), 50)
        axes[0].plot(np.exp(xs), np.polyval(o["coef"], xs), "-", color=colour, lw=1)
        axes[0].plot([o["k"]], [o["loss_at_k"]], "*", color=colour, ms=12)
    axes[0].set_xscale("log", base=2)
    axes[0].set(xlabel="kappa multiplier k (lr x sqrt(k), beta^k, eps / sqrt(k))",
                ylabel="final val loss (nats/token)", title=f"k sweeps at B = {study.base_batch}")
    axes[0].legend(fontsize=8)
    gm = report["gamma"]
    pts = [(int(t), o) for t, o in report["optima"].items() if o.get("ln_k") is not None]
    if pts:
      d = np.array([t for t, _ in pts], np.float64)
      lk = np.array([o["ln_k"] for _, o in pts])
      err = [o.get("ln_k_sd") or 0.0 for _, o in pts]
      axes[1].errorbar(d, np.exp(lk), yerr=[np.exp(lk) - np.exp(lk - err), np.exp(lk + err) - np.exp(lk)],
                       fmt="o", label="fitted optimum k*(D)")
      ds = np.geomspace(d.min() / 1.3, d.max() * 1.3, 20)
      if gm.get("gamma") is not None:
        axes[1].plot(ds, np.exp(gm["intercept"] - gm["gamma"] * np.log(ds)), "-",
                     label=f"fit: gamma = {gm['gamma']:.2f}")
        anchor = np.exp(gm["intercept"] - gm["gamma"] * np.log(study.base_tokens))
        axes[1].plot(ds, anchor * (study.base_tokens / ds) ** 0.44, ":", label="gamma = 0.44 (paper)")
      axes[1].set(xscale="log", yscale="log", xlabel="token horizon D",
                  ylabel="optimal k at B_base", title="k*(D) = c (D_base / D)^gamma")
      axes[1].legend(fontsize=8)
    paths.append(plots._save(fig, os.path.join(out_dir, "batch_study_gamma.png")))
  return paths


INVOCATIONS = "invocations.jsonl"


def record_invocation(root: str, seconds: float, trained: int, jobs: int) -> None:
  """Appends this command's wall time to OUT/invocations.jsonl (the study's total cost)."""
  with open(os.path.join(root, INVOCATIONS), "a") as f:
    f.write(json.dumps(dict(date=time.strftime("%Y-%m-%d %H:%M"), seconds=round(seconds, 1),
                            trained=trained, jobs=jobs, cpus=os.cpu_count())) + "\n")


def invocations(root: str) -> list[dict]:
  path = os.path.join(root, INVOCATIONS)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def write_report(results: dict, study: Study, noise, out_dir: str, calls=()) -> dict:
  report = analyse(results, study, noise)
  report["invocations"] = list(calls)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "batch_study.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    for r in sorted(results.values(), key=lambda r: (r["tokens"], r["batch"], r["sde"],
                                                      r["kappa_mult"], r["seed"])):
      writer.writerow(_row(r))
  text = markdown(results, study, report)
  with open(os.path.join(out_dir, "batch_study.md"), "w") as f:
    f.write(text)
  paths = plot(results, study, report, out_dir)
  with open(os.path.join(out_dir, "batch_study.json"), "w") as f:
    json.dump(dict(study=dataclasses.asdict(study), report=report,
                   runs=[_row(r) for r in results.values()]), f, indent=1)
  return dict(report=report, markdown=text, plots=paths)


def update_docs(docs_dir: str, markdown_text: str, plots_: list[str]) -> None:
  """Copies the plots to docs_dir/img and replaces the generated block of batch_study.md."""
  os.makedirs(os.path.join(docs_dir, "img"), exist_ok=True)
  for p in plots_:
    shutil.copy(p, os.path.join(docs_dir, "img", os.path.basename(p)))
  page = os.path.join(docs_dir, "batch_study.md")
  if not os.path.exists(page):
    raise FileNotFoundError(f"{page}: no docs page to update")
  with open(page) as f:
    text = f.read()
  if DOCS_BEGIN not in text or DOCS_END not in text:
    raise ValueError(f"{page}: no generated block ({DOCS_BEGIN} ... {DOCS_END})")
  head, rest = text.split(DOCS_BEGIN, 1)
  _, tail = rest.split(DOCS_END, 1)
  with open(page, "w") as f:
    f.write(f"{head}{DOCS_BEGIN}\n{markdown_text}{DOCS_END}{tail}")


def ensure_data(data_dir: str) -> None:
  """Runs `python -m tmdiff.data.prepare` when data_dir holds no prepared data."""
  from tmdiff.data import records
  if os.path.exists(os.path.join(data_dir, records.MANIFEST)):
    return
  print(f"no prepared data in {data_dir}: running python -m tmdiff.data.prepare --out={data_dir}",
        flush=True)
  subprocess.run([sys.executable, "-m", "tmdiff.data.prepare", f"--out={data_dir}"], check=True)


def main(argv=None):
  from tmdiff.diffusion import objective as obj_lib
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", required=True, help="study directory (runs/ and report/)")
  p.add_argument("--data_dir", default="runs/data",
                 help="prepared data (made by tmdiff.data.prepare if absent) or 'synthetic'")
  p.add_argument("--docs", default="", help="also update DIR/batch_study.md and DIR/img/")
  p.add_argument("--quick", action="store_true", help="3 micro runs on synthetic data")
  p.add_argument("--devices", type=int, default=0, help="use the first N devices (0: all)")
  p.add_argument("--width", type=int, default=Study.width, help="d_model of every run")
  p.add_argument("--layers", type=int, default=Study.layers, help="blocks of every run")
  p.add_argument("--base_batch", type=int, default=Study.base_batch)
  p.add_argument("--base_tokens", type=int, default=Study.base_tokens)
  p.add_argument("--batches", default=",".join(map(str, Study.batches)))
  p.add_argument("--kappas", default=",".join(f"{k:g}" for k in Study.kappas))
  p.add_argument("--horizons", default=",".join(f"{h:g}" for h in Study.horizons),
                 help="gamma: other horizons as multiples of base_tokens ('' for none)")
  p.add_argument("--max_extend", type=int, default=Study.max_extend,
                 help="k sweeps grow by at most this many points at a winning edge")
  p.add_argument("--tol", type=float, default=Study.tol)
  p.add_argument("--noise", default=Study.noise, choices=obj_lib.NOISE_KEYS,
                 help="training masks keyed per example (shared by the grid's runs) or per step")
  p.add_argument("--loss_norm", default=Study.loss_norm, choices=obj_lib.LOSS_NORMS,
                 help="train loss divided by rows x seq (fixed) or by the covered tokens")
  p.add_argument("--min_lr", type=float, default=Study.min_lr,
                 help="the cosine schedule's floor, a fraction of the peak lr")
  p.add_argument("--seeds", type=int, default=Study.seeds)
  p.add_argument("--mask_seeds", type=int, default=Study.mask_seeds,
                 help="base retrained with this many other training-mask seeds only")
  p.add_argument("--grid_mask_seeds", type=int, default=Study.grid_mask_seeds,
                 help="every grid point again with this many other mask seeds; its loss is the "
                 "mean")
  p.add_argument("--growth_replicates", type=int, default=Study.growth_replicates,
                 help="replicates a point above --batches gets before it is known to be flat")
  p.add_argument("--eval_seeds", type=int, default=Study.eval_seeds)
  p.add_argument("--clip_control", type=float, default=Study.clip_control,
                 help="clip norm of the control run (0: no control run)")
  p.add_argument("--other_bases", default=",".join(f"{k:g}" for k in Study.other_bases),
                 help="the batch grid again from these base multipliers k ('' for none)")
  p.add_argument("--jobs", type=int, default=2,
                 help="runs trained at once, each in its own process (1: in this process)")
  p.add_argument("--analyse_only", action="store_true", help="report on the finished runs only")
  p.add_argument("--train_one", default="", help=argparse.SUPPRESS)  # a child of --jobs > 1
  p.add_argument("--jax_cache", default="DEFAULT",
                 help="persistent compilation cache (default OUT/jax_cache; '' = off): init and "
                 "eval steps repeat across runs")
  args = p.parse_args(argv)
  import jax
  from tmdiff.train import loop  # noqa: F401  (its imports may install logging handlers)
  root = logging.getLogger()
  for h in root.handlers:  # the console keeps warnings; each run's INFO log goes to its train.log
    h.setLevel(max(h.level, logging.WARNING))
  root.setLevel(logging.INFO)
  for name in ("absl", "jax", "orbax"):
    logging.getLogger(name).setLevel(logging.WARNING)
  cache = os.path.join(args.out, "jax_cache") if args.jax_cache == "DEFAULT" else args.jax_cache
  if cache:
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  devices = jax.devices()[:args.devices] if args.devices else None
  if args.train_one:
    spec = json.loads(args.train_one)
    study = Study(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["study"].items()})
    train_run(study, Run(**spec["run"]), args.out, devices)
    return
  if args.quick:
    study = Study(**QUICK)
  else:
    data = args.data_dir
    if data != "synthetic":
      data = os.path.abspath(data)
      if not args.analyse_only:
        ensure_data(data)
    floats = lambda s: tuple(float(v) for v in s.split(",") if v)  # noqa: E731
    study = Study(data=data, width=args.width, layers=args.layers, base_batch=args.base_batch,
                  base_tokens=args.base_tokens,
                  batches=tuple(int(v) for v in args.batches.split(",")),
                  kappas=floats(args.kappas), horizons=floats(args.horizons), tol=args.tol,
                  max_extend=args.max_extend, noise=args.noise, loss_norm=args.loss_norm,
                  min_lr=args.min_lr, seeds=args.seeds, mask_seeds=args.mask_seeds,
                  grid_mask_seeds=args.grid_mask_seeds,
                  growth_replicates=args.growth_replicates, eval_seeds=args.eval_seeds,
                  clip_control=args.clip_control,
                  other_bases=floats(args.other_bases))
  start = time.perf_counter()
  if args.analyse_only:
    results = {}
    for name in sorted(os.listdir(os.path.join(args.out, "runs"))):
      path = os.path.join(args.out, "runs", name, RESULT)
      if os.path.exists(path):
        with open(path) as f:
          results[name] = json.load(f)
    state = dict(results=results, trained=0,
                 noise=stored_eval_noise(results, study, args.out))
  else:
    child_args = [f"--devices={args.devices}",
                  f"--jax_cache={os.path.abspath(cache) if cache else ''}"]
    state = run_study(study, args.out, devices, args.jobs, child_args)
    record_invocation(args.out, time.perf_counter() - start, state["trained"], args.jobs)
  written = write_report(state["results"], study, state["noise"], os.path.join(args.out, "report"),
                         invocations(args.out))
  if args.docs:
    update_docs(args.docs, written["markdown"], written["plots"])
  print(written["markdown"])
  print(f"trained {state['trained']} runs this time; {time.perf_counter() - start:.0f} s; "
        f"report in {os.path.join(args.out, 'report')}", flush=True)


if __name__ == "__main__":
  main()
