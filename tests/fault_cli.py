"""Run the stratalign CLI with the tiny test encoders in place of the real ones (for fault-injection tests that
need a real process to kill or interrupt): `python tests/fault_cli.py extract --dataset toy -e tiny-image ...`.
TINY_DELAY_S slows each forward pass (see fake_encoders). For signals aimed at a moment (tests/faults/
test_signals_aimed.py): FAULT_MARKS names a file that gets a line `loaders` just before the loader processes
are forked and `exiting` when the interpreter starts its shutdown (which FAULT_EXIT_DELAY_S then stretches)."""

from __future__ import annotations

import atexit
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

if __name__ == "__main__":
    from stratalign.cli import signals

    signals.install_early()  # first, as the console script does: a signal from here on ends it in one line

    marks = os.environ.get("FAULT_MARKS")
    if marks:
        with open(marks, "a") as f:
            f.write("started\n")
    import fake_encoders

    import stratalign.encoders as encoders
    from stratalign.stages import extract as extract_stage

    if marks:
        from stratalign.stages.extract import image_loaders, reader

        def mark(what: str) -> None:
            with open(marks, "a") as f:
                f.write(what + "\n")

        real_pool = image_loaders.loader_pool

        def marked_pool(workers: int):
            if image_loaders._pool is None:
                mark("loaders")
            return real_pool(workers)

        image_loaders.loader_pool = reader.loader_pool = marked_pool

        def at_exit() -> None:
            mark("exiting")
            time.sleep(float(os.environ.get("FAULT_EXIT_DELAY_S", "0")))

        atexit.register(at_exit)  # runs first at shutdown (atexit is last in, first out), before the loaders' own
    encoders.load_encoder = fake_encoders.load_odd
    extract_stage.encoder_identity = lambda spec: None  # the tiny encoders have no files to identify
    from stratalign.cli.main import main

    sys.argv[0] = "stratalign"
    main()
