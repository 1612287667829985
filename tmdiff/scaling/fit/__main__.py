"""The scaling-law fit's command line: fits.json and PNG plots from a runs table.

  python -m tmdiff.scaling.fit --runs=runs.csv --out=fits/
"""
from __future__ import annotations

import argparse
import json
import os

from tmdiff.scaling import plots
from tmdiff.scaling.fit import fit_all, load_runs


def main(argv=None):
  p = argparse.ArgumentParser(description="Scaling-law fits and plots from a runs table.")
  p.add_argument("--runs", required=True, help="CSV/JSON runs table (run,modality,params,tokens,flops,loss)")
  p.add_argument("--out", required=True, help="directory for fits.json and PNGs")
  p.add_argument("--n_boot", type=int, default=200)
  p.add_argument("--level", type=float, default=0.95)
  p.add_argument("--k", type=float, default=6.0, help="C = k N D for the frontier")
  p.add_argument("--no_plots", action="store_true")
  args = p.parse_args(argv)
  runs = load_runs(args.runs)
  os.makedirs(args.out, exist_ok=True)
  report = fit_all(runs, n_boot=args.n_boot, level=args.level, k=args.k)
  with open(os.path.join(args.out, "fits.json"), "w") as f:
    json.dump(report, f, indent=1)
  for m, r in report.items():
    law = r["law_nd"]
    ci = r["ci_nd"]
    print(f"[{m}] L = {law['E']:.4g} + {law['A']:.4g}/N^{law['alpha']:.3f} + "
          f"{law['B']:.4g}/D^{law['beta']:.3f}  (alpha {ci['alpha']['low']:.3f}..{ci['alpha']['high']:.3f}, "
          f"beta {ci['beta']['low']:.3f}..{ci['beta']['high']:.3f})  " +
          (f"D*(N) = {r['frontier']['d_of_n']['coef']:.4g} N^{r['frontier']['d_of_n']['exp']:.3f}"
           if "d_of_n" in r["frontier"] else r["frontier"]["error"]))
    if "extrapolation" in r and "mean_abs_rel_error" in r["extrapolation"]:
      print(f"[{m}] extrapolation to N={r['extrapolation']['n_test']:.3g}: mean |rel err| "
            f"{r['extrapolation']['mean_abs_rel_error']:.4f}")
  if not args.no_plots:
    for path in plots.plot_all(runs, report, args.out, k=args.k):
      print("wrote", path)


if __name__ == "__main__":
  main()
