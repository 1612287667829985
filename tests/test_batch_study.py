"""Batch-size study: critical-batch and gamma estimators against closed forms, the analysis on
synthetic results, and the CLI end to end on three micro runs (resumable, same eval rows)."""
import json
import math
import os

import numpy as np
import pytest

from experiments import batch_study as experiment
from tmdiff.configs.derived import derive
from tmdiff.scaling.batch_study import __main__ as cli
from tmdiff.scaling.batch_study import analysis, plan, runner
from tmdiff.scaling.batch_study import report as report_lib

GAMMA = 0.44
D_BASE = 2**19
KAPPAS = (0.25, 0.5, 1.0, 2.0, 4.0)


def rising_curve(batches, flat=3.0, knee=32, rise_per_doubling=0.01):
  """Flat up to `knee`, then up by `rise_per_doubling` (relative) per doubling of B."""
  b = np.asarray(batches, np.float64)
  return flat * (1 + rise_per_doubling * np.maximum(0.0, np.log2(b / knee)))


def test_critical_batch_on_flat_then_rising_curve():
  batches = [2, 4, 8, 16, 32, 64, 128, 256]
  crit = analysis.critical_batch(batches, rising_curve(batches), base_batch=16, tol=0.015)
  assert crit["flat_level"] == pytest.approx(3.0)
  # Spread with 64 in the set: 0.03 / mean of five 3.0s (B <= 32) and 3.03; with 128 (3.06)
  # too: 0.06 / its mean; 1.5% is crossed in between, linearly in log B.
  s64, s128 = 0.03 / ((5 * 3.0 + 3.03) / 6), 0.06 / ((5 * 3.0 + 3.03 + 3.06) / 7)
  assert crit["b_crit"] == pytest.approx(64 * 2 ** ((0.015 - s64) / (s128 - s64)), rel=1e-9)
  assert crit["first_above"] == 128 and crit["below"] == [2, 4, 8, 16, 32, 64]
  # Order of the input does not matter; a curve that never rises far enough gives a bound.
  shuffled = [64, 2, 256, 16, 8, 128, 4, 32]
  assert analysis.critical_batch(shuffled, rising_curve(shuffled), 16, 0.015)["b_crit"] == \
      pytest.approx(crit["b_crit"])
  flat = analysis.critical_batch(batches, rising_curve(batches, rise_per_doubling=0.001), 16, 0.015)
  assert flat["b_crit"] is None and flat["b_crit_lower_bound"] == 256
  with pytest.raises(ValueError, match="base_batch"):
    analysis.critical_batch([32, 64], [1.0, 1.1], base_batch=16, tol=0.015)


def test_spread():
  assert analysis.spread([2.0, 2.02, 1.98]) == pytest.approx(0.04 / 2.0)


def optimum_curve(kappas, tokens, gamma=GAMMA, curvature=0.05, floor=3.0):
  """Loss of a k sweep whose optimum is k*(D) = 1.3 (D_BASE / D)^gamma (a parabola in ln k)."""
  ln_opt = math.log(1.3) + gamma * math.log(D_BASE / tokens)
  return floor + curvature * (np.log(np.asarray(kappas)) - ln_opt) ** 2


def test_parabola_vertex_and_the_fitted_optimum_are_exact_on_a_parabola():
  loss = optimum_curve(KAPPAS, D_BASE)
  fit = analysis.fit_optimum(KAPPAS, loss)
  assert fit["k"] == pytest.approx(1.3, rel=1e-9) and fit["bracketed"]
  assert fit["loss_at_k"] == pytest.approx(3.0)
  assert analysis.parabola_vertex([0, 1, 2], [1.0, 2.0, 1.0]) is None  # a maximum, not a minimum
  assert analysis.fit_optimum([1.0, 2.0], [1.0, 2.0])["ln_k"] is None


