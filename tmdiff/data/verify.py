"""Checks a prepared data directory's shards against the sha256 digests in its manifest.

  python -m tmdiff.data.verify DIR      # exit 1 naming each damaged or missing shard

A damaged shard is otherwise found only when training reads the damaged record.
"""
from __future__ import annotations

import hashlib
import os
import sys

from tmdiff.data import records as records_lib

DIGESTS = "shard_sha256"  # manifest.extra key: source -> split -> [sha256 per shard]


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def shard_digests(directory: str, shards: dict) -> dict:
  """{source: {split: [sha256 of each shard]}} for the manifest's `shards` entry."""
  return {source: {split: [sha256(os.path.join(directory, source, n)) for n in names]
                   for split, names in splits.items()} for source, splits in shards.items()}


def verify(directory: str) -> tuple[int, list[str]]:
  """-> (shards checked, 'PATH: problem' for each bad one). Raises RecordError when the
  manifest has no digests (prepared before they were recorded)."""
  manifest = records_lib.Manifest.load(directory)
  digests = manifest.extra.get(DIGESTS)
  if digests is None:
    raise records_lib.RecordError(
        f"{os.path.join(directory, records_lib.MANIFEST)} has no shard digests ({DIGESTS}); "
        "rerun prepare to record them")
  checked, problems = 0, []
  for source, splits in manifest.shards.items():
    for split, names in splits.items():
      for name, want in zip(names, digests.get(source, {}).get(split, [])):
        path = os.path.join(directory, source, name)
        checked += 1
        if not os.path.exists(path):
          problems.append(f"{path}: missing")
        elif sha256(path) != want:
          problems.append(f"{path}: sha256 differs from the manifest (damaged or replaced)")
  return checked, problems


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 1:
    print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
    return 2
  try:
    checked, problems = verify(argv[0])
  except records_lib.RecordError as e:
    print(f"tmdiff.data.verify: {e}", file=sys.stderr)
    return 1
  for p in problems:
    print(p)
  print(f"{checked} shards checked, {len(problems)} bad")
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
