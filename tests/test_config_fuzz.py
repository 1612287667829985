"""Bad input, fuzzed: invalid overrides of every config key, through the CLI's parser and the
validator.

Every leaf key of the base config (enumerated from it, so a new key is covered when it lands)
gets hypothesis-drawn `--config.KEY=VALUE` strings, parsed the way `tmdiff train` parses them
(absl + ml_collections' config-file flag on experiments/tiny.py, errors worded by tmdiff.entry)
and then validated. A value of the wrong type, out of range, or not among its choices, a
mistyped key and a section replaced by a dict that lacks or adds keys must each be refused with
one line naming the key; a valid value is accepted, or refused naming the key (or the other key
of a rule they share). Nothing gets past both to fail later, inside JAX.

`SPECS` says what each key accepts; a key with no entry fails `test_every_key_has_a_spec`
(booleans and free strings need none). Choice lists come from the modules that own them.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
import os
import re
import subprocess
import sys

import pytest
from absl import flags
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from ml_collections import config_flags

from experiments import tiny
from tmdiff import entry
from tmdiff.configs import sharding
from tmdiff.configs import validate as validate_lib
from tmdiff.configs.base import get_base_config
from tmdiff.configs.derived import ConfigError
from tmdiff.data import pipeline
from tmdiff.diffusion import objective, sampling, schedules
from tmdiff.kernels import attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = "experiments/tiny.py"
PROG = "tmdiff.train"
INT_MAX = 2**31 - 1
INF = math.inf
# ml_collections loads the experiment file with importlib's deprecated load_module.
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
EXAMPLES = settings(max_examples=8, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])


@dataclasses.dataclass(frozen=True)
class Range:
  """Numbers in [lo, hi] (an open end excludes it), plus `also`; ints also fit in int32."""
  lo: float = -INF
  hi: float = INF
  lo_open: bool = False
  hi_open: bool = False
  even: bool = False
  also: tuple = ()

  def ok(self, v) -> bool:
    if v in self.also:
      return True
    if isinstance(v, float) and not math.isfinite(v):
      return False
    if isinstance(v, int) and (abs(v) > INT_MAX or (self.even and v % 2)):
      return False
    return ((self.lo < v if self.lo_open else self.lo <= v)
            and (v < self.hi if self.hi_open else v <= self.hi))


@dataclasses.dataclass(frozen=True)
class Choice:
  options: tuple


@dataclasses.dataclass(frozen=True)
class Window:
  """A (t_lo, t_hi) pair of finite numbers, t_lo <= t_hi."""


@dataclasses.dataclass(frozen=True)
class AnyString:
  pass


def positive(**kw):
  return Range(0, lo_open=True, **kw)


SPECS = {
    "seed": Range(0), "seeds.*": Range(-1), "vocab.*": Range(1),
    **{f"model.{k}": Range(1) for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
                                         "base_width", "base_depth")},
    "model.head_dim": Range(2, even=True),
    "model.rope_theta": positive(), "model.norm_eps": positive(), "model.init_std": positive(),
    "model.depth_alpha": Range(0),
    "model.dtype": Choice(validate_lib.DTYPES), "model.param_dtype": Choice(validate_lib.DTYPES),
    "model.attention_impl": Choice(attention.IMPLS),
    "model.loss_impl": Choice(validate_lib.LOSS_IMPLS), "model.remat": Choice(validate_lib.REMAT),
    "diffusion.schedule.*": Choice(schedules.SCHEDULES), "diffusion.poly_exponent": positive(),
    "diffusion.t_min": Range(0, 0.5, lo_open=True, hi_open=True),
    "diffusion.time_sampling": Choice(objective.TIME_SAMPLING),
    "diffusion.noise_keys": Choice(objective.NOISE_KEYS),
    "diffusion.loss_norm": Choice(objective.LOSS_NORMS),
    "diffusion.cond_target_only_prob": Range(0, 1), "diffusion.cond_drop_prob": Range(0, 1),
    "data.source": Choice(("synthetic", "prepared")), "data.data_dir": AnyString(),
    "data.seq_len": Range(8), "data.global_batch": Range(1), "data.max_segments": Range(1),
    "data.mixture.*": positive(), "data.worker_count": Range(0), "data.eval_batches": Range(1),
    "data.on_bad_record": Choice(pipeline.BAD_RECORD_POLICIES),
    "data.log_fractions_every": Range(0),
    "optim.lr": positive(), "optim.beta1": positive(hi=1, hi_open=True),
    "optim.beta2": positive(hi=1, hi_open=True), "optim.eps": positive(),
    "optim.weight_decay": Range(0), "optim.clip_norm": Range(0),
    "optim.schedule": Choice(validate_lib.OPTIM_SCHEDULES),
    "optim.warmup_frac": Range(0, 1, hi_open=True), "optim.decay_frac": Range(0, 1),
    "optim.min_lr_ratio": Range(0, 1), "optim.ema_decay": Range(0, 1, hi_open=True),
    "optim.grad_accum": Range(1),
    "sde.batch_base": Range(1), "sde.tokens_base": positive(), "sde.gamma": positive(),
    "sde.critical_steps": Range(0),
    "train.tokens": Range(0), "train.steps": Range(0), "train.log_every": Range(1),
    "train.eval_every": Range(0), "train.ckpt_every": Range(1), "train.keep_checkpoints": Range(1),
    "train.on_nonfinite": Choice(validate_lib.ON_NONFINITE), "train.nonfinite_limit": Range(1),
    "train.rollback_skip": Range(0),
    "train.on_bad_checkpoint": Choice(validate_lib.ON_BAD_CHECKPOINT),
    "train.preemption_check_every": Range(1),
    **{f"mesh.{axis}": Range(1, also=(-1,)) for axis in sharding.MESH_AXES},
    "mesh.rules": Choice(tuple(sharding.RULES)),
    "sampling.*.method": Choice(sampling.METHODS), "sampling.*.steps": Range(1),
    "sampling.*.schedule": Choice(schedules.SCHEDULES), "sampling.*.temperature": Range(0),
    "sampling.*.top_k": Range(0), "sampling.*.top_p": positive(hi=1),
    "sampling.*.cfg_scale": Range(), "sampling.*.cfg_window": Window(),
    "sampling.*.confidence": Choice(sampling.CONFIDENCES),
    "sampling.*.choice_temperature": Range(0), "sampling.*.threshold": Range(0, 1),
    "sampling.*.remask_eta": Range(0), "sampling.*.block_length": Range(0),
}
# A valid value may break a rule it shares with another key, whose message names that key.
PARTNERS = {
    "model.n_heads": ("model.n_kv_heads",), "data.source": ("data.data_dir",),
    "diffusion.cond_target_only_prob": ("diffusion.cond_drop_prob",),
    "optim.warmup_frac": ("optim.decay_frac",), "data.global_batch": ("optim.grad_accum",),
    **{f"mesh.{axis}": ("mesh",) for axis in sharding.MESH_AXES},
}


def _leaves(c, prefix=""):
  for k, v in c.items():
    if hasattr(v, "items"):
      yield from _leaves(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


BASE = get_base_config()
DEFAULTS = dict(_leaves(BASE))
KEYS = sorted(DEFAULTS)
SECTIONS = sorted({k.rsplit(".", n)[0] for k in KEYS for n in range(1, k.count(".") + 1)})
PATHS = set(KEYS) | set(SECTIONS)


def spec_of(key):
  default = DEFAULTS[key]
  if isinstance(default, bool):
    return "bool"
  matches = [s for pattern, s in SPECS.items() if fnmatch.fnmatchcase(key, pattern)]
  return matches[0] if matches else None


def cli_string(value) -> str:
  if isinstance(value, bool):
    return str(value).lower()
  return value if isinstance(value, str) else repr(value)


def cli(*overrides: str) -> str | None:
  """What `tmdiff train --config=experiments/tiny.py OVERRIDES` says before it builds anything:
  None if the config parses and validates, else the one line it prints."""
  argv = [PROG, f"--config={EXPERIMENT}", *overrides]
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "experiment file[:arg]",
                                           lock_config=True, flag_values=values, sys_argv=argv)
  try:
    values(argv)
  except Exception as e:  # as tmdiff.entry.run_app's parser catches it
    return entry.error_line(PROG, e, entry.parse_error_hint(e, argv))
  try:
    validate_lib.validate(entry.config_value(holder), num_devices=1)
  except ConfigError as e:
    return entry.error_line(PROG, e)
  return None


def assert_refused(line, *keys):
  assert line is not None, f"accepted; expected an error naming config.{keys[0]}"
  assert "\n" not in line and "Traceback" not in line, line
  assert line.startswith(f"{PROG}: "), line
  assert any(re.search(rf"config\.{re.escape(k)}(?!\w)", line) for k in keys), (
      f"names none of {['config.' + k for k in keys]}: {line}")


# Strategies: strings of the wrong type, values out of range, valid values.

WORDS = st.text("abcdefghijklmnopqrstuvwxyz_ABCXYZ", min_size=1, max_size=8)
LITERALS = st.sampled_from(["[1]", "[0.5, 1]", "(1, 2)", "{}", "{'a': 1}", "None", "", "'x'",
                            "1,5", "0.5.5", "1e", "--", "True", "False"])
ANY_TEXT = st.text(st.characters(blacklist_characters="\x00"), max_size=12)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
ALPHABET = "abcdefghijklmnopqrstuvwxyz_0123456789"
DEEPER = ("x", "real", "keys", "value", "lower")  # a component past a leaf, some its attributes


def wrong_type(default):
  """CLI strings that are not a value of the default's type."""
  if isinstance(default, bool):
    return st.one_of(WORDS, LITERALS, st.integers().map(str), FINITE.map(repr)).filter(
        lambda s: s.lower() not in ("true", "t", "1", "false", "f", "0"))
  if isinstance(default, int):
    return st.one_of(WORDS, LITERALS, st.floats().map(repr))
  if isinstance(default, float):
    return st.one_of(WORDS.filter(lambda s: s.lower() not in ("nan", "inf", "infinity")),
                     LITERALS)
  if isinstance(default, tuple):
    element = st.one_of(ANY_TEXT, st.none(), st.booleans(), st.lists(FINITE, max_size=2))
    return st.one_of(
        st.lists(FINITE, max_size=4).filter(lambda v: len(v) != len(default)).map(tuple),
        st.tuples(element, FINITE) | st.tuples(FINITE, element),
        WORDS).map(cli_string)
  return st.nothing()  # from the command line every value is a string


