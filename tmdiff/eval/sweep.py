"""Sweep sampler settings for one modality on a checkpoint; keep the best as the run's default.

  python -m tmdiff.eval.sweep --workdir=runs/tiny --modality=image [--num_samples=16] [--quick]
      [--first_prompt=256]
      [--grid='[{"cfg_scale": 3.0}, {"steps": 32, "method": "maskgit", "schedule": "cosine"}]']

Each candidate is a set of overrides of config.sampling.<modality> (as updated by an existing
<workdir>/sampling_defaults.json); the first candidate is always the current setting. Scores:
  text   judge perplexity of unconditional samples (lower is better); a candidate whose mean
         unigram entropy falls below --entropy_floor x that of validation text of the same
         length is rejected (degenerate repetition scores a low perplexity)
  image  T2I attribute accuracy, all attributes (higher is better; ties: mean of position,
         shape and colour)
  audio  T2S word error rate (lower is better)
Writes <out>/sweep_<modality>.md and .json (default out: <workdir>/eval), and the winner's
overrides into <workdir>/sampling_defaults.json under the modality's key (other modalities kept),
which `python -m tmdiff.eval` and `python -m tmdiff.sample` apply. T2I and T2S prompts are
validation records --first_prompt onwards: start past the eval's (its first --num_samples) so that
the settings are not chosen on the prompts they are then scored on.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from absl import logging

MODALITY_TASK = {"text": "text", "image": "t2i", "audio": "t2s"}
TASK_JUDGE = {"text": "text", "t2i": "image", "t2s": "speech"}
GRIDS = {
    "text": [{}, {"steps": 128}, {"temperature": 0.8}, {"top_p": 1.0},
             {"method": "maskgit", "schedule": "cosine"},
             {"method": "confidence", "confidence": "max_prob"}],
    "image": [{}, {"cfg_scale": 1.0}, {"cfg_scale": 4.0}, {"steps": 32},
              {"method": "maskgit", "schedule": "cosine"}, {"temperature": 0.8}],
    "audio": [{}, {"cfg_scale": 1.0}, {"cfg_scale": 4.0}, {"steps": 64},
              {"method": "maskgit", "schedule": "cosine"}, {"temperature": 0.8}],
}
QUICK_GRIDS = {"text": [{}, {"steps": 4}], "image": [{}, {"cfg_scale": 1.0}],
               "audio": [{}, {"cfg_scale": 1.0}]}


def score_of(modality: str, metrics: dict, entropy_floor: float) -> tuple[float, str | None]:
  """(score, rejection reason): higher score is better."""
  if modality == "text":
    floor = entropy_floor * metrics["reference_unigram_entropy_bits"]
    if metrics["unigram_entropy_bits"] < floor:
      return float("-inf"), (f"unigram entropy {metrics['unigram_entropy_bits']:.3f} < floor "
                             f"{floor:.3f} bits")
    return -metrics["judge_perplexity"], None
  if modality == "image":
    tie = sum(metrics[f"attribute_accuracy/{k}"] for k in ("position", "shape", "colour")) / 3
    return metrics["attribute_accuracy/all"] + 1e-3 * tie, None
  return -metrics["wer"], None


def sweep(workdir: str, modality: str, *, grid: list[dict] | None = None, quick: bool = False,
          num_samples: int = 16, batch_size: int = 16, seed: int = 0, step: int | None = None,
          data_dir: str | None = None, out: str | None = None, entropy_floor: float = 0.9,
          write_defaults: bool = True, judge_settings: dict | None = None, devices=None,
          first_prompt: int = 0) -> dict:
  """Scores every candidate; writes the table, the JSON and the winner's defaults."""
  from tmdiff.diffusion import sampling
  from tmdiff.eval import generation, judges
  from tmdiff.train import restore as restore_lib
  if modality not in MODALITY_TASK:
    raise generation.EvalError(f"unknown --modality {modality!r}; choose from "
                               f"{tuple(MODALITY_TASK)}")
  task = MODALITY_TASK[modality]
  grid = grid if grid is not None else (QUICK_GRIDS if quick else GRIDS)[modality]
  if not grid or grid[0] != {}:
    grid = [{}] + [g for g in grid if g]
  run = generation.restore(workdir, step=step, data_dir=data_dir, devices=devices)
  if run.data_dir is None:
    raise generation.EvalError("synthetic-data checkpoint: generation metrics need prepared "
                               "data (pass --data_dir)")
  base = generation.settings_for(run, modality)
  judge = judges.load_or_train(TASK_JUDGE[task], run.data_dir,
                               **(judge_settings or {}).get(TASK_JUDGE[task], {}))
  prompts = {} if task == "text" else {"first": first_prompt}
  results = []
  for i, overrides in enumerate(grid):
    settings = base.replace(**overrides)  # validates each candidate
    started = time.time()
    result = getattr(generation, f"{task}_task")(run, judge, num=num_samples, settings=settings,
                                                 seed=seed, batch_size=batch_size, **prompts)
    score, rejected = score_of(modality, result["metrics"], entropy_floor)
    block = {k: v for k, v in dataclasses.asdict(settings).items() if k in sampling.FIELDS}
    results.append({"overrides": overrides, "settings": block,
                    "metrics": result["metrics"], "score": score, "rejected": rejected,
                    "seconds": round(time.time() - started, 1)})
    logging.info("sweep %s %d/%d %s: score %.4f%s", modality, i + 1, len(grid), overrides,
                 score, f" (rejected: {rejected})" if rejected else "")
  ranked = sorted(range(len(results)), key=lambda k: -results[k]["score"])
  best = results[ranked[0]]
  report = {"workdir": os.path.abspath(workdir), "step": run.step, "modality": modality,
            "num_samples": num_samples, "first_prompt": first_prompt, "seed": seed, "base": dataclasses.asdict(base),
            "results": results, "best": best["overrides"], "best_settings": best["settings"]}
  out = out or os.path.join(workdir, "eval")
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, f"sweep_{modality}.json"), "w") as f:
    json.dump(report, f, indent=2, default=float)
  with open(os.path.join(out, f"sweep_{modality}.md"), "w") as f:
    f.write(format_table(report) + "\n")
  if write_defaults and best["rejected"] is None:
    path = os.path.join(workdir, restore_lib.SAMPLING_DEFAULTS_FILE)
    tuned = {}
    if os.path.exists(path):
      with open(path) as f:
        tuned = json.load(f)
    # The full winning block: later runs reproduce it whatever the checkpoint's config says.
    tuned[modality] = {k: list(v) if isinstance(v, tuple) else v
                       for k, v in best["settings"].items()}
    with open(path, "w") as f:
      json.dump(tuned, f, indent=2, sort_keys=True)
    report["defaults_file"] = path
  return report


