"""Check a whole store: load every dataset folder and re-read every chunk of every feature entry.

`verify_store` returns typed findings (what `stratalign store verify` prints); it never raises for a broken
dataset or entry, it reports it. Only an unreadable store itself (no store, I/O failure) raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from stratalign.errors import StratalignError
from stratalign.store import extract_records, graphs, layer_results, prompt_cache
from stratalign.store.claims import store_claims
from stratalign.store.feature_store import FeatureStore
from stratalign.store.keys import choice_name
from stratalign.store.migrate import STAGING
from stratalign.store.runs import RunRegistry

Kind = Literal["dataset", "group", "entry", "shard", "run", "claim", "file"]
Status = Literal["ok", "broken", "corrupt", "incomplete", "held", "stale"]


@dataclass(frozen=True)
class Finding:
    """One checked thing and its state.

    kind: dataset (a dataset folder), group (the features/ group document), entry (a feature entry),
    shard (one shard x layer chunk range of an entry). target: the dataset name, "features", or the entry key.
    message: the detail (an error, or a size for ok). shards: the shard(s) concerned (corrupt, incomplete);
    layer: the layer of a corrupt chunk range."""

    kind: Kind
    status: Status
    target: str
    message: str
    shards: tuple[int, ...] = ()
    layer: int | None = None

    @property
    def problems(self) -> int:
        """0 for ok and for claims (a stale claim is taken over by the next extract), one per incomplete shard,
        1 for anything else."""
        if self.status in ("ok", "held", "stale"):
            return 0
        return len(self.shards) if self.status == "incomplete" else 1


@dataclass(frozen=True)
class VerifyReport:
    """Every finding in store order (datasets, then the features group, then entries)."""

    url: str
    findings: tuple[Finding, ...]

    @property
    def problems(self) -> int:
        """Broken datasets or entries, corrupt chunk ranges and incomplete shards, counted one each."""
        return sum(f.problems for f in self.findings)

    @property
    def ok(self) -> bool:
        return self.problems == 0


def _link_line(store: FeatureStore, folder: str, name: str, fix: str) -> str:
    return (f"{folder}/{name} is a symlink (to {store.loc.link_target(folder, name)}): a store keeps no links; replace "
            f"it by the folder itself, or remove the link with {fix}")


def verify_datasets(store: FeatureStore) -> list[Finding]:
    """Load every dataset folder (tables, sizes, metadata): one finding each; a symlink in datasets/ is broken."""
    out = [Finding("dataset", "broken", name, _link_line(store, "datasets", name, "`stratalign store rm --orphans`"))
           for name in store.loc.linked("datasets")]
    for name in store.dataset_folders():
        try:
            ds = store.dataset(name)
        except StratalignError as exc:
            out.append(Finding("dataset", "broken", name, str(exc)))
            continue
        out.append(Finding("dataset", "ok", name, f"{ds.images.height} images, {ds.captions.height} captions"))
    return out


def verify_entries(store: FeatureStore) -> list[Finding]:
    """Read the features group document, then re-read every chunk of every entry folder against its checksums."""
    out = []
    if store.loc.exists("features", "zarr.json"):
        try:
            store.loc.read_json("features", "zarr.json")
        except StratalignError as exc:
            out.append(Finding("group", "broken", "features", str(exc)))
    for key, entry, why in store.scan_entries():
        report = None
        if entry is not None:
            try:
                if entry.spec.key != key:  # the content address: the metadata must hash to the folder's key
                    raise StratalignError(f"its metadata hashes to {entry.spec.key}, not to its key (edited or "
                                          f"moved metadata); remove it with `stratalign store rm {key}`")
                report = entry.verify()
            except StratalignError as exc:
                why = str(exc)
        if entry is None or report is None:
            out.append(Finding("entry", "broken", key, str(why)))
            continue
        for shard, layer, what in report["corrupt"]:
            out.append(Finding("shard", "corrupt", entry.key, what, shards=(shard,), layer=layer))
        if report["incomplete"]:
            out.append(Finding("entry", "incomplete", entry.key, f"shards {report['incomplete']}",
                               shards=tuple(report["incomplete"])))
        if not report["corrupt"] and not report["incomplete"]:
            out.append(Finding("entry", "ok", entry.key, f"{entry.spec.n_shards} shards"))
    return out


def verify_references(store: FeatureStore) -> list[Finding]:
    """Datasets that entries or finished runs were made from but whose folder is gone (train and eval need them)."""
    present = set(store.dataset_folders())
    users: dict[str, list[str]] = {}
    for _, entry, _ in store.scan_entries():
        if entry is not None and entry.spec.dataset not in present:
            users.setdefault(entry.spec.dataset, []).append(f"entry {entry.key}")
    registry = RunRegistry(store)
    for rid in registry.ids():
        try:
            config = store.loc.read_json("runs", rid, "config.json") if registry.is_done(rid) else None
        except StratalignError:
            continue  # verify_runs names it
        if isinstance(config, dict) and isinstance(config.get("dataset"), str) and config["dataset"] not in present:
            users.setdefault(config["dataset"], []).append(f"run {rid}")
    return [Finding("dataset", "broken", name, f"missing: its folder datasets/{name} is gone but {len(named)} "
                    f"artifact(s) were made from it ({', '.join(named[:3])}{' ...' if len(named) > 3 else ''}); ingest "
                    f"it again under the name {name}, or remove them with `stratalign store rm --orphans`")
            for name, named in sorted(users.items())]


def verify_runs(store: FeatureStore) -> list[Finding]:
    """Read back every finished run: config, weights, metrics, evaluations on other datasets, per-query results;
    a symlink in runs/ is broken."""
    registry = RunRegistry(store)
    out = [Finding("run", "broken", rid, _link_line(store, "runs", rid, f"`stratalign runs rm {rid}`"))
           for rid in registry.linked()]
    for rid in registry.ids():
        if not registry.is_done(rid):
            continue  # an unfinished run (no metrics.json) is trained again by the next `train`
        try:
            registry.load(rid)  # config (its keys), weights, metrics
            for name in store.loc.listdir("runs", rid):
                if name.startswith("eval-") and name.endswith(".json"):
                    if not isinstance(store.loc.read_json("runs", rid, name), dict):
                        raise StratalignError(f"{store.loc.path('runs', rid, name)} is not an object; delete it "
                                              "to evaluate again")
            tunings = registry.tunings(rid)  # the grids it was chosen from (each checked as it is read)
            got = registry.load_queries(rid)
        except StratalignError as exc:
            out.append(Finding("run", "broken", rid, str(exc)))
            continue
        queries = f", per-query results of {len(got[0].get('image_rows', []))} images" if got is not None else ""
        tuned = f", chosen from {len(tunings)} tuning grid(s)" if tunings else ""
        out.append(Finding("run", "ok", rid, f"config, weights, metrics{queries}{tuned}"))
    return out


def _check_file(store: FeatureStore, folder: str, name: str) -> str | None:
    """Why one cache file (prompts, layers, choices, graphs) is unusable, with the fix; None when it is whole."""
    loc = store.loc
    try:
        if folder == "prompts":
            prompt_cache.check(loc.read_bytes(folder, name))
        elif folder == "graphs":
            if graphs.check(loc.read_bytes(folder, name)) is not None:
                return "damaged (fails its checksum): delete it, the next run rebuilds it"
        elif folder == "layers":
            why = layer_results.result_problem(loc.read_json(folder, name))
            if why:
                return f"{why}: delete it, the next `stratalign layers` computes it again"
        elif folder == "choices":
            why = layer_results.choice_problem(loc.read_json(folder, name))
            if why:
                return f"{why}: record it again with `stratalign layers ... --choose best`"
        elif folder == extract_records.FOLDER:
            why = _check_record(loc.read_json(folder, name))
            if why:
                return f"{why}: delete it (the next extract loads the model once and writes it again)"
    except ValueError as exc:
        return f"{exc}: delete it, it is computed again when needed"
    except StratalignError as exc:
        return f"{exc}: delete it, it is computed again when needed"
    return None


CACHE_FILES = {"prompts": ".safetensors", "graphs": ".safetensors", "layers": ".json", "choices": ".json",
               extract_records.FOLDER: ".json"}


def _layer_counts(store: FeatureStore) -> dict[str, tuple[int, int]]:
    """choices file name -> the most layers of the image and text entries of its (dataset, vision, text)."""
    image: dict[tuple[str, str], int] = {}
    text: dict[tuple[str, str], int] = {}
    for entry in store.entries():
        side = image if entry.spec.modality == "image" else text
        where = (entry.spec.dataset, entry.spec.encoder_spec)
        side[where] = max(side.get(where, 0), len(entry.spec.dims))
    return {choice_name(ds, v, t): (nv, nt) for (ds, v), nv in image.items() for (dt, t), nt in text.items() if dt == ds}


def _check_choice_range(name: str, choice: object, counts: dict[str, tuple[int, int]]) -> str | None:
    """Why a whole choice names layers its entries do not have (None when they have them, or there are none)."""
    if name not in counts or not isinstance(choice, dict):
        return None
    nv, nt = counts[name]
    v, t = choice.get("vision_layer"), choice.get("text_layer")
    if isinstance(v, int) and isinstance(t, int) and (v >= nv or t >= nt):
        return (f"names layers {v},{t} but the entries have {nv} and {nt}: record it again with `stratalign layers ... "
                "--choose best`")
    return None


def _check_record(record: object) -> str | None:
    """Why an extraction record is unusable (None when whole): what stages.extract.skip reads of it."""
    if not isinstance(record, dict) or not isinstance(record.get("request"), dict) or "identity" not in record:
        return "not an extraction record (request, identity, entries)"
    entries = record.get("entries")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, str) for e in entries):
        return "its entries are not a list of entry keys"
    return None


def verify_files(store: FeatureStore) -> list[Finding]:
    """Every prompt cache, kNN graph, layer result, layer choice and extraction record file: a finding for each
    damaged one (a choice naming layers its entries lack included)."""
    out = []
    counts = _layer_counts(store)
    for folder, suffix in CACHE_FILES.items():
        for name in store.loc.listdir(folder):
            if name.endswith(suffix) and ".tmp-" not in name:
                why = _check_file(store, folder, name)
                if why is None and folder == "choices":
                    why = _check_choice_range(name, store.loc.read_json(folder, name), counts)
                if why is not None:
                    out.append(Finding("file", "broken", f"{folder}/{name}", why))
    return out


def verify_claims(store: FeatureStore) -> list[Finding]:
    """Every shard claim: who holds it and until when, or that it is stale (`store unlock` removes those)."""
    return [Finding("claim", "stale" if state.stale else "held", key, state.describe(), shards=(state.shard,))
            for key, state in store_claims(store.loc)]


def verify_migrations(store: FeatureStore) -> list[Finding]:
    """What an interrupted `store migrate` left (the entry may be missing until it is finished or undone)."""
    return [Finding("entry", "broken", key, f"an interrupted `store migrate` left {STAGING}/{key}: run "
                    "`stratalign store migrate` to finish or undo it") for key in store.loc.listdirs(STAGING)]


REPAIR_STAGING = "_repair"  # stages.repair's temporary place (a killed repair leaves it; the entry is untouched)


def verify_repairs(store: FeatureStore) -> list[Finding]:
    """What a killed `store repair` left in _repair/ (its entry may still be damaged: the next repair finishes it)."""
    return [Finding("entry", "broken", key, f"an interrupted `store repair` left {REPAIR_STAGING}/{key}: run "
                    "`stratalign store repair` again") for key in store.loc.listdirs(REPAIR_STAGING)]


def verify_store(store: FeatureStore) -> VerifyReport:
    """Every dataset, entry and run per-query file of the store, checked, and its claims listed (see the module
    docstring)."""
    return VerifyReport(url=store.url, findings=tuple(
        verify_datasets(store) + verify_references(store) + verify_entries(store) + verify_migrations(store)
        + verify_repairs(store) + verify_runs(store) + verify_files(store) + verify_claims(store)))
