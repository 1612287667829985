"""Sweeps: expansion, launch commands that launch.py accepts, the collector's N / D / C, and a
two-run sweep end to end (train, skip when finished, table, fits, plots)."""
import contextlib
import csv
import importlib.util
import io
import json
import os
import shlex
import sys
import textwrap

import jax
import numpy as np
import pytest

from tmdiff.configs import base as base_config
from tmdiff.data.vocab import VocabLayout
from tmdiff.scaling import collect
from tmdiff.scaling import fit as fit_lib
from tmdiff.scaling import sweep as sweep_lib
from tmdiff.train.trainer import Trainer, make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_launcher():
  path = os.path.join(ROOT, "launch", "launch.py")
  spec = importlib.util.spec_from_file_location("tmdiff_launch", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def write_sweep(tmp_path, body: str) -> str:
  path = tmp_path / "my_sweep.py"
  path.write_text("from tmdiff.scaling.sweep import Run, Sweep, product\n" + textwrap.dedent(body))
  return str(path)


def test_product_names_overrides_and_meta():
  runs = sweep_lib.product("experiments/tiny.py", common={"data.seq_len": 64},
                           size={"a": {"model.d_model": 32}, "b": {"model.d_model": 64}},
                           horizon={"h1": {"train.tokens": 1e4}, "h2": {"train.tokens": 2e4}})
  assert [r.name for r in runs] == ["a_h1", "a_h2", "b_h1", "b_h2"]
  assert runs[2].overrides == {"data.seq_len": 64, "model.d_model": 64, "train.tokens": 1e4}
  assert runs[3].meta == {"size": "b", "horizon": "h2"}


def test_resolve_derives_eval_cadence_and_names_bad_overrides(tmp_path):
  good = write_sweep(tmp_path, """
      def get_sweep(arg=""):
        return Sweep("s", [Run("r", "experiments/tiny.py", {"train.steps": 103})], evals_per_run=4)
  """)
  (r,) = sweep_lib.resolve(sweep_lib.load_sweep(good))
  assert (r.steps, r.config.train.eval_every, r.overrides["train.eval_every"]) == (103, 26, 26)
  typo = write_sweep(tmp_path, """
      def get_sweep(arg=""):
        return Sweep("s", [Run("r", "experiments/tiny.py", {"model.d_modle": 3})])
  """)
  with pytest.raises(sweep_lib.SweepError, match="d_modle"):
    sweep_lib.resolve(sweep_lib.load_sweep(typo))
  invalid = write_sweep(tmp_path, """
      def get_sweep(arg=""):
        return Sweep("s", [Run("bad", "experiments/tiny.py", {"model.n_kv_heads": 3})])
  """)
  with pytest.raises(sweep_lib.SweepError, match="run 'bad'.*n_kv_heads"):
    sweep_lib.resolve(sweep_lib.load_sweep(invalid))
  dupes = write_sweep(tmp_path, """
      def get_sweep(arg=""):
        return Sweep("s", [Run("x", "experiments/tiny.py"), Run("x", "experiments/tiny.py")])
  """)
  with pytest.raises(sweep_lib.SweepError, match="unique"):
    sweep_lib.load_sweep(dupes)


def _emit(argv) -> list[str]:
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert sweep_lib.main(argv) == 0
  return [line for line in out.getvalue().splitlines() if line.startswith("python launch/")]


def run_launcher(launcher, argv, monkeypatch) -> str:
  """launch.py's main in this process; config_flags finds overrides in sys.argv, so set it."""
  monkeypatch.setattr(sys, "argv", ["launch/launch.py", *argv])
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert launcher.main(argv) == 0
  return out.getvalue()


def test_emitted_commands_are_accepted_by_launch_py(tmp_path, monkeypatch):
  launcher = load_launcher()
  lines = _emit(["--sweep=experiments/sweeps/ladder.py:sizes=xxs/l,horizons=0.5/1",
                 f"--root={tmp_path / 'ladder'}", "--emit=slurm", "--launch_args=--partition=p"])
  assert len(lines) == 4
  assert "--nodes=1 --gpus_per_node=8" in lines[2]  # l: h100x8
  for line in lines:
    script = run_launcher(launcher, shlex.split(line)[2:] + ["--dry_run", "--validate_devices"],
                          monkeypatch)
    assert "#SBATCH --partition=p" in script and "--config.train.eval_every=" in script
  record = json.loads((tmp_path / "ladder" / "l_1x" / sweep_lib.RUN_FILE).read_text())
  assert record["hw"] == "h100x8"

  xpk = _emit(["--sweep=experiments/sweeps/ladder.py:sizes=l,horizons=1,hw=v5p-64",
               "--root=gs://bucket/ladder", "--emit=xpk",
               "--launch_args=--cluster=c --docker_image=img"])
  assert len(xpk) == 1 and "--tpu_type=v5p-64" in xpk[0]
  command = run_launcher(launcher, shlex.split(xpk[0])[2:] + ["--dry_run", "--validate_devices"],
                         monkeypatch)
  assert "--workdir=gs://bucket/ladder/l_1x" in command
  with pytest.raises(sweep_lib.SweepError, match="not a TPU"):
    _emit(["--sweep=experiments/sweeps/ladder.py:sizes=l,horizons=1", "--root=gs://b/x",
           "--emit=xpk"])


def test_collector_counts_and_deduplicates(tmp_path):
  """N from the built model's parameters, D and C from the step; a re-logged step counted once."""
  run = tmp_path / "r"
  run.mkdir()
  config = base_config.get_base_config()
  config.diffusion.anti_masking = True
  config.data.global_batch, config.data.seq_len, config.train.steps = 8, 64, 30
  (run / sweep_lib.CONFIG_FILE).write_text(config.to_json())
  evals = [(10, 9.0), (20, 8.0), (20, 7.5), (30, 7.0)]  # step 20 logged twice (a resumed run)
  with open(run / "metrics.jsonl", "w") as f:
    f.write(json.dumps({"step": 5, "split": "train", "bits_per_token/all": 99.0}) + "\n")
    for step, bits in evals:
      f.write(json.dumps({"step": step, "split": "eval", "bits_per_token/text": bits,
                          "bits_per_token/all": bits + 1}) + "\n")
  rows = collect.collect(str(tmp_path))
  assert [(r["step"], r["modality"], r["loss"]) for r in rows] == [
      (10, "text", 9.0), (10, "all", 10.0), (20, "text", 7.5), (20, "all", 8.5),
      (30, "text", 7.0), (30, "all", 8.0)]
  trainer = Trainer(config, make_mesh(config, jax.devices()[:1]))
  n_model = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.abstract_state["params"]))
  vocab = VocabLayout.from_config(config.vocab).padded_size()
  m = config.model
  attention_flops = 2 * 2 * m.n_layers * 64 * m.n_heads * m.head_dim * 3
  for r in rows:
    assert r["params"] == n_model
    assert r["tokens"] == 4 * 64 * r["step"]  # anti-masking: 4 rows loaded, each trained twice
    matmul = r["params"] - (vocab * m.d_model + 3 * m.d_model)  # embedding lookups are free
    assert r["flops"] == pytest.approx((6 * matmul + attention_flops) * 8 * 64 * r["step"])
    assert r["final"] == (r["step"] == 30)
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "metrics.jsonl").write_text("")
  seen = []
  collect.collect(str(tmp_path), log=seen.append)
  assert "empty" in seen[0]


