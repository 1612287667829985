"""The tiny model with data.pack_pairs off and on: validation bits/token against real tokens seen.

  python -m benchmarks.pack_pairs_tiny --data_dir=runs/data --root=runs/pack_pairs_tiny \\
      --plot=docs/img/pack_pairs_tiny.png

Trains experiments/tiny.py twice on the same data: padded pairs (the paper's layout, mixture
1:1:1 by rows) and packed pairs with data.mixture set to the token fractions the padded run
realises, so both runs see the same composition and differ only in the padding they compute.
Every --eval_every steps both checkpoints are scored on the same validation rows (the padded
layout's first --eval_rows), per modality, with the batch-size-invariant estimator
(tmdiff.eval.elbo). Real tokens seen = sum over logged steps of rows x seq_len x the step's
real-token fraction. Writes ROOT/results.json and the plot.
"""
from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np

MODALITIES = ("text", "image", "audio")


def _config(data_dir: str, steps: int, eval_every: int, pack: bool, mixture=None):
  import experiments.tiny as tiny
  c = tiny.get_config(data_dir)
  c.train.steps = steps
  c.train.ckpt_every = eval_every
  c.train.eval_every = 0
  c.train.log_every = math.gcd(c.train.log_every, eval_every)
  c.train.keep_checkpoints = steps // eval_every + 1
  c.train.async_checkpointing = False
  c.data.pack_pairs = pack
  if mixture:
    for k, v in mixture.items():
      c.data.mixture[k] = v
  return c


def realised_fractions(config, batches: int = 300) -> dict[str, float]:
  from tmdiff.data import pipeline
  it = iter(pipeline.make_dataset(config, "train"))
  for _ in range(batches):
    next(it)
  return it.token_fractions()


def real_tokens_seen(workdir: str, rows: int, seq_len: int) -> dict[int, float]:
  """Step -> real tokens loaded up to it, from the train records of metrics.jsonl."""
  out, total, prev = {0: 0.0}, 0.0, 0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if r["split"] != "train":
        continue
      total += (r["step"] - prev) * rows * seq_len * r["real_token_fraction"]
      prev = r["step"]
      out[r["step"]] = total
  return out


def evaluate(workdir: str, trainer, rows, steps) -> dict[int, dict]:
  from tmdiff.eval import elbo as elbo_lib
  from tmdiff.train import checkpoint as ckpt_lib
  eval_step = trainer.compile_eval_step(trainer.config.data.global_batch)
  out = {}
  for step in steps:
    _, params = ckpt_lib.restore_params(workdir, trainer.abstract_state["params"], step=step)
    out[step] = elbo_lib.evaluate_rows(trainer, params, rows, eval_step=eval_step,
                                       batch_size=trainer.config.data.global_batch)
  return out


def plot(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
  for name, style in (("padded", "o-"), ("packed", "s-")):
    run = results[name]
    x = np.array([run["real_tokens"][s] for s in run["steps"]]) / 1e6
    for ax, m in zip(axes, MODALITIES + ("all",)):
      ax.plot(x, [run["eval"][s][f"bits_per_token/{m}"] for s in run["steps"]], style,
              label=f"{name} (real {run['real_fraction']:.0%} of positions)", ms=3)
      ax.set(title=f"{m}", xlabel="real tokens seen (M)", ylabel="validation bits/token")
      ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle("tiny model, data.pack_pairs off vs on (same token composition, same "
               "validation rows)")
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m benchmarks.pack_pairs_tiny", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data_dir", required=True)
  p.add_argument("--root", required=True)
  p.add_argument("--steps", type=int, default=1200)
  p.add_argument("--eval_every", type=int, default=100)
  p.add_argument("--eval_rows", type=int, default=256)
  p.add_argument("--plot", default="")
  args = p.parse_args(argv)
  from tmdiff.eval import elbo as elbo_lib
  from tmdiff.train import loop
  from tmdiff.train.trainer import Trainer, make_mesh

  padded = _config(args.data_dir, args.steps, args.eval_every, False)
  fractions = realised_fractions(padded)
  mixture = {"text": fractions["text"], "image_text": fractions["image"],
             "audio_text": fractions["audio"]}
  packed = _config(args.data_dir, args.steps, args.eval_every, True, mixture)
  rows = elbo_lib.validation_rows(padded, args.eval_rows)
  trainer = Trainer(padded, make_mesh(padded))
  steps = list(range(args.eval_every, args.steps + 1, args.eval_every))
  results = {"padded_token_fractions": fractions}
  for name, config in (("padded", padded), ("packed", packed)):
    workdir = os.path.join(args.root, name)
    if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
      loop.train(config, workdir)
    seen = real_tokens_seen(workdir, int(config.data.global_batch), int(config.data.seq_len))
    last = max(seen)
    results[name] = {
        "steps": steps, "real_tokens": {s: seen[s] for s in steps},
        "real_fraction": seen[last] / (last * config.data.global_batch * config.data.seq_len),
        "mixture": dict(config.data.mixture), "eval": evaluate(workdir, trainer, rows, steps)}
    print(name, json.dumps({"real_fraction": results[name]["real_fraction"],
                            "final": results[name]["eval"][steps[-1]]}), flush=True)
  with open(os.path.join(args.root, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  if args.plot:
    plot(results, args.plot)


if __name__ == "__main__":
  main()
