"""Fused masked cross-entropy vs materialised logits: time and compiled peak memory.

python benchmarks/cross_entropy_bench.py [--n 8192 --d 1024 --vocabs 32768,131072]
Variants impl[:size]: block_v for blockwise/pallas, block_n (rows per chunk) for chunked.
Memory is XLA's compiled memory_analysis: temporaries + outputs (arguments excluded).
"""
from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from benchmarks._timing import bench, header  # noqa: E402
from tmdiff.kernels.cross_entropy import masked_cross_entropy  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--n", type=int, default=8192)
  ap.add_argument("--d", type=int, default=1024)
  ap.add_argument("--vocabs", default="32768,131072")
  ap.add_argument("--variants", default="reference,blockwise:8192,blockwise:16384,chunked:1024,chunked:2048,pallas:8192")
  ap.add_argument("--out", default="")
  a = ap.parse_args()
  print(header(), flush=True)
  rows = []
  for v in map(int, a.vocabs.split(",")):
    ks = jax.random.split(jax.random.key(0), 4)
    h = (jax.random.normal(ks[0], (a.n, a.d), jnp.float32)).astype(jnp.bfloat16)
    w = (jax.random.normal(ks[1], (a.d, v), jnp.float32) / a.d**0.5).astype(jnp.bfloat16)
    t = jax.random.randint(ks[2], (a.n,), 0, v)
    wt = jax.random.uniform(ks[3], (a.n,))
    ref = None
    for var in a.variants.split(","):
      impl, _, bv = var.partition(":")
      size = {"block_n" if impl == "chunked" else "block_v": int(bv)} if bv else {}
      kw = dict(impl=impl, reduction="sum", **size)
      loss = lambda h, w: masked_cross_entropy(h, w, t, wt, **kw)
      fwd = jax.jit(loss)
      fb = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
      row = dict(V=v, variant=var)
      try:
        for name, fn in (("fwd", fwd), ("fwdbwd", fb)):
          ma = fn.lower(h, w).compile().memory_analysis()
          row[name + "_mem_gib"] = (ma.temp_size_in_bytes + ma.output_size_in_bytes) / 2**30
          row[name + "_ms"] = bench(fn, h, w)
        val, (dh, dw) = fb(h, w)
        if ref is None:
          ref = (val, dh.astype(jnp.float32), dw.astype(jnp.float32))
        rel = lambda x, y: float(jnp.linalg.norm(x.astype(jnp.float32) - y) / jnp.linalg.norm(y))
        row["rel_err"] = [float(abs(val - ref[0]) / abs(ref[0])), rel(dh, ref[1]), rel(dw, ref[2])]
      except Exception as e:  # noqa: BLE001
        row["error"] = f"{type(e).__name__}: {str(e)[:160]}"
      print("row", row, flush=True)
      rows.append(row)
  print("\n| V | variant | fwd ms | fwd mem GiB | fwd+bwd ms | fwd+bwd mem GiB | rel err (loss, dh, dW) |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    g = lambda k: f"{r[k]:.2f}" if k in r else "-"
    err = ", ".join(f"{x:.1e}" for x in r["rel_err"]) if "rel_err" in r else r.get("error", "")[:60]
    print(f"| {r['V']} | {r['variant']} | {g('fwd_ms')} | {g('fwd_mem_gib')} | {g('fwdbwd_ms')} | "
          f"{g('fwdbwd_mem_gib')} | {err} |")
  if a.out:
    with open(a.out, "w") as fh:
      json.dump({"header": header(), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
  main()
