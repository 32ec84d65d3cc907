"""`stratalign store ls | verify | rm | migrate`: inspect, verify and clean the store (listings come from store.inventory)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.markup import escape

from stratalign.cli.common import StoreOption, console, print_table, store_url
from stratalign.errors import StratalignError

if TYPE_CHECKING:
    from stratalign.store.location import Location
    from stratalign.store.verify import Finding

store_app = typer.Typer(help="Inspect, verify and clean the feature store.", no_args_is_help=True)


@store_app.command("ls")
def store_ls(
    kind: Optional[str] = typer.Option(None, help="List every artifact of this kind (run, eval, queries, tuning, layers, "
                                       "heatmap, choice, graph, prompts, extract_record)."),
    as_json: bool = typer.Option(False, "--json", help="Everything (datasets, entries, artifacts, claims) as JSON."),
    store: Optional[str] = StoreOption,
) -> None:
    """Datasets, feature entries, a count and size of every other kind of artifact, the orphans (what they lost) and
    the shard claims; --kind lists one kind's artifacts, --json gives everything to programs."""
    from stratalign.store.feature_store import FeatureStore
    from stratalign.store.inventory import KINDS, inventory

    fs = FeatureStore.open(store_url(store), "r")
    if kind is not None and kind not in KINDS:
        raise StratalignError(f"unknown artifact kind {kind!r}; kinds: {', '.join(KINDS)}")
    found = [a for a in inventory(fs) if (a.kind == kind if kind else a.kind not in ("dataset", "entry"))]
    if as_json:
        console.out(json.dumps(_listing(fs, found, kind), indent=1, default=str), highlight=False)
        return
    if kind is None:
        for name in fs.dataset_folders():
            try:
                console.print("dataset " + ", ".join(f"{k}={v}" for k, v in fs.dataset(name).summary().items()),
                              highlight=False, soft_wrap=True)
            except StratalignError as exc:
                console.print(f"dataset {name}: [red]broken[/red] ({escape(str(exc))})", soft_wrap=True)
        table = fs.entry_table()
        if table.height == 0:
            console.print(f"no feature entries in {fs.url}")
        else:
            print_table(table, title=f"feature entries in {fs.url}")
    listed = found if kind else [a for a in found if a.orphan]  # the orphans are what a person acts on
    if listed:
        import polars as pl

        print_table(pl.DataFrame({"kind": [a.kind for a in listed], "name": [a.name for a in listed],
                                  "bytes": [a.bytes for a in listed], "what": [a.detail for a in listed],
                                  "status": [f"orphan: {a.orphan}" if a.orphan else "ok" for a in listed]}),
                    title=f"{kind or 'orphan'} artifacts in {fs.url}")
    totals: dict[str, list[int]] = {}
    for a in found:
        totals.setdefault(a.kind, []).append(a.bytes)
    console.print(", ".join(f"{len(v)} {k} ({sum(v):,} bytes)" for k, v in totals.items()) or "no other artifacts",
                  highlight=False)
    if kind is None:
        if found:
            console.print("(`stratalign store ls --kind KIND` lists one kind; `runs ls` the runs)", highlight=False)
        print_claims(fs.loc)


def _listing(fs: Any, found: list, kind: Optional[str]) -> dict[str, Any]:
    """`store ls --json`: the same facts as the table, whole."""
    from stratalign.store.claims import store_claims

    out: dict[str, Any] = {"store": fs.url}
    if kind is None:
        datasets = []
        for name in fs.dataset_folders():
            try:
                datasets.append(fs.dataset(name).summary())
            except StratalignError as exc:
                datasets.append({"name": name, "broken": str(exc)})
        out["datasets"] = datasets
        out["entries"] = fs.entry_table().to_dicts()
        out["claims"] = [{"entry": key, "shard": state.shard, "state": state.describe()}
                         for key, state in store_claims(fs.loc)]
    out["artifacts"] = [{"kind": a.kind, "name": a.name, "bytes": a.bytes, "what": a.detail, "orphan": a.orphan}
                        for a in found]
    return out


