"""SQLite files opened by several processes at once.

Other cross-process tests (charges and holds from several processes on one
store of every kind) are in manager/test_processes.py.
"""

from __future__ import annotations

import os

import worker

from creditmeter import EntryKind, SQLiteStore

ROUNDS = 200 if os.environ.get("CREDITMETER_LONG") == "1" else 60


def test_processes_opening_one_new_file_at_once(tmp_path):
    """Regression: a process switching a new file to WAL while another was still
    creating the schema failed at once with "database is locked" (SQLite's
    deadlock rule skips the busy timeout); 8 of 100 rounds failed before the fix."""
    workers = 4
    go = tmp_path / "go"
    arguments = [str(tmp_path), str(ROUNDS), str(workers), str(go)]
    errors = worker.together([["open_new", *arguments, f"p{n}"] for n in range(workers)], go)
    assert errors == [[]] * workers
    for number in range(ROUNDS):
        with SQLiteStore(tmp_path / f"{number}.db") as store:
            entries = store.ledger("u")
            assert [e.kind for e in entries].count(EntryKind.CHARGE) == workers
            assert store.load("u").balance == worker.START - workers
            assert sum(e.amount for e in entries) == worker.START - workers
