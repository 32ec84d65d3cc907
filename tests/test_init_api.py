"""The public face: `import stratalign` exposes every stage and config by name, lazily (no torch at import)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import stratalign

ROOT = Path(__file__).resolve().parents[1]


def test_every_public_name_resolves_to_its_defining_object() -> None:
    assert set(stratalign.__all__) == {"StratalignError", "__version__", "open_store", *stratalign._EXPORTS}
    for name, module in stratalign._EXPORTS.items():
        obj = getattr(stratalign, name)
        assert obj is getattr(__import__(module, fromlist=[name]), name), name


def test_unknown_attribute_is_an_attribute_error() -> None:
    try:
        stratalign.no_such_thing  # noqa: B018
    except AttributeError as exc:
        assert "no_such_thing" in str(exc)
    else:
        raise AssertionError("expected AttributeError")


def test_import_is_light() -> None:
    code = "import sys, stratalign; print(sorted(m for m in ('torch', 'zarr', 'polars', 'faiss') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_open_store_round_trip(tmp_path: Path) -> None:
    store = stratalign.open_store(str(tmp_path / "st"), "a", create=True)
    assert isinstance(store, stratalign.FeatureStore)
    assert stratalign.open_store(str(tmp_path / "st")).datasets() == []


def test_openmp_threads_sleep_when_idle_unless_the_user_says_otherwise() -> None:
    """`import stratalign` makes OpenMP threads wait passively (spinning threads crawl on a shared CPU), and
    leaves a user's own OMP_WAIT_POLICY alone."""
    import os
    import subprocess
    import sys

    code = "import os, stratalign; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "PASSIVE"
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ACTIVE"


_BLAS_VARS = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")


def _run_after_import(code: str, **env: str) -> str:
    import os

    base = {k: v for k, v in os.environ.items() if k not in _BLAS_VARS}
    out = subprocess.run([sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def test_openblas_runs_one_thread_unless_the_user_says_otherwise() -> None:
    """`import stratalign` gives numpy's OpenBLAS 1 thread before numpy loads it (its threads stall the closed-form
    fits on a loaded CPU: benchmarks/threads.py --case blas), and leaves a user's own thread count alone."""
    code = "import os, stratalign; print(os.environ.get('OPENBLAS_NUM_THREADS'))"
    assert _run_after_import(code) == "1"
    assert _run_after_import(code, OPENBLAS_NUM_THREADS="2") == "2"
    assert _run_after_import(code, GOTO_NUM_THREADS="2") == "None"
    assert _run_after_import(code, OMP_NUM_THREADS="2") == "None"


def test_numpy_imported_after_stratalign_gets_a_one_thread_blas() -> None:
    """The setting reaches OpenBLAS itself: stratalign's own import does not load numpy before setting it."""
    pytest.importorskip("threadpoolctl")
    code = ("import stratalign, numpy, threadpoolctl; print(sorted({p['num_threads'] "
            "for p in threadpoolctl.threadpool_info() if p['internal_api'] == 'openblas'}))")
    threads = _run_after_import(code)
    if threads == "[]":
        pytest.skip("numpy does not use OpenBLAS here")
    assert threads == "[1]"
