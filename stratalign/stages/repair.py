"""`stratalign store repair`: re-encode exactly the shards whose chunks or markers fail their checks.

Each readable entry is verified (every chunk re-read against its crc32c and the marker's sha256); the markers
of the damaged shards are removed, which makes those shards, and only those, pending; then the entry's own
request (its encoder, pooling, dtype and shard size) is extracted again, which encodes the pending shards.
Encoding a shard is deterministic, so the repaired entry is byte-identical to an uninterrupted extraction.
An entry whose encoder now has other weights cannot be repaired this way (its key would change): it is named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from stratalign.errors import StratalignError
from stratalign.stages.extract import ExtractConfig, extract
from stratalign.store.feature_store import FeatureEntry, FeatureStore


@dataclass
class RepairReport:
    """What a repair found and did: shards re-encoded per entry key, entries it could not read."""

    repaired: dict[str, list[int]] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)


def damaged_shards(entry: FeatureEntry) -> list[int]:
    """Shards with a corrupt chunk in any layer, a missing layer, or a damaged marker."""
    return sorted({shard for shard, _, _ in entry.verify()["corrupt"]})


def repair_store(store: FeatureStore, keys: tuple[str, ...] = (), *, device: str = "auto", progress: bool = True,
                 load: Callable[[str, str], Any] | None = None, dry_run: bool = False) -> RepairReport:
    """Re-encode the damaged shards of every entry (or of the entries `keys`); see the module docstring."""
    if not dry_run:
        store.require_writable()
    report = RepairReport()
    for key, entry, why in store.scan_entries():
        if keys and key not in keys:
            continue
        if entry is None:
            report.unreadable[key] = str(why)
            continue
        bad = damaged_shards(entry)
        if not bad:
            continue
        report.repaired[key] = bad
        if dry_run:
            continue
        entry.forget_shards(bad)
        spec = entry.spec
        cfg = ExtractConfig(encoders=(spec.encoder_spec,), poolings=(spec.pooling,), dtype=spec.dtype,
                            shard_rows=spec.shard_rows, device=device, progress=progress)
        extract(store, spec.dataset, cfg, load=load)
        still = store.entry(key).pending_shards()
        if still:
            raise StratalignError(f"entry {key} still lacks shards {still[:5]} after re-encoding: encoder "
                                  f"{spec.encoder_spec} no longer gives this entry (other weights?); remove it with "
                                  f"`stratalign store rm {key}` and extract again")
    return report
