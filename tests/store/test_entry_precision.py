"""An entry's forward precision (METHOD 1): fp32 entries keep their pinned keys; a bf16 forward is other content
(another key), recorded in the entry's metadata, read back, and shown by `store ls`; fp32 entries come first when
both exist."""

from __future__ import annotations

from dataclasses import replace

import pytest

from stratalign.errors import StratalignError
from stratalign.store.feature_store import EntrySpec

SPEC = EntrySpec(dataset="toy set/α", content_fingerprint="c" * 64, modality="image",
                 encoder={"spec": "hf:org/model", "weights_sha256": "w" * 8, "preprocessing": {"size": 224}},
                 pooling="cls", layer_names=("a", "b"), dims=(4, 8), rows=10, dtype="float16", shard_rows=4)


def test_fp32_keys_unchanged_bf16_is_other_content() -> None:
    assert SPEC.precision == "fp32" and "precision" not in SPEC.identity()
    assert SPEC.key == "toy-set--image--hf-org-model--cls--90e31f957c74bbe3"  # as tests/store/test_keys.py pins it
    bf16 = replace(SPEC, precision="bf16")
    assert bf16.identity()["precision"] == "bf16" and bf16.key != SPEC.key
    assert replace(bf16, format_version=2).key not in (bf16.key, replace(SPEC, format_version=2).key)
    back = EntrySpec.from_json(bf16.to_json())
    assert back == bf16 and back.key == bf16.key
    assert EntrySpec.from_json(SPEC.to_json()).precision == "fp32"  # older metadata has no field: fp32


def test_unknown_precision_is_one_line() -> None:
    with pytest.raises(StratalignError, match="forward precision 'fp8'"):
        replace(SPEC, precision="fp8")
