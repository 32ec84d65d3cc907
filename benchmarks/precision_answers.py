"""Does bf16 change the demo's answers? (issue 30, Deliver 7)

Reads a store where the demo ran twice, `stratalign demo` and `stratalign demo --precision bf16` (bf16 features
from a bf16 forward, heads trained under bf16 autocast; other entry keys and run ids, so both live in one store).
Every run is read back, none is trained (a run the store lacks is an error: run both demos first). Printed:
1. per cell (objective x layers x n) and metric, bf16 - fp32 paired run by run on the seed, with the two-level
   95 % interval (report.compare.grid_differences), and how many intervals hold 0;
2. the demo's verdicts (each method against CLIP, same layers and last layers, every metric) under both
   precisions side by side, and how many agree;
3. the resolution of a verdict, in fp32 alone, as the yardstick for 2: how many fp32 verdicts change when only the
   bootstrap's random seed changes (seeds 1-3 against the report's 0), and when one training seed of five is left out
   (each in turn; the cells' choices stay as made). A verdict at an interval's edge flips under any perturbation;
   bf16 agreeing with fp32 as often as fp32 agrees with itself is all "unchanged" can mean.
Also how many of the verdicts that differ rest on a near-tie knob choice (`choice_tie`, the report's dagger).
Last line: `intervals holding 0: K/N; verdicts agreeing: V/M; fp32 against itself: bootstrap seed B/M, one training
seed left out A/M (the worst of the five)`.
`--attribute` trains two more grids in the store (bf16 features with fp32 heads; fp32 features with bf16 heads) and
prints, for each, the same two counts against fp32: which half of bf16 moves the answers.
`--jitter K` trains the grid K more times under fp32 heads, in a copy of the store without its runs, on fp32 features
perturbed as much as bf16 perturbs them but at random: each layer's rows plus a fixed Gaussian draw (seed 1..K) whose
per-dimension sd is that of bf16 - fp32 over the layer's rows (the class prompts' features are left as they are). It
prints the same two counts against fp32: a yardstick for "bf16 features under fp32 heads". If random noise of
bf16's size moves as many verdicts, bf16 has no effect of its own; the verdicts rest on choices any change that
size tips. `--jitter-offset` adds bf16's constant offset as well (the mean of bf16 - fp32 over each layer's rows, a
quarter to a half of the error's energy for DINOv2-S), so the jitter has bf16's offset and size but not its dependence on the
rows.

    python benchmarks/precision_answers.py --store stratalign-store [--limit N --seeds K] [--csv out.csv]
        [--attribute] [--jitter K [--jitter-offset]]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import polars as pl

from stratalign.report.compare import grid_differences, paired_comparisons
from stratalign.stages.demo import DemoConfig, demo_sweep
from stratalign.stages.runs.evaluate import run_queries
from stratalign.stages.runs.sweep import run_sweep
from stratalign.store.entry import FeatureEntry
from stratalign.store.feature_store import FeatureStore

VERDICT_KEY = ("comparison", "method", "baseline", "n_pairs", "metric")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="stratalign-store")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--csv", default=None, help="also write the per-cell differences here")
    ap.add_argument("--attribute", action="store_true", help="also train and compare the two mixed grids")
    ap.add_argument("--jitter", type=int, default=0, help="also train K grids on fp32 features jittered to bf16's size")
    ap.add_argument("--jitter-offset", action="store_true", help="the jitter includes bf16's mean offset per layer")
    args = ap.parse_args()
    store = FeatureStore.open(args.store, "a")  # read back; a cell's choice record is re-saved
    grids = {}
    for precision in ("fp32", "bf16"):
        cfg = DemoConfig.sized(args.limit, args.seeds, precision)
        res = run_sweep(store, demo_sweep(cfg), None, progress=False)
        if res.trained:
            raise SystemExit(f"the store lacks {res.trained} run(s) of the {precision} demo: run "
                             f"`stratalign demo --precision {precision}` on it first")
        grids[precision] = res
    queries: dict = {}
    for res in grids.values():
        _load_queries(store, res.runs, queries)
    diffs = grid_differences(grids["bf16"].runs, grids["fp32"].runs, queries)
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=160, float_precision=2):
        print("bf16 - fp32, paired by cell and seed (points of %, two-level 95 % interval):")
        print(diffs.with_columns(pl.col("n_pairs").fill_null(-1)).sort("objective", "layer_rule", "n_pairs", "metric"))
        verdicts = (grids["fp32"].comparisons.select(*VERDICT_KEY, pl.col("verdict").alias("fp32"),
                                                     pl.col("diff").alias("fp32_diff"),
                                                     pl.col("choice_tie").alias("fp32_tie"))
                    .join(grids["bf16"].comparisons.select(*VERDICT_KEY, pl.col("verdict").alias("bf16"),
                                                           pl.col("diff").alias("bf16_diff"),
                                                           pl.col("choice_tie").alias("bf16_tie")),
                          on=list(VERDICT_KEY), how="inner", nulls_equal=True))
        changed = verdicts.filter(pl.col("fp32") != pl.col("bf16"))
        print("verdicts that differ between the precisions:")
        print(changed if changed.height else "(none)")
        _tie_share(verdicts)
    if args.csv:
        diffs.write_csv(args.csv)
    holding = _holding(diffs)
    if args.attribute:
        _attribute(store, args, grids["fp32"], queries)
    for draw in range(1, args.jitter + 1):
        _jitter(Path(args.store), args, grids["fp32"], queries, draw)
    boot, left_out = _self_agreement(grids["fp32"].runs, queries, args.seeds)
    print(f"intervals holding 0: {holding}/{diffs.height}; verdicts agreeing: "
          f"{verdicts.height - changed.height}/{verdicts.height}; fp32 against itself: bootstrap seed {boot}, one "
          f"training seed left out {left_out} (the worst of the {args.seeds})")


def _attribute(store: FeatureStore, args: argparse.Namespace, fp32: object, queries: dict) -> None:
    """The two halves of bf16 apart, each against fp32: bf16 features under fp32 heads, fp32 features under bf16
    heads (trained here when the store lacks them)."""
    from dataclasses import replace

    for name, features, heads in (("bf16 features, fp32 heads", "bf16", "fp32"),
                                  ("fp32 features, bf16 heads", "fp32", "bf16")):
        sweep = demo_sweep(DemoConfig.sized(args.limit, args.seeds, "fp32"))
        options = sweep.base.options + ((("precision", heads),) if heads != "fp32" else ())
        sweep = replace(sweep, base=replace(sweep.base, options=options, feature_precision=features))
        res = run_sweep(store, sweep, None, progress=False)
        _load_queries(store, res.runs, queries)
        _against_fp32(name, res.runs, res, fp32, queries)


def _jittered_reads(draw: int, offset: bool = False):
    """FeatureEntry.read_layer for fp32 entries: the rows plus a fixed per-(entry, layer) Gaussian draw whose
    per-dimension sd is that of the bf16 twin entry's rows less the fp32 ones, plus that difference's mean when
    `offset` (other entries read as they are)."""
    original = FeatureEntry.read_layer
    noise: dict[tuple[str, int], np.ndarray] = {}

    def read(self: FeatureEntry, layer, rows=None, *, verify: bool = True) -> np.ndarray:
        data = original(self, layer, rows, verify=verify)
        if self.spec.precision != "fp32":
            return data
        idx = self.resolve_layer(layer)
        if (self.key, idx) not in noise:
            twin = self.store.find_entry(self.spec.dataset, self.spec.encoder_spec, self.spec.pooling,
                                         modality=self.spec.modality, precision="bf16")
            diff = original(twin, idx).astype(np.float64) - original(self, idx).astype(np.float64)
            sd, mean = diff.std(0), diff.mean(0) if offset else 0.0
            rng = np.random.default_rng([draw, idx, int(self.key.encode().hex()[:12], 16)])
            noise[(self.key, idx)] = (rng.standard_normal((self.spec.rows, len(sd))) * sd + mean).astype(np.float32)
        extra = noise[(self.key, idx)] if rows is None else noise[(self.key, idx)][np.asarray(rows, dtype=np.int64)]
        return data.astype(np.float32) + extra

    return mock.patch.object(FeatureEntry, "read_layer", read)


def _jitter(source: Path, args: argparse.Namespace, fp32: object, queries: dict, draw: int) -> None:
    """The grid under fp32 heads on jittered fp32 features (`_jittered_reads`), trained in a copy of the store
    without its runs (the same run ids; the layer choices kept), against fp32."""
    with tempfile.TemporaryDirectory(prefix="jitter-", dir=source.parent) as tmp:
        copy = Path(tmp) / "store"
        shutil.copytree(source, copy, ignore=lambda d, names: [n for n in names
                                                               if Path(d) == source and n == "runs"])
        with _jittered_reads(draw, args.jitter_offset):
            jstore = FeatureStore.open(str(copy), "a")
            res = run_sweep(jstore, demo_sweep(DemoConfig.sized(args.limit, args.seeds, "fp32")), None, progress=False)
            _load_queries(jstore, res.runs, queries, prefix="jitter:")  # the same run ids as fp32's: kept apart
        what = "size and offset" if args.jitter_offset else "size"
        _against_fp32(f"fp32 features jittered to bf16's {what} (draw {draw}), fp32 heads",
                      res.runs.with_columns(("jitter:" + pl.col("run")).alias("run")), res, fp32, queries)


def _load_queries(store: FeatureStore, runs: pl.DataFrame, queries: dict, prefix: str = "") -> None:
    """The per-query results of `runs` into `queries`, under `prefix` + run id (runs without them left out)."""
    for rid in runs["run"].to_list():
        got = run_queries(store, rid)
        if got is not None:
            queries[prefix + rid] = got[0]


def _holding(diffs: pl.DataFrame) -> int:
    """How many paired differences' intervals hold 0."""
    return int(((diffs["low"] <= 0) & (diffs["high"] >= 0)).sum())


