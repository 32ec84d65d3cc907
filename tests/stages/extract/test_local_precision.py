"""Extraction's forward precision (METHOD 1): bf16 autocast where the hardware has it makes another entry (its own
key, `precision` recorded and listed), close to the fp32 one; fp32 stays the default and the entry found first;
auto resolves per device; bf16 without the hardware is one line before anything runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fake_encoders import load_tiny

from stratalign import device as device_mod
from stratalign.errors import StratalignError
from stratalign.stages.extract import ExtractConfig, extract


def _cfg(**kw) -> ExtractConfig:
    return ExtractConfig(**{**dict(encoders=("tiny-image",), shard_rows=8, batch_size=3, progress=False, poll_s=0.05,
                                   loaders="threads", device="cpu"), **kw})


def test_precision_resolves_and_refuses(monkeypatch) -> None:
    assert _cfg().precision == "fp32"
    monkeypatch.setattr(device_mod, "bf16_supported", lambda dev: False)
    assert _cfg(precision="auto").precision == "fp32"
    with pytest.raises(StratalignError, match=r"precision bf16 needs .* use --precision fp32") as err:
        _cfg(precision="bf16")
    assert "\n" not in str(err.value)
    with pytest.raises(StratalignError, match="unknown precision 'half'"):
        _cfg(precision="half")
    monkeypatch.setattr(device_mod, "bf16_supported", lambda dev: True)
    assert _cfg(precision="auto").precision == "bf16"


@pytest.mark.skipif(not device_mod.bf16_supported(torch.device("cpu")), reason="this CPU has no avx512_bf16 / AMX")
def test_bf16_extraction_is_its_own_entry(store_with_dataset) -> None:
    store, _ = store_with_dataset
    extract(store, "toy", _cfg(), load=load_tiny)
    extract(store, "toy", _cfg(precision="bf16"), load=load_tiny)
    entries = store.complete_entries("toy", "tiny-image")
    assert [e.spec.precision for e in entries] == ["fp32", "bf16"]  # fp32 first: what training reads by default
    fp32, bf16 = entries
    assert fp32.key != bf16.key and "precision" not in fp32.spec.identity()
    table = store.entry_table()
    assert sorted(table["precision"].to_list()) == ["bf16", "fp32"]
    for layer in range(3):
        a, b = fp32.read_layer(layer).astype(np.float64), bf16.read_layer(layer).astype(np.float64)
        assert not np.array_equal(a, b)  # the forward really ran in bf16
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        assert cos.min() > 0.99
    # a caller naming the precision gets that forward's entry (a bf16 demo in a store holding fp32 features)
    assert store.find_entry("toy", "tiny-image", precision="bf16").key == bf16.key
    assert store.find_entry("toy", "tiny-image", precision="fp32").key == fp32.key


def test_asking_for_a_precision_the_store_lacks_names_the_extraction(store_with_dataset) -> None:
    store, _ = store_with_dataset
    extract(store, "toy", _cfg(), load=load_tiny)
    assert store.find_entry("toy", "tiny-image", precision="fp32").spec.precision == "fp32"
    with pytest.raises(StratalignError, match=r"from a bf16 forward; run: stratalign extract .* --precision bf16$"):
        store.find_entry("toy", "tiny-image", precision="bf16")
