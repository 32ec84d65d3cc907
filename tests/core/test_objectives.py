"""The objective registry drives training, run resolution, evaluation and sweeps; the layer rule parser."""

from __future__ import annotations

from dataclasses import fields, replace

import numpy as np
import pytest

from stratalign.core import objectives as objectives_mod
from stratalign.core.heads import HEAD_KINDS
from stratalign.core.layer_rule import CHOOSE_KEYWORDS, LayerRule
from stratalign.errors import StratalignError
from stratalign.train import TrainConfig

FAST = (("max_steps", 5), ("eval_every", 1), ("patience", 100), ("warmup_steps", 2), ("dim", 8), ("knn_k", 3),
        ("batch_size", 16), ("comm_dim", 16), ("comm_out", 8), ("comm_heads", 2), ("csa_refine_steps", 2))


@pytest.fixture(scope="module")
def labelled_store(tmp_path_factory):
    from conftest import caption_for, make_images
    from toy_store import store_of_table

    root = tmp_path_factory.mktemp("objectives")
    make_images(root / "imgs", 40)
    lines = ["image,caption,label"] + [f"imgs/img{i:03d}.png,{caption_for(i)},{'even' if i % 2 == 0 else 'odd'}"
                                       for i in range(40)]
    (root / "pairs.csv").write_text("\n".join(lines) + "\n")
    return store_of_table(root, root / "pairs.csv", shard_rows=16)


def _run(objective: str, head: str, **kw):
    from stratalign.stages.runs.training import RunConfig

    return RunConfig(dataset="toy", vision="tiny-image", text="tiny-text", layers="last", objective=objective,
                     head=head, options=FAST, **kw)


def test_lists_derive_from_the_registry() -> None:
    assert objectives_mod.OBJECTIVES == tuple(o.name for o in objectives_mod.REGISTRY) and len(set(objectives_mod.OBJECTIVES)) == len(objectives_mod.REGISTRY)
    assert set(objectives_mod.HEADS) == set(HEAD_KINDS)  # every head the registry trains can be built, and vice versa
    config_fields = {f.name for f in fields(TrainConfig)}
    for o in objectives_mod.REGISTRY:
        assert set(o.knobs) <= config_fields, o.name
        assert o.weight_knob is None or o.weight_knob in config_fields, o.name
        assert (o.regulariser is None) == (o.weight_knob is None), o.name
        assert o.recorded_objective in objectives_mod.OBJECTIVES
        assert (o.selection is objectives_mod.Selection.CLOSED_FORM) == (o.training is objectives_mod.Training.CLOSED_FORM), o.name
    assert objectives_mod.objectives_with(knn_graphs=True) == ("clip+structure-knn",)
    assert objectives_mod.objectives_with(own_head="csa") == ("csa",)


def test_unknown_objective_is_one_error_listing_the_registry(labelled_store) -> None:
    from stratalign.stages.runs.training import resolve_run

    for make in (lambda: TrainConfig(objective="magic"), lambda: resolve_run(labelled_store, _run("magic", "linear"))):
        with pytest.raises(StratalignError) as err:
            make()
        msg = str(err.value)
        assert "\n" not in msg and "unknown objective 'magic'" in msg
        assert all(name in msg for name in objectives_mod.OBJECTIVES)


def test_heads_must_suit_the_objective(labelled_store) -> None:
    from stratalign.stages.runs.training import resolve_run

    with pytest.raises(StratalignError, match="objective clip trains linear | mlp | residual heads, not 'csa'"):
        resolve_run(labelled_store, _run("clip", "csa"))
    with pytest.raises(StratalignError, match=r"trained by: csa"):
        resolve_run(labelled_store, _run("clip", "csa"))
    with pytest.raises(StratalignError, match="objective csa trains csa heads, not 'linear'"):
        resolve_run(labelled_store, _run("csa", "linear"))
    with pytest.raises(StratalignError, match="unknown head 'big'"):
        resolve_run(labelled_store, _run("clip", "big"))


@pytest.mark.parametrize("entry", objectives_mod.REGISTRY, ids=lambda o: o.name)
def test_every_registered_objective_trains_resolves_and_evaluates(labelled_store, entry) -> None:
    from stratalign.stages.runs.evaluate import evaluate_saved_run
    from stratalign.stages.runs.training import resolve_run, train_run

    head = entry.own_head or entry.heads[0]
    cfg = _run(entry.name, head)
    if "unpaired" in entry.knobs:  # the table has no unpaired rows: the train pool's rest stands in (§ 3.11)
        cfg = replace(cfg, n_pairs=20, options=FAST + (("unpaired_from", "pool"),))
    resolved = resolve_run(labelled_store, cfg)
    assert resolved.objective == entry.name and resolved.train["objective"] == entry.recorded_objective
    res = train_run(labelled_store, cfg)
    assert res["run_id"] == resolved.run_id and not res["skipped"]
    if entry.training is objectives_mod.Training.CLOSED_FORM:
        refined = entry.fit is None  # csa refines for csa_refine_steps (2 here); Procrustes and ASIF do not
        assert res["stopped_reason"] == "closed_form" and res["best_step"] == (2 if refined else 0)
    else:
        assert res["steps_taken"] == 5 and res["stopped_reason"] == "max_steps"
        assert res["warmup_steps"] == (2 if entry.warmup else 0)
    assert ("knn_graph_cached" in res) == entry.knn_graphs
    scored = {"retrieval": "i2t_R@1", "probe": "probe_acc"}[entry.evaluation.value]
    assert 0 <= res[scored] <= 100
    assert ("zs_top1" in res) == (entry.evaluation is objectives_mod.Evaluation.RETRIEVAL)
    again = evaluate_saved_run(labelled_store, res["run_id"])
    assert again[scored] == pytest.approx(res[scored], abs=1e-6)


