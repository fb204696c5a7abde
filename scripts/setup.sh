#!/usr/bin/env bash
# Set up moealign on a fresh machine: PyTorch (CPU build unless one is already installed), then
# the package with its Hugging Face and test extras. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  # An exact pin takes the local CPU wheel; a looser one would pull a multi-GB CUDA build.
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[hf,test]"
# Headless Chromium for the test that opens the HTML report in a browser (Debian's package);
# without root or apt-get that test is skipped with the reason.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo -n"; fi
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null; } \
    || echo "setup.sh: could not install chromium; the browser test of the report will be skipped" >&2
fi
# Under pyenv, expose the new `moealign` command through its shims.
if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