def print_claims(loc: Location) -> None:
    """One line per shard claim: who holds it until when, or that it is stale."""
    from stratalign.store.claims import store_claims

    for key, state in store_claims(loc):
        console.print(f"claim {escape(key)} {escape(state.describe())}", soft_wrap=True, highlight=False)


# how each (kind, status) of a finding reads; target and message are escaped before they are filled in
_LINES = {
    ("dataset", "ok"): "[green]ok[/green] dataset {target} ({message})",
    ("dataset", "broken"): "[red]broken dataset[/red] {target}: {message}",
    ("group", "broken"): "[red]broken[/red] {target} group: {message}",
    ("entry", "broken"): "[red]broken[/red] {target}: {message}",
    ("shard", "corrupt"): "[red]corrupt[/red] {target} shard {shard} {layer}: {message}",
    ("entry", "incomplete"): "[yellow]incomplete[/yellow] {target}: {message}",
    ("entry", "ok"): "[green]ok[/green] {target} ({message})",
    ("run", "ok"): "[green]ok[/green] run {target} ({message})",
    ("run", "broken"): "[red]broken[/red] run {target}: {message}",
    ("claim", "held"): "claim {target} {message}",
    ("file", "broken"): "[red]broken[/red] {target}: {message}",
    ("claim", "stale"): "[yellow]stale claim[/yellow] {target} {message} (`stratalign store unlock` removes it)",
}


def finding_line(finding: Finding) -> str:
    """One finding as the rich-markup line `store verify` prints."""
    return _LINES[finding.kind, finding.status].format(
        target=escape(finding.target), message=escape(finding.message),
        shard=finding.shards[0] if finding.shards else "",
        layer="marker" if finding.layer is None else f"layer {finding.layer}")


@store_app.command("verify")
def store_verify(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also print every dataset, entry and run that is ok."),
    store: Optional[str] = StoreOption,
) -> None:
    """Load every dataset and re-read every entry's chunks; print what is broken, corrupt or incomplete and one
    summary line (non-zero exit if anything is)."""
    from stratalign.store.feature_store import FeatureStore
    from stratalign.store.verify import verify_store

    report = verify_store(FeatureStore.open(store_url(store), "r"))
    for finding in report.findings:
        if verbose or finding.status != "ok":
            console.print(finding_line(finding), soft_wrap=True)
    console.print(verify_summary(report), highlight=False, soft_wrap=True)
    if report.problems:
        raise StratalignError(f"store {report.url} has {report.problems} problem(s) (broken datasets or entries, "
                              "corrupt or incomplete shards); see above")


def verify_summary(report: Any) -> str:
    """'verified 2 datasets, 6 feature entries, 40 runs in URL: all ok' (or the problems by status)."""
    counted = {kind: len({f.target for f in report.findings if f.kind == kind}) for kind in ("dataset", "entry", "run")}
    what = f"{counted['dataset']} dataset(s), {counted['entry']} feature entr{'y' if counted['entry'] == 1 else 'ies'}, " \
           f"{counted['run']} run(s) in {report.url}"
    bad: dict[str, int] = {}
    for f in report.findings:
        if f.problems:
            bad[f.status] = bad.get(f.status, 0) + f.problems
    stale = sum(1 for f in report.findings if f.status == "stale")
    tail = f"; {stale} stale claim(s)" if stale else ""
    if not bad:
        return f"verified {what}: all ok{tail}"
    return f"verified {what}: " + ", ".join(f"{n} {status}" for status, n in bad.items()) + tail


