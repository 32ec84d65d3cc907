"""The main job on the embedded default: ingest Twemoji, extract, choose layers, sweep, report.

Everything is cached in the store, so a second run only re-reads results (and re-writes the report).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import polars as pl

from stratalign.core.stats import two_level_bootstrap
from stratalign.device import resolve_device, resolve_precision
from stratalign.report.naming import n_name, rule_name
from stratalign.report.report import results_table
from stratalign.stages.extract import ExtractConfig, extract
from stratalign.stages.ingest.sources import ingest_source
from stratalign.stages.layers import LayersConfig, run_layers
from stratalign.stages.runs.sweep import SweepConfig, run_sweep, write_leaderboard
from stratalign.stages.runs.training import RunConfig
from stratalign.stages.subsets import KFOLD, cell_validation
from stratalign.store.feature_store import FeatureStore
from stratalign.train.presets import choose_preset, describe


@dataclass(frozen=True)
class DemoConfig:
    """The demo's grid. Defaults fit in about 10 minutes on 2 CPU cores from a fresh store."""

    dataset: str = "twemoji"
    vision: str = "dinov2-s"
    text: str = "minilm-l6"
    extra_encoders: tuple[str, ...] = ("efficientnet-lite0",)
    # clip+structure-knn is left out: it costs twice the batch form and gave the batch form's differences (demo of
    # 2026-11-25, 3 seeds); `stratalign sweep --objective clip+structure-knn` runs it
    # comm is left out too: with batched views a run still costs ~8-11x a linear-head run on 2 cores (benchmarks/
    # comm.py, 2026-12-06), 2-6 minutes past the budget; `stratalign sweep --objective comm` on the demo's store runs
    # it, and the report then reads its probe against the frozen-feature probe (comm_probe_line)
    # asif, procrustes, clip+fusemix: the baselines users compare against (docs/method.md § 3.9), chosen and reported
    # like every objective (report.bakeoff: bakeoff.md)
    objectives: tuple[str, ...] = ("clip", "clip+structure", "clip+ib", "csa", "asif", "procrustes", "clip+fusemix")
    n_pairs: tuple[int | None, ...] = (200, 500, None)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # docs/method.md § 4: at least 5 seeds where a report draws conclusions
    layer_rules: tuple[str, ...] = ("last", "auto")
    # last vs chosen layers is compared on CLIP; the other objectives run on the chosen layers only (the budget:
    # tuned grids x 5 seeds x 3 subset sizes within 10 minutes on 2 cores)
    skip: tuple[tuple[str, str], ...] = (("last", "clip+structure"), ("last", "clip+ib"), ("last", "csa"),
                                         ("last", "asif"), ("last", "procrustes"), ("last", "clip+fusemix"))
    # (objective, n_pairs) cells left out; with comm added to `objectives`, (("comm", 200), ("comm", 500)) keeps it to
    # all pairs
    # FuseMix only with all pairs: its alpha grid (extended past an edge) trains ~25 runs a cell, ~1.5x a CLIP run
    # each (its mixing is drawn run by run); at 200 and 500 pairs too it would add ~2 min on 2 cores
    skip_n: tuple[tuple[str, int | None], ...] = (("clip+fusemix", 200), ("clip+fusemix", 500))
    limit: int | None = None  # only N emoji, taken in turn from each category (a quick look, tests)
    # trainer schedule: the `cpu` preset (train.presets: batch 256, 600 steps, warm-up 100, patience 40, eval
    # every 10) on every machine, so that the demo's runs are the same everywhere. Checkpoints are chosen by
    # validation rsum; on the full Twemoji set it peaks near step 80-110 and then falls (CLIP, all pairs: 244 at
    # step 90, 220 at 600; validation zero-shot 44 % at step 30, 22 % at 600: 2026-11-25), so patience 40 stops
    # a run where a full schedule would restore the same step. `train_options` are --set overrides on top.
    preset: str = "cpu"
    train_options: tuple[tuple[str, object], ...] = ()
    # knobs chosen on validation, one choice per cell for all its seeds (docs/method.md § 3.9: lambda, beta, CSA k x
    # ridge from each objective's grid, extended past an edge); False trains the registry's defaults (the stopping
    # step is chosen per cell either way)
    tune: bool = True
    # the layer check (stages.layer_check): CLIP on this many candidate pairs spread over the calibrated ranking (and
    # the last pair), seed 0, all pairs; the rank correlation of their scores with validation rsum goes in the
    # report. 0: no check
    layer_check: int = 0
    layer_check_span: int | None = None  # spread the candidates over the top N ranks only (None: every pair)
    batch_size: int = 32
    progress: bool = True
    # fp32 | bf16 | auto (docs/method.md § 1): the encoders' forward and the heads' matmuls in this precision (auto:
    # bf16 where the CPU or GPU has it); layers and runs read the features of this precision, so fp32 and bf16
    # demos in one store stay apart (other entry keys, other run ids)
    precision: str = "fp32"
    # the cells' validation (docs/method.md § 3.8): auto takes the set's val split (204 pairs in full), k-fold for a
    # val split under 100 pairs (five selection runs a seed, then a refit); `sized` keeps a --limit slice on its
    # small val split, a quick look at 1/6 of k-fold's runs
    validation: str = "auto"

    @classmethod
    def sized(cls, limit: int | None = None, seeds: int = 5, precision: str = "fp32") -> DemoConfig:
        """The grid for the first `limit` emoji and seeds 0..seeds-1: under 300 emoji the subset sizes shrink
        to limit // 8 (at least 10) and all: the default sizes (200, 500) do not fit a small train split; above,
        a default size stays only where it fits (the train split holds ~70 % of the emoji: a size up to 60 %). A slice
        keeps its small val split (a quick look: k-fold would train ~6x the runs)."""
        if limit is None:
            return cls(seeds=tuple(range(seeds)), precision=precision)
        fitting = tuple(n for n in cls.n_pairs if n is not None and n <= 0.6 * limit)
        small = fitting if limit >= 300 and fitting else (max(10, limit // 8),)
        all_pairs_only = dict.fromkeys(o for o, _ in cls.skip_n)  # objectives the full grid runs with all pairs only
        return cls(limit=limit, seeds=tuple(range(seeds)), n_pairs=(*small, None),
                   skip_n=tuple((o, n) for o in all_pairs_only for n in small), precision=precision,
                   validation="split")

    def resolved_precision(self) -> str:
        """fp32 or bf16 on this machine's device (auto resolved; bf16 without the hardware: one line)."""
        return resolve_precision(self.precision, resolve_device("auto"))


def one_class_warnings(ds: Any) -> list[str]:
    """A warning per split whose images all have one label: zero-shot accuracy there is 100 % or 0 % by
    construction."""
    out = []
    for split in ("train", "val", "test"):
        labels = ds.images.filter(ds.images["split"] == split)["label"].unique().to_list() \
            if "label" in ds.images.columns else []
        if len(labels) == 1:
            out.append(f"warning: the {split} split of {ds.name} holds one class ({labels[0]}): its zero-shot accuracy "
                       "means nothing; use a larger --limit")
    return out


def _validation_words(ds: Any, choice: str) -> str:
    if cell_validation(ds, choice) == KFOLD:
        return ("checkpoints and knobs are chosen by k-fold cross-validation over the train pairs, then every seed is "
                "refitted on all of them")
    return f"checkpoints are chosen on the dataset's own val split ({len(ds.pairs('val')[0])} pairs)"


def _split_words(ds: Any) -> str:
    counts = ds.split_counts()
    return ", ".join(f"{counts.get(s, 0)} {s}" for s in ("train", "val", "test")) + " images"


def comm_probe_line(runs: pl.DataFrame) -> str | None:
    """CoMM's linear probe on its fused features against the same probe on the frozen features concatenated, per
    cell with all pairs, paired by seed (None without CoMM runs)."""
    if runs.height == 0 or "probe_acc" not in runs.columns:
        return None
    rows = runs.filter((pl.col("objective") == "comm") & pl.col("probe_acc").is_not_null()
                       & pl.col("probe_concat_acc").is_not_null()).sort("seed")
    lines = []
    for (rule, n), cell in rows.group_by(["layer_rule", "n_pairs"], maintain_order=True):
        fused, frozen = cell["probe_acc"].to_numpy(), cell["probe_concat_acc"].to_numpy()
        spread = f" ± {fused.std(ddof=1):.1f}" if len(fused) > 1 else ""
        # paired by seed, the seeds resampled (each seed's probe scores one value: one "query" a seed)
        diff = two_level_bootstrap([[v] for v in fused], [[v] for v in frozen], scale=1.0)
        lines.append(f"CoMM ({rule_name(rule)} layers, n={n_name(n)}, {len(fused)} seeds): a linear probe on the labels "
                     f"from its fused features scores {fused.mean():.1f}{spread} % on the test split, against "
                     f"{frozen.mean():.1f} % for the same probe on the frozen features concatenated: paired by seed "
                     f"{diff.diff:+.1f} [{diff.low:+.1f}, {diff.high:+.1f}] points, {diff.verdict} (95 % bootstrap "
                     f"over seeds); above it in {int((fused > frozen).sum())} of {len(fused)} seeds (range "
                     f"{fused.min():.1f}-{fused.max():.1f}).")
    return " ".join(lines) or None


def dataset_name(cfg: DemoConfig) -> str:
    """The demo dataset's name in the store: a limited demo takes its emoji in turn from each category (the first N
    are all one category: a 100 % zero-shot score that means nothing), under a new name, as the first-N datasets of
    older versions keep theirs."""
    return cfg.dataset if cfg.limit is None else f"{cfg.dataset}-mixed{cfg.limit}"


def demo_sweep(cfg: DemoConfig) -> SweepConfig:
    """The demo's grid as a sweep (features and heads in the demo's precision)."""
    precision = cfg.resolved_precision()
    options = cfg.train_options + ((("precision", precision),) if precision != "fp32" else ())
    base = RunConfig(dataset=dataset_name(cfg), vision=cfg.vision, text=cfg.text, options=options, preset=cfg.preset,
                     feature_precision=precision, validation=cfg.validation)
    return SweepConfig(base=base, n_pairs=cfg.n_pairs, seeds=cfg.seeds, objectives=cfg.objectives,
                       layer_rules=cfg.layer_rules, heads=("linear",), skip=cfg.skip, skip_n=cfg.skip_n, tune=cfg.tune)


def run_demo(store_url: str, out_dir: str, cfg: DemoConfig = DemoConfig(),
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every stage; returns the timings, the layer choice, the leaderboard and the report path."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    precision = cfg.resolved_precision()  # before anything is written
    store = FeatureStore.open(store_url, "a", create=True)
    name = dataset_name(cfg)
    ds = ingest_source("twemoji", name, limit=cfg.limit, spread=True)
    resplit = name in store.datasets() and store.dataset(name).content_fingerprint == ds.content_fingerprint
    written = store.save_dataset(ds, replace=resplit)  # same images and captions: a new split, features kept
    state = ("re-split: same content, cached features kept" if resplit else "ingested") if written else "cached"
    log(f"[1/4] dataset {name}: {ds.images.height} pairs ({state})")
    for line in one_class_warnings(ds):
        log(line)
    timings["ingest"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    encoders = (cfg.vision, *cfg.extra_encoders, cfg.text)
    reports = extract(store, name, ExtractConfig(encoders=encoders, batch_size=cfg.batch_size,
                                                 progress=cfg.progress, precision=precision))
    for r in reports:
        log(f"[2/4] extract {r.encoder}: {r.shards_encoded}/{r.shards_total} shards encoded, "
            f"{r.rows_per_s:.0f} rows/s, {r.wall_s:.1f}s")
    timings["extract"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    layer_infos, results = [], []
    for vision in (cfg.vision, *cfg.extra_encoders):
        lcfg = LayersConfig(dataset=name, vision=vision, text=cfg.text, metrics=("mutual_knn", "cka"),
                            feature_precision=precision)
        done = run_layers(store, lcfg, "best", "mutual_knn", heatmap_copy=os.path.join(out_dir, f"layers-{vision}.png"))
        result, choice, png = done.result, done.choice, done.png
        layer_infos.append({**choice, "n": result["n"], "k": result["k"], "heatmap": png, "vision": vision})
        results.append(result)
        log(f"[3/4] layers {vision} x {cfg.text}: best ({choice['vision_layer']},{choice['text_layer']}) "
            f"mutual_knn={choice['score']:.3f} vs last {choice['last_score']:.3f}")
    timings["layers"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    sweep_cfg = demo_sweep(cfg)
    sweep = run_sweep(store, sweep_cfg, None, progress=cfg.progress)
    log(f"[4/4] sweep: {sweep.trained} runs trained, {sweep.skipped} already in the store")
    timings["sweep"] = time.perf_counter() - t0
    check_lines = []
    if cfg.layer_check:
        t0 = time.perf_counter()
        from stratalign.stages.layer_check import check_candidates

        check_lines = check_candidates(store, results[0], sweep_cfg.base, count=cfg.layer_check,
                                       seeds=cfg.seeds[:1], span=cfg.layer_check_span).lines()
        log(check_lines[0])
        timings["layer check"] = time.perf_counter() - t0

    comm = comm_probe_line(sweep.runs)
    intro = [f"Embedded demo: {ds.images.height} Twemoji image-caption pairs (caption = Unicode name, "
             f"label = one of {len(ds.class_names)} categories), vision `{cfg.vision}`, text `{cfg.text}`, "
             f"linear heads, seeds {list(cfg.seeds)}. The split keeps the variants of one emoji (genders, family "
             f"members, mirrored, flag aliases) together: {_split_words(ds)}. Training pairs come from the train "
             f"split, {_validation_words(ds, cfg.validation)}, numbers are on the test split. "
             f"n=all means all train pairs. Precision {precision}: the encoders' forwards and the heads' matmuls "
             "(losses in float32, docs/method.md § 1 and § 3.7). "
             "Trainer settings: " + describe(choose_preset(cfg.preset, dict(cfg.train_options)), cfg.train_options)
             + " (everything else as docs/method.md: tau 0.05, AdamW lr 1e-3). One choice per cell, the same rule "
             "for every objective: the stopping step"
             + (" and the knobs (STRUCTURE lambda, IB beta, CSA k and ridge, ASIF power, FuseMix alpha, from each "
                "objective's grid, extended past an edge)" if cfg.tune else "")
             + " maximise validation rsum averaged over the cell's seeds, and every seed stops there."
             + "".join(f" Left out of the grid: {', '.join(o for r, o in cfg.skip if r == rule)} on the {rule} layers."
                       for rule in dict.fromkeys(r for r, _ in cfg.skip))
             + "".join(f" Left out of the grid: {obj} with n={n}." for obj, n in cfg.skip_n if n in cfg.n_pairs),
             *(f"Layers of the other vision encoder, `{info['vision']}` x `{cfg.text}` (not used by the sweep): "
               f"best ({info['vision_layer']},{info['text_layer']}) mutual_knn {info['score']:.3f} against "
               f"{info['last_score']:.3f} for the last layers; heatmap `{os.path.basename(info['heatmap'])}`."
               for info in layer_infos[1:]),
             *check_lines[:1], *(f"- {line}" for line in check_lines[1:]),
             *([comm] if comm else []),
             "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items())]
    sweep.files = write_leaderboard(sweep, out_dir, extra=intro, layer_info=layer_infos[0],
                                    title="stratalign demo: how much paired data, which layers, which objective?")
    return {"timings": timings, "layers": layer_infos, "leaderboard": sweep.leaderboard,
            "table": results_table(sweep.leaderboard, sweep.intervals), "report": sweep.files["report_md"],
            "files": sweep.files,
            "trained": sweep.trained, "skipped": sweep.skipped}
