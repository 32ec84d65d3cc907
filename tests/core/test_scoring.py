"""Evaluation metrics: retrieval against a brute-force loop, zero-shot on hand-worked cases, linear probe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stratalign.core import scoring, similarity
from stratalign.errors import StratalignError


def brute_recall(img: np.ndarray, txt: np.ndarray, owner: np.ndarray, ks=(1, 5, 10)) -> dict[str, float]:
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    s = img @ txt.T
    out = {}
    for k in ks:
        hits = 0
        for i in range(len(img)):
            best = sorted(range(len(txt)), key=lambda c: (-s[i, c], c))[:k]
            hits += any(owner[c] == i for c in best)
        out[f"i2t_R@{k}"] = 100.0 * hits / len(img)
    for k in ks:
        hits = 0
        for c in range(len(txt)):
            best = sorted(range(len(img)), key=lambda i: (-s[i, c], i))[:k]
            hits += owner[c] in best
        out[f"t2i_R@{k}"] = 100.0 * hits / len(txt)
    return out


def test_retrieval_matches_brute_force_with_several_captions() -> None:
    rng = np.random.default_rng(0)
    n_img, d = 40, 8
    img = rng.normal(size=(n_img, d))
    n_caps = rng.integers(1, 6, size=n_img)  # 1..5 captions per image
    owner = rng.permutation(np.repeat(np.arange(n_img), n_caps))
    txt = img[owner] + 1.2 * rng.normal(size=(len(owner), d))  # noisy captions of their image
    got = scoring.retrieval_recall(img, txt, owner)
    want = brute_recall(img, txt, owner)
    assert set(got) == {f"{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    assert 0 < got["t2i_R@1"] < got["t2i_R@5"] < 100  # a non-trivial case
    np.testing.assert_equal(scoring.retrieval_recall(torch.tensor(img), torch.tensor(txt), torch.tensor(owner)), got)


def test_retrieval_hand_case() -> None:
    img = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    txt = np.array([[0.9, 0.1], [0.1, 0.9], [0.2, 1.0], [1.0, 0.05]])
    owner = np.array([0, 1, 2, 2])  # image 2's captions both point away from it
    got = scoring.retrieval_recall(img, txt, owner, ks=(1, 2, 3))
    # i2t: image 0 -> caption 3 (image 2) then caption 0: hit at 2; image 1 -> caption 1: hit at 1;
    # image 2 ([-1, 0]) ranks captions 1, 2, 0, 3 by cosine: caption 2 is its own: hit at 2.
    assert got["i2t_R@1"] == pytest.approx(100 / 3)
    assert got["i2t_R@2"] == pytest.approx(100.0)
    # t2i: captions 0, 1 find their image first; caption 2 -> image 1 then 0 then 2; caption 3 -> image 0 ...
    assert got["t2i_R@1"] == pytest.approx(50.0)
    assert got["t2i_R@2"] == pytest.approx(50.0)
    assert got["t2i_R@3"] == pytest.approx(100.0)
    assert scoring.retrieval_recall(img, txt, owner, ks=(10,))["t2i_R@10"] == 100.0  # k beyond the gallery


def test_retrieval_errors() -> None:
    img, txt = np.eye(3), np.eye(3)
    with pytest.raises(StratalignError, match="no caption: rows 2"):
        scoring.retrieval_recall(img, txt, [0, 1, 1])
    with pytest.raises(StratalignError, match="txt_to_img out of range 0..2 at 1"):
        scoring.retrieval_recall(img, txt, [0, 7, 2])
    with pytest.raises(StratalignError, match="txt_to_img must be a 1-D array of 3"):
        scoring.retrieval_recall(img, txt, [0, 1])
    with pytest.raises(StratalignError, match="dims"):
        scoring.retrieval_recall(img, txt[:, :2], [0, 1, 2])
    bad = txt.copy()
    bad[1, 1] = np.nan
    with pytest.raises(StratalignError, match=r"text embeddings has NaN/inf in 1 row\(s\): 1"):
        scoring.retrieval_recall(img, bad, [0, 1, 2])


def test_class_embeddings() -> None:
    t = np.array([[[2.0, 0.0], [0.0, 5.0]], [[1.0, 1.0], [3.0, 3.0]]])  # (C=2, T=2, d=2)
    got = scoring.class_embeddings(t)
    np.testing.assert_allclose(got, [[np.sqrt(0.5), np.sqrt(0.5)], [np.sqrt(0.5), np.sqrt(0.5)]])
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0)
    with pytest.raises(StratalignError, match="classes, templates, dims"):
        scoring.class_embeddings(np.ones(3))


def test_zero_shot_hand_case() -> None:
    cls = np.eye(6)
    img = np.array([
        [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 0: top1 hit
        [0.9, 1.0, 0.0, 0.0, 0.0, 0.0],  # label 0: second -> top5 hit only
        [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],  # label 2: hit
        [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],  # label 3: ties at 0 with 0,1,2,4 (lower index first): rank 4 -> top5 hit
        [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],  # label 4: rank 5 (after 5, 0, 1, 2, 3) -> miss
    ])
    labels = np.array([0, 0, 2, 3, 4])
    got = scoring.zero_shot_classify(img, cls, labels)
    assert got["top1"] == pytest.approx(40.0)
    assert got["top5"] == pytest.approx(80.0)
    # per-class recall: class 0: 1/2, class 2: 1, class 3: 0, class 4: 0 -> 37.5
    assert got["balanced_acc"] == pytest.approx(37.5)
    few = scoring.zero_shot_classify(img[:, :3], np.eye(3), [0, 0, 2, 0, 1])
    assert "top5" not in few
    assert few["top1"] == pytest.approx(60.0)  # rows 3, 4 are zero vectors: all ties -> class 0 (row 3 right)


def test_zero_shot_errors() -> None:
    with pytest.raises(StratalignError, match="labels out of range 0..2 at 1"):
        scoring.zero_shot_classify(np.eye(3), np.eye(3), [0, 3, 1])
    with pytest.raises(StratalignError, match="integer class indices"):
        scoring.zero_shot_classify(np.eye(3), np.eye(3), ["a", "b", "c"])


def test_linear_probe() -> None:
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(3, 10)) * 3
    ytr = rng.integers(0, 3, 150)
    yte = rng.integers(0, 3, 60)
    xtr = centers[ytr] + rng.normal(size=(150, 10))
    xte = centers[yte] + rng.normal(size=(60, 10))
    names = np.array(["cat", "dog", "eel"], dtype=object)
    got = scoring.linear_probe(xtr, names[ytr], xte, names[yte])
    assert set(got) == {"acc", "balanced_acc", "f1_weighted", "f1_macro"}
    assert got["acc"] > 90 and got["f1_macro"] > 90
    assert scoring.linear_probe(xtr, ytr, xte, yte) == got  # deterministic, labels of any kind
    noise = scoring.linear_probe(rng.normal(size=(150, 10)), ytr, rng.normal(size=(60, 10)), yte)
    assert noise["acc"] < 70
    with pytest.raises(StratalignError, match="at least 2 classes"):
        scoring.linear_probe(xtr, np.zeros(150), xte, yte)
    with pytest.raises(StratalignError, match="train labels must be a 1-D array of 150"):
        scoring.linear_probe(xtr, ytr[:10], xte, yte)


def test_alignment_score() -> None:
    a = np.random.default_rng(2).normal(size=(100, 8))
    b = a + 0.5 * np.random.default_rng(3).normal(size=(100, 8))
    assert scoring.alignment_score(a, b, k=5) == similarity.mutual_knn(a, b, 5)
    assert scoring.alignment_score(a, a, k="rice") == 1.0
