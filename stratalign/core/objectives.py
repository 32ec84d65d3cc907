"""The objective registry: one declaration per training objective (docs/method.md §§ 3.1-3.5).

Each `Objective` says what it adds to the CLIP loss (its regulariser and weight), which TrainConfig knobs
it reads, which heads it trains, whether its lambda warms up, how it is trained (gradient loop, CoMM loop
or closed form), how it is evaluated (retrieval + zero-shot, or a linear probe) and what selects its
checkpoint. The trainer, run resolution, evaluation and sweeps read this table instead of naming
objectives, so a new objective is one entry here.

Regularisers are pure functions of a `StepBatch` (the batch inputs and their embeddings) and the training
config (read by attribute: this module does not import the trainer).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable

import numpy as np
import torch

from stratalign.core import losses
from stratalign.core.baselines import ASIF_CENTER, ASIF_K, ASIF_POWER, fit_asif, fit_procrustes
from stratalign.core.heads import CSA_K, CSA_RIDGE, VIB_SCALE, AlignedHeads
from stratalign.core.losses_lean import structure_regularizer_given
from stratalign.core.mixup import FUSEMIX_ALPHA
from stratalign.errors import StratalignError


class Training(Enum):
    """How a model is fitted."""

    GRADIENT = "gradient"  # aligned heads, the shared optimisation loop (docs/method.md § 3.8)
    COMM = "comm"  # the CoMM fusion model in the same loop (docs/method.md § 3.5)
    CLOSED_FORM = "closed_form"  # CSA (canonical correlation, then an optional R_S refinement), Procrustes, ASIF


class Evaluation(Enum):
    """How a trained model is scored on the test split (docs/method.md § 4)."""

    RETRIEVAL = "retrieval"  # retrieval R@k, zero-shot classification, mutual-kNN alignment
    PROBE = "probe"  # linear probe on labels of the fused output (needs the training features)

    @property
    def needs_train_features(self) -> bool:
        """Whether scoring fits something on the run's training features (a probe)."""
        return self is Evaluation.PROBE


class Selection(Enum):
    """What picks the restored checkpoint."""

    VALIDATION = "validation"  # the best validation value of the run's `select` metric (rsum by default;
    # docs/method.md § 3.8), among the checkpoints after the warm-up, if any
    VAL_COMM = "val_comm"  # lowest validation CoMM loss (a fused model has no retrieval space to rank)
    CLOSED_FORM = "closed_form"  # nothing to select: the fit is the model


# docs/method.md § 3.8: objectives selected on validation pick their checkpoint by retrieval rsum unless told otherwise
SELECT_DEFAULT = "rsum"


@dataclass(frozen=True)
class KnnSupport:
    """What the kNN form of R_S (docs/method.md § 3.3) needs beyond the batch: the head, every training input and
    the (n, k) neighbour graph over them, indexed by the batch's training rows."""

    head: Callable[[torch.Tensor], torch.Tensor]
    table: torch.Tensor
    graph: torch.Tensor


@dataclass(frozen=True)
class Side:
    """One modality of a training batch: inputs x, embeddings z (sampled for VIB, with mu and logvar). `frozen`:
    (tau, centering) -> R_S's frozen-side affinities P_X, P_X + 1e-12 of the stacked batches, where the trainer
    has them cheaper than from x (the lean step of bf16 runs: train.frozen_side). `unit`: z's rows have norm 1 in
    float32 already (the lean step's heads), R_S does not normalise them again."""

    x: torch.Tensor
    z: torch.Tensor
    mu: torch.Tensor | None = None
    logvar: torch.Tensor | None = None
    knn: KnnSupport | None = None
    frozen: Callable[[float, str], tuple[torch.Tensor, torch.Tensor]] | None = None
    unit: bool = False


@dataclass(frozen=True)
class StepBatch:
    """A training batch: its rows (positions among the training pairs) and both sides."""

    rows: torch.Tensor
    image: Side
    text: Side


Regulariser = Callable[[StepBatch, Any], torch.Tensor]
# a closed-form fit: (training image rows, training text rows, TrainConfig) -> the model
ClosedForm = Callable[[np.ndarray, np.ndarray, Any], AlignedHeads]

STRUCTURE_KNOBS = ("lam", "warmup_steps", "warmup_fraction", "levels", "weighting", "centering", "js")


