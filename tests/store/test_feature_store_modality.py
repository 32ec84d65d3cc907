"""An encoder asked for as the other modality (--vision and --text swapped) is named with the flag it belongs to,
instead of advice to extract features that are already extracted."""

from __future__ import annotations

import pytest
from fake_encoders import load_tiny

from stratalign.errors import StratalignError
from stratalign.stages.extract import ExtractConfig, extract
from stratalign.stages.runs.config import RunConfig, resolve_run


def test_swapped_encoders_name_the_right_flags(store_with_dataset) -> None:
    store, _ = store_with_dataset
    extract(store, "toy", ExtractConfig(encoders=("tiny-image", "tiny-text"), shard_rows=16, progress=False),
            load=load_tiny)
    with pytest.raises(StratalignError) as e:
        resolve_run(store, RunConfig(dataset="toy", vision="tiny-text", text="tiny-image", layers="last"))
    msg = str(e.value)
    assert msg.startswith("tiny-text is a text encoder") and "give it as --text tiny-text" in msg
    assert "an image encoder as --vision" in msg and "stratalign extract" not in msg
    with pytest.raises(StratalignError, match="give it as --vision tiny-image, and a text encoder as --text"):
        store.find_entry("toy", "tiny-image", modality="text")
    with pytest.raises(StratalignError, match="run: stratalign extract --dataset toy --encoder other"):
        store.find_entry("toy", "other", modality="image")  # never extracted: the advice stays
