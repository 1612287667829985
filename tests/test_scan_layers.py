"""Scanned layers (model.scan_layers): the same function as the unrolled blocks, stacked
parameters with a "layers" axis, remat policies that change memory only, and checkpoints that
move between the two layouts and between meshes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.test_train import read_losses, tiny_config
from tmdiff.data import pipeline
from tmdiff.data.vocab import VocabLayout
from tmdiff.model import transformer
from tmdiff.train import checkpoint as ckpt_lib
from tmdiff.train import loop
from tmdiff.train.trainer import Trainer, make_mesh


def _scanned(**overrides):
  return tiny_config(**{"model.scan_layers": True, **overrides})


def _model_and_inputs(config):
  layout = VocabLayout.from_config(config.vocab)
  model = transformer.Transformer(config.model, layout, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  b, length = 2, 16
  tokens = rng.integers(layout.text_range[0], layout.text_range[1], (b, length))
  segments = np.repeat(np.array([[1] * 10 + [2] * 6]), b, axis=0)
  positions = np.concatenate([np.arange(10), np.arange(6)])[None].repeat(b, axis=0)
  modality = np.zeros((b, length), np.int32)
  weights = rng.normal(size=(b, length, config.model.d_model)).astype(np.float32)
  return model, [jnp.asarray(x) for x in (tokens, positions, segments, modality)], weights


def _loss_and_grads(config, params):
  """A scalar of the residual stream and its gradient, for given pure-dict params."""
  model, inputs, weights = _model_and_inputs(config)
  graphdef, state = nnx.split(model)
  nnx.replace_by_pure_dict(state, params)

  def loss(p):
    nnx.replace_by_pure_dict(state, p)
    return jnp.sum(nnx.merge(graphdef, state).residual_stream(*inputs) * weights)
  return jax.value_and_grad(loss)(params)


def _unrolled_params():
  model, _, _ = _model_and_inputs(tiny_config())
  return nnx.to_pure_dict(nnx.state(model))


def test_scanned_parameters_are_stacked_on_a_layers_axis():
  c = _scanned()
  model, _, _ = _model_and_inputs(c)
  state = nnx.state(model)
  n = c.model.n_layers
  blocks = nnx.to_pure_dict(state)["blocks"]
  for leaf in jax.tree.leaves(blocks):
    assert leaf.shape[0] == n
  axes = jax.tree.leaves(jax.tree.map(lambda v: v.get_metadata()["logical_axes"],
                                      state["blocks"], is_leaf=lambda v: isinstance(v, nnx.Variable)),
                         is_leaf=lambda x: isinstance(x, tuple))
  assert axes and all(a[0] == transformer.LAYER_AXIS for a in axes)
  # Layers get their own init keys: no two layers start equal.
  w = max(jax.tree.leaves(blocks), key=jnp.size)
  assert not np.allclose(w[0], w[1])
  # The sharding of a stacked weight keeps the leading axis whole.
  trainer = Trainer(c, make_mesh(c, jax.devices()[:2]))
  for s in jax.tree.leaves(trainer.param_sharding["blocks"],
                           is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding)):
    assert s.spec[0] is None


def test_stack_and_unstack_are_inverse_and_match_the_scanned_shapes():
  unrolled = _unrolled_params()
  scanned_model, _, _ = _model_and_inputs(_scanned())
  scanned_shapes = jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(scanned_model)))
  stacked = transformer.stack_layers(unrolled)
  assert jax.tree.map(jnp.shape, stacked) == scanned_shapes
  assert transformer.layer_layout(stacked) == "scanned"
  assert transformer.layer_layout(unrolled) == "unrolled"
  back = transformer.unstack_layers(stacked)
  jax.tree.map(np.testing.assert_array_equal, back, unrolled)


@pytest.mark.parametrize("remat", transformer.REMAT)
def test_scanned_blocks_compute_the_unrolled_function_and_gradient(remat):
  unrolled = _unrolled_params()
  reference, ref_grads = _loss_and_grads(tiny_config(), unrolled)
  value, grads = _loss_and_grads(_scanned(**{"model.remat": remat}), transformer.stack_layers(unrolled))
  np.testing.assert_allclose(value, reference, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               transformer.unstack_layers(grads), ref_grads)
  # Unrolled with the same policy: remat changes what is kept, never the result.
  value, grads = _loss_and_grads(tiny_config(**{"model.remat": remat}), unrolled)
  np.testing.assert_allclose(value, reference, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads,
               ref_grads)


def test_train_steps_match_across_layouts():
  devices = jax.devices()[:2]
  c = tiny_config()
  unrolled = Trainer(c, make_mesh(c, devices))
  state = jax.device_get(unrolled.init_state())
  scanned = Trainer(_scanned(**{"model.remat": "dots"}), make_mesh(c, devices))
  batch = next(iter(pipeline.make_dataset(c, "train")))
  runs = []
  for trainer, start in ((unrolled, state), (scanned, transformer.stack_layers(state))):
    s, step, history = jax.device_put(start, trainer.state_sharding), trainer.compile_train_step(), []
    for _ in range(2):
      s, metrics = step(s, trainer.put_batch(batch))
      history.append([float(metrics["loss"]), float(metrics["grad_norm"])])
    runs.append(history)
  np.testing.assert_allclose(runs[1], runs[0], rtol=1e-5)


@pytest.mark.parametrize("save_scanned", [False, True])
def test_a_checkpoint_resumes_in_the_other_layout(tmp_path, save_scanned):
  """Saved in one layout at step 3, resumed in the other: steps 4-6 as an uninterrupted run."""
  devices = jax.devices()[:2]
  saver = _scanned() if save_scanned else tiny_config()
  resumer = tiny_config() if save_scanned else _scanned()
  loop.train(saver, str(tmp_path / "straight"), devices=devices)
  loop.train(saver, str(tmp_path / "moved"), devices=devices, stop_after=3)
  loop.train(resumer, str(tmp_path / "moved"), devices=devices)
  straight, moved = read_losses(tmp_path / "straight"), read_losses(tmp_path / "moved")
  np.testing.assert_allclose([moved[s] for s in (4, 5, 6)], [straight[s] for s in (4, 5, 6)],
                             rtol=1e-5)


def test_parameters_restore_across_layout_and_mesh(tmp_path):
  """Unrolled on a 2x2x2 mesh -> scanned on 4-way fsdp, and back, with the same eval loss."""
  saved = tiny_config(**{"train.steps": 3, "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  final = loop.train(saved, str(tmp_path))
  for config, devices in ((_scanned(**{"mesh.fsdp": 4, "mesh.data": 1}), jax.devices()[:4]),
                          (tiny_config(), jax.devices()[:1])):
    trainer = Trainer(config, make_mesh(config, devices))
    _, params = ckpt_lib.restore_params(str(tmp_path), trainer.abstract_state["params"])
    assert transformer.layer_layout(params) == ("scanned" if config.model.scan_layers
                                                else "unrolled")
    for leaf, want in zip(jax.tree.leaves(params), jax.tree.leaves(trainer.param_sharding)):
      assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
    loss = loop.evaluate(trainer, trainer.compile_eval_step(config.data.global_batch), params,
                         config)["loss"]
    assert loss == pytest.approx(final["loss"], rel=2e-5)
