"""Help-text conventions applied to the whole command tree: the help that click tools print (pip, black, flask).

- No markup: typer's default renders help through rich markup, which ate `[serve]` from
  `pip install 'stratalign[serve]'`. Help is printed as written, in click's plain layout.
- Metavars name the kind of value (TEXT, INTEGER, FLOAT, or the option's own `metavar=`), the same with every
  typer version (typer 0.29 prints `<str>`, `<list[str]>`, and `<bool>` beside flags that take no value).
- Flags print as `--x` or `--x / --no-x`, without a metavar.
"""

from __future__ import annotations

from typing import Any

import typer

# click's own names for the value kinds, as click and typer < 0.16 print them
_KIND = {str: "TEXT", int: "INTEGER", float: "FLOAT", bool: "BOOLEAN"}
# wide terminals get the whole first line of each command's help (click stops at 80 columns)
MAX_HELP_WIDTH = 120


def _element(annotation: Any) -> Any:
    args = getattr(annotation, "__args__", None)
    if getattr(annotation, "__origin__", None) in (list, tuple) and args:
        return args[0]
    return annotation


def metavar_for(param: Any) -> str:
    """TEXT / INTEGER / FLOAT / PATH / a|b|c for a parameter without its own metavar."""
    desc = getattr(param, "type_descriptor", None)  # typer >= 0.16
    if desc is not None:
        if getattr(desc, "is_choice", False) and desc.choices:
            return "[" + "|".join(str(getattr(c, "value", c)) for c in desc.choices) + "]"
        if getattr(desc, "is_path", False):
            return "PATH"
        kind = _element(desc.annotation)
        return _KIND.get(kind, getattr(kind, "__name__", "VALUE").upper())
    ptype = getattr(param, "type", None)  # click parameters of older typer: click's own name
    return (getattr(ptype, "name", None) or "VALUE").upper()


def apply_conventions(command: Any) -> Any:
    """Set the conventions above on `command` and every command under it; returns `command`."""
    if hasattr(command, "rich_markup_mode"):
        command.rich_markup_mode = None
    settings = getattr(command, "context_settings", None)
    if isinstance(settings, dict):
        settings.setdefault("max_content_width", MAX_HELP_WIDTH)
    for param in getattr(command, "params", []):
        if getattr(param, "is_flag", False) or param.metavar is not None:
            continue
        if param.param_type_name == "argument":
            if hasattr(param, "type_descriptor"):  # typer >= 0.16 would print the name, then `<list[str]>`
                param.metavar = (param.name or "value").upper()
                param.display_type_rich = lambda ctx: None
            continue  # older typer: click's own NAME... already
        param.metavar = metavar_for(param)
    for sub in getattr(command, "commands", {}).values():
        apply_conventions(sub)
    return command


def click_command(app: typer.Typer) -> Any:
    """The click command tree of `app` with the conventions applied (what `stratalign` runs)."""
    return apply_conventions(typer.main.get_command(app))
