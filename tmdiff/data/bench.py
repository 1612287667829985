"""Data-loader benchmark: batches/s and tokens/s per host for the default pipeline.

  python -m tmdiff.data.bench                                   # synthetic source
  python -m tmdiff.data.bench --data_dir=DIR --text_size=... --image_size=... --audio_size=...
  python -m tmdiff.data.bench --batches=300 --seq_len=1024 --global_batch=64 --worker_count=2

Tokens/s counts every position of a [B, L] batch (what the train step consumes); non-pad
tokens/s is reported too. Compare with the train step's tokens/s (must be >= 5x lower).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from tmdiff.configs.base import get_base_config
from tmdiff.data import pipeline


def run(config, batches: int, warmup: int = 5) -> dict:
  it = iter(pipeline.make_dataset(config, "train"))
  for _ in range(warmup):
    next(it)
  live = 0
  start = time.perf_counter()
  for _ in range(batches):
    batch = next(it)
    live += int((batch["segment_ids"] > 0).sum())
  seconds = time.perf_counter() - start
  b, l = batch["tokens"].shape
  return {"source": config.data.source, "batch": b, "seq_len": l,
          "exact_mix": bool(config.data.exact_mix), "worker_count": int(config.data.worker_count),
          "batches_per_s": round(batches / seconds, 2),
          "tokens_per_s": round(batches * b * l / seconds),
          "non_pad_tokens_per_s": round(live / seconds),
          "token_fractions": {k: round(v, 3) for k, v in it.token_fractions().items()}}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m tmdiff.data.bench", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data_dir", default="", help="prepared dir (default: synthetic source)")
  p.add_argument("--batches", type=int, default=200)
  p.add_argument("--seq_len", type=int, default=0, help="0: base config")
  p.add_argument("--global_batch", type=int, default=0, help="0: base config")
  p.add_argument("--worker_count", type=int, default=0)
  p.add_argument("--exact_mix", action="store_true")
  p.add_argument("--text_size", type=int, default=0)
  p.add_argument("--image_size", type=int, default=0)
  p.add_argument("--audio_size", type=int, default=0)
  args = p.parse_args(argv)
  c = get_base_config()
  if args.data_dir:
    c.data.source, c.data.data_dir = "prepared", args.data_dir
    from tmdiff.data import records
    vocab = records.Manifest.load(args.data_dir).vocab
    for k, v in vocab.items():   # bench the data as prepared unless overridden
      c.vocab[k] = int(getattr(args, k) or v)
  if args.seq_len:
    c.data.seq_len = args.seq_len
  if args.global_batch:
    c.data.global_batch = args.global_batch
  c.data.worker_count, c.data.exact_mix = args.worker_count, args.exact_mix
  print(json.dumps(run(c, args.batches)))


if __name__ == "__main__":
  main()
