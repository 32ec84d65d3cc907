"""Operating-system errors (unwritable store, full disk) reach the user as one line and a non-zero exit."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

from stratalign.errors import os_error_line


def test_os_error_line_names_error_and_file() -> None:
    line = os_error_line(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/store/features/x"))
    assert line == f"OSError: {os.strerror(errno.ENOSPC)}: /data/store/features/x"
    assert os_error_line(PermissionError("denied")) == "PermissionError: denied"


def test_unwritable_store_is_one_line_not_a_traceback(tmp_path: Path, coco_json: Path, image_dir: Path) -> None:
    blocker = tmp_path / "plain-file"
    blocker.write_text("not a folder")
    store = blocker / "store"  # a store under a plain file cannot be created: NotADirectoryError
    out = subprocess.run([sys.executable, "-m", "stratalign.cli.main", "ingest", "coco", "--captions", str(coco_json),
                          "--images", str(image_dir), "--name", "toy", "--store", str(store)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(blocker) in lines[0]
    assert blocker.read_text() == "not a folder"
