"""Typed results of the run functions: `RunResult` (train_run / train_runs) and `EvalResult` (evaluate_saved_run).

Each reads as the dict these functions returned before (`result["run_id"]`, `result.get("i2t_R@1")`,
`{**result}`), so code written against the dicts keeps working; new code reads the fields.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from stratalign.train.config import TrainResult


class _AsMapping(Mapping[str, Any]):
    """The read-only mapping interface over `_view()` (keys, get, items, `in`, `**`, == a dict)."""

    def _view(self) -> dict[str, Any]:
        raise NotImplementedError

    def __getitem__(self, key: str) -> Any:
        return self._view()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._view())

    def __len__(self) -> int:
        return len(self._view())

    def as_dict(self) -> dict[str, Any]:
        """A plain dict copy (JSON-able as the metrics are)."""
        return dict(self._view())


@dataclass(frozen=True, eq=False)
class RunResult(_AsMapping):
    """One run of a train_run / train_runs call: its id, whether it was in the store already (not trained again)
    and its metrics.json (test metrics, how its checkpoint was chosen, timings). As a mapping: run_id, skipped
    and the metrics, as before."""

    run_id: str
    skipped: bool
    metrics: Mapping[str, Any] = field(default_factory=dict)
    # trained in this call with its cohort's weights kept (train.cohorts): what stages.runs.cells makes final runs of
    trained: TrainResult | None = None

    def _view(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "skipped": self.skipped, **self.metrics}


@dataclass(frozen=True, eq=False)
class EvalResult(_AsMapping):
    """A saved run scored again: the run, the dataset scored on and its version (fingerprint), the metrics (and
    what evaluate_saved_run adds: the stored file, a stale previous result, a dataset replaced since training).
    As a mapping: the metrics, as before."""

    run_id: str
    dataset: str
    fingerprint: str
    metrics: Mapping[str, Any] = field(default_factory=dict)

    def _view(self) -> dict[str, Any]:
        return dict(self.metrics)
