"""The CLI end to end on small fixtures: exit codes, one-line errors, and the store left intact."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import break_entry


def run(*args: str, store: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "stratalign.cli.main", *args]
    if store is not None:
        cmd += ["--store", str(store)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_help_lists_every_stage() -> None:
    out = run("--help")
    assert out.returncode == 0
    for cmd in ("ingest", "extract", "layers", "train", "eval", "sweep", "demo", "store", "runs", "encoders"):
        assert cmd in out.stdout


def test_ingest_ls_verify_and_corruption(tmp_path: Path, coco_json: Path, image_dir: Path) -> None:
    store = tmp_path / "store"
    ok = run("ingest", "coco", "--captions", str(coco_json), "--images", str(image_dir), "--name", "toy", store=store)
    assert ok.returncode == 0, ok.stderr
    assert "images=30" in ok.stdout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fake_encoders import load_tiny

    from stratalign.stages.extract import ExtractConfig, extract
    from stratalign.store.feature_store import FeatureStore

    extract(FeatureStore.open(str(store), "a"), "toy", ExtractConfig(encoders=("tiny-image",), shard_rows=8,
                                                                      progress=False), load=load_tiny)
    ls = run("store", "ls", store=store)
    assert ls.returncode == 0 and "tiny-image" in ls.stdout and "4/4" in ls.stdout
    assert run("store", "verify", store=store).returncode == 0
    chunk = next(store.glob("features/*/layer_001/c/2/0"))
    data = bytearray(chunk.read_bytes())
    data[3] ^= 0x40
    chunk.write_bytes(bytes(data))
    bad = run("store", "verify", store=store)
    assert bad.returncode != 0
    assert "corrupt" in bad.stdout and "shard 2 layer 1" in bad.stdout
    assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error:")


@pytest.mark.parametrize("args, needle", [
    (("extract", "--dataset", "nope", "--encoder", "minilm-l6"), "dataset 'nope' not in store"),
    (("layers", "--dataset", "toy", "--vision", "tiny-image", "--text", "tiny-text"), "no features of tiny-image"),
    (("train", "--dataset", "toy", "--vision", "a", "--text", "b", "--objective", "magic"), "unknown objective"),
    (("eval", "--run", "zzz"), "run 'zzz' is unknown"),
])
def test_errors_are_one_line_and_nonzero(tmp_path: Path, coco_json: Path, image_dir: Path, args, needle) -> None:
    store = tmp_path / "store"
    run("ingest", "coco", "--captions", str(coco_json), "--images", str(image_dir), "--name", "toy", store=store)
    out = run(*args, store=store)
    assert out.returncode == 2, out.stdout + out.stderr
    assert needle in out.stderr and out.stderr.strip().count("\n") == 0


def test_unknown_encoder_lists_known_ones(tmp_path: Path, coco_json: Path, image_dir: Path) -> None:
    store = tmp_path / "store"
    run("ingest", "coco", "--captions", str(coco_json), "--images", str(image_dir), "--name", "toy", store=store)
    out = run("extract", "--dataset", "toy", "--encoder", "resnet-9000", store=store)
    assert out.returncode == 2 and "resnet-9000" in out.stderr and "minilm-l6" in out.stderr


def test_bad_ingest_writes_nothing(tmp_path: Path, image_dir: Path) -> None:
    store = tmp_path / "store"
    table = tmp_path / "t.csv"
    table.write_text("image,caption\nimgs/img000.png,ok\nimgs/missing.png,gone\n")
    out = run("ingest", "table", "--table", str(table), "--name", "t", store=store)
    assert out.returncode == 2 and "missing file" in out.stderr and "missing.png" in out.stderr
    assert not (store / "datasets" / "t").exists()
    ok = run("ingest", "table", "--table", str(table), "--name", "t", "--skip-bad", store=store)
    assert ok.returncode == 0 and "skipped image" in ok.stdout


def _extracted(store_with_dataset) -> tuple[Path, str]:
    """A store with one complete tiny-image entry: (store folder, entry key)."""
    from fake_encoders import load_tiny

    from stratalign.stages.extract import ExtractConfig, extract

    store, _ = store_with_dataset
    extract(store, "toy", ExtractConfig(encoders=("tiny-image",), shard_rows=8, progress=False), load=load_tiny)
    return Path(store.url), store.find_entry("toy", "tiny-image").key



def test_verify_ls_and_rm_handle_broken_entries(store_with_dataset) -> None:
    from stratalign.store.feature_store import EntrySpec

    store, ds = store_with_dataset
    folder, good = _extracted(store_with_dataset)
    broken = {}
    for how in ("no-metadata", "other-version", "corrupt-json"):
        spec = EntrySpec(dataset="toy", content_fingerprint=ds.content_fingerprint, modality="image",
                         encoder={"spec": "enc"}, pooling=how, layer_names=("a",), dims=(4,), rows=30, shard_rows=8)
        broken[how] = store.create_entry(spec).key
        break_entry(folder / "features" / broken[how], how)
    bad = run("store", "verify", "--verbose", store=folder)
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert f"ok {good}" in bad.stdout and "3 problem(s)" in bad.stderr
    for how, why in (("no-metadata", "has no zarr.json"), ("other-version", "format version 99"),
                     ("corrupt-json", "corrupt JSON file")):
        line = next(x for x in bad.stdout.splitlines() if broken[how] in x)
        assert line.startswith("broken") and why in line, line
    assert bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr
    ls = run("store", "ls", store=folder)
    assert ls.returncode == 0 and ls.stdout.count("broken") == 3 and all(k in ls.stdout for k in broken.values())
    rm = run("store", "rm", "-y", *broken.values(), store=folder)
    assert rm.returncode == 0, rm.stderr
    assert sorted(p.name for p in (folder / "features").iterdir()) == sorted([good, "zarr.json"])
    assert run("store", "verify", store=folder).returncode == 0


def test_verify_loads_dataset_tables(store_with_dataset) -> None:
    store, _ = _extracted(store_with_dataset)
    with open(store / "datasets" / "toy" / "images.parquet", "r+b") as f:
        f.truncate(100)
    bad = run("store", "verify", store=store)
    assert bad.returncode == 2 and "broken dataset toy" in bad.stdout and "unreadable" in bad.stdout
    ls = run("store", "ls", store=store)
    assert ls.returncode == 0 and "dataset toy: broken" in ls.stdout
    rm = run("store", "rm", "-y", "--dataset", "toy", store=store)
    assert rm.returncode == 0 and not (store / "datasets" / "toy").exists()


def test_rm_validates_keys_before_removing(store_with_dataset) -> None:
    store, key = _extracted(store_with_dataset)
    for bogus in ("../datasets", "zarr.json"):
        out = run("store", "rm", "-y", key, bogus, store=store)
        assert out.returncode == 2 and bogus in out.stderr
    assert (store / "features" / key).exists() and (store / "features" / "zarr.json").exists()


@pytest.mark.parametrize("args", [
    ("store", "rm", "-y", "xx"), ("store", "verify"), ("store", "ls"), ("runs", "ls"),
    ("extract", "--dataset", "toy", "--encoder", "minilm-l6"),
    ("layers", "--dataset", "toy", "--vision", "a", "--text", "b"),
    ("train", "--dataset", "toy", "--vision", "a", "--text", "b"),
    ("eval", "--run", "zzz"),
    ("sweep", "--dataset", "toy", "--vision", "a", "--text", "b"),
])
def test_commands_never_create_a_store(tmp_path: Path, args) -> None:
    store = tmp_path / "newstore"
    out = run(*args, store=store)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"no stratalign store at {store}; create one with `stratalign ingest" in out.stderr
    assert not store.exists()


REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).parent / "stratalign"
HEAVY = ("torch", "zarr", "polars", "faiss")


def run_script(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """The installed console script, importing this checkout (PYTHONPATH) rather than the installed one."""
    if not SCRIPT.exists():
        pytest.skip(f"no installed console script at {SCRIPT} (pip install -e . puts it there)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env=env, input=stdin)


@pytest.mark.parametrize("args, error", [
    (("trian",), "No such command 'trian'"),
    (("train", "--bogus"), "No such option: --bogus"),
    (("train",), "Missing option '--dataset'"),
    (("train", "--dataset", "d", "--vision", "v", "--text", "t", "--n-pairs", "abc"), "Invalid value for '--n-pairs'"),
    (("sweep", "--dataset", "d", "--vision", "v", "--text", "t", "--seed", "x"), "Invalid value for '--seed'"),
    (("ingest", "csv"), "No such command 'csv'"),
    (("store", "verify", "--stor", "x"), "No such option: --stor"),
])
def test_usage_errors_are_usage_and_one_error_line(args, error) -> None:
    out = run_script(*args)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith(f"Usage: stratalign {args[0] if args[0] != 'trian' else '[OPTIONS]'}"), lines[0]
    assert lines[-1].startswith("Error: ") and error in lines[-1], lines[-1]
    assert sum(line.startswith("Error") for line in lines) == 1


def test_aborted_rm_exits_nonzero_and_removes_nothing(store_with_dataset) -> None:
    store, key = _extracted(store_with_dataset)
    for answer, message in (("n\n", ""), ("", "Aborted!")):  # a "no", then end of input at the prompt
        out = run_script("store", "rm", key, "--store", str(store), stdin=answer)
        assert out.returncode == 1, out.stdout + out.stderr
        assert "Traceback" not in out.stderr and message in out.stderr and "removed" not in out.stdout
        assert (store / "features" / key).exists()


def test_ctrl_c_exits_130_with_one_line(tmp_path: Path, monkeypatch, capsys) -> None:
    from stratalign.cli.main import main
    from stratalign.stages.ingest import sources

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sources, "ingest_source", interrupted)  # the command imports it when it runs
    monkeypatch.setattr(sys, "argv", ["stratalign", "ingest", "twemoji", "--store", str(tmp_path / "s")])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted: ") and "rerun the same `stratalign ingest twemoji` command" in err and "\n" not in err


@pytest.mark.parametrize("source, own, foreign", [
    ("coco", ("--captions", "--images"), ("--split-file", "--table", "--image-col")),
    ("karpathy", ("--split-file", "--images"), ("--captions", "--table", "--caption-col")),
    ("table", ("--table", "--image-col", "--caption-col", "--label-col", "--split-col"), ("--captions", "--split-file")),
    ("twemoji", ("--name", "--limit", "--replace"), ("--captions", "--split-file", "--table", "--images")),
])
def test_ingest_help_shows_only_its_own_options(source: str, own, foreign) -> None:
    out = run("ingest", source, "--help")
    assert out.returncode == 0, out.stderr
    assert all(opt in out.stdout for opt in own + ("--store", "--skip-bad", "--seed"))
    assert not any(opt in out.stdout for opt in foreign), out.stdout


def test_tables_are_plain_columns_when_not_a_terminal() -> None:
    from stratalign.encoders import known_encoders

    out = run("encoders")
    assert out.returncode == 0, out.stderr
    assert not set("─│┃━┏┡╇└┘") & set(out.stdout)
    lines = out.stdout.splitlines()
    assert lines[0].startswith("known encoders") and lines[1].split() == ["name", "modality", "layers", "dim",
                                                                           "description"]
    rows = {line.split()[0]: line.split()[1:3] for line in lines[2:]}
    assert rows == {e.name: [e.modality, str(e.n_layers)] for e in known_encoders()}


def test_tables_fold_to_the_terminal_width() -> None:
    env = {**os.environ, "TTY_COMPATIBLE": "1", "COLUMNS": "90", "NO_COLOR": "1"}
    out = subprocess.run([sys.executable, "-m", "stratalign.cli.main", "encoders"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout)
    assert "┃ name" in text and max(len(line) for line in text.splitlines()) <= 90
    assert "minilm-l6" in text


def test_cli_spells_out_library_constants() -> None:
    from stratalign.cli import common, extract_cmd
    from stratalign.store import feature_store as features
    from stratalign.store import location

    assert extract_cmd.DEFAULT_SHARD_ROWS == features.DEFAULT_SHARD_ROWS
    assert common.STORE_ENV == location.STORE_ENV


def test_importing_the_cli_loads_no_heavy_library() -> None:
    code = f"import sys, stratalign.cli.main; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"`stratalign --help` imports {out.stdout.strip()}"