def out_of_range(key, spec):
  default = DEFAULTS[key]
  if isinstance(spec, Choice):
    near = st.sampled_from(spec.options).flatmap(lambda o: st.sampled_from(
        [o.upper(), o.capitalize(), o[:-1], o + "s", o + " ", " " + o, o.replace("_", "-")]))
    return st.one_of(near, ANY_TEXT).filter(lambda s: s not in spec.options)
  if isinstance(spec, Window):
    return st.one_of(
        st.tuples(FINITE, FINITE).filter(lambda w: w[0] > w[1]),
        st.tuples(st.floats(), st.floats()).filter(
            lambda w: not all(map(math.isfinite, w)))).map(cli_string)
  if isinstance(spec, Range):
    edges = [spec.lo, spec.hi, spec.lo - 1, spec.hi + 1, 0, -1, -INF, INF, math.nan]
    if isinstance(default, int):
      edges = [int(e) for e in edges if math.isfinite(e)] + [INT_MAX + 1, -INT_MAX - 2, 10**30]
      if spec.even:
        edges += [3, 5, 2 * 10**6 + 1]
      values = st.one_of(st.sampled_from(edges), st.integers(), st.integers(-20, 20))
    else:
      values = st.one_of(st.sampled_from(edges), st.floats(), st.floats(-3, 3))
    return values.filter(lambda v: not spec.ok(v)).map(cli_string)
  return st.nothing()


