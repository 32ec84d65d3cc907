"""The served model under load, the CLI's time to first result, and search over a 1M-vector gallery (issue 31).

    python benchmarks/serve_load.py --work /tmp/serve-bench [--baseline-src DIR] [--requests 2000 --concurrency 16]

1. A demo gallery (made once in --work and reused): the Twemoji set ingested, extracted with the demo's encoders
   (dinov2-s, minilm-l6), one CLIP run trained on it (layers "last").
2. `stratalign serve` started as a process on 127.0.0.1 (--server-cpus: pinned with taskset): the time from launch
   to its first answer to GET /api/search, then a bounded burst of --requests text searches (new texts: every one
   runs the text tower) from benchmarks/load_client.py, its own lean asyncio process (--client-cpus), --concurrency
   at a time over keep-alive connections: p50 / p95 / max latency as the client sees it and as the server reports
   it (Server-Timing: batch wait + encoding + search + the answer's dict), errors, throughput, the CPU both
   processes spent per request and the client's share, the load average before and after.
   `threads`: ms per text batch (1 and 16 queries) through the ONNX path with 1 and 2 onnxruntime threads.
3. `stratalign search` wall time to first result, alternating this checkout and --baseline-src (a plain copy of
   the code before, e.g. `mkdir /tmp/base && git archive d330319 | tar -x -C /tmp/base`): a caption of the dataset
   (the store holds its features) and a new text; --reps each; every process with bytecode cached under
   --work/pycache as an installed package has it; the first search of each checkout (bytecode compiled, ONNX
   graphs exported) reported apart.
4. A synthetic 1M x 256 gallery (clustered unit vectors): `use.search.build_index` picks the index by size (exact
   below use.search.EXACT_MAX, IVF above); its build time, query time and recall@10 against exact search,
   for several nprobe.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import statistics
import subprocess
import sys
import time
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


def _env(src: Path, work: Path) -> dict[str, str]:
    """A subprocess's environment: `src` first on the path, bytecode cached under work/pycache (this machine sets
    PYTHONDONTWRITEBYTECODE, which would compile every module of the checkout at each start: ~0.8 s of CPU that an
    installed package never pays)."""
    env = {**os.environ, "PYTHONPATH": str(src), "PYTHONPYCACHEPREFIX": str(work / "pycache")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def cli(src: Path, work: Path, *args: str) -> tuple[float, subprocess.CompletedProcess]:
    """(wall s, result) of one CLI call; its CPU seconds (user + system) in result.cpu_s."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "stratalign.cli.main", *args], cwd=src, env=_env(src, work),
                         capture_output=True, text=True, timeout=600)
    took, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    res.cpu_s = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)  # type: ignore[attr-defined]
    return took, res


def cli_search(store: str, run: str, caption: str, baseline: Path | None, reps: int, work: Path) -> dict:
    """Wall time of `stratalign search` (a caption the store holds, a new text), alternating the checkouts; the
    first search of this checkout (which exports the ONNX graphs when the store has none) is reported apart."""
    srcs = {"after": ROOT, **({"before": baseline} if baseline else {})}
    times: dict[str, list[float]] = {f"{name} {kind}": [] for name in srcs for kind in ("caption", "new text")}
    cpu: dict[str, list[float]] = {k: [] for k in times}
    cli(ROOT, work, "index", "--run", run, "--dataset", "twemoji", "--store", store, "--device", "cpu")  # built once
    out: dict = {"load_before": os.getloadavg()}
    for name, src in srcs.items():  # first searches: compile bytecode once, export the ONNX graphs once
        took, res = cli(src, work, "search", "a first query", "--run", run, "--dataset", "twemoji", "--store", store,
                        "--device", "cpu")
        assert res.returncode == 0, res.stderr[-500:]
        out[f"{name} first search_s"] = round(took, 2)
    outputs: dict[str, set[str]] = {}
    for _ in range(reps):
        for name, src in srcs.items():  # alternated, so a busy moment hits both
            for kind, q in (("caption", caption), ("new text", "a small yellow bird on a branch")):
                took, res = cli(src, work, "search", q, "--run", run, "--dataset", "twemoji", "-k", "5", "--store",
                                store, "--device", "cpu")
                assert res.returncode == 0, res.stderr[-500:]
                times[f"{name} {kind}"].append(took)
                cpu[f"{name} {kind}"].append(res.cpu_s)  # type: ignore[attr-defined]
                outputs.setdefault(f"{name} {kind}", set()).add(" ".join(line.split()[2] for line in
                                                                         res.stdout.splitlines()[1:]))
    out.update({k: {"median_s": round(statistics.median(v), 2), "all_s": [round(t, 2) for t in v],
                    "median_cpu_s": round(statistics.median(cpu[k]), 2)} for k, v in times.items()})
    out["same top-5 images before/after"] = {kind: outputs.get(f"after {kind}") == outputs.get(f"before {kind}")
                                             for kind in ("caption", "new text")} if baseline else None
    out["load_after"] = os.getloadavg()
    return out


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pinned(cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus] if cpus else []


