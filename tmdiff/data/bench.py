"""Data-loader benchmark: batches/s and tokens/s per host for the default pipeline.

  python -m tmdiff.data.bench                                   # synthetic source
  python -m tmdiff.data.bench --data_dir=DIR                    # prepared (vocab: manifest)
  python -m tmdiff.data.bench --data_dir=DIR --seq_len=128 --global_batch=16 --worker_count=0,4,8
  python -m tmdiff.data.bench --data_dir=DIR --step_tokens_per_s=2996630   # ratio to a train step
  python -m tmdiff.data.bench --data_dir=DIR --seq_len=2048 --global_batch=8 --pack_pairs=0,1

One JSON line per worker count. The pipeline is built as the trainer builds it on one host
(process_count=1) and warmed up until every Grain worker has delivered two blocks of batches
(workers start one Python process each, seconds apart on a busy host, and Grain hands out
blocks in worker order, so a short window would time start-up, not the loader) and for at
least --warmup_s; `warmup_s` reports how long that took. Then it is timed for at least
--seconds and --batches.
tokens_per_s counts every position of a [B, L] batch (what the train step consumes);
non_pad_tokens_per_s counts real tokens, real_fraction = non_pad_tokens_per_s / tokens_per_s
(the share of the positions that hold real tokens). main_cpu_s is the CPU time of this process over the
timed part (with workers, they run in other processes), so main_cpu_s / seconds < 1 means
the consumer waited for data. With --step_tokens_per_s, loader_over_step = tokens_per_s / it
(the acceptance bar is >= 5).
"""
from __future__ import annotations

import argparse
import json
import time

from tmdiff.configs.base import get_base_config
from tmdiff.data import pipeline


def run(config, batches: int = 200, seconds: float = 3.0, warmup_s: float = 1.0) -> dict:
  """Times `iter(make_dataset(config, 'train'))` on this host; returns the figures."""
  start = time.perf_counter()
  it = iter(pipeline.make_dataset(config, "train"))
  batch = next(it)
  first_batch_s = time.perf_counter() - start
  local_batch = pipeline.local_batch_size(config, 1)
  warm_batches = 2 * max(int(config.data.worker_count), 1) * pipeline.batches_per_block(
      local_batch, int(config.data.seq_len))
  taken = 1
  while taken < warm_batches or time.perf_counter() - start < first_batch_s + warmup_s:
    batch = next(it)
    taken += 1
  warm_s = time.perf_counter() - start
  n = live = 0
  cpu0, t0 = time.process_time(), time.perf_counter()
  while n < batches or time.perf_counter() - t0 < seconds:
    batch = next(it)
    live += int((batch["segment_ids"] > 0).sum())
    n += 1
  wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
  fractions = {k: round(v, 3) for k, v in it.token_fractions().items()}
  it.close()   # stop this run's workers before the next worker count starts its own
  b, l = batch["tokens"].shape
  return {"source": config.data.source, "batch": b, "seq_len": l,
          "exact_mix": bool(config.data.exact_mix), "worker_count": int(config.data.worker_count),
          "batches": n, "seconds": round(wall, 3), "main_cpu_s": round(cpu, 3),
          "first_batch_s": round(first_batch_s, 3), "warmup_s": round(warm_s, 3),
          "batches_per_s": round(n / wall, 1), "rows_per_s": round(n * b / wall),
          "tokens_per_s": round(n * b * l / wall), "non_pad_tokens_per_s": round(live / wall),
          "pack_pairs": bool(config.data.pack_pairs), "max_segments": int(config.data.max_segments),
          "real_fraction": round(live / (n * b * l), 4),
          "token_fractions": fractions}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m tmdiff.data.bench", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data_dir", default="", help="prepared dir (default: synthetic source)")
  p.add_argument("--batches", type=int, default=200, help="time at least this many batches")
  p.add_argument("--seconds", type=float, default=3.0, help="and at least this long")
  p.add_argument("--warmup_s", type=float, default=1.0)
  p.add_argument("--seq_len", type=int, default=0, help="0: base config")
  p.add_argument("--global_batch", type=int, default=0, help="0: base config")
  p.add_argument("--worker_count", default="0",
                 help="Grain worker processes; a comma list runs each in turn")
  p.add_argument("--exact_mix", action="store_true")
  p.add_argument("--pack_pairs", default="0",
                 help="data.pack_pairs: 0 | 1, or a comma list (each in turn)")
  p.add_argument("--max_segments", type=int, default=0, help="0: base config")
  p.add_argument("--text_size", type=int, default=0, help="0: the manifest's")
  p.add_argument("--image_size", type=int, default=0, help="0: the manifest's")
  p.add_argument("--audio_size", type=int, default=0, help="0: the manifest's")
  p.add_argument("--step_tokens_per_s", type=float, default=0.0,
                 help="the train step's consumption, to report loader_over_step")
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
  if args.max_segments:
    c.data.max_segments = args.max_segments
  c.data.exact_mix = args.exact_mix
  for pack in [p.strip() not in ("0", "false", "False") for p in args.pack_pairs.split(",")]:
    c.data.pack_pairs = pack
    for workers in [int(w) for w in args.worker_count.split(",")]:
      c.data.worker_count = workers
      result = run(c, args.batches, args.seconds, args.warmup_s)
      if args.step_tokens_per_s:
        result["step_tokens_per_s"] = args.step_tokens_per_s
        result["loader_over_step"] = round(result["tokens_per_s"] / args.step_tokens_per_s, 2)
      print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
