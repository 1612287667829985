"""Every attention backend against the f32 reference on ragged packed rows, on the device.

  python benchmarks/attention_check.py [--impls cudnn,pallas_gpu,xla] [--trials 8]

Each trial draws B=4 rows of T=1024 with 1-7 documents of random lengths and a padded tail
(some rows unpadded, one fully padded), GQA (8 query heads, 2 kv heads), bf16 inputs, and
reports the relative L2 error of the output and of dq, dk, dv over the non-padding tokens,
plus the count of non-finite values anywhere. Exit status 1 if any backend fails.
"""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from benchmarks._timing import header  # noqa: E402
from tmdiff.kernels.attention import attend, attend_reference  # noqa: E402


def ragged_segments(rng, b, t):
  seg = np.zeros((b, t), np.int32)
  for r in range(b):
    if r == b - 1 and b > 2:
      continue  # a fully padded row
    used = t if r % 2 else int(rng.integers(t // 2, t))
    cuts = np.sort(rng.choice(np.arange(1, used), int(rng.integers(0, 7)), replace=False))
    edges = np.concatenate([[0], cuts, [used]])
    for i, (s, e) in enumerate(zip(edges[:-1], edges[1:])):
      seg[r, s:e] = i + 1
  return seg


def rel(a, b, keep):
  a = np.asarray(a, np.float32)[keep]
  b = np.asarray(b, np.float32)[keep]
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--impls", default="cudnn,pallas_gpu,xla")
  p.add_argument("--trials", type=int, default=8)
  p.add_argument("--tol", type=float, default=2e-2)
  args = p.parse_args()
  print(header())
  b, t, h, kh, d = 4, 1024, 8, 2, 128
  rng = np.random.default_rng(0)
  worst, failed = {}, False
  for trial in range(args.trials):
    seg = jnp.asarray(ragged_segments(rng, b, t))
    keep = np.asarray(seg) > 0
    ks = jax.random.split(jax.random.key(trial), 4)
    q = jax.random.normal(ks[0], (b, t, h, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (b, t, kh, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, t, kh, d), jnp.bfloat16)
    ct = jax.random.normal(ks[3], (b, t, h, d), jnp.float32)

    def run(fn):
      loss = lambda q, k, v: jnp.sum(fn(q, k, v, seg).astype(jnp.float32) * ct)
      out = jax.jit(fn)(q, k, v, seg)
      return (out,) + jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)

    ref = run(attend_reference)
    for impl in args.impls.split(","):
      got = run(lambda q, k, v, s, impl=impl: attend(q, k, v, s, impl=impl))
      nonfinite = sum(int((~jnp.isfinite(x.astype(jnp.float32))).sum()) for x in got)
      errs = [rel(g, r, keep) for g, r in zip(got, ref)]
      w = worst.setdefault(impl, [0.0] * 4 + [0])
      worst[impl] = [max(a, e) for a, e in zip(w, errs)] + [w[4] + nonfinite]
  print("| backend | o | dq | dk | dv | non-finite values |\n|---|---|---|---|---|---|")
  for impl, w in worst.items():
    print(f"| {impl} | " + " | ".join(f"{e:.1e}" for e in w[:4]) + f" | {w[4]} |")
    failed |= w[4] > 0 or max(w[:4]) > args.tol
  print(f"worst over {args.trials} trials (B={b}, T={t}, H={h}, K={kh}, D={d}): "
        + ("FAIL" if failed else "all within tolerance, all finite"))
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  main()
