"""A store written by commit 3d4de15 (before the module moves) is read and reused by the current code.

The fixture tests/fixtures/store_3d4de15/ was written by tests/fixtures/make_old_store.py run against 3d4de15
(see its docstring). The current code must open it, find its features complete (nothing re-extracted), its layer
result cached, its runs done (nothing retrained), and reproduce its metrics; and a store rebuilt from the same
pinned inputs by the current code must have the same keys and the same bytes, except what training computes:
since the batched trainer (2026-11-25) a run's sums are taken in another order, so its weights and validation
numbers are compared to within 1e-6 (test metrics, which rank embeddings, must still be equal).
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import zarr
from fake_encoders import load_tiny
from old_store import API, ENTRY_KEYS, FIXTURE, GEN, GRAPH_FILE, LAYER_KEY, RUN_IDS, _tree

PROMPT_FILE = "store/prompts/065c3a65d2c95313312f96af.safetensors"
# Files that differ between two runs of the OLD code on the same inputs, and how they are compared instead.
# JSON files whose content carries the time, host or process of the writer: compared as JSON without these fields.
VOLATILE = {
    "_shards": ("host", "pid", "written_at"),  # shard markers: who wrote the shard and when
    "layers": ("seconds",),  # layer results: read and compute timings
    "metrics.json": ("train_seconds", "train_loop_seconds", "train_seconds_fit"),  # run metrics: training timings
}
# Added since 3d4de15: an evaluation on another dataset names the dataset version it ran on, and a run keeps its
# per-query results (for paired comparisons) beside its metrics.
ADDED_EVAL_FIELD = "eval_dataset_fingerprint"
# Since 2026-12-06 it also measures the test split's overlap with the run's training pairs and scores the pairs
# the run never trained on (toy-resplit is toy split again: its test split holds images toy's runs trained on).
ADDED_EVAL_OVERLAP = ("overlap", "unseen")
ADDED_RUN_FILE = "queries.safetensors"
# Since 2026-11-25 a run's metrics name how its checkpoint was chosen (`selection`) and its validation curve holds
# every yardstick per evaluation step ({"step", "clip_loss", "rsum", ...} where 3d4de15 wrote [step, val CLIP loss]).
ADDED_METRICS_FIELD = "selection"
# Since 2026-12-06 a run trained in a stack also records its share of the stack's wall time (a timing, for the
# bake-off's cost per run).
ADDED_TIMING_FIELD = "train_share_seconds"


def _old_curve(metrics: dict) -> dict:
    """metrics.json with its validation curve in 3d4de15's form and without the fields added since."""
    out = {k: v for k, v in metrics.items() if k not in (ADDED_METRICS_FIELD, ADDED_TIMING_FIELD)}
    if out.get("stopped_reason") == "closed_form":  # a closed-form fit records its validation scores since
        del out["val_curve"]
    if out.get("val_curve") and isinstance(out["val_curve"][0], dict):
        out["val_curve"] = [[row["step"], row["clip_loss"]] for row in out["val_curve"]]
    # the message names the selection metric and value now: "restored step 12 by validation clip_loss 3.757 (...)"
    if "message" in out:
        out["message"] = re.sub(r" by validation clip_loss [^ ]+", "", out["message"]).replace(
            "no validation clip_loss improvement", "no validation improvement")
    return out


def _safetensors_parts(data: bytes) -> tuple[dict, bytes]:
    """(header as a dict, tensor bytes): the header's __metadata__ order follows a hash map in the safetensors
    library, so the kNN graph files (which carry metadata) differ in byte order between any two runs."""
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


TRAINED_TOL = 1e-6  # weights and validation losses of a run trained again (see the module docstring)


def _close(new, was, where: str) -> None:
    """JSON values equal, numbers within TRAINED_TOL (relative)."""
    if isinstance(was, dict):
        assert isinstance(new, dict) and set(new) == set(was), where
        for k in was:
            _close(new[k], was[k], f"{where}.{k}")
    elif isinstance(was, list):
        assert isinstance(new, list) and len(new) == len(was), where
        for i, (a, b) in enumerate(zip(new, was)):
            _close(a, b, f"{where}[{i}]")
    elif isinstance(was, float) and not isinstance(was, bool):
        assert new == pytest.approx(was, rel=TRAINED_TOL, abs=TRAINED_TOL), where
    else:
        assert new == was, where


def _same_weights(new: bytes, was: bytes, where: str) -> None:
    from safetensors.torch import load as st_load

    a, b = st_load(new), st_load(was)
    assert a.keys() == b.keys(), where
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (where, k)
        assert bool((a[k].double() - b[k].double()).abs().max() <= TRAINED_TOL) if a[k].numel() else True, (where, k)


