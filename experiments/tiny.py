"""Tiny tri-modal model for CPU runs and tests (about 1M parameters).

  python -m tmdiff.train --config=experiments/tiny.py --workdir=runs/tiny          # synthetic
  python -m tmdiff.train --config=experiments/tiny.py:runs/data --workdir=runs/tiny  # prepared

Argument: 'synthetic' (default; in-memory data, no prepare step) or a directory written by
`python -m tmdiff.data.prepare`, whose manifest sets the vocabulary sizes.
Expected: ~14k tokens/s on 2 CPU cores; 1200 steps x 16 x 128 = 2.5M tokens (~3 min).
"""
from experiments import data_vocab

from tmdiff.configs.base import get_base_config


def get_config(arg: str = "synthetic"):
  c = get_base_config()
  if arg and arg != "synthetic":
    c.data.source = "prepared"
    c.data.data_dir = arg
    c.vocab.update(data_vocab(arg) or {})
  c.model.d_model = 128
  c.model.n_layers = 2
  c.model.n_heads = 4
  c.model.n_kv_heads = 2
  c.model.head_dim = 32
  c.model.d_ff = 384
  c.data.seq_len = 128
  c.data.global_batch = 16
  c.train.steps = 1200
  c.train.log_every = 25
  c.train.ckpt_every = 400
  c.train.eval_every = 400
  return c
