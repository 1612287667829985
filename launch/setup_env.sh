#!/usr/bin/env bash
# Sets up a fresh machine: Debian packages (espeak-ng for the speech data), a virtual
# environment in .venv, and tmdiff with its test extras. Safe to run again.
# More extras: TMDIFF_EXTRAS=seqio bash launch/setup_env.sh (CI does; seqio brings TensorFlow,
# ~2 GB and ~3 minutes; without it tests/test_seqio_bridge.py is skipped).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v espeak-ng >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq espeak-ng >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test${TMDIFF_EXTRAS:+,$TMDIFF_EXTRAS}]"
echo "environment ready: $(.venv/bin/python -c 'import jax; print("jax", jax.__version__, jax.devices())')"
