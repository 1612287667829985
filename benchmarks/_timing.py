"""Shared timing helpers for the kernel benchmarks."""
from __future__ import annotations

import time

import jax
import numpy as np


def bench(fn, *args, warmup: int = 2, iters: int = 10) -> float:
  """Median wall time in ms of a jitted fn (synchronised each call)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts) * 1e3)


def header() -> str:
  dev = jax.devices()[0]
  return f"device: {getattr(dev, 'device_kind', dev.platform)}; jax {jax.__version__}"
