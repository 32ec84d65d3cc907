"""A training run as the user states it (`RunConfig`) and fully resolved (`ResolvedRun`).

Resolution pins every implicit choice: the feature entries, the layer pair, the validation carve-out, the
training subset and every trainer setting. A run is content-addressed by its resolved config (see
store.runs): `ResolvedRun.identity()` is exactly what the run id hashes and `config_dict()` exactly what
config.json holds, so ids of existing runs never change.
"""

from __future__ import annotations

import hashlib
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Sequence

from stratalign.core.layer_rule import LayerRule
from stratalign.core.objectives import Selection, objective_named
from stratalign.errors import StratalignError, require_int
from stratalign.stages.folds import DEFAULT_FOLDS, check_folds, fold_split
from stratalign.stages.subsets import (
    CARVED,
    KFOLD,
    REFIT,
    PairRows,
    draw_subset,
    drop_bad_pairs,
    subset_from_ids,
    validation_pairs,
    validation_source,
)
from stratalign.store.datasets import PairDataset
from stratalign.store.entry_spec import check_feature_precision
from stratalign.store.feature_store import FeatureEntry, FeatureStore
from stratalign.store.layer_results import load_choice
from stratalign.store.runs import RunRegistry, run_id_of
from stratalign.train import TrainConfig
from stratalign.train.presets import AUTO, apply_preset, check_preset_name, choose_preset, describe
from stratalign.train.validation import check_select

# TrainConfig fields that RunConfig sets itself: a --set of one of them names the flag to use instead
RUN_FLAGS = {"objective": "--objective", "head": "--head", "seed": "--seed"}


@dataclass(frozen=True)
class RunConfig:
    """One training run as the user states it; `resolve_run` pins every implicit choice."""

    dataset: str
    vision: str
    text: str
    layers: str = "auto"  # auto (the recorded choice) | last | "V,T"
    head: str = "linear"
    objective: str = "clip"
    n_pairs: int | None = None
    seed: int = 0
    val_fraction: float = 0.1  # of the train split, when validation pairs are carved from it
    # auto | split | carve | kfold. A lone run's auto: the dataset's val split if it has one, else carved; a cell's
    # auto (stages.runs.cells): the val split if it has >= subsets.MIN_VAL_PAIRS pairs, else kfold
    validation: str = "auto"
    folds: int = DEFAULT_FOLDS  # k of k-fold cross-validation (validation kfold)
    # k-fold: the fold held out as validation (a selection run); None: the refit on every training pair, which
    # trains to a given stop_step (stages.runs.cells chooses it over the folds)
    fold: int | None = None
    ids_file: str | None = None
    ids_kind: str = "caption"
    vision_pooling: str | None = None
    text_pooling: str | None = None
    # the features' forward precision (fp32 | bf16: `extract --precision`); None: fp32 features first. The entry
    # key, and so the run id, differs per precision.
    feature_precision: str | None = None
    options: tuple[tuple[str, Any], ...] = field(default_factory=tuple)  # TrainConfig overrides (win over preset)
    # trainer schedule (train.presets): auto (cpu or gpu by the machine; the default here as in the CLI, so Python
    # and the CLI train the same run for the same request) | cpu | gpu | paper. None: TrainConfig's own defaults
    # (docs/method.md published schedule, = paper) recorded without a preset, as every run before presets existed.
    preset: str | None = AUTO
    # the validation metric that picks the checkpoint (rsum | zeroshot | clip_loss) of the objectives that select
    # on validation (CoMM and CSA do not: left alone there, so one sweep can name it for every cell); None: the
    # objective's default (rsum). A --set select=... wins.
    select: str | None = None

    def __post_init__(self) -> None:
        require_int(self.seed, "--seed")
        if self.n_pairs is not None:
            require_int(self.n_pairs, "--n-pairs", 1)
        if not (isinstance(self.val_fraction, (int, float)) and 0 < self.val_fraction < 1):
            raise StratalignError(f"val_fraction must be between 0 and 1 (exclusive), got {self.val_fraction!r}")
        check_folds(self.folds, self.fold)
        check_feature_precision(self.feature_precision)