_COLUMNS = {"text": ("judge_perplexity", "unigram_entropy_bits"),
            "image": ("attribute_accuracy/all", "attribute_accuracy/position",
                      "attribute_accuracy/shape", "attribute_accuracy/colour"),
            "audio": ("wer", "character_error_rate")}


def format_table(report: dict) -> str:
  cols = _COLUMNS[report["modality"]]
  lines = [f"# sampler sweep, {report['modality']}, {report['workdir']} step {report['step']} "
           f"({report['num_samples']} samples each"
           + (f", validation prompts from {report['first_prompt']}" if report.get("first_prompt")
              else "") + ")", "",
           "| overrides | " + " | ".join(cols) + " | score | note |",
           "|---|" + "---|" * (len(cols) + 2)]
  best = json.dumps(report["best"])
  for r in report["results"]:
    name = json.dumps(r["overrides"]) if r["overrides"] else "(current)"
    values = " | ".join(f"{r['metrics'][c]:.4f}" for c in cols)
    note = r["rejected"] or ("best" if json.dumps(r["overrides"]) == best else "")
    lines.append(f"| {name} | {values} | {r['score']:.4f} | {note} |")
  return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m tmdiff.eval.sweep", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True)
  p.add_argument("--modality", required=True, choices=tuple(MODALITY_TASK))
  p.add_argument("--grid", default=None, help="JSON list of override dicts (default: built in)")
  p.add_argument("--quick", action="store_true", help="two candidates (tests, smoke runs)")
  p.add_argument("--num_samples", type=int, default=16)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--first_prompt", type=int, default=0,
                 help="T2I/T2S: index of the first validation prompt (e.g. past the eval's)")
  p.add_argument("--step", type=int, default=None)
  p.add_argument("--data_dir", default=None)
  p.add_argument("--out", default=None, help="folder for the table (default: <workdir>/eval)")
  p.add_argument("--entropy_floor", type=float, default=0.9,
                 help="text: reject below this fraction of the reference unigram entropy")
  p.add_argument("--no_write_defaults", action="store_true",
                 help="do not update <workdir>/sampling_defaults.json")
  return p.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  logging.set_verbosity(logging.INFO)
  from tmdiff.diffusion.prompts import SampleError
  from tmdiff.diffusion.sampling import SamplerError
  from tmdiff.eval.generation import EvalError
  from tmdiff.eval.judges import JudgeError
  from tmdiff.train.checkpoint import CheckpointError
  try:
    grid = json.loads(args.grid) if args.grid else None
    if grid is not None and not (isinstance(grid, list) and all(isinstance(g, dict) for g in grid)):
      raise EvalError(f"--grid must be a JSON list of objects, got {args.grid!r}")
    report = sweep(args.workdir, args.modality, grid=grid, quick=args.quick,
                   num_samples=args.num_samples, batch_size=args.batch_size, seed=args.seed,
                   step=args.step, data_dir=args.data_dir, out=args.out,
                   entropy_floor=args.entropy_floor, write_defaults=not args.no_write_defaults,
                   first_prompt=args.first_prompt)
  except json.JSONDecodeError as e:
    sys.exit(f"tmdiff.eval.sweep: --grid is not valid JSON: {e}")
  except (EvalError, JudgeError, SampleError, SamplerError, CheckpointError, TypeError) as e:
    sys.exit(f"tmdiff.eval.sweep: {type(e).__name__}: {e}")
  print(format_table(report))
  if "defaults_file" in report:
    print(f"\nbest {args.modality} settings written to {report['defaults_file']}")


if __name__ == "__main__":
  main()
