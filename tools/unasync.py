"""Generate creditmeter's sync modules from their async sources.

The async code is the one we write; its sync twin is derived from it, so the
two cannot drift. A source names its twin and any renames of its own in
comment lines at its top::

    # unasync-target: manager.py
    # unasync-rename: AsyncConnectionPool -> ConnectionPool

Besides those renames and the common ones below (``async def`` -> ``def``,
``await x`` -> ``x``, ``AsyncBalanceManager`` -> ``BalanceManager``, ...),
lines may be marked:

- ``... # async-only``: the line is left out of the sync twin;
- ``# async-only: begin`` ... ``# async-only: end``: so is the block;
- ``# sync-only: <code>``: becomes ``<code>`` (same indentation) in the twin;
- ``# sync-noqa: <codes>``: becomes ``# noqa: <codes>``, for a lint finding
  only the twin has.

The twin is then tidied (unused imports dropped, imports sorted) and formatted
with ruff, and starts with a header naming its source.

Usage: ``python tools/unasync.py`` writes the twins; ``--check`` writes
nothing and fails, naming them, when a twin is not what its source gives.
"""

from __future__ import annotations

import argparse
import difflib
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ROOT / "src" / "creditmeter"

# Applied to whole identifiers (or dotted names), in this order, to code, comments and docstrings.
RENAMES: tuple[tuple[str, str], ...] = (
    ("creditmeter.aio", "creditmeter.manager"),
    ("AsyncBalanceManager", "BalanceManager"),
    ("AsyncBalanceStore", "BalanceStore"),
    ("AsyncReservation", "Reservation"),
    ("AsyncMeteredStream", "MeteredStream"),
    ("AsyncBatchMixin", "BatchMixin"),
    # the pairs of creditmeter._compat
    ("AsyncLock", "Lock"),
    ("async_sleep", "sleep"),
    ("async_retrying", "retrying"),
    ("AsyncRetrying", "Retrying"),
    ("AbstractAsyncContextManager", "AbstractContextManager"),
    ("asynccontextmanager", "contextmanager"),
    ("AsyncIterator", "Iterator"),
    ("AsyncIterable", "Iterable"),
    ("AsyncGenerator", "Generator"),
    ("StopAsyncIteration", "StopIteration"),
    ("__aenter__", "__enter__"),
    ("__aexit__", "__exit__"),
    ("__aiter__", "__iter__"),
    ("__anext__", "__next__"),
    ("aclose", "close"),
    ("anext", "next"),
)
KEYWORDS: tuple[tuple[str, str], ...] = (
    (r"# sync-noqa:", "# noqa:"),
    (r"\basync def\b", "def"),
    (r"\basync with\b", "with"),
    (r"\basync for\b", "for"),
    (r"\bawait ", ""),
)

TARGET = re.compile(r"^# unasync-target:\s*(\S+)\s*$", re.MULTILINE)
RENAME = re.compile(r"^# unasync-rename:\s*(\S+)\s*->\s*(\S+)\s*$", re.MULTILINE)
SYNC_ONLY = re.compile(r"^(\s*)# sync-only: ?(.*)$")
BEGIN, END = "# async-only: begin", "# async-only: end"


class UnasyncError(Exception):
    """A source's markers do not make sense."""


def header(source: Path) -> str:
    """The first lines of a generated twin."""
    name = source.relative_to(ROOT).as_posix()
    return (
        f"# Generated from {name} by tools/unasync.py.\n"
        "# Do not edit: change the source, then run `python tools/unasync.py`.\n"
    )


def _sub_names(text: str, renames: tuple[tuple[str, str], ...]) -> str:
    for old, new in renames:
        text = re.sub(rf"(?<!\w){re.escape(old)}(?!\w)", new, text)
    return text


