"""Stage 2-3 through the store: layers, train every objective, evaluate, reload, sweep skip logic, bad input.

Features come from the tiny deterministic encoders of fake_encoders.py over a small labelled table whose
captions name each image's brightness class, so there is something to align.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fake_encoders import load_tiny
from PIL import Image

from stratalign.errors import StratalignError
from stratalign.stages.extract import ExtractConfig, extract
from stratalign.stages.ingest.sources import ingest_source
from stratalign.stages.layers import LayersConfig, choose, compute_layer_matrices, record_choice, run_layers
from stratalign.stages.runs.training import RunConfig, resolve_run, train_run
from stratalign.store.feature_store import FeatureStore
from stratalign.store.runs import RunRegistry

LEVELS = ["dark", "dim", "mid", "bright", "white"]
FAST = (("max_steps", 60), ("patience", 20), ("eval_every", 5), ("warmup_steps", 20), ("dim", 16))


def _toy_table(folder: Path, n: int = 120, name: str = "pairs.csv") -> Path:
    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    lines = ["image,caption,label"]
    for i in range(n):
        level = i % len(LEVELS)
        base = 40 + 45 * level
        arr = np.clip(base + rng.normal(0, 12, size=(12, 12, 3)), 0, 255).astype(np.uint8)
        arr[: (i % 7) + 2, :, 0] = 255 - base  # a stripe whose height varies within the class
        Image.fromarray(arr).save(folder / "img" / f"{i}.png")
        lines.append(f"img/{i}.png,a {LEVELS[level]} square with {(i % 7) + 2} red rows,{LEVELS[level]}")
    (folder / name).write_text("\n".join(lines) + "\n")
    return folder / name


@pytest.fixture(scope="module")
def stage_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage")
    table = _toy_table(root)
    store = FeatureStore.open(str(root / "store"), "a", create=True)
    store.save_dataset(ingest_source("table", "toy", table=str(table), image_col="image", caption_col="caption",
                                     label_col="label"))
    extract(store, "toy", ExtractConfig(encoders=("tiny-image", "tiny-text"), shard_rows=32, progress=False),
            load=load_tiny)
    return store


def _cfg(**kw) -> RunConfig:
    # the val split (a lone run's auto): the toy's small one would make a sweep's cells k-fold ones (test_cells_kfold)
    base = dict(dataset="toy", vision="tiny-image", text="tiny-text", layers="last", options=FAST, validation="split")
    base.update(kw)
    return RunConfig(**base)


def test_layers_saved_and_reused(stage_store) -> None:
    cfg = LayersConfig(dataset="toy", vision="tiny-image", text="tiny-text", metrics=("mutual_knn", "cka"), k=5)
    res = compute_layer_matrices(stage_store, cfg)
    assert not res["cached"] and np.asarray(res["matrices"]["cka"]).shape == (3, 2)
    ds = stage_store.dataset("toy")
    assert res["n"] == len(ds.image_rows("train"))  # train split only, one caption per image
    again = compute_layer_matrices(stage_store, cfg)
    assert again["cached"] and again["matrices"] == res["matrices"]
    choice = choose(res, "best", "cka")
    mat = np.asarray(res["matrices"]["cka"])
    assert choice["score"] == mat.max() and (choice["vision_layer"], choice["text_layer"]) == np.unravel_index(
        mat.argmax(), mat.shape)
    record_choice(stage_store, cfg, choice)
    resolved = resolve_run(stage_store, _cfg(layers="auto"))
    assert (resolved.vision_layer, resolved.text_layer) == (choice["vision_layer"], choice["text_layer"])


def test_run_layers_is_the_whole_stage(stage_store, tmp_path: Path) -> None:
    from stratalign.store import layer_results

    cfg = LayersConfig(dataset="toy", vision="tiny-image", text="tiny-text", metrics=("mutual_knn", "cka"), k=5)
    copy = tmp_path / "sub" / "heat.png"
    done = run_layers(stage_store, cfg, "best", "cka", heatmap_copy=str(copy))
    direct = compute_layer_matrices(stage_store, cfg)
    assert done.result["matrices"] == direct["matrices"] and done.choice == choose(direct, "best", "cka")
    assert done.png == str(copy) and copy.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert copy.read_bytes() == stage_store.loc.read_bytes("layers", f"{direct['key']}.png")
    assert layer_results.load_choice(stage_store, "toy", "tiny-image", "tiny-text")["vision_layer"] == \
        done.choice["vision_layer"]
    resolved = resolve_run(stage_store, _cfg(layers="auto"))
    assert (resolved.vision_layer, resolved.text_layer) == (done.choice["vision_layer"], done.choice["text_layer"])
    last = run_layers(stage_store, cfg, "last", "cka")
    assert last.png == layer_results.heatmap_path(stage_store, direct["key"]) and last.result["cached"]
    record_choice(stage_store, cfg, done.choice)  # leave the best choice recorded for the other tests


@pytest.mark.parametrize("objective,head", [("clip", "linear"), ("clip+structure", "linear"),
                                            ("clip+structure-knn", "mlp"), ("clip+ib", "linear"),
                                            ("clip+vib", "linear"), ("csa", "csa"), ("comm", "linear")])
def test_every_objective_trains_evaluates_and_reloads(stage_store, objective: str, head: str) -> None:
    from stratalign.stages.runs.evaluate import evaluate_saved_run

    res = train_run(stage_store, _cfg(objective=objective, head=head, n_pairs=50))
    assert not res["skipped"]
    if objective == "comm":
        assert 0 <= res["probe_acc"] <= 100 and set(res["probe_baselines"]) == {"image", "text", "concat"}
    else:
        for key in ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "zs_top1", "zs_top5", "zs_balanced_acc"):
            assert 0 <= res[key] <= 100, key
        assert res["i2t_R@1"] <= res["i2t_R@5"] <= res["i2t_R@10"]
    again = evaluate_saved_run(stage_store, res["run_id"])
    for key, value in again.items():
        if isinstance(value, float) and key in res:
            assert value == pytest.approx(res[key], abs=1e-6), key


def test_same_command_same_weights_and_skip(stage_store) -> None:
    registry = RunRegistry(stage_store)
    first = train_run(stage_store, _cfg(objective="clip+structure", n_pairs=40, seed=3))
    _, w1, _ = registry.load(first["run_id"])
    assert train_run(stage_store, _cfg(objective="clip+structure", n_pairs=40, seed=3))["skipped"]
    forced = train_run(stage_store, _cfg(objective="clip+structure", n_pairs=40, seed=3), force=True)
    assert forced["run_id"] == first["run_id"]
    _, w2, _ = registry.load(first["run_id"])
    assert set(w1) == set(w2) and all(np.array_equal(w1[k].numpy(), w2[k].numpy()) for k in w1)
    other = train_run(stage_store, _cfg(objective="clip+structure", n_pairs=40, seed=4))
    assert other["run_id"] != first["run_id"]
    assert first["selection"]["first_candidate"] == 0  # every evaluation step is a candidate, warm-up or not


def test_ids_file_subset(stage_store, tmp_path: Path) -> None:
    ds = stage_store.dataset("toy")
    _, cap_rows = ds.pairs("train")
    ids = [ds.captions["caption_id"][int(r)] for r in cap_rows[:30]]
    path = tmp_path / "ids.txt"
    path.write_text("\n".join(ids))
    resolved = resolve_run(stage_store, _cfg(ids_file=str(path), val_fraction=0.0001))
    subset = resolved.subset
    chosen = {ds.captions["caption_id"][int(r)] for r in subset.caption_rows}
    assert chosen <= set(ids) and len(chosen) >= 25  # minus the few carved out for validation


def test_bad_inputs(stage_store) -> None:
    with pytest.raises(StratalignError, match=r"layer index 7 out of range.*valid 0\.\.2"):
        resolve_run(stage_store, _cfg(layers="7,0"))
    with pytest.raises(StratalignError, match="larger than the train split"):
        resolve_run(stage_store, _cfg(n_pairs=10_000))
    with pytest.raises(StratalignError, match="run: stratalign extract --dataset toy --encoder minilm-l6"):
        resolve_run(stage_store, _cfg(text="minilm-l6"))
    with pytest.raises(StratalignError, match="unknown objective"):
        resolve_run(stage_store, _cfg(objective="magic"))
    with pytest.raises(StratalignError, match="unknown training option"):
        resolve_run(stage_store, _cfg(options=(("learning_rate", 1.0),)))


def test_eval_on_dataset_of_other_encoders_refused(stage_store, tmp_path: Path) -> None:
    from stratalign.stages.runs.evaluate import evaluate_saved_run

    table = _toy_table(tmp_path, n=40, name="other.csv")
    stage_store.save_dataset(ingest_source("table", "toy2", table=str(table), image_col="image",
                                           caption_col="caption", label_col="label"))
    run = train_run(stage_store, _cfg(n_pairs=30))
    with pytest.raises(StratalignError, match="no features of tiny-image for dataset 'toy2'"):
        evaluate_saved_run(stage_store, run["run_id"], "toy2")
    from fake_encoders import TinyImageEncoder, TinyTextEncoder

    def other_weights(spec: str, device: str = "cpu"):
        enc = TinyImageEncoder(spec) if "image" in spec else TinyTextEncoder(spec)
        enc.metadata = lambda: {"spec": spec, "weights_sha256": "different", "preprocessing": "x"}
        return enc

    extract(stage_store, "toy2", ExtractConfig(encoders=("tiny-image", "tiny-text"), shard_rows=32, progress=False),
            load=other_weights)
    with pytest.raises(StratalignError, match="extracted with another tiny-image"):
        evaluate_saved_run(stage_store, run["run_id"], "toy2")
    extract(stage_store, "toy2", ExtractConfig(encoders=("tiny-image", "tiny-text"), shard_rows=32, progress=False),
            load=load_tiny)
    res = evaluate_saved_run(stage_store, run["run_id"], "toy2")
    assert res["eval_dataset"] == "toy2" and 0 <= res["i2t_R@1"] <= 100


def test_nan_features_stop_cleanly(stage_store) -> None:
    import stratalign.train as train_pkg

    x = np.random.default_rng(0).normal(size=(40, 8)).astype(np.float32)
    y = np.random.default_rng(1).normal(size=(40, 8)).astype(np.float32)
    x[5, 2] = np.nan
    with pytest.raises(StratalignError, match="NaN"):
        train_pkg.train_heads(x, y, np.arange(30), np.arange(30, 40), train_pkg.TrainConfig(max_steps=5, dim=8))


def test_sweep_skips_finished_cells_and_writes_leaderboard(stage_store, tmp_path: Path) -> None:
    import polars as pl

    from stratalign.stages.runs.sweep import SweepConfig, run_sweep

    cfg = SweepConfig(base=_cfg(), n_pairs=(20, 40), seeds=(0, 1), objectives=("clip", "csa"), layer_rules=("last",))
    first = run_sweep(stage_store, cfg, str(tmp_path / "rep"), progress=False)
    # clip: a selection and a final run per seed and size; csa (closed form): its selection run is final
    assert first.trained + first.skipped == 12 and len(set(first.run_ids)) == 8
    again = run_sweep(stage_store, cfg, str(tmp_path / "rep"), progress=False)
    assert again.trained == 0 and again.skipped == 12 and again.run_ids == first.run_ids
    board = pl.read_parquet(tmp_path / "rep" / "leaderboard.parquet")
    assert board.height == 4 and set(board["seeds"].to_list()) == {2}
    row = board.filter((pl.col("objective") == "clip") & (pl.col("n_pairs") == 40)).row(0, named=True)
    seeds = first.runs.filter((pl.col("objective") == "clip") & (pl.col("n_pairs") == 40))["i2t_R@1"]
    assert row["i2t_R@1_mean"] == pytest.approx(seeds.mean()) and row["i2t_R@1_std"] == pytest.approx(seeds.std())
    assert (tmp_path / "rep" / "recall_vs_pairs.png").stat().st_size > 5000
    # a sweep on the user's own table writes the same report as the demo, opening with its bottom line
    report = (tmp_path / "rep" / "report.md").read_text()
    assert report.index("## Bottom line") < report.index("## Results") and "csa / last" in report
    assert "against clip / last" in report and "[" in report.split("## Bottom line")[1].split("##")[0]
    bigger = SweepConfig(base=_cfg(), n_pairs=(20, 40, 60), seeds=(0, 1), objectives=("clip", "csa"),
                         layer_rules=("last",))
    grown = run_sweep(stage_store, bigger, None, progress=False)
    assert grown.skipped == 12 and grown.trained == 6  # only the new cells run


def test_sweep_skip_leaves_out_a_rule_objective_pair() -> None:
    from stratalign.stages.runs.sweep import SweepConfig

    cfg = SweepConfig(base=_cfg(), n_pairs=(20,), seeds=(0, 1), objectives=("clip", "clip+structure"),
                      layer_rules=("last", "auto"), skip=(("last", "clip+structure"),))
    assert sorted({(c.layers, c.objective) for c in cfg.cells()}) == [
        ("auto", "clip"), ("auto", "clip+structure"), ("last", "clip")]
    assert len(cfg.cells()) == 6
    with pytest.raises(StratalignError, match="--skip last:comm matches no cell"):
        SweepConfig(base=_cfg(), objectives=("clip",), skip=(("last", "comm"),)).cells()


def test_sweep_skip_through_the_cli_needs_rule_and_objective(stage_store) -> None:
    out = _cli("sweep", "--dataset", "toy", "--vision", "tiny-image", "--text", "tiny-text", "--skip", "last",
               store=stage_store)
    assert out.returncode != 0 and "--skip takes RULE:OBJECTIVE" in out.stderr + out.stdout
    assert len((out.stderr + out.stdout).strip().splitlines()) == 1


def _cli(*args: str, store: FeatureStore):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "stratalign.cli.main", *args, "--store", store.url],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("key,value,flag", [("seed", 3, "--seed"), ("objective", "clip", "--objective"),
                                            ("head", "mlp", "--head")])
def test_set_of_a_run_flag_names_the_flag(stage_store, key: str, value, flag: str) -> None:
    import re

    with pytest.raises(StratalignError, match=re.escape(f"--set {key}=... : use {flag}")) as err:
        resolve_run(stage_store, _cfg(options=FAST + ((key, value),)))
    assert "\n" not in str(err.value)


def test_set_seed_through_the_cli_is_one_line(stage_store) -> None:
    out = _cli("train", "--dataset", "toy", "--vision", "tiny-image", "--text", "tiny-text", "--layers", "last",
               "--set", "seed=3", store=stage_store)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "--set seed=... : use --seed" in out.stderr and out.stderr.strip().count("\n") == 0


def test_knn_graphs_built_once_per_subset_and_read_back(stage_store, monkeypatch) -> None:
    from stratalign.store import graphs
    from stratalign.train import frozen_graphs

    registry = RunRegistry(stage_store)
    opts = FAST + (("knn_k", 4),)
    cfg = _cfg(objective="clip+structure-knn", n_pairs=45, seed=2, options=opts)
    before = set(stage_store.loc.listdir("graphs")) if stage_store.loc.exists("graphs") else set()
    first = train_run(stage_store, cfg)
    assert first["knn_graph_cached"] is False
    new = set(stage_store.loc.listdir("graphs")) - before
    assert len(new) == 1 and next(iter(new)).endswith(".safetensors")
    # the file holds the graphs of exactly this subset's training rows
    resolved = resolve_run(stage_store, cfg)
    subset = resolved.subset
    key = graphs.graph_key(resolved.vision_entry, resolved.vision_layer, resolved.text_entry,
                      resolved.text_layer, subset.image_rows, subset.caption_rows, 4)
    assert new == {f"{key}.safetensors"}
    cached = graphs.load_graphs(stage_store, key, len(subset.image_rows))
    v, t = stage_store.entry(resolved.vision_entry), stage_store.entry(resolved.text_entry)
    x_img = v.read_layer(resolved.vision_layer, subset.image_rows).astype(np.float32)
    x_txt = t.read_layer(resolved.text_layer, subset.caption_rows).astype(np.float32)
    assert np.array_equal(cached[0], frozen_graphs.knn_graph(x_img, 4)) and np.array_equal(cached[1], frozen_graphs.knn_graph(x_txt, 4))

    _, w1, _ = registry.load(first["run_id"])

    def boom(*a, **k):
        raise AssertionError("the kNN graph was searched again instead of read from the store")

    monkeypatch.setattr(frozen_graphs, "knn_graph", boom)
    again = train_run(stage_store, cfg, force=True)  # same run, graphs from the cache: identical results
    assert again["knn_graph_cached"] is True and again["run_id"] == first["run_id"]
    _, w2, _ = registry.load(first["run_id"])
    assert set(w1) == set(w2) and all(np.array_equal(w1[k].numpy(), w2[k].numpy()) for k in w1)
    for key_, value in first.items():
        if key_ not in ("train_seconds", "train_loop_seconds", "knn_graph_cached", "skipped"):
            assert again[key_] == value, key_
    other_lam = train_run(stage_store, _cfg(objective="clip+structure-knn", n_pairs=45, seed=2,
                                            options=opts + (("lam", 5.0),)))
    assert other_lam["knn_graph_cached"] is True and other_lam["run_id"] != first["run_id"]
    assert set(stage_store.loc.listdir("graphs")) - before == new  # no second file for the same subset
    assert graphs.graph_key(resolved.vision_entry, resolved.vision_layer, resolved.text_entry,
                       resolved.text_layer, subset.image_rows, subset.caption_rows, 5) != key
    assert graphs.graph_key(resolved.vision_entry, resolved.vision_layer, resolved.text_entry,
                       resolved.text_layer, subset.image_rows[::-1], subset.caption_rows[::-1], 4) != key


def test_non_finite_loss_is_reported_by_stage_and_cli(stage_store) -> None:
    """lr=1e30 blows the heads up after a few updates: the run stops, restores the initial heads (the
    only finite checkpoint, inside the warm-up) and says so in metrics.json and on the console."""
    sets = [f"{k}={v}" for k, v in FAST] + ["lr=1e30"]
    args = ["train", "--dataset", "toy", "--vision", "tiny-image", "--text", "tiny-text", "--layers", "last",
            "--objective", "clip+structure", "--n-pairs", "50", "--seed", "6"]
    for s in sets:
        args += ["--set", s]
    out = _cli(*args, store=stage_store)
    assert out.returncode == 0, out.stdout + out.stderr
    rid = out.stdout.split()[1]
    metrics = RunRegistry(stage_store).metrics(rid)
    assert metrics["stopped_reason"] == "non_finite" and metrics["best_step"] == 0
    assert metrics["lambda_at_best"] == 0.0 and metrics["restored_before_warmup"] is False
    assert metrics["message"].startswith("non-finite training loss at step ")
    assert "restored step 0 by validation rsum" in metrics["message"] and metrics["message"].endswith("(lambda 0)")
    assert metrics["selection"]["metric"] == "rsum" and metrics["selection"]["step"] == 0
    assert "stopped_reason=non_finite" in out.stdout
    assert metrics["message"] in out.stdout  # the saved message line, verbatim
    assert "restored_before_warmup" not in out.stdout  # nothing to flag: every step is a candidate
    from stratalign.stages.runs.evaluate import evaluate_saved_run

    again = evaluate_saved_run(stage_store, rid)
    assert again["message"] == metrics["message"] and again["restored_before_warmup"] is False


def test_alignment_mknn_is_mutual_knn_of_test_embeddings(stage_store) -> None:
    import stratalign.train as train_pkg
    from stratalign.core.similarity import mutual_knn
    from stratalign.stages.runs.data import split_run_tensors

    res = train_run(stage_store, _cfg(objective="clip", n_pairs=40, seed=8))
    config, tensors, _ = RunRegistry(stage_store).load(res["run_id"])
    model = train_pkg.model_from_tensors(config, split_run_tensors(tensors)[0])
    ds = stage_store.dataset("toy")
    img_rows, cap_rows = ds.pairs("test")
    first_caption: dict[int, int] = {}
    for i, c in zip(img_rows.tolist(), cap_rows.tolist()):
        first_caption.setdefault(i, c)
    gallery = sorted(first_caption)
    assert len(gallery) > 10
    v, t = stage_store.entry(config["vision_entry"]), stage_store.entry(config["text_entry"])
    z_img = train_pkg.embed_features(model, v.read_layer(config["vision_layer"], np.array(gallery)).astype(np.float32),
                             "image")
    captions = np.array([first_caption[i] for i in gallery])
    z_txt = train_pkg.embed_features(model, t.read_layer(config["text_layer"], captions).astype(np.float32), "text")
    want = 100.0 * mutual_knn(z_img, z_txt, k="rice")
    assert res["alignment_mknn"] == pytest.approx(want, abs=1e-9)
    assert 0 < want < 100


def test_corrupted_cached_graph_is_rebuilt_not_used(tmp_path) -> None:
    from stratalign.store import graphs
    from stratalign.store.feature_store import FeatureStore

    store = FeatureStore.open(str(tmp_path / "s"), "a", create=True)
    rng = np.random.default_rng(0)
    pair = (rng.integers(0, 20, size=(20, 3)), rng.integers(0, 20, size=(20, 3)))
    key = graphs.graph_key("v", 1, "t", 2, np.arange(20), np.arange(20), 3)
    graphs.save_graphs(store, key, pair)
    got = graphs.load_graphs(store, key, 20)
    assert got is not None and all(np.array_equal(a, b) for a, b in zip(got, pair))
    path = tmp_path / "s" / "graphs" / f"{key}.safetensors"
    blob = bytearray(path.read_bytes())
    blob[-8] ^= 0x01  # a neighbour index changes but stays a valid row: only the checksum can tell
    path.write_bytes(bytes(blob))
    assert graphs.load_graphs(store, key, 20) is None
    rebuilt, from_cache = graphs.cached_graphs(store, key, 20, lambda: pair)
    assert from_cache is False and graphs.load_graphs(store, key, 20) is not None
