"""The tests mirror the package: every test file names a module that exists in the room it sits in.

tests/<room>/.../test_<module>[_<aspect>].py tests stratalign/<room>/.../<module>.py (or the package <module>/);
tests/faults/ holds the fault suite, each file named after the module whose failures it injects (any room);
tests/benchmarks/ tests a script of benchmarks/; tests/test_<name>.py tests stratalign/<name>.py (`init`: the
package's face, stratalign/__init__.py). A renamed or deleted module then fails here until its tests follow.
"""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
PACKAGE = REPO / "stratalign"


def _modules(folder: Path) -> set[str]:
    """Names of the modules and sub-packages directly in `folder` (`init` for its __init__.py)."""
    names = {p.stem for p in folder.glob("*.py") if p.stem != "__init__"}
    names |= {p.name for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    return names | ({"init"} if (folder / "__init__.py").exists() else set())


def _every_module() -> set[str]:
    return {name for d in [PACKAGE, *[p for p in PACKAGE.rglob("*") if p.is_dir()]] for name in _modules(d)}


def _names_one_of(stem: str, modules: set[str]) -> bool:
    rest = stem.removeprefix("test_")
    return any(rest == m or rest.startswith(m + "_") for m in modules)


def test_every_test_file_names_an_existing_module() -> None:
    everywhere = _every_module()
    wrong = []
    for path in sorted(TESTS.rglob("test_*.py")):
        room = path.parent.relative_to(TESTS)
        if room.parts[:1] == ("fixtures",):
            continue
        if room.parts[:1] == ("faults",):
            modules = everywhere
        elif room.parts[:1] == ("benchmarks",):
            modules = {p.stem for p in (REPO / "benchmarks").glob("*.py")}
        else:
            folder = PACKAGE.joinpath(*room.parts)
            modules = _modules(folder) if folder.is_dir() else set()
        if not _names_one_of(path.stem, modules):
            wrong.append(str(path.relative_to(TESTS)))
    assert not wrong, f"test files that name no module of their room (rename or move them): {wrong}"


def test_the_check_sees_a_wrong_name(tmp_path: Path) -> None:
    """The matching rule itself: a file named after a module that is not there does not pass."""
    assert _names_one_of("test_heads_loop", {"heads_loop", "rules"})
    assert _names_one_of("test_heads_loop_stacks", {"heads_loop"})
    assert not _names_one_of("test_batched_train", {"heads_loop", "rules"})
    assert not _names_one_of("test_headsx", {"heads"})
