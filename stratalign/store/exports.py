"""An exported aligned model: a self-contained folder that `AlignedModel.load` reads without the store.

    <folder>/model.json          the card: format, run id, encoder specs + metadata (weights sha256, preprocessing),
                                 chosen layers, pooling, feature dtype, zero-shot classes and templates, the run's
                                 config and metrics, and the sha256 of heads.safetensors
    <folder>/heads.safetensors   the run's head weights, byte for byte the run's weights file (model config inside)
    <folder>/README.md           the model card for people (use.card.model_card_markdown); not read back

JSON and safetensors only: nothing is ever unpickled. Reading checks the heads file against the card's hash.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from stratalign.errors import StratalignError
from stratalign.store.location import Location

EXPORT_FORMAT = "stratalign-aligned-model/1"
CARD_FILE = "model.json"
HEADS_FILE = "heads.safetensors"
README_FILE = "README.md"


def write_export(folder: str | Path, card: dict[str, Any], heads: bytes, readme: str | None = None) -> Path:
    """Write heads (safetensors bytes) and the README model card, then the card (with the heads' sha256 and the
    format): the card last, so a half-written export is refused by `read_export`. Every file goes through the
    store's containment rule (store.location: no symlink in the folder is written through)."""
    loc = Location.from_url(str(folder))
    card = {**card, "format": EXPORT_FORMAT, "heads_sha256": hashlib.sha256(heads).hexdigest()}
    loc.write_bytes(heads, HEADS_FILE)
    if readme is not None:
        loc.write_bytes(readme.encode(), README_FILE)
    loc.write_bytes(json.dumps(card, indent=1, sort_keys=True).encode(), CARD_FILE)
    return Path(loc.path())


def read_export(folder: str | Path) -> tuple[dict[str, Any], bytes]:
    """(card, heads bytes) of an export folder; a missing file, another format or a heads file that is not the
    one the card names is a one-line error."""
    loc = Location.from_url(str(folder))
    if not loc.exists(CARD_FILE):
        raise StratalignError(f"{folder} is not an exported model (no {CARD_FILE}); make one with "
                              "`stratalign export --run R --out DIR`")
    card = loc.read_json(CARD_FILE)
    if not isinstance(card, dict) or card.get("format") != EXPORT_FORMAT:
        raise StratalignError(f"{loc.path(CARD_FILE)} is not a {EXPORT_FORMAT} card "
                              f"(format {card.get('format') if isinstance(card, dict) else None!r})")
    if not loc.exists(HEADS_FILE):
        raise StratalignError(f"exported model {folder} lacks {HEADS_FILE}; export it again")
    heads = loc.read_bytes(HEADS_FILE)
    sha = hashlib.sha256(heads).hexdigest()
    if sha != card.get("heads_sha256"):
        raise StratalignError(f"{loc.path(HEADS_FILE)} has sha256 {sha[:12]}... but {CARD_FILE} names "
                              f"{str(card.get('heads_sha256'))[:12]}...: the heads were changed; export the run again")
    return card, heads
