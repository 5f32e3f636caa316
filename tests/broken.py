"""A real outage of an SQLite store, for tests of what a gateway does while its store is down."""

from __future__ import annotations

from pathlib import Path


class BrokenSQLite:
    """An SQLite store's files overwritten with garbage (a real outage), then put back."""

    def __init__(self, path: Path) -> None:
        self.files = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
        self.saved: dict[Path, bytes] = {}

    def break_(self) -> None:
        self.saved = {f: f.read_bytes() for f in self.files if f.exists()}
        for f in self.saved:
            with f.open("r+b") as handle:
                handle.write(b"garbage!" * 4096)

    def repair(self) -> None:
        for f, data in self.saved.items():
            with f.open("r+b") as handle:
                handle.write(data)
                handle.truncate()