def test_a_new_registry_entry_is_all_it_takes(labelled_store, monkeypatch) -> None:
    """Register an objective the code has never seen: it trains, its regulariser runs, and it evaluates."""
    from stratalign.stages.runs.training import train_run

    calls = []

    def l2(batch, cfg):
        calls.append(cfg.beta)
        return (batch.image.z - batch.text.z).pow(2).sum(1).mean()

    new = objectives_mod.Objective("clip+l2", "CLIP + beta * squared distance", objectives_mod.TRAINED_HEADS, objectives_mod.Training.GRADIENT,
                      objectives_mod.Evaluation.RETRIEVAL, objectives_mod.Selection.VALIDATION, regulariser=l2, weight_knob="beta",
                      knobs=("beta",))
    monkeypatch.setitem(objectives_mod._BY_NAME, "clip+l2", new)
    res = train_run(labelled_store, _run("clip+l2", "linear"))
    assert res["run_id"].startswith("clip_l2-linear-") and calls == [0.01] * 5
    plain = train_run(labelled_store, _run("clip", "linear"))
    assert res["i2t_R@1"] >= 0 and res["best_val_clip"] != plain["best_val_clip"]


def test_sweep_cells_follow_the_registry() -> None:
    from stratalign.stages.runs.sweep import SweepConfig

    cfg = SweepConfig(base=_run("clip", "linear"), seeds=(0,), objectives=("clip", "csa"), layer_rules=("last",),
                      heads=("linear", "mlp", "csa"))
    assert sorted((c.objective, c.head) for c in cfg.cells()) == [("clip", "linear"), ("clip", "mlp"), ("csa", "csa")]
    baselines = SweepConfig(base=_run("clip", "linear"), seeds=(0,), layer_rules=("last",), heads=("linear",),
                            objectives=("asif", "procrustes", "clip+fusemix"))
    assert sorted((c.objective, c.head) for c in baselines.cells()) == [
        ("asif", "asif"), ("clip+fusemix", "linear"), ("procrustes", "procrustes")]
    with pytest.raises(StratalignError, match="unknown head 'big'"):
        SweepConfig(base=_run("clip", "linear"), heads=("big",)).cells()
    with pytest.raises(StratalignError, match="--layers must be auto, last or V,T, not 'best'"):
        SweepConfig(base=_run("clip", "linear"), layer_rules=("last", "best")).cells()


@pytest.mark.parametrize("text,kind,pair", [("auto", "auto", None), ("last", "last", None),
                                            ("3, -1", "pair", ("3", "-1")), ("blocks.2,layer_1", "pair",
                                                                             ("blocks.2", "layer_1"))])
def test_layer_rule_for_runs(text: str, kind: str, pair) -> None:
    rule = LayerRule.parse(text)
    assert rule.kind == kind and (pair is None or (rule.vision, rule.text) == pair)
    assert str(rule) == text.replace(" ", "")  # what run configs record as layer_rule
    if text == "3, -1":
        assert rule.index_pair() == (3, -1)


@pytest.mark.parametrize("text", ["best", "1,2,3", "", "last;0", "LAST"])
def test_layer_rule_for_runs_refuses(text: str) -> None:
    with pytest.raises(StratalignError, match=r"^--layers must be auto, last or V,T, not "):
        LayerRule.parse(text)


def test_layer_rule_for_choose() -> None:
    from stratalign.stages.layers import choose

    assert LayerRule.parse("best", CHOOSE_KEYWORDS, "--choose", indices=True).kind == "best"
    with pytest.raises(StratalignError, match=r"--choose must be best, last or V,T \(two layer indices\), not 'a,b'"):
        LayerRule.parse("a,b", CHOOSE_KEYWORDS, "--choose", indices=True)
    with pytest.raises(StratalignError, match="--choose must be best, last or V,T"):
        LayerRule.parse("auto", CHOOSE_KEYWORDS, "--choose", indices=True)
    mat = np.array([[0.1, 0.9], [0.3, 0.2], [0.5, 0.4]])
    result = {"matrices": {"m": mat.tolist()}, "vision_layers": ["v0", "v1", "v2"], "text_layers": ["t0", "t1"],
              "key": "k"}
    assert (choose(result, "best")["vision_layer"], choose(result, "best")["text_layer"]) == (0, 1)
    assert (choose(result, "last")["vision_layer"], choose(result, "last")["text_layer"]) == (2, 1)
    picked = choose(result, "-2, 0")
    assert (picked["vision_layer"], picked["text_layer"], picked["rule"]) == (1, 0, "-2, 0")
    with pytest.raises(StratalignError, match="out of range"):
        choose(result, "3,0")
