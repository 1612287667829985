"""Evaluate a checkpoint: per-modality ELBO and generation metrics, as JSON and a table.

  python -m tmdiff.eval --workdir=runs/tiny [--step=N] [--data_dir=runs/data] \
      [--batch_size=16] [--num_samples=16] [--num_rows=N] [--out=runs/tiny/eval]

  ELBO        negative ELBO in bits per token per modality on the first --num_rows validation
              rows (default data.eval_batches x data.global_batch), the same for any
              --batch_size and device count (tmdiff.eval.elbo), beside the unigram entropy
              of the same rows' scored tokens
  text        generative perplexity of unconditional samples under the text judge, and their
              unigram entropy next to validation text of the same length
  t2i         attribute accuracy of images generated from held-out captions (image judge)
  t2s         word error rate of the speech judge on audio generated from held-out transcripts

Judges are trained on first use and cached in <data_dir>/judges (tmdiff.eval.judges).
Sampler settings: config.sampling of the checkpoint, updated by <workdir>/sampling_defaults.json
(tmdiff.eval.sweep). Writes to --out: eval.json (metrics, settings, samples' prompts), eval.md
(the table), text_samples.txt, t2i_grid.png (captions in eval.json, row-major), t2s/NNN.wav.
A synthetic-data checkpoint gets the ELBO only; eval.json says which parts were skipped and why.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

from absl import logging

PARTS = ("elbo", "text", "t2i", "t2s")
TASK_JUDGE = {"text": "text", "t2i": "image", "t2s": "speech"}


def run_eval(workdir: str, *, step: int | None = None, data_dir: str | None = None,
             batch_size: int = 16, num_samples: int = 16, num_rows: int | None = None,
             out: str | None = None, seed: int = 0, parts=PARTS, devices=None,
             judge_settings: dict | None = None) -> dict:
  """Runs the evaluation; writes eval.json, eval.md and samples under `out`; returns the report.

  `judge_settings` ({judge: {setting: value}}) overrides judge training settings (tests)."""
  from tmdiff.data.sources import SourceError
  from tmdiff.diffusion.prompts import TASK_MODALITY
  from tmdiff.eval import elbo as elbo_lib
  from tmdiff.eval import generation
  from tmdiff.eval.judges import JudgeError
  unknown = set(parts) - set(PARTS)
  if unknown:
    raise generation.EvalError(f"unknown --parts {sorted(unknown)}; choose from {PARTS}")
  if num_samples < 1:
    raise generation.EvalError(f"--num_samples must be >= 1, got {num_samples}")
  started = time.time()
  run = generation.restore(workdir, step=step, data_dir=data_dir, devices=devices)
  out = out or os.path.join(workdir, "eval")
  os.makedirs(out, exist_ok=True)
  report = {"workdir": os.path.abspath(workdir), "step": run.step, "data_dir": run.data_dir,
            "devices": len(run.mesh.devices.flat), "batch_size": batch_size, "seed": seed,
            "sampling_defaults_file": run.sampling_defaults or None, "metrics": {},
            "skipped": {}, "settings": {}, "judges": {}, "samples": {}}

  if "elbo" in parts:
    rows_wanted = num_rows or elbo_lib.default_num_rows(run.config)
    logging.info("ELBO on %d validation rows, batch %d", rows_wanted, batch_size)
    rows = elbo_lib.validation_rows(run.config, rows_wanted)
    report["metrics"]["elbo"] = elbo_lib.evaluate_rows(run.trainer, run.params, rows,
                                                       batch_size=batch_size, progress=True)
    report["metrics"]["elbo"].update(elbo_lib.unigram_bits_per_token(rows), rows=rows_wanted)

  for task in ("text", "t2i", "t2s"):
    if task not in parts:
      continue
    reason = _skip_reason(run, task)
    if reason:
      report["skipped"][task] = reason
      logging.warning("skipping %s: %s", task, reason)
      continue
    settings = generation.settings_for(run, TASK_MODALITY[task])
    report["settings"][task] = dataclasses.asdict(settings)
    try:
      judge = _judge(run, TASK_JUDGE[task], (judge_settings or {}).get(TASK_JUDGE[task], {}))
    except (JudgeError, SourceError) as e:  # e.g. no espeak-ng for the speech judge
      report["skipped"][task] = f"judge {TASK_JUDGE[task]!r} unavailable: {e}"
      logging.warning("skipping %s: %s", task, report["skipped"][task])
      continue
    report["judges"][TASK_JUDGE[task]] = judge.info.get("sanity", {})
    result = getattr(generation, f"{task}_task")(
        run, judge, num=num_samples, settings=settings, seed=seed, batch_size=batch_size)
    report["metrics"][task] = result["metrics"]
    report["samples"][task] = _write_samples(task, result, out)
  report["seconds"] = round(time.time() - started, 1)
  with open(os.path.join(out, "eval.json"), "w") as f:
    json.dump(report, f, indent=2)
  table = format_table(report)
  with open(os.path.join(out, "eval.md"), "w") as f:
    f.write(table + "\n")
  return report


def _skip_reason(run, task: str) -> str | None:
  if run.data_dir is None:
    return ("synthetic-data checkpoint: no tokenizers to decode samples, no judges "
            "(train on prepared data, or pass --data_dir)")
  need = {"text": ("text",), "t2i": ("text", "image"), "t2s": ("text", "audio")}[task]
  missing = [n for n in need if n not in run.tokenizers]
  if missing:
    return f"{run.data_dir} has no {missing} tokenizer"
  source = {"text": "text", "t2i": "image_text", "t2s": "audio_text"}[task]
  from tmdiff.data import records
  manifest = records.Manifest.load(run.data_dir)
  if not manifest.counts.get(source, {}).get("validation"):
    return f"{run.data_dir} has no {source} validation records"
  return None


def _judge(run, name: str, settings: dict):
  from tmdiff.eval import judges
  return judges.load_or_train(name, run.data_dir, **settings)


def _write_samples(task: str, result: dict, out: str) -> dict:
  from tmdiff.data.tokenizers import image as image_lib
  if task == "text":
    path = os.path.join(out, "text_samples.txt")
    with open(path, "w") as f:
      for i, text in enumerate(result["texts"]):
        f.write(f"=== sample {i} ===\n{text.rstrip()}\n")
    return {"file": path, "texts": result["texts"]}
  if task == "t2i":
    path = os.path.join(out, "t2i_grid.png")
    image_lib.write_png(path, image_lib.image_grid(result["images"], scale=4))
    return {"file": path, "captions": result["captions"], "all_attributes_match": result["match"]}
  from tmdiff.data.tokenizers import audio as audio_lib
  folder = os.path.join(out, "t2s")
  os.makedirs(folder, exist_ok=True)
  files = []
  for i, wave in enumerate(result["waves"]):
    files.append(os.path.join(folder, f"{i:03d}.wav"))
    audio_lib.write_wav(files[-1], wave)
  return {"files": files, "transcripts": result["transcripts"],
          "recognised": result["hypotheses"]}


def format_table(report: dict) -> str:
  """The human-readable table of a report."""
  lines = [f"# eval of {report['workdir']} at step {report['step']} "
           f"({report['devices']} devices, batch {report['batch_size']})", "",
           "| part | metric | value |", "|---|---|---|"]
  for part, metrics in report["metrics"].items():
    for key, value in metrics.items():
      if isinstance(value, float):
        value = f"{value:.4f}"
      lines.append(f"| {part} | {key} | {value} |")
  for part, reason in report["skipped"].items():
    lines.append(f"| {part} | skipped | {reason} |")
  if report["judges"]:
    lines += ["", "Judge sanity figures (held-out):", ""]
    for name, figures in report["judges"].items():
      lines.append(f"- {name}: {json.dumps(figures)}")
  return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m tmdiff.eval", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="run directory holding checkpoints/")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--data_dir", default=None, help="prepared data dir (default: the config's)")
  p.add_argument("--batch_size", type=int, default=16, help="rows per compiled call")
  p.add_argument("--num_samples", type=int, default=16, help="samples per generation task")
  p.add_argument("--num_rows", type=int, default=None, help="validation rows for the ELBO "
                 "(default: data.eval_batches x data.global_batch)")
  p.add_argument("--out", default=None, help="output folder (default: <workdir>/eval)")
  p.add_argument("--seed", type=int, default=0, help="sampling seed")
  p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {PARTS}")
  return p.parse_args(argv)


def main(argv=None) -> None:
  from tmdiff import entry
  args = parse_args(argv)
  logging.set_verbosity(logging.INFO)
  entry.quiet_library_logs()
  from tmdiff.configs.derived import ConfigError
  from tmdiff.data.pipeline import DataConfigError
  from tmdiff.data.records import RecordError
  from tmdiff.data.tokenizers import TokenizerLoadError
  from tmdiff.diffusion.prompts import SampleError
  from tmdiff.diffusion.sampling import SamplerError
  from tmdiff.eval.generation import EvalError
  from tmdiff.eval.judges import JudgeError
  from tmdiff.train.checkpoint import CheckpointError
  parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
  try:
    report = run_eval(args.workdir, step=args.step, data_dir=args.data_dir,
                      batch_size=args.batch_size, num_samples=args.num_samples,
                      num_rows=args.num_rows, out=args.out, seed=args.seed, parts=parts)
  except (EvalError, JudgeError, SampleError, SamplerError, CheckpointError, RecordError,
          TokenizerLoadError, ConfigError, DataConfigError, ValueError) as e:
    entry.fail("tmdiff.eval", e)
  print(format_table(report))
  print(f"\nwrote {os.path.join(args.out or os.path.join(args.workdir, 'eval'), 'eval.json')}")


if __name__ == "__main__":
  main()
