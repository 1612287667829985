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
from tmdiff.scaling.batch_study.plan import (QUICK, Run, Study, add_study_flags,
                                             study_from_flags)
from tmdiff.scaling.batch_study.report import update_docs, write_report
from tmdiff.scaling.batch_study.runner import (RESULT, ensure_data, invocations, record_invocation,
                                               run_study, stored_eval_noise, train_run)


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m tmdiff.scaling.batch_study",
                            description=batch_study.__doc__.splitlines()[0])
  p.add_argument("--out", required=True, help="study directory (runs/ and report/)")
  p.add_argument("--data_dir", default="runs/data",
                 help="prepared data (made by tmdiff.data.prepare if absent) or 'synthetic'")
  p.add_argument("--docs", default="", help="also update DIR/batch_study.md and DIR/img/")
  p.add_argument("--quick", action="store_true", help="3 micro runs on synthetic data")
  p.add_argument("--devices", type=int, default=0, help="use the first N devices (0: all)")
  add_study_flags(p)
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
    study = study_from_flags(args, data=data)
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

