"""The batch study's plan: one training run (`Run`), the study's settings (`Study`), and the
config a run trains with.

`Study`'s fields are the one source of the settings: their defaults and help give the command
line's flags (`add_study_flags`), and the fields with a `run_key`, with those of `Run`, are the
keys of a run's experiment argument (`experiments/batch_study.py:<arg>`, `Study.arg`).
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Mapping

from tmdiff.configs.base import get_base_config
from tmdiff.configs.derived import reparameterise
from tmdiff.data import records
from tmdiff.diffusion import objective as obj_lib

PAPER_GAMMA = 0.44  # the horizon exponent of the SDE reparameterisation the paper measured


def setting(default, help: str, *, run_key: str | None = None, flag: bool = True,
            choices: tuple | None = None):
  """A Study field. `help` documents its --flag (none where not `flag`); `run_key` names it in
  the experiment argument of every run, for the settings a run's config depends on."""
  return dataclasses.field(default=default, metadata=dict(help=help, run_key=run_key, flag=flag,
                                                          choices=choices))


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run; its name is its workdir under OUT/runs. Every field is a key of its
  experiment argument."""
  batch: int              # physical batch B in sequences
  tokens: int             # token horizon D; steps S = D / (seq_len B)
  sde: bool = False       # lr, betas, eps reparameterised from the base point (else its values)
  kappa_mult: float = 1.0  # the base AdamW values reparameterised by this k
  seed: int = 0           # every source of randomness
  clip: float = 0.0       # gradient-clipping norm (0: off, the study's setting)
  mask_seed: int = -1     # >= 0: the training masks alone take this seed

  @property
  def name(self) -> str:
    name = f"b{self.batch}_d{self.tokens}_{'sde' if self.sde else 'fixed'}_k{self.kappa_mult:g}"
    return (name + (f"_s{self.seed}" if self.seed else "")
            + (f"_m{self.mask_seed}" if self.mask_seed >= 0 else "")
            + (f"_clip{self.clip:g}" if self.clip else ""))


@dataclasses.dataclass(frozen=True)
class Study:
  data: str = setting("synthetic", "prepared data directory or 'synthetic'", run_key="data",
                      flag=False)  # the command line's --data_dir
  seq_len: int = setting(128, "sequence length (prepared pairs are padded to 128)", run_key="seq")
  # Width 64 runs ~2.5x faster than 128 on a CPU, and the noise between runs is no larger
  # (docs/batch_study.md): the hour buys replicates.
  width: int = setting(64, "d_model of every run (a multiple of 64: heads of 32, two per kv "
                       "head; d_ff = 3 width; CompleteP scales from the 128 x 2 base)",
                       run_key="width")
  layers: int = setting(2, "transformer blocks of every run", run_key="layers")
  base_batch: int = setting(4, "B_base, the batch of the base point", run_key="base_batch")
  base_tokens: int = setting(2**20, "D_base, the token horizon of the base point",
                             run_key="base_tokens")
  batches: tuple[int, ...] = setting((1, 2, 4, 8, 16), "the batch grid at D_base")
  max_batch: int = setting(1024, "the grid grows no further than this batch")
  min_steps: int = setting(8, "the grid does not grow past D / (L B) < min_steps")
  kappas: tuple[float, ...] = setting((0.5, 1.0, 2.0, 4.0), "the base tuning's k sweep")
  horizons: tuple[float, ...] = setting((0.25, 0.5), "gamma: other horizons as multiples of "
                                        "base_tokens ('' for none)")
  horizon_kappas: tuple[float, ...] = setting(
      (0.5, 1.0, 2.0), "the other horizons' k sweeps: these multiples of k0 (D_base / D)^"
      "gamma_guess, grown at a winning edge like the base sweep")
  gamma_guess: float = setting(PAPER_GAMMA, "the gamma that centres the other horizons' sweeps")
  max_extend: int = setting(2, "k sweeps grow by at most this many points at a winning edge")
  tol: float = setting(0.015, "the flatness tolerance: relative spread of the final losses")
  eval_rows: int = setting(1024, "validation rows of the final eval, the same rows and masks "
                           "for every batch (a multiple of every batch)", run_key="eval_rows")
  # Per 'example' (by stream index) every run sees the same examples with the same masks
  # whatever its batch, so runs differ only by B and the hyperparameters.
  noise: str = setting("example", "training masks and times keyed per example (shared by the "
                       "grid's runs) or per step (diffusion.noise_keys)", run_key="noise",
                       choices=obj_lib.NOISE_KEYS)
  loss_norm: str = setting("fixed", "train loss divided by rows x seq (fixed: a token weighs the "
                           "same at any B) or by the covered tokens (diffusion.loss_norm)",
                           run_key="loss_norm", choices=obj_lib.LOSS_NORMS)
  min_lr: float = setting(0.1, "the cosine schedule's floor, a fraction of the peak lr "
                          "(optim.min_lr_ratio)", run_key="min_lr")
  seeds: int = setting(0, "base retrained with this many other seeds (all randomness)")
  mask_seeds: int = setting(1, "base retrained with this many other training-mask seeds only")
  # Replicate i is the whole grid under mask seed i; the scatter of the replicates about the
  # grid's pattern is the noise of the comparison.
  grid_mask_seeds: int = setting(3, "every grid point again with this many other mask seeds; "
                                 "its loss is the mean")
  growth_replicates: int = setting(2, "replicates a point above --batches gets (reparameterised) "
                                   "before it is known to be flat")
  eval_seeds: int = setting(2, "the base and the smallest-B runs re-evaluated under this many "
                            "other eval-mask seeds")
  clip_control: float = setting(0.0, "clip norm of the control run, the smallest-B "
                                "reparameterised run again (0: no control run)")
  # E.g. 1: the untuned defaults, to see whether the break follows the step count or the
  # absolute kappa.
  other_bases: tuple[float, ...] = setting((), "the batch grid again from these base "
                                           "multipliers k ('' for none)")
  quick: bool = setting(False, "a micro model on synthetic data (tests)", run_key="quick",
                        flag=False)  # the command line's --quick: the QUICK study

  def run(self, batch, tokens=None, sde=False, kappa_mult=1.0, seed=0, clip=0.0,
          mask_seed=-1) -> Run:
    tokens = int(self.base_tokens if tokens is None else tokens)
    if batch == self.base_batch and tokens == self.base_tokens:
      sde = False  # kappa = 1 exactly: the same run with or without the reparameterisation
    return Run(int(batch), tokens, bool(sde), float(kappa_mult), int(seed), float(clip),
               int(mask_seed))

  def arg(self, run: Run) -> str:
    """The experiments/batch_study.py argument of `run`: its fields, then the run keys."""
    values = dataclasses.asdict(run)
    values.update((f.metadata["run_key"], getattr(self, f.name)) for f in _run_key_fields())
    return ",".join(f"{k}={_format(v)}" for k, v in values.items())

  def steps(self, batch, tokens=None) -> int:
    return max(1, round((tokens or self.base_tokens) / (self.seq_len * batch)))


QUICK = dict(seq_len=32, base_batch=4, base_tokens=1024, batches=(4, 8), max_batch=8,
             kappas=(1.0,), horizons=(), max_extend=0, eval_rows=32, seeds=0, mask_seeds=0,
             grid_mask_seeds=0, eval_seeds=0,
             clip_control=0.0, other_bases=(), quick=True, data="synthetic")


# ------------------------------------------------------------------------------ run arguments

def _run_key_fields() -> list[dataclasses.Field]:
  return [f for f in dataclasses.fields(Study) if f.metadata["run_key"]]


RUN_KEYS = tuple(f.name for f in dataclasses.fields(Run)) + tuple(
    f.metadata["run_key"] for f in _run_key_fields()) + ("gamma",)


def _format(value) -> str:
  if isinstance(value, bool):
    return str(int(value))
  return repr(value) if isinstance(value, float) else str(value)


def _parse(text: str, kind):
  if kind is bool:
    return text == "1"
  if kind is int:
    try:
      return int(text)
    except ValueError:
      number = float(text)  # '1e6' is a token count too
      if number != int(number):
        raise ValueError(f"batch study: {text!r} is not an integer") from None
      return int(number)
  return kind(text)


def arg_values(arg: str) -> dict[str, str]:
  """'k1=v1,k2=v2' -> {k1: v1, k2: v2}: two arguments with the same values compare equal,
  whatever their order."""
  return dict(item.partition("=")[::2] for item in arg.split(",") if item)


def from_arg(values: Mapping[str, str]) -> tuple[Study, Run, float]:
  """A run's experiment argument, {key: value} (keys in RUN_KEYS, all optional) -> (study, run,
  gamma). Unset keys take the defaults, those of QUICK with quick=1; batch and tokens default to
  the base point, gamma to the paper's."""
  unknown = set(values) - set(RUN_KEYS)
  if unknown:
    raise ValueError(f"batch study: unknown keys {sorted(unknown)}; keys are {RUN_KEYS}")
  study = Study(**QUICK) if values.get("quick") == "1" else Study()
  kinds = typing.get_type_hints(Study)
  study = dataclasses.replace(study, **{
      f.name: _parse(values[f.metadata["run_key"]], kinds[f.name])
      for f in _run_key_fields() if f.metadata["run_key"] in values})
  kinds = typing.get_type_hints(Run)
  given = {k: _parse(values[k], kinds[k]) for k in kinds if k in values}
  run = Run(**{"batch": study.base_batch, "tokens": study.base_tokens, **given})
  return study, run, float(values.get("gamma", PAPER_GAMMA))


