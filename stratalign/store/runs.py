"""The run registry: trained heads in the store, content-addressed by their fully resolved config.

    runs/<run id>/config.json          the resolved config (dataset fingerprint, encoders, layers, head, objective, ...)
    runs/<run id>/weights.safetensors  head weights (never pickle)
    runs/<run id>/metrics.json         training summary + evaluation results; written last: marks the run done
    runs/<run id>/eval-<dataset>.json  evaluation on another dataset (records that dataset's fingerprint)
    runs/<run id>/queries.safetensors  per-query results on its own test split (hits per image / caption),
                                       for paired comparisons; recomputable from the weights
    runs/<run id>/tuning-<key>.json    a grid this run was chosen from on validation (docs/method.md § 3.9): every point's
                                       run id and validation value; key = hash of the points' run ids

A run id is a hash of its config behind a readable part (store.keys.run_id_of: form 2 names the layer rule, form 1
was every id before it), so re-running an identical cell finds it done and skips it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from safetensors.numpy import load as np_load
from safetensors.numpy import save as np_save

from stratalign.errors import StratalignError
from stratalign.store.cleanup import clean_folder
from stratalign.store.feature_store import FeatureStore
from stratalign.store.keys import run_id_of, tuning_key
from stratalign.store.location import validate_key

if TYPE_CHECKING:
    import torch

__all__ = ["QUERIES_FILE", "RunRegistry", "run_id_of"]

QUERIES_FILE = "queries.safetensors"
EVAL_FINGERPRINT = "eval_dataset_fingerprint"  # the key of an evaluation result that names its dataset version
TEST_SCORED = "test_scored"  # false in the metrics of a run saved without its test scores (a selection run)


def lacks_test_scores(metrics: dict[str, Any]) -> bool:
    """Whether a run's metrics are those of a run saved without its test scores (stages.runs.cells: a selection run)."""
    return metrics.get(TEST_SCORED) is False


# what every saved run's config.json holds (checked on read, so a damaged file is one line, not a KeyError)
CONFIG_KEYS = ("dataset", "dataset_fingerprint", "vision", "text", "vision_entry", "text_entry", "vision_layer",
               "text_layer", "head", "objective", "seed", "n_pairs", "train")

