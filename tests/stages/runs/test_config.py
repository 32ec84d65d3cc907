"""Run ids and config.json bytes are pinned: computed by the code before ResolvedRun (commit 6907e8d), they
must never change, or every run already in a store would be retrained under a new id."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from fake_encoders import load_tiny

from stratalign.stages.extract import ExtractConfig, extract
from stratalign.stages.runs.config import ResolvedRun
from stratalign.stages.runs.training import RunConfig, resolve_run, train_run

# validation="carve": these runs carved their validation pairs from the train split, as every run did before
# the dataset's own val split became the default (a new default, so new ids; the old runs keep theirs)
CASES = {
    # the csa of 6907e8d was STRUCTURE's cosine baseline: asked for by name, it keeps its id (csa_k and
    # csa_similarity at their legacy values are not recorded)
    "csa_last": dict(layers="last", objective="csa", head="csa", n_pairs=20, seed=1, validation="carve",
                     options=(("csa_similarity", "cosine"),)),
    # select="clip_loss": the checkpoint rule of every run before validation rsum became the default;
    # candidates="after_warmup": no candidate before the warm-up ended, the rule before 2026-12-06
    "structure_pair": dict(layers="1,0", objective="clip+structure", head="mlp", n_pairs=None, seed=0,
                           options=(("max_steps", 7), ("warmup_steps", 3), ("lam", 5.0),
                                    ("head_options", {"hidden": 8}), ("candidates", "after_warmup")),
                           validation="carve", select="clip_loss"),
}
# (run id, sha256 of config.json) from 6907e8d; "_bad": one train image unreadable (bad_pairs_dropped > 0)
PINNED = {
    "csa_last": ("csa-csa-n20-s1-3c62d0713cbd",
                 "7450b07c2acdca56938fd07cb315207b76a7c379c38c752b706a2c812b9f46dd"),
    "structure_pair": ("clip_structure-mlp-n36-s0-8e12b70d7f1e",
                       "6a71e95f83002f47b2a0f04802c18159a95f657048334e45db650e51877f7413"),
    "csa_last_bad": ("csa-csa-n20-s1-3afdde17921f",
                     "13bbccf606bb5b244a88359d6128a2feced2480015d78903ee5ea3bae8a25932"),
    "structure_pair_bad": ("clip_structure-mlp-n34-s0-7fe1f9528cff",
                           "e1ca03ce00e8efe0181025caaabd81a0665d99f2425b1ad67bfaef6b2c7f7f54"),
}


def _config_bytes(run: ResolvedRun) -> bytes:
    return json.dumps(run.config_dict(), indent=1, sort_keys=True).encode()  # as store.location.write_json


def _check(store, suffix: str) -> None:
    for name, kw in CASES.items():
        run = resolve_run(store, RunConfig(dataset="toy", vision="tiny-image", text="tiny-text", preset=None, **kw))
        rid, sha = PINNED[name + suffix]
        assert run.run_id == rid, name
        assert hashlib.sha256(_config_bytes(run)).hexdigest() == sha, name
        assert ("bad_pairs_dropped" in run.config_dict()) == bool(suffix)
        again = ResolvedRun.from_config(json.loads(_config_bytes(run)))
        assert again == run and again.config_dict() == run.config_dict() and again.subset is None
    res = train_run(store, RunConfig(dataset="toy", vision="tiny-image", text="tiny-text", preset=None,
                                     **CASES["csa_last"]))
    written = store.loc.read_bytes("runs", res["run_id"], "config.json")
    assert hashlib.sha256(written).hexdigest() == PINNED["csa_last" + suffix][1]


# entry_format=1: the ids were computed over entries of layout 1 (one chunk per shard), the only layout before
# layout 2; a run id hashes its entry keys, so the same run over layout-2 entries (new keys) has a new id, while
# stores that hold layout-1 entries keep them (an extraction reuses them) and so keep their run ids.
def test_run_ids_and_config_bytes_unchanged(store_with_dataset) -> None:
    store, _ = store_with_dataset
    extract(store, "toy", ExtractConfig(encoders=("tiny-image", "tiny-text"), shard_rows=8, progress=False,
                                        entry_format=1), load=load_tiny)
    _check(store, "")
    extract(store, "toy", ExtractConfig(encoders=("tiny-image", "tiny-text"), shard_rows=8, progress=False),
            load=load_tiny)  # the default layout 2 finds the layout-1 entries complete: same entries, same ids
    _check(store, "")


def test_the_candidate_rule_of_a_warmup_run_is_part_of_its_id(store_with_dataset) -> None:
    """The same request under today's rule (every evaluation step a candidate) is another run: its old id still
    names the weights of the older rule, so it cannot be reused for the new one."""
    store, _ = store_with_dataset
    extract(store, "toy", ExtractConfig(encoders=("tiny-image", "tiny-text"), shard_rows=8, progress=False,
                                        entry_format=1), load=load_tiny)
    case = CASES["structure_pair"]
    today = dict(case, options=tuple(o for o in case["options"] if o[0] != "candidates"))
    run = resolve_run(store, RunConfig(dataset="toy", vision="tiny-image", text="tiny-text", **today))
    assert run.run_id != PINNED["structure_pair"][0] and run.config_dict()["train"]["candidates"] == "all"


def test_run_ids_with_dropped_pairs_unchanged(store_with_dataset) -> None:
    store, ds = store_with_dataset
    split = ds.images["split"].to_list()
    Path(ds.images["path"][split.index("train")]).write_bytes(b"garbage")
    extract(store, "toy", ExtractConfig(encoders=("tiny-image", "tiny-text"), shard_rows=8, progress=False,
                                        skip_bad=True, entry_format=1), load=load_tiny)
    _check(store, "_bad")


def test_own_val_split_is_the_default_and_changes_the_id(store_with_dataset) -> None:
    """The toy dataset has a val split: by default a run validates on it (docs/method.md § 3.8), and says so."""
    store, ds = store_with_dataset
    extract(store, "toy", ExtractConfig(encoders=("tiny-image", "tiny-text"), shard_rows=8, progress=False),
            load=load_tiny)
    kw = {k: v for k, v in CASES["csa_last"].items() if k != "validation"}
    run = resolve_run(store, RunConfig(dataset="toy", vision="tiny-image", text="tiny-text", **kw))
    n_val_pairs = len(ds.pairs("val")[0])
    assert run.validation == "split" and run.n_val == n_val_pairs > 0 and run.run_id != PINNED["csa_last"][0]
    assert run.config_dict()["validation"] == "split" and "own val split" in run.validation_note()
    assert ResolvedRun.from_config(json.loads(_config_bytes(run))) == run
    carved = resolve_run(store, RunConfig(dataset="toy", vision="tiny-image", text="tiny-text", **CASES["csa_last"]))
    assert carved.validation == "carved" and "carved from the train split" in carved.validation_note()


def test_saved_config_missing_a_field_is_refused() -> None:
    from stratalign.errors import StratalignError

    with pytest.raises(StratalignError, match=r"lacks \['text_layer'\]"):
        ResolvedRun.from_config({"run_id": "x", **{k: 0 for k in ("dataset", "dataset_fingerprint", "vision",
                                 "text", "vision_entry", "text_entry", "vision_layer", "layer_rule",
                                 "vision_layer_name", "text_layer_name", "head", "objective", "seed", "n_pairs",
                                 "n_train", "n_val", "val_fraction", "ids_sha", "ids_kind", "train")}})
