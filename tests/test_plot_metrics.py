"""`tmdiff plot`: a workdir's metrics.jsonl drawn as PNG curves; bad input as one line."""
import json
import subprocess
import sys

import matplotlib.image
import pytest

from tmdiff.tools import plot_metrics

RECORDS = ([{"step": s, "split": "train", "loss": 5.0 - s / 10, "lr": 1e-3 * s} for s in range(1, 11)]
           + [{"step": s, "split": "eval", "loss": 4.8 - s / 10} for s in (5, 10)])


def _workdir(tmp_path):
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in RECORDS)
  return tmp_path


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "tmdiff", "plot", *args], capture_output=True,
                        text=True, timeout=120)


def test_series_split_train_and_eval(tmp_path):
  records = plot_metrics.read_metrics(str(_workdir(tmp_path)))
  got = plot_metrics.series(records, "loss")
  assert got["train"] == (list(range(1, 11)), [5.0 - s / 10 for s in range(1, 11)])
  assert got["eval"] == ([5, 10], [4.3, 3.8])
  assert set(plot_metrics.series(records, "lr")) == {"train"}


def test_the_command_writes_one_panel_per_metric(tmp_path):
  work = _workdir(tmp_path)
  result = _cli(f"--workdir={work}", "--metrics=loss,lr")
  assert result.returncode == 0, result.stderr
  image = matplotlib.image.imread(work / "curves.png")
  assert image.shape[:2] == (480, 700)  # figsize 7 x (2.4 per panel) at 100 dpi


@pytest.mark.parametrize("args, names", [
    (["--workdir=/nonexistent/run"], "/nonexistent/run"),
    (["--metrics=loss,bpd"], "bpd"),
])
def test_bad_input_is_one_line_naming_it(tmp_path, args, names):
  if not any(a.startswith("--workdir") for a in args):
    args.append(f"--workdir={_workdir(tmp_path)}")
  result = _cli(*args)
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and names in lines[0] and "Traceback" not in result.stderr


def test_a_damaged_record_names_its_line(tmp_path):
  work = _workdir(tmp_path)
  with open(work / "metrics.jsonl", "a") as f:
    f.write('{"step": 11, "spl\n')
  with pytest.raises(plot_metrics.MetricsError, match=r"metrics.jsonl:13"):
    plot_metrics.read_metrics(str(work))
