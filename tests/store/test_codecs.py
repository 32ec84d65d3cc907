"""A layer whose zarr.json names a codec stratalign does not read (pickle, unknown) is a one-line refusal when the
layer is opened, before zarr builds anything from it; training on it stops there too."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from fake_encoders import load_tiny

from stratalign.errors import StratalignError
from stratalign.stages.extract import ExtractConfig, extract
from stratalign.store.codecs import codec_names
from stratalign.store.feature_store import FeatureStore


@pytest.mark.parametrize("codec, kind", [("numcodecs.pickle", "a codec that unpickles (it can run code)"),
                                         ("made.up", "an unknown codec")])
def test_a_foreign_codec_is_refused_at_read_time(store_with_dataset, codec: str, kind: str) -> None:
    store, _ = store_with_dataset
    extract(store, "toy", ExtractConfig(encoders=("tiny-image", "tiny-text"), shard_rows=16, progress=False),
            load=load_tiny)
    entry = store.find_entry("toy", "tiny-image")
    meta = store.loc.path("features", entry.key, "layer_001", "zarr.json")
    doc = json.loads(open(meta).read())
    assert set(codec_names(doc)) <= {"bytes", "crc32c", "sharding_indexed"}  # what stratalign writes
    doc["codecs"][0]["configuration"]["codecs"].append({"name": codec, "configuration": {}})
    open(meta, "w").write(json.dumps(doc))
    fresh = FeatureStore.open(store.url, "r")
    with pytest.raises(StratalignError) as e:
        fresh.features("toy", "tiny-image", 1)
    msg = str(e.value)
    assert msg.startswith(f"layer 1 of entry {entry.key} names {kind}: {codec};") and "\n" not in msg
    assert msg.endswith(f"stratalign store rm {entry.key}) and extract it again")
    fresh.features("toy", "tiny-image", 0)  # the other layers still read
    out = subprocess.run([sys.executable, "-m", "stratalign.cli.main", "train", "--dataset", "toy", "--vision",
                          "tiny-image", "--text", "tiny-text", "--layers", "1,1", "--store", store.url],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr and codec in out.stderr
    assert out.stderr.strip().count("\n") <= 1, out.stderr  # the preset line at most, then the error
