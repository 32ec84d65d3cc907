"""Exact, deterministic k-nearest-neighbour search by inner product (docs/method.md § 2).

Rows are L2-normalised in float64 and searched as float32. FAISS finds candidates; scores it cannot order
reliably (gaps within its rounding bound, exact ties such as duplicate rows) are re-scored exactly
(float32 x float32 products are exact in float64) and ordered by (-score, lower index). So the neighbour
lists are those of the exact scores of the float32 rows with ties broken by the lower index, on CPU and
GPU alike, while the cost stays about one FAISS search.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from stratalign.errors import StratalignError, preview

K_RULES = ("rice", "sqrt", "sturges")
_EXTRA_CPU = 8  # candidates searched beyond k, so a tie run at the k-th place rarely leaves the list
_GPU_MAX_K = 2048  # FAISS GPU selection limit
_U32 = 2.0**-24  # float32 unit roundoff
_U_TF32 = 2.0**-11  # input rounding if cuBLAS runs the GEMM in TF32
_CHUNK = 1 << 20  # elements per float64 block when re-scoring (cache-sized)

_gpu_resources: Any = None


def to_numpy(x: Any, name: str = "array") -> np.ndarray:
    """A numpy view/copy of a numpy array, torch tensor or nested sequence (torch moved to CPU)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        x = x.numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as e:
        raise StratalignError(f"{name} cannot be read as an array: {e}") from None


