#!/usr/bin/env bash
# The extras environment, .venv-extras, where the optional packages that need torchvision run (open_clip and timm
# import it; PyPI's torchvision does not work beside the default environment's CPU torch 2.13.0): torch 2.14.1 +
# torchvision 0.29.1 (a CUDA build that runs on the CPU; ~5.6 GB), the `clip`, `timm` and `ray` extras, and
# faiss-gpu-cu12 in place of faiss-cpu (both install the `faiss` module: one must go). About 7 GB in all.
# .ci/run runs `pytest -m "extras or faiss"` in it. Idempotent: a second run only checks that everything is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
V=.venv-extras
# --no-cache-dir: pip's wheel cache would keep a second copy of the ~3 GB of CUDA wheels
PIP="$V/bin/python -m pip install -q --no-cache-dir --no-compile"
# The disk check comes first: a full disk half-way through the 5.6 GB install fails with a pip traceback
# ("No space left on device") and leaves a broken environment. Exit 3 names the need; .ci/run reads it.
NEED_GIB=${STRATALIGN_EXTRAS_NEED_GIB:-9}
if [ ! -x "$V/bin/python" ] || ! "$V/bin/python" -c "import torchvision" 2>/dev/null; then
  free_gib=$(df -Pk . | awk 'NR==2 {print int($4 / 1048576)}')
  if [ "$free_gib" -lt "$NEED_GIB" ]; then
    echo "bootstrap_extras: ${free_gib} GiB free on $(df -P . | awk 'NR==2 {print $6}'), the extras environment needs ${NEED_GIB} GiB: free disk space (or set STRATALIGN_EXTRAS_NEED_GIB) and run it again" >&2
    exit 3
  fi
fi
if [ ! -x "$V/bin/python" ]; then
  "$PY" -m venv "$V"
  "$V/bin/python" -m pip install -q --no-cache-dir --upgrade pip
fi
if ! "$V/bin/python" -c "import torchvision" 2>/dev/null; then
  $PIP "torch==2.14.1" "torchvision==0.29.1"
fi
ready="import stratalign, open_clip, timm, ray, faiss; assert hasattr(faiss, 'StandardGpuResources')"
if ! "$V/bin/python" -c "$ready" 2>/dev/null; then
  $PIP -e ".[dev,clip,timm,ray]"
  "$V/bin/python" -m pip uninstall -y -q faiss-cpu
  $PIP "faiss-gpu-cu12>=1.8"
  # faiss-cpu's uninstall removed files the two share when faiss-gpu-cu12 was there before it: put them back
  "$V/bin/python" -c "$ready" 2>/dev/null || $PIP --force-reinstall --no-deps "faiss-gpu-cu12>=1.8"
  "$V/bin/python" -c "$ready"
  "$V/bin/python" scripts/precompile.py
fi