def structure_options(cfg: Any) -> dict[str, Any]:
    """The R_S settings of a training config (docs/method.md § 3.2)."""
    return {"tau": cfg.tau, "levels": cfg.levels, "weighting": cfg.weighting, "centering": cfg.centering,
            "js": cfg.js}


def _structure_side(side: Side, opts: dict[str, Any]) -> torch.Tensor:
    """R_S of one side over the batch: from the given frozen affinities at level 1 when the trainer has them."""
    if side.frozen is not None and opts["levels"] == 1 and side.z.ndim == 3:
        p_x, px_e = side.frozen(opts["tau"], opts["centering"])
        return structure_regularizer_given(p_x, px_e, side.z, tau=opts["tau"], centering=opts["centering"],
                                           js=opts["js"], unit=side.unit)
    return losses.structure_regularizer(side.x, side.z, **opts)


def structure_term(batch: StepBatch, cfg: Any) -> torch.Tensor:
    """R_S over the batch (docs/method.md § 3.2), averaged over both sides."""
    opts = structure_options(cfg)
    return 0.5 * (_structure_side(batch.image, opts) + _structure_side(batch.text, opts))


def _knn_side(side: Side, rows: torch.Tensor, opts: dict[str, Any]) -> torch.Tensor:
    """R_S of one side over the batch plus each row's frozen-space neighbours (docs/method.md § 3.3)."""
    assert side.knn is not None
    nbr = side.knn.graph[rows]  # (b, k)
    mask = ~torch.isin(nbr, rows)  # neighbours already in the batch are in the support once
    if not bool(mask.any()):  # e.g. full-batch training: the support is the batch (3.3 == 3.2)
        return losses.structure_regularizer(side.x, side.z, **opts)
    # the head runs once on each distinct neighbour outside the batch; the rest are masked, so their
    # table index (0) is never read
    picked = nbr[mask]
    outside = picked.unique()  # sorted, so searchsorted finds each row's table index
    index = torch.zeros_like(nbr)
    index[mask] = torch.searchsorted(outside, picked)
    x_tab = side.knn.table[outside]
    z_tab = side.knn.head(x_tab).to(side.z.dtype)
    return losses.structure_regularizer_knn(side.x, side.z, x_tab, z_tab, mask, nbr_index=index, **opts)


def _structure_knn(batch: StepBatch, cfg: Any) -> torch.Tensor:
    """R_S with kNN-extended supports, averaged over both sides."""
    opts = structure_options(cfg)
    return 0.5 * (_knn_side(batch.image, batch.rows, opts) + _knn_side(batch.text, batch.rows, opts))


def _ib(batch: StepBatch, cfg: Any) -> torch.Tensor:
    return losses.ib_deterministic(batch.image.z, batch.text.z)


def _vib(batch: StepBatch, cfg: Any) -> torch.Tensor:
    i, t = batch.image, batch.text
    return losses.vib_kl(i.mu, i.logvar, t.mu, t.logvar, symmetric=cfg.vib_symmetric)


def _procrustes(x_img: np.ndarray, x_txt: np.ndarray, cfg: Any) -> AlignedHeads:
    return AlignedHeads(*fit_procrustes(x_img, x_txt, dim=cfg.dim))


def _asif(x_img: np.ndarray, x_txt: np.ndarray, cfg: Any) -> AlignedHeads:
    return AlignedHeads(*fit_asif(x_img, x_txt, topk=cfg.asif_k, power=cfg.asif_power, center=cfg.asif_center))


