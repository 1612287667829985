"""One run of the batch-size study (issue #6 part 4; docs/batch_study.md): a tiny model at a
fixed token horizon and physical batch, with the SDE reparameterisation on or off.

  python -m tmdiff.scaling.batch_study --out=runs/batch_study --data_dir=runs/data   # the study
  python -m tmdiff.train --config=experiments/batch_study.py:batch=16,sde=1,data=runs/data \
      --workdir=runs/bs_b16                                                       # one run

Argument: comma-separated key=value, all optional:
  batch        physical batch B in sequences (default 4)
  tokens       token horizon D (default 2^20 = 1048576); steps S = D / (seq * B)
  sde          1: lr/betas/eps reparameterised from the base point (B_base, D_base) by
               kappa = (D_base/D)^gamma * B/B_base; 0 (default): the base values, only S changes
  kappa_mult   the base AdamW values are the defaults (lr 3e-3, betas 0.9/0.95, eps 1e-8)
               reparameterised by this kappa: lr*sqrt(k), beta^k, eps/sqrt(k) (default 1). The
               study's lr sweeps vary it; the tuned base is the best value at (B_base, D_base).
  base_batch   B_base (default 4);  base_tokens: D_base (default 2^20);  gamma (default 0.44)
  clip         gradient-clipping norm (default 0 = off: a fixed clip norm is no part of the
               reparameterisation, and it binds at small batches, whose gradients are noisier)
  seq          sequence length (default 128: prepared pairs are padded to 128)
  eval_rows    validation rows of the final eval, the same rows and masks for every batch
               (data.eval_batches = eval_rows / B; default 1024)
  data         a `python -m tmdiff.data.prepare` directory, or 'synthetic' (default)
  seed         default 0 (every source of randomness)
  mask_seed    >= 0: the seed of the training masks and times alone (config.seeds.masks);
               init, data order and eval keep `seed` (default -1: off)
  noise        training masks and times keyed per 'example' by its index in the data stream
               (default: the same example gets the same masks whatever B, so the grid's runs
               share their randomness) or per 'step' (diffusion.noise_keys)
  loss_norm    'fixed' (default: the train loss divides by rows x seq, so a token weighs the same
               at every B, as the reparameterisation assumes) or 'tokens' (by the tokens the
               batch covers: at B = 1 each row then weighs the same whatever its length)
               (diffusion.loss_norm)
  min_lr       the cosine schedule's floor as a fraction of the peak lr (default 0.1:
               optim.min_lr_ratio; 0 anneals to zero)
  width        d_model (default 64; experiments/tiny.py has 128); heads of 32, 2 query heads per
               kv head, d_ff = 3 width. The CompleteP base stays 128 x 2 (hidden lr x 128/width).
  layers       transformer blocks (default 2)
  quick        1: a micro model (d_model 32, 1 layer, seq 32, synthetic data) for tests

Expected on 2 CPU cores (unloaded), two runs at once (the study's --jobs=2): width 64 (0.43M
parameters) ~12k tokens/s each at B = 2-16 (~8.5k at B = 1, where per-step overhead shows, and
~7.5k at B = 32), so a default run (2^20 tokens) takes 90-140 s with start-up, compilation and
eval; width 128 (1.05M) ~6.5k tokens/s each.
"""
import math

from experiments import key_values, tiny
from tmdiff.configs.derived import reparameterise

KEYS = ("batch", "tokens", "sde", "kappa_mult", "base_batch", "base_tokens", "gamma", "seq",
        "eval_rows", "clip", "data", "seed", "mask_seed", "noise", "loss_norm", "min_lr", "width",
        "layers", "quick")
DEFAULTS = dict(batch="4", tokens=str(2**20), sde="0", kappa_mult="1", base_batch="4",
                base_tokens=str(2**20), gamma="0.44", seq="128", eval_rows="1024", clip="0",
                data="synthetic", seed="0", mask_seed="-1", noise="example", loss_norm="fixed",
                min_lr="0.1", width="64", layers="2", quick="0")
QUICK_DEFAULTS = dict(batch="4", tokens="1024", base_batch="4", base_tokens="1024", seq="32",
                      eval_rows="32")


def parse_arg(arg: str) -> dict:
  given = key_values(arg, KEYS, "experiments/batch_study.py")
  out = dict(DEFAULTS)
  if given.get("quick", "0") == "1":
    out.update(QUICK_DEFAULTS)
  out.update(given)
  return out


def get_config(arg: str = ""):
  a = parse_arg(arg)
  quick = a["quick"] == "1"
  c = tiny.get_config("synthetic" if quick else a["data"])
  width, layers = int(a["width"]), int(a["layers"])
  if width % 64:
    raise ValueError(f"experiments/batch_study.py: width={width} must be a multiple of 64 "
                     "(heads of 32, two per kv head)")
  c.model.update(dict(d_model=width, n_layers=layers, n_heads=width // 32,
                      n_kv_heads=width // 64, head_dim=32, d_ff=3 * width))
  if quick:
    c.model.update(dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64,
                        base_width=32, base_depth=1))
  batch, seq, eval_rows = int(a["batch"]), int(a["seq"]), int(a["eval_rows"])
  if eval_rows % batch:
    raise ValueError(f"experiments/batch_study.py: eval_rows={eval_rows} must be a multiple of "
                     f"batch={batch} (every run evaluates the same rows)")
  c.seed = int(a["seed"])
  if int(a["mask_seed"]) >= 0:
    c.seeds.masks = int(a["mask_seed"])
  c.data.seq_len = seq
  c.data.global_batch = batch
  c.data.eval_batches = eval_rows // batch
  c.train.tokens = float(a["tokens"])
  steps = max(1, round(c.train.tokens / (batch * seq)))
  c.train.log_every = max(1, steps // 20)
  c.train.eval_every = 0                  # one eval, at the end
  c.train.ckpt_every = max(1, math.ceil(steps / 4))
  c.train.keep_checkpoints = 1
  kappa_mult = float(a["kappa_mult"])
  lr, beta1, beta2, eps = reparameterise(c.optim.lr, c.optim.beta1, c.optim.beta2, c.optim.eps,
                                         kappa_mult)
  c.optim.update(dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, clip_norm=float(a["clip"]),
                      min_lr_ratio=float(a["min_lr"])))
  c.diffusion.noise_keys = a["noise"]
  c.diffusion.loss_norm = a["loss_norm"]
  c.sde.enabled = a["sde"] == "1"
  c.sde.batch_base = int(a["base_batch"])
  c.sde.tokens_base = float(a["base_tokens"])
  c.sde.gamma = float(a["gamma"])
  return c
