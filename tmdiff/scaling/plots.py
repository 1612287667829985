"""Scaling plots (matplotlib, Agg): loss curves per size, iso-FLOP profiles, the frontier.

Each function writes one PNG and returns its path; `plot_all` draws every plot for every modality
of a runs table and its fit report (`tmdiff.scaling.fit.fit_all`).
"""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tmdiff.scaling import fit as fit_lib  # noqa: E402


def _colours(values):
  v = np.log(np.asarray(values, np.float64))
  span = (v.max() - v.min()) or 1.0
  return plt.cm.viridis((v - v.min()) / span * 0.9)


def _save(fig, path):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _law_nd(law):
  return law if isinstance(law, fit_lib.LawND) or law is None else fit_lib.LawND(**law)


def plot_loss_curves(runs: fit_lib.Runs, path: str, law=None, title: str = ""):
  """Loss vs tokens, one line per run, coloured by model size; dashed: the fitted L(N, D)."""
  law = _law_nd(law)
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  sizes = np.unique(runs.params)
  colour = dict(zip(sizes, _colours(sizes)))
  labelled = set()
  ids = np.unique(runs.run)
  for r in sorted(ids, key=lambda r: runs.params[runs.run == r][0]):  # legend in size order
    idx = np.flatnonzero(runs.run == r)
    idx = idx[np.argsort(runs.tokens[idx])]
    n = runs.params[idx[0]]
    label = None if n in labelled else f"N={n:.3g}"
    labelled.add(n)
    ax.plot(runs.tokens[idx], runs.loss[idx], "o-", ms=3, lw=1.2, color=colour[n], label=label)
  if law is not None:
    d = np.logspace(np.log10(runs.tokens.min()), np.log10(runs.tokens.max()), 100)
    for n in sizes:
      ax.plot(d, law(n, d), "--", lw=0.8, color=colour[n])
  ax.set(xscale="log", yscale="log", xlabel="tokens D", ylabel="loss",
         title=title or "loss vs tokens (dashed: fitted L(N, D))")
  ax.legend(fontsize=7, ncol=2)
  return _save(fig, path)


def plot_isoflop(runs: fit_lib.Runs, path: str, law=None, budgets=None, k: float = 6.0,
                 title: str = ""):
  """Loss vs N at fixed compute: points interpolated from the runs' curves, lines from L(N, D)."""
  law = _law_nd(law)
  if budgets is None:
    lo, hi = np.log10(runs.flops.min()), np.log10(runs.flops.max())
    budgets = np.logspace(lo, hi, 7)[1:-1]
  slices = fit_lib.isoflop_slices(runs, budgets)
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  cols = _colours(budgets)
  for c, colour in zip(budgets, cols):
    s = next((s for s in slices if s["flops"] == float(c)), None)
    if s is not None:
      ax.plot(s["params"], s["loss"], "o", ms=4, color=colour)
      if "n_opt" in s:
        ax.axvline(s["n_opt"], color=colour, lw=0.6, ls=":")
    if law is not None:
      n = np.logspace(np.log10(runs.params.min()) - 0.3, np.log10(runs.params.max()) + 0.3, 100)
      ax.plot(n, law(n, c / (k * n)), "-", lw=1.0, color=colour, label=f"C={c:.2g}")
      ax.plot(law.n_opt(c, k), law.loss_opt(c, k), "*", ms=9, color=colour)
  ax.set(xscale="log", yscale="log", xlabel="parameters N", ylabel="loss",
         title=title or "iso-FLOP profiles (star: fitted N*(C); dotted: parabola minimum)")
  ax.legend(fontsize=7)
  return _save(fig, path)


def plot_frontier(runs: fit_lib.Runs, path: str, law=None, law_c=None, k: float = 6.0,
                  isoflop=None, title: str = ""):
  """Left: N*(C) and D*(C); middle: D*(N) against the paper's 7754 N^0.84; right: L vs C."""
  law = _law_nd(law)
  if isinstance(law_c, dict):
    law_c = fit_lib.LawC(**law_c)
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
  c = np.logspace(np.log10(runs.flops.min()), np.log10(runs.flops.max()) + 3, 100)
  ax = axes[0]
  if law is not None:
    ax.plot(c, law.n_opt(c, k), label=f"N*(C) ~ C^{law.a:.3f}")
    ax.plot(c, law.d_opt(c, k), label=f"D*(C) ~ C^{law.b:.3f}")
  if isoflop:
    pts = np.array(isoflop["points"])
    ax.plot(pts[:, 0], pts[:, 1], "ko", ms=4, label="iso-FLOP minima")
  ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel="N*, D*",
         title="compute-optimal allocation")
  ax.legend(fontsize=8)
  ax = axes[1]
  n = np.logspace(np.log10(runs.params.min()), np.log10(max(runs.params.max(), 1e10)), 100)
  ax.plot(n, fit_lib.paper_frontier_tokens(n), "k--", lw=1, label="paper: 7754 N^0.84")
  if law is not None:
    ax.plot(n, law.d_opt_of_n(n), label=f"fit: D* ~ N^{law.alpha / law.beta:.3f}")
  ax.plot(n, 20 * n, ":", color="grey", lw=1, label="Chinchilla 20 N")
  ax.set(xscale="log", yscale="log", xlabel="parameters N", ylabel="tokens D*", title="frontier D*(N)")
  ax.legend(fontsize=8)
  ax = axes[2]
  ax.plot(runs.flops, runs.loss, ".", color="grey", ms=3, label="runs")
  env = fit_lib.compute_envelope(runs)
  ax.plot(env.flops, env.loss, "ko", ms=4, label="envelope")
  if law_c is not None:
    ax.plot(c, law_c(c), "-", label=f"L(C) = {law_c.E:.3g} + {law_c.A:.3g} C^-{law_c.gamma:.3f}")
  if law is not None:
    ax.plot(c, law.loss_opt(c, k), "--", lw=1, label="L*(C) from L(N, D)")
  ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel="loss", title="loss vs compute")
  ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  return _save(fig, path)


def plot_all(runs: fit_lib.Runs, report: dict, out_dir: str, k: float = 6.0) -> list[str]:
  paths = []
  for m, r in report.items():
    sub = runs.for_modality(m)
    law = fit_lib.LawND(**r["law_nd"])
    optimal = law if law.has_frontier else None  # no N*(C) without positive exponents
    paths.append(plot_loss_curves(sub, os.path.join(out_dir, f"loss_curves_{m}.png"), law,
                                  title=f"{m}: loss vs tokens"))
    paths.append(plot_isoflop(sub, os.path.join(out_dir, f"isoflop_{m}.png"), optimal, k=k,
                              title=f"{m}: iso-FLOP profiles"))
    paths.append(plot_frontier(sub, os.path.join(out_dir, f"frontier_{m}.png"), optimal,
                               r.get("law_c"), k=k, isoflop=r.get("isoflop"), title=m))
  return paths
