"""The dependency rule of ARCHITECTURE.md holds: the import-linter contracts in pyproject.toml are all kept.

Runs `lint-imports` (installed by the `dev` extra beside this Python) on this checkout; on a broken contract the
test fails with import-linter's report, which names the importer, the imported module and the line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports() -> Path:
    script = Path(sys.executable).parent / ("lint-imports.exe" if os.name == "nt" else "lint-imports")
    assert script.exists(), f"{script} is missing: install the dev extra (pip install -e '.[dev]')"
    return script


def test_contracts_are_declared() -> None:
    """The contracts the rule needs are there (a deleted contract would make the lint vacuous)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert config["root_package"] == "stratalign"
    ids = {c["id"] for c in config["contracts"]}
    assert {"layers", "train-uses-core-only", "encoders-use-core-only"} <= ids
    layers = next(c for c in config["contracts"] if c["id"] == "layers")
    assert layers["exhaustive"] is True
    assert layers["layers"][:3] == ["cli", "use", "stages"]  # the product's use path sits between the CLI and the stages
    assert layers["layers"][-1] == "errors | version | moved | progress"
    acyclic = next(c for c in config["contracts"] if c["id"] == "stages-acyclic")
    assert {"stratalign.stages", "stratalign.stages.runs", "stratalign.stages.extract", "stratalign.use"} <= set(
        acyclic["ancestors"])


def test_import_contracts_kept() -> None:
    """Every contract is kept in this checkout's stratalign (not an installed copy: cwd and PYTHONPATH are the root)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([str(_lint_imports()), "--no-cache"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    report = done.stdout + done.stderr
    assert done.returncode == 0, f"import contracts broken (see ARCHITECTURE.md):\n{report}"
    assert "0 broken" in report, report