@dataclass(frozen=True)
class RunInputs:
    """What a resolved run reads, held so that no later step looks it up again: its dataset (tables loaded)
    and its (vision, text) feature entries."""

    dataset: PairDataset
    vision: FeatureEntry
    text: FeatureEntry


@dataclass(frozen=True)
class ResolvedRun:
    """A run with every choice pinned. The fields up to `bad_pairs_dropped` are its identity (hashed into
    `run_id`, written to config.json); `subset` and `val` are the training and validation pairs and `inputs`
    its dataset and entries, carried along to every later step but not part of the id (None for a run read
    back from its config.json: `inputs_of` finds them). `preset` is the schedule
    preset the settings came from: written to config.json when there was one, but not hashed (the id depends on
    the settings in `train`, not on how they were asked for)."""

    dataset: str
    dataset_fingerprint: str
    vision: str
    text: str
    vision_entry: str
    text_entry: str
    vision_layer: int
    text_layer: int
    layer_rule: str
    vision_layer_name: str
    text_layer_name: str
    head: str
    objective: str
    seed: int
    n_pairs: int
    n_train: int
    n_val: int
    val_fraction: float
    ids_sha: str | None
    ids_kind: str
    train: dict[str, Any]  # TrainConfig as JSON (tuples as lists)
    bad_pairs_dropped: int = 0  # train/val pairs with a --skip-bad placeholder row; in the id only when > 0
    validation: str = CARVED  # split | carved | kfold | refit (subsets); in the id unless "carved"
    folds: int = 0  # k of a k-fold run (kfold, refit); in the id only then
    fold: int | None = None  # the held-out fold of a kfold run; in the id only then
    run_id: str = ""
    preset: str | None = None
    subset: PairRows | None = field(default=None, compare=False, repr=False)
    val: PairRows | None = field(default=None, compare=False, repr=False)
    inputs: RunInputs | None = field(default=None, compare=False, repr=False)

    def identity(self) -> dict[str, Any]:
        """What the run id hashes (bad_pairs_dropped only when non-zero and validation only when it is the val
        split, so the ids of runs that carved their validation pairs, as all runs did before, stay valid)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_IDENTITY}
        if not self.bad_pairs_dropped:
            del out["bad_pairs_dropped"]
        if self.validation == CARVED:
            del out["validation"]
        if self.validation not in (KFOLD, REFIT):
            del out["folds"]
        if self.validation != KFOLD:
            del out["fold"]
        return out

    def validation_note(self) -> str:
        """Where the validation pairs came from, in words (what a run prints)."""
        if self.validation == KFOLD:
            return (f"validation: fold {self.fold} of {self.folds} of the training pairs ({self.n_val} pairs held "
                    f"out; k-fold cross-validation, the dataset has no or a very small val split)")
        if self.validation == REFIT:
            return (f"validation: none held out; the refit on all {self.n_train} training pairs, stopped at the step "
                    f"chosen over {self.folds} folds (its curve is measured on {self.n_val} of its own training "
                    "pairs: a monitor, not a choice)")
        if self.validation == CARVED:
            return (f"validation: {self.n_val} pairs carved from the train split ({self.val_fraction:.0%} of its "
                    "images; the dataset has no val split, or carving was asked for)")
        return f"validation: the dataset's own val split ({self.n_val} pairs)"

    def config_dict(self) -> dict[str, Any]:
        """config.json of the run: the identity plus its run id (and the preset, when there was one)."""
        return {**self.identity(), "run_id": self.run_id, **({"preset": self.preset} if self.preset else {})}

    def train_config(self) -> TrainConfig:
        return TrainConfig.from_dict(self.train)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ResolvedRun:
        """The run described by a saved config.json (without its pairs)."""
        optional = ("subset", "val", "inputs", "bad_pairs_dropped", "validation", "folds", "fold", "preset")
        names = [f.name for f in fields(cls) if f.name not in optional]
        missing = [n for n in names if n not in config]
        if missing:
            raise StratalignError(f"run config {config.get('run_id', '?')} lacks {missing}: not a stratalign run")
        return cls(**{n: config[n] for n in names}, bad_pairs_dropped=int(config.get("bad_pairs_dropped", 0)),
                   validation=str(config.get("validation", CARVED)), folds=int(config.get("folds", 0)),
                   fold=config.get("fold"), preset=config.get("preset"))


_NOT_IDENTITY = ("run_id", "preset", "subset", "val", "inputs")


def inputs_of(store: FeatureStore, run: ResolvedRun) -> RunInputs:
    """The dataset and entries a run reads: the ones it carries, or (a run read back from config.json) the ones
    its config names, from the store (which holds a dataset it has loaded once)."""
    if run.inputs is not None:
        return run.inputs
    return RunInputs(store.dataset(run.dataset), store.entry(run.vision_entry), store.entry(run.text_entry))


def run_entries(store: FeatureStore, cfg: RunConfig, dataset: str | None = None) -> tuple[FeatureEntry, FeatureEntry]:
    """The (vision, text) feature entries a run config names."""
    ds = dataset or cfg.dataset
    v = store.find_entry(ds, cfg.vision, cfg.vision_pooling, modality="image", precision=cfg.feature_precision)
    t = store.find_entry(ds, cfg.text, cfg.text_pooling, modality="text", precision=cfg.feature_precision)
    return v, t


def _layer_pair(store: FeatureStore, cfg: RunConfig, v: FeatureEntry, t: FeatureEntry) -> tuple[int, int, str]:
    """(vision layer, text layer, recorded rule) of the run's layer rule."""
    rule = LayerRule.parse(cfg.layers)
    if rule.kind == "auto":
        choice = load_choice(store, cfg.dataset, cfg.vision, cfg.text)
        vl, tl = int(choice["vision_layer"]), int(choice["text_layer"])
        if vl >= len(v.spec.dims) or tl >= len(t.spec.dims):
            raise StratalignError(f"the recorded layer choice for {cfg.dataset} / {cfg.vision} / {cfg.text} names "
                                  f"layers {vl},{tl} but the entries have {len(v.spec.dims)} and {len(t.spec.dims)}; "
                                  f"record it again: stratalign layers --dataset {cfg.dataset} --vision {cfg.vision} "
                                  f"--text {cfg.text} --choose best")
        return vl, tl, str(rule)
    if rule.kind == "last":
        return len(v.spec.dims) - 1, len(t.spec.dims) - 1, str(rule)
    return v.resolve_layer(rule.vision), t.resolve_layer(rule.text), str(rule)


