"""The batch study's runner: trains its runs (each in its own process when jobs > 1), skipping
finished ones and resuming interrupted ones, and re-evaluates some under other eval seeds."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import time

from tmdiff.scaling.batch_study.analysis import (critical_batch, final_loss, select,
                                                 summarise_eval_noise)
from tmdiff.scaling.batch_study.plan import Run, Study, arg_values, run_config

RESULT = "result.json"
NOISE = "eval_noise.json"


def train_run(study: Study, run: Run, root: str, devices=None) -> dict:
  """Trains `run` (or returns its stored result); writes OUT/runs/<name>/result.json."""
  workdir = os.path.join(root, "runs", run.name)
  path = os.path.join(workdir, RESULT)
  arg = study.arg(run)
  if os.path.exists(path):
    with open(path) as f:
      result = json.load(f)
    if arg_values(result["arg"]) != arg_values(arg):
      raise ValueError(f"batch study: {path} was trained as {result['arg']!r}, not {arg!r} "
                       "(another study's settings): use a fresh --out")
    return result
  from tmdiff.configs.derived import derive
  from tmdiff.train import loop
  config = run_config(study, run)
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
  from tmdiff.train import restore as restore_lib
  from tmdiff.train.trainer import Trainer
  config = run_config(study, run)
  restored = restore_lib.restore(workdir, config=config, devices=devices)
  mesh, params = restored.mesh, restored.params
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
    print(f"  {'trained' if trained else 'have   '} {run.name}: loss {final_loss(result):.4f} "
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
          active[run] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
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
      best = min(results, key=final_loss)["kappa_mult"]
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
    return critical_batch([r["batch"] for r in grid], [final_loss(r) for r in grid],
                          self.study.base_batch, self.study.tol)


def run_study(study: Study, root: str, devices=None, jobs: int = 1, child_args=()) -> dict:
  runner = Runner(study, root, devices, jobs, child_args)
  s = study
  print(f"[1/4] base tuning: k sweep at B_base={s.base_batch}, D_base={s.base_tokens:,}", flush=True)
  base = runner.sweep(s.base_tokens, s.kappas)
  k0 = min(base, key=final_loss)["kappa_mult"]
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
        losses[name] = {"0": final_loss(results[name]), **json.load(f)}
  return summarise_eval_noise(losses) if losses else None


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


def ensure_data(data_dir: str) -> None:
  """Runs `python -m tmdiff.data.prepare` when data_dir holds no prepared data."""
  from tmdiff.data import records
  if os.path.exists(os.path.join(data_dir, records.MANIFEST)):
    return
  print(f"no prepared data in {data_dir}: running python -m tmdiff.data.prepare --out={data_dir}",
        flush=True)
  subprocess.run([sys.executable, "-m", "tmdiff.data.prepare", f"--out={data_dir}"], check=True)
