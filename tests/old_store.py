"""The store written by commit 3d4de15 (tests/fixtures/store_3d4de15) and the API its generator calls, shared by
the old-store and migration tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "store_3d4de15"
ENTRY_KEYS = {
    "toy--image--tiny-image--avg--a373f67358f9962b",
    "toy--text--tiny-text--mean--2e3ccb25096e2e6f",
    "toy-resplit--image--tiny-image--avg--0f501b17967e1ca7",
    "toy-resplit--text--tiny-text--mean--e1ab24ac1f1df56d",
}
LAYER_KEY = "toy--tiny-image--tiny-text--c9ff66777565"
RUN_IDS = ["clip-linear-n12-s0-c2322d26d74d", "clip_structure-linear-n12-s0-5a3151fa3dcf",
           "clip_structure_knn-linear-n12-s1-9515c6ad9da0", "csa-csa-n12-s0-c493673e6699"]
GRAPH_FILE = "store/graphs/17e2fc4592f1dcc3ccdaadf3fd1fe05385512255ea44ed4a2c0b4cb7d141a106.safetensors"


def _generator():
    spec = importlib.util.spec_from_file_location("make_old_store", FIXTURE.parent / "make_old_store.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _generator()
API = GEN.api()


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