def valid(key, spec):
  default = DEFAULTS[key]
  if spec == "bool":
    return st.sampled_from(["true", "false", "True", "False", "t", "f", "1", "0"])
  if isinstance(spec, AnyString):
    return ANY_TEXT
  if isinstance(spec, Choice):
    return st.sampled_from(spec.options)
  if isinstance(spec, Window):
    return st.tuples(FINITE, FINITE).map(lambda w: cli_string(tuple(sorted(w))))
  lo = spec.lo if math.isfinite(spec.lo) else None
  hi = spec.hi if math.isfinite(spec.hi) else None
  if isinstance(default, int):  # int ranges here have closed, whole ends
    low, high = -INT_MAX if lo is None else int(lo), INT_MAX if hi is None else int(hi)
    values = st.one_of(st.integers(low, high), st.integers(low, min(high, low + 64)))
    if spec.even:
      values = values.map(lambda v: v - v % 2).filter(lambda v: v >= low)
  else:
    values = st.floats(lo, hi, exclude_min=spec.lo_open and lo is not None,
                       exclude_max=spec.hi_open and hi is not None, allow_nan=False,
                       allow_infinity=False)
  return (st.one_of(values, st.sampled_from(spec.also)) if spec.also else values).map(cli_string)


@st.composite
def typo(draw, key):
  """A one-edit typo of one component of `key`, or one component too many."""
  parts = key.split(".")
  i = draw(st.integers(0, len(parts) - 1))
  p, j, c = parts[i], draw(st.integers(0, len(parts[i]))), draw(st.sampled_from(ALPHABET))
  edited = draw(st.sampled_from([p[:j] + c + p[j:], p[:j] + p[j + 1:], p[:j] + c + p[j + 1:],
                                 p[:j] + p[j + 1:j + 2] + p[j:j + 1] + p[j + 2:], p.capitalize()]))
  name = draw(st.sampled_from([".".join(parts[:i] + [edited] + parts[i + 1:]),
                               f"{key}.{draw(st.sampled_from(DEEPER))}"]))
  assume(name not in PATHS and all(name.split(".")))
  return name


