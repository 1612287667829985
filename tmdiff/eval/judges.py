"""Judges for generated samples, trained by our own code and cached beside the prepared data.

  python -m tmdiff.eval.judges --data_dir=runs/data [--only=text,image,speech] [--retrain]
      [--settings='{"speech": {"steps": 12000, "channels": 256}}']

  text    a small causal transformer over the text tokenizer's ids (tmdiff.eval.text_judge):
          generative perplexity of generated text, plus its unigram entropy
  image   a CNN predicting, per cell of the 3x3 grid, occupancy, shape, colour and size of
          procedural images (tmdiff.eval.image_judge): T2I attribute accuracy
  speech  a CTC character recogniser on log-mel frames with a lexicon (tmdiff.eval.speech_judge):
          T2S word error rate. (pocketsphinx's English model scored WER 1.04 on 12 clean
          espeak-ng Shakespeare lines, so we train our own.)

Each judge lives in `<data_dir>/judges/<name>/` (params.npz + judge.json holding its settings,
the data fingerprint it was trained for, and its held-out sanity figures). `load_or_train`
trains on first use (progress on stderr) and retrains when the prepared data changed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from tmdiff.data import records as records_lib

JUDGES = ("text", "image", "speech")
JUDGE_FILE = "judge.json"
PARAMS_FILE = "params.npz"


class JudgeError(ValueError):
  """A judge that cannot be trained or loaded (names the directory or data)."""


def log(name: str, message: str) -> None:
  print(f"[judge {name}] {message}", file=sys.stderr, flush=True)


def judges_dir(data_dir: str) -> str:
  return os.path.join(os.path.abspath(data_dir), "judges")


def data_fingerprint(data_dir: str) -> str:
  """What a cached judge was trained for: the manifest's tokenizer fingerprint and counts."""
  manifest = records_lib.Manifest.load(data_dir)
  return json.dumps({"tokenizers": manifest.extra.get("tokenizer_fingerprint"),
                     "counts": manifest.counts}, sort_keys=True)


def read_records(data_dir: str, source: str, split: str, limit: int | None = None):
  """[(arrays, meta)] of a prepared source/split, in stored order (the first `limit`)."""
  manifest = records_lib.Manifest.load(data_dir)
  if source not in manifest.shards:
    raise JudgeError(f"{data_dir}/{records_lib.MANIFEST} has no {source!r} source")
  reader = records_lib.ShardReader(manifest.shard_paths(data_dir, source, split),
                                   manifest.records_per_shard[source][split])
  n = len(reader) if limit is None else min(limit, len(reader))
  return [reader[i] for i in range(n)]


def save_judge(directory: str, model, info: dict) -> None:
  from tmdiff.data.tokenizers import _nn
  os.makedirs(directory, exist_ok=True)
  _nn.save_params(model, os.path.join(directory, PARAMS_FILE))
  with open(os.path.join(directory, JUDGE_FILE), "w") as f:
    json.dump(info, f, indent=2, sort_keys=True)


def read_judge_info(directory: str) -> dict | None:
  path = os.path.join(directory, JUDGE_FILE)
  if not (os.path.isfile(path) and os.path.isfile(os.path.join(directory, PARAMS_FILE))):
    return None
  with open(path) as f:
    return json.load(f)


def load_params_into(model, directory: str) -> None:
  from tmdiff.data.tokenizers import _nn
  _nn.load_params(model, os.path.join(directory, PARAMS_FILE))


def load_or_train(name: str, data_dir: str, *, directory: str | None = None,
                  retrain: bool = False, **train_kwargs):
  """The judge `name` for `data_dir`: loaded from its cache, or trained (and cached) first.

  `train_kwargs` override the judge's training settings; a cached judge is used when it was
  trained for the same data (and, where settings are given, with those settings)."""
  module = _module(name)
  directory = directory or os.path.join(judges_dir(data_dir), name)
  fingerprint = data_fingerprint(data_dir)
  info = None if retrain else read_judge_info(directory)
  # Without explicit settings any cached judge of this data will do.
  # A judge whose module changed its model (JUDGE_VERSION) since it was cached is retrained.
  version = getattr(module, "JUDGE_VERSION", None)
  settings_ok = info is not None and info.get("judge_version") == version and (
      not train_kwargs or info.get("settings") == module.settings_dict(**train_kwargs))
  if info is not None and info.get("data_fingerprint") == fingerprint and settings_ok:
    return module.load(directory, info)
  if info is not None:
    log(name, f"cached judge in {directory} is for other data or settings; retraining")
  start = time.time()
  judge = module.train(data_dir, **train_kwargs)
  judge.info.update(data_fingerprint=fingerprint, train_seconds=round(time.time() - start, 1))
  if version is not None:
    judge.info["judge_version"] = version
  judge.save(directory)
  log(name, f"trained in {time.time() - start:.0f} s; saved to {directory}; "
            f"sanity: {json.dumps(judge.info.get('sanity', {}))}")
  return judge


def _module(name: str):
  import importlib
  if name not in JUDGES:
    raise JudgeError(f"unknown judge {name!r}; choose from {JUDGES}")
  return importlib.import_module(f"tmdiff.eval.{name}_judge")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m tmdiff.eval.judges", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data_dir", required=True, help="prepared data dir (tmdiff.data.prepare)")
  p.add_argument("--only", default=",".join(JUDGES), help="comma-separated judges")
  p.add_argument("--retrain", action="store_true", help="ignore cached judges")
  p.add_argument("--settings", default="{}", help="JSON {judge: {setting: value}} overriding "
                 "the training settings (a cached judge of other settings is retrained)")
  args = p.parse_args(argv)
  try:
    settings = json.loads(args.settings)
  except json.JSONDecodeError as e:
    sys.exit(f"tmdiff.eval.judges: --settings is not JSON: {e}")
  names = [n.strip() for n in args.only.split(",") if n.strip()]
  if not isinstance(settings, dict) or not set(settings) <= set(names):
    sys.exit(f"tmdiff.eval.judges: --settings must map judges of --only={names} to settings, "
             f"got {args.settings!r}")
  # Under `python -m` this file is __main__; the judges raise the importable module's error.
  from tmdiff.eval import judges as judges_module
  try:
    report = {}
    for name in names:
      judge = judges_module.load_or_train(name, args.data_dir, retrain=args.retrain,
                                          **settings.get(name, {}))
      report[name] = judge.info.get("sanity", {})
  except (judges_module.JudgeError, records_lib.RecordError) as e:
    sys.exit(f"tmdiff.eval.judges: {type(e).__name__}: {e}")
  print(json.dumps(report, indent=2))


if __name__ == "__main__":
  main()