def _convert(line: str, renames: tuple[tuple[str, str], ...]) -> str:
    for pattern, replacement in KEYWORDS:
        line = re.sub(pattern, replacement, line)
    return _sub_names(line, renames)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def unasync_text(text: str, renames: tuple[tuple[str, str], ...], *, where: str) -> str:
    """The sync text of an async source (before tidying and formatting).

    ``# sync-only:`` lines right after a line dropped as ``# async-only`` take
    that line's indentation (a formatter indents a comment under a ``def`` as
    its body), keeping their indentation relative to the first of them.
    """
    out: list[str] = []
    skipping = False
    replaced: int | None = None  # indentation of the line just dropped, for a replacement
    shift = 0
    for number, line in enumerate(text.splitlines(keepends=True), 1):
        stripped = line.strip()
        sync_only = SYNC_ONLY.match(line)
        if sync_only and not skipping:
            indent, code = sync_only.groups()
            if replaced is not None:
                shift, replaced = replaced - len(indent), None
            out.append(_convert(" " * max(0, len(indent) + shift) + code + "\n", renames))
            continue
        shift = 0
        replaced = None
        if stripped in (BEGIN, END):
            if skipping == (stripped == BEGIN):
                raise UnasyncError(f"{where}:{number}: {stripped!r} out of place")
            skipping = stripped == BEGIN
        elif line.rstrip().endswith("# async-only") and not skipping:
            replaced = _indent(line)
        elif not (skipping or stripped.startswith(("# unasync-target:", "# unasync-rename:"))):
            out.append(_convert(line, renames))
    if skipping:
        raise UnasyncError(f"{where}: {BEGIN!r} never ended")
    return "".join(out)


def _ruff() -> list[str]:
    beside = Path(sys.executable).with_name("ruff")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("ruff")
    if found is None:
        raise UnasyncError("ruff is needed to format the generated files (pip install ruff)")
    return [found]


def _run(command: list[str], text: str) -> str:
    done = subprocess.run(
        command, input=text, capture_output=True, text=True, check=False, cwd=ROOT
    )
    if done.returncode != 0:
        raise UnasyncError(
            f"{' '.join(command[1:3])} failed:\n{done.stderr}\n--- its input:\n{text}"
        )
    return done.stdout


def tidy(text: str, target: Path) -> str:
    """Drop unused imports, sort imports, format: as ``ruff`` does for the repository."""
    ruff, name = _ruff(), str(target)
    check = ["check", "--fix", "--exit-zero", "--quiet", "--select", "F401,I001"]
    fixed = _run([*ruff, *check, "--stdin-filename", name, "-"], text)
    return _run([*ruff, "format", "--quiet", "--stdin-filename", name, "-"], fixed)


def pairs() -> list[tuple[Path, Path, tuple[tuple[str, str], ...]]]:
    """Every (source, twin, renames) under ``src/creditmeter``."""
    found = []
    for source in sorted(SOURCES.rglob("*.py")):
        text = source.read_text(encoding="utf-8")
        target = TARGET.search(text)
        if target is None:
            continue
        own = tuple((old, new) for old, new in RENAME.findall(text))
        found.append((source, source.parent / target.group(1), own + RENAMES))
    return found


def generate(source: Path, target: Path, renames: tuple[tuple[str, str], ...]) -> str:
    """The twin's full text."""
    where = str(source.relative_to(ROOT))
    body = unasync_text(source.read_text(encoding="utf-8"), renames, where=where)
    return tidy(header(source) + body, target)


def main(argv: list[str] | None = None) -> int:
    """Write every twin, or with ``--check`` report the stale ones and fail."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; fail if stale")
    args = parser.parse_args(argv)
    stale = []
    for source, target, renames in pairs():
        try:
            wanted = generate(source, target, renames)
        except UnasyncError as exc:
            print(f"unasync: {exc}", file=sys.stderr)
            return 2
        current = target.read_text(encoding="utf-8") if target.exists() else ""
        if current == wanted:
            continue
        rel = target.relative_to(ROOT)
        if args.check:
            stale.append(rel)
            diff = difflib.unified_diff(
                current.splitlines(keepends=True),
                wanted.splitlines(keepends=True),
                f"{rel} (in the repository)",
                f"{rel} (generated)",
                n=1,
            )
            sys.stderr.writelines(list(diff)[:40])
        else:
            target.write_text(wanted, encoding="utf-8")
            print(f"unasync: wrote {rel}")
    if stale:
        names = ", ".join(map(str, stale))
        print(
            f"unasync: stale generated files: {names}; run `python tools/unasync.py`",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