def serve_load(store: str, run: str, queries: list[str], n: int, conc: int, work: Path,
               server_cpus: str | None = None, client_cpus: str | None = None, variant: str | None = None,
               baseline: Path | None = None) -> dict:
    """Start `stratalign serve`, time its first answer, then the burst from benchmarks/load_client.py (its own
    process); latency as the client sees it and as the server reports it (Server-Timing), CPU of both. A variant
    "TxW" serves with T onnxruntime threads per batch and W batch workers (use.service.QUERY_THREADS / _WORKERS);
    "no-encoder" answers every text with one fixed vector: what HTTP, the batcher, FAISS and the answer cost alone;
    "before" serves with the code of --baseline-src."""
    setting, src = "", ROOT
    if variant == "before":
        if baseline is None:
            raise SystemExit("variant before needs --baseline-src")
        src = baseline
    elif variant == "no-encoder":  # the serving stack alone: every text gets one fixed unit vector, no tower runs
        setting = ("import numpy as np, stratalign.use.fast as f; f.QueryModel.encode_text = lambda self, t, "
                   "batch_size=None: np.repeat(self.encode_features(np.ones((1, self.towers['text'].dim), "
                   "np.float32), 'text'), len(t), axis=0); ")
    elif variant:
        threads, workers = (int(v) for v in variant.split("x"))
        setting = f"import stratalign.use.service as s; s.QUERY_THREADS = {threads}; s.QUERY_WORKERS = {workers}; "
    launcher = f"{setting}import sys; from stratalign.cli.main import main; sys.argv[0] = 'stratalign'; main()"
    start = time.perf_counter()
    proc = subprocess.Popen([*_pinned(server_cpus), sys.executable, "-c", launcher, "serve", "--run", run,
                             "--dataset", "twemoji", "--port", "0", "--store", store, "--device", "cpu"], cwd=src,
                            env=_env(src, work), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
        qfile = work / "queries.txt"
        qfile.write_text("\n".join(queries) + "\n")
        load_before, cpu_before = os.getloadavg(), _cpu_s(proc.pid)
        client = subprocess.run([*_pinned(client_cpus), sys.executable, str(ROOT / "benchmarks" / "load_client.py"),
                                 "--port", str(port), "--requests", str(n), "--concurrency", str(conc), "--queries",
                                 str(qfile)], capture_output=True, text=True, timeout=900)
        assert client.returncode == 0, client.stderr[-500:]
        server_cpu, load_after = _cpu_s(proc.pid) - cpu_before, os.getloadavg()
        got = json.loads(client.stdout)
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("GET", "/api/info")
        info = json.loads(c.getresponse().read())["runs"][0]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    ms = np.array(got["latency_s"]) * 1000
    server_ms = np.array(got["server_ms"])
    return {"variant": variant or "default", "requests": n, "concurrency": conc, "server_cpus": server_cpus or "any",
            "client_cpus": client_cpus or "any",
            "errors": len(got["errors"]), "first_errors": got["errors"][:3],
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1),
            "max_ms": round(float(ms.max()), 1), "throughput_rps": round(n / got["wall_s"], 1),
            "server_timing_p50_ms": _percentile(server_ms, 50), "server_timing_p95_ms": _percentile(server_ms, 95),
            "server_cpu_ms_per_request": round(1000 * server_cpu / n, 2),
            "client_cpu_ms_per_request": round(1000 * got["client_cpu_s"] / n, 2),
            "client_cpu_share": round(got["client_cpu_s"] / (got["client_cpu_s"] + server_cpu), 3),
            "text_query_path": info.get("text_query_path"), "text_batches": info.get("text_batches"),
            "mean_text_batch": round(info.get("text_queries", 0) / max(1, min(info.get("text_batches", 0), 1000)), 1),
            "load_before": load_before, "load_after": load_after,
            "start_to_first_answer_s": round(first, 2), "ready_line": line.strip()}


