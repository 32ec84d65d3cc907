"""stratalign: align frozen unimodal encoders with lightweight heads on cached every-layer features.

The public face. Every stage is a function of a store and a typed config; the CLI only parses arguments:

    import stratalign as sa

    store = sa.open_store("./my-store", "a", create=True)
    store.save_dataset(sa.ingest_source("twemoji"))
    sa.extract(store, "twemoji", sa.ExtractConfig(encoders=("dinov2-s", "minilm-l6")))
    sa.run_layers(store, sa.LayersConfig(dataset="twemoji", vision="dinov2-s", text="minilm-l6"))
    res = sa.train_run(store, sa.RunConfig(dataset="twemoji", vision="dinov2-s", text="minilm-l6",
                                           objective="clip+structure"))

Names are imported on first use (PEP 562), so `import stratalign` loads no torch, zarr or polars.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

# OpenMP threads that wait by spinning turn a shared CPU into a crawl: on the 2-core machine under load 10, a
# 200 x 384 x 512 matmul with its backward took 191-357 ms with torch's 2 spinning threads, 13 ms with 1 thread
# and 4.4 ms with 2 threads that sleep when idle (2026-11-25). Set before torch loads its OpenMP runtime (no
# effect when torch was imported first); a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# numpy's (and scipy's) OpenBLAS runs its own pthreads, which OMP_WAIT_POLICY does not reach, and the closed-form
# fits (CSA's covariances, eigh and SVD at 384 x 384; Procrustes's PCA and SVD) run on it. Each of a fit's many
# small calls waits for every worker, so one worker the loaded CPU has descheduled stalls it: beside 2 busy processes on
# the 2-core machine a fit_csa-sized workload took median 4.0 s, max 9.1 s with OpenBLAS's 2 threads and 0.31 s,
# max 0.45 s with 1 (benchmarks/threads.py --case blas, 2026-12-06; OPENBLAS_THREAD_TIMEOUT=4, idle workers
# sleeping at once, still 2.2 s, max 3.6 s). Its price on a quiet machine: that fit 103 ms instead of 80 (1.29x),
# a fit and the 5 training steps after it 124 ms instead of 107 (1.15x); ~6 s over the demo's 255 CSA fits.
# OpenBLAS reads this once, when numpy first loads it: no effect when numpy was imported before stratalign
# (threadpoolctl.threadpool_limits(1, "blas") does it at run time). A thread count the user set for OpenBLAS
# (OPENBLAS_NUM_THREADS, GOTO_NUM_THREADS, or OMP_NUM_THREADS, which it also reads) wins.
if not any(os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS", "OMP_NUM_THREADS")):
    os.environ["OPENBLAS_NUM_THREADS"] = "1"

from stratalign.errors import StratalignError  # noqa: E402
from stratalign.moved import install as _install_moved  # noqa: E402
from stratalign.version import __version__  # noqa: E402

_install_moved()  # old import paths of moved modules keep working for one release (stratalign.moved)

# public name -> the module that defines it (the rooms are described in ARCHITECTURE.md)
_EXPORTS = {
    "FeatureStore": "stratalign.store.feature_store",
    "FeatureEntry": "stratalign.store.feature_store",
    "PairDataset": "stratalign.store.datasets",
    "RunRegistry": "stratalign.store.runs",
    "verify_store": "stratalign.store.verify",
    "load_encoder": "stratalign.encoders",
    "known_encoders": "stratalign.encoders",
    "OBJECTIVES": "stratalign.core.objectives",
    "HEADS": "stratalign.core.objectives",
    "TrainConfig": "stratalign.train",
    "ingest_source": "stratalign.stages.ingest.sources",
    "ExtractConfig": "stratalign.stages.extract",
    "extract": "stratalign.stages.extract",
    "LayersConfig": "stratalign.stages.layers",
    "run_layers": "stratalign.stages.layers",
    "RunConfig": "stratalign.stages.runs.training",
    "ResolvedRun": "stratalign.stages.runs.training",
    "resolve_run": "stratalign.stages.runs.training",
    "train_run": "stratalign.stages.runs.training",
    "train_runs": "stratalign.stages.runs.training",
    "tune_run": "stratalign.stages.runs.tune",
    "tune_runs": "stratalign.stages.runs.tune",
    "evaluate_saved_run": "stratalign.stages.runs.evaluate",
    "RunResult": "stratalign.stages.runs.results",
    "EvalResult": "stratalign.stages.runs.results",
    "METRICS": "stratalign.core.metric_registry",
    "SweepConfig": "stratalign.stages.runs.sweep",
    "run_sweep": "stratalign.stages.runs.sweep",
    "DemoConfig": "stratalign.stages.demo",
    "run_demo": "stratalign.stages.demo",
    "AlignedModel": "stratalign.use.model",
}

__all__ = [
    "StratalignError", "__version__", "open_store",
    "FeatureStore", "FeatureEntry", "PairDataset", "RunRegistry", "verify_store", "load_encoder",
    "known_encoders", "OBJECTIVES", "HEADS", "TrainConfig", "ingest_source", "ExtractConfig", "extract",
    "LayersConfig", "run_layers", "RunConfig", "ResolvedRun", "resolve_run", "train_run", "train_runs", "tune_run",
    "tune_runs", "evaluate_saved_run", "RunResult", "EvalResult", "METRICS", "SweepConfig", "run_sweep", "DemoConfig",
    "run_demo", "AlignedModel",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time names load lazily through __getattr__
    from stratalign.core.metric_registry import METRICS
    from stratalign.core.objectives import HEADS, OBJECTIVES
    from stratalign.encoders import known_encoders, load_encoder
    from stratalign.stages.demo import DemoConfig, run_demo
    from stratalign.stages.extract import ExtractConfig, extract
    from stratalign.stages.ingest.sources import ingest_source
    from stratalign.stages.layers import LayersConfig, run_layers
    from stratalign.stages.runs.evaluate import evaluate_saved_run
    from stratalign.stages.runs.results import EvalResult, RunResult
    from stratalign.stages.runs.sweep import SweepConfig, run_sweep
    from stratalign.stages.runs.training import ResolvedRun, RunConfig, resolve_run, train_run, train_runs
    from stratalign.stages.runs.tune import tune_run, tune_runs
    from stratalign.store.datasets import PairDataset
    from stratalign.store.feature_store import FeatureEntry, FeatureStore
    from stratalign.store.runs import RunRegistry
    from stratalign.store.verify import verify_store
    from stratalign.train import TrainConfig
    from stratalign.use.model import AlignedModel


def open_store(url: str | None = None, mode: str = "r", *, create: bool = False) -> FeatureStore:
    """Open a store (local path or fsspec URL; default $STRATALIGN_STORE or ./stratalign-store).
    mode "r" reads, "a" also writes; create=True makes a new store where there is none."""
    from stratalign.store.feature_store import FeatureStore

    return FeatureStore.open(url, mode, create=create)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'stratalign' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
