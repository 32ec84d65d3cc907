"""`stratalign store repair`: re-encode exactly the shards whose chunks or markers fail their checks, moving only
forward (issue 29: a repair must never leave an entry worse than it found it).

For each entry with damaged or missing shards:
1. it checks that it can rebuild before touching anything: the entry's metadata hashes to its key (an edited
   spec cannot be rebuilt under that key), its dataset is there with the same content, and, once the encoder is
   loaded, the encoder still gives this entry (same weights, layers, dims);
2. it rebuilds into a temporary place, `_repair/<key>/` (a store of its own beside the entry): the entry's
   metadata made fresh from its spec, and the damaged shards encoded there (the healthy shards' markers are
   copied, so nothing else is encoded);
3. it swaps the rebuilt files in one by one, each by an atomic write: a broken or edited layer `zarr.json` first,
   then for each shard its layer files and, last, its marker. Encoding is deterministic, so a shard file swapped
   in holds the values its old marker names; a repair killed anywhere leaves every shard as good as it was or
   repaired, and nothing is ever removed from the entry (the old repair removed the damaged shards' markers
   first, which left the entry incomplete when it then failed).
A repair run again starts from what it finds: a killed run's `_repair/<key>` is discarded, missing shards are
encoded like damaged ones. At the end the store is verified (store.verify): `repaired.left` names what is still
wrong, so `store repair` exits 0 only when `store verify` would.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable

from stratalign.errors import StratalignError, preview
from stratalign.stages.extract import ExtractConfig
from stratalign.store.feature_store import EntrySpec, FeatureEntry, FeatureStore, shard_sha
from stratalign.store.verify import REPAIR_STAGING, verify_store

STAGING = REPAIR_STAGING
# what an encoder must give again for its entry to be rebuilt under the same key (the layout fields are the entry's)
_SAME = ("dataset", "content_fingerprint", "modality", "encoder", "pooling", "layer_names", "dims", "rows", "dtype",
         "shard_rows")


@dataclass
class RepairReport:
    """What a repair found and did: shards re-encoded per entry key, layer metadata rewritten per entry key,
    entries it could not repair (why), and what `store verify` still finds afterwards (one line each)."""

    repaired: dict[str, list[int]] = field(default_factory=dict)
    unreadable: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, list[int]] = field(default_factory=dict)
    left: list[str] = field(default_factory=list)


def damaged_shards(entry: FeatureEntry) -> list[int]:
    """Shards with a corrupt chunk in any layer, a missing layer, a damaged marker, or no marker at all."""
    report = entry.verify()
    return sorted({shard for shard, _, _ in report["corrupt"]} | set(report["incomplete"]))


def cannot_rebuild(store: FeatureStore, entry: FeatureEntry) -> str | None:
    """Why an entry cannot be rebuilt under its key (None when it can), checked before anything is touched."""
    spec = entry.spec
    if spec.key != entry.key:
        return (f"its metadata hashes to {spec.key}, not to its key (edited or moved metadata): repair cannot rebuild "
                f"it; remove it with `stratalign store rm {entry.key}` and extract again")
    try:
        ds = store.dataset(spec.dataset)
    except StratalignError as exc:
        return f"its dataset cannot be read ({exc}); ingest it again, then repair"
    if ds.content_fingerprint != spec.content_fingerprint:
        return (f"dataset {spec.dataset} now has other content than the entry was extracted from: remove the entry "
                f"with `stratalign store rm {entry.key}` and extract again")
    return None


def _staging_url(store: FeatureStore, key: str) -> str:
    return f"{store.url.rstrip('/')}/{STAGING}/{key}"


def discard_staging(store: FeatureStore, key: str | None = None) -> None:
    """Remove what a killed repair left in _repair/ (one entry's, or all); the entries themselves are untouched."""
    for name in [key] if key else store.loc.listdirs(STAGING):
        store.loc.remove(STAGING, name, recursive=True)
    if not store.loc.listdir(STAGING):
        store.loc.remove(STAGING, recursive=True)


def _layer_broken(entry: FeatureEntry, layer: int) -> bool:
    try:
        entry.layer_array(layer)
        return False
    except StratalignError:
        return True


def _rewrite_metadata(store: FeatureStore, entry: FeatureEntry, staged: FeatureEntry) -> list[int]:
    """Replace each layer zarr.json of the entry that is unreadable or does not describe its spec by the one made
    fresh from the spec in the staging store (an atomic write each); the layers rewritten."""
    fixed = []
    for layer in range(len(entry.spec.dims)):
        if _layer_broken(store.entry(entry.key), layer):
            name = f"layer_{layer:03d}"
            doc = staged.store.loc.read_bytes("features", staged.key, name, "zarr.json")
            store.loc.write_bytes(doc, "features", entry.key, name, "zarr.json")
            fixed.append(layer)
    return fixed


def _swap_in(store: FeatureStore, staged: FeatureEntry, shards: list[int]) -> None:
    """Each rebuilt shard's layer files, then its marker, written over the entry's (atomic writes, marker last)."""
    key = staged.key
    for s in shards:
        for layer, arr in enumerate(staged.open_arrays()):
            chunk = arr.metadata.encode_chunk_key((s, 0)).split("/")
            name = f"layer_{layer:03d}"
            store.loc.write_bytes(staged.store.loc.read_bytes("features", key, name, *chunk), "features", key, name, *chunk)
        marker = staged.store.loc.read_bytes("features", key, "_shards", f"{s}.json")
        store.loc.write_bytes(marker, "features", key, "_shards", f"{s}.json")


def _load(spec: EntrySpec, cfg: ExtractConfig, device: Any, load: Callable[[str, str], Any] | None) -> Any:
    """The entry's encoder, loaded (the loader processes forked first, as extract does)."""
    from stratalign.stages.extract.reader import start_loader_processes

    if load is None:
        from stratalign.encoders import load_encoder as load
    start_loader_processes(cfg, device)
    return load(spec.encoder_spec, str(device))


def _check_encoder(entry: FeatureEntry, ds: Any, encoder: Any, cfg: ExtractConfig) -> None:
    from stratalign.stages.extract.plan import entry_specs

    fresh = entry_specs(ds, encoder, cfg)[0]
    differ = [f.name for f in fields(EntrySpec) if f.name in _SAME and getattr(fresh, f.name) != getattr(entry.spec, f.name)]
    if differ:
        raise StratalignError(f"cannot repair {entry.key}: encoder {entry.spec.encoder_spec} no longer gives this entry "
                              f"(its {', '.join(differ)} changed; other weights?); nothing was changed: remove it with "
                              f"`stratalign store rm {entry.key}` and extract again")


def _rebuilt_whole(staged: FeatureEntry, shards: list[int]) -> bool:
    """Do the rebuilt shards read back whole (every layer's block hashing to its new marker's sha256)?"""
    markers, damaged = staged.read_markers()
    try:
        return not damaged and all(shard_sha(staged._shard_block(layer, s)) == markers[s]["sha256"][layer]
                                   for s in shards for layer in range(len(staged.spec.dims)))
    except (StratalignError, ValueError, OSError, KeyError):
        return False


def rebuild(store: FeatureStore, entry: FeatureEntry, bad: list[int], *, device: str = "auto", progress: bool = True,
            load: Callable[[str, str], Any] | None = None) -> tuple[list[int], list[int]]:
    """Rebuild the shards `bad` of a checked entry in _repair/<key> and swap them in (see the module docstring);
    (layers whose metadata was rewritten, shards re-encoded)."""
    from stratalign.device import resolve_device
    from stratalign.stages.extract.local import extract_encoder

    spec, key = entry.spec, entry.key
    discard_staging(store, key)  # a killed repair's leftovers: never trusted, rebuilt
    staging = FeatureStore.open(_staging_url(store, key), "a", create=True)
    staged = staging.create_entry(spec)  # the metadata made fresh from the spec (the spec hashes to the key)
    fixed = _rewrite_metadata(store, entry, staged)
    if fixed:  # the shards that failed only through their layer's metadata are whole again
        entry = store.entry(key)
        bad = damaged_shards(entry)
    if bad:
        markers, _ = entry.read_markers()
        for s, marker in markers.items():  # the healthy shards are not encoded again
            if s not in bad and s < spec.n_shards:
                staging.loc.write_json(marker, "features", key, "_shards", f"{s}.json")
        skip_bad = any(m.get("bad_rows") for m in markers.values())
        cfg = ExtractConfig(encoders=(spec.encoder_spec,), poolings=(spec.pooling,), dtype=spec.dtype,
                            shard_rows=spec.shard_rows, device=device, progress=progress, skip_bad=skip_bad,
                            entry_format=spec.format_version)
        dev = resolve_device(device)
        ds = store.dataset(spec.dataset)
        encoder = _load(spec, cfg, dev, load)
        _check_encoder(entry, ds, encoder, cfg)
        extract_encoder(staging, ds, encoder, cfg, dev, specs=[spec])
        staged = staging.entry(key)
        if staged.pending_shards() or not _rebuilt_whole(staged, bad):
            raise StratalignError(f"the rebuilt shards of {key} in {_staging_url(store, key)} do not verify; nothing was "
                                  "swapped in: run `stratalign store repair` again")
        _swap_in(store, staged, bad)
    discard_staging(store, key)
    return fixed, bad


def repair_store(store: FeatureStore, keys: tuple[str, ...] = (), *, device: str = "auto", progress: bool = True,
                 load: Callable[[str, str], Any] | None = None, dry_run: bool = False) -> RepairReport:
    """Re-encode the damaged or missing shards of every entry (or of the entries `keys`), then verify the store;
    see the module docstring."""
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
        if not bad and not any(_layer_broken(entry, i) for i in range(len(entry.spec.dims))):
            continue
        blocked = cannot_rebuild(store, entry)
        if blocked is not None:
            report.unreadable[key] = blocked
            continue
        report.repaired[key] = bad
        if dry_run:
            continue
        fixed, report.repaired[key] = rebuild(store, entry, bad, device=device, progress=progress, load=load)
        if fixed:
            report.metadata[key] = fixed
    if not dry_run:
        if not keys and store.loc.exists(STAGING):
            discard_staging(store)
        found = verify_store(FeatureStore.open(store.url, "r"))
        report.left = [f"{f.kind} {f.target}: {f.status}{f' (shards {preview(list(f.shards))})' if f.shards else ''}"
                       f" {f.message}" for f in found.findings if f.problems]
    return report
