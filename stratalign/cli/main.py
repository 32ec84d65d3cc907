"""The typer app: one command per stage. Commands parse arguments and call the library."""

from __future__ import annotations

import sys

import typer

from stratalign.cli.common import err_console
from stratalign.cli.extract_cmd import encoders_cmd, extract_cmd
from stratalign.cli.ingest_cmd import ingest
from stratalign.cli.layers_cmd import layers_cmd
from stratalign.cli.store_cmds import store_app
from stratalign.cli.train_cmds import demo_cmd, eval_cmd, runs_ls, sweep_cmd, train_cmd
from stratalign.errors import StratalignError, os_error_line

app = typer.Typer(
    name="stratalign",
    help="Align frozen unimodal encoders with lightweight heads on cached every-layer features.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("ingest")(ingest)
app.command("extract")(extract_cmd)
app.command("encoders")(encoders_cmd)
app.command("layers")(layers_cmd)
app.command("train")(train_cmd)
app.command("eval")(eval_cmd)
app.command("sweep")(sweep_cmd)
app.command("demo")(demo_cmd)
app.add_typer(store_app, name="store")
runs_app = typer.Typer(help="Trained runs in the store.", no_args_is_help=True)
runs_app.command("ls")(runs_ls)
app.add_typer(runs_app, name="runs")


def main() -> None:
    """Entry point: run the app, turning StratalignError into one line on stderr and exit code 2."""
    try:
        app(standalone_mode=False)
    except StratalignError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(1)
    except OSError as exc:  # full disk, permission denied, unreachable store: one line, never a traceback
        err_console.print(f"[red]error:[/red] {os_error_line(exc)}", highlight=False, soft_wrap=True)
        sys.exit(StratalignError.exit_code)
    except Exception as exc:  # click usage errors and friends
        import click

        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
