"""Scaling-law fits per modality: L(N, D), L(C), bootstrap intervals, the compute-optimal frontier.

Parametric law (Hoffmann et al. 2022, approach 3), fitted in log space with a Huber loss on
log-residuals from many initialisations, then BFGS:
  L(N, D) = E + A / N^alpha + B / D^beta
  log L  ~ LSE(a - alpha log N, b - beta log D, e),  A = e^a, B = e^b, E = e^e.
Loss vs compute: L(C) = E + A / C^gamma (same machinery, one power term).

With C = k N D (k = 6 for a dense transformer; pass k = FLOPs/token / N to include attention), the
minimiser of L(N, D) at fixed C is closed form:
  G = (alpha A / (beta B))^(1 / (alpha + beta)),  a = beta / (alpha + beta),  b = alpha / (alpha + beta)
  N*(C) = G (C/k)^a,  D*(C) = (C/k)^b / G,  D*(N) = G^(-1/a) N^(alpha/beta)
  L*(C) = E + K C^(-gamma),  gamma = alpha beta / (alpha + beta),
          K = (A G^-alpha + B G^beta) k^gamma.

Runs table: one row per (run, modality, evaluation point) with columns run, modality, params (N),
tokens (D), flops (C; empty/0 -> 6 N D), loss. Intermediate points of a run share its `run`;
bootstrap resamples whole runs.

  python -m tmdiff.scaling.fit --runs=runs.csv --out=fits/   # fits.json + PNGs (fit/__main__.py)
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os

import numpy as np
from scipy import optimize

# The paper's compute-optimal frontier: D*(N) = 7754 N^0.84 tokens (N total parameters).
PAPER_FRONTIER_COEF, PAPER_FRONTIER_EXP = 7754.0, 0.84


def paper_frontier_tokens(n_params):
  return PAPER_FRONTIER_COEF * np.asarray(n_params, np.float64) ** PAPER_FRONTIER_EXP


COLUMNS = ("run", "modality", "params", "tokens", "flops", "loss")
_ALIASES = {"N": "params", "n": "params", "D": "tokens", "d": "tokens", "C": "flops", "c": "flops",
            "L": "loss", "compute": "flops", "name": "run"}


# ----------------------------------------------------------------------------- runs table

@dataclasses.dataclass
class Runs:
  """Columns as arrays, one entry per row."""
  run: np.ndarray
  modality: np.ndarray
  params: np.ndarray
  tokens: np.ndarray
  flops: np.ndarray
  loss: np.ndarray

  def __post_init__(self):
    self.run = np.asarray(self.run, dtype=object).astype(str)
    self.modality = np.asarray(self.modality, dtype=object).astype(str)
    for k in ("params", "tokens", "flops", "loss"):
      setattr(self, k, np.asarray(getattr(self, k), dtype=np.float64))
    missing = ~np.isfinite(self.flops) | (self.flops <= 0)
    self.flops = np.where(missing, 6.0 * self.params * self.tokens, self.flops)
    n = len(self.run)
    for k in COLUMNS:
      if len(getattr(self, k)) != n:
        raise ValueError(f"runs table: column {k!r} has {len(getattr(self, k))} rows, expected {n}")
    bad = ~(np.isfinite(self.loss) & (self.loss > 0) & (self.params > 0) & (self.tokens > 0))
    if bad.any():
      raise ValueError(f"runs table: {int(bad.sum())} rows with non-positive or missing "
                       f"params/tokens/loss, e.g. run {self.run[bad][0]!r}")

  def __len__(self):
    return len(self.run)

  def select(self, mask) -> "Runs":
    return Runs(*(getattr(self, k)[mask] for k in COLUMNS))

  def for_modality(self, modality: str) -> "Runs":
    return self.select(self.modality == modality)

  @property
  def modalities(self) -> list[str]:
    return sorted(set(self.modality.tolist()))

  def final(self) -> "Runs":
    """The last point (largest D) of each (run, modality)."""
    keep = np.zeros(len(self), bool)
    for key in set(zip(self.run, self.modality)):
      idx = np.flatnonzero((self.run == key[0]) & (self.modality == key[1]))
      keep[idx[np.argmax(self.tokens[idx])]] = True
    return self.select(keep)

  def to_rows(self) -> list[dict]:
    return [{k: (getattr(self, k)[i].item() if k not in ("run", "modality") else getattr(self, k)[i])
             for k in COLUMNS} for i in range(len(self))]


def _from_records(records: list[dict]) -> Runs:
  cols = {k: [] for k in COLUMNS}
  for r in records:
    r = {_ALIASES.get(k, k): v for k, v in r.items()}
    for k in COLUMNS:
      v = r.get(k, "" if k in ("run", "modality") else float("nan"))
      if k not in ("run", "modality"):
        v = float(v) if v not in ("", None) else float("nan")
      cols[k].append(v)
  if not cols["modality"] or all(m == "" for m in cols["modality"]):
    cols["modality"] = ["all"] * len(records)
  return Runs(**cols)


def load_runs(path: str) -> Runs:
  """CSV (header row) or JSON (a list of row objects, or {"runs": [...]}, or JSON lines)."""
  with open(path) as f:
    text = f.read()
  if path.endswith(".csv"):
    return _from_records(list(csv.DictReader(text.splitlines())))
  text = text.strip()
  if text.startswith("{") and "\n{" in text:  # JSON lines
    return _from_records([json.loads(line) for line in text.splitlines() if line.strip()])
  data = json.loads(text)
  return _from_records(data["runs"] if isinstance(data, dict) else data)


def save_runs(runs: Runs, path: str):
  rows = runs.to_rows()
  with open(path, "w", newline="") as f:
    if path.endswith(".csv"):
      w = csv.DictWriter(f, fieldnames=COLUMNS)
      w.writeheader()
      w.writerows(rows)
    else:
      json.dump(rows, f, indent=1)


def synthetic_runs(laws: dict, sizes, horizons=(5, 20, 80, 320), fractions=(0.25, 0.5, 1.0),
                   noise=0.0, seed=0) -> Runs:
  """Runs drawn from known laws {modality: LawND}: for each size N and horizon multiple h a run
  trained to D = h N, evaluated at `fractions` of D; multiplicative log-normal noise."""
  rng = np.random.default_rng(seed)
  rows = []
  for m, law in laws.items():
    for n in sizes:
      for h in horizons:
        for f in fractions:
          d = h * n * f
          loss = float(law(n, d)) * math.exp(rng.normal(0.0, noise)) if noise else float(law(n, d))
          rows.append((f"N{n:.3g}_D{h}N", m, n, d, 6.0 * n * d, loss))
  return Runs(*map(list, zip(*rows)))


# ----------------------------------------------------------------------------- robust fitting

def _huber(r, delta):
  a = np.abs(r)
  return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _dhuber(r, delta):
  return np.clip(r, -delta, delta)


def _objective(theta, feats, log_loss, delta):
  """Huber loss of LSE(c_j - s_j x_j ..., e) - log L and its gradient.

  theta = [c_1, s_1, ..., c_k, s_k, e]; feats[:, j] = log of the j-th scale variable.
  """
  k = feats.shape[1]
  terms = np.empty((len(log_loss), k + 1))
  for j in range(k):
    terms[:, j] = theta[2 * j] - theta[2 * j + 1] * feats[:, j]
  terms[:, k] = theta[-1]
  top = terms.max(axis=1, keepdims=True)
  w = np.exp(terms - top)
  z = w.sum(axis=1, keepdims=True)
  pred = (top + np.log(z))[:, 0]
  w /= z
  r = pred - log_loss
  g_r = _dhuber(r, delta)
  grad = np.empty_like(theta)
  for j in range(k):
    grad[2 * j] = np.sum(g_r * w[:, j])
    grad[2 * j + 1] = -np.sum(g_r * w[:, j] * feats[:, j])
  grad[-1] = np.sum(g_r * w[:, k])
  return float(np.sum(_huber(r, delta))), grad


def _init_grid(k: int, log_loss, n_random: int, rng):
  """Hoffmann-style grid of initialisations plus random ones."""
  lmin = float(np.min(log_loss))
  e0 = [lmin + math.log(f) for f in (0.3, 0.6, 0.9)]
  coefs, exps = [0.0, 5.0, 10.0, 20.0], [0.1, 0.3, 0.6, 1.0]
  per_term = [(c, s) for c in coefs for s in exps]
  grid = []
  if k == 1:
    grid = [[c, s, e] for c, s in per_term for e in e0]
  else:
    for i in range(0, len(per_term), 2):
      for j in range(1, len(per_term), 3):
        for e in e0:
          grid.append([*per_term[i], *per_term[j], e])
  grid = np.asarray(grid, dtype=np.float64)
  rand = np.column_stack(
      [x for _ in range(k) for x in (rng.uniform(0, 25, n_random), rng.uniform(0.05, 1.2, n_random))]
      + [rng.uniform(lmin - 3, lmin, n_random)])
  return np.vstack([grid, rand])


def _fit_lse(feats, loss, delta=1e-3, n_random=32, n_polish=8, seed=0, init=None):
  """Minimise the Huber objective: evaluate every init, polish the best `n_polish` with L-BFGS."""
  feats = np.asarray(feats, np.float64)
  log_loss = np.log(np.asarray(loss, np.float64))
  k = feats.shape[1]
  rng = np.random.default_rng(seed)
  if init is None:
    inits = _init_grid(k, log_loss, n_random, rng)
  else:  # warm start (bootstrap) plus a few random perturbations
    init = np.asarray(init, np.float64)
    inits = np.vstack([init] + [init + rng.normal(0, 0.3, init.shape) * np.r_[[3.0, 0.1] * k, 1.0]
                                for _ in range(max(n_polish - 1, 0))])
  vals = np.array([_objective(t, feats, log_loss, delta)[0] for t in inits])
  order = np.argsort(vals)[:n_polish]
  best = None
  for i in order:
    # BFGS (as Hoffmann et al.); scipy's L-BFGS-B calls threaded BLAS on tiny matrices, which is
    # ~40x slower on a loaded 2-core machine.
    res = optimize.minimize(_objective, inits[i], args=(feats, log_loss, delta), jac=True,
                            method="BFGS", options=dict(maxiter=1000, gtol=1e-10))
    if np.all(np.isfinite(res.x)) and (best is None or res.fun < best.fun):
      best = res
  return best.x, float(best.fun)


# ----------------------------------------------------------------------------- laws

def _exp(log_value: float) -> float:
  """exp kept inside (0, inf): a term the data cannot identify may drift to huge or tiny
  log-coefficients and must still give a finite, positive law."""
  return math.exp(min(max(float(log_value), -700.0), 700.0))


@dataclasses.dataclass(frozen=True)
class LawND:
  """L(N, D) = E + A / N^alpha + B / D^beta."""
  E: float
  A: float
  alpha: float
  B: float
  beta: float

  def __call__(self, n, d):
    n, d = np.asarray(n, np.float64), np.asarray(d, np.float64)
    return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

  # Compute-optimal allocation for C = k N D.
  @property
  def has_frontier(self) -> bool:
    """Loss falls with both N and D, so a compute-optimal split exists."""
    return self.alpha > 0 and self.beta > 0

  @property
  def G(self) -> float:
    return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

  @property
  def a(self) -> float:
    return self.beta / (self.alpha + self.beta)

  @property
  def b(self) -> float:
    return self.alpha / (self.alpha + self.beta)

  @property
  def gamma(self) -> float:
    return self.alpha * self.beta / (self.alpha + self.beta)

  def n_opt(self, c, k: float = 6.0):
    return self.G * (np.asarray(c, np.float64) / k) ** self.a

  def d_opt(self, c, k: float = 6.0):
    return (np.asarray(c, np.float64) / k) ** self.b / self.G

  def d_opt_of_n(self, n):
    """D*(N) on the frontier: G^(-1/a) N^(alpha/beta)."""
    return self.G ** (-1.0 / self.a) * np.asarray(n, np.float64) ** (self.alpha / self.beta)

  def tokens_per_param(self, c, k: float = 6.0):
    return self.d_opt(c, k) / self.n_opt(c, k)

  def loss_opt(self, c, k: float = 6.0):
    return self(self.n_opt(c, k), self.d_opt(c, k))

  def loss_opt_law(self, k: float = 6.0) -> "LawC":
    """L*(C) = E + K C^-gamma exactly."""
    K = (self.A * self.G ** -self.alpha + self.B * self.G ** self.beta) * k ** self.gamma
    return LawC(self.E, K, self.gamma)

  def as_dict(self):
    return dataclasses.asdict(self)

  def theta(self):
    return np.array([math.log(self.A), self.alpha, math.log(self.B), self.beta, math.log(self.E)])

  @classmethod
  def from_theta(cls, t):
    return cls(E=_exp(t[4]), A=_exp(t[0]), alpha=float(t[1]), B=_exp(t[2]), beta=float(t[3]))


@dataclasses.dataclass(frozen=True)
class LawC:
  """L(C) = E + A / C^gamma."""
  E: float
  A: float
  gamma: float

  def __call__(self, c):
    return self.E + self.A / np.asarray(c, np.float64) ** self.gamma

  def as_dict(self):
    return dataclasses.asdict(self)

  def theta(self):
    return np.array([math.log(self.A), self.gamma, math.log(self.E)])

  @classmethod
  def from_theta(cls, t):
    return cls(E=_exp(t[2]), A=_exp(t[0]), gamma=float(t[1]))


def fit_nd(params, tokens, loss, delta=1e-3, seed=0, init: LawND | None = None,
           n_polish=6) -> LawND:
  feats = np.column_stack([np.log(params), np.log(tokens)])
  theta, _ = _fit_lse(feats, loss, delta=delta, seed=seed, n_polish=n_polish,
                      init=None if init is None else init.theta())
  return LawND.from_theta(theta)


def fit_c(flops, loss, delta=1e-3, seed=0, init: LawC | None = None, n_polish=6) -> LawC:
  feats = np.log(np.asarray(flops, np.float64))[:, None]
  theta, _ = _fit_lse(feats, loss, delta=delta, seed=seed, n_polish=n_polish,
                      init=None if init is None else init.theta())
  return LawC.from_theta(theta)


# ----------------------------------------------------------------------------- bootstrap

@dataclasses.dataclass
class Interval:
  estimate: float
  low: float
  high: float

  def contains(self, x: float) -> bool:
    return self.low <= x <= self.high

  def as_dict(self):
    return dataclasses.asdict(self)


def _percentiles(point: dict, samples: list[dict], level: float) -> dict[str, Interval]:
  q = 100 * (1 - level) / 2
  out = {}
  for key, est in point.items():
    vals = np.array([s[key] for s in samples], np.float64)
    vals = vals[np.isfinite(vals)]
    lo, hi = (np.percentile(vals, [q, 100 - q]) if len(vals) else (np.nan, np.nan))
    out[key] = Interval(float(est), float(min(lo, est)), float(max(hi, est)))
  return out


def bootstrap(runs: Runs, fit_fn, n_boot=100, level=0.95, seed=0):
  """Refit on runs resampled with replacement (whole runs, all their points).

  fit_fn(runs, init=None|law) -> law with .as_dict(). Returns (point_law, {name: Interval}, laws).
  """
  point = fit_fn(runs, init=None)
  ids = np.unique(runs.run)
  index = {r: np.flatnonzero(runs.run == r) for r in ids}
  rng = np.random.default_rng(seed)
  laws = []
  for _ in range(n_boot):
    pick = rng.choice(ids, size=len(ids), replace=True)
    rows = np.concatenate([index[r] for r in pick])
    laws.append(fit_fn(runs.select(rows), init=point))
  return point, _percentiles(point.as_dict(), [l.as_dict() for l in laws], level), laws


# ----------------------------------------------------------------------------- per-modality report

def _nd_fitter(delta):
  return lambda r, init=None: fit_nd(r.params, r.tokens, r.loss, delta=delta, init=init,
                                     n_polish=6 if init is None else 2)


def _c_fitter(delta):
  return lambda r, init=None: fit_c(r.flops, r.loss, delta=delta, init=init,
                                    n_polish=6 if init is None else 2)


def compute_envelope(runs: Runs, bins_per_decade: int = 4) -> Runs:
  """Lowest loss per log-spaced compute bin: the points L(C) is fitted to."""
  edges = np.floor(np.log10(runs.flops) * bins_per_decade)
  keep = np.zeros(len(runs), bool)
  for e in np.unique(edges):
    idx = np.flatnonzero(edges == e)
    keep[idx[np.argmin(runs.loss[idx])]] = True
  return runs.select(keep)


def extrapolation_error(runs: Runs, n_cut: float | None = None, delta=1e-3) -> dict:
  """Fit L(N, D) on runs with N < n_cut (default: below the largest N); predict the largest N."""
  n_max = float(np.max(runs.params))
  n_cut = n_max if n_cut is None else n_cut
  train, test = runs.select(runs.params < n_cut), runs.select(runs.params >= n_max)
  if len(np.unique(train.params)) < 3:
    raise ValueError(f"extrapolation: need >= 3 model sizes below N={n_cut:.3g}")
  law = fit_nd(train.params, train.tokens, train.loss, delta=delta)
  pred = law(test.params, test.tokens)
  rel = (pred - test.loss) / test.loss
  return {"n_cut": n_cut, "n_test": n_max, "law": law.as_dict(),
          "mean_abs_rel_error": float(np.mean(np.abs(rel))),
          "max_abs_rel_error": float(np.max(np.abs(rel))),
          "points": [{"run": r, "tokens": float(d), "loss": float(l), "predicted": float(p)}
                     for r, d, l, p in zip(test.run, test.tokens, test.loss, pred)]}


def isoflop_slices(runs: Runs, budgets) -> list[dict]:
  """Loss of each run at each compute budget it passes through (log-linear interpolation along its
  curve), i.e. iso-FLOP profiles from loss curves. Entries with >= 3 sizes get a parabola in
  log N and its minimum N_opt (kept only if convex and inside the sampled range)."""
  curves = {}
  for r in np.unique(runs.run):
    idx = np.flatnonzero(runs.run == r)
    idx = idx[np.argsort(runs.flops[idx])]
    curves[r] = (runs.params[idx[0]], np.log(runs.flops[idx]), np.log(runs.loss[idx]))
  out = []
  for c in budgets:
    lc = math.log(c)
    best = {}  # per model size: lowest loss reaching this budget
    for n, lf, ll in curves.values():
      if lf[0] - 1e-9 <= lc <= lf[-1] + 1e-9:
        v = float(np.exp(np.interp(lc, lf, ll)))
        best[n] = min(v, best.get(n, np.inf))
    if not best:
      continue
    ns = np.array(sorted(best))
    ls = np.array([best[n] for n in ns])
    entry = {"flops": float(c), "params": ns.tolist(), "loss": ls.tolist()}
    if len(ns) >= 3:
      x = np.log(ns)
      p2, p1, _ = np.polyfit(x, ls, 2)
      if p2 > 0:
        xm = -p1 / (2 * p2)
        if x.min() <= xm <= x.max():
          entry["n_opt"] = float(math.exp(xm))
    out.append(entry)
  return out


def isoflop_frontier(runs: Runs, n_budgets: int = 8) -> dict | None:
  """Approach 2 (iso-FLOP minima) power law N_opt = c0 C^a, where enough slices have a minimum."""
  lo, hi = np.log10(runs.flops.min()), np.log10(runs.flops.max())
  slices = isoflop_slices(runs, np.logspace(lo, hi, n_budgets + 2)[1:-1])
  pts = [(s["flops"], s["n_opt"]) for s in slices if "n_opt" in s]
  if len(pts) < 2:
    return None
  c, n = np.log(np.array(pts)).T
  a, logc0 = np.polyfit(c, n, 1)
  return {"a": float(a), "coef": float(math.exp(logc0)), "points": [list(p) for p in pts]}


def fit_modality(runs: Runs, n_boot=100, level=0.95, delta=1e-3, k=6.0, seed=0,
                 compute_grid=None) -> dict:
  """Everything for one modality: L(N, D) and L(C) with intervals, frontier, extrapolation."""
  law, ci_nd, laws = bootstrap(runs, _nd_fitter(delta), n_boot=n_boot, level=level, seed=seed)
  env = compute_envelope(runs)
  out = {"n_rows": len(runs), "n_runs": int(len(np.unique(runs.run))),
         "law_nd": law.as_dict(), "ci_nd": {k_: v.as_dict() for k_, v in ci_nd.items()},
         "level": level}
  if len(env) >= 4:
    law_c, ci_c, _ = bootstrap(env, _c_fitter(delta), n_boot=n_boot, level=level, seed=seed)
    out["law_c"], out["ci_c"] = law_c.as_dict(), {k_: v.as_dict() for k_, v in ci_c.items()}
  if compute_grid is None:
    compute_grid = np.logspace(np.log10(runs.flops.min()), np.log10(runs.flops.max()) + 2, 7)
  q = 100 * (1 - level) / 2
  frontier = []
  laws = [l for l in laws if l.has_frontier]
  for c in (compute_grid if law.has_frontier else ()):
    boot_n = np.array([l.n_opt(c, k) for l in laws])
    row = {"flops": float(c), "n_opt": float(law.n_opt(c, k)), "d_opt": float(law.d_opt(c, k)),
           "tokens_per_param": float(law.tokens_per_param(c, k)),
           "loss_opt": float(law.loss_opt(c, k))}
    if len(boot_n):
      row["n_opt_ci"] = [float(x) for x in np.percentile(boot_n, [q, 100 - q])]
    frontier.append(row)
  if law.has_frontier:
    out["frontier"] = {"k": k, "a": law.a, "b": law.b, "gamma": law.gamma,
                       "d_of_n": {"coef": law.G ** (-1.0 / law.a), "exp": law.alpha / law.beta},
                       "points": frontier}
  else:
    out["frontier"] = {"error": f"no compute-optimal frontier: fitted alpha={law.alpha:.3g}, "
                                f"beta={law.beta:.3g} (both must be > 0)"}
  iso = isoflop_frontier(runs)
  if iso is not None:
    out["isoflop"] = iso
  if len(np.unique(runs.params)) >= 4:
    try:
      out["extrapolation"] = extrapolation_error(runs, delta=delta)
    except ValueError as e:
      out["extrapolation"] = {"error": str(e)}
  return out


def fit_all(runs: Runs, **kw) -> dict:
  return {m: fit_modality(runs.for_modality(m), **kw) for m in runs.modalities}
