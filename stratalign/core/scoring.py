"""Evaluation metrics of a learned space (docs/method.md § 4): retrieval, zero-shot, linear probe, alignment.

All take numpy arrays or torch tensors and return plain floats in percent (alignment_score: a fraction),
so results can go straight into JSON and tables.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stratalign.core.knn import as_matrix, l2_normalize, search, to_numpy
from stratalign.core.similarity import mutual_knn
from stratalign.errors import StratalignError, preview


def _labels(y: Any, n: int, name: str, n_classes: int | None = None) -> np.ndarray:
    arr = to_numpy(y, name)
    if arr.ndim != 1 or len(arr) != n:
        raise StratalignError(f"{name} must be a 1-D array of {n} entries, got shape {arr.shape}")
    if n_classes is None:
        return arr
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise StratalignError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
    bad = np.flatnonzero((arr < 0) | (arr >= n_classes))
    if len(bad):
        raise StratalignError(f"{name} out of range 0..{n_classes - 1} at {preview(bad.tolist())} "
                              f"(values {preview(arr[bad].tolist())})")
    return arr.astype(np.int64)


def retrieval_ranks(img_emb: Any, txt_emb: Any, txt_to_img: Any, max_k: int = 10,
                    *, device: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """(rank of the first correct caption of each image, rank of the image of each caption), 0-based.

    A rank is only resolved up to max_k: queries with no hit among the max_k best get max_k (so `rank < k`
    is the R@k hit for every k <= max_k). Cosine similarity, exact ranking, ties by the lower index.
    """
    img = as_matrix(img_emb, "image embeddings")
    txt = as_matrix(txt_emb, "text embeddings")
    if img.shape[1] != txt.shape[1]:
        raise StratalignError(f"image embeddings have {img.shape[1]} dims but text embeddings {txt.shape[1]}")
    owner = _labels(txt_to_img, len(txt), "txt_to_img", n_classes=len(img))
    orphans = np.setdiff1d(np.arange(len(img)), owner)
    if len(orphans):
        raise StratalignError(f"{len(orphans)} gallery image(s) have no caption: rows {preview(orphans.tolist())}")
    if max_k < 1:
        raise StratalignError(f"recall ks must be positive integers, got max k {max_k}")
    img, txt = l2_normalize(img), l2_normalize(txt)
    kt = min(max_k, len(txt))  # image -> text: rank of the first correct caption
    _, top_t = search(txt, img, kt, normalize=False, device=device)
    correct = owner[top_t] == np.arange(len(img))[:, None]  # (N_i, kt)
    first_i2t = np.where(correct.any(1), correct.argmax(1), max_k)
    ki = min(max_k, len(img))
    _, top_i = search(img, txt, ki, normalize=False, device=device)
    correct = top_i == owner[:, None]
    first_t2i = np.where(correct.any(1), correct.argmax(1), max_k)
    # a k at least the gallery size ranks the whole gallery: every query is a hit within it
    return first_i2t.astype(np.int64), first_t2i.astype(np.int64)


def retrieval_hits(img_emb: Any, txt_emb: Any, txt_to_img: Any, ks: Sequence[int] = (1, 5, 10),
                   *, device: str = "auto") -> dict[str, np.ndarray]:
    """Per-query R@k hits: `i2t_R@k` a bool per gallery image, `t2i_R@k` a bool per caption."""
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise StratalignError(f"recall ks must be positive integers, got {ks}")
    first_i2t, first_t2i = retrieval_ranks(img_emb, txt_emb, txt_to_img, ks[-1], device=device)
    out = {f"i2t_R@{k}": first_i2t < k for k in ks}
    out.update({f"t2i_R@{k}": first_t2i < k for k in ks})
    return out


def retrieval_recall(img_emb: Any, txt_emb: Any, txt_to_img: Any, ks: Sequence[int] = (1, 5, 10),
                     *, device: str = "auto") -> dict[str, float]:
    """Image<->text recall@k in % over a gallery of unique images and all their captions.

    img_emb (N_i, d), txt_emb (N_t, d), txt_to_img (N_t,) the image row of each caption. An image is an
    i2t hit at k if ANY of its captions is among the k best captions; a caption is a t2i hit if its image
    is among the k best images. Cosine similarity; exact ranking, ties by the lower index. A k at least
    the gallery size ranks the whole gallery (every query a hit).
    """
    return recall_of(retrieval_hits(img_emb, txt_emb, txt_to_img, ks, device=device))


def recall_of(hits: dict[str, np.ndarray]) -> dict[str, float]:
    """Per-query hits -> the metric in % (their mean x 100)."""
    return {k: float(100.0 * np.mean(v)) for k, v in hits.items()}


def class_embeddings(template_emb: Any) -> np.ndarray:
    """(C, T, d) prompt embeddings -> (C, d): each normalised, averaged over templates, renormalised."""
    arr = to_numpy(template_emb, "template embeddings")
    if arr.ndim == 2:
        arr = arr[:, None, :]
    if arr.ndim != 3 or 0 in arr.shape:
        raise StratalignError(f"template embeddings must be (classes, templates, dims), got shape {arr.shape}")
    flat = as_matrix(arr.reshape(-1, arr.shape[-1]), "template embeddings")
    mean = l2_normalize(flat).reshape(arr.shape).mean(axis=1)
    return l2_normalize(mean)


def zero_shot_ranks(img_emb: Any, class_emb: Any, labels: Any) -> np.ndarray:
    """Rank of each image's true class among all classes by cosine (0 = predicted; ties: lower class index)."""
    img = l2_normalize(as_matrix(img_emb, "image embeddings"))
    cls = l2_normalize(as_matrix(class_emb, "class embeddings"))
    if img.shape[1] != cls.shape[1]:
        raise StratalignError(f"image embeddings have {img.shape[1]} dims but class embeddings {cls.shape[1]}")
    y = _labels(labels, len(img), "labels", n_classes=len(cls))
    s = img @ cls.T
    true = s[np.arange(len(y)), y][:, None]
    cols = np.arange(len(cls))[None, :]
    return ((s > true) | ((s == true) & (cols < y[:, None]))).sum(1)


