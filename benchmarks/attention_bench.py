"""Attention backends: forward and forward+backward ms and TFLOP/s.

python benchmarks/attention_bench.py [--seqs 1024,4096,8192] [--out results.json]
FLOPs count full bidirectional attention (4*B*H*T^2*D forward, 2.5x that backward) for
packed rows too, so packed TFLOP/s are 'effective' (same work as unpacked, less done).
"""
from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from benchmarks._timing import bench, header  # noqa: E402
from tmdiff.kernels.attention import attend  # noqa: E402


def inputs(b, t, h, kh, d, docs, key=0):
  ks = jax.random.split(jax.random.key(key), 3)
  q = jax.random.normal(ks[0], (b, t, h, d), jnp.bfloat16)
  k = jax.random.normal(ks[1], (b, t, kh, d), jnp.bfloat16)
  v = jax.random.normal(ks[2], (b, t, kh, d), jnp.bfloat16)
  seg = np.repeat(np.arange(1, docs + 1), t // docs)[None].repeat(b, 0)
  return q, k, v, jnp.asarray(seg, jnp.int32)


def fns(impl, seg, **opts):
  fwd = jax.jit(lambda q, k, v: attend(q, k, v, seg, impl=impl, **opts))
  loss = lambda q, k, v: jnp.sum(attend(q, k, v, seg, impl=impl, **opts).astype(jnp.float32))
  fb = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  return fwd, fb


def check(impls):
  """Relative error vs the reference on a small packed GQA batch with padding."""
  b, t, h, kh, d = 2, 1024, 8, 2, 128
  q, k, v, _ = inputs(b, t, h, kh, d, 1, key=1)
  seg = np.ones((b, t), np.int32)
  seg[0, 300:700] = 2
  seg[0, 700:1000] = 3
  seg[0, 1000:] = 0
  seg[1, 512:] = 0
  seg = jnp.asarray(seg)
  ct = jax.random.normal(jax.random.key(2), q.shape, jnp.float32)
  def run(impl):
    f = lambda q, k, v: jnp.sum(attend(q, k, v, seg, impl=impl).astype(jnp.float32) * ct)
    o = jax.jit(lambda q, k, v: attend(q, k, v, seg, impl=impl))(q, k, v).astype(jnp.float32)
    return (o,) + tuple(g.astype(jnp.float32) for g in jax.jit(jax.grad(f, (0, 1, 2)))(q, k, v))
  ref = run("reference")
  rel = lambda a, r: float(jnp.linalg.norm(a - r) / jnp.linalg.norm(r))
  out = {}
  for impl in impls:
    try:
      res = run(impl)
      out[impl] = [rel(a, r) for a, r in zip(res, ref)]
    except Exception as e:  # noqa: BLE001
      out[impl] = f"FAILED {type(e).__name__}: {str(e)[:200]}"
    print("check", impl, "rel err (o, dq, dk, dv):", out[impl], flush=True)
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--seqs", default="1024,4096,8192")
  ap.add_argument("--impls", default="reference,xla,cudnn,pallas_gpu")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--heads", type=int, default=16)
  ap.add_argument("--kv_heads", type=int, default=16)
  ap.add_argument("--dim", type=int, default=128)
  ap.add_argument("--docs", default="1,4")
  ap.add_argument("--sweep", action="store_true", help="pallas block-size sweep at T=4096")
  ap.add_argument("--out", default="")
  a = ap.parse_args()
  print(header(), flush=True)
  impls = a.impls.split(",")
  results = {"header": header(), "check": check([i for i in impls if i != "reference"]),
             "rows": [], "sweep": []}
  b, h, kh, d = a.batch, a.heads, a.kv_heads, a.dim
  for t in map(int, a.seqs.split(",")):
    for docs in map(int, a.docs.split(",")):
      q, k, v, seg = inputs(b, t, h, kh, d, docs)
      flops = 4 * b * h * t * t * d
      for impl in impls:
        row = dict(T=t, docs=docs, impl=impl)
        if impl == "reference" and t > 4096:
          row["note"] = "skipped (materialised [B,H,T,T] f32 logits too large)"
        else:
          fwd, fb = fns(impl, seg)
          for name, fn, fl in (("fwd", fwd, flops), ("fwdbwd", fb, 3.5 * flops)):
            try:
              ms = bench(fn, q, k, v, iters=5 if t > 4096 else 10)
              row[name + "_ms"], row[name + "_tflops"] = ms, fl / ms / 1e9
            except Exception as e:  # noqa: BLE001
              row[name + "_error"] = f"{type(e).__name__}: {str(e)[:120]}"
        print("row", row, flush=True)
        results["rows"].append(row)
  if a.sweep:
    q, k, v, seg = inputs(b, 4096, h, kh, d, 1)
    flops = 4 * b * h * 4096**2 * d * 3.5
    for fcfg in [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)]:
      for bcfg in [(64, 64, 4, 2), (64, 128, 8, 2), (128, 128, 8, 2)]:
        opts = dict(block_q=fcfg[0], block_k=fcfg[1], warps=fcfg[2], stages=fcfg[3],
                    bwd_block_q=bcfg[0], bwd_block_k=bcfg[1], bwd_warps=bcfg[2],
                    bwd_stages=bcfg[3])
        try:
          ms = bench(fns("pallas_gpu", seg, **opts)[1], q, k, v, iters=5)
          row = dict(fwd=fcfg, bwd=bcfg, ms=ms, tflops=flops / ms / 1e9)
        except Exception as e:  # noqa: BLE001
          row = dict(fwd=fcfg, bwd=bcfg, error=str(e)[:200])
        print("sweep", row, flush=True)
        results["sweep"].append(row)
  print("\n| T | docs/row | backend | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |")
  print("|---|---|---|---|---|---|---|")
  for r in results["rows"]:
    f = lambda k: f"{r[k]:.2f}" if k in r else r.get("note", r.get(k.rsplit('_', 1)[0] + "_error", "-"))[:40]
    print(f"| {r['T']} | {r['docs']} | {r['impl']} | {f('fwd_ms')} | {f('fwd_tflops')} | "
          f"{f('fwdbwd_ms')} | {f('fwdbwd_tflops')} |")
  if a.out:
    with open(a.out, "w") as fh:
      json.dump(results, fh, indent=1)


if __name__ == "__main__":
  main()
