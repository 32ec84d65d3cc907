"""SIGINT and SIGTERM always end a command: within seconds, non-zero, with one line and no traceback (issue 29).

The first signal unwinds the command like Ctrl-C (`KeyboardInterrupt`: finally blocks release claims, temp files
go) and arms a watchdog; whatever the unwinding does next (a KeyboardInterrupt swallowed where it cannot
propagate, a join on loader processes that never ends, interpreter shutdown waiting on a thread), the watchdog
writes the one line and ends the process `GRACE_S` later. A second signal, or a signal once the command has
finished and the process is exiting, ends it at once the same way. The exit code is 130 for SIGINT, 143 for
SIGTERM (what shells report). KeyboardInterrupts that Python could only print as "Exception ignored" are
silenced (the one line says it all). Before `main()` runs, while the console script still imports the CLI (seconds
on a loaded machine), `install_early` makes a signal end the process at once with the line. Only the Python
interpreter's own start-up, before the first line of stratalign runs, is left to Python's defaults.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Callable

INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C
TERMINATED = 143  # 128 + SIGTERM
GRACE_S = 5.0  # how long the unwinding may take after the first signal (claims released, temp files removed)
SIGNALS = (signal.SIGINT, signal.SIGTERM)

received: list[int] = []  # the signals that interrupted the command, in order
_state = {"exiting": False, "said": False}


def interrupted_line() -> str:
    """What an interrupted command says: what is kept and how to resume."""
    what = "terminated" if received and received[-1] == signal.SIGTERM else "interrupted"
    verb = " ".join(a for a in sys.argv[1:3] if not a.startswith("-"))
    resume = f"; rerun the same `stratalign {verb}` command to resume" if verb else ""
    return f"{what}: finished work (written shards, saved runs, ingested datasets) is kept in the store{resume}"


_line: list[Callable[[], str]] = [interrupted_line]  # what the process says when a signal ends it


def code() -> int:
    return TERMINATED if received and received[-1] == signal.SIGTERM else INTERRUPTED


def said() -> None:
    """The interrupted line has been printed (the watchdog must not print it again)."""
    _state["said"] = True


def hard_exit() -> None:
    """Say the line (once) and end the process now, whatever it is doing (loader processes die with it)."""
    if not _state["said"]:
        _state["said"] = True
        try:
            os.write(2, (_line[0]() if _line else "interrupted").encode() + b"\n")
        except OSError:
            pass
    os._exit(code())


def _watchdog() -> None:
    threading.Event().wait(GRACE_S)
    hard_exit()


def _on_signal(signum: int, frame: Any) -> None:
    received.append(signum)
    if len(received) > 1 or _state["exiting"]:
        hard_exit()
    try:
        threading.Thread(target=_watchdog, name="stratalign-signal-watchdog", daemon=True).start()
    except RuntimeError:  # no new thread at the interpreter's shutdown: nothing left to unwind
        hard_exit()
    raise KeyboardInterrupt


def _unraisable(hook: Callable[[Any], None]) -> Callable[[Any], None]:
    def quiet(unraisable: Any) -> None:
        if received or isinstance(unraisable.exc_value, KeyboardInterrupt):
            return  # a signal's KeyboardInterrupt raised where it could not propagate: the one line says it
        hook(unraisable)
    return quiet


def _on_early_signal(signum: int, frame: Any) -> None:
    received.append(signum)
    hard_exit()


def install_early() -> None:
    """While the CLI is still importing its modules (seconds on a loaded machine: torch), a signal ends the process
    at once with the line: nothing has started that needs unwinding, and a KeyboardInterrupt in the middle of an
    import would print a traceback. Installed when `stratalign.cli` is first imported (main thread only)."""
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _on_early_signal)


def install(line: Callable[[], str] = interrupted_line) -> dict[int, Any]:
    """Handle SIGINT and SIGTERM as the module docstring says; returns the handlers they replace."""
    received.clear()
    _state.update(exiting=False, said=False)
    _line[:] = [line]
    if not getattr(sys.unraisablehook, "_stratalign", False):
        quiet = _unraisable(sys.unraisablehook)
        quiet._stratalign = True  # type: ignore[attr-defined]
        sys.unraisablehook = quiet
    return {s: signal.signal(s, _on_signal) for s in SIGNALS}


def exiting() -> None:
    """The command is over: a signal from now on (interpreter shutdown, atexit, thread joins) ends the process at
    once with the line, rather than with -2/-15 and nothing said."""
    _state["exiting"] = True
