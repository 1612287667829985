"""Model-level invariants: packing is exact, the batch contract is enforced."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tmdiff.configs.base import get_base_config
from tmdiff.data import batch as batch_lib
from tmdiff.data.vocab import VocabLayout
from tmdiff.model.transformer import Transformer


def _model(dtype="float32"):
  c = get_base_config()
  c.model.dtype = dtype
  c.vocab.text_size, c.vocab.image_size, c.vocab.audio_size = 64, 32, 32
  layout = VocabLayout.from_config(c.vocab)
  return Transformer(c.model, layout, rngs=nnx.Rngs(0)), layout


def test_packed_row_equals_documents_alone():
  model, layout = _model()
  rng = np.random.default_rng(0)
  lengths = (7, 12, 5)
  docs = [rng.integers(layout.text_range[0], layout.text_range[1], n) for n in lengths]
  mods = [rng.integers(0, 3, n) for n in lengths]
  total = 32
  tokens = np.full(total, layout.pad)
  seg, pos, mod = np.zeros(total, int), np.zeros(total, int), np.zeros(total, int)
  start = 0
  for i, (d, m) in enumerate(zip(docs, mods)):
    tokens[start:start + len(d)] = d
    seg[start:start + len(d)], pos[start:start + len(d)] = i + 1, np.arange(len(d))
    mod[start:start + len(d)] = m
    start += len(d)
  packed = model(*(jnp.asarray(x)[None] for x in (tokens, pos, seg, mod)))
  assert np.all(np.isfinite(np.asarray(packed)))  # padding rows included
  start = 0
  for d, m in zip(docs, mods):
    n = len(d)
    alone = model(jnp.asarray(d)[None], jnp.arange(n)[None], jnp.ones((1, n), jnp.int32),
                  jnp.asarray(m)[None])
    np.testing.assert_allclose(packed[0, start:start + n], alone[0], rtol=2e-5, atol=2e-5)
    start += n


def test_output_is_invariant_to_the_document_offset():
  """RoPE positions restart per segment: the same document later in a row gives the same output."""
  model, layout = _model()
  doc = jnp.arange(layout.text_range[0], layout.text_range[0] + 6)[None]
  ones = jnp.ones((1, 6), jnp.int32)
  first = model(doc, jnp.arange(6)[None], ones, 0 * ones)
  filler = jnp.full((1, 4), layout.text_range[0])
  row = jnp.concatenate([filler, doc], axis=1)
  seg = jnp.concatenate([jnp.ones((1, 4), jnp.int32), 2 * ones], axis=1)
  pos = jnp.concatenate([jnp.arange(4)[None], jnp.arange(6)[None]], axis=1)
  later = model(row, pos, seg, 0 * seg)
  np.testing.assert_allclose(later[0, 4:], first[0], rtol=2e-5, atol=2e-5)


def _good_batch(layout, b=2, l=8):
  return {"tokens": np.full((b, l), layout.text_range[0], np.int32),
          "segment_ids": np.ones((b, l), np.int32),
          "positions": np.tile(np.arange(l, dtype=np.int32), (b, 1)),
          "modality": np.zeros((b, l), np.int32), "loss_mask": np.ones((b, l), np.int32),
          "cond_mask": np.zeros((b, l), np.int32)}


@pytest.mark.parametrize("mutate, match", [
    (lambda b, lay: b.pop("cond_mask"), "missing \\['cond_mask'\\]"),
    (lambda b, lay: b.__setitem__("positions", b["positions"][:, :4]), "positions.*shape"),
    (lambda b, lay: b["segment_ids"].__setitem__((0, 7), 0), "loss_mask is set on padding"),
    (lambda b, lay: b["tokens"].__setitem__((0, 0), lay.size + 3), "outside the vocabulary"),
    (lambda b, lay: b["modality"].__setitem__((1, 2), 1), "marked image is outside"),
    (lambda b, lay: b["positions"].__setitem__((0, 0), 3), "restart at 0"),
    (lambda b, lay: b.__setitem__("tokens", b["tokens"].astype(np.float32)), "integer array"),
])
def test_batch_contract_violations_are_named(mutate, match):
  _, layout = _model()
  batch = _good_batch(layout)
  batch_lib.check_batch(batch, layout=layout)
  mutate(batch, layout)
  with pytest.raises(batch_lib.BatchError, match=match):
    batch_lib.check_batch(batch, layout=layout)
