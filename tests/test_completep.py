"""CompleteP: activation and update sizes stay O(1) as width and depth grow (coordinate check).

Each check has a control with the scaling switched off (standard parameterisation), which
must drift: the test can fail.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tmdiff.configs.base import get_base_config
from tmdiff.model.completep import CompleteP, HIDDEN
from tmdiff.train.trainer import Trainer, make_mesh

STEPS = 3


def _config(width, depth, base_width, base_depth):
  c = get_base_config()
  m = c.model
  m.d_model, m.n_layers, m.d_ff = width, depth, 2 * width
  m.n_heads = m.n_kv_heads = width // 16
  m.head_dim = 16
  m.base_width, m.base_depth = base_width, base_depth
  m.dtype = "float32"
  c.vocab.text_size, c.vocab.image_size, c.vocab.audio_size = 64, 32, 32
  c.data.seq_len, c.data.global_batch = 32, 4
  c.optim.lr, c.optim.warmup_frac, c.optim.schedule, c.optim.clip_norm = 1e-2, 0.0, "constant", 0.0
  c.train.steps = STEPS
  c.diffusion.time_sampling = "iid"
  return c


def _batch(c):
  rng = np.random.default_rng(0)
  b, l = c.data.global_batch, c.data.seq_len
  start = 11  # first text id
  return {"tokens": rng.integers(start, start + 64, (b, l)).astype(np.int32),
          "segment_ids": np.ones((b, l), np.int32),
          "positions": np.tile(np.arange(l, dtype=np.int32), (b, 1)),
          "modality": np.zeros((b, l), np.int32), "loss_mask": np.ones((b, l), np.int32),
          "cond_mask": np.zeros((b, l), np.int32)}


@functools.lru_cache(maxsize=None)
def _activation_sizes(width, depth, base_width, base_depth):
  """RMS of the residual stream and logits at init, and of their change after STEPS steps."""
  c = _config(width, depth, base_width, base_depth)
  trainer = Trainer(c, make_mesh(c, jax.devices()[:1]))
  batch = _batch(c)
  state = trainer.init_state()
  step = jax.jit(trainer._train_step)

  @jax.jit
  def forward(params):
    model = nnx.merge(trainer.graphdef, params)
    args = (batch["tokens"], batch["positions"], batch["segment_ids"], batch["modality"])
    h = model.residual_stream(*args)
    return h, model.logits(model.final_norm(h))
  rms = lambda x: float(jnp.sqrt(jnp.mean(jnp.square(x))))
  h0, z0 = forward(state["params"])
  with trainer._context():
    for _ in range(STEPS):
      state, _ = step(state, trainer.put_batch(batch))
  h1, z1 = forward(state["params"])
  return {"h": rms(h0), "dh": rms(h1 - h0), "dz": rms(z1 - z0)}


def _spread(values):
  return max(values) / min(values)


def test_width_transfer():
  widths = (64, 256)
  completep = [_activation_sizes(w, 2, 64, 2) for w in widths]
  standard = [_activation_sizes(w, 2, w, 2) for w in widths]
  for key in ("h", "dh", "dz"):
    assert _spread([s[key] for s in completep]) < 1.6, (key, completep)
  # Standard parameterisation: the residual-stream update grows with width.
  assert standard[-1]["dh"] / standard[0]["dh"] > 4, standard


def test_depth_transfer():
  depths = (2, 8)
  completep = [_activation_sizes(64, d, 64, 2) for d in depths]
  standard = [_activation_sizes(64, d, 64, d) for d in depths]
  for key in ("h", "dh", "dz"):
    assert _spread([s[key] for s in completep]) < 1.6, (key, completep)
  assert standard[-1]["dh"] / standard[0]["dh"] > 2.5, standard


def test_multipliers_follow_the_rules():
  cp = CompleteP(width=512, depth=16, base_width=128, base_depth=4, init_std=0.02, alpha=1.0)
  assert cp.residual_scale == 0.25
  assert cp.logit_scale == 0.25
  assert cp.lr_mult(HIDDEN) == 0.25
  assert cp.eps_mult(HIDDEN) == 1 / 16
  assert abs(cp.init_std_for(HIDDEN) - 0.01) < 1e-12
  half = CompleteP(width=128, depth=16, base_width=128, base_depth=4, alpha=0.5)
  assert half.residual_scale == 0.5 and half.lr_mult(HIDDEN) == 0.5
