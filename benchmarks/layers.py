"""Time the L x L layer-similarity matrix: layer_similarity (one kNN search per layer) against the
straightforward per-pair loop (both kNN lists recomputed for every layer pair), and check they agree.
With --permutations K (> 0): also the permutation null of mutual_knn (core.calibration: K permutations of the
text rows, reusing the kNN graphs), timed against the raw matrix's computation in the same run, alternated
--repeats times.

    python benchmarks/layers.py [--n 5000] [--layers 13] [--dim 384] [--metrics mutual_knn cka] [--sample 0]
                                [--threads 0] [--permutations 0] [--repeats 3]

--sample P times only P random pairs of the per-pair loop and extrapolates to all L x L pairs (marked `~`).
--threads T caps BLAS and FAISS threads (0 = library defaults); on a shared machine 1 gives steadier timings.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from stratalign.core import calibration
from stratalign.core import similarity as similarity_mod


def synthetic_layers(n: int, layers: int, dim: int, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Two stacks of float32 layers over a shared latent; structure peaks mid-stack, like real encoders."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 32)).astype(np.float32)
    out = []
    for _ in range(2):
        h = rng.normal(size=(n, dim)).astype(np.float32)
        stack = []
        for layer in range(layers):
            w = rng.normal(size=(32, dim)).astype(np.float32) / np.sqrt(32)
            signal = np.sin(np.pi * (layer + 1) / (layers + 1))  # 0 .. 1 .. 0 across the stack
            h = 0.7 * h + 0.3 * rng.normal(size=(n, dim)).astype(np.float32)
            stack.append(signal * (z @ w) + (1.2 - signal) * h)
        out.append(stack)
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--layers", type=int, default=13)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", default="rice")
    ap.add_argument("--metrics", nargs="+", default=["mutual_knn", "cka"])
    ap.add_argument("--sample", type=int, default=0, help="time this many random pairs of the per-pair loop (0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="cap BLAS/FAISS threads (0 = defaults)")
    ap.add_argument("--permutations", type=int, default=0, help="time the permutation null of K permutations")
    ap.add_argument("--repeats", type=int, default=3, help="alternations of raw / null timings")
    args = ap.parse_args()
    if args.threads > 0:
        import faiss
        from threadpoolctl import threadpool_limits

        threadpool_limits(args.threads)
        faiss.omp_set_num_threads(args.threads)
    k = int(args.k) if str(args.k).isdigit() else args.k
    vis, txt = synthetic_layers(args.n, args.layers, args.dim, args.seed)
    kk = similarity_mod.resolve_k(k, args.n)
    n_pairs = len(vis) * len(txt)
    print(f"n={args.n} layers={args.layers}x{args.layers} dim={args.dim} k={kk} metrics={','.join(args.metrics)} "
          f"threads={args.threads or 'default'}")
    similarity_mod.mutual_knn(vis[0][:200], txt[0][:200], 5)  # warm FAISS / BLAS up outside the timings
    if args.permutations > 0:
        time_null(vis, txt, k, args.permutations, args.repeats, args.seed)
        return

    pairs = [(v, t) for v in range(len(vis)) for t in range(len(txt))]
    if 0 < args.sample < n_pairs:
        rng = np.random.default_rng(args.seed + 1)
        pairs = [pairs[i] for i in sorted(rng.choice(n_pairs, size=args.sample, replace=False))]
    rows = []
    for metric in args.metrics:
        t0 = time.perf_counter()
        mat = similarity_mod.layer_similarity(vis, txt, metrics=(metric,), k=k)[metric]
        fast = time.perf_counter() - t0
        t0 = time.perf_counter()
        worst = 0.0
        for v, t in pairs:
            value = similarity_mod.METRICS[metric](vis[v], txt[t], k)
            worst = max(worst, abs(value - mat[v, t]))
        slow = (time.perf_counter() - t0) * n_pairs / len(pairs)
        tol = 0.0 if metric in similarity_mod.KNN_METRICS else 1e-12
        status = "equal" if worst <= tol else f"DIFFER (max |diff| {worst:.3g})"
        mark = "" if len(pairs) == n_pairs else "~"
        best = similarity_mod.choose_layers(mat, "best")
        rows.append((f"{metric}: per-pair loop ({2 * n_pairs if metric in similarity_mod.KNN_METRICS else 0} kNN searches)",
                     f"{mark}{slow:.2f}", "1.0x", status))
        rows.append((f"{metric}: layer_similarity ({len(vis) + len(txt) if metric in similarity_mod.KNN_METRICS else 0} kNN searches)",
                     f"{fast:.2f}", f"{slow / fast:.1f}x",
                     f"best pair {best} = {mat[best]:.4f}, last = {mat[-1, -1]:.4f}"))
    width = max(len(r[0]) for r in rows)
    print(f"{'method':<{width}}  {'seconds':>9}  {'speedup':>8}  check")
    for name, sec, speed, note in rows:
        print(f"{name:<{width}}  {sec:>9}  {speed:>8}  {note}")
    print(f"(pairs checked against the per-pair loop: {len(pairs)} of {n_pairs})")


def time_null(vis: list[np.ndarray], txt: list[np.ndarray], k: int | str, perms: int, repeats: int,
              seed: int) -> None:
    """The raw mutual_knn matrix (L_v + L_t kNN searches, L_v x L_t overlaps) against its null (K x L_v x L_t
    overlaps on the same graphs), alternated; the ratio of medians."""
    raw_s, null_s = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mats, graphs = similarity_mod.layer_similarity_and_graphs(vis, txt, ("mutual_knn",), k=k)
        raw_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        order = calibration.permutations(len(vis[0]), perms, seed)
        null = calibration.overlap_null(*graphs, order)["mutual_knn"]
        summary = calibration.summarise(mats["mutual_knn"], null)
        null_s.append(time.perf_counter() - t0)
    raw, cal = float(np.median(raw_s)), float(np.median(null_s))
    pairs = len(vis) * len(txt)
    print(f"raw mutual_knn matrix ({len(vis) + len(txt)} kNN searches, {pairs} overlaps): {raw:.3f} s "
          f"(runs {', '.join(f'{x:.3f}' for x in raw_s)})")
    print(f"permutation null, K={perms} ({perms * pairs} overlaps, no search): {cal:.3f} s "
          f"(runs {', '.join(f'{x:.3f}' for x in null_s)}); {cal / raw:.1f}x the raw matrix, "
          f"{cal / perms / raw:.3f}x per permutation")
    best = similarity_mod.choose_layers(mats["mutual_knn"], "best")
    print(f"best pair {best}: raw {mats['mutual_knn'][best]:.4f}, calibrated {summary['calibrated'][best[0]][best[1]]:.4f}, "
          f"family-wise p {summary['family_p'][best[0]][best[1]]:.4f}")


if __name__ == "__main__":
    main()
