"""The batch study's report: one CSV row per run, the markdown summary and tables, the plots,
and the generated block of the docs page."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil

import numpy as np

from tmdiff.configs.derived import reparameterise
from tmdiff.scaling.batch_study.analysis import (MODALITIES, analyse, clip_of, final_loss,
                                                 final_metric, mask_seed_of, naive_vs_flat,
                                                 noise_alone_spread, replicates, select)
from tmdiff.scaling.batch_study.plan import PAPER_GAMMA, Study, base_adamw

MIN_SPAN = 8  # the verdict asks the flat range to span at least this factor of B
DOCS_BEGIN, DOCS_END = "<!-- batch_study:begin -->", "<!-- batch_study:end -->"


CSV_COLUMNS = ("name", "batch", "tokens", "steps", "sde", "kappa_mult", "kappa", "lr", "beta1",
               "beta2", "eps", "seed", "clip", "loss", "bits_all", "bits_text", "bits_image", "bits_audio",
               "train_loss", "wall_s")


def _row(r) -> dict:
  return dict(name=r["name"], batch=r["batch"], tokens=r["tokens"], steps=r["steps"],
              sde=int(r["sde"]), kappa_mult=r["kappa_mult"], kappa=r["kappa"], lr=r["lr"],
              beta1=r["beta1"], beta2=r["beta2"], eps=r["eps"], seed=r["seed"], clip=clip_of(r),
              loss=final_loss(r), bits_all=final_metric(r, "bits_per_token/all"),
              bits_text=final_metric(r, "bits_per_token/text"),
              bits_image=final_metric(r, "bits_per_token/image"),
              bits_audio=final_metric(r, "bits_per_token/audio"), train_loss=r["train_loss"],
              wall_s=r["wall_s"])


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
      lr, beta1, beta2, _ = reparameterise(*base_adamw(), float(k))
      lines += [f"From the base k = {float(k):g} (lr {lr:.4g}, betas {beta1:.4g} / "
                f"{beta2:.4g}):"] + _batch_lines(other)[:-1]
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
                 f"{', '.join(f'{t:,}' for t in gm['horizons'])} (paper: {PAPER_GAMMA:g})"
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
  groups += [(f"mask seed k={k:g}", [r for r in runs if mask_seed_of(r) >= 0])
             for k, runs in g["mask_seeds_by_base"].items()]
  groups += [(f"clip {clip_of(r):g}", [r]) for r in g["clipped"]]
  for label, runs in groups:
    for r in runs:
      if r.get("diverged"):
        scores = "diverged | | | "
      else:
        scores = (f"{final_loss(r):.4f} | " + " | ".join(
            f"{final_metric(r, f'bits_per_token/{m}'):.3f}" for m in MODALITIES) + " ")
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
        se = [final_loss(r) * rel_sd / math.sqrt(max(replicates(r), 1)) for r in runs]
        axes[0].errorbar([r["batch"] for r in runs], [final_loss(r) for r in runs], yerr=se,
                         fmt=style, color=colour, label=label, ms=5, capsize=2,
                         mfc=colour if style == "o-" else "white")
      seeded = [r for r in g["seeds_by_base"].get(k, []) if r["seed"] and not r.get("diverged")]
      if seeded:  # the base point's other seeds: the noise every grid point carries
        axes[0].plot([study.base_batch * 1.06 ** (i + 1) for i in range(len(seeded))],
                     [final_loss(r) for r in seeded], "x", color=colour, ms=7,
                     label=f"base k={k:g}, other seeds")
      runs = [r for r in reparam if not r.get("diverged")]
      axes[1].plot([k * r["batch"] / study.base_batch for r in runs],
                   [100 * (final_loss(r) / crit["flat_level"] - 1) for r in runs], "o-", color=colour,
                   label=f"SDE reparameterised, {name}", ms=5)
    # The tolerance above the lowest reparameterised point below B_crit: the points below
    # B_crit are within it of each other when all lie in this band.
    flat_set = [final_loss(r) for r in g["reparam"] if r["batch"] in b["below"]]
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
      y = np.array([final_loss(r) for r in runs])
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
        axes[1].plot(ds, anchor * (study.base_tokens / ds) ** PAPER_GAMMA, ":",
                     label=f"gamma = {PAPER_GAMMA:g} (paper)")
      axes[1].set(xscale="log", yscale="log", xlabel="token horizon D",
                  ylabel="optimal k at B_base", title="k*(D) = c (D_base / D)^gamma")
      axes[1].legend(fontsize=8)
    paths.append(plots._save(fig, os.path.join(out_dir, "batch_study_gamma.png")))
  return paths


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
