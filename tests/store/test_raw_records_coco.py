"""COCO ingest in columnar batches: the same dataset, byte for byte, as the record-list code wrote before it; and
with its captions spilled to Parquet files (bounded memory), the same dataset as with the captions in memory.

The expected hashes were computed with the record-list implementation (commit 1ed7604, before the columnar
path) on the very input `_coco_input` writes: a COCO file with every kind of bad record (a duplicate image id,
a caption of an unknown image, empty and blank captions, an image without a caption, a missing and a corrupt
image file) and captions whose whitespace and Unicode the tables normalise. Parquet bytes carry the writer's
version, so the table-byte hashes are checked with the polars that wrote them (2.1.0); the fingerprints always.
"""

from __future__ import annotations

import gc
import hashlib
import json
import random
import sys
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from stratalign.errors import StratalignError
from stratalign.stages.ingest.sources import ingest_source
from stratalign.store.datasets import _duplicate_ids, build_dataset
from stratalign.store.feature_store import FeatureStore
from stratalign.store.keys import content_fingerprint, content_fingerprint_batches
from stratalign.store.raw_records import CAPTION_COLUMNS, RecordColumns, Spill, SpilledFrame, image_columns

POLARS_OF_EXPECTED = "2.1.0"
EXPECTED = {  # computed with the record-list code (1ed7604) by `_ingest` on `_coco_input`
    "skip_bad": {"content_fingerprint": "1618757b92f70f7d24e60159437693ba997f9010f92a22c812f25df01ef0fa18",
                 "fingerprint": "694ddaf71e31bee464ab0ad39dc43f034969644edf5dfe2c5b4a3ae970f46b0b",
                 "skipped": "2f8a12bfec2cd96ccc02f36946aafd76952e3b54661367b6fc05015d48e925e6",
                 "images.parquet": "249d35c99b25a07f515d275e139ace5860eb5a9c937829fbef56ec653f7a97f0",
                 "captions.parquet": "d73f03656c4df5afbadf229b4d41459cc8c773516bcdba2637c6707beeea83b9"},
    "clean": {"content_fingerprint": "07399d254fa00c4ef3c17559145da68a60fb50f1a92505a6989754011efb2be1",
              "fingerprint": "54d7efa1d4317d0af5e8b1811ec4d120bc228f571981a583ab5d25e0defbe249",
              "skipped": "4f53cda18c2baa0c0354bb5f9a3ecbe5ed12ab4d8e11ba873c2f11161202b945",
              "images.parquet": "07b45e3b1ebe37cd979daabb96f853362df4efda5856ddf1ec78f9dfe2c6978c",
              "captions.parquet": "c82eaed67b836ac2a8c30086da6873d9f192ce6ba19449c6d05fba024a5bf320"},
}


def _coco_input(root: Path, bad: bool) -> Path:
    """A small COCO captions file and its images (written here, deterministically)."""
    img_dir = root / "img"
    img_dir.mkdir()
    n = 12
    images = [{"id": i, "file_name": f"{i:04d}.png", "height": 2, "width": 2} for i in range(n)]
    for i in range(n):
        Image.new("RGB", (2, 2), (i * 20, 255 - i * 20, i)).save(img_dir / f"{i:04d}.png")
    texts = ["A man  riding\ta wave.", " two dogs\nplaying in the snow ", "café crème — délicieux", "emoji 🐶 and 🐱",
             'quotes "inside" and \\ backslash', "a\u2003wide\u00a0space"]
    anns = [{"id": 100 + k, "image_id": k % (n - 1), "caption": texts[k % len(texts)] + f" #{k}"} for k in range(2 * n)]
    if bad:
        images.append({"id": 3, "file_name": "dup.png"})  # duplicate image id
        images.append({"id": 50, "file_name": "missing.png"})  # missing file
        (img_dir / "corrupt.png").write_bytes(b"\x89PNG not really")
        images.append({"id": 51, "file_name": "corrupt.png"})
        anns += [{"id": 900, "image_id": 77, "caption": "of no image"}, {"id": 901, "image_id": 2, "caption": ""},
                 {"id": 902, "image_id": 4, "caption": " \t\n "}, {"id": 903, "image_id": 50, "caption": "missing"},
                 {"id": 904, "image_id": 51, "caption": "corrupt"}]
    else:  # image n - 1 gets a caption (else it is a lonely image, a bad record)
        anns.append({"id": 999, "image_id": n - 1, "caption": "the last one"})
    path = root / "captions.json"
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": anns}))
    return path


