"""Worker processes for the multi-process tests, run as ``python tests/workers.py COMMAND ...``.

Each worker opens its own store on the given SQLite file (nothing crosses a
process boundary but the file) and reports on stdout, one line per event,
flushed, so the parent knows exactly what was acknowledged.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from creditmeter import (
    BalanceConfig,
    BalanceManager,
    InsufficientBalance,
    SQLiteStore,
    VersionConflict,
)

CONFIG = BalanceConfig(enabled=True, start_balance=10**9)


class CountingStore(SQLiteStore):
    """An SQLiteStore that counts the compare-and-sets it lost."""

    conflicts = 0

    def commit(self, account, entries, *, expected_version):
        try:
            super().commit(account, entries, expected_version=expected_version)
        except VersionConflict:
            type(self).conflicts += 1
            raise


def wait_for(go: Path) -> None:
    deadline = time.monotonic() + 60
    while not go.exists():
        if time.monotonic() > deadline:
            raise SystemExit("the start signal never came")
        time.sleep(0.001)


def charge(path: str, user: str, count: str, go: str, tag: str) -> None:
    """Charge 1 credit ``count`` times once ``go`` exists; print a JSON summary."""
    with BalanceManager(CountingStore(path), CONFIG) as manager:
        manager.account(user)
        print("ready", flush=True)
        wait_for(Path(go))
        for number in range(int(count)):
            manager.charge(user, 1, request_id=f"{tag}-{number}")
        print(json.dumps({"done": int(count), "conflicts": CountingStore.conflicts}), flush=True)


def crash(path: str, user: str, tag: str) -> None:
    """Charge 1 credit at a time forever, printing each acknowledged request id."""
    with BalanceManager(SQLiteStore(path), CONFIG) as manager:
        print("ready", flush=True)
        number = 0
        while True:
            request_id = f"{tag}-{number}"
            manager.charge(user, 1, request_id=request_id)
            print(request_id, flush=True)
            number += 1


def hold(path: str, user: str, count: str, go: str) -> None:
    """Hold and settle 1 credit ``count`` times once ``go`` exists; print "ok refused"."""
    with BalanceManager(SQLiteStore(path), BalanceConfig(enabled=True)) as manager:
        manager.account(user)
        print("ready", flush=True)
        wait_for(Path(go))
        ok = refused = 0
        for _ in range(int(count)):
            try:
                held = manager.hold(user, 1)
            except InsufficientBalance:
                refused += 1
                continue
            manager.settle(held, 1)
            ok += 1
        print(ok, refused, flush=True)


def open_new(folder: str, rounds: str, workers: str, go: str, tag: str) -> None:
    """Open a new store file per round, all workers at once; print a JSON list of errors.

    Round ``n`` opens ``folder/n.db`` and charges once on it; no worker starts
    a round before every worker has finished the one before (a barrier made
    of marker files), so the opens of each new file really overlap.
    """
    base = Path(folder)
    wait_for(Path(go))
    errors = []
    for number in range(int(rounds)):
        while len(list(base.glob(f"done-{number - 1}-*"))) < int(workers) and number:
            time.sleep(0)
        try:
            with BalanceManager(SQLiteStore(base / f"{number}.db"), CONFIG) as manager:
                manager.charge("u", 1, request_id=tag)
        except Exception as exc:  # every failure is the finding
            errors.append(f"round {number}: {exc!r}")
        (base / f"done-{number}-{tag}").touch()
    print(json.dumps(errors), flush=True)


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    {"charge": charge, "crash": crash, "hold": hold, "open_new": open_new}[command](*arguments)
