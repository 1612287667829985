"""Scaling: L(N, D) / L(C) fits recover known laws, frontier closed forms, plots, the size ladder."""
import importlib.util
import json
import math
import os

import numpy as np
import pytest
from scipy import optimize

from tmdiff.configs import validate as validate_lib
from tmdiff.configs.derived import derive
from tmdiff.scaling import fit, ladder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRUE = fit.LawND(E=1.7, A=400.0, alpha=0.34, B=410.0, beta=0.28)
SIZES = np.logspace(6.5, 9.5, 7)


@pytest.fixture(scope="module")
def noisy_report():
  runs = fit.synthetic_runs({"text": TRUE}, SIZES, noise=0.005, seed=1)
  return fit.fit_modality(runs, n_boot=40, level=0.95, seed=0)


def test_fit_recovers_known_coefficients_within_bootstrap_intervals(noisy_report):
  ci = noisy_report["ci_nd"]
  for name in ("E", "A", "alpha", "B", "beta"):
    iv = ci[name]
    assert iv["low"] <= getattr(TRUE, name) <= iv["high"], (name, iv)
    assert iv["low"] <= iv["estimate"] <= iv["high"]
  law = noisy_report["law_nd"]
  assert law["E"] == pytest.approx(TRUE.E, rel=0.03)
  assert law["alpha"] == pytest.approx(TRUE.alpha, abs=0.03)
  assert law["beta"] == pytest.approx(TRUE.beta, abs=0.03)
  assert law["A"] == pytest.approx(TRUE.A, rel=0.5) and law["B"] == pytest.approx(TRUE.B, rel=0.5)
  # The frontier exponent D* ~ N^(alpha/beta) is the quantity that matters; it is close too.
  assert noisy_report["frontier"]["d_of_n"]["exp"] == pytest.approx(TRUE.alpha / TRUE.beta, rel=0.1)
  # L(C) on the lowest-loss envelope: its exponent is near the exact alpha beta / (alpha + beta).
  assert noisy_report["law_c"]["gamma"] == pytest.approx(TRUE.gamma, rel=0.15)
  assert noisy_report["extrapolation"]["mean_abs_rel_error"] < 0.03


def test_noiseless_fit_is_exact_and_extrapolates():
  runs = fit.synthetic_runs({"text": TRUE}, SIZES)
  law = fit.fit_nd(runs.params, runs.tokens, runs.loss)
  for name in ("E", "A", "alpha", "B", "beta"):
    assert getattr(law, name) == pytest.approx(getattr(TRUE, name), rel=1e-3), name
  ext = fit.extrapolation_error(runs, n_cut=SIZES[-2] * 1.01)  # fit on N < 1e9, predict 3.2e9
  assert ext["n_test"] == pytest.approx(SIZES[-1])
  assert len(ext["points"]) == 12 and ext["max_abs_rel_error"] < 1e-3


@pytest.mark.parametrize("k", [6.0, 7.3])
def test_frontier_matches_closed_forms(k):
  law = TRUE
  for c in (1e18, 1e21, 1e24):
    # Numerical minimiser of L(N, C / (k N)) over log N.
    res = optimize.minimize_scalar(lambda x: float(law(math.exp(x), c / (k * math.exp(x)))),
                                   bounds=(5, 30), method="bounded", options=dict(xatol=1e-10))
    assert law.n_opt(c, k) == pytest.approx(math.exp(res.x), rel=1e-4)
    assert law.n_opt(c, k) * law.d_opt(c, k) * k == pytest.approx(c)
    assert law.d_opt_of_n(law.n_opt(c, k)) == pytest.approx(law.d_opt(c, k), rel=1e-9)
    assert law.tokens_per_param(c, k) == pytest.approx(law.d_opt(c, k) / law.n_opt(c, k))
    assert law.loss_opt_law(k)(c) == pytest.approx(law.loss_opt(c, k), rel=1e-10)
  a, b = law.a, law.b
  assert (a, b) == pytest.approx((0.28 / 0.62, 0.34 / 0.62)) and a + b == pytest.approx(1.0)
  assert law.gamma == pytest.approx(0.34 * 0.28 / 0.62)
  # D*(N) slope is alpha / beta whatever k is.
  n = np.array([1e8, 1e9])
  assert np.diff(np.log(law.d_opt_of_n(n)))[0] / math.log(10) == pytest.approx(0.34 / 0.28)


def test_loss_vs_compute_fit_recovers_exact_law():
  truth = TRUE.loss_opt_law()
  c = np.logspace(15, 23, 25)
  law = fit.fit_c(c, truth(c))
  assert (law.E, law.A, law.gamma) == pytest.approx((truth.E, truth.A, truth.gamma), rel=1e-3)


def test_isoflop_minima_track_the_frontier():
  sizes = np.logspace(6, 10, 17)
  runs = fit.synthetic_runs({"text": TRUE}, sizes, horizons=np.logspace(0, 4, 13), fractions=(1.0,))
  slices = fit.isoflop_slices(runs, [1e18, 1e20])
  for s in slices:
    assert s["n_opt"] == pytest.approx(float(TRUE.n_opt(s["flops"])), rel=0.25)