def _ingest(tmp_path: Path, bad: bool) -> dict[str, str]:
    """Hashes of what ingesting the input stores (run in tmp_path: the tables hold the relative image paths)."""
    _coco_input(tmp_path, bad)
    ds = ingest_source("coco", "tiny-coco", captions_json="captions.json", image_dir="img", skip_bad=bad)
    store = FeatureStore.open(str(tmp_path / "store"), "a", create=True)
    store.save_dataset(ds)
    folder = tmp_path / "store" / "datasets" / "tiny-coco"
    meta = json.loads((folder / "dataset.json").read_text())
    return {
        "content_fingerprint": ds.content_fingerprint, "fingerprint": ds.fingerprint,
        "skipped": hashlib.sha256(json.dumps(meta["skipped"], sort_keys=True).encode()).hexdigest(),
        **{f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in ("images.parquet", "captions.parquet")},
    }


@pytest.mark.parametrize("reader", ["ijson", "json.load"])
@pytest.mark.parametrize("case", ["skip_bad", "clean"])
def test_coco_ingest_matches_the_record_list_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str,
                                                  reader: str) -> None:
    if reader == "ijson":
        pytest.importorskip("ijson", reason="the streamed COCO reader needs ijson (the `ingest` extra)")
    else:
        monkeypatch.setitem(sys.modules, "ijson", None)  # the reader falls back to json.load
    monkeypatch.chdir(tmp_path)
    got = _ingest(tmp_path, case == "skip_bad")
    want = dict(EXPECTED[case])
    if pl.__version__ != POLARS_OF_EXPECTED:  # parquet bytes name their writer: compare the fingerprints only
        for f in ("images.parquet", "captions.parquet"):
            want.pop(f)
            got.pop(f)
    assert got == want


def test_duplicate_caption_ids_are_one_error(tmp_path: Path) -> None:
    path = _coco_input(tmp_path, False)
    data = json.loads(path.read_text())
    data["annotations"].append({**data["annotations"][0], "image_id": 5})
    path.write_text(json.dumps(data))
    with pytest.raises(StratalignError, match=r"1 duplicate caption id\(s\) in dataset 'tiny-coco': 100"):
        ingest_source("coco", "tiny-coco", captions_json=str(path), image_dir=str(tmp_path / "img"), skip_bad=True)


def test_fingerprint_of_batches_is_the_fingerprint_of_the_lists() -> None:
    rng = random.Random(0)
    alphabet = ["a", " ", '"', "\\", "é", "🐶", "\n", "\u2003", "x"]

    def word() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 8)))

    images = [(word(), word(), word()) for _ in range(50)]
    captions = [(word(), word(), word()) for _ in range(130)]
    cuts = sorted(rng.sample(range(131), 6))  # uneven batches, empty ones included
    batches = [captions[a:b] for a, b in zip([0, *cuts, cuts[-1]], [*cuts, cuts[-1], 130])]
    assert sum(map(len, batches)) == 130 and any(len(b) == 0 for b in batches)
    assert content_fingerprint_batches([images[:20], images[20:]], batches) == content_fingerprint(images, captions)
    assert content_fingerprint_batches([], []) == content_fingerprint([], [])


def test_limit_keeps_the_first_images_and_their_captions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    anns = json.loads(_coco_input(tmp_path, False).read_text())["annotations"]
    ds = ingest_source("coco", "tiny-coco", captions_json="captions.json", image_dir="img", limit=4)
    assert ds.images["image_id"].to_list() == ["0", "1", "2", "3"]
    assert ds.captions["caption_id"].to_list() == [str(a["id"]) for a in anns if a["image_id"] < 4]


