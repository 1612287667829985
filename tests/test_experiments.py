"""Every experiment file loads and validates; ablation variants change what they say they change."""
import glob
import math
import os

import pytest

from tmdiff.configs import validate as validate_lib
from tmdiff.configs.derived import derive
from tmdiff.scaling import ladder
from tmdiff.scaling import sweep as sweep_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(os.path.relpath(p, ROOT)
               for p in glob.glob(os.path.join(ROOT, "experiments", "**", "*.py"), recursive=True)
               if os.path.basename(p) != "__init__.py")
CONFIG_FILES = [f for f in FILES if hasattr(sweep_lib.load_module(f), "get_config")]
SWEEP_FILES = [f for f in FILES if hasattr(sweep_lib.load_module(f), "get_sweep")]
ABLATIONS = [f for f in CONFIG_FILES if f.startswith(os.path.join("experiments", "ablations"))]


def devices_of(hw: str) -> int:
  return ladder.HARDWARE[hw].devices if hw in ladder.HARDWARE else 1


def test_every_file_is_an_experiment_or_a_sweep():
  assert len(FILES) >= 9, FILES
  assert sorted(set(CONFIG_FILES) | set(SWEEP_FILES)) == FILES
  assert len(ABLATIONS) == 4 and len(SWEEP_FILES) == 3


@pytest.mark.parametrize("path", FILES)
def test_docstring_gives_the_launch_command(path):
  assert "python -m tmdiff" in (sweep_lib.load_module(path).__doc__ or ""), path


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_experiment_file_default_validates(path):
  config = sweep_lib.load_config(path)
  validate_lib.validate(config, 1)  # the defaults target one device (tiny, ladder xs)


@pytest.mark.parametrize("path", ABLATIONS)
def test_every_ablation_variant_validates_on_its_target(path):
  module = sweep_lib.load_module(path)
  assert module.DEFAULT in module.VARIANTS
  for variant in module.VARIANTS:
    for arg in (variant, f"{variant},size=m,hw=h100x8"):
      config = sweep_lib.load_config(f"{path}:{arg}")
      validate_lib.validate(config, 8 if "h100x8" in arg else 1)
  with pytest.raises(ValueError, match="unknown variant"):
    sweep_lib.load_config(f"{path}:no_such_variant")


@pytest.mark.parametrize("path", SWEEP_FILES)
def test_every_sweep_run_validates_on_its_target(path):
  sweep = sweep_lib.load_sweep(path)
  resolved = sweep_lib.resolve(sweep)  # validates each run's config
  assert len(resolved) == len(sweep.runs) >= 2
  for r in resolved:
    validate_lib.validate(r.config, devices_of(r.run.hw))
    if sweep.evals_per_run:
      assert r.config.train.eval_every == math.ceil(r.steps / sweep.evals_per_run)


@pytest.mark.parametrize("ablation", ["mixing", "schedules", "anti_masking", "physical_batch"])
def test_ablation_sweeps_cover_every_variant(ablation):
  sweep = sweep_lib.load_sweep(f"experiments/sweeps/ablations.py:{ablation},size=s,hw=h100x8")
  module = sweep_lib.load_module(f"experiments/ablations/{ablation}.py")
  assert [r.name for r in sweep.runs] == list(module.VARIANTS)
  for r in sweep_lib.resolve(sweep):
    assert r.run.hw == "h100x8"
    validate_lib.validate(r.config, 8)


def _variant(name, variant, arg="size=xs"):
  return sweep_lib.load_config(f"experiments/ablations/{name}.py:{variant},{arg}")


def test_mixing_variants_set_the_weights():
  heavy = _variant("mixing", "text_heavy").data.mixture
  assert (heavy.text, heavy.image_text, heavy.audio_text) == (2, 1, 1)
  media = _variant("mixing", "media_heavy").data.mixture
  assert (media.text, media.image_text, media.audio_text) == (1, 2, 2)


def test_schedule_variants_set_each_modality():
  s = _variant("schedules", "text_linear_image_cosine_audio_polynomial").diffusion.schedule
  assert (s.text, s.image, s.audio) == ("linear", "cosine", "polynomial")
  c = _variant("schedules", "polynomial3").diffusion
  assert c.poly_exponent == 3.0 and set(c.schedule.values()) == {"polynomial"}


def test_anti_masking_is_equal_compute():
  off, on = derive(_variant("anti_masking", "off")), derive(_variant("anti_masking", "on"))
  assert (on.tokens_per_step, on.steps) == (off.tokens_per_step, off.steps)
  assert on.examples_per_step * 2 == off.examples_per_step == off.batch


def test_physical_batch_variants():
  base = _variant("physical_batch", "accum1")
  d, seq = base.train.tokens, base.data.seq_len
  for k in (2, 4, 8):  # gradient accumulation: same logical step, smaller microbatches
    c = _variant("physical_batch", f"accum{k}")
    assert c.optim.grad_accum == k and derive(c) == derive(base)
  for b in (16, 64, 256):  # SDE: kappa, lr, betas, eps and steps from the closed forms
    c = _variant("physical_batch", f"sde_b{b}")
    hp = derive(c)
    kappa = (c.sde.tokens_base / d) ** c.sde.gamma * b / c.sde.batch_base
    assert hp.kappa == pytest.approx(kappa, rel=1e-12)
    assert hp.lr == pytest.approx(c.optim.lr * math.sqrt(kappa), rel=1e-12)
    assert hp.beta2 == pytest.approx(c.optim.beta2 ** kappa, rel=1e-12)
    assert hp.eps == pytest.approx(c.optim.eps / math.sqrt(kappa), rel=1e-12)
    assert hp.steps == round(d / (seq * b)) and hp.token_horizon == int(d)
  const = derive(_variant("physical_batch", "const_b256"))
  assert (const.kappa, const.lr) == (1.0, base.optim.lr)


def test_pairs_are_packed_where_a_row_holds_two_and_padded_below():
  """Rows of seq >= 2 x the longest pair pack pairs (the ladder at 2048, and its ablations);
  shorter rows (tiny, showcase, seq 128) keep the paper's one pair per row."""
  for arg in ("size=m", "size=m,seq=256"):
    c = sweep_lib.load_module("experiments/ladder.py").get_config(arg)
    assert c.data.pack_pairs and c.data.max_segments == max(8, c.data.seq_len // 64), arg
  for path, arg in (("experiments/ladder.py", "size=m,seq=128"), ("experiments/tiny.py", ""),
                    ("experiments/showcase.py", "")):
    c = sweep_lib.load_module(path).get_config(arg) if arg else sweep_lib.load_module(
        path).get_config()
    assert not c.data.pack_pairs and c.data.seq_len < 2 * ladder.MAX_PAIR_TOKENS, path
  assert _variant("mixing", "text_heavy").data.pack_pairs
