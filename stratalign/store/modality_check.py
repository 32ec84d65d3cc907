"""An encoder asked for as the wrong modality (--vision and --text swapped) is named with the flag it belongs to."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stratalign.errors import StratalignError

if TYPE_CHECKING:
    from stratalign.store.feature_store import FeatureStore


_FLAG = {"image": "--vision", "text": "--text"}


def refuse_other_modality(store: FeatureStore, dataset: str, encoder: str, modality: str, fingerprint: str) -> None:
    """An encoder asked for as one modality whose features are of the other (--vision and --text swapped): say
    so and name the flag it belongs to, rather than advise extracting what is already extracted."""
    other = {e.spec.modality for e in store.entries() if e.spec.dataset == dataset and e.spec.encoder_spec == encoder
             and e.spec.content_fingerprint == fingerprint} - {modality}
    if other:
        kind = sorted(other)[0]
        raise StratalignError(f"{encoder} is a {kind} encoder (its {kind} features of {dataset!r} are in the store), "
                              f"not a{'n' if modality == 'image' else ''} {modality} one: give it as "
                              f"{_FLAG.get(kind, kind)} {encoder}, and a{'n' if modality == 'image' else ''} "
                              f"{modality} encoder as {_FLAG.get(modality, modality)}")