def test_tiny_sweep_end_to_end(tmp_path):
  sweep_file = write_sweep(tmp_path, """
      SIZES = {"w16": {"model.d_model": 16, "model.n_heads": 1, "model.n_kv_heads": 1,
                       "model.head_dim": 16, "model.d_ff": 32, "model.n_layers": 1},
               "w32": {"model.d_model": 32, "model.n_heads": 2, "model.n_kv_heads": 2,
                       "model.head_dim": 16, "model.d_ff": 64, "model.n_layers": 1}}
      def get_sweep(arg=""):
        common = {"data.global_batch": 4, "data.seq_len": 32, "data.eval_batches": 1,
                  "train.tokens": 4 * 32 * 6, "train.log_every": 3}
        return Sweep("t", product("experiments/tiny.py", common=common, size=SIZES),
                     evals_per_run=2)
  """)
  root, out = tmp_path / "root", tmp_path / "out"
  argv = [f"--sweep={sweep_file}", f"--root={root}", f"--out={out}", "--devices=1",
          "--n_boot=2", "--compile_cache="]
  log = io.StringIO()
  with contextlib.redirect_stdout(log):
    assert sweep_lib.main(argv) == 0
  text = log.getvalue()
  assert "[1/2] w16: 6 steps" in text and "[2/2] w32: done in" in text
  for name in ("w16", "w32"):
    record = json.loads((root / name / sweep_lib.RUN_FILE).read_text())
    assert record["overrides"]["train.eval_every"] == 3 and record["meta"] == {"size": name}
  with open(out / "runs.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 2 * 2 * 4  # runs x evals (steps 3, 6) x modalities
  assert {(r["run"], r["step"]) for r in rows} == {
      (n, s) for n in ("w16", "w32") for s in ("3", "6")}
  runs = fit_lib.load_runs(str(out / "runs.csv"))
  assert len(set(runs.params)) == 2 and set(runs.tokens) == {4 * 32 * 3, 4 * 32 * 6}
  assert set(json.loads((out / "fits.json").read_text())) == {"text", "image", "audio", "all"}
  assert (out / "loss_curves_text.png").read_bytes()[:4] == b"\x89PNG"
  # Resumable: a second call trains nothing.
  log = io.StringIO()
  with contextlib.redirect_stdout(log):
    assert sweep_lib.main(argv + ["--no_fit"]) == 0
  assert log.getvalue().count("finished, skipped") == 2