def _check_choices(cfg: RunConfig, ds: PairDataset) -> None:
    if cfg.preset is not None:
        check_preset_name(cfg.preset)
    select = dict(cfg.options).get("select", cfg.select)
    if select is not None:
        check_select(select)
        if select == "zeroshot" and not ds.class_names:
            raise StratalignError(f"--select zeroshot needs class labels, and dataset {ds.name!r} has none: use "
                                  "--select rsum (retrieval) or clip_loss")
    objective_named(cfg.objective).check_head(cfg.head)
    taken = [k for k, _ in cfg.options if k in RUN_FLAGS]
    if taken:
        raise StratalignError("; ".join(f"--set {k}=... : use {RUN_FLAGS[k]}" for k in taken)
                              + " (the run sets these itself, not through --set)")


def check_option_types(options: tuple[tuple[str, Any], ...]) -> None:
    """Each --set value has the type of the TrainConfig default it overrides (a number for a number, a mapping
    for a mapping, ...); negative numbers are refused (no trainer setting is negative). One line naming it."""
    defaults = {f.name: (f.default if f.default is not MISSING else f.default_factory())  # type: ignore[misc]
                for f in fields(TrainConfig) if f.default is not MISSING or f.default_factory is not MISSING}
    for key, value in options:
        default = defaults.get(key)
        if default is None:
            continue
        kinds: tuple[type, ...] = ((bool,) if isinstance(default, bool) else (int,) if isinstance(default, int)
                                   else (int, float) if isinstance(default, float) else (type(default),)
                                   if isinstance(default, (str, dict)) else (list, tuple)
                                   if isinstance(default, (list, tuple)) else ())
        wrong_bool = isinstance(value, bool) and bool not in kinds
        if kinds and (wrong_bool or not isinstance(value, kinds)):
            raise StratalignError(f"--set {key}={value!r}: expected {' or '.join(k.__name__ for k in kinds)} "
                                  f"(like the default {default!r})")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not value >= 0:
            raise StratalignError(f"--set {key}={value!r}: must be >= 0")


