"""Collects a sweep's runs into one table: per-modality eval losses at every periodic eval, with
parameters N, tokens D and training FLOPs C, in the format `tmdiff.scaling.fit` reads.

  python -m tmdiff.scaling.collect --root=runs/sweeps/tiny --out=runs/sweeps/tiny/results

For each run directory under --root (one per run; `metrics.jsonl` from `tmdiff.train`, the config
from `config.json` written by the sweep or else from the latest checkpoint):
  N     total parameters (embeddings included; `tmdiff.train.flops.param_counts`)
  D     data tokens seen by the eval's step: rows loaded per step x seq_len x step (with
        anti-masking each loaded row is trained twice; D counts it once)
  C     training FLOPs: FLOPs/token (`train_flops_per_token`, bidirectional attention included)
        x tokens processed (global batch x seq_len x step)
  loss  the per-modality negative ELBO in bits per token on the validation split (modalities
        text, image, audio and all)
One row per (run, modality, eval step); `final` marks each run's last eval. Extra columns (step,
non_embedding, d_model, ... and the sweep's tags) are ignored by the fit.
"""
from __future__ import annotations

import argparse
import csv
import json
import os

import ml_collections as mlc

from tmdiff.configs.derived import derive
from tmdiff.data.vocab import VocabLayout
from tmdiff.scaling.run_files import CONFIG_FILE, RUN_FILE
from tmdiff.train import flops as flops_lib
from tmdiff.train import loop

MODALITIES = ("text", "image", "audio", "all")
TABLE_CSV, TABLE_JSON = "runs.csv", "runs.json"
BASE_COLUMNS = ("run", "modality", "params", "tokens", "flops", "loss", "step", "final",
                "non_embedding", "d_model", "n_layers", "seq_len", "global_batch")


class CollectError(ValueError):
  """A run directory that cannot be read; the message names the file."""


def read_config(path: str) -> mlc.ConfigDict:
  config_file = os.path.join(path, CONFIG_FILE)
  if os.path.exists(config_file):
    with open(config_file) as f:
      return mlc.ConfigDict(json.load(f))
  from tmdiff.train import checkpoint as ckpt_lib
  try:
    return mlc.ConfigDict(ckpt_lib.read_config(path))
  except Exception as e:  # noqa: BLE001 -- orbax raises several types
    raise CollectError(
        f"{path}: no {CONFIG_FILE} and no checkpointed config ({e})") from None


def read_evals(path: str) -> list[dict]:
  """The eval records of metrics.jsonl, one per step (a resumed run may log a step twice: the
  later record wins)."""
  metrics_file = os.path.join(path, loop.METRICS_FILE)
  by_step = {}
  with open(metrics_file) as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise CollectError(f"{metrics_file}:{line_no}: not JSON ({e})") from None
      if record.get("split") == "eval":
        by_step[int(record["step"])] = record
  return [by_step[s] for s in sorted(by_step)]


def run_rows(path: str, name: str | None = None) -> list[dict]:
  name = name or os.path.basename(os.path.normpath(path))
  evals = read_evals(path)
  if not evals:
    return []
  config = read_config(path)
  meta_file = os.path.join(path, RUN_FILE)
  meta = {}
  if os.path.exists(meta_file):
    with open(meta_file) as f:
      meta = json.load(f).get("meta", {})
  hp = derive(config)
  vocab = VocabLayout.from_config(config.vocab).padded_size()
  counts = flops_lib.param_counts(config.model, vocab)
  flops_per_token = flops_lib.train_flops_per_token(config.model, vocab, hp.seq_len)
  rows = []
  for record in evals:
    step = int(record["step"])
    for m in MODALITIES:
      key = f"bits_per_token/{m}"
      if key not in record:
        continue
      rows.append({
          "run": name, "modality": m, "params": counts["total"],
          "tokens": hp.examples_per_step * hp.seq_len * step,
          "flops": flops_per_token * hp.tokens_per_step * step, "loss": record[key],
          "step": step, "final": int(step == evals[-1]["step"]),
          "non_embedding": counts["non_embedding"], "d_model": config.model.d_model,
          "n_layers": config.model.n_layers, "seq_len": hp.seq_len, "global_batch": hp.batch,
          **{k: v for k, v in meta.items() if k not in BASE_COLUMNS}})
  return rows


def collect(root: str, names=None, log=print) -> list[dict]:
  """Rows of every run under `root` (or of `names`); runs without evals yet are reported and
  left out."""
  if names is None:
    names = sorted(d for d in os.listdir(root)
                   if os.path.exists(os.path.join(root, d, loop.METRICS_FILE)))
  rows, missing = [], []
  for name in names:
    path = os.path.join(root, name)
    if not os.path.exists(os.path.join(path, loop.METRICS_FILE)):
      missing.append(name)
      continue
    got = run_rows(path, name)
    (rows.extend(got) if got else missing.append(name))
  if missing:
    log(f"collect: no eval results yet for {len(missing)} run(s): {', '.join(missing)}")
  if not rows:
    raise CollectError(f"{root}: no run with eval results")
  return rows


def write_table(rows: list[dict], out: str) -> list[str]:
  """runs.csv and runs.json ({"runs": rows}) in `out`; returns their paths, CSV first."""
  os.makedirs(out, exist_ok=True)
  columns = list(BASE_COLUMNS) + sorted({k for r in rows for k in r} - set(BASE_COLUMNS))
  csv_path, json_path = os.path.join(out, TABLE_CSV), os.path.join(out, TABLE_JSON)
  with open(csv_path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
  with open(json_path, "w") as f:
    json.dump({"runs": rows}, f, indent=1)
  return [csv_path, json_path]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--root", required=True, help="directory with one workdir per run")
  p.add_argument("--out", help="where runs.csv / runs.json go (default: ROOT/results)")
  args = p.parse_args(argv)
  for path in write_table(collect(args.root), args.out or os.path.join(args.root, "results")):
    print("wrote", path)


if __name__ == "__main__":
  main()
