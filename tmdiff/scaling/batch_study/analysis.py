"""The batch study's statistics: the critical batch, the k optima and gamma, the noise of the
comparisons, and the groups of runs they are computed over."""
from __future__ import annotations

import math

import numpy as np

from tmdiff.scaling.batch_study.plan import Study

MODALITIES = ("text", "image", "audio")


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


def final_loss(result) -> float:
  """Final validation loss; inf for a run that diverged."""
  return math.inf if result.get("diverged") else float(result["eval"]["loss"])


def final_metric(result, key) -> float:
  return math.inf if result.get("diverged") else float(result["eval"][key])


def clip_of(result) -> float:
  return float(result.get("clip", 0.0))


def mask_seed_of(result) -> int:
  return int(result.get("mask_seed", -1))


def select(results: dict, study: Study) -> dict:
  """The study's groups from a {name: result} dict (runs present so far)."""
  masked = [r for r in results.values() if mask_seed_of(r) >= 0 and not clip_of(r)]
  rs = [r for r in results.values() if not clip_of(r) and mask_seed_of(r) < 0]

  def at_base(r, k=None):  # the base point (B_base, D_base), at multiplier k if given
    return (r["batch"] == study.base_batch and r["tokens"] == study.base_tokens
            and not r["sde"] and (k is None or r["kappa_mult"] == k))
  base_sweep = sorted((r for r in rs if at_base(r) and r["seed"] == 0),
                      key=lambda r: r["kappa_mult"])
  k0 = min(base_sweep, key=final_loss)["kappa_mult"] if base_sweep else None

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
  clipped = [r for r in results.values() if clip_of(r)]
  # Per base: its seed-0 run, then its training-mask-seed runs.
  mask_seeds = {k: [r for r in runs if r["seed"] == 0][:1]
                + sorted((r for r in masked if at_base(r, k) and r["seed"] == 0), key=mask_seed_of)
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
           and 1 <= mask_seed_of(r) <= replicates]
  if not twins or run.get("diverged"):
    return run
  group = [run] + sorted(twins, key=mask_seed_of)
  if any(r.get("diverged") for r in group):
    return dict(run, diverged=True, replicates=len(group))
  metrics = {k: float(np.mean([r["eval"][k] for r in group])) for k in run["eval"]}
  return dict(run, eval=metrics, replicates=len(group),
              replicate_losses=[final_loss(r) for r in group])


def seed_noise(runs: list) -> dict:
  """Spread of the final loss over runs that differ only by seed."""
  losses = [final_loss(r) for r in runs]
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
  crit = critical_batch([r["batch"] for r in reparam], [final_loss(r) for r in reparam],
                        study.base_batch, study.tol)
  below = set(crit["below"])
  b_crit = crit["b_crit"]
  crit["s_crit"] = (study.base_tokens / (study.seq_len * b_crit)) if b_crit else None
  crit["s_crit_upper_bound"] = (study.base_tokens / (study.seq_len * crit["b_crit_lower_bound"])
                                if crit["b_crit_lower_bound"] else None)
  rep_below = [r for r in reparam if r["batch"] in below]
  naive_below = [r for r in naive if r["batch"] in below]
  crit["reparam_spread"] = spread([final_loss(r) for r in rep_below]) if len(rep_below) > 1 else None
  crit["naive_spread"] = spread([final_loss(r) for r in naive_below]) if len(naive_below) > 1 else None
  crit["span"] = (max(below) / min(below)) if below else None
  crit["base_batch"] = study.base_batch
  crit["naive_rel"] = {int(r["batch"]): final_loss(r) / crit["flat_level"] - 1.0 for r in naive}
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
      m: dict(reparam_spread=spread([final_metric(r, f"bits_per_token/{m}") for r in rep_below])
              if len(rep_below) > 1 else None,
              naive_spread=spread([final_metric(r, f"bits_per_token/{m}") for r in naive_below])
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
        dict(batch=r["batch"], clip=clip_of(r), loss=final_loss(r),
             unclipped=final_loss(unclipped[(r["batch"], r["sde"], r["kappa_mult"])]),
             rel_to_flat=final_loss(r) / crit["flat_level"] - 1.0)
        for r in g["clipped"] if (r["batch"], r["sde"], r["kappa_mult"]) in unclipped]
  # Gamma. The sweeps' points share their masks like the grid's, so the grid's paired noise is
  # theirs; without replicates, the seed noise.
  paired = (out.get("batch") or {}).get("paired_noise") or {}
  sigma = paired.get("sd") or out["seed_noise"]["sd"] or out["mask_noise"]["sd"] or 0.0
  out["gamma_noise_sd"] = sigma
  optima = {}
  for tokens, runs in g["sweeps"].items():
    optima[tokens] = fit_optimum([r["kappa_mult"] for r in runs], [final_loss(r) for r in runs],
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
    key = (r["batch"], r["tokens"], r["seed"], mask_seed_of(r), clip_of(r), total_kappa)
    groups.setdefault(key, []).append(r)
  out = []
  for runs in groups.values():
    sde = [r for r in runs if r["sde"]]
    direct = [r for r in runs if not r["sde"]]
    if sde and direct:
      a, b = sde[0], direct[0]
      out.append(dict(batch=a["batch"], tokens=a["tokens"], sde_run=a["name"],
                      direct_run=b["name"], sde_loss=final_loss(a),
                      direct_loss=final_loss(b), rel_diff=final_loss(a) / final_loss(b) - 1.0,
                      lr_rel_diff=a["lr"] / b["lr"] - 1.0))
  return sorted(out, key=lambda t: (t["tokens"], t["batch"], t["sde_run"]))


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


def naive_vs_flat(b: dict, rel_sd: float, replicates: int, base_batch: int) -> dict:
  """Per naive grid point below B_crit (other than the base run itself): its distance from the
  flat level in standard errors of that difference (a mean over `replicates` against the mean
  of the flat points)."""
  flat_points = sum(1 for x in b["batches"] if x <= base_batch)
  se = rel_sd * math.sqrt(1.0 / replicates + 1.0 / (replicates * flat_points))
  z = {k: v / se for k, v in b["naive_rel"].items() if k in b["below"] and k != base_batch}
  return dict(se=se, z=z)