def _volatile_fields(rel: str) -> tuple[str, ...] | None:
    parts = rel.split("/")
    for marker, fields in VOLATILE.items():
        if marker in parts[:-1] or parts[-1] == marker:
            return fields
    return None


@pytest.fixture
def old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A copy of the fixture (cwd = the copy: the store records its image paths relative to it), opened to append."""
    shutil.copytree(FIXTURE, tmp_path / "old")
    monkeypatch.chdir(tmp_path / "old")
    return API.FeatureStore.open("store", "a"), tmp_path / "old"


def test_current_code_is_under_test() -> None:
    """The entry points come from this checkout (an editable install of another one could shadow them)."""
    root = Path(__file__).resolve().parents[2] / "stratalign"
    for fn in (API.extract, API.compute_layer_matrices, API.train_run, API.evaluate_saved_run, API.FeatureStore.open):
        assert Path(fn.__code__.co_filename).resolve().is_relative_to(root), fn


def test_fixture_is_small_and_from_the_old_code() -> None:
    files = _tree(FIXTURE)
    assert sum(len(b) for b in files.values()) < 200_000
    assert not any("__pycache__" in f for f in files)
    store_meta = json.loads(files["store/zarr.json"])
    assert store_meta["attributes"]["stratalign"]["created_by"] == "0.1.0"


def test_old_store_opens_lists_and_reads(old) -> None:
    store, root = old
    assert sorted(store.datasets()) == ["toy", "toy-resplit"]
    assert {e.key for e in store.entries()} == ENTRY_KEYS
    ds = store.dataset("toy")
    meta = json.loads((root / "store/datasets/toy/dataset.json").read_text())
    assert ds.fingerprint == meta["fingerprint"] and ds.content_fingerprint == meta["content_fingerprint"]
    assert len(ds.images) == 24 and len(ds.captions) == 48 and ds.images["path"][0] == "inputs/img/00.png"
    for entry in store.entries():
        assert entry.is_complete() and entry.verify() == {"corrupt": [], "incomplete": []}
        for layer in range(len(entry.spec.dims)):
            raw = zarr.open_array(str(root / "store" / "features" / entry.key / f"layer_{layer:03d}"), mode="r")[:]
            got = entry.read_layer(layer)
            assert got.dtype == raw.dtype and np.array_equal(got, raw), (entry.key, layer)


def test_extract_encodes_nothing(old) -> None:
    store, root = old
    before = _tree(root)
    for dataset in ("toy", "toy-resplit"):
        reports = GEN.extract(API, store, dataset, load_tiny)
        assert [r.shards_encoded for r in reports] == [0, 0]
        assert {k for r in reports for k in r.entries} <= ENTRY_KEYS
    assert _tree(root) == before


def test_extract_in_the_new_layout_reuses_the_old_entries(old) -> None:
    """New extractions write entry layout 2 (a new entry key); a complete layout-1 entry of the same content is
    found and reused, so an old store is never re-extracted."""
    store, root = old
    before = _tree(root)
    for dataset in ("toy", "toy-resplit"):
        reports = GEN.extract(API, store, dataset, load_tiny, entry_format=2)
        assert [r.shards_encoded for r in reports] == [0, 0]
        assert {k for r in reports for k in r.entries} <= ENTRY_KEYS
    assert _tree(root) == before


def test_new_layout_holds_the_same_features(old) -> None:
    """The same inputs extracted in layout 2 into another store: other keys, the very same values."""
    store, root = old
    fresh = API.FeatureStore.open("store2", "a", create=True)
    fresh.save_dataset(GEN.ingest(API, "inputs/pairs.csv", "toy"))
    reports = GEN.extract(API, fresh, "toy", load_tiny, entry_format=2)
    assert sum(r.shards_encoded for r in reports) > 0
    for new in fresh.entries():
        assert new.spec.format_version == 2 and new.key not in ENTRY_KEYS
        was = store.find_entry("toy", new.spec.encoder_spec, new.spec.pooling)
        assert was.spec.format_version == 1 and was.spec.twins()[0].key == new.key
        for layer in range(len(new.spec.dims)):
            np.testing.assert_array_equal(new.read_layer(layer), was.read_layer(layer))


def test_layers_cached_and_runs_skipped(old) -> None:
    store, root = old
    before = _tree(root)
    res = API.compute_layer_matrices(store, GEN.layers_config(API))
    saved = json.loads((root / "store/layers" / f"{LAYER_KEY}.json").read_text())
    assert res["cached"] and res["key"] == LAYER_KEY and res["matrices"] == saved["matrices"]
    choice = API.choose(res, "best", "cka")
    assert choice == json.loads((root / "store/choices/toy--tiny-image--tiny-text.json").read_text())
    results = [API.train_run(store, cfg) for cfg in GEN.run_configs(API)]
    assert [r["run_id"] for r in results] == RUN_IDS and all(r["skipped"] for r in results)
    assert _tree(root) == before


@pytest.mark.parametrize("run_id", RUN_IDS)
def test_saved_runs_reproduce_their_metrics(old, run_id: str) -> None:
    store, root = old
    stored = json.loads((root / "store/runs" / run_id / "metrics.json").read_text())
    again = API.evaluate_saved_run(store, run_id)
    evaluated = [k for k, v in again.items() if isinstance(v, float) and k in stored]
    assert {"i2t_R@1", "t2i_R@1"} <= set(evaluated)
    for key in evaluated:
        assert again[key] == pytest.approx(stored[key], abs=1e-9), key


def test_saved_cross_dataset_eval_reproduced(old) -> None:
    """The old result does not name its dataset version: it is stale, recomputed to the very same numbers and
    rewritten with the version (the only new field)."""
    store, root = old
    path = root / "store/runs" / RUN_IDS[0] / "eval-toy-resplit.json"
    before = json.loads(path.read_bytes())
    assert ADDED_EVAL_FIELD not in before
    again = API.evaluate_saved_run(store, RUN_IDS[0], "toy-resplit")
    after = json.loads(path.read_bytes())
    assert after.pop(ADDED_EVAL_FIELD) == store.dataset("toy-resplit").fingerprint
    assert after.pop("overlap")["images_trained_on"] > 0 and after.pop("unseen")["eval_images"] > 0
    assert after == before
    assert {k: again[k] for k in before} == before
    assert again["previous_eval"] == "stale" and again["eval_file"].endswith("eval-toy-resplit.json")


def test_rebuilt_by_current_code_is_the_same_store(tmp_path: Path) -> None:
    """The generator's steps with the current code: same keys, and every file byte-identical except the fields
    in VOLATILE (time, host, pid of the writer), which are compared as JSON without them."""
    made = GEN.build(tmp_path / "new", load_tiny)
    assert made["layer_key"] == LAYER_KEY and made["run_ids"] == RUN_IDS
    old_files, new_files = _tree(FIXTURE), _tree(tmp_path / "new")
    added = sorted(p for p in new_files if p.endswith("/" + ADDED_RUN_FILE))
    assert added == sorted(f"store/runs/{rid}/{ADDED_RUN_FILE}" for rid in RUN_IDS)  # every run is scored by retrieval
    new_files = {p: b for p, b in new_files.items() if p not in added}
    assert sorted(new_files) == sorted(old_files)
    assert GRAPH_FILE in new_files and PROMPT_FILE in new_files
    assert {p.split("/")[2] for p in new_files if p.startswith("store/features/") and p.count("/") > 2} == ENTRY_KEYS
    compared_as_json, compared_as_safetensors = [], []
    for rel, data in new_files.items():
        fields = _volatile_fields(rel)
        if rel.startswith("store/graphs/"):
            assert _safetensors_parts(data) == _safetensors_parts(old_files[rel]), rel
            compared_as_safetensors.append(rel)
        elif rel.split("/")[-1].startswith("eval-"):
            new, was = json.loads(data), json.loads(old_files[rel])
            added = (ADDED_EVAL_FIELD, *ADDED_EVAL_OVERLAP)
            assert all(k in new and k not in was for k in added), rel
            assert {k: v for k, v in new.items() if k not in added} == was, rel
        elif rel.endswith("/metrics.json"):
            new, was = json.loads(data), json.loads(old_files[rel])
            assert new[ADDED_METRICS_FIELD]["metric"] in ("clip_loss", "closed_form"), rel
            assert ADDED_METRICS_FIELD not in was, rel
            new = _old_curve(new)
            assert set(new) == set(was), rel
            _close({k: v for k, v in new.items() if k not in fields}, {k: v for k, v in was.items() if k not in fields}, rel)
            for k in was:  # what the test split says of the run is unchanged
                if k.startswith(("i2t_", "t2i_", "zs_", "probe_")):
                    assert new[k] == was[k], (rel, k)
            compared_as_json.append(rel)
        elif fields is not None:
            new, was = json.loads(data), json.loads(old_files[rel])
            assert set(new) == set(was), rel
            assert {k: v for k, v in new.items() if k not in fields} == {k: v for k, v in was.items() if k not in fields}, rel
            compared_as_json.append(rel)
        elif rel.endswith("/weights.safetensors"):
            _same_weights(data, old_files[rel], rel)
        else:
            assert data == old_files[rel], f"{rel} differs from the store written by 3d4de15"
    assert len(compared_as_json) == 7 + 1 + len(RUN_IDS)  # shard markers, the layer result, run metrics
    assert compared_as_safetensors == [GRAPH_FILE]
