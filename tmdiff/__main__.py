"""The `tmdiff` command: `tmdiff COMMAND [FLAGS]`, the same as `python -m MODULE [FLAGS]`.

  tmdiff prepare --out=runs/data
  tmdiff train --config=experiments/tiny.py:runs/data --workdir=runs/tiny
  tmdiff sample --workdir=runs/tiny --task=t2i --prompt="one shape: large red circle center." --out=a.png
  tmdiff eval --workdir=runs/tiny
  tmdiff plot --workdir=runs/tiny
"""
from __future__ import annotations

import os
import runpy
import sys

COMMANDS = {
    "prepare": ("tmdiff.data.prepare", "prepare the embedded data, train its tokenizers"),
    "train": ("tmdiff.train", "train a model from an experiment file"),
    "sample": ("tmdiff.sample", "generate text, images (t2i) or speech (t2s) from a checkpoint"),
    "eval": ("tmdiff.eval", "per-modality ELBO and generation metrics of a checkpoint"),
    "judges": ("tmdiff.eval.judges", "train or check the judges the eval scores with"),
    "sweep": ("tmdiff.eval.sweep", "sweep sampler settings on a checkpoint"),
    "ladder": ("tmdiff.scaling.ladder", "plan and run a scaling ladder"),
    "fit": ("tmdiff.scaling.fit", "fit scaling laws to collected runs"),
    "plot": ("tmdiff.tools.plot_metrics", "draw a workdir's training curves as a PNG"),
}


def usage() -> str:
  width = max(map(len, COMMANDS))
  rows = "\n".join(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items())
  return f"usage: tmdiff COMMAND [FLAGS]  (tmdiff COMMAND --help for its flags)\n\n{rows}"


def main(argv=None) -> None:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ("-h", "--help", "help"):
    print(usage())
    return
  if argv[0] not in COMMANDS:
    print(f"tmdiff: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
    sys.exit(2)
  module = COMMANDS[argv[0]][0]
  sys.argv[1:] = argv[1:]  # runpy sets sys.argv[0] to the module's file
  if "" not in sys.path and os.getcwd() not in sys.path:  # as `python -m`: experiments/ imports
    sys.path.insert(0, os.getcwd())
  runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