def read_ids_file(path: str) -> list[str]:
    """The ids listed one per line in a text file; a missing, binary or undecodable file is one line."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise StratalignError(f"cannot read --ids file {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise StratalignError(f"--ids file {path} is not UTF-8 text (one id a line)") from None
    if "\x00" in text:
        raise StratalignError(f"--ids file {path} is binary, not text (one id a line)")
    return text.splitlines()


def run_preset(cfg: RunConfig) -> str | None:
    """The name of the preset in force (auto resolved on this machine), or None without one."""
    return None if cfg.preset is None else choose_preset(cfg.preset, dict(cfg.options)).name


def preset_notes(cfgs: Sequence[RunConfig]) -> list[str]:
    """One line per trainer schedule in force among the runs, what `train_runs` prints before training (from
    Python as from the CLI): 'preset cpu (no CUDA): batch 256, 600 steps, warm-up 100, patience 40, eval every 10'
    with the --set options every one of them sets; for preset None, TrainConfig's own schedule."""
    groups: dict[str | None, list[RunConfig]] = {}
    for cfg in cfgs:
        groups.setdefault(cfg.preset, []).append(cfg)
    lines = []
    for name, group in groups.items():
        common = tuple((k, v) for k, v in group[0].options
                       if all(k in dict(c.options) and dict(c.options)[k] == v for c in group[1:]))
        if name is None:  # TrainConfig's defaults are the paper preset's schedule
            lines.append("no preset (preset=None): TrainConfig's own schedule, docs/method.md published one: "
                         + describe(choose_preset("paper"), common).split(": ", 1)[1])
        else:
            lines.append(describe(choose_preset(name, dict(common)), common))
    return lines


def _train_settings(cfg: RunConfig, preset: str | None) -> dict[str, Any]:
    """The run's TrainConfig as JSON (the objective as its registry entry records it): TrainConfig's defaults,
    under the preset's schedule, under the --set overrides."""
    known = {f.name for f in fields(TrainConfig)}
    bad = [k for k, _ in cfg.options if k not in known]
    if bad:
        raise StratalignError(f"unknown training option(s) {bad}; known: {sorted(known)}")
    check_option_types(cfg.options)
    settings = dict(cfg.options) if preset is None else apply_preset(choose_preset(preset), dict(cfg.options))
    if cfg.select is not None and objective_named(cfg.objective).selection is Selection.VALIDATION:
        settings.setdefault("select", cfg.select)
    train_cfg = TrainConfig(objective=objective_named(cfg.objective).recorded_objective, head=cfg.head,
                            seed=cfg.seed, **settings)
    return _jsonable(train_cfg.to_dict())


