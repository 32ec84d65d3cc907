"""`stratalign serve`: a JSON API and a search page over a dataset, with one or more runs side by side.

Everything is checked and loaded before the server listens: the port (range, free), the runs, the dataset and
its indexes, both encoders of every run (use.service); any problem is one line and a non-zero exit."""

from __future__ import annotations

import time
from typing import List, Optional

import typer

from stratalign.cli.common import StoreOption, console, err_console
from stratalign.cli.model_opts import DeviceOption


def serve_cmd(
    run: List[str] = typer.Option(..., "--run", help="Run id or prefix; repeat to compare runs side by side."),
    dataset: str = typer.Option(..., "--dataset", help="Dataset whose images are searched."),
    split: Optional[str] = typer.Option(None, "--split", help="Search one split only (train | val | test)."),
    k: int = typer.Option(8, "-k", help="Results per run on the page (1..100)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", help="TCP port (1..65535; 0: any free port, printed)."),
    build: bool = typer.Option(True, "--build/--no-build", help="Build a missing index at start-up (--no-build: "
                               "refuse to start without the indexes `stratalign index` made)."),
    device: str = DeviceOption,
    store: Optional[str] = StoreOption,
) -> None:
    """Start the API and the search page (needs the `serve` extra: pip install 'stratalign[serve]')."""
    from stratalign.errors import StratalignError

    start = time.perf_counter()
    if not 0 <= port <= 65535:
        raise StratalignError(f"--port must be between 1 and 65535 (0: any free port), got {port}")
    if not 1 <= k <= 100:
        raise StratalignError(f"-k must be between 1 and 100, got {k}")
    sock = _bind(host, port)
    try:
        import uvicorn

        from stratalign.use.serve_app import create_app
    except ImportError:
        raise StratalignError("serve needs fastapi and uvicorn: pip install 'stratalign[serve]'") from None
    from stratalign.cli.common import store_url
    from stratalign.store.feature_store import FeatureStore
    from stratalign.use.model import AlignedModel
    from stratalign.use.service import Service

    fs = FeatureStore.open(store_url(store), "a" if build else "r")
    models = [AlignedModel.from_run(fs, r, device=device) for r in run]
    service = Service(fs, models, dataset, split, build=build,
                      progress=lambda line: err_console.print(line, highlight=False))
    app = create_app(service, k)
    port = sock.getsockname()[1]
    console.print(f"serving {dataset} with {', '.join(service.runs)} on http://{host}:{port}/ (API: /docs; ready "
                  f"in {time.perf_counter() - start:.1f} s)", highlight=False)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])


def _bind(host: str, port: int):  # noqa: ANN202 - a socket
    """The server's socket, bound (not yet listening) before anything is loaded: a port in use is refused at once."""
    import socket

    from stratalign.errors import StratalignError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise StratalignError(f"--host {host!r} is not an address to listen on ({exc})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise StratalignError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port") from None
    sock.set_inheritable(True)
    return sock
