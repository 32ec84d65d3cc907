"""A lean load generator for benchmarks/serve_load.py: its own process, one asyncio loop, raw HTTP/1.1 keep-alive
connections (no HTTP library), so it takes as little of a small machine's CPU from the server as it can.

    python benchmarks/load_client.py --port P --requests 2000 --concurrency 16 --queries FILE > result.json

Each of --concurrency connections sends GET /api/search?q=...&k=... requests one after another (the next query
from FILE, one per line); per request it records the latency (send to the last body byte), the status, whether
the body holds hits, and the server's own time (its Server-Timing header). It prints one JSON object: those
lists, the wall time, and its own CPU seconds (user + system), so the caller can say what the generator cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
import urllib.parse


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: str) -> tuple[int, bytes, float]:
    writer.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length, server_ms = 0, float("nan")
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.lower()
        if name == "content-length":
            length = int(value)
        elif name == "server-timing" and "dur=" in value:
            server_ms = float(value.split("dur=")[1].split(";")[0])
    body = await reader.readexactly(length)
    return status, body, server_ms


async def run(port: int, n: int, conc: int, queries: list[str], k: int) -> dict:
    todo = iter(range(n))
    lat: list[float] = []
    server: list[float] = []
    errors: list[str] = []

    async def worker() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for i in todo:
            target = "/api/search?" + urllib.parse.urlencode({"q": queries[i % len(queries)], "k": k})
            t = time.perf_counter()
            try:
                status, body, server_ms = await _one(reader, writer, target)
                ok = status == 200 and b'"hits":[{' in body
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                status, body, server_ms, ok = 0, str(exc).encode(), float("nan"), False
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            lat.append(time.perf_counter() - t)
            server.append(server_ms)
            if not ok:
                errors.append(f"{status} {body[:200].decode(errors='replace')}")
        writer.close()

    cpu0, t0 = os.times(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    wall, cpu1 = time.perf_counter() - t0, os.times()
    return {"latency_s": lat, "server_ms": server, "errors": errors, "wall_s": wall,
            "client_cpu_s": (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--queries", required=True, help="a file of queries, one per line")
    ap.add_argument("-k", type=int, default=10)
    args = ap.parse_args()
    with open(args.queries, encoding="utf-8") as f:
        queries = [line.rstrip("\n") for line in f if line.strip()]
    print(json.dumps(asyncio.run(run(args.port, args.requests, args.concurrency, queries, args.k))))


if __name__ == "__main__":
    main()
