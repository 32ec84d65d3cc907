"""Ingest never merges or drops silently (issue 19): ids naming several images are refused; a dataset whose
tables are missing or damaged is reported by verify and written again by the next ingest."""

from __future__ import annotations

from pathlib import Path

import pytest

from stratalign.errors import StratalignError
from stratalign.stages.ingest.sources import ingest_source
from stratalign.store.verify import verify_store


def test_one_id_for_several_images_is_refused(tmp_path: Path, image_dir: Path) -> None:
    table = tmp_path / "dup.csv"
    table.write_text("id,image,caption\n" + "".join(f"1,imgs/img{i:03d}.png,caption {i}\n" for i in range(12)))
    with pytest.raises(StratalignError, match=r"1 id\(s\) in --id-col 'id' name several different images"):
        ingest_source("table", "d", table=str(table), image_col="image", caption_col="caption", id_col="id")
    table.write_text("id,image,caption\n" + "".join(f"{i // 2},imgs/img{i // 2:03d}.png,caption {i}\n"
                                                    for i in range(12)))
    ds = ingest_source("table", "d", table=str(table), image_col="image", caption_col="caption", id_col="id")
    assert (ds.images.height, ds.captions.height) == (6, 12)  # one id, one image, several captions: fine


@pytest.mark.parametrize("damage", ["delete-images", "truncate-captions", "garbage-images"])
@pytest.mark.parametrize("replace", [False, True])
def test_damaged_tables_are_reported_and_ingested_again(store_with_dataset, coco_json: Path, image_dir: Path,
                                                        damage: str, replace: bool) -> None:
    store, ds = store_with_dataset
    folder = Path(store.url) / "datasets" / "toy"
    if damage == "delete-images":
        (folder / "images.parquet").unlink()
    elif damage == "truncate-captions":
        blob = (folder / "captions.parquet").read_bytes()
        (folder / "captions.parquet").write_bytes(blob[: len(blob) // 2])
    else:
        (folder / "images.parquet").write_bytes(b"not parquet")
    [finding] = [f for f in verify_store(store).findings if f.kind == "dataset"]
    assert finding.status == "broken" and "--name toy --replace" in finding.message
    again = ingest_source("coco", "toy", captions_json=str(coco_json), image_dir=str(image_dir))
    assert store.save_dataset(again, replace=replace) is True  # written, not "already ingested (identical)"
    assert store.dataset("toy").fingerprint == ds.fingerprint
    assert [f.status for f in verify_store(store).findings if f.kind == "dataset"] == ["ok"]
