"""Run the stratalign CLI with the tiny test encoders in place of the real ones (for fault-injection tests that
need a real process to kill or interrupt): `python tests/fault_cli.py extract --dataset toy -e tiny-image ...`.
TINY_DELAY_S slows each forward pass (see fake_encoders)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

if __name__ == "__main__":
    import fake_encoders

    import stratalign.encoders as encoders
    from stratalign.stages import extract as extract_stage

    encoders.load_encoder = fake_encoders.load_odd
    extract_stage.encoder_identity = lambda spec: None  # the tiny encoders have no files to identify
    from stratalign.cli.main import main

    sys.argv[0] = "stratalign"
    main()