# ------------------------------------------------------------------------------ command line

def _tuple_of(kind):
  return lambda text: tuple(kind(v) for v in text.split(",") if v)


def add_study_flags(parser) -> None:
  """A --flag per Study field with `flag`, its default and type those of the field."""
  kinds = typing.get_type_hints(Study)
  for f in dataclasses.fields(Study):
    if not f.metadata["flag"]:
      continue
    kind = kinds[f.name]
    if typing.get_origin(kind) is tuple:
      kind = _tuple_of(typing.get_args(kind)[0])
    parser.add_argument(f"--{f.name}", type=kind, default=f.default, help=f.metadata["help"],
                        choices=f.metadata["choices"])


def study_from_flags(args, **settings) -> Study:
  """The Study of parsed flags (add_study_flags) and `settings` (the fields without a flag)."""
  flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(Study) if f.metadata["flag"]}
  return Study(**flags, **settings)


# ------------------------------------------------------------------------------ the run's config

def base_adamw() -> tuple[float, float, float, float]:
  """The base config's AdamW lr, beta1, beta2, eps: what a kappa multiplier k reparameterises."""
  optim = get_base_config().optim
  return optim.lr, optim.beta1, optim.beta2, optim.eps


def run_config(study: Study, run: Run, gamma: float = PAPER_GAMMA):
  """The training config of `run`: the base config with a small model of study.width x
  study.layers (a micro model when study.quick), trained for run.tokens at run.batch, with one
  eval at the end on study.eval_rows validation rows."""
  c = get_base_config()
  if study.data != "synthetic" and not study.quick:
    c.data.source = "prepared"
    c.data.data_dir = study.data
    c.vocab.update(records.vocab_sizes(study.data) or {})
  width, layers = study.width, study.layers
  if width % 64:
    raise ValueError(f"batch study: width={width} must be a multiple of 64 "
                     "(heads of 32, two per kv head)")
  c.model.update(dict(d_model=width, n_layers=layers, n_heads=width // 32,
                      n_kv_heads=width // 64, head_dim=32, d_ff=3 * width))
  if study.quick:
    c.model.update(dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64,
                        base_width=32, base_depth=1))
  if study.eval_rows % run.batch:
    raise ValueError(f"batch study: eval_rows={study.eval_rows} must be a multiple of "
                     f"batch={run.batch} (every run evaluates the same rows)")
  c.seed = run.seed
  if run.mask_seed >= 0:
    c.seeds.masks = run.mask_seed
  c.data.seq_len = study.seq_len
  c.data.global_batch = run.batch
  c.data.eval_batches = study.eval_rows // run.batch
  c.train.tokens = float(run.tokens)
  steps = study.steps(run.batch, run.tokens)
  c.train.steps = steps                   # train.tokens decides; this says how many that is
  c.train.log_every = max(1, steps // 20)
  c.train.eval_every = 0                  # one eval, at the end
  c.train.ckpt_every = max(1, math.ceil(steps / 4))
  c.train.keep_checkpoints = 1
  lr, beta1, beta2, eps = reparameterise(c.optim.lr, c.optim.beta1, c.optim.beta2, c.optim.eps,
                                         run.kappa_mult)
  c.optim.update(dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, clip_norm=run.clip,
                      min_lr_ratio=study.min_lr))
  c.diffusion.noise_keys = study.noise
  c.diffusion.loss_norm = study.loss_norm
  c.sde.enabled = run.sde
  c.sde.batch_base = study.base_batch
  c.sde.tokens_base = float(study.base_tokens)
  c.sde.gamma = gamma
  return c