def test_gamma_fit_recovers_a_known_gamma():
  horizons = [D_BASE // 2, D_BASE, 2 * D_BASE]
  optima = [analysis.fit_optimum(KAPPAS, optimum_curve(KAPPAS, d)) for d in horizons]
  gm = analysis.fit_gamma(horizons, [o["ln_k"] for o in optima])
  assert gm["gamma"] == pytest.approx(GAMMA, abs=1e-9)
  # With noise: the bootstrap interval holds the truth and the estimate is close.
  rng = np.random.default_rng(0)
  sigma = 0.002
  noisy = [analysis.fit_optimum(KAPPAS, optimum_curve(KAPPAS, d) + rng.normal(0, sigma, len(KAPPAS)),
                          sigma=sigma, n_boot=300, seed=i) for i, d in enumerate(horizons)]
  gm = analysis.fit_gamma(horizons, [o["ln_k"] for o in noisy], [o["boot_ln_k"] for o in noisy])
  assert gm["gamma_95"][0] <= GAMMA <= gm["gamma_95"][1]
  assert gm["gamma"] == pytest.approx(GAMMA, abs=3 * gm["gamma_sd"])
  assert 0 < gm["gamma_sd"] < 0.3
  assert analysis.fit_gamma([D_BASE], [0.0])["gamma"] is None


def fake_result(study, batch, tokens, sde, kappa_mult, loss, seed=0, clip=0.0, mask_seed=-1):
  run = study.run(batch, tokens, sde, kappa_mult, seed, clip, mask_seed)
  diverged = not math.isfinite(loss)
  bits = {f"bits_per_token/{m}": loss / math.log(2) for m in ("text", "image", "audio", "all")}
  return run.name, dict(name=run.name, batch=run.batch, tokens=run.tokens, sde=run.sde,
                        kappa_mult=run.kappa_mult, seed=run.seed, clip=run.clip,
                        mask_seed=run.mask_seed,
                        steps=study.steps(batch, tokens),
                        kappa=run.batch / study.base_batch * (study.base_tokens / run.tokens) ** 0.44
                        if run.sde else 1.0, lr=3e-3, beta1=0.9,
                        beta2=0.95, eps=1e-8, train_loss=loss, wall_s=1.0, diverged=diverged,
                        eval={} if diverged else {"loss": loss, **bits})


def test_expected_range_of_normal_draws():
  assert analysis.expected_range(2) == pytest.approx(2 / math.sqrt(math.pi), rel=1e-6)
  assert analysis.expected_range(3) == pytest.approx(3 / math.sqrt(math.pi), rel=1e-6)
  draws = np.random.default_rng(0).normal(size=(20000, 5))
  assert analysis.expected_range(5) == pytest.approx(np.ptp(draws, axis=1).mean(), rel=0.01)


def test_analysis_of_a_synthetic_study(tmp_path):
  """Runs whose losses follow known curves: the report recovers k0, B_crit, spreads, gamma."""
  study = plan.Study(base_batch=16, base_tokens=D_BASE, other_bases=(0.5,), seeds=2, mask_seeds=2,
                   grid_mask_seeds=0)
  results = {}

  def add(*args, **kw):
    name, r = fake_result(study, *args, **kw)
    results[name] = r
  for d in (D_BASE // 2, D_BASE, 2 * D_BASE):
    for k, loss in zip(KAPPAS, optimum_curve(KAPPAS, d)):
      add(study.base_batch, d, False, k, float(loss))
  k0 = 1.0  # the best grid point at D_BASE (optimum 1.3)
  base_loss = float(optimum_curve([k0], D_BASE)[0])
  batches = [2, 4, 8, 16, 32, 64, 128]
  for b, loss in zip(batches, rising_curve(batches, flat=base_loss)):
    if b != study.base_batch:
      add(b, D_BASE, True, k0, float(loss))
      add(b, D_BASE, False, k0, float(loss * (1 + 0.01 * abs(math.log2(b / 16)))))
  add(study.base_batch, D_BASE, False, k0, base_loss * 1.002, seed=1)
  add(study.base_batch, D_BASE, False, k0, base_loss * 0.998, seed=2)
  # Training-mask noise (init, data and eval fixed): 0.1% either way.
  add(study.base_batch, D_BASE, False, k0, base_loss * 1.001, mask_seed=1)
  add(study.base_batch, D_BASE, False, k0, base_loss * 0.999, mask_seed=2)
  # A diverged sweep point and a diverged naive run: left out of the fits, above B_crit.
  add(study.base_batch, D_BASE, False, 16.0, math.inf)
  add(256, D_BASE, False, k0, math.inf)
  add(256, D_BASE, True, k0, math.inf)
  # A grid from another base (k = 0.5), flat all the way: B_crit only bounded from below.
  other_loss = float(optimum_curve([0.5], D_BASE)[0])
  for b in (2, 4, 8, 32, 64):
    add(b, D_BASE, True, 0.5, other_loss)
    add(b, D_BASE, False, 0.5, other_loss * 1.03)
  # The smallest-B run again with clipping: reported beside its unclipped twin.
  add(2, D_BASE, True, k0, base_loss * 1.02, clip=1.0)

  report = analysis.analyse(results, study)
  assert report["k0"] == k0
  b = report["batch"]
  s64, s128 = 0.01 / ((5 + 1.01) / 6), 0.02 / ((5 + 1.01 + 1.02) / 7)  # spreads, 64 / 128 in
  b_crit = 64 * 2 ** ((0.015 - s64) / (s128 - s64))
  assert b["b_crit"] == pytest.approx(b_crit)
  assert b["s_crit"] == pytest.approx(D_BASE / (128 * b_crit))
  assert b["below"] == [2, 4, 8, 16, 32, 64] and b["span"] == 32
  # Five points at the flat level and one 1% above it.
  assert b["reparam_spread"] == pytest.approx(0.01 / (1 + 0.01 / 6), rel=1e-9)
  naive = [base_loss * (1 + 0.01 * abs(math.log2(x / 16))) for x in (2, 4, 8, 16, 32)]
  naive.append(base_loss * 1.01 * 1.02)
  assert b["naive_spread"] == pytest.approx(analysis.spread(naive))
  assert report["seed_noise"]["spread"] == pytest.approx(0.004, rel=1e-6)
  assert report["mask_noise"]["spread"] == pytest.approx(0.002, rel=1e-6)
  assert report["mask_noise"]["rel_sd"] == pytest.approx(0.001, rel=1e-6)
  assert report["gamma"]["gamma"] == pytest.approx(GAMMA, abs=1e-6)
  assert report["gamma"]["horizons"] == [D_BASE // 2, D_BASE, 2 * D_BASE]
  assert report["clip_control"] == [dict(batch=2, clip=1.0, loss=pytest.approx(base_loss * 1.02),
                                         unclipped=pytest.approx(base_loss),
                                         rel_to_flat=pytest.approx(0.02))]
  text = report_lib.markdown(results, study, report)
  other = report["other_bases"]["0.5"]
  assert other["b_crit"] is None and other["b_crit_lower_bound"] == 64
  assert other["reparam_spread"] == 0 and other["naive_spread"] == pytest.approx(0.03 / 1.025)
  assert f"B_crit ~ {b_crit:.1f}" in text and "gamma = **0.44**" in text and "| diverged |" in text
  assert "the grid resolves flatness" in text
  # Equal total kappa by two paths: at B = 32, k = 0.5 with kappa 2 (SDE) and k0 = 1 directly;
  # at B = 8, k0 = 1 with kappa 0.5 (SDE) and k = 0.5 directly.
  pairs = [(f"b8_d{D_BASE}_sde_k1", f"b8_d{D_BASE}_fixed_k0.5"),
           (f"b32_d{D_BASE}_sde_k0.5", f"b32_d{D_BASE}_fixed_k1")]
  assert [(t["sde_run"], t["direct_run"]) for t in report["twins"]] == pairs
  for t, (a, b) in zip(report["twins"], pairs):
    assert t["rel_diff"] == pytest.approx(results[a]["eval"]["loss"] / results[b]["eval"]["loss"] - 1)
  assert report["twins"][1]["sde_loss"] == pytest.approx(other_loss)
  assert f"b32_d{D_BASE}_sde_k0.5 (SDE)" in text
  paths = report_lib.plot(results, study, report, str(tmp_path))
  assert [os.path.basename(p) for p in paths] == ["batch_study.png", "batch_study_gamma.png"]


def test_grid_points_average_their_mask_seed_replicates():
  study = plan.Study(base_batch=4, base_tokens=D_BASE, batches=(1, 2, 4, 8), other_bases=(),
                   grid_mask_seeds=1)
  results = {}

  def add(*args, **kw):
    name, r = fake_result(study, *args, **kw)
    results[name] = r
  # Replicate pairs at +-1% around 3.0 below B_base; B = 8 rises by 5%.
  for b in (1, 2, 4):
    for sde in (True, False):
      add(b, D_BASE, sde, 1.0, 3.0 * 1.01)
      add(b, D_BASE, sde, 1.0, 3.0 * 0.99, mask_seed=1)
  add(8, D_BASE, True, 1.0, 3.15)
  add(8, D_BASE, True, 1.0, 3.15, mask_seed=1)
  add(8, D_BASE, False, 1.0, 3.0)
  add(4, D_BASE, False, 1.0, 3.0 * 1.03, mask_seed=2)  # a noise run, not a replicate
  g = analysis.select(results, study)
  assert [r["replicates"] for r in g["reparam"]] == [2, 2, 2, 2]
  assert [r["eval"]["loss"] for r in g["reparam"]] == pytest.approx([3.0, 3.0, 3.0, 3.15])
  assert "replicates" not in g["naive"][-1]  # B = 8 naive: no replicate
  report = analysis.analyse(results, study)
  assert report["batch"]["reparam_spread"] == pytest.approx(0.0, abs=1e-12)
  assert report["batch"]["b_crit"] is not None and report["batch"]["below"] == [1, 2, 4]
  # Mask noise from the base and its mask seeds 1, 2 (3.03, 2.97, 3.09).
  assert report["mask_noise"]["losses"] == pytest.approx([3.03, 2.97, 3.09])
  # The replicate analysis covers the points with both replicates; B = 8 naive (above B_crit)
  # is left out of it.
  assert report["batch"]["incomplete"] == [f"b8_d{D_BASE}_fixed_k1"]
  assert report["batch"]["paired_noise"]["points"] == 6
  text = report_lib.markdown(results, study, report)
  assert "(mean of 2)" in text and f"without every replicate: b8_d{D_BASE}_fixed_k1" in text


def test_experiment_file_reparameterises_from_the_base():
  common = f"base_batch=16,base_tokens={D_BASE},tokens={D_BASE},kappa_mult=2"
  base = derive(experiment.get_config(f"batch=16,{common}"))
  assert base.lr == pytest.approx(3e-3 * math.sqrt(2)) and base.beta1 == pytest.approx(0.81)
  assert base.steps == D_BASE // (16 * 128)
  sde = derive(experiment.get_config(f"batch=64,sde=1,{common}"))
  assert sde.kappa == pytest.approx(4.0) and sde.steps == base.steps // 4
  assert sde.lr == pytest.approx(base.lr * 2) and sde.beta2 == pytest.approx(base.beta2 ** 4)
  assert sde.eps == pytest.approx(base.eps / 2)
  naive = derive(experiment.get_config(f"batch=64,{common}"))
  assert (naive.lr, naive.beta1, naive.steps) == (base.lr, base.beta1, sde.steps)
  # The horizon enters through (D_base / D)^gamma.
  longer = derive(experiment.get_config(
      f"batch=16,sde=1,gamma=0.5,base_batch=16,base_tokens={D_BASE},tokens={4 * D_BASE},kappa_mult=2"))
  assert longer.kappa == pytest.approx(0.5) and longer.steps == 4 * base.steps
  assert experiment.get_config("clip=1.0").optim.clip_norm == 1.0
  assert experiment.get_config("").optim.clip_norm == 0.0
  assert experiment.get_config("mask_seed=3").seeds.masks == 3
  assert experiment.get_config("seed=5").seeds.masks == -1  # -1: follows config.seed
  assert experiment.get_config("min_lr=0").optim.min_lr_ratio == 0.0
  from tmdiff.configs.base import get_base_config
  assert experiment.get_config("").optim.min_lr_ratio == get_base_config().optim.min_lr_ratio
  small = experiment.get_config("width=64,layers=1").model
  assert (small.d_model, small.n_layers, small.n_heads, small.n_kv_heads, small.d_ff) == \
      (64, 1, 2, 1, 192)
  assert (small.base_width, small.base_depth) == (128, 2)  # CompleteP scales from the tiny model
  with pytest.raises(ValueError, match="width=96 must be a multiple of 64"):
    experiment.get_config("width=96")
  with pytest.raises(ValueError, match="eval_rows=1000 must be a multiple of batch=16"):
    experiment.get_config("batch=16,eval_rows=1000")
  with pytest.raises(ValueError, match="bad argument 'bacth=4'"):
    experiment.get_config("bacth=4")


def test_cli_quick_study_is_resumable_and_evaluates_the_same_rows(tmp_path, capsys):
  out, docs = tmp_path / "study", tmp_path / "docs"
  docs.mkdir()
  (docs / "batch_study.md").write_text(f"# page\n{report_lib.DOCS_BEGIN}\nold\n{report_lib.DOCS_END}\ntail\n")
  argv = [f"--out={out}", "--quick", "--devices=1", f"--docs={docs}"]
  cli.main(argv)
  assert "trained 3 runs this time" in capsys.readouterr().out
  runs = sorted(os.listdir(out / "runs"))
  assert runs == ["b4_d1024_fixed_k1", "b8_d1024_fixed_k1", "b8_d1024_sde_k1"]
  results = {r: json.loads((out / "runs" / r / runner.RESULT).read_text()) for r in runs}
  # Every run is evaluated on the same rows (same token counts per modality).
  fractions = {r: [v["eval"][f"token_fraction/{m}"] for m in analysis.MODALITIES]
               for r, v in results.items()}
  assert len({tuple(v) for v in fractions.values()}) == 1, fractions
  sde, naive, base = (results[r] for r in ("b8_d1024_sde_k1", "b8_d1024_fixed_k1",
                                           "b4_d1024_fixed_k1"))
  assert sde["steps"] == naive["steps"] == base["steps"] // 2
  assert sde["lr"] == pytest.approx(base["lr"] * math.sqrt(2)) and naive["lr"] == base["lr"]
  report = json.loads((out / "report" / "batch_study.json").read_text())["report"]
  assert report["batch"]["flat_level"] == pytest.approx(base["eval"]["loss"])
  page = (docs / "batch_study.md").read_text()
  assert "old" not in page and page.endswith("tail\n") and "| reparam | 8 |" in page
  assert (docs / "img" / "batch_study.png").stat().st_size > 0
  mtimes = {r: (out / "runs" / r / runner.RESULT).stat().st_mtime for r in runs}
  cli.main(argv)  # finished runs are skipped
  assert "trained 0 runs this time" in capsys.readouterr().out
  assert mtimes == {r: (out / "runs" / r / runner.RESULT).stat().st_mtime for r in runs}


def test_paired_noise_is_the_scatter_about_the_grid_pattern():
  rng = np.random.default_rng(0)
  pattern = 4.0 + 0.3 * rng.random(30)            # 30 grid points
  shifts = np.array([0.05, -0.08, 0.0, 0.11, -0.02])  # each replicate's level, cancels
  clean = pattern[:, None] * (1 + shifts[None])
  assert analysis.paired_noise(clean)["rel_sd"] == pytest.approx(0.0, abs=1e-7)  # shifts: no noise
  assert analysis.paired_noise(clean)["level_shifts"] == pytest.approx(
      list(np.exp(np.log1p(shifts) - np.log1p(shifts).mean()) - 1))
  rel_sigma = 0.004
  noisy = clean * np.exp(rng.normal(0.0, rel_sigma, (30, 5)))
  est = analysis.paired_noise(noisy)
  assert est["rel_sd"] == pytest.approx(rel_sigma, rel=0.2)   # 116 degrees of freedom
  assert est["sd"] == pytest.approx(rel_sigma * noisy.mean(), rel=0.2)
  assert analysis.paired_noise(noisy[:, :1])["sd"] is None


@pytest.mark.parametrize("naive_worse", [True, False])
def test_replicated_grid_verdict(naive_worse):
  """Three replicates with level shifts between them; reparameterised flat, naive either worse
  (by 4-10% at each B) or the same as reparameterised but for noise: the paired test says
  which, and its figures agree with scipy's paired t test on the per-replicate means."""
  from scipy import stats
  study = plan.Study(base_batch=4, base_tokens=D_BASE, batches=(1, 2, 4, 8, 16), grid_mask_seeds=2)
  results = {}

  def add(*args, **kw):
    name, r = fake_result(study, *args, **kw)
    results[name] = r
  rng = np.random.default_rng(1)
  naive = {1: 1.04, 2: 1.06, 8: 1.05, 16: 1.10} if naive_worse else dict.fromkeys((1, 2, 8, 16), 1.0)
  ln = {}  # (sde, batch) -> per-replicate ln losses
  for j, (mask_seed, level) in enumerate(((-1, 3.0), (1, 3.2), (2, 2.9))):
    for b in (1, 2, 4, 8, 16):
      rep = {1: 1.0, 2: 1.003, 4: 1.0, 8: 1.004, 16: 1.05}[b]
      loss = level * rep * math.exp(rng.normal(0, 0.001))
      add(b, D_BASE, True, 1.0, loss, mask_seed=mask_seed)
      ln.setdefault((True, b), []).append(math.log(loss))
      if b != 4:
        loss = level * rep * naive[b] * math.exp(rng.normal(0, 0.001))
        add(b, D_BASE, False, 1.0, loss, mask_seed=mask_seed)
        ln.setdefault((False, b), []).append(math.log(loss))
  report = analysis.analyse(results, study)
  b = report["batch"]
  assert b["below"] == [1, 2, 4, 8] and b["reparam_spread"] < 0.015
  assert len(b["by_replicate"]) == 3 and b["paired_noise"]["replicates"] == 3
  assert b["paired_noise"]["points"] == 9   # 5 reparameterised + 4 naive
  assert b["paired_noise"]["level_shifts"][2] < 0 < b["paired_noise"]["level_shifts"][1]
  paired = b["naive_paired"]
  assert paired["batches"] == [1, 2, 8] and paired["df"] == 2
  per_rep = lambda sde: np.mean([ln[(sde, x)] for x in (1, 2, 8)], axis=0)  # noqa: E731
  ref = stats.ttest_rel(per_rep(False), per_rep(True))
  assert paired["pooled"]["t"] == pytest.approx(ref.statistic, rel=1e-9)
  assert paired["pooled"]["mean"] == pytest.approx(np.mean(per_rep(False) - per_rep(True)))
  assert paired["t_crit"] == pytest.approx(4.302653, rel=1e-5)
  for x in (1, 2, 8):
    assert paired["per_batch"][x]["mean"] == pytest.approx(
        np.mean(np.subtract(ln[(False, x)], ln[(True, x)])))
  assert paired["worse"] == naive_worse
  verdict = analysis.naive_vs_flat(b, b["paired_noise"]["rel_sd"], 3, 4)
  assert set(verdict["z"]) == {1, 2, 8}
  text = report_lib.markdown(results, study, report)
  assert ("reparameterised runs within 1.5% of each other below B_crit over a span of at least "
          "8x: **yes**") in text
  assert f"(pooled paired t test, 95%): **{'yes' if naive_worse else 'no'}**" in text
  # A point above B_crit that the study stopped at under one replicate is left out of the
  # replicate analysis, not a reason to drop it.
  add(32, D_BASE, True, 1.0, 3.0 * 1.2, mask_seed=-1)
  partial = analysis.analyse(results, study)["batch"]
  assert partial["naive_paired"] == paired
  assert partial["first_above"] == 16 and partial["below"] == b["below"]
  assert partial["incomplete"] == ["b32_d524288_sde_k1"]
  assert partial["paired_noise"] == b["paired_noise"]
  assert "left out, without every replicate: b32_d524288_sde_k1" in report_lib.markdown(
      results, study, analysis.analyse(results, study))


def test_grid_grows_reparameterised_replicates_first(tmp_path):
  """A point above the given batches gets study.growth_replicates reparameterised runs; it is
  filled out (every replicate, naive too) only while the grid is still flat."""
  study = plan.Study(base_batch=4, base_tokens=D_BASE, batches=(1, 2, 4), grid_mask_seeds=3,
                   growth_replicates=2)
  level = {1: 3.0, 2: 3.0, 4: 3.0, 8: 3.01, 16: 3.15, 32: 3.3}

  class Synthetic(runner.Runner):
    def ensure(self, runs):
      runs = list(runs)
      for run in runs:
        name, r = fake_result(study, run.batch, run.tokens, run.sde, run.kappa_mult,
                              level[run.batch] * (1.02 if run.batch != 4 and not run.sde else 1),
                              mask_seed=run.mask_seed)
        self.results.setdefault(name, r)
      return [self.results[r.name] for r in runs]
  grid = Synthetic(study, str(tmp_path))
  grid.batch_grid(1.0)
  trained = {(r["batch"], r["sde"]): 0 for r in grid.results.values()}
  for r in grid.results.values():
    trained[(r["batch"], r["sde"])] += 1
  assert trained == {(1, True): 4, (1, False): 4, (2, True): 4, (2, False): 4, (4, False): 4,
                     (8, True): 4, (8, False): 4, (16, True): 2}
  b = analysis.analyse(grid.results, study)["batch"]
  assert b["first_above"] == 16 and b["below"] == [1, 2, 4, 8]
  assert b["incomplete"] == ["b16_d524288_sde_k1"]
  assert b["naive_paired"]["pooled"]["mean"] == pytest.approx(math.log(1.02))


def test_study_settings_give_the_flags_and_the_run_argument():
  """The command line's flags come from Study's fields; a run's experiment argument parses back
  to its run and the study's run-key settings, in any key order."""
  import argparse
  parser = argparse.ArgumentParser()
  plan.add_study_flags(parser)
  assert plan.study_from_flags(parser.parse_args([]), data="synthetic") == plan.Study()
  args = parser.parse_args(["--batches=2,4", "--kappas=0.5,2", "--horizons=", "--tol=0.02",
                            "--noise=step", "--width=128"])
  study = plan.study_from_flags(args, data="/d")
  assert (study.batches, study.kappas, study.horizons, study.tol, study.noise, study.width) == \
      ((2, 4), (0.5, 2.0), (), 0.02, "step", 128)
  with pytest.raises(SystemExit):
    parser.parse_args(["--loss_norm=other"])
  run = study.run(8, sde=True, kappa_mult=0.5, seed=2, clip=1.0, mask_seed=3)
  arg = study.arg(run)
  parsed, parsed_run, gamma = plan.from_arg(plan.arg_values(arg))
  assert parsed_run == run and gamma == plan.PAPER_GAMMA
  assert (parsed.data, parsed.width, parsed.noise, parsed.base_tokens) == ("/d", 128, "step",
                                                                           study.base_tokens)
  reordered = ",".join(reversed(arg.split(",")))
  assert plan.arg_values(reordered) == plan.arg_values(arg)
  quick, quick_run, _ = plan.from_arg({"quick": "1"})
  assert (quick_run.batch, quick_run.tokens, quick.seq_len, quick.eval_rows) == (4, 1024, 32, 32)


def test_run_config_matches_the_experiment_file():
  """The runner's config (plan.run_config) is the experiment file's, and it says what it trains:
  the run's batch and horizon, the study's model and base point, the base AdamW values
  reparameterised by kappa_mult."""
  from tmdiff.configs.base import get_base_config
  from tmdiff.configs.derived import reparameterise
  run = plan.Run(batch=8, tokens=D_BASE, sde=True, kappa_mult=2.0, mask_seed=3)
  study = plan.Study(base_batch=16, base_tokens=D_BASE, width=128, min_lr=0.0)
  c = plan.run_config(study, run)
  assert c.to_dict() == experiment.get_config(study.arg(run)).to_dict()
  base = get_base_config().optim
  assert plan.base_adamw() == (base.lr, base.beta1, base.beta2, base.eps)
  lr, beta1, beta2, eps = reparameterise(*plan.base_adamw(), 2.0)
  assert (c.optim.lr, c.optim.beta1, c.optim.beta2, c.optim.eps) == (lr, beta1, beta2, eps)
  assert (c.optim.clip_norm, c.optim.min_lr_ratio) == (0.0, 0.0)
  assert (c.model.d_model, c.model.n_layers, c.model.n_heads, c.model.n_kv_heads,
          c.model.d_ff) == (128, 2, 4, 2, 384)
  assert (c.data.global_batch, c.data.seq_len, c.data.eval_batches) == (8, 128, 1024 // 8)
  assert (c.sde.enabled, c.sde.batch_base, c.sde.tokens_base, c.sde.gamma) == \
      (True, 16, float(D_BASE), plan.PAPER_GAMMA)
  assert (c.seeds.masks, c.train.eval_every) == (3, 0)
  hp = derive(c)
  assert hp.steps == D_BASE // (8 * 128) == c.train.steps
  with pytest.raises(ValueError, match="multiple of 64"):
    plan.run_config(plan.Study(width=96), run)
  with pytest.raises(ValueError, match="bad argument .bogus=1."):
    experiment.get_config("batch=4,bogus=1")
