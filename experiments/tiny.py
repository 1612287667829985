"""Tiny tri-modal model for CPU smoke runs and tests (about 1M parameters).

  python -m tmdiff.train --config=experiments/tiny.py --workdir=runs/tiny

Argument `source`: 'synthetic' (default, no prepare step) or a prepared data directory,
e.g. --config=experiments/tiny.py:runs/data.
"""
from tmdiff.configs.base import get_base_config


def get_config(arg: str = "synthetic"):
  c = get_base_config()
  if arg and arg != "synthetic":
    c.data.source = "prepared"
    c.data.data_dir = arg
  c.model.d_model = 128
  c.model.n_layers = 2
  c.model.n_heads = 4
  c.model.n_kv_heads = 2
  c.model.head_dim = 32
  c.model.d_ff = 384
  c.data.seq_len = 128
  c.data.global_batch = 16
  c.train.steps = 200
  c.train.log_every = 20
  c.train.ckpt_every = 100
  return c
