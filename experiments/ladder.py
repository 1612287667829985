"""The size ladder: one scaling point per `size`, CompleteP base 128 x 2 shared by all sizes.

  python -m tmdiff.train --config=experiments/ladder.py:size=m --workdir=runs/ladder_m
  python -m tmdiff.train --config=experiments/ladder.py:size=3b,hw=h100x64 --workdir=gs://.../3b
  python -m tmdiff.train --config=experiments/ladder.py:size=3b,hw=h100x256,tokens=6.4e12 ...
  python -m tmdiff.scaling.ladder   # the table below, recomputed

Argument: comma-separated key=value, all optional:
  size    xxs | xs | s | m | l | xl | 2xl | 1b | 3b | 8b   (default xs)
  hw      target hardware, sets the mesh (fsdp in a host, data across hosts): cpu, h100xN,
          h200xN (N in 1, 8, 16, 32, 64, 128, 256), v5p-N (N/2 chips); default per size
  tokens  token horizon D: a number (6.4e12) or a multiple of D*(N) ('2x'); default D*(N) =
          7754 N^0.84 with N the total parameter count (the paper's compute-optimal frontier)
  batch   physical batch in sequences (default per size); seq: sequence length (default 2048)
  sde     1 (default) | 0: SDE batch-size reparameterisation of lr/betas/eps from the base point
  data    a directory written by `python -m tmdiff.data.prepare` (default: synthetic data)

From seq 256 on (two pairs of up to 128 tokens a row) pairs are packed, several a row
(data.pack_pairs, max_segments = seq // 64); `--config.data.pack_pairs=False` restores the
paper's layout, one pair per row, padded.

Ladder at seq_len 2048, vocabulary 34,048 (32k text + 1k image + 1k audio, padded). Tokens/s/device
are ESTIMATES (MFU 20% below 100M, 33% to 300M, 40% above, x0.75 with block remat; anchored on
the H200 train-step measurements in docs/benchmarks.md: 169M at 33%, 937M at 39.9%), not measured
for these shapes.

| size | d/layers | heads/kv | non-emb N | total N | D*(N) | hw | tokens/s/device (est.) |
|---|---|---|---|---|---|---|---|
| xxs | 128/2 | 4/2 | 394k | 9.11M | 5.44B | h100x1 | ~5.7M |
| xs | 256/4 | 4/2 | 2.95M | 20.4M | 10.7B | h100x1 | ~2.1M |
| s | 384/6 | 6/2 | 9.44M | 35.6M | 17.1B | h100x1 | ~1.0M |
| m | 512/8 | 4/2 | 23.6M | 58.5M | 25.9B | h100x1 | ~570k |
| l | 768/12 | 6/2 | 75.5M | 128M | 50B | h100x8 | ~390k |
| xl | 1024/16 | 8/4 | 189M | 259M | 90.4B | h100x8 | ~187k |
| 2xl | 1536/20 | 12/4 | 503M | 608M | 185B | h100x8 | ~97k |
| 1b | 2048/22 | 16/4 | 992M | 1.13B | 312B | h100x32 | ~40k |
| 3b | 3072/30 | 24/8 | 3.02B | 3.23B | 754B | h100x64 | ~14k |
| 8b | 4096/36 | 32/8 | 7.85B | 8.13B | 1.64T | h100x256 | ~5.8k |
"""
from experiments import data_vocab, key_values

from tmdiff.scaling import ladder

KEYS = ("size", "hw", "tokens", "batch", "seq", "sde", "data")


def parse_arg(arg: str) -> dict:
  return key_values(arg, KEYS, "experiments/ladder.py")


def get_config(arg: str = ""):
  a = parse_arg(arg)
  size = a.get("size", "xs")
  seq = int(a.get("seq", ladder.SEQ_LEN))
  vocab = data_vocab(a["data"]) if "data" in a else None
  tokens = a.get("tokens")
  if tokens and tokens.endswith("x"):  # a multiple of D*(N)
    c = ladder.build(size, a.get("hw"), seq_len=seq, vocab=vocab)
    tokens = float(tokens[:-1]) * c.train.tokens
  c = ladder.build(size, a.get("hw"), tokens=None if tokens is None else float(tokens),
                   seq_len=seq, batch=int(a["batch"]) if "batch" in a else None,
                   sde=a.get("sde", "1") not in ("0", "false", "False"), vocab=vocab)
  if "data" in a:
    c.data.source, c.data.data_dir = "prepared", a["data"]
  return c
