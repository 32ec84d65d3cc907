"""A source's raw records as columns: what `build_dataset` validates, gathered in batches.

A 590k-caption source held as one Python object per record costs ~1 KB a caption (the objects, their strings,
then the lists and tuples each check makes); held as Arrow columns it costs about the table it becomes. Readers
append records one at a time (`RecordColumns.append`) and every `batch_rows` records become a polars frame; a
caption's text is normalised (whitespace runs -> one space, as the captions table stores it) when its batch is
made, so the raw string never outlives its batch.

With a `Spill` folder the batches go to Parquet files there instead of memory, and `frame()` is a SpilledFrame
whose LazyFrame scans them: a source's captions then cost one batch of memory, whatever their number (`build_dataset`
validates such a frame in streaming passes and writes the captions table into the same folder).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import polars as pl


class Spill:
    """A temporary local folder for tables too large to hold: removed when the last object holding it is gone
    (or at exit), so an ingest that fails leaves nothing behind. `TMPDIR` chooses where it lives."""

    def __init__(self, prefix: str = "stratalign-ingest-") -> None:
        self._dir = tempfile.TemporaryDirectory(prefix=prefix)
        self.path = Path(self._dir.name)
        self._files = 0

    def new_file(self, stem: str) -> Path:
        """A fresh file name in the folder (numbered: names sort in the order they were asked for)."""
        self._files += 1
        return self.path / f"{stem}-{self._files:06d}.parquet"


@dataclass(frozen=True)
class SpilledFrame:
    """Records kept in a Spill folder: `lazy` scans them, and whoever holds this keeps the folder alive."""

    lazy: pl.LazyFrame
    spill: Spill

    def filter(self, predicate: pl.Expr) -> SpilledFrame:
        return SpilledFrame(self.lazy.filter(predicate), self.spill)


IMAGE_COLUMNS = {"image_id": pl.String, "path": pl.String, "relpath": pl.String, "split": pl.String,
                 "label": pl.String, "group": pl.String}
CAPTION_COLUMNS = {"caption_id": pl.String, "image_id": pl.String, "text": pl.String}


def normalize_text(text: str | None) -> str:
    """A caption as the captions table stores it: whitespace runs -> one space, trimmed ('' when blank)."""
    return " ".join((text or "").split())


class RecordColumns:
    """Records of one kind (images or captions) gathered into polars frames of `batch_rows` rows."""

    def __init__(self, columns: dict[str, Any], batch_rows: int = 65_536, spill: Spill | None = None) -> None:
        self.columns, self.batch_rows, self.spill = columns, batch_rows, spill
        self._pending: list[tuple] = []
        self._frames: list[pl.DataFrame] = []
        self._files: list[Path] = []
        self._flushed = 0  # rows in _frames or _files: len() is O(1) (readers call it per record)

    def append(self, *values: Any) -> None:
        """One record, its values in the order of `columns` (missing trailing ones are None)."""
        self._pending.append(values)
        if len(self._pending) >= self.batch_rows:
            self._flush()

    def extend(self, records: Iterable[tuple]) -> None:
        for values in records:
            self.append(*values)

    def __len__(self) -> int:
        return self._flushed + len(self._pending)

    def _flush(self) -> None:
        if not self._pending:
            return
        names = list(self.columns)
        cols: dict[str, list] = {n: [] for n in names}
        for values in self._pending:
            for n, v in zip(names, values):
                cols[n].append(v)
            for n in names[len(values):]:
                cols[n].append(None)
        if "text" in cols:
            cols["text"] = [normalize_text(t) for t in cols["text"]]
        batch = pl.DataFrame(cols, schema=self.columns)
        self._pending = []
        self._flushed += batch.height
        if self.spill is None:
            self._frames.append(batch)
            return
        path = self.spill.new_file("records")
        batch.write_parquet(path, compression="lz4")  # read back once or twice: fast beats small
        self._files.append(path)

    def frame(self) -> pl.DataFrame | SpilledFrame:
        """Every record so far: in memory, one frame of the batches as chunks (not copied into one: whoever needs
        contiguous columns, e.g. to write Parquet, rechunks the frame it finally keeps); spilled, a SpilledFrame
        scanning the batch files in order."""
        self._flush()
        self._flushed = 0
        if self.spill is not None:
            files, self._files = self._files, []
            lazy = pl.scan_parquet(files) if files else pl.LazyFrame(schema=self.columns)
            return SpilledFrame(lazy, self.spill)
        frames, self._frames = self._frames, []
        if not frames:
            return pl.DataFrame(schema=self.columns)
        return pl.concat(frames, rechunk=False)


def image_columns() -> RecordColumns:
    """Images: image_id, path, relpath, split, label, group (see datasets.RawImage)."""
    return RecordColumns(IMAGE_COLUMNS)


def caption_columns(spill: Spill | None = None) -> RecordColumns:
    """Captions: caption_id, image_id, text (see datasets.RawCaption); in `spill`'s folder when given."""
    return RecordColumns(CAPTION_COLUMNS, spill=spill)
