"""The validation yardsticks of model selection (docs/method.md § 3.8): retrieval rsum, zero-shot top-1, CLIP loss.

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
import torch.nn.functional as F

from stratalign.core import losses as losses_mod
from stratalign.core.metric_registry import select_metrics
from stratalign.errors import StratalignError

# selection metric -> (the curve's key, True when higher is better): the registry's (core.metric_registry)
SELECT_METRICS: dict[str, tuple[str, bool]] = select_metrics()
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


Embed = Callable[[str, torch.Tensor], torch.Tensor]  # (modality, rows) -> embeddings, for one model state
# (modality, rows (n, d_in)) -> the (S, n, d) embeddings of S model states (the runs of a batched group)
EmbedMany = Callable[[str, torch.Tensor], torch.Tensor]
_SIMS_BUDGET = 2**25  # similarity entries scored at once (runs are taken in chunks that fit)


def _first_hit_ranks(z_img: torch.Tensor, z_txt: torch.Tensor, owner: torch.Tensor,
                     max_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, Ni) and (S, Nt) 0-based ranks of the first correct caption of each image and of the image of each
    caption, capped at max_k, for S runs' normalised embeddings: exact cosine ranking, ties by the lower index
    (as core.scoring.retrieval_ranks, which ranks one run)."""
    sims = z_img @ z_txt.mT  # (S, Ni, Nt)
    n_img, n_txt = sims.shape[1], sims.shape[2]
    img_idx = torch.arange(n_img, device=sims.device).view(1, -1, 1)
    txt_idx = torch.arange(n_txt, device=sims.device).view(1, 1, -1)
    own = owner.view(1, 1, -1)
    true_t = sims.gather(1, own.expand(sims.shape[0], 1, n_txt))  # each caption's score with its image
    t2i = ((sims > true_t) | ((sims == true_t) & (img_idx < own))).sum(1)
    best, at = sims.masked_fill(own != img_idx, float("-inf")).max(-1, keepdim=True)  # each image's best caption
    i2t = ((sims > best) | ((sims == best) & (txt_idx < at))).sum(-1)
    return i2t.clamp(max=max_k), t2i.clamp(max=max_k)


class Validator:
    """Scores model states on the validation pairs: {"rsum", "clip_loss", "zs_top1" (with labels)} per state.

    `score_many` scores the S runs of a batched group in one pass (stacked embeddings, one batched similarity
    per run chunk); `score` is its one-state case."""

    def __init__(self, vi: torch.Tensor, vt: torch.Tensor, targets: ValidationTargets, tau: float,
                 batch_size: int) -> None:
        targets.check(len(vi))
        self.vi, self.vt, self.targets, self.tau, self.batch = vi, vt, targets, tau, batch_size
        self.first, self.txt_to_img = gallery_of(targets.image_ids)
        self.first_t = torch.from_numpy(self.first).to(vi.device)
        self.owner = torch.from_numpy(self.txt_to_img.astype(np.int64)).to(vi.device)
        if targets.has_zeroshot:
            p = targets.prompts
            self.prompt_shape = p.shape[:2]
            self.prompt_rows = torch.from_numpy(np.ascontiguousarray(p.reshape(-1, p.shape[-1]), dtype=np.float32)
                                                ).to(vi.device)
            self.labels = torch.from_numpy(np.asarray(targets.labels)[self.first].astype(np.int64)).to(vi.device)

    @torch.no_grad()
    def _embed_pairs(self, embed: EmbedMany) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(S, rows, d) image and text embeddings of the validation pairs in fixed chunks of min(batch, n_val)."""
        b = min(self.batch, len(self.vi))
        starts = range(0, len(self.vi), b)
        return ([embed("image", self.vi[s:s + b]) for s in starts], [embed("text", self.vt[s:s + b]) for s in starts])

    def _clip_of(self, zi: list[torch.Tensor], zt: list[torch.Tensor]) -> torch.Tensor:
        """(S,) validation CLIP losses: the size-weighted mean over the chunks (a last chunk of one row is left out)."""
        total, count = torch.zeros(zi[0].shape[0], dtype=torch.float64), 0
        for a, t in zip(zi, zt):
            if a.shape[1] < 2:
                continue
            total += losses_mod.clip_loss(a, t, self.tau).double().cpu() * a.shape[1]
            count += a.shape[1]
        return total / count

    def _zero_shot(self, z_img: torch.Tensor, embed: EmbedMany) -> torch.Tensor:
        """(S,) zero-shot top-1 in % of the gallery images against the class prompts (ties: lower class)."""
        z_p = F.normalize(embed("text", self.prompt_rows).float(), dim=-1)
        classes = F.normalize(z_p.view(z_p.shape[0], *self.prompt_shape, -1).mean(2), dim=-1)  # (S, C, d)
        s = z_img @ classes.mT
        true = s.gather(2, self.labels.view(1, -1, 1).expand(s.shape[0], -1, 1))
        cols = torch.arange(s.shape[2], device=s.device).view(1, 1, -1)
        rank = ((s > true) | ((s == true) & (cols < self.labels.view(1, -1, 1)))).sum(-1)
        return 100.0 * (rank < 1).double().mean(-1).cpu()

    @torch.no_grad()
    def score_many(self, embed: EmbedMany) -> list[dict[str, float]]:
        """Every yardstick of each of S model states (the pairs embedded once for all of them)."""
        zi, zt = self._embed_pairs(embed)
        clip = self._clip_of(zi, zt)
        z_img = F.normalize(torch.cat(zi, 1).float()[:, self.first_t], dim=-1)
        z_txt = F.normalize(torch.cat(zt, 1).float(), dim=-1)
        n_runs = z_img.shape[0]
        finite = (torch.isfinite(z_img).flatten(1).all(1) & torch.isfinite(z_txt).flatten(1).all(1)).cpu()
        rsum = torch.full((n_runs,), float("nan"), dtype=torch.float64)
        step = max(1, _SIMS_BUDGET // max(1, z_img.shape[1] * z_txt.shape[1]))
        for a in range(0, n_runs, step):
            i2t, t2i = _first_hit_ranks(z_img[a:a + step], z_txt[a:a + step], self.owner, max(RECALL_KS))
            got = sum(100.0 * (r < k).double().mean(-1) for r in (i2t, t2i) for k in RECALL_KS)
            rsum[a:a + step] = got.cpu()
        zs = self._zero_shot(z_img, embed) if self.targets.has_zeroshot else None
        out = []
        for s in range(n_runs):
            row = {"clip_loss": float(clip[s]), "rsum": float(rsum[s]) if finite[s] else float("nan")}
            if zs is not None:
                row["zs_top1"] = float(zs[s]) if finite[s] else float("nan")
            out.append(row)
        return out

    def score(self, embed: Embed) -> dict[str, float]:
        """Every yardstick of one model state."""
        return self.score_many(lambda m, x: embed(m, x).unsqueeze(0))[0]
