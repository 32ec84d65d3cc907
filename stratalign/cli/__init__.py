"""The command line (`stratalign ...`): one module per verb, main.py the typer app. The console script imports this
package first: from then on a SIGINT/SIGTERM during the CLI's own start-up ends the process in one line
(cli.signals.install_early); a program that only imports the CLI keeps its handlers until it calls `main()`."""

import os as _os
import sys as _sys

from stratalign.cli import signals as _signals

if _os.path.basename(_sys.argv[0] if _sys.argv else "") == "stratalign":
    _signals.install_early()
