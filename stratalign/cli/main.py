"""The typer app: one command per stage. Commands parse arguments and call the library.

Every command module imports only typer, rich and the light parts of stratalign at import time; the library
(torch, zarr, polars, faiss behind it) is imported inside each command, so `stratalign --help` costs nothing.
"""

from __future__ import annotations

import sys
from types import ModuleType

import typer
from typer.core import TyperGroup

from stratalign.cli import signals
from stratalign.cli.classify_cmd import classify_cmd
from stratalign.cli.common import console, err_console
from stratalign.cli.conventions import click_command
from stratalign.cli.demo_cmd import demo_cmd
from stratalign.cli.embed_cmd import embed_cmd
from stratalign.cli.encoders_cmd import encoders_cmd
from stratalign.cli.eval_cmd import eval_cmd
from stratalign.cli.export_cmd import export_cmd
from stratalign.cli.extract_cmd import extract_cmd
from stratalign.cli.index_cmd import index_cmd
from stratalign.cli.ingest_cmd import ingest_app
from stratalign.cli.layers_cmd import layers_cmd
from stratalign.cli.runs_cmd import runs_app
from stratalign.cli.search_cmd import search_cmd
from stratalign.cli.serve_cmd import serve_cmd
from stratalign.cli.store_cmd import store_app
from stratalign.cli.sweep_cmd import sweep_cmd
from stratalign.cli.train_cmd import train_cmd
from stratalign.errors import StratalignError, os_error_line

# the order `stratalign --help` lists the commands in: the stages in the order they run, then the tools
COMMAND_ORDER = ("ingest", "extract", "encoders", "layers", "train", "eval", "sweep", "demo", "export", "embed", "index",
                 "search", "classify", "serve", "store", "runs")


class _StageOrder(TyperGroup):
    """typer lists plain commands before command groups; list them in COMMAND_ORDER instead."""

    def list_commands(self, ctx: typer.Context) -> list[str]:
        names = super().list_commands(ctx)
        return sorted(names, key=lambda n: COMMAND_ORDER.index(n) if n in COMMAND_ORDER else len(COMMAND_ORDER))


app = typer.Typer(
    name="stratalign",
    cls=_StageOrder,
    help="Align frozen unimodal encoders with lightweight heads on cached every-layer features.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        from stratalign.version import __version__

        console.print(f"stratalign {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Align frozen unimodal encoders with lightweight heads on cached every-layer features."""


app.add_typer(ingest_app, name="ingest")
app.command("extract")(extract_cmd)
app.command("encoders")(encoders_cmd)
app.command("layers")(layers_cmd)
app.command("train")(train_cmd)
app.command("eval")(eval_cmd)
app.command("sweep")(sweep_cmd)
app.command("demo")(demo_cmd)
app.command("export")(export_cmd)
app.command("embed")(embed_cmd)
app.command("index")(index_cmd)
app.command("search")(search_cmd)
app.command("classify")(classify_cmd)
app.command("serve")(serve_cmd)
app.add_typer(store_app, name="store")
app.add_typer(runs_app, name="runs")

INTERRUPTED = signals.INTERRUPTED
TERMINATED = signals.TERMINATED
_received = signals.received  # the signals that interrupted the command, if any
interrupted_line = signals.interrupted_line


def _interrupted() -> None:
    signals.said()
    _fail(interrupted_line(), signals.code())


def click_exceptions() -> ModuleType:
    """The module of the click exceptions typer raises. Older typer (checked: 0.15) uses the `click` package;
    typer 0.29 vendors its own copy as `typer._click`, whose exceptions are not the `click` package's.
    `typer.BadParameter` is public in both and is defined in that module."""
    return sys.modules[typer.BadParameter.__module__]


def _fail(line: str, code: int) -> None:
    err_console.print(line, highlight=False, soft_wrap=True)
    sys.exit(code)


def main() -> None:
    """Entry point: run the app with SIGINT and SIGTERM ending it in one line (exit 130 / 143) whatever it is doing,
    also while it starts or exits (see cli.signals). The handlers stay: a signal during the interpreter's
    shutdown ends it the same way (tests that call main() in-process restore theirs, tests/conftest.py)."""
    signals.install(interrupted_line)
    try:
        run()
    finally:
        signals.exiting()


def run() -> None:
    """Run the app. A StratalignError or an OSError is one line on stderr and exit 2; a usage error
    is click's usage line and one error line, exit 2; Ctrl-C is one line, exit 130; never a traceback for these."""
    _received.clear()
    try:
        code = click_command(app)(standalone_mode=False)  # a typer.Exit's code, and 130 for Ctrl-C, instead of exiting
    except StratalignError as exc:
        _fail(f"[red]error:[/red] {exc}", exc.exit_code)
    except OSError as exc:  # full disk, permission denied, unreachable store: one line, never a traceback
        _fail(f"[red]error:[/red] {os_error_line(exc)}", StratalignError.exit_code)
    except KeyboardInterrupt:  # typer turns one inside a command into code 130; this is one outside it
        _interrupted()
    except typer.Abort as exc:  # end of input at a prompt; Ctrl-C too with typer < 0.29 (it raises Abort from it)
        if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):
            _interrupted()
        _fail("Aborted!", 1)
    except Exception as exc:
        errors = click_exceptions()
        if isinstance(exc, typer.Exit):
            sys.exit(exc.exit_code)
        if not isinstance(exc, errors.ClickException):
            raise
        exc.show()  # usage errors: the usage line, a hint, then `Error: ...`
        sys.exit(exc.exit_code)
    if code == INTERRUPTED:
        _interrupted()
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