class RunRegistry:
    """Read and write runs of one store."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self.loc = store.loc

    def ids(self) -> list[str]:
        """Every run folder's id (a symlink in runs/ is not a run: `linked` lists those)."""
        linked = set(self.linked())
        return [n for n in self.loc.listdir("runs") if n not in linked]

    def linked(self) -> list[str]:
        """Names in runs/ that are symlinks (reported by `store verify` and `store ls`, removed by `runs rm`)."""
        return self.loc.linked("runs")

    def holds(self, run_id: str) -> bool:
        """Whether a run folder of this id has its config.json (written first: a run begun, finished or not)."""
        validate_key(run_id, "run id")
        return self.loc.exists("runs", run_id, "config.json")

    def is_done(self, run_id: str) -> bool:
        validate_key(run_id, "run id")
        return self.loc.exists("runs", run_id, "metrics.json")

    def save(self, run_id: str, config: dict[str, Any], tensors: dict[str, torch.Tensor],
             metrics: dict[str, Any]) -> None:
        """Write config, weights, then metrics (last, so a half-written run never looks done)."""
        from safetensors.torch import save as st_save  # torch only where tensors are (a model's use imports none)

        self.store.require_writable()
        validate_key(run_id, "run id")
        clean_folder(self.loc, "runs", run_id)  # temp files a killed writer left (see store.cleanup)
        self.loc.write_json(config, "runs", run_id, "config.json")
        blob = st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                       metadata={"run_id": run_id})
        self.loc.write_bytes(blob, "runs", run_id, "weights.safetensors")
        self.loc.write_json(metrics, "runs", run_id, "metrics.json")

    def load(self, run_id: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
        """(config, tensors, metrics) of a finished run."""
        from safetensors.torch import load as st_load

        validate_key(run_id, "run id")
        if not self.is_done(run_id):
            known = self.ids()
            raise StratalignError(f"no finished run {run_id!r} in {self.store.url}; runs: "
                                  f"{', '.join(known[:5]) or 'none'}{' ...' if len(known) > 5 else ''}")
        config = self.config(run_id)
        try:
            tensors = st_load(self.loc.read_bytes("runs", run_id, "weights.safetensors"))
        except Exception as exc:
            raise StratalignError(f"weights of run {run_id} are unreadable: {type(exc).__name__}: {exc}") from None
        return config, tensors, self.metrics(run_id)

    def weights_bytes(self, run_id: str) -> bytes:
        """The raw safetensors bytes of a finished run's weights (for exporting them unchanged)."""
        validate_key(run_id, "run id")
        if not self.is_done(run_id):
            raise StratalignError(f"no finished run {run_id!r} in {self.store.url}")
        return self.loc.read_bytes("runs", run_id, "weights.safetensors")

    def config(self, run_id: str) -> dict[str, Any]:
        """The resolved config a run was trained with; a damaged one is a one-line error naming the file."""
        validate_key(run_id, "run id")
        config = self.loc.read_json("runs", run_id, "config.json")
        missing = [k for k in CONFIG_KEYS if k not in config] if isinstance(config, dict) else list(CONFIG_KEYS)
        if missing or not isinstance(config.get("train"), dict):
            raise StratalignError(f"run {run_id}: {self.loc.path('runs', run_id, 'config.json')} is damaged (lacks "
                                  f"{missing or ['train']}); remove the run folder and train it again")
        return config

    def save_eval(self, run_id: str, dataset: str, result: dict[str, Any]) -> str:
        """Keep a run's evaluation on another dataset beside it (runs/<id>/eval-<dataset>.json); the result
        must name the dataset version it ran on. Returns the path written."""
        self.store.require_writable()
        validate_key(run_id, "run id")
        validate_key(dataset, "dataset name")
        if not result.get(EVAL_FINGERPRINT):
            raise StratalignError(f"evaluation of run {run_id} on {dataset!r} does not record the dataset's "
                                  f"fingerprint ({EVAL_FINGERPRINT}); refusing to store a result of unknown version")
        self.loc.write_json(result, "runs", run_id, f"eval-{dataset}.json")
        return self.eval_path(run_id, dataset)

    def eval_path(self, run_id: str, dataset: str) -> str:
        validate_key(run_id, "run id")
        validate_key(dataset, "dataset name")
        return self.loc.path("runs", run_id, f"eval-{dataset}.json")

    def stored_eval(self, run_id: str, dataset: str, fingerprint: str) -> tuple[dict[str, Any] | None, str]:
        """(the stored evaluation on `dataset` if it ran on the version `fingerprint`, else None; its state):
        state is 'current', 'absent', or 'stale' (another version of the dataset, or one written before
        evaluations recorded their version): a stale result is never returned as current."""
        validate_key(run_id, "run id")
        validate_key(dataset, "dataset name")
        if not self.loc.exists("runs", run_id, f"eval-{dataset}.json"):
            return None, "absent"
        result = self.loc.read_json("runs", run_id, f"eval-{dataset}.json")
        if isinstance(result, dict) and result.get(EVAL_FINGERPRINT) == fingerprint:
            return result, "current"
        return None, "stale"

    def save_queries(self, run_id: str, arrays: dict[str, np.ndarray], meta: dict[str, str]) -> None:
        """Per-query results of a run on its test split (bool hits, int rows) as safetensors, never pickle."""
        self.store.require_writable()
        validate_key(run_id, "run id")
        blob = np_save({k: np.ascontiguousarray(v) for k, v in arrays.items()},
                       metadata={**{k: str(v) for k, v in meta.items()}, "run_id": run_id})
        self.loc.write_bytes(blob, "runs", run_id, QUERIES_FILE)

    def load_queries(self, run_id: str) -> tuple[dict[str, np.ndarray], dict[str, str]] | None:
        """(arrays, metadata) of a run's per-query results, or None when the run has none (older runs)."""
        validate_key(run_id, "run id")
        if not self.loc.exists("runs", run_id, QUERIES_FILE):
            return None
        data = self.loc.read_bytes("runs", run_id, QUERIES_FILE)
        try:
            arrays = np_load(data)
            n = int.from_bytes(data[:8], "little")
            meta = json.loads(data[8:8 + n]).get("__metadata__", {})
        except Exception as exc:
            raise StratalignError(f"per-query results of run {run_id} are unreadable ({type(exc).__name__}: {exc}); "
                                  f"delete {self.loc.path('runs', run_id, QUERIES_FILE)} to recompute them") from None
        return arrays, meta

    def metrics(self, run_id: str) -> dict[str, Any]:
        validate_key(run_id, "run id")
        metrics = self.loc.read_json("runs", run_id, "metrics.json")
        if not isinstance(metrics, dict):
            raise StratalignError(f"run {run_id}: {self.loc.path('runs', run_id, 'metrics.json')} is not an object; "
                                  "remove the run folder and train it again")
        return metrics

    def save_tuning(self, run_id: str, record: dict[str, Any]) -> str:
        """Keep the grid a run was chosen from beside it (idempotent: the same grid writes the same file)."""
        self.store.require_writable()
        validate_key(run_id, "run id")
        key = tuning_key([rid for p in record["grid"] for rid in p.get("run_ids", [p["run_id"]])])
        self.loc.write_json(record, "runs", run_id, f"tuning-{key}.json")
        return self.loc.path("runs", run_id, f"tuning-{key}.json")

    def tunings(self, run_id: str) -> list[dict[str, Any]]:
        """Every tuning record kept beside a run (the grids it was chosen from)."""
        validate_key(run_id, "run id")
        names = sorted(n for n in self.loc.listdir("runs", run_id) if n.startswith("tuning-") and n.endswith(".json"))
        out = []
        for name in names:
            record = self.loc.read_json("runs", run_id, name)
            if not isinstance(record, dict) or not isinstance(record.get("grid"), list):
                raise StratalignError(f"{self.loc.path('runs', run_id, name)} is not a tuning record; delete it and "
                                      "run the tuning again (its runs are kept)")
            out.append(record)
        return out

    def update_metrics(self, run_id: str, extra: dict[str, Any]) -> None:
        self.store.require_writable()
        metrics = self.metrics(run_id)
        metrics.update(extra)
        self.loc.write_json(metrics, "runs", run_id, "metrics.json")

    def resolve(self, run: str) -> str:
        """A full run id or a unique prefix of one (a symlink's name too, so that `runs rm` can remove it)."""
        ids = self.ids() + self.linked()
        if run in ids:
            return run
        hits = [i for i in ids if i.startswith(run)]
        if len(hits) == 1:
            return hits[0]
        if hits:
            more = f" and {len(hits) - 10} more" if len(hits) > 10 else ""
            raise StratalignError(f"run {run!r} is ambiguous in {self.store.url}: {len(hits)} runs start with it "
                                  f"({', '.join(sorted(hits)[:10])}{more}); give more of the id")
        raise StratalignError(f"run {run!r} is unknown in {self.store.url}; see `stratalign runs ls`")

    def table(self) -> pl.DataFrame:
        """One row per finished run, flattening config and headline metrics (for `runs ls` and sweeps)."""
        rows = []
        for rid in self.ids():
            if not self.is_done(rid):
                continue
            cfg = self.config(rid)
            met = self.metrics(rid)
            row = {"run": rid}
            row.update({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in cfg.items()
                        if k not in ("train",)})
            row.update({k: v for k, v in met.items() if isinstance(v, (int, float, str)) or v is None})
            rows.append(row)
        return pl.DataFrame(rows, infer_schema_length=None) if rows else pl.DataFrame()
