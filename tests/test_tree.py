"""The shape of the source tree, measured from its imports (ast, nothing is imported): no import
circles among tmdiff modules, no source file over MAX_LINES, and no import from a lower layer to
a higher one. Known violations are listed below; each test also fails on an entry that no longer
occurs, so the lists only shrink."""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPS = ("tmdiff", "experiments")
MAX_LINES = 600

# A module may import its own layer and those below. Keys are the module path after `tmdiff.`
# (its first part); `experiments` stands alone on top.
LAYERS = (
    ("", "entry"),                     # tmdiff/__init__, the command-line helpers every command uses
    ("data", "kernels"),
    ("model", "diffusion"),
    ("configs",),
    ("train",),
    ("sample", "eval"),
    ("scaling",),
    ("tools", "__main__"),             # developer tools; the `tmdiff COMMAND` dispatcher
    ("experiments",),
)
LAYER_OF = {key: rank for rank, keys in enumerate(LAYERS) for key in keys}

# Known violations, to be removed as they are fixed.
ALLOWED_CIRCLES = {
    # prepare builds the speech assets; speech_assets' command line runs prepare's options.
    frozenset({"tmdiff.data.prepare", "tmdiff.data.speech_assets"}),
}
ALLOWED_UPWARD = {
    ("tmdiff.data.bench", "tmdiff.configs.base"),          # the bench reads the base config
    ("tmdiff.data.pipeline", "tmdiff.configs.derived"),    # the global batch, steps
    ("tmdiff.train.loop", "tmdiff.eval.elbo"),             # the in-loop eval
    ("tmdiff.train.trainer", "tmdiff.eval.elbo"),
}
ALLOWED_LONG = {  # path: its length now, which it may not exceed
    "tmdiff/data/pipeline.py": 902,
}


def _module_name(path: str) -> str:
  name = os.path.relpath(path, ROOT)[:-len(".py")].replace(os.sep, ".")
  return name[:-len(".__init__")] if name.endswith(".__init__") else name


def _sources() -> dict[str, str]:
  out = {}
  for top in TOPS:
    for folder, _, files in os.walk(os.path.join(ROOT, top)):
      for f in files:
        if f.endswith(".py"):
          path = os.path.join(folder, f)
          out[_module_name(path)] = path
  return out


SOURCES = _sources()


def _imports(name: str, path: str) -> set[str]:
  """The project modules `name` imports anywhere in its file (function-level imports too)."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
  targets = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      for alias in node.names:  # `from pkg import mod` imports pkg.mod
        full = f"{base}.{alias.name}"
        targets.add(full if full in SOURCES else base)
  out = set()
  for target in targets:
    while target and target not in SOURCES:  # `import a.b.c` of a name defined in a.b
      target = target.rpartition(".")[0]
    if target and target != name:
      out.add(target)
  return out


GRAPH = {name: _imports(name, path) for name, path in SOURCES.items()}


def _layer(name: str) -> int:
  parts = name.split(".")
  if parts[0] == "experiments":
    return LAYER_OF["experiments"]
  key = parts[1] if len(parts) > 1 else ""
  if key not in LAYER_OF:
    raise AssertionError(f"{name}: tmdiff.{key} has no layer; add it to LAYERS in {__file__}")
  return LAYER_OF[key]


def _circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
  """The strongly connected components of more than one module (Tarjan, iterative)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []
  for start in sorted(graph):
    if start in index:
      continue
    work = [(start, iter(sorted(graph[start])))]
    index[start] = low[start] = len(index)
    stack.append(start)
    on_stack.add(start)
    while work:
      node, edges = work[-1]
      for nxt in edges:
        if nxt not in index:
          index[nxt] = low[nxt] = len(index)
          stack.append(nxt)
          on_stack.add(nxt)
          work.append((nxt, iter(sorted(graph[nxt]))))
          break
        if nxt in on_stack:
          low[node] = min(low[node], index[nxt])
      else:
        work.pop()
        if work:
          low[work[-1][0]] = min(low[work[-1][0]], low[node])
        if low[node] == index[node]:
          component = set()
          while True:
            member = stack.pop()
            on_stack.discard(member)
            component.add(member)
            if member == node:
              break
          if len(component) > 1:
            out.append(frozenset(component))
  return out


def test_the_circle_finder_finds_circles():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": set()}
  assert sorted(map(sorted, _circles(graph))) == [["a", "b", "c"], ["d", "e"]]


def test_the_import_reader_resolves_modules():
  assert "tmdiff.scaling.batch_study.plan" in GRAPH["experiments.batch_study"]
  assert "tmdiff.scaling.fit" in GRAPH["tmdiff.scaling.plots"]


def test_no_import_circles():
  circles = {c for c in _circles(GRAPH) if any(m.startswith("tmdiff") for m in c)}
  assert not circles - ALLOWED_CIRCLES, "new import circles: " + "; ".join(
      " <-> ".join(sorted(c)) for c in circles - ALLOWED_CIRCLES)
  assert not ALLOWED_CIRCLES - circles, (f"fixed, remove from ALLOWED_CIRCLES in {__file__}: "
                                         f"{[sorted(c) for c in ALLOWED_CIRCLES - circles]}")


def test_no_source_file_over_the_limit():
  lengths = {}
  for path in SOURCES.values():
    with open(path) as f:
      lengths[os.path.relpath(path, ROOT)] = sum(1 for _ in f)
  over = {p: n for p, n in lengths.items() if n > ALLOWED_LONG.get(p, MAX_LINES)}
  assert not over, f"files over {MAX_LINES} lines (or over their allowance): {over}"
  fixed = {p for p in ALLOWED_LONG if lengths.get(p, 0) <= MAX_LINES}
  assert not fixed, f"within the limit now, remove from ALLOWED_LONG in {__file__}: {fixed}"


@pytest.mark.parametrize("top", TOPS)
def test_imports_point_down_the_layers(top):
  upward = {(m, t) for m, targets in GRAPH.items() if m.split(".")[0] == top
            for t in targets if _layer(t) > _layer(m)}
  assert not upward - ALLOWED_UPWARD, "imports from a lower layer to a higher one: " + "; ".join(
      f"{m} -> {t}" for m, t in sorted(upward - ALLOWED_UPWARD))
  gone = {(m, t) for m, t in ALLOWED_UPWARD if m.split(".")[0] == top} - upward
  assert not gone, f"fixed, remove from ALLOWED_UPWARD in {__file__}: {sorted(gone)}"
