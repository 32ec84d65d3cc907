"""Old import paths of modules that moved, kept working for one release (0.2) with a DeprecationWarning.

`import stratalign` installs a finder that answers an old dotted name with the module at its new place (the same
module object, so patching either name patches both). Nothing here imports a moved module until it is asked for.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

# old dotted name -> new dotted name (moved in 0.1.x when `stages/` was split into rooms; removed in 0.3)
MOVED: dict[str, str] = {
    "stratalign.stages.sources": "stratalign.stages.ingest.sources",
    "stratalign.stages.sources_shards": "stratalign.stages.ingest.shards",
    "stratalign.stages.emoji_groups": "stratalign.stages.ingest.emoji_groups",
    "stratalign.stages.extract_config": "stratalign.stages.extract.config",
    "stratalign.stages.extract_loading": "stratalign.stages.extract.reader",
    "stratalign.stages.image_loaders": "stratalign.stages.extract.image_loaders",
    "stratalign.stages.extract_shards": "stratalign.stages.extract.shards",
    "stratalign.stages.extract_pipeline": "stratalign.stages.extract.pipeline",
    "stratalign.stages.extract_local": "stratalign.stages.extract.local",
    "stratalign.stages.extract_plan": "stratalign.stages.extract.plan",
    "stratalign.stages.extract_skip": "stratalign.stages.extract.skip",
    "stratalign.stages.ray_engine": "stratalign.stages.extract.ray_engine",
    "stratalign.stages.run_config": "stratalign.stages.runs.config",
    "stratalign.stages.run_data": "stratalign.stages.runs.data",
    "stratalign.stages.run_listing": "stratalign.stages.runs.listing",
    "stratalign.stages.train": "stratalign.stages.runs.training",
    "stratalign.stages.tune": "stratalign.stages.runs.tune",
    "stratalign.stages.evaluate": "stratalign.stages.runs.evaluate",
    "stratalign.stages.compare": "stratalign.stages.runs.comparisons",
    "stratalign.stages.sweep": "stratalign.stages.runs.sweep",
    "stratalign.stages.aligned": "stratalign.use.model",
    "stratalign.stages.aligned_card": "stratalign.use.card",
    "stratalign.stages.search": "stratalign.use.search",
    "stratalign.cli.serve_app": "stratalign.use.serve_app",
    "stratalign.store.features": "stratalign.store.feature_store",
    "stratalign.train.batched": "stratalign.train.heads_loop",
    "stratalign.train.knn": "stratalign.train.frozen_graphs",
    "stratalign.train.loop": "stratalign.train.rules",  # the CoMM loop itself: stratalign.train.fusion_loop
}


class MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old name of a moved module and loads it as the module at its new place."""

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; the old name goes in stratalign 0.3", DeprecationWarning,
                      stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """The module at its new place is already executed."""


def install() -> None:
    """Put the finder on sys.meta_path once."""
    if not any(isinstance(f, MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(MovedFinder())
