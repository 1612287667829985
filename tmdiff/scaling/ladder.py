"""The experiment size ladder: CompleteP-consistent shapes from ~1M to ~8B parameters.

Every size shares `base_width` / `base_depth` (the tiny proxy's shape, `experiments/tiny.py`), so
hyperparameters tuned there transfer by CompleteP's width/depth rules, and the SDE
reparameterisation transfers them across token horizons and physical batches.

Default token horizon: the paper's compute-optimal frontier D*(N) = 7754 * N^0.84 with N the
**total** parameter count (embeddings and unembedding included; the paper names its models that
way, e.g. the ~320M proxy of which 240M are embeddings). Both counts are listed.

  python -m tmdiff.scaling.ladder                 # the table
  python -m tmdiff.scaling.ladder --seq_len=4096  # at another sequence length
"""
from __future__ import annotations

import argparse
import dataclasses
import math

from tmdiff.configs.base import get_base_config
from tmdiff.data.vocab import VocabLayout
from tmdiff.scaling import fit
from tmdiff.train import flops as flops_lib

# Paper's compute-optimal frontier (tokens vs total parameters).
FRONTIER_COEF, FRONTIER_EXP = fit.PAPER_FRONTIER_COEF, fit.PAPER_FRONTIER_EXP

# Shared CompleteP base shape (= experiments/tiny.py): hyperparameters are tuned there.
BASE_WIDTH, BASE_DEPTH = 128, 2

# Production-like vocabulary (as in docs/benchmarks.md): 32k text BPE + 1k image + 1k audio codes.
VOCAB = dict(text_size=32_000, image_size=1000, audio_size=1000)
SEQ_LEN = 2048
# Pairs are at most this long (prepare's --max_pair_tokens default): rows of 2x that or more
# hold several pairs, so the ladder packs them (data.pack_pairs), max_segments = seq_len // 64.
MAX_PAIR_TOKENS = 128


@dataclasses.dataclass(frozen=True)
class Size:
  name: str
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_ff: int
  batch: int      # default physical batch (sequences)
  hw: str         # default target hardware (key of HARDWARE)
  remat: str = "none"


# d_ff ~ 8/3 d_model (SwiGLU) rounded to a multiple of 64/128/256; head_dim 128 from m upwards.
SIZES = {s.name: s for s in (
    Size("xxs", 128, 2, 4, 2, 32, 384, 64, "h100x1"),   # the CompleteP base shape itself
    Size("xs", 256, 4, 4, 2, 64, 704, 64, "h100x1"),
    Size("s", 384, 6, 6, 2, 64, 1024, 128, "h100x1"),
    Size("m", 512, 8, 4, 2, 128, 1408, 128, "h100x1"),
    Size("l", 768, 12, 6, 2, 128, 2048, 256, "h100x8"),
    Size("xl", 1024, 16, 8, 4, 128, 2816, 256, "h100x8"),
    Size("2xl", 1536, 20, 12, 4, 128, 4096, 512, "h100x8"),
    Size("1b", 2048, 22, 16, 4, 128, 5632, 512, "h100x32", "block"),
    Size("3b", 3072, 30, 24, 8, 128, 8192, 1024, "h100x64", "block"),
    Size("8b", 4096, 36, 32, 8, 128, 14336, 1024, "h100x256", "block"),
)}
ORDER = tuple(SIZES)


@dataclasses.dataclass(frozen=True)
class Hardware:
  devices: int
  peak_flops: float       # dense bf16 per device (datasheet)
  devices_per_host: int   # fsdp inside a host, data across hosts


def _gpu(n, kind="h100"):
  return Hardware(n, flops_lib.PEAK_FLOPS[kind], min(n, 8))


