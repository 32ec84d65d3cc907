"""Which Zarr codecs a store's arrays may name: the ones stratalign writes and a few plain compressors.

A shared store is untrusted input. A `zarr.json` naming another codec (`numcodecs.pickle` unpickles, so it can run
code; an unknown one made zarr raise UnknownCodecError deep inside a command) is refused when the layer is opened,
in one line naming the layer, the codec and the fix, before zarr builds anything from it.
"""

from __future__ import annotations

import json
from typing import Any, Iterator

from stratalign.errors import StratalignError

# bytes + crc32c: layout 1; sharding_indexed around them: layout 2; zstd, gzip, blosc, transpose: zarr's own
# compressors and layout codecs, which decode data and never run code
ALLOWED_CODECS = frozenset({"bytes", "crc32c", "sharding_indexed", "zstd", "gzip", "blosc", "transpose"})


def codec_names(doc: dict[str, Any]) -> Iterator[str]:
    """Every codec name in an array's metadata, nested ones (a sharding codec's inner and index codecs) too."""
    def walk(codecs: Any) -> Iterator[str]:
        for codec in codecs if isinstance(codecs, list) else []:
            name = codec.get("name") if isinstance(codec, dict) else codec
            yield str(name)
            config = codec.get("configuration") if isinstance(codec, dict) else None
            if isinstance(config, dict):
                yield from walk(config.get("codecs"))
                yield from walk(config.get("index_codecs"))

    yield from walk(doc.get("codecs"))


def check_codecs(raw: bytes, where: str, fix: str) -> None:
    """Refuse (one line: where, which codec, the fix) an array metadata document naming a codec outside
    ALLOWED_CODECS. A document that does not parse is left to the caller's own error."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return
    if not isinstance(doc, dict):
        return
    bad = sorted({n for n in codec_names(doc) if n not in ALLOWED_CODECS})
    if bad:
        kind = "a codec that unpickles (it can run code)" if any("pickle" in n for n in bad) else "an unknown codec"
        raise StratalignError(f"{where} names {kind}: {', '.join(bad)}; stratalign reads only "
                              f"{', '.join(sorted(ALLOWED_CODECS))}: {fix}")
