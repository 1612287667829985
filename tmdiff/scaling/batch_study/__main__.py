"""The batch study's command line (see the package docstring):

  python -m tmdiff.scaling.batch_study --out=runs/batch_study --data_dir=runs/data --docs=docs
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time

from tmdiff.scaling import batch_study
from tmdiff.scaling.batch_study.plan import QUICK, Run, Study
from tmdiff.scaling.batch_study.report import update_docs, write_report
from tmdiff.scaling.batch_study.runner import (RESULT, ensure_data, invocations, record_invocation,
                                               run_study, stored_eval_noise, train_run)


def main(argv=None):
  from tmdiff.diffusion import objective as obj_lib
  p = argparse.ArgumentParser(description=batch_study.__doc__.splitlines()[0])
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

