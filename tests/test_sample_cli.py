"""The sampler on the model and the pieces of `python -m tmdiff.sample` (prompts, PNG, errors)."""
import json

import jax
import numpy as np
import pytest

from tmdiff.configs.base import get_base_config
from tmdiff.data import vocab as vocab_lib
from tmdiff.diffusion import sampling

LAYOUT = vocab_lib.VocabLayout(text_size=6, image_size=4, audio_size=4)
MASK = LAYOUT.mask


class _CharTokenizer:
  """Stand-in text tokenizer: one id per character (ids local to the text range)."""

  def encode(self, text):
    return np.array([ord(ch) % 6 for ch in text], np.int32)


def test_model_sampling_on_one_device_and_a_data_mesh_of_eight():
  import contextlib

  import flax.linen as nn
  from flax import nnx

  from tmdiff.diffusion import prompts
  from tmdiff.model.transformer import Transformer
  from tmdiff.train import restore
  from tmdiff.train.trainer import Trainer, make_mesh
  c = get_base_config()
  c.model.d_model, c.model.n_layers, c.model.d_ff, c.model.base_width = 32, 1, 64, 32
  c.model.n_heads, c.model.n_kv_heads, c.model.head_dim = 2, 2, 16
  c.model.dtype = "float32"
  c.vocab.text_size, c.vocab.image_size, c.vocab.audio_size = 64, 32, 32
  layout = vocab_lib.VocabLayout.from_config(c.vocab)
  prompt = prompts.build_prompt("t2i", "ab", layout, _CharTokenizer(), length=0,
                                image_tokens=8, audio_tokens=0)
  rows = 8
  inputs = {"tokens": np.tile(prompt.tokens, (rows, 1)),
            "positions": np.tile(np.arange(len(prompt.tokens), dtype=np.int32), (rows, 1)),
            "segment_ids": np.ones((rows, len(prompt.tokens)), np.int32),
            "modality": np.tile(prompt.modality, (rows, 1)),
            "cond_mask": np.tile(prompt.cond_mask, (rows, 1))}
  settings = sampling.SamplerSettings(method="maskgit", steps=4, schedule="cosine", cfg_scale=2.0)
  # Eager initialisation (cheaper than compiling the train state's init for a test).
  host_params = nnx.to_pure_dict(nnx.state(Transformer(c.model, layout, rngs=nnx.Rngs(0))))
  outs = []
  for n_devices in (1, 8):
    trainer = Trainer(c, make_mesh(c, jax.devices()[:n_devices]))
    params = jax.device_put(host_params, trainer.state_sharding["params"])
    batch = {k: jax.device_put(v, trainer.batch_sharding) for k, v in inputs.items()}
    with contextlib.ExitStack() as stack:
      stack.enter_context(jax.set_mesh(trainer.mesh))
      stack.enter_context(nn.logical_axis_rules(trainer.rules))
      outs.append(np.asarray(sampling.sample(
          restore.model_denoiser(trainer.graphdef), batch, jax.random.key(1, impl="rbg"),
          settings, mask_id=layout.mask, params=params,
          logit_bias=sampling.logit_bias(layout, strict=True))))
  out = outs[0]
  given = inputs["tokens"] != layout.mask
  np.testing.assert_array_equal(out[given], inputs["tokens"][given])
  image = out[:, prompt.target]
  assert np.all((image >= layout.image_range[0]) & (image < layout.image_range[1]))
  np.testing.assert_array_equal(outs[0], outs[1])


