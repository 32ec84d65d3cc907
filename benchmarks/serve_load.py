"""The served model under load, the CLI's time to first result, and search over a 1M-vector gallery (issue 31).

    python benchmarks/serve_load.py --work /tmp/serve-bench [--baseline-src DIR] [--requests 2000 --concurrency 16]

1. A demo gallery (made once in --work and reused): the Twemoji set ingested, extracted with the demo's encoders
   (dinov2-s, minilm-l6), one CLIP run trained on it (layers "last").
2. `stratalign serve` started as a process on 127.0.0.1: the time from launch to its first answer to
   GET /api/search, then a bounded burst of --requests text searches (new texts: every one runs the text encoder),
   --concurrency at a time over keep-alive connections: p50 / p95 / max latency, errors, throughput.
3. `stratalign search` wall time to first result, alternating this checkout and --baseline-src (a checkout of the
   code before, e.g. `git worktree add /tmp/base 7f7114f`): a caption of the dataset (the store holds its
   features) and a new text; --reps each.
4. A synthetic 1M x 256 gallery (clustered unit vectors): `use.search.build_index` picks the index by size (exact
   below use.search.EXACT_MAX, IVF above); its build time, query time and recall@10 against exact search,
   for several nprobe.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VISION, TEXT = "dinov2-s", "minilm-l6"


def setup(work: Path) -> tuple[str, str]:
    """(store url, run id) of the demo gallery, made once."""
    from stratalign.stages.extract import ExtractConfig, extract
    from stratalign.stages.ingest.sources import ingest_source
    from stratalign.stages.runs.training import RunConfig, train_run
    from stratalign.store.feature_store import FeatureStore

    store = FeatureStore.open(str(work / "store"), "a", create=True)
    if "twemoji" not in store.datasets():
        store.save_dataset(ingest_source("twemoji"))
    extract(store, "twemoji", ExtractConfig(encoders=(VISION, TEXT), progress=True))
    run = train_run(store, RunConfig(dataset="twemoji", vision=VISION, text=TEXT, layers="last", objective="clip",
                                     head="linear"))["run_id"]
    return store.url, run


def cli(src: Path, *args: str) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "stratalign.cli.main", *args], cwd=src, env=env, capture_output=True,
                         text=True, timeout=600)
    return time.perf_counter() - start, res


def cli_search(store: str, run: str, caption: str, baseline: Path | None, reps: int) -> dict:
    srcs = {"after": ROOT, **({"before": baseline} if baseline else {})}
    times: dict[str, list[float]] = {f"{name} {kind}": [] for name in srcs for kind in ("caption", "new text")}
    cli(ROOT, "index", "--run", run, "--dataset", "twemoji", "--store", store, "--device", "cpu")  # built once
    for _ in range(reps):
        for name, src in srcs.items():  # alternated, so a busy moment hits both
            for kind, q in (("caption", caption), ("new text", "a small yellow bird on a branch")):
                took, res = cli(src, "search", q, "--run", run, "--dataset", "twemoji", "-k", "5", "--store", store,
                                "--device", "cpu")
                assert res.returncode == 0, res.stderr[-500:]
                times[f"{name} {kind}"].append(took)
    return {k: {"median_s": round(statistics.median(v), 2), "all_s": [round(t, 2) for t in v]} for k, v in times.items()}


def serve_load(store: str, run: str, queries: list[str], n: int, conc: int) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "stratalign.cli.main", "serve", "--run", run, "--dataset", "twemoji",
                             "--port", "0", "--store", store, "--device", "cpu"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        first = None
        while first is None:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                c.request("GET", "/api/search?q=a+red+heart&k=10")
                if c.getresponse().status == 200:
                    first = time.perf_counter() - start
            except OSError:
                time.sleep(0.05)
        lat: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        todo = iter(range(n))

        def worker() -> None:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                t = time.perf_counter()
                try:
                    c.request("GET", "/api/search?" + urllib.parse.urlencode({"q": queries[i % len(queries)], "k": 10}))
                    res = c.getresponse()
                    body = res.read()
                    ok = res.status == 200 and json.loads(body)["results"][0]["hits"]
                except Exception as exc:  # noqa: BLE001 - counted
                    ok, body = False, str(exc).encode()
                    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                with lock:
                    lat.append(time.perf_counter() - t)
                    if not ok:
                        errors.append(body[:200].decode(errors="replace"))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(conc)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    ms = np.array(lat) * 1000
    return {"requests": n, "concurrency": conc, "errors": len(errors), "first_errors": errors[:3],
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "max_ms": round(float(ms.max()), 1), "throughput_rps": round(n / wall, 1),
            "start_to_first_answer_s": round(first, 2), "ready_line": line.strip()}


def synthetic(n: int, d: int, n_queries: int, seed: int = 0) -> dict:
    """Clustered unit vectors (a mixture of 2,000 Gaussian clusters); queries are perturbed gallery points."""
    import faiss

    from stratalign.use.search import EXACT_MAX, build_index

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2000, d)).astype(np.float32)
    z = centres[rng.integers(0, 2000, n)] + 0.6 * rng.standard_normal((n, d)).astype(np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    q = z[rng.choice(n, n_queries, replace=False)] + 0.3 * rng.standard_normal((n_queries, d)).astype(np.float32)
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    exact = faiss.IndexFlatIP(d)
    exact.add(z)
    t = time.perf_counter()
    _, truth = exact.search(q, 10)
    exact_s = time.perf_counter() - t
    t = time.perf_counter()
    index, kind = build_index(z)
    build_s = time.perf_counter() - t
    out = {"n": n, "d": d, "queries": n_queries, "exact_max": EXACT_MAX, "index": kind, "build_s": round(build_s, 1),
           "exact_ms_per_query": round(1000 * exact_s / n_queries, 2), "by_nprobe": {}}
    ivf = faiss.extract_index_ivf(index)
    for nprobe in (16, 32, 64, 128, 256):
        ivf.nprobe = nprobe
        t = time.perf_counter()
        _, got = index.search(q, 10)
        took = time.perf_counter() - t
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth)])
        out["by_nprobe"][nprobe] = {"recall@10": round(float(recall), 4),
                                    "ms_per_query": round(1000 * took / n_queries, 3)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--baseline-src", type=Path)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--vectors", type=int, default=1_000_000)
    ap.add_argument("--only", choices=("setup", "serve", "cli", "synthetic"), action="append")
    args = ap.parse_args()
    only = set(args.only or ("setup", "serve", "cli", "synthetic"))
    results: dict = {}
    if only & {"setup", "serve", "cli"}:
        store, run = setup(args.work)
        results["gallery"] = {"store": store, "run": run}
        from stratalign.store.feature_store import FeatureStore

        ds = FeatureStore.open(store, "r").dataset("twemoji")
        captions = ds.captions["text"].to_list()
        results["gallery"]["images"] = ds.images.height
        queries = [f"{c} on a {w} background" for c in captions for w in ("red", "blue")]  # not in the store
        if "serve" in only:
            results["serve"] = serve_load(store, run, queries, args.requests, args.concurrency)
            print(json.dumps(results["serve"]), flush=True)
        if "cli" in only:
            results["cli_search"] = cli_search(store, run, captions[0], args.baseline_src, args.reps)
            print(json.dumps(results["cli_search"]), flush=True)
    if "synthetic" in only:
        results["synthetic"] = synthetic(args.vectors, 256, 500)
        print(json.dumps(results["synthetic"]), flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "serve_load.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
