"""Training settings and results: `TrainConfig` (everything one run needs, JSON-able) and `TrainResult`.

Objective and head names are checked against the objective registry (stratalign.core.objectives).
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from stratalign.core import losses
from stratalign.core.heads import CSA_SIMILARITIES
from stratalign.core.objectives import HEADS, OBJECTIVES, Selection, Training, objective_named, settings_objective
from stratalign.device import PRECISIONS, resolve_precision
from stratalign.errors import StratalignError
from stratalign.train.validation import check_select

if TYPE_CHECKING:
    from stratalign.train.cohorts import CohortCheckpoint

# The fields of the first recorded settings (every run id before the first knob was added hashes exactly these).
# Frozen history, never edited: a field added since must say, where it is declared, what its absence meant
# (`knob(..., absent=...)`), or importing this module fails; so a new knob cannot silently change old run ids.
FIRST_RECORDED = frozenset((
    "objective", "head", "head_options", "dim", "lr", "betas", "weight_decay", "batch_size", "max_steps", "patience",
    "eval_every", "tau", "lam", "warmup_steps", "warmup_fraction", "levels", "weighting", "centering", "js", "knn_k",
    "beta", "vib_scale", "vib_symmetric", "comm_dim", "comm_out", "comm_heads", "comm_tau", "aug_drop", "aug_noise",
    "csa_ridge", "csa_refine_steps", "csa_refine_lr", "seed", "device", "amp"))


def knob(default: Any = None, *, unread: Any = MISSING, absent: Any = MISSING) -> Any:
    """A TrainConfig field declaring what keeps run ids stable for it.

    unread: the knob's default is its objective's (core.objectives: Objective.defaults); left None it resolves
    to that, or, for an objective without one, to `unread`, the value every older run recorded (so runs of the
    objectives that do not read it keep their settings, and their ids, byte for byte).
    absent: the knob was added after runs were recorded; it is left out of the recorded settings while it holds
    this value (older run ids stay valid) and a record that lacks it reads as this value (an older run means what
    it meant)."""
    meta = {k: v for k, v in (("unread", unread), ("absent", absent)) if v is not MISSING}
    return field(default=default, metadata=meta)
# The candidate checkpoints (docs/method.md § 3.8). "all": every evaluation step, for every objective (since 2026-12-06).
# "after_warmup": the rule of older runs, no candidate before the warm-up ends (and an extra evaluation at its end).
# Only runs with a warm-up differ between the two, so only they record it; a record without it is an older run.
CANDIDATES = ("all", "after_warmup")
UNPAIRED_SOURCES = ("dataset", "pool")  # where a run's unpaired rows come from (docs/method.md § 3.11)
LEGACY_CANDIDATES = "after_warmup"


@dataclass
class TrainConfig:
    """Everything one training run needs; JSON-able (`asdict`) and rebuilt by `TrainConfig(**d)`.

    warm-up: `warmup_fraction` (of max_steps), when set, wins over `warmup_steps`. The warm-up only
    applies to the structure objectives (the lambda of 3.2 step 5). `patience` and `eval_every` are
    in optimiser steps; patience only counts from the first candidate checkpoint.
    The knobs that default to None (beta, vib_scale, csa_*, comm_dim, comm_final_norm) take the objective's default
    when the config is made (see `knob`); `to_dict` / `from_dict` are the recorded form (run ids hash it): a
    knob added after runs were recorded is left out at the value its absence means, and numbers are canonical
    (an integer given for a float field is recorded as that float).
    csa_k: canonical directions kept (0: every one, capped by dim); csa_similarity: weighted | cosine.
    select: the validation metric that picks the restored checkpoint (docs/method.md § 3.8): rsum (the default of the
    objectives selected on retrieval) | zeroshot | clip_loss; CoMM selects on its own loss, CSA has nothing to
    select (both record clip_loss, the value every older run meant).
    candidates: which evaluation steps may be restored: "all" (every objective alike) or "after_warmup" (the
    rule older runs were trained under; see CANDIDATES). stop_step: train to this step of the max_steps schedule
    and restore it (the step one choice per cell took for all its seeds; None: the run's own best step).
    asif_k, asif_power, asif_center: ASIF's top-k, power, and cosines after centring (docs/method.md § 3.10).
    mixup_alpha: FuseMix latent mixup on the batches of any aligned-heads objective (0: off; clip+fusemix: 1).
    unpaired: unpaired rows of each modality added to each R_S batch (docs/method.md § 3.11; 0: none;
    clip+structure+unpaired: 256); unpaired_from: where they come from, `dataset` (its train split's images
    without captions and captions without images) or `pool` (those, plus the train pool's pairs outside the
    subset taken apart: the measurement of § 3.11). Read by the stage that gathers a run's rows; with 0 unpaired
    rows the source means nothing and is recorded as `dataset`.
    precision: fp32 | bf16 | auto (docs/method.md § 3.7): bf16 runs the heads' matmuls under bf16 autocast (losses stay
    float32); auto is resolved when the config is made (bf16 where the device has it), so the recorded value, and
    the run id, say what ran. Part of the run id only when not fp32. `amp` is the older CUDA-only switch: on a
    GPU, amp=True autocasts in bf16 whatever `precision` says.
    """

    objective: str = "clip"
    head: str = "linear"
    head_options: dict[str, Any] = field(default_factory=dict)
    dim: int = 512
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 1e-4
    batch_size: int = 4096
    max_steps: int = 3000
    patience: int = 300
    eval_every: int = 10
    tau: float = 0.05
    lam: float = 10.0
    warmup_steps: int = 1000
    warmup_fraction: float | None = None
    levels: int = 1
    weighting: str = "none"
    centering: str = "mean"
    js: str = "reference"
    knn_k: int = 10
    beta: float | None = knob(unread=0.01)
    vib_scale: float | None = knob(unread=1.0)
    vib_symmetric: bool = False
    # CoMM's fusion width: the objective's default (core.objectives.COMM_DIM); 512, every older run's, for the others
    comm_dim: int | None = knob(unread=512)
    comm_out: int = 256
    comm_heads: int = 8
    comm_tau: float = 0.1
    aug_drop: float = 0.1
    aug_noise: float = 0.1
    comm_final_norm: bool | None = knob(unread=False, absent=False)
    csa_ridge: float | None = knob(unread=1e-3)
    csa_k: int | None = knob(unread=0, absent=0)
    csa_similarity: str | None = knob(unread="cosine", absent="cosine")
    csa_refine_steps: int = 0
    csa_refine_lr: float = 1e-4
    # runs recorded before 2026-11-25 chose their checkpoint by the validation CLIP loss
    select: str | None = knob(unread="clip_loss", absent="clip_loss")
    candidates: str = knob("all", absent=LEGACY_CANDIDATES)
    stop_step: int | None = knob(None, absent=None)
    # 2026-12-06: 0 / False = not used (mixup off), the meaning of every older run
    asif_k: int | None = knob(unread=0, absent=0)
    asif_power: float | None = knob(unread=0.0, absent=0.0)
    asif_center: bool | None = knob(unread=False, absent=False)
    mixup_alpha: float | None = knob(unread=0.0, absent=0.0)
    # 2026-12-06: 0 unpaired rows, and no source for them, is what every older run meant
    unpaired: int | None = knob(unread=0, absent=0)
    unpaired_from: str | None = knob(unread="dataset", absent="dataset")
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    precision: str = knob("fp32", absent="fp32")  # every older run trained its heads in float32

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        self.head_options = dict(self.head_options or {})
        objective_named(self.objective)  # unknown -> one error listing the registry
        if self.head not in HEADS:
            raise StratalignError(f"unknown head {self.head!r}; known: {', '.join(HEADS)}")
        self._resolve_objective_defaults()
        for name in FLOAT_FIELDS:  # canonical: lam=30 and lam=30.0 are one setting, recorded (and hashed) as 30.0
            v = getattr(self, name)
            if isinstance(v, int) and not isinstance(v, bool):
                setattr(self, name, float(v))
        for name in ("dim", "batch_size", "max_steps", "patience", "eval_every", "levels"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise StratalignError(f"TrainConfig.{name} must be a positive integer, not {v!r}")
        for name in ("warmup_steps", "knn_k", "csa_refine_steps", "csa_k", "asif_k", "unpaired"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise StratalignError(f"TrainConfig.{name} must be an integer >= 0, not {v!r}")
        for name in ("lr", "tau", "comm_tau"):
            if not getattr(self, name) > 0:
                raise StratalignError(f"TrainConfig.{name} must be > 0, not {getattr(self, name)!r}")
        for name in ("lam", "beta", "weight_decay", "csa_ridge", "vib_scale", "asif_power", "mixup_alpha"):
            if not getattr(self, name) >= 0:
                raise StratalignError(f"TrainConfig.{name} must be >= 0, not {getattr(self, name)!r}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise StratalignError(f"TrainConfig.betas must be two numbers in [0, 1), not {self.betas!r}")
        if self.warmup_fraction is not None and not 0 <= self.warmup_fraction <= 1:
            raise StratalignError(f"TrainConfig.warmup_fraction must be in [0, 1], not {self.warmup_fraction}")
        if self.weighting not in losses.WEIGHTINGS:
            raise StratalignError(f"TrainConfig.weighting must be one of {losses.WEIGHTINGS}, not {self.weighting!r}")
        if self.centering not in losses.CENTERINGS:
            raise StratalignError(f"TrainConfig.centering must be one of {losses.CENTERINGS}, not {self.centering!r}")
        if self.js not in losses.JS_FORMS:
            raise StratalignError(f"TrainConfig.js must be one of {losses.JS_FORMS}, not {self.js!r}")
        if self.csa_similarity not in CSA_SIMILARITIES:
            raise StratalignError(f"TrainConfig.csa_similarity must be one of {CSA_SIMILARITIES}, not {self.csa_similarity!r}")
        check_select(self.select)
        settings = settings_objective(self.objective, self.head)  # csa records objective 'clip' with its own head
        if self.select != UNREAD_VALUES["select"] and settings.selection is not Selection.VALIDATION:
            raise StratalignError(f"objective {settings.name} does not select on a validation metric (CoMM: its own "
                                  f"loss, CSA: nothing to select); drop select={self.select}")
        self._check_baselines(settings)
        self._check_unpaired(settings)
        if not isinstance(self.comm_final_norm, bool):
            raise StratalignError(f"TrainConfig.comm_final_norm must be true or false, not {self.comm_final_norm!r}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise StratalignError(f"TrainConfig.device must be auto, cpu or cuda[:n], not {self.device!r}")
        if self.candidates not in CANDIDATES:
            raise StratalignError(f"TrainConfig.candidates must be one of {CANDIDATES}, not {self.candidates!r}")
        if self.resolved_warmup() == 0:
            self.candidates = "all"  # without a warm-up the two rules are one rule (and nothing is recorded)
        if self.stop_step is not None and (not isinstance(self.stop_step, int) or isinstance(self.stop_step, bool)
                                           or not 0 <= self.stop_step <= self.max_steps):
            raise StratalignError(f"TrainConfig.stop_step must be an integer in [0, max_steps={self.max_steps}], "
                                  f"not {self.stop_step!r}")
        if self.precision not in PRECISIONS:
            raise StratalignError(f"TrainConfig.precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.precision == "auto":
            self.precision = resolve_precision("auto", _device_of(self.device))
        if self.resolved_warmup() > self.max_steps:
            raise StratalignError(
                f"warm-up of {self.resolved_warmup()} steps exceeds max_steps={self.max_steps}: the regulariser would "
                "never reach its full weight; lower warmup_steps or use warmup_fraction")

    def _check_baselines(self, settings: Any) -> None:
        """ASIF needs k >= 1 and p > 0; mixup needs a gradient loop over batch rows (not CoMM, a closed form, or
        the kNN form of R_S, whose neighbour graphs index the unmixed rows)."""
        self.mixup_alpha = float(self.mixup_alpha)  # type: ignore[arg-type]
        self.asif_power = float(self.asif_power)  # type: ignore[arg-type]
        if not isinstance(self.asif_center, bool):
            raise StratalignError(f"TrainConfig.asif_center must be true or false, not {self.asif_center!r}")
        if settings.name == "asif" and not (self.asif_k >= 1 and self.asif_power > 0):
            raise StratalignError(f"asif needs asif_k >= 1 and asif_power > 0, not {self.asif_k} and {self.asif_power}")
        if self.mixup_alpha > 0 and (settings.training is not Training.GRADIENT or settings.knn_graphs):
            raise StratalignError(f"mixup_alpha (FuseMix) mixes the batches of aligned heads; objective {settings.name} "
                                  "has none to mix: drop mixup_alpha")

    def _check_unpaired(self, settings: Any) -> None:
        """Unpaired rows feed R_S only (docs/method.md § 3.11): an objective must read the knob; without unpaired
        rows their source is recorded as the default (one setting, one run id)."""
        if self.unpaired_from not in UNPAIRED_SOURCES:
            raise StratalignError(f"TrainConfig.unpaired_from must be one of {UNPAIRED_SOURCES}, not "
                                  f"{self.unpaired_from!r}")
        if self.unpaired and "unpaired" not in settings.knobs:
            users = [o for o in OBJECTIVES if "unpaired" in objective_named(o).knobs]
            raise StratalignError(f"unpaired={self.unpaired}: objective {settings.name} has no regulariser for unpaired "
                                  f"rows; use {' / '.join(users)}, or drop unpaired")
        if not self.unpaired:
            self.unpaired_from = UNREAD_VALUES["unpaired_from"]

    def _resolve_objective_defaults(self) -> None:
        """Fill the knobs left None: the objective's default, else the value older runs recorded."""
        given = {k: getattr(self, k) for k in UNREAD_VALUES if getattr(self, k) is not None}
        defaults = settings_objective(self.objective, self.head).knob_defaults(given)
        for name, unread in UNREAD_VALUES.items():
            if getattr(self, name) is None:
                setattr(self, name, defaults.get(name, unread))

    def to_dict(self) -> dict[str, Any]:
        """The recorded settings (JSON-able; run ids hash them): every field, except a knob added later
        while it holds the value that older runs meant by its absence."""
        out = asdict(self)
        for name, legacy in ADDED_KNOBS.items():
            if out[name] == legacy and type(out[name]) is type(legacy):
                del out[name]
        if self.resolved_warmup() == 0:  # without a warm-up both candidate rules are one rule: nothing to record
            out.pop("candidates", None)
        return out

    def selection_floor(self) -> int:
        """The first step that may be restored: 0 (every run alike), or the warm-up's end under the older rule."""
        return self.resolved_warmup() if self.candidates == LEGACY_CANDIDATES else 0

    def autocast_bf16(self, dev: torch.device) -> bool:
        """Whether the heads' matmuls run under bf16 autocast on `dev`: precision bf16 (checked against the
        hardware: a one-line error where it lacks bf16), or the older amp switch on CUDA."""
        if self.precision == "bf16":
            resolve_precision("bf16", dev)
            return True
        return bool(self.amp and dev.type == "cuda")

    def resolved_warmup(self) -> int:
        """Warm-up length in optimiser steps (0 for objectives without a lambda warm-up)."""
        if not objective_named(self.objective).warmup:
            return 0
        if self.warmup_fraction is not None:
            return int(round(self.warmup_fraction * self.max_steps))
        return int(self.warmup_steps)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """The config of recorded settings (`to_dict`): a missing added knob reads as its legacy value."""
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise StratalignError(f"unknown training option(s) {bad}; known: {sorted(known)}")
        return cls(**{**ADDED_KNOBS, **d})


