"""Extraction records: which complete entries an extraction request made, and the encoder's cheap identity then.

    extract_records/<key>.json   {"request": ..., "identity": ..., "entries": [entry keys]}

The key (store.keys.extract_record_key) hashes the request (dataset and its content fingerprint, encoder spec,
poolings as asked, dtype, shard size). A record is a hint, never a source of truth: `stages.extract.skip` trusts
it only while the encoder's identity (encoders.identity) is unchanged and every entry it names is complete, and
otherwise loads the model as before. Removing a record (or the whole folder) only costs one model load.
"""

from __future__ import annotations

import json
from typing import Any

from stratalign.store.feature_store import FeatureStore
from stratalign.store.location import validate_key

FOLDER = "extract_records"


def _name(key: str) -> str:
    return f"{validate_key(key, 'extract record key')}.json"


def load(store: FeatureStore, key: str) -> dict[str, Any] | None:
    """The record under `key`, or None when there is none or it is unreadable (then the model is loaded)."""
    if not store.loc.exists(FOLDER, _name(key)):
        return None
    try:
        record = json.loads(store.loc.read_bytes(FOLDER, _name(key)))
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def save(store: FeatureStore, key: str, record: dict[str, Any]) -> None:
    """Write (or replace) the record under `key`."""
    store.require_writable()
    store.loc.write_json(record, FOLDER, _name(key))


def keys(store: FeatureStore) -> list[str]:
    """Every record's key (for `store verify`)."""
    if not store.loc.exists(FOLDER):
        return []
    return sorted(n[:-len(".json")] for n in store.loc.listdir(FOLDER) if n.endswith(".json"))
