"""Topology compile check: per-device memory and FLOPs from an ahead-of-time compile, checked
against independent counts; a point that does not fit fails with advice; TPU via libtpu."""
import contextlib
import io
import math

import numpy as np
import pytest

from tmdiff.configs.derived import derive
from tmdiff.data.vocab import VocabLayout
from tmdiff.scaling import topology
from tmdiff.scaling import sweep as sweep_lib
from tmdiff.train import flops as flops_lib

TINY = {"model.d_model": 64, "model.n_layers": 1, "model.n_heads": 2, "model.n_kv_heads": 2,
        "model.head_dim": 32, "model.d_ff": 128, "data.seq_len": 128, "data.global_batch": 16}


def tiny_config(**extra):
  return sweep_lib.load_config("experiments/tiny.py", {**TINY, **extra})


def test_targets():
  assert topology.target_of("h100x64") == topology.Target("h100x64", "gpu", "h100", 64, 8)
  v5p = topology.target_of("v5p-128")
  assert (v5p.platform, v5p.devices, v5p.hbm_bytes) == ("tpu", 64, 95e9)
  assert topology.tpu_equivalent("h100x64") == "v5p-128"
  assert topology.tpu_equivalent("h100x1") == "v5p-8"
  assert topology.fake_devices_needed(["h100x64", "h100x1", "v5p-128"], full_mesh=False) == 8
  assert topology.fake_devices_needed(["h100x64"], full_mesh=True) == 64
  with pytest.raises(topology.TopologyError, match="unknown hw"):
    topology.target_of("h100x3")


def test_gpu_host_slice_memory_matches_the_state_and_flops_match_the_count():
  """h100x16 = 2 hosts of 8: one host's slice (fsdp 8, half the batch) on 8 fake CPU devices.
  Arguments = fp32 params + Adam's two moments, sharded 8 ways, plus this device's batch rows."""
  config = tiny_config(**{"mesh.data": -1, "mesh.fsdp": 8, "data.global_batch": 32})
  r = topology.compile_point(config, "h100x16", point="tiny")
  assert r.indicative and r.fits and "1 host of 2" in r.compiled_on
  assert r.mesh == {"data": 1, "fsdp": 8, "tensor": 1} and r.rows_per_device == 2
  n = r.params_total
  batch_bytes = 6 * 2 * 128 * 4  # six int32 fields, 2 rows of 128 on this device
  state_bytes = 12 * n / 8
  # Small vectors (norm scales, biases) are replicated, not sharded: allow 2% slack.
  assert state_bytes + batch_bytes <= r.argument_gb * 1e9 <= 1.02 * state_bytes + batch_bytes + 64
  assert r.peak_gb == pytest.approx(r.argument_gb + r.output_gb + r.temp_gb - r.alias_gb)
  vocab = VocabLayout.from_config(config.vocab).padded_size()
  hp = derive(config)
  analytic = flops_lib.train_flops_per_token(config.model, vocab, 128) * 16 * 128 / 8
  assert r.analytic_flops_per_device == pytest.approx(analytic)
  assert hp.batch == 32
  assert r.xla_flops_per_device == pytest.approx(analytic, rel=0.35)


def test_advice_names_what_to_change():
  config = tiny_config(**{"mesh.fsdp": 8, "mesh.data": 1})
  gb = 1e9
  state = topology.advice(config, {"argument": 50 * gb, "output": 50 * gb, "alias": 49 * gb,
                                   "temp": 10 * gb}, 40 * gb, 8)
  assert "train state alone" in state and "mesh.fsdp=16" in state
  acts = topology.advice(config, {"argument": 20 * gb, "output": 20 * gb, "alias": 20 * gb,
                                  "temp": 90 * gb}, 50 * gb, 8)
  assert "optim.grad_accum=4" in acts and "model.remat=block" in acts  # 90 / 30 -> 3 -> 4


def test_cli_fails_clearly_when_a_point_does_not_fit():
  err, out = io.StringIO(), io.StringIO()
  with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
    code = topology.main(["--config=experiments/tiny.py", "--hw=h100x8", "--hbm_gb=0.002",
                          *(f"--override={k}={v}" for k, v in TINY.items())])
  assert code == 1
  message = err.getvalue()
  assert "does not fit h100x8" in message and "GB per device needed" in message
  assert "grad_accum" in message or "mesh.fsdp" in message
  assert "| NO |" in out.getvalue()


def test_tpu_compile_via_libtpu():
  pytest.importorskip("libtpu")
  config = tiny_config(**{"model.attention_impl": "xla"})
  try:
    r = topology.compile_point(config, "v5p-8", point="tiny")
  except topology.TopologyError as e:
    pytest.skip(str(e))
  assert not r.indicative and r.compiled_on.startswith("tpu v5p:2x2x1")
  assert r.fits and r.hbm_gb == 95 and r.mesh["data"] == 4
  assert r.xla_flops_per_device == pytest.approx(r.analytic_flops_per_device, rel=0.25)
  assert math.isfinite(r.peak_gb) and r.peak_gb > 12 * r.params_total / 1e9 * np.float64(1.0)
