"""A `stratalign serve` app run by uvicorn in a thread on a free port, for the serve and containment tests."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any


def serve_in_thread(app: Any) -> tuple[str, Any, threading.Thread]:
    """(base URL, uvicorn server, its thread): set `server.should_exit = True` and join the thread to stop it."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(400):
        if srv.started:
            break
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", srv, thread


def serve_and_get(service: Any, paths: list[str]) -> tuple[list[int], list[bytes]]:
    """Serve `service` (use.serve_app), GET each path, stop: (statuses, bodies)."""
    from stratalign.use.serve_app import create_app

    url, srv, thread = serve_in_thread(create_app(service))
    statuses, bodies = [], []
    try:
        for p in paths:
            try:
                with urllib.request.urlopen(url + p, timeout=60) as res:
                    statuses.append(res.status)
                    bodies.append(res.read())
            except urllib.error.HTTPError as err:
                statuses.append(err.code)
                bodies.append(err.read())
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
    return statuses, bodies