def _against_fp32(name: str, runs: pl.DataFrame, res: object, fp32: object, queries: dict) -> None:
    """One line: a grid (`runs`, named as in `queries`; `res` its sweep result) against the fp32 demo's."""
    diffs = grid_differences(runs, fp32.runs, queries)
    agree, compared = _agreeing(fp32.comparisons, res.comparisons)
    print(f"{name} - fp32: intervals holding 0: {_holding(diffs)}/{diffs.height}; verdicts agreeing: "
          f"{agree}/{compared} ({res.trained} runs trained)", flush=True)


def _tie_share(verdicts: pl.DataFrame) -> None:
    """How many of the verdicts that differ between the precisions (`verdicts`: both grids' joined) sit on a near-tie
    knob choice in either grid (`choice_tie`, the report's dagger), against how many verdicts do: does the report's
    mark point at the fragile ones?"""
    tie = verdicts["fp32_tie"].is_not_null() | verdicts["bf16_tie"].is_not_null()
    same = verdicts["fp32"] == verdicts["bf16"]
    print(f"near-tie choice on either side: {int(tie.sum())}/{verdicts.height} verdicts, {int((tie & ~same).sum())}/"
          f"{int((~same).sum())} of those that differ; verdicts agreeing without one: "
          f"{int((~tie & same).sum())}/{int((~tie).sum())}")