@store_app.command("rm")
def store_rm(
    keys: list[str] = typer.Argument(None, help="Entry keys to remove (see `store ls`; broken entries too)."),
    dataset: Optional[str] = typer.Option(None, help="Remove a dataset's tables (its features stay)."),
    run: list[str] = typer.Option(None, "--run", help="Remove a run (id or unique prefix); repeatable."),
    artifact: list[str] = typer.Option(None, "--artifact", help="Remove an artifact named KIND:NAME as `store ls` "
                                       "shows it (e.g. layers:KEY, graph:KEY, eval:RUN/DATASET); repeatable."),
    orphans: bool = typer.Option(False, "--orphans", help="Remove every artifact whose entry or dataset is gone."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
    store: Optional[str] = StoreOption,
) -> None:
    """Remove feature entries, a dataset, runs, single artifacts, or all orphans (readable or broken)."""
    from stratalign.store import inventory
    from stratalign.store.feature_store import FeatureStore
    from stratalign.store.runs import RunRegistry

    fs = FeatureStore.open(store_url(store), "a")
    targets = list(keys or [])
    if not (targets or dataset or run or artifact or orphans):
        raise StratalignError("name entry keys, --dataset, --run, --artifact KIND:NAME or --orphans to remove")
    for key in targets:
        fs.entry_folder(key)  # validates the key (no path escapes) and that its folder exists
    if dataset:
        fs.dataset_folder(dataset)
    doomed = [inventory.find(fs, "run", RunRegistry(fs).resolve(r)) for r in run or []]
    for spec in artifact or []:
        if ":" not in spec:
            raise StratalignError(f"--artifact {spec!r}: use KIND:NAME, e.g. layers:<key> (see `stratalign store ls`)")
        doomed.append(inventory.find(fs, *spec.split(":", 1)))
    if orphans:
        doomed += [a for a in inventory.inventory(fs) if a.orphan and a not in doomed]
    doomed = [a for a in doomed if not any(a.parts[:len(b.parts)] == b.parts and a != b for b in doomed)]
    what = [f"{len(targets)} entr(y/ies)"] * bool(targets) + [f"dataset {dataset}"] * bool(dataset) + \
        [a.label + (f" ({a.orphan})" if a.orphan else "") for a in doomed]
    if not what:
        console.print("nothing to remove")
        return
    if not yes and not typer.confirm(f"remove {'; '.join(what)}?"):
        raise typer.Exit(1)
    for key in targets:
        fs.remove_entry(key)
        console.print(f"removed {key}")
    if dataset:
        fs.remove_dataset(dataset)
        console.print(f"removed dataset {dataset}")
    for a in doomed:
        inventory.remove(fs, a)
        console.print(f"removed {a.label}", highlight=False)


@store_app.command("unlock")
def store_unlock(
    force: bool = typer.Option(False, "--force", help="Remove every claim, live ones too (only when no extract runs)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation (with --force)."),
    store: Optional[str] = StoreOption,
) -> None:
    """Remove stale shard claims (unreadable, or of a process that is gone or stopped beating); --force: all."""
    from stratalign.store.claims import unlock_store
    from stratalign.store.feature_store import FeatureStore

    fs = FeatureStore.open(store_url(store), "a")
    if force and not yes and not typer.confirm("remove every claim, live ones too (no extract may be running)?"):
        raise typer.Exit(1)
    removed = unlock_store(fs.loc, force=force)
    for key, state in removed:
        console.print(f"removed claim {escape(key)} {escape(state.describe())}", soft_wrap=True, highlight=False)
    console.print(f"{len(removed)} claim(s) removed from {escape(fs.url)}")


@store_app.command("gc")
def store_gc(
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be removed."),
    store: Optional[str] = StoreOption,
) -> None:
    """Remove what killed writers left: temp files of processes that are gone, and stale shard claims."""
    from stratalign.store.claims import unlock_store
    from stratalign.store.cleanup import collect
    from stratalign.store.feature_store import FeatureStore

    fs = FeatureStore.open(store_url(store), "r" if dry_run else "a")
    temps = collect(fs.loc, dry_run=dry_run)
    claims = [] if dry_run else unlock_store(fs.loc)
    verb = "would remove" if dry_run else "removed"
    for path in temps:
        console.print(f"{verb} {escape(path)}", soft_wrap=True, highlight=False)
    for key, state in claims:
        console.print(f"{verb} claim {escape(key)} {escape(state.describe())}", soft_wrap=True, highlight=False)
    console.print(f"{len(temps)} temp file(s), {len(claims)} stale claim(s) {verb}")


@store_app.command("repair")
def store_repair(
    keys: list[str] = typer.Argument(None, help="Entry keys to repair (default: every entry)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list the shards that would be re-encoded."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1 ..."),
    store: Optional[str] = StoreOption,
) -> None:
    """Re-encode exactly the shards whose chunks or markers fail their checks (byte-identical to a clean run)."""
    from stratalign.stages.repair import repair_store
    from stratalign.store.feature_store import FeatureStore

    fs = FeatureStore.open(store_url(store), "r" if dry_run else "a")
    for key in keys or []:
        fs.entry_folder(key)
    report = repair_store(fs, tuple(keys or ()), device=device, dry_run=dry_run)
    verb = "would re-encode" if dry_run else "re-encoded"
    for key, shards in report.repaired.items():
        console.print(f"{verb} {escape(key)} shards {shards}", soft_wrap=True, highlight=False)
    for key, why in report.unreadable.items():
        console.print(f"[red]cannot repair[/red] {escape(key)}: {escape(why)}", soft_wrap=True)
    for key, layers in report.metadata.items():
        console.print(f"rewrote the zarr.json of {escape(key)} layers {layers}", soft_wrap=True, highlight=False)
    total = sum(len(s) for s in report.repaired.values())
    console.print(f"{total} shard(s) in {len(report.repaired)} entr(y/ies) {verb}")
    if report.unreadable:
        raise StratalignError(f"{len(report.unreadable)} entr(y/ies) cannot be repaired (see above): remove them "
                              "with `stratalign store rm KEY` and extract again")
    for line in report.left:
        console.print(f"[red]still wrong[/red] {escape(line)}", soft_wrap=True)
    if report.left:  # repair exits 0 only when `store verify` would
        raise StratalignError(f"{len(report.left)} problem(s) left after the repair (see above; `stratalign store "
                              "verify` lists them): repair re-encodes feature shards only")


@store_app.command("migrate")
def store_migrate(
    keys: list[str] = typer.Argument(None, help="Entry keys to migrate (default: every layout-1 entry)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only list what would be migrated."),
    store: Optional[str] = StoreOption,
) -> None:
    """Rewrite layout-1 entries as layout 2 (a read of r rows then costs O(r) bytes, not whole shards) under the
    SAME keys, so runs, layer results and graphs still find them: each entry's copy is built beside it, compared
    value by value with the original's checksums, then swapped in atomically (local stores)."""
    from stratalign.store.feature_store import FeatureStore
    from stratalign.store.migrate import migrate_store

    fs = FeatureStore.open(store_url(store), "r" if dry_run else "a")
    from stratalign.progress import progress_bar

    bars: dict[str, Any] = {}

    def progress(key: str, done: int, total: int) -> None:
        if key not in bars:
            bars[key] = progress_bar(total=total, unit="shard", desc=key[:40], disable=None, leave=False)
        bar = bars[key]
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    recovered, done = migrate_store(fs, tuple(keys or ()), dry_run=dry_run, progress=progress)
    for line in recovered:
        console.print(f"recovered {escape(line)}", soft_wrap=True, highlight=False)
    for m in done:
        sizes = f" ({m.bytes_before:,} -> {m.bytes_after:,} bytes, {m.seconds:.1f} s)" if m.action == "migrated" else ""
        console.print(f"{m.action} {escape(m.key)}: {escape(m.detail)}{sizes}", soft_wrap=True, highlight=False)
    counts = {a: sum(m.action == a for m in done) for a in ("migrated", "would migrate", "skipped")}
    console.print(", ".join(f"{n} {a}" for a, n in counts.items() if n) or "no entries", highlight=False)
