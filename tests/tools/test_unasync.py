"""tools/unasync.py: the markers, the renames, and --check on a stale twin.

Run on a throwaway source tree in tmp_path (the tool's ROOT and SOURCES
pointed there) and on the repository itself.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).parents[2] / "tools" / "unasync.py"


@pytest.fixture(scope="module")
def unasync():
    spec = importlib.util.spec_from_file_location("unasync_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["unasync_tool"] = module
    spec.loader.exec_module(module)
    return module


SOURCE = '''\
# unasync-target: _sync.py
# unasync-rename: AsyncThing -> Thing
"""``AsyncThing``, awaited."""

import asyncio

from creditmeter._compat import AsyncLock


class AsyncThing:
    def __init__(self) -> None:
        self.lock = AsyncLock()

    async def run(self, items) -> int:
        async with self.lock:
            total = 0
            async for item in items:
                total += await item
        await asyncio.sleep(0)  # async-only
        # sync-only: total += 0  # sync-noqa: PLR6104
        return total

    async def __aenter__(self) -> "AsyncThing":
        return self

    # async-only: begin
    def only_async(self) -> None:
        pass

    # async-only: end
    async def aclose(self) -> None:  # async-only
        # sync-only: def close(self) -> None:
        await self.run([])
'''

EXPECTED = '''\
# Generated from src/pkg/_async.py by tools/unasync.py.
# Do not edit: change the source, then run `python tools/unasync.py`.
"""``Thing``, awaited."""

from creditmeter._compat import Lock


class Thing:
    def __init__(self) -> None:
        self.lock = Lock()

    def run(self, items) -> int:
        with self.lock:
            total = 0
            for item in items:
                total += item
        total += 0  # noqa: PLR6104
        return total

    def __enter__(self) -> "Thing":
        return self

    def close(self) -> None:
        self.run([])
'''


@pytest.fixture
def tree(unasync, tmp_path, monkeypatch):
    package = tmp_path / "src" / "pkg"
    package.mkdir(parents=True)
    (package / "_async.py").write_text(SOURCE)
    (tmp_path / "pyproject.toml").write_text("")
    monkeypatch.setattr(unasync, "ROOT", tmp_path)
    monkeypatch.setattr(unasync, "SOURCES", tmp_path / "src")
    return package


def test_a_source_gives_its_sync_twin(unasync, tree):
    assert unasync.main([]) == 0
    assert (tree / "_sync.py").read_text() == EXPECTED
    # "awaited" in prose is kept; only the keyword before an expression goes.
    assert "awaited" in (tree / "_sync.py").read_text()


def test_check_fails_on_a_missing_or_stale_twin_and_writes_nothing(unasync, tree, capsys):
    assert unasync.main(["--check"]) == 1
    assert not (tree / "_sync.py").exists()
    assert "src/pkg/_sync.py" in capsys.readouterr().err
    assert unasync.main([]) == 0
    (tree / "_sync.py").write_text(EXPECTED.replace("total += 0", "total += 1"))
    assert unasync.main(["--check"]) == 1
    assert "total += 1" in (tree / "_sync.py").read_text()
    assert unasync.main([]) == 0
    assert unasync.main(["--check"]) == 0


@pytest.mark.parametrize(
    ("markers", "problem"),
    [
        ("# async-only: begin\n# async-only: begin\n", "out of place"),
        ("# async-only: end\n", "out of place"),
        ("# async-only: begin\nx = 1\n", "never ended"),
    ],
)
def test_markers_out_of_place_are_refused(unasync, tree, capsys, markers, problem):
    (tree / "_async.py").write_text(SOURCE + markers)
    assert unasync.main([]) == 2
    assert problem in capsys.readouterr().err
    assert not (tree / "_sync.py").exists()


def test_the_repository_twins_are_up_to_date(unasync):
    twins = [target.name for _, target, _ in unasync.pairs()]
    assert "manager.py" in twins
    assert twins.count("_sync.py") >= 2  # metering, reservations (and the stores)
    assert unasync.main(["--check"]) == 0
