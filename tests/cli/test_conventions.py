"""The help of every command reads like a click tool's: no markup accidents, every option described, value
metavars (TEXT, INTEGER, ...), flags without one, and `--version`."""

from __future__ import annotations

import re
import subprocess
import sys

from stratalign.cli.conventions import click_command
from stratalign.cli.main import app


def _commands(command, path=("stratalign",)):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def _help(args: list[str], capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "200")
    code = click_command(app).main(args + ["--help"], prog_name="stratalign", standalone_mode=False)
    assert code in (0, None)
    return capsys.readouterr().out


def test_every_option_is_described() -> None:
    missing = [f"{' '.join(path)} {param.opts[0]}" for path, cmd in _commands(click_command(app))
               for param in cmd.params if param.param_type_name == "option" and not (param.help or "").strip()]
    assert not missing, f"options without a help text: {missing}"


def test_help_pages_have_no_markup_accidents_and_plain_metavars(capsys, monkeypatch) -> None:
    pages = {" ".join(path): _help(list(path[1:]), capsys, monkeypatch) for path, _ in _commands(click_command(app))}
    assert len(pages) > 20
    assert "pip install 'stratalign[serve]'" in pages["stratalign"]  # rich markup ate `[serve]`
    for name, text in pages.items():
        assert not re.search(r"<(bool|str|int|float|list\[)", text), (name, text)
        assert "╭" not in text and "\x1b[" not in text, name
    extract = pages["stratalign extract"]
    assert re.search(r"^\s+--skip-bad\s{2,}Record unreadable", extract, re.M), extract  # a flag: no metavar
    assert re.search(r"^\s+--batch-size INTEGER\s", extract, re.M)
    assert re.search(r"^\s+--store URL\s", extract, re.M)
    assert re.search(r"--clamp-outliers / --no-clamp-outliers", pages["stratalign layers"])
    assert re.search(r"^\s+RUNS\s{2,}Run ids", pages["stratalign runs rm"], re.M)


def test_version() -> None:
    from stratalign.version import __version__

    out = subprocess.run([sys.executable, "-m", "stratalign.cli.main", "--version"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"stratalign {__version__}", out

