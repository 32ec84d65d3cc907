"""The test split sees only the chosen models (docs/method.md § 3.9): a cell's selection runs are saved without test
scores; its final runs are scored; a selection run asked for later as a run of its own is scored then."""

from __future__ import annotations

from levels_store import FAST, levels_store

from stratalign.stages.runs.cells import choose_cells
from stratalign.stages.runs.config import RunConfig
from stratalign.stages.runs.listing import show_lines, show_run
from stratalign.stages.runs.training import train_run
from stratalign.store.runs import RunRegistry


def _cfgs(objective: str, head: str = "linear") -> list[RunConfig]:
    return [RunConfig(dataset="toy", vision="tiny-image", text="tiny-text", layers="last", options=FAST,
                      validation="split", objective=objective, head=head, seed=seed) for seed in range(2)]


def test_selection_runs_are_not_scored_on_test_until_asked(tmp_path) -> None:
    store = levels_store(tmp_path, images=120)
    reg = RunRegistry(store)
    (clip,), _ = choose_cells(store, _cfgs("clip"), tune=True)
    (csa,), _ = choose_cells(store, _cfgs("csa", "csa"), tune=True)
    selection = [rid for p in clip.points for rid in p.runs]
    for rid in selection:
        met = reg.metrics(rid)
        assert met["test_scored"] is False and "i2t_R@1" not in met and "zs_top1" not in met
        assert reg.load_queries(rid) is None and met["val_curve"]
    assert any("not scored: a selection run" in line for line in show_lines(show_run(store, selection[0])))
    for rid in clip.final:
        assert "test_scored" not in reg.metrics(rid) and "i2t_R@1" in reg.metrics(rid)
    # a closed-form cell's chosen selection runs are its runs: scored; the points not chosen are not
    for point in csa.points:
        for rid in point.runs:
            assert ("i2t_R@1" in reg.metrics(rid)) == (rid in csa.final)
    # asked for as a run of its own: scored now, from its saved weights, as training it with scores would have
    again = train_run(store, _cfgs("clip")[0])
    assert again["run_id"] == selection[0] and again["skipped"]
    assert again["test_scored"] is True and isinstance(again["i2t_R@1"], float)
    assert reg.load_queries(selection[0]) is not None