# The tests.


def test_every_key_has_a_spec():
  missing = [k for k in KEYS if spec_of(k) is None]
  assert not missing, f"say what these keys accept in SPECS: {missing}"
  unused = [p for p in SPECS if not fnmatch.filter(KEYS, p)]
  assert not unused, f"SPECS names keys the base config lacks: {unused}"


def test_defaults_given_on_the_command_line_are_accepted():
  overrides = [f"--config.{k}={cli_string(v)}" for k, v in _leaves(tiny.get_config())]
  assert cli(*overrides) is None


TYPED = [k for k in KEYS if not isinstance(DEFAULTS[k], str)]


@pytest.mark.parametrize("key", TYPED)
def test_wrong_type_is_refused_naming_the_key(key):
  @EXAMPLES
  @given(wrong_type(DEFAULTS[key]))
  def check(value):
    assert_refused(cli(f"--config.{key}={value}"), key)
  check()


RANGED = [k for k in KEYS if isinstance(spec_of(k), (Range, Choice, Window))]


@pytest.mark.parametrize("key", RANGED)
def test_out_of_range_is_refused_naming_the_key(key):
  @EXAMPLES
  @given(out_of_range(key, spec_of(key)))
  def check(value):
    assert_refused(cli(f"--config.{key}={value}"), key)
  check()


@pytest.mark.parametrize("key", KEYS)
def test_valid_values_are_accepted(key):
  @EXAMPLES
  @given(valid(key, spec_of(key)))
  def check(value):
    line = cli(f"--config.{key}={value}")
    if line is not None:  # a rule shared with another key: it must name one of them
      assert_refused(line, key, *PARTNERS.get(key, ()))
  check()


@pytest.mark.parametrize("key", KEYS)
def test_mistyped_keys_are_refused_naming_them(key):
  @EXAMPLES
  @given(typo(key))
  def check(name):
    assert_refused(cli(f"--config.{name}=1"), name)
  check()


@pytest.mark.parametrize("section", SECTIONS)
def test_a_section_replaced_by_a_dict_must_hold_its_keys(section):
  leaves = {k[len(section) + 1:]: v for k, v in DEFAULTS.items() if k.startswith(section + ".")}
  nested = {}
  for k, v in leaves.items():
    *path, name = k.split(".")
    d = nested
    for p in path:
      d = d.setdefault(p, {})
    d[name] = v
  assert cli(f"--config.{section}={nested!r}") is None
  first, rest = next(iter(nested)), dict(list(nested.items())[1:])
  dropped = first if not isinstance(nested[first], dict) else f"{first}.{next(iter(nested[first]))}"
  assert_refused(cli(f"--config.{section}={rest!r}"), f"{section}.{dropped}", f"{section}.{first}")
  assert_refused(cli(f"--config.{section}={dict(nested, bogus=1)!r}"), f"{section}.bogus")


@pytest.mark.parametrize("override, key", [
    ("--config.model.rope_theta=-1", "model.rope_theta"),
    ("--config.sampling.image.cfg_window=(0.5, 'x')", "sampling.image.cfg_window"),
])
def test_the_command_exits_2_with_one_line(tmp_path, override, key):
  """The real command, for two values that used to pass validation."""
  out = subprocess.run(
      [sys.executable, "-m", "tmdiff.train", f"--config={EXPERIMENT}", f"--workdir={tmp_path}",
       override], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True,
      text=True, timeout=300)
  assert out.returncode == entry.USAGE_ERROR, out.stderr[-2000:]
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert_refused(lines[-1], key)
  assert "Traceback" not in out.stderr
  assert not any(tmp_path.iterdir())  # refused before anything was built or written
