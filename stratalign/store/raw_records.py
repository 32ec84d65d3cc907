"""A source's raw records as columns: what `build_dataset` validates, gathered in batches.

A 590k-caption source held as one Python object per record costs ~1 KB a caption (the objects, their strings,
then the lists and tuples each check makes); held as Arrow columns it costs about the table it becomes. Readers
append records one at a time (`RecordColumns.append`) and every `batch_rows` records become a polars frame; a
caption's text is normalised (whitespace runs -> one space, as the captions table stores it) when its batch is
made, so the raw string never outlives its batch.
"""

from __future__ import annotations

from typing import Any, Iterable

import polars as pl

IMAGE_COLUMNS = {"image_id": pl.String, "path": pl.String, "relpath": pl.String, "split": pl.String,
                 "label": pl.String, "group": pl.String}
CAPTION_COLUMNS = {"caption_id": pl.String, "image_id": pl.String, "text": pl.String}


def normalize_text(text: str | None) -> str:
    """A caption as the captions table stores it: whitespace runs -> one space, trimmed ('' when blank)."""
    return " ".join((text or "").split())


class RecordColumns:
    """Records of one kind (images or captions) gathered into polars frames of `batch_rows` rows."""

    def __init__(self, columns: dict[str, Any], batch_rows: int = 65_536) -> None:
        self.columns, self.batch_rows = columns, batch_rows
        self._pending: list[tuple] = []
        self._frames: list[pl.DataFrame] = []

    def append(self, *values: Any) -> None:
        """One record, its values in the order of `columns` (missing trailing ones are None)."""
        self._pending.append(values)
        if len(self._pending) >= self.batch_rows:
            self._flush()

    def extend(self, records: Iterable[tuple]) -> None:
        for values in records:
            self.append(*values)

    def __len__(self) -> int:
        return sum(f.height for f in self._frames) + len(self._pending)

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
        self._frames.append(pl.DataFrame(cols, schema=self.columns))
        self._pending = []

    def frame(self) -> pl.DataFrame:
        """Every record so far, one frame of the batches as chunks (not copied into one: whoever needs contiguous
        columns, e.g. to write Parquet, rechunks the frame it finally keeps)."""
        self._flush()
        frames, self._frames = self._frames, []
        if not frames:
            return pl.DataFrame(schema=self.columns)
        return pl.concat(frames, rechunk=False)


def image_columns() -> RecordColumns:
    """Images: image_id, path, relpath, split, label, group (see datasets.RawImage)."""
    return RecordColumns(IMAGE_COLUMNS)


def caption_columns() -> RecordColumns:
    """Captions: caption_id, image_id, text (see datasets.RawCaption)."""
    return RecordColumns(CAPTION_COLUMNS)