HARDWARE = {
    "cpu": Hardware(1, 0.0, 1),
    **{f"h100x{n}": _gpu(n) for n in (1, 8, 16, 32, 64, 128, 256)},
    **{f"h200x{n}": _gpu(n, "h200") for n in (1, 8, 16, 32, 64, 128, 256)},
    # TPU v5p-N has N/2 chips; one JAX device per chip; fsdp over every chip.
    **{f"v5p-{n}": Hardware(n // 2, flops_lib.PEAK_FLOPS["tpu v5p"], n // 2)
       for n in (8, 64, 128, 256, 512)},
}

# Estimated model-FLOPs utilisation. Anchors measured on one H200 (docs/benchmarks.md, no remat):
# 169M at 33% (cuDNN), 937M at 39.9% (pallas_gpu); below 100M a guess (20%). Block remat
# recomputes the forward (~0.75x).
def estimated_mfu(total_params: float, remat: str) -> float:
  mfu = 0.20 if total_params < 1e8 else 0.33 if total_params < 3e8 else 0.40
  return mfu * (0.75 if remat == "block" else 1.0)


def frontier_tokens(n_params: float) -> float:
  """The paper's compute-optimal token horizon D*(N) = 7754 N^0.84 (N total parameters)."""
  return float(fit.paper_frontier_tokens(n_params))


def apply_size(config, size: Size):
  m = config.model
  m.d_model, m.n_layers, m.n_heads = size.d_model, size.n_layers, size.n_heads
  m.n_kv_heads, m.head_dim, m.d_ff = size.n_kv_heads, size.head_dim, size.d_ff
  m.base_width, m.base_depth = BASE_WIDTH, BASE_DEPTH
  m.remat = size.remat
  m.scan_layers = True
  return config


def apply_mesh(config, hw: Hardware):
  """fsdp inside a host, data across hosts; tensor parallelism off (the ladder fits without)."""
  if hw.devices > hw.devices_per_host:
    config.mesh.data, config.mesh.fsdp = -1, hw.devices_per_host
  else:
    config.mesh.data, config.mesh.fsdp = 1, -1
  config.mesh.tensor = 1
  return config


def vocab_padded(config) -> int:
  return VocabLayout.from_config(config.vocab).padded_size()


@dataclasses.dataclass(frozen=True)
class Row:
  size: str
  hw: str
  devices: int
  non_embedding: int
  total: int
  flops_per_token: float
  tokens: float           # D*(N)
  compute: float          # flops_per_token * D*
  tokens_per_s_device: float | None   # estimate
  days: float | None      # estimate

  @property
  def tokens_per_param(self) -> float:
    return self.tokens / self.total


def describe(config, size_name: str, hw_name: str, tokens: float | None = None) -> Row:
  counts = flops_lib.param_counts(config.model, vocab_padded(config))
  fpt = flops_lib.train_flops_per_token(config.model, vocab_padded(config), config.data.seq_len)
  d = frontier_tokens(counts["total"]) if tokens is None else tokens
  hw = HARDWARE[hw_name]
  tps = days = None
  if hw.peak_flops:
    tps = estimated_mfu(counts["total"], config.model.remat) * hw.peak_flops / fpt
    days = d / (tps * hw.devices) / 86400
  return Row(size_name, hw_name, hw.devices, counts["non_embedding"], counts["total"], fpt, d,
             fpt * d, tps, days)


def build(size: str, hw: str | None = None, tokens: float | None = None, seq_len: int = SEQ_LEN,
          batch: int | None = None, sde: bool = True, vocab: dict | None = None):
  """The config of one ladder point: shape, mesh, physical batch, token horizon (D*(N) default)."""
  if size not in SIZES:
    raise ValueError(f"unknown size {size!r}; choose from {list(SIZES)}")
  s = SIZES[size]
  hw = hw or s.hw
  if hw not in HARDWARE:
    raise ValueError(f"unknown hw {hw!r}; choose from {list(HARDWARE)}")
  c = get_base_config()
  c.vocab.update(vocab or VOCAB)
  apply_size(c, s)
  apply_mesh(c, HARDWARE[hw])
  c.data.seq_len = seq_len
  c.data.global_batch = batch or s.batch
  if seq_len >= 2 * MAX_PAIR_TOKENS:
    c.data.pack_pairs = True
    c.data.max_segments = max(c.data.max_segments, seq_len // 64)
  if tokens is None:
    tokens = frontier_tokens(flops_lib.param_counts(c.model, vocab_padded(c))["total"])
  c.train.tokens = float(round(tokens))
  c.sde.enabled = sde
  c.train.log_every = 50
  c.train.eval_every = 2000
  c.train.ckpt_every = 1000
  return c


def table(seq_len: int = SEQ_LEN) -> list[Row]:
  return [describe(build(name, seq_len=seq_len), name, SIZES[name].hw) for name in ORDER]


def _si(x: float) -> str:
  for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
    if abs(x) >= scale:
      return f"{x / scale:.3g}{unit}"
  return f"{x:.3g}"


def format_table(rows: list[Row]) -> str:
  head = ("| size | d_model | layers | heads/kv | d_ff | non-emb N | total N | FLOPs/token | "
          "D*(N) | D/N | C = FLOPs/token x D | hw | tokens/s/device (est.) | days (est.) |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    s = SIZES[r.size]
    tps = "-" if r.tokens_per_s_device is None else f"{r.tokens_per_s_device:,.0f}"
    days = "-" if r.days is None else f"{r.days:.1f}"
    lines.append(f"| {r.size} | {s.d_model} | {s.n_layers} | {s.n_heads}/{s.n_kv_heads} | {s.d_ff} | "
                 f"{_si(r.non_embedding)} | {_si(r.total)} | {r.flops_per_token:.3g} | "
                 f"{_si(r.tokens)} | {r.tokens_per_param:.0f} | {r.compute:.3g} | {r.hw} | {tps} | "
                 f"{days} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seq_len", type=int, default=SEQ_LEN)
  args = p.parse_args(argv)
  print(f"seq_len {args.seq_len}; vocabulary {VOCAB} (padded "
        f"{VocabLayout(**VOCAB).padded_size()}); CompleteP base {BASE_WIDTH}x{BASE_DEPTH}; "
        f"D*(N) = {FRONTIER_COEF:g} N^{FRONTIER_EXP} with N = total parameters; "
        "throughput and days are estimates (MFU 20-40%, x0.75 with remat)")
  print(format_table(table(args.seq_len)))


if __name__ == "__main__":
  main()