def as_matrix(x: Any, name: str = "features", dtype: Any = np.float64) -> np.ndarray:
    """`x` as a finite 2-D float array; NaN/inf rows are named in the error."""
    arr = to_numpy(x, name)
    if arr.ndim != 2:
        raise StratalignError(f"{name} must be a 2-D (rows x dims) array, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise StratalignError(f"{name} is empty (shape {arr.shape})")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise StratalignError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    arr = np.asarray(arr, dtype=dtype)
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise StratalignError(f"{name} has NaN/inf in {len(rows)} row(s): {preview(rows.tolist())}")
    return arr


def resolve_k(k: int | str, n: int) -> int:
    """The neighbour count: an int, or a rule of n (rice = ceil(2 n^(1/3)), sqrt, sturges); 1 <= k < n."""
    if isinstance(k, str):
        rule = k.strip().lower()
        if rule.isdigit():
            kk = int(rule)
        elif rule == "rice":
            kk = max(1, math.ceil(2.0 * n ** (1.0 / 3.0)) - 2)  # then exactly: the least kk with kk^3 >= 8 n
            while kk**3 < 8 * n:
                kk += 1
        elif rule == "sqrt":
            kk = math.isqrt(n) if math.isqrt(n) ** 2 == n else math.isqrt(n) + 1
        elif rule == "sturges":
            kk = (n - 1).bit_length() + 1 if n >= 1 else 1  # ceil(log2 n) + 1, exact in integers
        else:
            raise StratalignError(f"k must be an integer or one of {', '.join(K_RULES)}, not {k!r}")
    elif isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
        raise StratalignError(f"k must be an integer or one of {', '.join(K_RULES)}, not {k!r}")
    else:
        kk = int(k)
    if kk < 1:
        raise StratalignError(f"k must be at least 1, got {kk} (from k={k!r}, n={n})")
    if kk >= n:
        raise StratalignError(f"k={kk} (from k={k!r}) must be smaller than the number of rows n={n}")
    return kk


def l2_normalize(x: Any, eps: float = 1e-12) -> np.ndarray:
    """Rows scaled to unit L2 norm (all-zero rows stay zero), float64 unless given float32."""
    arr = to_numpy(x, "features")
    dtype = np.float32 if arr.dtype == np.float32 else np.float64
    arr = np.asarray(arr, dtype=dtype)
    norms = np.sqrt(np.einsum("...d,...d->...", arr, arr, dtype=np.float64))[..., None]
    return (arr / np.maximum(norms, eps)).astype(dtype, copy=False)


def _use_gpu(device: str) -> bool:
    dev = str(device).lower()
    if dev == "cpu":
        return False
    if dev not in ("auto", "cuda", "gpu") and not dev.startswith("cuda:"):
        raise StratalignError(f"device must be auto, cpu or cuda, not {device!r}")
    import faiss

    has = hasattr(faiss, "StandardGpuResources") and getattr(faiss, "get_num_gpus", lambda: 0)() > 0
    try:
        import torch

        has = has and torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a dependency
        has = False
    if dev != "auto" and not has:
        raise StratalignError(f"device={device!r} asked, but faiss has no GPU support or no CUDA device is visible")
    return has


def _faiss_search(base32: np.ndarray, query32: np.ndarray, m: int, gpu: bool) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatIP(base32.shape[1])
    if gpu:
        global _gpu_resources
        if _gpu_resources is None:
            _gpu_resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(_gpu_resources, 0, index)
    index.add(base32)
    scores, idx = index.search(query32, m)
    return np.asarray(scores, dtype=np.float64), np.asarray(idx, dtype=np.int64)


def _rowdot(q32: np.ndarray, qrows: np.ndarray, b32: np.ndarray, brows: np.ndarray) -> np.ndarray:
    """float64 dot products <q32[qrows[t]], b32[brows[t]]>, in cache-sized chunks.

    Products of float32 values are exact in float64 and the sum runs over a contiguous row, so equal rows
    give bitwise-equal scores (exact ties stay ties)."""
    out = np.empty(len(qrows), dtype=np.float64)
    step = max(1, _CHUNK // max(1, q32.shape[1]))
    for s in range(0, len(qrows), step):
        q = q32[qrows[s:s + step]].astype(np.float64)
        q *= b32[brows[s:s + step]]
        out[s:s + step] = q.sum(axis=1)
    return out


def _exact_rows(base32: np.ndarray, query32: np.ndarray, rows: np.ndarray, k: int, exclude_self: bool
                ) -> tuple[np.ndarray, np.ndarray]:
    """Every score of a few hard rows (a tie run at the k-th place longer than the candidate list)."""
    n = base32.shape[0]
    idx = np.empty((len(rows), k), dtype=np.int64)
    sc = np.empty((len(rows), k), dtype=np.float64)
    base64 = base32.astype(np.float64)
    order_key = np.arange(n)
    for t, r in enumerate(rows):
        s = (base64 * query32[r].astype(np.float64)).sum(axis=1)
        if exclude_self:
            s[r] = -np.inf
        top = np.lexsort((order_key, -s))[:k]
        idx[t], sc[t] = top, s[top]
    return idx, sc


def _topk(base32: np.ndarray, query32: np.ndarray, k: int, exclude_self: bool, device: str
          ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner products of each query row over the base rows; ties by lower index.

    Exact for the given float32 rows: FAISS proposes k + a few candidates; wherever two neighbouring
    FAISS scores are closer than FAISS's rounding bound, those candidates are re-scored exactly; rows
    whose tie run at the k-th place reaches the end of the candidate list are scored in full."""
    n, d = base32.shape
    nq = query32.shape[0]
    avail = n - 1 if exclude_self else n
    gpu = _use_gpu(device)
    extra = max(16, k) if gpu else _EXTRA_CPU
    m = min(n, k + int(exclude_self) + extra)
    if gpu and m > _GPU_MAX_K:
        gpu, m = False, min(n, k + int(exclude_self) + _EXTRA_CPU)
    approx, idx = _faiss_search(base32, query32, m, gpu)
    if exclude_self:  # move self (if returned) to the end, then drop the last column
        order = np.argsort(idx == np.arange(nq)[:, None], axis=1, kind="stable")
        idx = np.take_along_axis(idx, order, 1)[:, : m - 1]
        approx = np.take_along_axis(approx, order, 1)[:, : m - 1]
    width = idx.shape[1]
    # |FAISS score - exact score| <= gamma_d * |q| * |b| (plus TF32 input rounding on GPU); a gap between
    # neighbouring FAISS scores wider than twice that is an ordering FAISS got right.
    bnorm = float(np.sqrt(np.einsum("nd,nd->n", base32, base32, dtype=np.float64)).max())
    qnorm = np.sqrt(np.einsum("nd,nd->n", query32, query32, dtype=np.float64))
    unit = (d + 2) * _U32 + (2 * _U_TF32 if gpu else 0.0)
    tol = (2.0 * unit * qnorm * bnorm + 1e-30)[:, None]
    close = (approx[:, :-1] - approx[:, 1:]) <= tol  # (nq, width-1): neighbours in one tie run
    in_run = np.zeros(idx.shape, dtype=bool)
    in_run[:, :-1] |= close
    in_run[:, 1:] |= close
    score = approx
    r, c = np.nonzero(in_run)
    if len(r):
        score[r, c] = _rowdot(query32, r, base32, idx[r, c])
    order = np.lexsort((idx, -score), axis=-1)[:, :k]
    out_idx = np.take_along_axis(idx, order, 1)
    out_sc = np.take_along_axis(score, order, 1)
    if width < avail:  # the run holding the k-th place may continue past the list: score those rows fully
        hard = np.flatnonzero(close[:, k - 1:].all(axis=1))
        if len(hard):
            out_idx[hard], out_sc[hard] = _exact_rows(base32, query32, hard, k, exclude_self)
    return out_idx, out_sc


def knn_indices(x: Any, k: int | str, *, normalize: bool = True, device: str = "auto") -> np.ndarray:
    """(n, k) int64: row i's k largest inner products over rows j != i, best first, ties by lower j.

    Rows are L2-normalised first unless normalize=False. Duplicates of row i are legitimate neighbours;
    only i itself is excluded. Exact for the float32 unit rows (see module docstring); FAISS GPU when available.
    """
    return knn_search(x, k, normalize=normalize, device=device)[1]


def knn_search(x: Any, k: int | str, *, normalize: bool = True, device: str = "auto"
               ) -> tuple[np.ndarray, np.ndarray]:
    """(exact float64 scores (n, k), indices int64 (n, k)) of the self-excluded kNN of every row."""
    arr = as_matrix(x, "features")
    kk = resolve_k(k, arr.shape[0])
    if normalize:
        arr = l2_normalize(arr)
    a32 = np.ascontiguousarray(arr, dtype=np.float32)
    idx, _ = _topk(a32, a32, kk, True, device)
    rows = np.repeat(np.arange(a32.shape[0]), kk)
    return _rowdot(a32, rows, a32, idx.ravel()).reshape(idx.shape), idx


def search(gallery: Any, queries: Any, k: int, *, normalize: bool = True, device: str = "auto"
           ) -> tuple[np.ndarray, np.ndarray]:
    """Retrieval: (scores float32 (q, k), indices int64 (q, k)) of each query's k best gallery rows.

    Inner product on L2-normalised rows (cosine) unless normalize=False. The ranking is exact with ties by
    the lower index; the scores are FAISS's (float32 rounding) except where ties were re-scored.
    """
    g = as_matrix(gallery, "gallery")
    q = as_matrix(queries, "queries")
    if g.shape[1] != q.shape[1]:
        raise StratalignError(f"gallery has {g.shape[1]} dims but queries have {q.shape[1]}")
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= g.shape[0]:
        raise StratalignError(f"k must be an integer in 1..{g.shape[0]} (gallery size), got {k!r}")
    if normalize:
        g, q = l2_normalize(g), l2_normalize(q)
    g32, q32 = np.ascontiguousarray(g, dtype=np.float32), np.ascontiguousarray(q, dtype=np.float32)
    idx, sc = _topk(g32, q32, int(k), False, device)
    return sc.astype(np.float32), idx