def _records(path: Path, batch_rows: int, spill: bool):
    """The COCO file's images as a frame, its captions in columns of `batch_rows` rows (spilled or in memory)."""
    data = json.loads(path.read_text())
    images = image_columns()
    for r in data["images"]:
        images.append(str(r["id"]), str(path.parent / "img" / r["file_name"]), r["file_name"])
    captions = RecordColumns(CAPTION_COLUMNS, batch_rows=batch_rows, spill=Spill() if spill else None)
    captions.extend((str(a["id"]), str(a["image_id"]), a["caption"]) for a in data["annotations"])
    return images.frame(), captions.frame()


@pytest.mark.parametrize("bad", [True, False])
def test_spilled_captions_make_the_dataset_the_memory_path_makes(tmp_path: Path, bad: bool) -> None:
    path = _coco_input(tmp_path, bad)
    images, spilled = _records(path, batch_rows=5, spill=True)
    assert isinstance(spilled, SpilledFrame) and len(list(spilled.spill.path.glob("records-*.parquet"))) > 3
    in_memory = build_dataset("d", *_records(path, batch_rows=5, spill=False), source={}, skip_bad=bad)
    from_files = build_dataset("d", images, spilled, source={}, skip_bad=bad)
    assert in_memory.captions_file is None and from_files.captions_file.is_file()
    assert from_files.captions_file.parent == spilled.spill.path
    assert from_files.n_captions == in_memory.captions.height > 20
    assert from_files.meta == in_memory.meta and (not bad or from_files.meta["skipped"])
    assert from_files.images.equals(in_memory.images)
    assert from_files.captions.equals(in_memory.captions)
    batches = list(from_files.caption_batches(["caption_id", "text"], rows=7))
    assert pl.concat(batches).equals(in_memory.captions.select("caption_id", "text"))


def test_a_saved_spilled_table_is_the_file_and_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _coco_input(tmp_path, False)
    ds = ingest_source("coco", "tiny-coco", captions_json="captions.json", image_dir="img")
    assert ds.captions_file is not None and ds._captions is None  # not loaded by the ingest
    store = FeatureStore.open(str(tmp_path / "store"), "a", create=True)
    assert store.save_dataset(ds) is True
    stored = tmp_path / "store" / "datasets" / "tiny-coco" / "captions.parquet"
    assert stored.read_bytes() == ds.captions_file.read_bytes()
    assert store.dataset("tiny-coco").captions.equals(ds.captions)
    assert store.save_dataset(ds) is False  # identical and whole
    data = bytearray(stored.read_bytes())  # a damaged page in the middle of the table (the footer is intact)
    data[len(data) // 3: len(data) // 3 + 40] = bytes(40)
    stored.write_bytes(bytes(data))
    assert store.save_dataset(ds) is True  # the damaged copy is rewritten
    assert stored.read_bytes() == ds.captions_file.read_bytes()


def test_the_spill_folder_goes_with_the_dataset_or_the_error(tmp_path: Path) -> None:
    path = _coco_input(tmp_path, False)
    images, spilled = _records(path, batch_rows=5, spill=True)
    folder = spilled.spill.path
    ds = build_dataset("d", images, spilled, source={})
    del spilled
    gc.collect()
    assert ds.captions_file.is_file()  # the dataset holds the folder
    del ds
    gc.collect()
    assert not folder.exists()
    data = json.loads(path.read_text())
    data["annotations"].append({**data["annotations"][0], "image_id": 5})  # a duplicate caption id: refused
    path.write_text(json.dumps(data))
    images, spilled = _records(path, batch_rows=5, spill=True)
    folder = spilled.spill.path
    with pytest.raises(StratalignError, match="duplicate caption id"):
        build_dataset("d", images, spilled, source={})
    del spilled
    gc.collect()
    assert not folder.exists()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet="ab\u00e9 ", max_size=3), max_size=40))
def test_duplicate_ids_are_the_repeated_values(values: list[str]) -> None:
    frame = pl.LazyFrame({"caption_id": values}, schema={"caption_id": pl.String})
    assert _duplicate_ids(frame, "caption_id") == sorted({v for v in values if values.count(v) > 1})
