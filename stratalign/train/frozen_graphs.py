"""Frozen-space kNN graphs of the training rows for the kNN form of R_S (docs/method.md § 3.3)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stratalign.errors import StratalignError


def knn_graph(x: torch.Tensor | np.ndarray, k: int) -> np.ndarray:
    """(n, k) int64 indices of each row's k nearest rows by cosine (self excluded, ties by lower index).

    Uses stratalign.core.knn.knn_indices when available, else a FAISS IndexFlatIP here."""
    arr = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, np.float32)
    k = int(min(k, len(arr) - 1))
    if k <= 0:
        return np.zeros((len(arr), 0), np.int64)
    try:
        from stratalign.core.knn import knn_indices  # type: ignore[import-not-found]
    except ImportError:
        knn_indices = None
    if knn_indices is not None:
        return np.asarray(knn_indices(arr, k), dtype=np.int64)
    import faiss

    a = np.ascontiguousarray(arr, dtype=np.float32)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    index = faiss.IndexFlatIP(a.shape[1])
    index.add(a)
    _, nn_idx = index.search(a, k + 1)
    out = np.empty((len(a), k), np.int64)
    for i, row in enumerate(nn_idx):
        row = row[row != i][:k]
        out[i] = row
    return out


def knn_graphs(x_img: np.ndarray, x_txt: np.ndarray, train_idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The frozen-space kNN graphs of docs/method.md § 3.3 over the training rows (positions within train_idx),
    exactly as `train_heads` would build them; compute once per subset and pass as `graphs=`."""
    rows = np.asarray(train_idx, dtype=np.int64)
    return (knn_graph(np.ascontiguousarray(x_img[rows], dtype=np.float32), k),
            knn_graph(np.ascontiguousarray(x_txt[rows], dtype=np.float32), k))


def check_graphs(graphs: Any, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Precomputed (image, text) graphs must be what `knn_graphs` gives for these n rows and this k."""
    if not isinstance(graphs, (tuple, list)) or len(graphs) != 2:
        raise StratalignError("graphs must be an (image graph, text graph) pair from knn_graphs")
    width = max(0, min(k, n - 1))
    out = []
    for name, g in zip(("image", "text"), graphs):
        g = np.asarray(g)
        if g.shape != (n, width) or (g.size and not np.issubdtype(g.dtype, np.integer)):
            raise StratalignError(f"precomputed {name} kNN graph has shape {g.shape} ({g.dtype}); expected "
                                  f"({n}, {width}) integers for {n} training rows and knn_k={k}")
        if g.size and (g.min() < 0 or g.max() >= n or (g == np.arange(n)[:, None]).any()):
            raise StratalignError(f"precomputed {name} kNN graph holds rows outside [0, {n}) or a row as its "
                                  "own neighbour: it was built for another subset")
        out.append(g.astype(np.int64))
    return out[0], out[1]


def training_graphs(graphs: Any, xi: torch.Tensor, xt: torch.Tensor, k: int,
                    dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The (image, text) graphs of the training tensors on the device: the given ones after checking
    them, else built here."""
    g_img, g_txt = (check_graphs(graphs, len(xi), k) if graphs is not None else (knn_graph(xi, k), knn_graph(xt, k)))
    return torch.from_numpy(g_img).to(dev), torch.from_numpy(g_txt).to(dev)
