"""Chaos test: a tiny CPU training run killed at random points and its checkpoints damaged.

  python -m tmdiff.tools.chaos --faults=20 --steps=300 --workdir=/tmp/chaos

Runs `python -m tmdiff.train` (experiments/tiny.py, shrunk) uninterrupted once, then again under
faults until it completes: SIGTERM at a random step (the run must save that step and exit 0),
SIGKILL at a random step, SIGKILL while an asynchronous save is being written, and SIGKILL
followed by damage to the newest checkpoint (a data file overwritten or truncated, or its
_METADATA truncated) when an older one exists. Prints a table: faults injected and survived,
steps recomputed, whether every step's final loss is bitwise equal to the uninterrupted run's,
and whether the data order is the same (per-step token fractions and the final data-iterator
state).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OVERRIDES = {"model.d_model": 64, "model.d_ff": 128, "model.n_heads": 4, "model.n_kv_heads": 2,
             "model.head_dim": 16, "model.base_width": 64, "data.seq_len": 32,
             "data.global_batch": 8, "train.log_every": 1, "train.eval_every": 0,
             "train.keep_checkpoints": 3}
KINDS = ("sigterm", "sigkill", "sigkill_during_save", "sigkill_then_damage")
DAMAGE = ("overwrite data file", "truncate data file", "truncate _METADATA")


def command(workdir, steps, ckpt_every):
  flags = {**OVERRIDES, "train.steps": steps, "train.ckpt_every": ckpt_every}
  return [sys.executable, "-m", "tmdiff.train", "--config=experiments/tiny.py",
          f"--workdir={workdir}", *[f"--config.{k}={v}" for k, v in flags.items()]]


def environment(cache_dir):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
         "JAX_COMPILATION_CACHE_DIR": cache_dir,
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
         "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  return env


def records(workdir, split="train"):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.read().splitlines()
  out = []
  for line in lines:
    try:
      r = json.loads(line)
    except ValueError:  # a line cut by a kill
      continue
    if r["split"] == split:
      out.append(r)
  return out


def last_step(workdir) -> int:
  return max((r["step"] for r in records(workdir)), default=0)


def steps_on_disk(workdir) -> list[int]:
  ckpts = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpts):
    return []
  return sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())


def final_data_state(workdir):
  steps = steps_on_disk(workdir)
  with open(os.path.join(workdir, "checkpoints", str(steps[-1]), "data", "metadata")) as f:
    return json.load(f)


def damage(workdir, rng) -> str:
  step = steps_on_disk(workdir)[-1]
  step_dir = os.path.join(workdir, "checkpoints", str(step))
  how = rng.choice(DAMAGE)
  if how == "truncate _METADATA":
    path = os.path.join(step_dir, "state", "_METADATA")
  else:
    path = max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")),
               key=os.path.getsize)
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    if how == "overwrite data file":
      f.seek(size // 3)
      f.write(os.urandom(max(1, size // 3)))
    else:
      f.truncate(size // 2)
  return f"step {step}: {how}"


def wait_for(predicate, proc, timeout):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(0.005)
  return False


def chaos(workdir, faults, steps, ckpt_every, seed=0, log=print):
  rng = random.Random(seed)
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(workdir)
  env = environment(os.path.join(workdir, "jit_cache"))
  ref, run = os.path.join(workdir, "reference"), os.path.join(workdir, "run")
  subprocess.run(command(ref, steps, ckpt_every), cwd=ROOT, env=env, check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  log(f"reference: {steps} steps uninterrupted")

  events, attempt = [], 0
  while True:
    attempt += 1
    kind = KINDS[len(events) % len(KINDS)] if len(events) < faults else None
    before = last_step(run)
    log_path = os.path.join(workdir, f"attempt_{attempt}.log")
    with open(log_path, "w") as out:
      proc = subprocess.Popen(command(run, steps, ckpt_every), cwd=ROOT, env=env, stdout=out,
                              stderr=subprocess.STDOUT)
      hit, event = False, None
      if kind == "sigkill_during_save":  # when a save is seen in flight, or one step after it
        pattern = os.path.join(run, "checkpoints", "*.orbax-checkpoint-tmp*")
        target = (before // ckpt_every + 1) * ckpt_every + 1
        hit = wait_for(lambda: last_step(run) >= target or (
            last_step(run) > before and glob.glob(pattern)), proc, 600)
      elif kind is not None:
        target = before + rng.randint(1, 2 * ckpt_every)
        hit = wait_for(lambda: last_step(run) >= target, proc, 600)
      if hit:
        in_save = bool(glob.glob(os.path.join(run, "checkpoints", "*.orbax-checkpoint-tmp*")))
        proc.send_signal(signal.SIGTERM if kind == "sigterm" else signal.SIGKILL)
      rc = proc.wait()
    if hit:
      event = {"kind": kind, "attempt": attempt, "rc": rc, "logged": last_step(run),
               "saved": steps_on_disk(run), "in_save": in_save}
      if kind == "sigkill_then_damage" and len(event["saved"]) >= 2:
        event["damage"] = damage(run, rng)
    with open(log_path) as f:
      text = f.read()
    resumed = re.search(r"resuming at step (\d+)", text)
    start_step = int(resumed.group(1)) if resumed else 0
    if events and "resumed_at" not in events[-1]:
      events[-1].update(resumed_at=start_step, recomputed=events[-1]["logged"] - start_step,
                        fallback="falling back to step" in text)
    if event is not None:
      events.append(event)
      log(f"attempt {attempt}: {kind} at step {event['logged']}"
          f"{' (during a save)' if in_save else ''} -> rc {rc}, checkpoints {event['saved']}"
          + (f"; damaged {event['damage']}" if event.get("damage") else ""))
      continue
    if rc != 0:
      raise SystemExit(f"chaos: attempt {attempt} failed with rc {rc}; see {log_path}")
    if os.path.exists(os.path.join(run, "eval_report.json")):
      break
  return summarize(ref, run, events, steps)


def summarize(ref, run, events, steps) -> dict:
  final = {r["step"]: r for r in records(run)}  # the last record of each step
  reference = {r["step"]: r for r in records(ref)}
  losses_equal = sorted(final) == sorted(reference) == list(range(1, steps + 1)) and all(
      final[s]["loss"] == reference[s]["loss"] for s in reference)
  fractions = [k for k in reference[1] if k.startswith("token_fraction/")]
  order_same = all(final[s][k] == reference[s][k] for s in reference for k in fractions) and \
      final_data_state(run) == final_data_state(ref)
  rows = {}
  for e in events:
    row = rows.setdefault(e["kind"], {"injected": 0, "survived": 0, "recomputed": 0,
                                      "lost_beyond_last_step": 0, "fallbacks": 0, "in_save": 0})
    row["injected"] += 1
    row["in_save"] += int(e["in_save"])
    survived = "resumed_at" in e and (e["kind"] != "sigterm" or (
        e["rc"] == 0 and e["saved"] and e["saved"][-1] == e["logged"]))
    row["survived"] += int(survived)
    row["recomputed"] += e.get("recomputed", 0)
    if e["kind"] == "sigterm":
      row["lost_beyond_last_step"] += e.get("recomputed", 0)
    row["fallbacks"] += int(e.get("fallback", False))
  return {"rows": rows, "losses_bitwise_equal": losses_equal, "data_order_same": order_same,
          "faults": len(events), "survived": sum(r["survived"] for r in rows.values()),
          "events": events}


def table(summary) -> str:
  lines = ["| fault | injected | survived | with a save in flight | steps recomputed | lost "
           "beyond the last completed step | fallbacks to an older step |",
           "|---|---|---|---|---|---|---|"]
  for kind in KINDS:
    r = summary["rows"].get(kind)
    if r:
      lost = r["lost_beyond_last_step"] if kind == "sigterm" else "n/a (since last checkpoint)"
      lines.append(f"| {kind} | {r['injected']} | {r['survived']} | {r['in_save']} | "
                   f"{r['recomputed']} | {lost} | {r['fallbacks']} |")
  total = lambda key: sum(r[key] for r in summary["rows"].values())
  lines.append(f"| **all** | {summary['faults']} | {summary['survived']} | {total('in_save')} | "
               f"{total('recomputed')} | | {total('fallbacks')} |")
  lines += ["", f"final losses bitwise equal to the uninterrupted run: "
            f"{summary['losses_bitwise_equal']}; data order the same: "
            f"{summary['data_order_same']}"]
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", default="/tmp/tmdiff_chaos")
  p.add_argument("--faults", type=int, default=20)
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--ckpt_every", type=int, default=10)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  tick = time.time()
  summary = chaos(args.workdir, args.faults, args.steps, args.ckpt_every, args.seed,
                  log=lambda line: print(line, flush=True))
  with open(os.path.join(args.workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(table(summary))
  print(f"wall time {time.time() - tick:.0f} s")
  ok = summary["losses_bitwise_equal"] and summary["data_order_same"] and \
      summary["survived"] == summary["faults"]
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