def _agreeing(a: pl.DataFrame, b: pl.DataFrame) -> tuple[int, int]:
    """(verdicts equal, verdicts compared) of two comparison tables of the same grid."""
    both = a.select(*VERDICT_KEY, "verdict").join(b.select(*VERDICT_KEY, pl.col("verdict").alias("other")),
                                                   on=list(VERDICT_KEY), how="inner", nulls_equal=True)
    return int((both["verdict"] == both["other"]).sum()), both.height


def _self_agreement(runs: pl.DataFrame, queries: dict, seeds: int) -> tuple[str, str]:
    """fp32 verdicts against themselves: another bootstrap seed (1-3, the lowest agreement), and each training seed
    left out (the lowest); as 'agreeing/compared'."""
    reference = paired_comparisons(runs, queries, seed=0)
    boot = min(_agreeing(reference, paired_comparisons(runs, queries, seed=s)) for s in (1, 2, 3))
    print(f"fp32 verdicts under bootstrap seeds 1-3 against seed 0: the lowest agreement {boot[0]}/{boot[1]}")
    left = []
    for k in range(seeds):
        got = _agreeing(reference, paired_comparisons(runs.filter(pl.col("seed") != k), queries, seed=0))
        print(f"fp32 verdicts without training seed {k}: {got[0]}/{got[1]} agree with all {seeds} seeds'")
        left.append(got)
    worst = min(left)
    return f"{boot[0]}/{boot[1]}", f"{worst[0]}/{worst[1]}"


if __name__ == "__main__":
    main()
