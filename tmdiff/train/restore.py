"""A checkpoint restored for inference (sampling, eval, the sampler sweep).

  config, tuned = load_config(workdir, step)   # adjust config here (dtype, data dir) if needed
  run = restore(workdir, step=step, config=config, devices=devices)

The model is rebuilt from the config saved with the checkpoint, laid over the base config (so a
checkpoint that predates a key, e.g. `sampling`, gets its default), with the per-modality
sampler settings of `<workdir>/sampling_defaults.json` when `python -m tmdiff.eval.sweep` wrote
one, on a data-parallel mesh of `devices` (all local devices by default).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

from absl import logging

from tmdiff.data import vocab as vocab_lib
from tmdiff.diffusion.prompts import SampleError
from tmdiff.train import checkpoint
from tmdiff.train.trainer import Trainer, make_mesh

SAMPLING_DEFAULTS_FILE = "sampling_defaults.json"


def config_from_saved(saved: dict):
  """The base config updated with a checkpoint's saved config (keys the base lacks are
  skipped with a warning; keys the saved one lacks, e.g. `sampling`, keep base defaults)."""
  from tmdiff.configs.base import get_base_config
  config = get_base_config()

  def merge(target, values, prefix):
    for key, value in values.items():
      name = f"{prefix}{key}"
      if key not in target:
        logging.warning("saved config key %s is not in the base config; ignored", name)
      elif isinstance(value, dict):
        merge(target[key], value, name + ".")
      else:
        if isinstance(target[key], tuple) and isinstance(value, list):
          value = tuple(value)
        target[key] = value
  merge(config, saved, "")
  return config


def apply_sampling_defaults(config, workdir: str) -> dict:
  """Applies `workdir/sampling_defaults.json` ({modality: {setting: value}}, written by
  `python -m tmdiff.eval.sweep`) to config.sampling; returns what it applied ({} if absent)."""
  from tmdiff.diffusion import sampling
  path = os.path.join(workdir, SAMPLING_DEFAULTS_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    tuned = json.load(f)
  for modality, values in tuned.items():
    if modality not in config.sampling or not isinstance(values, dict):
      raise SampleError(f"{path}: {modality!r} is not a sampling modality "
                        f"{tuple(config.sampling)}")
    for key, value in values.items():
      if key not in sampling.FIELDS:
        raise SampleError(f"{path}: {modality}.{key} is not a sampler setting {sampling.FIELDS}")
      config.sampling[modality][key] = tuple(value) if isinstance(value, list) else value
    sampling.settings_from_config(config, modality)  # validates the result
  logging.info("sampling defaults from %s: %s", path, tuned)
  return tuned


def resolve_data_dir(config, workdir: str, override: str | None = None) -> str:
  """The data dir with a manifest: `override`, else config.data.data_dir as given, relative to
  the current directory, or relative to any parent of the workdir (runs are often launched
  from the directory above `runs/`)."""
  from tmdiff.data import records
  if override:
    candidates = [override]
  else:
    given = config.data.data_dir
    if not given:
      raise SampleError("the checkpoint's config has no data.data_dir (synthetic data has no "
                        "tokenizers); pass --data_dir=<prepared data dir>")
    candidates = [given]
    if not os.path.isabs(given):
      parent = os.path.dirname(os.path.abspath(workdir))
      while True:
        candidates.append(os.path.join(parent, given))
        if os.path.dirname(parent) == parent:
          break
        parent = os.path.dirname(parent)
  for directory in candidates:
    if os.path.exists(os.path.join(directory, records.MANIFEST)):
      return os.path.abspath(directory)
  raise SampleError(f"no prepared data directory (with {records.MANIFEST}) found; tried "
                    f"{candidates}; pass --data_dir")


def load_config(workdir: str, step: int | None = None):
  """-> (the checkpoint's config for inference on a data-parallel mesh, the sampling defaults
  it took from the workdir)."""
  config = config_from_saved(checkpoint.read_config(workdir, step))
  tuned = apply_sampling_defaults(config, workdir)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = -1, 1, 1
  return config, tuned


@dataclasses.dataclass
class Restored:
  workdir: str
  step: int
  config: object
  trainer: Trainer
  params: object

  @property
  def mesh(self):
    return self.trainer.mesh

  @functools.cached_property
  def layout(self) -> vocab_lib.VocabLayout:
    return vocab_lib.VocabLayout.from_config(self.config.vocab)


def restore(workdir: str, *, step: int | None = None, config=None, devices=None) -> Restored:
  """The checkpoint's parameters under `config` (default: `load_config(workdir, step)`'s)."""
  if config is None:
    config, _ = load_config(workdir, step)
  trainer = Trainer(config, make_mesh(config, devices))
  restored_step, params = checkpoint.restore_params(workdir, trainer.abstract_state["params"],
                                                    step=step)
  return Restored(workdir, int(restored_step), config, trainer, params)


_DENOISERS = {}


def model_denoiser(graphdef):
  """(params, tokens, positions, segment_ids, modality) -> float32 logits, for sampling.sample;
  one function object per model graph (the sampler's jit cache keys on it), so restoring the
  same model again reuses its compiled samplers."""
  if graphdef not in _DENOISERS:
    from flax import nnx

    def denoise(params, tokens, positions, segment_ids, modality):
      model = nnx.merge(graphdef, params)
      return model.logits(model(tokens, positions, segment_ids, modality))
    _DENOISERS[graphdef] = denoise
  return _DENOISERS[graphdef]
