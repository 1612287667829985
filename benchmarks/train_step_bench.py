"""Train-step throughput: step time, tokens/s/device and MFU for a model shape.

  python benchmarks/train_step_bench.py --d_model=1024 --n_layers=16 --seq_len=2048 --batch=8

Batches are packed random rows (4 documents each), already on device, so the figure is the
step's own rate. MFU counts bidirectional attention FLOPs; the peak is the datasheet value and,
separately, a bf16 matmul measured in the same run.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._timing import header
from tmdiff.configs.base import get_base_config
from tmdiff.configs import validate as validate_lib
from tmdiff.train import flops as flops_lib
from tmdiff.train.trainer import Trainer, make_mesh


def measured_matmul_peak(n: int = 8192, iters: int = 10) -> float:
  a = jnp.ones((n, n), jnp.bfloat16)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(iters):
    out = f(a, a)
  out.block_until_ready()
  return 2 * n ** 3 * iters / (time.perf_counter() - t0)


def packed_batch(layout, rows, seq_len, docs_per_row, seed=0):
  rng = np.random.default_rng(seed)
  doc = seq_len // docs_per_row
  seg = np.repeat(np.arange(1, docs_per_row + 1), doc)[None].repeat(rows, 0).astype(np.int32)
  pos = np.tile(np.arange(doc), docs_per_row)[None].repeat(rows, 0).astype(np.int32)
  modality = rng.integers(0, 3, (rows, docs_per_row)).repeat(doc, axis=1).astype(np.int32)
  tokens = np.zeros((rows, seq_len), np.int32)
  for m in range(3):
    start, stop = layout.range_of(m)
    tokens = np.where(modality == m, rng.integers(start, stop, (rows, seq_len)), tokens)
  ones = np.ones((rows, seq_len), np.int32)
  return {"tokens": tokens.astype(np.int32), "segment_ids": seg, "positions": pos,
          "modality": modality, "loss_mask": ones, "cond_mask": 0 * ones}


def add_model_args(p: argparse.ArgumentParser) -> None:
  """The model and batch flags shared with benchmarks/torch_peer.py."""
  p.add_argument("--d_model", type=int, default=1024)
  p.add_argument("--n_layers", type=int, default=16)
  p.add_argument("--head_dim", type=int, default=128)
  p.add_argument("--kv_ratio", type=int, default=1, help="query heads per kv head")
  p.add_argument("--ff_mult", type=float, default=4.0)
  p.add_argument("--seq_len", type=int, default=2048)
  p.add_argument("--batch", type=int, default=8, help="global batch (rows)")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--text_vocab", type=int, default=32000)


def model_config(args):
  c = get_base_config()
  m = c.model
  m.d_model, m.n_layers, m.head_dim = args.d_model, args.n_layers, args.head_dim
  m.n_heads = args.d_model // args.head_dim
  m.n_kv_heads = m.n_heads // args.kv_ratio
  m.d_ff = int(args.ff_mult * args.d_model * 2 / 3) // 128 * 128
  m.base_width, m.base_depth = 256, 4
  c.vocab.text_size = args.text_vocab
  c.data.seq_len, c.data.global_batch = args.seq_len, args.batch
  return c


def main():
  p = argparse.ArgumentParser()
  add_model_args(p)
  p.add_argument("--docs_per_row", type=int, default=1)
  p.add_argument("--attention", default="auto")
  p.add_argument("--remat", default="none", help="none | block | dots")
  p.add_argument("--scan_layers", action="store_true", help="blocks under lax.scan")
  p.add_argument("--fsdp", type=int, default=1)
  p.add_argument("--profile", default="", help="trace --profile_steps steps into this dir "
                 "and print the top device kernels (benchmarks/profile_summary.py)")
  p.add_argument("--profile_steps", type=int, default=3)
  args = p.parse_args()

  c = model_config(args)
  m = c.model
  m.attention_impl, m.remat, m.scan_layers = args.attention, args.remat, args.scan_layers
  c.mesh.fsdp, c.mesh.data = args.fsdp, -1
  c.train.steps = 1000
  validate_lib.validate(c, jax.device_count())
  trainer = Trainer(c, make_mesh(c))
  counts = flops_lib.param_counts(m, trainer.layout.padded_size())
  print(header(), f"| devices {jax.device_count()} | params {counts['total'] / 1e6:.1f}M "
        f"(non-embedding {counts['non_embedding'] / 1e6:.1f}M)")
  t0 = time.perf_counter()
  state = jax.block_until_ready(trainer.init_state())
  print(f"init (compile and run) {time.perf_counter() - t0:.1f}s")
  t0 = time.perf_counter()
  step = trainer.compile_train_step()
  print(f"compile {time.perf_counter() - t0:.1f}s")
  batch = trainer.put_batch(packed_batch(trainer.layout, args.batch, args.seq_len,
                                         args.docs_per_row))
  for _ in range(2):
    state, metrics = step(state, batch)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  losses = []
  for _ in range(args.steps):
    state, metrics = step(state, batch)
    losses.append(metrics["loss"])
  jax.block_until_ready(state)
  dt = (time.perf_counter() - t0) / args.steps
  tokens = args.batch * args.seq_len
  per_token = flops_lib.train_flops_per_token(m, trainer.layout.padded_size(), args.seq_len)
  achieved = per_token * tokens / dt / jax.device_count()
  sheet = flops_lib.peak_flops()
  measured = measured_matmul_peak() if jax.devices()[0].platform == "gpu" else None
  print(f"step {dt * 1e3:.1f} ms | {tokens / dt / jax.device_count():,.0f} tokens/s/device | "
        f"{achieved / 1e12:.1f} TFLOP/s/device | loss {float(metrics['loss']):.3f}")
  if sheet:
    print(f"MFU {achieved / sheet:.1%} of datasheet {sheet / 1e12:.0f} TFLOP/s")
  if measured:
    print(f"MFU {achieved / measured:.1%} of measured matmul {measured / 1e12:.0f} TFLOP/s")
  print("loss per timed step (the same batch):", " ".join(f"{float(x):.3f}" for x in losses))
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    print(f"peak device memory {stats['peak_bytes_in_use'] / 2**30:.1f} GiB")
  if args.profile:
    from benchmarks import profile_summary
    with jax.profiler.trace(args.profile, create_perfetto_trace=True):
      for _ in range(args.profile_steps):
        state, metrics = step(state, batch)
      jax.block_until_ready(state)
    print(profile_summary.table(profile_summary.device_kernel_times(
        profile_summary.load_events(args.profile)), 10, args.profile_steps))


if __name__ == "__main__":
  main()
