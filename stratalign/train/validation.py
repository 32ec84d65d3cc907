"""The validation yardsticks of model selection (METHOD.md 3.6): retrieval rsum, zero-shot top-1, CLIP loss.

At every evaluation step the trainer scores the heads on the whole validation split: `rsum` (R@1 + R@5 + R@10,
image->text and text->image, over the gallery of unique validation images and all their captions), zero-shot
top-1 when the validation images have labels and class prompts are given, and the CLIP loss of the pairs.
`select` names the one that picks the restored checkpoint; the others are recorded beside it (the run's
validation curve), so a trade-off between retrieval and zero-shot along training stays visible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from stratalign.core import losses as L
from stratalign.core import scoring as E
from stratalign.errors import StratalignError

# selection metric -> (the curve's key, True when higher is better)
SELECT_METRICS: dict[str, tuple[str, bool]] = {"rsum": ("rsum", True), "zeroshot": ("zs_top1", True),
                                               "clip_loss": ("clip_loss", False)}
RECALL_KS = (1, 5, 10)


def check_select(select: str) -> str:
    """The selection metric's name, or a one-line error listing them."""
    if select not in SELECT_METRICS:
        raise StratalignError(f"select must be one of {', '.join(SELECT_METRICS)}, not {select!r}")
    return select


@dataclass(frozen=True)
class ValidationTargets:
    """What the validation pairs need beyond their features for rsum and zero-shot.

    image_ids: per validation pair, an id of its image (pairs with one id share one gallery image);
    labels: per validation pair, its image's class index (None: no zero-shot);
    prompts: (classes, templates, text dims) prompt features at the text layer (None: no zero-shot).
    """

    image_ids: np.ndarray
    labels: np.ndarray | None = None
    prompts: np.ndarray | None = None

    @classmethod
    def pairs_only(cls, n: int) -> ValidationTargets:
        """Every validation pair its own image, no labels: rsum and the CLIP loss only."""
        return cls(np.arange(n))

    @property
    def has_zeroshot(self) -> bool:
        return self.labels is not None and self.prompts is not None

    def check(self, n_val: int) -> None:
        if len(self.image_ids) != n_val:
            raise StratalignError(f"validation targets name {len(self.image_ids)} pairs but there are {n_val}")
        if self.labels is not None and len(self.labels) != n_val:
            raise StratalignError(f"validation labels name {len(self.labels)} pairs but there are {n_val}")
        if self.prompts is not None and self.prompts.ndim != 3:
            raise StratalignError(f"validation prompts must be (classes, templates, dims), not {self.prompts.shape}")


def gallery_of(image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the first pair of each unique image, each pair's gallery index): the retrieval gallery of the pairs."""
    _, first, inverse = np.unique(image_ids, return_index=True, return_inverse=True)
    return first, inverse.reshape(-1)


def rsum_of(ranks_i2t: np.ndarray, ranks_t2i: np.ndarray) -> float:
    """R@1 + R@5 + R@10 (in %) of both directions from 0-based first-hit ranks (0..600)."""
    return float(sum(100.0 * np.mean(r < k) for r in (ranks_i2t, ranks_t2i) for k in RECALL_KS))


Embed = Callable[[str, torch.Tensor], torch.Tensor]  # (modality, rows) -> embeddings, for one model state


class Validator:
    """Scores one model state on the validation pairs: {"rsum", "clip_loss", "zs_top1" (with labels)}."""

    def __init__(self, vi: torch.Tensor, vt: torch.Tensor, targets: ValidationTargets, tau: float,
                 batch_size: int) -> None:
        targets.check(len(vi))
        self.vi, self.vt, self.targets, self.tau, self.batch = vi, vt, targets, tau, batch_size
        self.first, self.txt_to_img = gallery_of(targets.image_ids)
        if targets.has_zeroshot:
            p = targets.prompts
            self.prompt_shape = p.shape[:2]
            self.prompt_rows = torch.from_numpy(np.ascontiguousarray(p.reshape(-1, p.shape[-1]), dtype=np.float32)
                                                ).to(vi.device)
            self.labels = np.asarray(targets.labels)[self.first].astype(np.int64)

    @torch.no_grad()
    def _embed_pairs(self, embed: Embed) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Image and text embeddings of the validation pairs in fixed chunks of min(batch, n_val) rows."""
        b = min(self.batch, len(self.vi))
        starts = range(0, len(self.vi), b)
        return ([embed("image", self.vi[s:s + b]) for s in starts], [embed("text", self.vt[s:s + b]) for s in starts])

    def clip_loss(self, embed: Embed) -> float:
        """Validation CLIP loss: the size-weighted mean over the chunks (a last chunk of one row is left out)."""
        return self._clip_of(*self._embed_pairs(embed))

    def _clip_of(self, zi: list[torch.Tensor], zt: list[torch.Tensor]) -> float:
        total, count = 0.0, 0
        for a, t in zip(zi, zt):
            if len(a) < 2:
                continue
            total += float(L.clip_loss(a, t, self.tau)) * len(a)
            count += len(a)
        return total / count

    @torch.no_grad()
    def score(self, embed: Embed) -> dict[str, float]:
        """Every yardstick of the current model state (the pairs embedded once for all of them)."""
        zi, zt = self._embed_pairs(embed)
        out = {"clip_loss": self._clip_of(zi, zt)}
        z_img = torch.cat(zi)[torch.from_numpy(self.first).to(zi[0].device)].float().cpu().numpy()
        z_txt = torch.cat(zt).float().cpu().numpy()
        if np.isfinite(z_img).all() and np.isfinite(z_txt).all():
            r_i2t, r_t2i = E.retrieval_ranks(z_img, z_txt, self.txt_to_img, max(RECALL_KS), device="cpu")
            out["rsum"] = rsum_of(r_i2t, r_t2i)
            if self.targets.has_zeroshot:
                z_p = embed("text", self.prompt_rows).float().cpu().numpy().reshape(*self.prompt_shape, -1)
                rank = E.zero_shot_ranks(z_img, E.class_embeddings(z_p), self.labels)
                out["zs_top1"] = float(100.0 * np.mean(rank < 1))
        else:
            out["rsum"] = float("nan")
            if self.targets.has_zeroshot:
                out["zs_top1"] = float("nan")
        return out