def zero_shot_classify(img_emb: Any, class_emb: Any, labels: Any) -> dict[str, float]:
    """Zero-shot accuracy in %: top1, top5 (only with >= 5 classes) and balanced_acc (mean per-class recall
    over the classes present in labels). An image's class is the argmax cosine (ties: lower class index)."""
    rank = zero_shot_ranks(img_emb, class_emb, labels)
    n_cls = len(as_matrix(class_emb, "class embeddings"))
    y = _labels(labels, len(rank), "labels", n_classes=n_cls)
    out = {"top1": float(100.0 * np.mean(rank < 1))}
    if n_cls >= 5:
        out["top5"] = float(100.0 * np.mean(rank < 5))
    present = np.unique(y)
    out["balanced_acc"] = float(100.0 * np.mean([np.mean(rank[y == c] < 1) for c in present]))
    return out


def linear_probe(train_x: Any, train_y: Any, test_x: Any, test_y: Any, seed: int = 0,
                 max_iter: int = 1000) -> dict[str, float]:
    """Logistic regression on standardised features (fit on train only); acc, balanced_acc, f1_weighted and
    f1_macro on test, in %. Labels may be any hashable values (strings, ints)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score
    from sklearn.preprocessing import StandardScaler

    xtr = as_matrix(train_x, "train features")
    xte = as_matrix(test_x, "test features")
    if xtr.shape[1] != xte.shape[1]:
        raise StratalignError(f"train features have {xtr.shape[1]} dims but test features {xte.shape[1]}")
    ytr = _labels(train_y, len(xtr), "train labels")
    yte = _labels(test_y, len(xte), "test labels")
    for name, y in (("train labels", ytr), ("test labels", yte)):
        if any(v is None for v in y.tolist()):
            raise StratalignError(f"{name} contain None at rows {preview([i for i, v in enumerate(y) if v is None])}")
    if len(np.unique(ytr)) < 2:
        raise StratalignError(f"linear probe needs at least 2 classes in the train labels, got {np.unique(ytr).tolist()}")
    scaler = StandardScaler().fit(xtr)
    clf = LogisticRegression(max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter and classes absent from one side
        clf.fit(scaler.transform(xtr), ytr)
        pred = clf.predict(scaler.transform(xte))
        return {
            "acc": float(100.0 * accuracy_score(yte, pred)),
            "balanced_acc": float(100.0 * balanced_accuracy_score(yte, pred)),
            "f1_weighted": float(100.0 * f1_score(yte, pred, average="weighted", zero_division=0)),
            "f1_macro": float(100.0 * f1_score(yte, pred, average="macro", zero_division=0)),
        }


def alignment_score(z_img: Any, z_txt: Any, k: int | str = "rice", *, device: str = "auto") -> float:
    """mutual_knn between paired rows of the learned image and text spaces (a fraction in [0, 1])."""
    return mutual_knn(z_img, z_txt, k, device=device)


@dataclass(frozen=True)
class Space:
    """A test split in a learned space, what a registry metric with a `space_score` is computed from
    (core.metric_registry): gallery image embeddings, caption embeddings, each caption's gallery index."""

    z_img: np.ndarray
    z_txt: np.ndarray
    txt_to_img: np.ndarray


def alignment_of_space(space: Space) -> float | None:
    """`alignment_mknn`: mutual-kNN alignment (in %) of each gallery image with its first caption; None on a
    gallery of 10 images or fewer (too few neighbours to mean anything)."""
    if len(space.z_img) <= 10:
        return None
    first_caption = np.unique(space.txt_to_img, return_index=True)[1]  # one caption per image: repeated image
    return 100.0 * alignment_score(space.z_img, space.z_txt[first_caption], k="rice")  # rows would be neighbours