@dataclass(frozen=True)
class Objective:
    """One training objective.

    regulariser: added to the CLIP loss as `weight * reg` (None: plain CLIP; for csa, the loss of the
    optional refinement); weight_knob names the TrainConfig field holding the weight, ramped by docs/method.md § 3.2's
    warm-up when `warmup` is set.
    knobs: the objective-specific TrainConfig fields it reads. heads: the head kinds it trains (the
    first when it brings its own). variational: heads output (mu, logvar) and embeddings are sampled.
    knn_graphs: it needs the frozen-space kNN graphs of the training rows. train_objective: the
    objective its recorded TrainConfig names (csa runs have always recorded 'clip'; run ids hash it).
    defaults: (knob, value) defaults of this objective for the TrainConfig knobs that default to None
    (train.config.UNREAD_VALUES); variants: ((knob, value), defaults) pairs that override them when a
    knob takes that value (e.g. csa_similarity=cosine brings STRUCTURE's CSA baseline settings).
    grid: (knob, values) the docs/method.md § 3.9 tuning tries, as data (the default among them).
    batched: the regulariser is vectorised over the runs of a batched group (else the trainer calls it run by run on
    one run's 2-D batch, so a new objective's regulariser written for one run needs nothing more).
    fit: a closed-form objective's fit on the training pairs (None for csa, whose fit and refinement the trainer
    does as it always has).
    control: an objective the reports also compare this one with, cell by cell (clip+structure+unpaired against
    clip+structure: the same cell without the unpaired rows).
    """

    name: str
    summary: str
    heads: tuple[str, ...]
    training: Training
    evaluation: Evaluation
    selection: Selection
    regulariser: Regulariser | None = None
    weight_knob: str | None = None
    knobs: tuple[str, ...] = ()
    warmup: bool = False
    variational: bool = False
    knn_graphs: bool = False
    train_objective: str | None = None
    defaults: tuple[tuple[str, Any], ...] = ()
    variants: tuple[tuple[tuple[str, Any], tuple[tuple[str, Any], ...]], ...] = ()
    grid: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    batched: bool = False  # the regulariser takes the stacked batches of many runs ((S, b, d) sides), returns (S,)
    fit: ClosedForm | None = None
    control: str | None = None  # the objective it is also compared with: the same cell without what it adds

    def knob_defaults(self, given: dict[str, Any]) -> dict[str, Any]:
        """This objective's knob defaults, given the knobs set explicitly (those win): the defaults, then
        the variants whose knob value (given or default) matches."""
        out = dict(self.defaults)
        if self.selection is Selection.VALIDATION:
            out.setdefault("select", SELECT_DEFAULT)
        for (knob, value), extra in self.variants:
            if given.get(knob, out.get(knob)) == value:
                out.update(extra)
        return {**out, **given}

    @property
    def recorded_objective(self) -> str:
        """The objective name written into the run's training settings."""
        return self.train_objective or self.name

    @property
    def own_head(self) -> str | None:
        """The one head kind this objective comes with, if it allows only one."""
        return self.heads[0] if len(self.heads) == 1 else None

    def weight(self, cfg: Any, lam_now: float) -> float:
        """The regulariser's weight at a step: the warmed-up lambda, else the weight knob's value."""
        return lam_now if self.warmup else getattr(cfg, self.weight_knob or "")

    def samples_embeddings(self, cfg: Any) -> bool:
        """Whether a run of this objective trains variational heads (mu, logvar) on sampled embeddings: a
        variational objective with its weight at 0 has no bottleneck to sample for, so it trains plain heads on
        plain embeddings - CLIP exactly (docs/method.md § 3.8, the zero-weight invariant)."""
        return self.variational and bool(getattr(cfg, self.weight_knob or "", 1.0))

    def check_head(self, head: str) -> None:
        """Refuse a head kind this objective does not train, naming the ones it does."""
        check_head_kind(head)
        if head not in self.heads:
            owners = [o.name for o in REGISTRY if head in o.heads]
            raise StratalignError(f"objective {self.name} trains {' | '.join(self.heads)} heads, not {head!r} "
                                  f"({head} heads are trained by: {', '.join(owners)})")


TRAINED_HEADS = ("linear", "mlp", "residual")
# Defaults and grids chosen on the Twemoji pairs (DINOv2-S layer 11 x MiniLM layer 6, all 1,219 training pairs,
# seeds 0-2, the demo's CPU trainer settings), by the mean rsum on each run's carved validation pairs, the
# selection metric of docs/method.md § 3.8. IB: beta 0.01 and 0.1 change nothing measurable (mean positive cosine 0.22),
# beta 3 had the best validation rsum (277 vs CLIP's 265) and moves the positive cosine to 0.66. VIB (s = 0.05):
# validation rsum rises with beta (271, 280, 286 at 0.1, 1, 3). The best value sits at the grids' upper edge,
# so the beta grid reaches 10.
IB_BETA = 3.0
VIB_BETA = 3.0
STRUCTURE_GRID = (("lam", (1.0, 3.0, 10.0, 30.0)),)
BETA_GRID = (("beta", (0.3, 1.0, 3.0, 10.0)),)
CSA_GRID = (("csa_k", (32, 64, 128, 256)), ("csa_ridge", (0.1, 0.3, 1.0, 3.0)))
# ASIF (centred): validation chose p = 4 at n = 500 and all, 2 at n = 200 from (4, 8, 16) extended down (the demo's
# pairs, 5 seeds, 2026-12-06), so the grid starts at 2 (the published 8 stays in it)
ASIF_GRID = (("asif_power", (2.0, 4.0, 8.0)),)
FUSEMIX_GRID = (("mixup_alpha", (0.3, 1.0, 3.0)),)  # FuseMix's published alpha 1 in the middle
# docs/method.md § 3.11: unpaired rows of each modality added to an R_S batch (the CPU preset's paired batch)
UNPAIRED_ROWS = 256
# CoMM's fusion width d (docs/method.md § 3.5; the method leaves it free): 512, as every CoMM run before. A CoMM step
# costs ~37 d^2 multiply-adds a view-row: d = 128 ran ~13x a linear-head step on 2 CPU cores against ~40x at 512,
# but probed worse on the Twemoji pairs (79.1 % at 128, one seed, against 80.7-85.4 % at 512 over 5 seeds; frozen
# concat 87.0 %, benchmarks/comm.py, 2026-12-06): `--set comm_dim=128` for the cheaper model.
COMM_DIM = 512

# docs/method.md § 3.9: a choice on the edge of a knob's grid extends the grid one step past it: (factor, lowest, highest).
# x3 for a weight, as the grids are spaced; CSA's k doubles (it is capped by the pairs and dims anyway).
EDGE_RULES: dict[str, tuple[float, float, float]] = {"lam": (3.0, 0.01, 3000.0), "beta": (3.0, 0.003, 300.0),
                                                      "csa_ridge": (3.0, 0.001, 100.0), "csa_k": (2, 4, 1024),
                                                      # ASIF's power halves / doubles (validation chose 4, the lower
                                                      # edge, at every n on the demo's pairs); mixup alpha x3
                                                      "asif_power": (2.0, 1.0, 64.0), "mixup_alpha": (3.0, 0.03, 30.0)}

REGISTRY: tuple[Objective, ...] = (
    Objective("clip", "symmetric InfoNCE (docs/method.md § 3.1)", TRAINED_HEADS, Training.GRADIENT, Evaluation.RETRIEVAL,
              Selection.VALIDATION),
    Objective("clip+structure", "CLIP + lambda * R_S over the batch (docs/method.md § 3.2)", TRAINED_HEADS,
              Training.GRADIENT, Evaluation.RETRIEVAL, Selection.VALIDATION, regulariser=structure_term,
              weight_knob="lam", knobs=STRUCTURE_KNOBS, warmup=True, grid=STRUCTURE_GRID, batched=True),
    Objective("clip+structure+unpaired", "CLIP on the pairs + lambda * R_S over batches that add unpaired rows of "
              "each modality (docs/method.md § 3.11)", TRAINED_HEADS, Training.GRADIENT, Evaluation.RETRIEVAL,
              Selection.VALIDATION, regulariser=structure_term, weight_knob="lam",
              knobs=STRUCTURE_KNOBS + ("unpaired", "unpaired_from"), warmup=True,
              defaults=(("unpaired", UNPAIRED_ROWS),), grid=STRUCTURE_GRID, batched=True, control="clip+structure"),
    Objective("clip+structure-knn", "CLIP + lambda * R_S over kNN-extended supports (docs/method.md § 3.3)", TRAINED_HEADS,
              Training.GRADIENT, Evaluation.RETRIEVAL, Selection.VALIDATION, regulariser=_structure_knn,
              weight_knob="lam", knobs=STRUCTURE_KNOBS + ("knn_k",), warmup=True, knn_graphs=True,
              grid=STRUCTURE_GRID),
    Objective("clip+ib", "CLIP + beta * deterministic IB term (docs/method.md § 3.4)", TRAINED_HEADS, Training.GRADIENT,
              Evaluation.RETRIEVAL, Selection.VALIDATION, regulariser=_ib, weight_knob="beta", knobs=("beta",),
              defaults=(("beta", IB_BETA),), grid=BETA_GRID, batched=True),
    Objective("clip+vib", "CLIP on sampled embeddings + beta * KL (docs/method.md § 3.4)", TRAINED_HEADS, Training.GRADIENT,
              Evaluation.RETRIEVAL, Selection.VALIDATION, regulariser=_vib, weight_knob="beta",
              knobs=("beta", "vib_scale", "vib_symmetric"), variational=True,
              defaults=(("beta", VIB_BETA), ("vib_scale", VIB_SCALE)), grid=BETA_GRID, batched=True),
    Objective("comm", "CoMM fusion model (docs/method.md § 3.5)", TRAINED_HEADS, Training.COMM, Evaluation.PROBE,
              Selection.VAL_COMM, knobs=("comm_dim", "comm_out", "comm_heads", "comm_tau", "aug_drop", "aug_noise",
                                         "comm_final_norm"),
              defaults=(("comm_final_norm", True), ("comm_dim", COMM_DIM))),
    Objective("csa", "closed-form CSA: top-k canonical directions, correlation-weighted similarity, optional "
              "R_S refinement (docs/method.md § 3)", ("csa",), Training.CLOSED_FORM, Evaluation.RETRIEVAL, Selection.CLOSED_FORM,
              regulariser=structure_term, weight_knob="lam",
              knobs=("csa_similarity", "csa_k", "csa_ridge", "csa_refine_steps", "csa_refine_lr", "lam", "levels",
                     "weighting", "centering", "js"),
              train_objective="clip",
              defaults=(("csa_similarity", "weighted"), ("csa_k", CSA_K), ("csa_ridge", CSA_RIDGE)),
              variants=((("csa_similarity", "cosine"), (("csa_k", 0), ("csa_ridge", 1e-3))),),
              grid=CSA_GRID),
    Objective("clip+fusemix", "CLIP on latent-mixup pairs: one m ~ Beta(alpha, alpha) and one permutation shared "
              "by both modalities (FuseMix, METHOD 3.9)", TRAINED_HEADS, Training.GRADIENT, Evaluation.RETRIEVAL,
              Selection.VALIDATION, knobs=("mixup_alpha",), defaults=(("mixup_alpha", FUSEMIX_ALPHA),), grid=FUSEMIX_GRID),
    Objective("procrustes", "closed form: PCA of each side to the smaller width, orthogonal Procrustes (METHOD 3.9)",
              ("procrustes",), Training.CLOSED_FORM, Evaluation.RETRIEVAL, Selection.CLOSED_FORM, fit=_procrustes),
    Objective("asif", "training-free ASIF: cosines to the training pairs as anchors, top-k, power p, normalised "
              "(METHOD 3.9)", ("asif",), Training.CLOSED_FORM, Evaluation.RETRIEVAL, Selection.CLOSED_FORM,
              knobs=("asif_k", "asif_power", "asif_center"),
              defaults=(("asif_k", ASIF_K), ("asif_power", ASIF_POWER), ("asif_center", ASIF_CENTER)),
              grid=ASIF_GRID, fit=_asif),
)

OBJECTIVES: tuple[str, ...] = tuple(o.name for o in REGISTRY)
HEADS: tuple[str, ...] = tuple(dict.fromkeys(h for o in REGISTRY for h in o.heads))
# heads only a closed-form fit produces (no gradient loop builds them)
CLOSED_FORM_HEADS: tuple[str, ...] = tuple(
    h for h in HEADS if all(o.training is Training.CLOSED_FORM for o in REGISTRY if h in o.heads))
_BY_NAME = {o.name: o for o in REGISTRY}


def objective_named(name: str) -> Objective:
    """The registry entry of an objective, or one error listing every known name."""
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):
        raise StratalignError(f"unknown objective {name!r}; known: {', '.join(OBJECTIVES)}") from None


def settings_objective(objective: str, head: str) -> Objective:
    """The entry whose knobs a TrainConfig of (objective, head) follows: the objective that brings its own
    `head` and records `objective` in its settings (csa records 'clip'), else the objective named."""
    for o in REGISTRY:
        if o.own_head == head and o.recorded_objective == objective:
            return o
    return objective_named(objective)


def objectives_with(**attrs: Any) -> tuple[str, ...]:
    """Names of the objectives whose attributes have the given values (e.g. knn_graphs=True)."""
    return tuple(o.name for o in REGISTRY if all(getattr(o, k) == v for k, v in attrs.items()))


def check_head_kind(head: str) -> None:
    """Refuse a head kind no objective trains, listing the known ones."""
    if head not in HEADS:
        raise StratalignError(f"unknown head {head!r}; known: {', '.join(HEADS)}")