def resolve_run(store: FeatureStore, cfg: RunConfig) -> ResolvedRun:
    """The fully resolved run (entries, layer indices, subset, trainer settings) and its run id."""
    ds = store.dataset(cfg.dataset)
    _check_choices(cfg, ds)
    preset = run_preset(cfg)
    ds.require_train_split("train a run")
    v, t = run_entries(store, cfg)
    vl, tl, rule = _layer_pair(store, cfg, v, t)
    source = validation_source(ds, cfg.validation)
    if cfg.fold is not None and source != KFOLD:
        raise StratalignError(f"fold={cfg.fold} names a fold of k-fold cross-validation, and this run validates on "
                              f"{source} pairs: give validation='kfold', or no fold")
    pool, val = validation_pairs(ds, source, cfg.val_fraction, cfg.seed)
    (pool, pool_dropped), (val, val_dropped) = drop_bad_pairs(pool, v, t), drop_bad_pairs(val, v, t)
    if cfg.ids_file:
        ids = read_ids_file(cfg.ids_file)
        subset = subset_from_ids(ds, pool, ids, cfg.ids_kind)
        ids_sha = hashlib.sha256("\n".join(sorted(i.strip() for i in ids)).encode()).hexdigest()[:16]
    else:
        subset = draw_subset(pool, cfg.n_pairs, cfg.seed)
        ids_sha = None
    n_pairs = cfg.n_pairs if cfg.n_pairs is not None else len(subset)
    train = _train_settings(cfg, preset)
    if source == KFOLD:
        source, subset, val = _kfold_pairs(ds, cfg, subset, train)
    run = ResolvedRun(
        dataset=cfg.dataset, dataset_fingerprint=ds.fingerprint, vision=cfg.vision, text=cfg.text,
        vision_entry=v.key, text_entry=t.key, vision_layer=vl, text_layer=tl, layer_rule=rule,
        vision_layer_name=v.spec.layer_names[vl], text_layer_name=t.spec.layer_names[tl],
        head=cfg.head, objective=cfg.objective, seed=cfg.seed,
        n_pairs=n_pairs, n_train=len(subset), n_val=len(val), val_fraction=cfg.val_fraction, ids_sha=ids_sha,
        ids_kind=cfg.ids_kind, train=train, bad_pairs_dropped=pool_dropped + val_dropped, validation=source,
        folds=cfg.folds if source in (KFOLD, REFIT) else 0, fold=cfg.fold if source == KFOLD else None,
        preset=preset, subset=subset, val=val, inputs=RunInputs(ds, v, t))
    return replace(run, run_id=_run_id(store, run.identity(), preset))


def _run_id(store: FeatureStore, identity: dict[str, Any], preset: str | None) -> str:
    """The run's id (store.keys.run_id_of; the hash is the same in both forms). A run the store already holds keeps
    the id it was recorded under: a form-1 id written before form 2 existed stays valid and a sweep run again finds
    the run done instead of training it twice. A new run gets form 2, which names the layer rule (chosen, last,
    v9t4), unless it has no preset: a run requested as every run before presets existed (Python's preset=None;
    the CLI always names one) is named as those runs were, form 1, so that the same request gives the same id in
    every store (tests/store/test_feature_store_old.py rebuilds the 3d4de15 store and finds its very ids)."""
    registry = RunRegistry(store)
    forms = [run_id_of(identity, form) for form in (1, 2)]
    recorded = [rid for rid in forms if registry.holds(rid)]
    if recorded:
        return recorded[0]
    return forms[0] if preset is None else forms[1]


def _kfold_pairs(ds: PairDataset, cfg: RunConfig, pairs: PairRows,
                 train: dict[str, Any]) -> tuple[str, PairRows, PairRows]:
    """(source, training pairs, validation pairs) of a k-fold run over its drawn training pairs `pairs`: fold f
    held out (KFOLD), or the refit (REFIT: every pair trains; fold 0's pairs, which it trains on too, are its
    curve's monitor). A refit of an objective that picks a step needs that step (`stop_step`) chosen over the
    folds first: on its own it would pick its checkpoint on pairs it trained on."""
    if cfg.fold is not None:
        return KFOLD, *fold_split(ds, pairs, cfg.folds, cfg.fold, cfg.seed)
    if train.get("stop_step") is None and objective_named(cfg.objective).selection is not Selection.CLOSED_FORM:
        raise StratalignError(
            f"validation kfold without a fold is the refit on every training pair, and it needs the step chosen "
            f"over the {cfg.folds} folds: train it with stages.runs.cells.choose_cells or tune_run (`stratalign "
            "train` and `sweep` do), or give fold=, or validation='carve' (dataset "
            f"{ds.name!r} has {len(ds.pairs('val')[0])} val pairs)")
    _, monitor = fold_split(ds, pairs, cfg.folds, 0, cfg.seed)
    return REFIT, pairs, monitor


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj
