"""The Bazel BUILD file declares every library source and test in the tree."""
import os
import re

from tmdiff.tools import gen_build


def test_build_file_is_in_sync_with_the_tree():
  with open(os.path.join(gen_build.ROOT, "BUILD")) as f:
    current = f.read()
  assert current == gen_build.render(), "BUILD is stale: run python -m tmdiff.tools.gen_build"


def test_every_source_and_test_is_declared():
  with open(os.path.join(gen_build.ROOT, "BUILD")) as f:
    build = f.read()
  declared = set(re.findall(r'"([\w/]+\.py)"', build))
  for root in ("tmdiff", "tests", "experiments"):
    for dirpath, _, files in os.walk(os.path.join(gen_build.ROOT, root)):
      for name in files:
        if name.endswith(".py"):
          rel = os.path.relpath(os.path.join(dirpath, name), gen_build.ROOT)
          assert rel in declared, f"{rel} is missing from BUILD"
  for name in os.listdir(os.path.join(gen_build.ROOT, "tests")):
    if name.startswith("test_") and name.endswith(".py"):
      assert f'name = "{name[:-3]}"' in build