def test_prompt_layouts_follow_the_training_pipeline():
  from tmdiff.data import pipeline
  from tmdiff.diffusion import prompts
  tok = _CharTokenizer()
  caption = LAYOUT.to_unified(tok.encode("abc"), vocab_lib.TEXT)
  for task, modality, n in (("t2i", vocab_lib.IMAGE, 5), ("t2s", vocab_lib.AUDIO, 6)):
    p = prompts.build_prompt(task, "abc", LAYOUT, tok, length=0, image_tokens=5,
                             audio_tokens=6)
    start = LAYOUT.range_of(modality)[0]
    ref = pipeline.pair_example(caption, np.full(n, start), modality, LAYOUT)
    expected = np.where(ref["modality"] == modality, MASK, ref["tokens"])
    np.testing.assert_array_equal(p.tokens, expected)
    np.testing.assert_array_equal(p.modality, ref["modality"])
    np.testing.assert_array_equal(p.cond_mask, ref["cond_mask"])
    assert np.all(p.tokens[p.target] == MASK) and p.target.stop - p.target.start == n
  p = prompts.build_prompt("infill", "ab____c", LAYOUT, tok, length=0, image_tokens=0,
                           audio_tokens=0, infill_tokens=3)
  assert list(p.tokens[[0, -1]]) == [LAYOUT.bos, LAYOUT.eos]
  assert (p.tokens == MASK).sum() == 3 and list(p.tokens[3:6]) == [MASK] * 3
  p = prompts.build_prompt("text", "ab", LAYOUT, tok, length=10, image_tokens=0,
                           audio_tokens=0)
  assert len(p.tokens) == 10 and (p.tokens == MASK).sum() == 7
  with pytest.raises(prompts.SampleError, match="unknown task"):
    prompts.build_prompt("video", "x", LAYOUT, tok, length=8, image_tokens=0, audio_tokens=0)
  with pytest.raises(prompts.SampleError, match="placeholder"):
    prompts.build_prompt("infill", "no gap", LAYOUT, tok, length=8, image_tokens=0,
                         audio_tokens=0)


def test_png_writer_round_trips(tmp_path):
  import struct
  import zlib

  from tmdiff.data.tokenizers import image as image_lib
  image = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.uint8)
  path = str(tmp_path / "x.png")
  image_lib.write_png(path, image)
  data = open(path, "rb").read()
  assert data[:8] == b"\x89PNG\r\n\x1a\n"
  width, height = struct.unpack(">II", data[16:24])
  assert (width, height) == (7, 5)
  idat = data.index(b"IDAT")
  length = struct.unpack(">I", data[idat - 4:idat])[0]
  raw = zlib.decompress(data[idat + 4:idat + 4 + length])
  rows = np.frombuffer(raw, np.uint8).reshape(5, 1 + 7 * 3)
  assert np.all(rows[:, 0] == 0)
  np.testing.assert_array_equal(rows[:, 1:].reshape(5, 7, 3), image)
  grid = image_lib.image_grid(np.stack([image] * 3), scale=2)
  assert grid.shape == (2 * 10 + 2, 2 * 14 + 2, 3)


def test_cli_errors_name_the_problem(tmp_path):
  from tmdiff import sample as sample_cli
  from tmdiff.train import checkpoint, restore
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint directory"):
    sample_cli.run(str(tmp_path / "nothing"), "t2i", "a", str(tmp_path / "a.png"))
  with pytest.raises(sample_cli.SampleError, match="unknown task"):
    sample_cli.run(str(tmp_path), "video", "a", str(tmp_path / "a.mp4"))
  with pytest.raises(sample_cli.SampleError, match=r"writes \.wav"):
    sample_cli.run(str(tmp_path), "t2s", "a", str(tmp_path / "a.png"))
  config = get_base_config()
  config.data.data_dir = "no/such/dir"
  with pytest.raises(sample_cli.SampleError, match="no prepared data directory"):
    restore.resolve_data_dir(config, str(tmp_path / "runs" / "x"))
  saved = json.loads(config.to_json())
  del saved["sampling"]
  saved["model"]["d_model"] = 48
  saved["cfg_window_legacy"] = 1
  rebuilt = restore.config_from_saved(saved)
  assert rebuilt.model.d_model == 48 and rebuilt.sampling.image.steps == 64