def _declared(key: str) -> dict[str, Any]:
    return {f.name: f.metadata[key] for f in fields(TrainConfig) if key in f.metadata}


# knob -> the value an objective without a default of its own gives it (declared with `knob(unread=...)`)
UNREAD_VALUES: dict[str, Any] = _declared("unread")
# knob added after runs were recorded -> the value its absence means (declared with `knob(absent=...)`)
ADDED_KNOBS: dict[str, Any] = _declared("absent")
# number fields: an integer given for one is recorded as the float it stands for
FLOAT_FIELDS = tuple(f.name for f in fields(TrainConfig) if f.type in ("float", "float | None"))


def check_recorded_fields(cls: type = TrainConfig) -> None:
    """Every field of the settings class is one of the first recorded settings or declares what its absence
    meant (checked when this module is imported: a knob added without it fails at once, not in old run ids)."""
    undeclared = [f.name for f in fields(cls) if f.name not in FIRST_RECORDED and "absent" not in f.metadata]
    if undeclared:
        raise TypeError(f"{cls.__name__} fields {undeclared} were added after runs were recorded: declare the value "
                        "their absence meant with knob(..., absent=...), or every older run id changes")


check_recorded_fields()


def _device_of(device: str) -> torch.device:
    """The device a config's `device` names (auto: CUDA when present), without touching the allocator."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device.split(":")[0])


@dataclass
class TrainResult:
    """A finished run: the restored model and how it was chosen.

    history: one dict per optimiser step {"step", "lr", "lambda", "loss", "clip", "reg"} (+ "val_clip",
    "val_rsum", "val_zs_top1" on evaluated steps; step 0 holds only the initial values). Row s holds the lr and
    lambda of the update that produced step s. For comm, "clip" is the CoMM loss and "val_clip" the validation
    CoMM loss. val_curve: one row per evaluation step {"step", "rsum", "zs_top1" (with labels), "clip_loss"
    (comm: "comm_loss"), "lambda"}; best_value is the selection metric's value at best_step.
    lambda_at_best: the lambda of the last update before best_step (history's "lambda" there; 0 at step 0).
    """

    model: nn.Module
    config: TrainConfig
    best_step: int
    lambda_at_best: float
    best_val_clip: float
    warmup_steps: int
    steps_taken: int
    stopped_reason: str  # max_steps | early_stopping | non_finite
    message: str
    restored_before_warmup: bool
    history: list[dict[str, Any]]
    seconds: float
    device: str
    selection_metric: str = "clip_loss"
    best_value: float = float("nan")  # of the selection metric at best_step
    val_curve: list[dict[str, float]] = field(default_factory=list)
    first_candidate: int | None = None  # the first step that could be restored (None: warmup_steps, the old rule)
    share_seconds: float | None = None  # a stacked run's share of the stack's wall time (None: trained alone)
    checkpoint: CohortCheckpoint | None = None  # its weights at its cohort's best step (train.cohorts), not saved

    @property
    def restored_step(self) -> int:
        return self.best_step

    def summary(self) -> dict[str, Any]:
        """JSON-able facts for metrics.json (validation curve and selection, not the per-step history)."""
        selection = {"metric": self.selection_metric, "step": self.best_step, "value": json_float(self.best_value),
                     "first_candidate": self.warmup_steps if self.first_candidate is None else self.first_candidate,
                     "restored_before_warmup": self.restored_before_warmup,
                     "lambda": self.lambda_at_best}
        curve = [json_curve_row(row) for row in self.val_curve]
        return {"selection": selection, "best_step": self.best_step, "lambda_at_best": self.lambda_at_best,
                "best_val_clip": self.best_val_clip, "warmup_steps": self.warmup_steps,
                "steps_taken": self.steps_taken, "stopped_reason": self.stopped_reason,
                "message": self.message, "restored_before_warmup": self.restored_before_warmup,
                "train_device": self.device, "val_curve": curve,
                **({} if self.share_seconds is None else {"train_share_seconds": round(self.share_seconds, 3)})}


def json_curve_row(row: dict[str, float]) -> dict[str, float | int | None]:
    """One validation-curve row for metrics.json: the step an int, the values JSON floats."""
    return {k: int(v) if k == "step" else json_float(v) for k, v in row.items()}


def json_float(v: float) -> float | None:
    """A float for JSON (NaN and inf are not JSON: None)."""
    v = float(v)
    return v if v == v and abs(v) != float("inf") else None
