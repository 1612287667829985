"""The tiny CPU scaling sweep: 4 sizes x 3 token horizons (2x apart), 4 evals per run.

  python -m tmdiff.scaling.sweep --sweep=experiments/sweeps/tiny_ladder.py:runs/data \\
      --root=runs/sweeps/tiny_ladder --out=runs/sweeps/tiny_ladder/results --devices=1

Argument: a directory written by `python -m tmdiff.data.prepare` (default runs/data, the
quickstart's) or 'synthetic'. Base: experiments/tiny.py (CompleteP base 128 x 2, lr 3e-3, cosine
schedule in fractions of the horizon), with widths 32..96, 1..4 layers, head_dim 16, sequences of
128 tokens, batch 8. N runs from 0.18M to 0.97M total parameters (mostly embeddings: the
unified vocabulary is ~2.5k ids), D from 0.1M to 0.4M tokens: far below D*(N), so the N term of
the fit is weak (docs/scaling.md). Cost: 12 CPU-minutes of training for the 12 runs (57 minutes
of wall time on a 2-core machine shared with other jobs).
"""
from tmdiff.scaling.sweep import Sweep, product

# name: (d_model, n_layers); heads of 16 dims, SwiGLU width 3 d_model.
SIZES = {"w32l1": (32, 1), "w48l2": (48, 2), "w64l3": (64, 3), "w96l4": (96, 4)}
HORIZONS = {"D100k": 1.0e5, "D200k": 2.0e5, "D400k": 4.0e5}
BATCH, SEQ_LEN, HEAD_DIM = 8, 128, 16


def size_overrides(d_model: int, n_layers: int) -> dict:
  heads = d_model // HEAD_DIM
  return {"model.d_model": d_model, "model.n_layers": n_layers, "model.n_heads": heads,
          "model.n_kv_heads": heads, "model.head_dim": HEAD_DIM, "model.d_ff": 3 * d_model}


def get_sweep(arg: str = "runs/data"):
  sizes = {name: size_overrides(*shape) for name, shape in SIZES.items()}
  horizons = {name: {"train.tokens": tokens} for name, tokens in HORIZONS.items()}
  common = {"data.global_batch": BATCH, "data.seq_len": SEQ_LEN, "data.eval_batches": 12,
            "train.log_every": 25}
  runs = product(f"experiments/tiny.py:{arg}", hw="cpu", common=common, size=sizes,
                 horizon=horizons)
  return Sweep("tiny_ladder", runs, evals_per_run=4, description=__doc__.splitlines()[0])