def test_runs_table_csv_json_round_trip(tmp_path):
  runs = fit.synthetic_runs({"text": TRUE, "audio": TRUE}, SIZES[:3], noise=0.01)
  for ext in ("csv", "json"):
    path = str(tmp_path / f"runs.{ext}")
    fit.save_runs(runs, path)
    back = fit.load_runs(path)
    assert back.modalities == ["audio", "text"] and len(back) == len(runs)
    np.testing.assert_allclose(back.loss, runs.loss)
    assert list(back.run) == list(runs.run)
  # Aliases, missing flops -> 6 N D, JSON lines.
  path = tmp_path / "runs.jsonl.json"
  path.write_text('{"run": "a", "N": 10, "D": 100, "L": 3.0}\n{"run": "a", "N": 10, "D": 200, "L": 2.5}\n')
  r = fit.load_runs(str(path))
  assert r.flops.tolist() == [6000.0, 12000.0] and r.modalities == ["all"]
  assert len(r.final()) == 1 and r.final().tokens[0] == 200
  (tmp_path / "bad.csv").write_text("run,modality,params,tokens,flops,loss\nx,text,10,100,,-1\n")
  with pytest.raises(ValueError, match="non-positive"):
    fit.load_runs(str(tmp_path / "bad.csv"))


def test_cli_writes_fits_and_plots(tmp_path):
  runs = fit.synthetic_runs({"text": TRUE}, SIZES[::2], horizons=(10, 100, 1000), noise=0.005)
  fit.save_runs(runs, str(tmp_path / "runs.csv"))
  out = tmp_path / "out"
  from tmdiff.scaling.fit import __main__ as fit_cli
  fit_cli.main([f"--runs={tmp_path / 'runs.csv'}", f"--out={out}", "--n_boot=4"])
  report = json.loads((out / "fits.json").read_text())
  assert set(report["text"]) >= {"law_nd", "ci_nd", "law_c", "frontier", "extrapolation"}
  for name in ("loss_curves_text.png", "isoflop_text.png", "frontier_text.png"):
    data = (out / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name


# ----------------------------------------------------------------------------- the size ladder

def _experiment():
  spec = importlib.util.spec_from_file_location("ladder_exp", os.path.join(ROOT, "experiments", "ladder.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("size", ladder.ORDER)
def test_every_ladder_size_validates_on_its_target(size):
  exp = _experiment()
  c = exp.get_config(f"size={size}")
  hw = ladder.HARDWARE[ladder.SIZES[size].hw]
  validate_lib.validate(c, num_devices=hw.devices)
  assert (c.model.base_width, c.model.base_depth) == (ladder.BASE_WIDTH, ladder.BASE_DEPTH)
  assert c.model.d_model == c.model.n_heads * c.model.head_dim or size == "xxs"
  hp = derive(c)
  row = ladder.describe(c, size, ladder.SIZES[size].hw)
  assert hp.token_horizon == pytest.approx(ladder.frontier_tokens(row.total), rel=1e-9)
  assert hp.steps == round(hp.token_horizon / (c.data.seq_len * c.data.global_batch))


def test_ladder_grows_and_hits_3b_and_beyond():
  rows = ladder.table()
  totals = [r.total for r in rows]
  non_emb = [r.non_embedding for r in rows]
  assert all(a < b for a, b in zip(totals, totals[1:]))
  assert all(a < b for a, b in zip(non_emb, non_emb[1:]))
  assert all(a < b for a, b in zip([r.compute for r in rows], [r.compute for r in rows][1:]))
  three = {r.size: r for r in rows}["3b"]
  assert abs(three.total - 3e9) / 3e9 < 0.10 and abs(three.non_embedding - 3e9) / 3e9 < 0.10
  assert rows[-1].total > 7e9 and rows[0].non_embedding < 5e6
  assert all(ladder.SIZES[r.size].head_dim == 128 for r in rows if r.total > 5e7)
  text = ladder.format_table(rows)
  assert text.count("\n") == len(rows) + 1 and "| 3b |" in text


def test_ladder_arguments():
  exp = _experiment()
  base = exp.get_config("size=m")
  double = exp.get_config("size=m,tokens=2x")
  assert double.train.tokens == pytest.approx(2 * base.train.tokens, rel=1e-9)
  c = exp.get_config("size=3b,hw=h100x256,tokens=6.4e12,batch=2048,seq=4096,sde=0")
  assert (c.train.tokens, c.data.global_batch, c.data.seq_len, c.sde.enabled) == (6.4e12, 2048, 4096, False)
  assert (c.mesh.data, c.mesh.fsdp) == (-1, 8)
  validate_lib.validate(c, num_devices=256)
  validate_lib.validate(exp.get_config("size=xl,hw=v5p-64"), num_devices=32)
  with pytest.raises(ValueError, match="bad argument"):
    exp.get_config("sise=m")
  with pytest.raises(ValueError, match="unknown size"):
    exp.get_config("size=xxxl")
  with pytest.raises(ValueError, match="unknown hw"):
    exp.get_config("size=m,hw=h100x3")