def _percentile(x: np.ndarray, q: float) -> float | None:
    """A percentile of the values present (None when the server sent no Server-Timing: the code before it)."""
    x = x[np.isfinite(x)]
    return round(float(np.percentile(x, q)), 1) if len(x) else None


def query_threads(store: str, run: str, queries: list[str], reps: int = 20) -> dict:
    """ms per text batch (1 and 16 queries) through the ONNX path with 1 and 2 onnxruntime threads, alternated."""
    from stratalign.store.feature_store import FeatureStore
    from stratalign.use.fast import QueryModel

    fs = FeatureStore.open(store, "a")
    models = {t: QueryModel.from_run(fs, run, threads=t) for t in (1, 2)}
    for m in models.values():
        m.encode_text(queries[:16])  # sessions made (and the graphs exported once)
    times: dict[str, list[float]] = {f"batch {b}, {t} thread(s)": [] for b in (1, 16) for t in models}
    for r in range(reps):
        for b in (1, 16):
            for t, m in models.items():
                batch = queries[(r * 16) % len(queries):][:b]
                start = time.perf_counter()
                m.encode_text(batch)
                times[f"batch {b}, {t} thread(s)"].append(1000 * (time.perf_counter() - start))
    return {"load": os.getloadavg(), **{k: round(statistics.median(v), 1) for k, v in times.items()}}


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
    ap.add_argument("--server-cpus", help="taskset CPU list for the server (default: any)")
    ap.add_argument("--client-cpus", help="taskset CPU list for the load generator (default: any)")
    ap.add_argument("--variants", nargs="+", help="serve variants TxW (T onnxruntime threads, W batch workers) and "
                    "no-encoder (the serving stack alone), before (the server of --baseline-src)")
    ap.add_argument("--serve-reps", type=int, default=1)
    ap.add_argument("--only", choices=("setup", "serve", "threads", "cli", "synthetic"), action="append")
    args = ap.parse_args()
    only = set(args.only or ("setup", "serve", "threads", "cli", "synthetic"))
    results: dict = {}
    if only & {"setup", "serve", "threads", "cli"}:
        store, run = setup(args.work)
        results["gallery"] = {"store": store, "run": run}
        from stratalign.store.feature_store import FeatureStore

        ds = FeatureStore.open(store, "r").dataset("twemoji")
        captions = ds.captions["text"].to_list()
        results["gallery"]["images"] = ds.images.height
        queries = [f"{c} on a {w} background" for c in captions for w in ("red", "blue")]  # not in the store
        if "serve" in only:
            results["serve"] = []
            for _ in range(args.serve_reps):
                for variant in args.variants or [None]:  # alternated, so a busy moment hits each
                    results["serve"].append(serve_load(store, run, queries, args.requests, args.concurrency, args.work,
                                                       args.server_cpus, args.client_cpus, variant, args.baseline_src))
                    print(json.dumps(results["serve"][-1]), flush=True)
        if "threads" in only:
            results["query_threads"] = query_threads(store, run, queries)
            print(json.dumps(results["query_threads"]), flush=True)
        if "cli" in only:
            results["cli_search"] = cli_search(store, run, captions[0], args.baseline_src, args.reps, args.work)
            print(json.dumps(results["cli_search"]), flush=True)
    if "synthetic" in only:
        results["synthetic"] = synthetic(args.vectors, 256, 500)
        print(json.dumps(results["synthetic"]), flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "serve_load.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
