"""Worker processes for the PostgreSQL multi-process tests: ``python tests/postgres_worker.py ...``.

Each worker opens its own ``PostgresStore`` on the given DSN and table prefix
(nothing crosses a process boundary but the server) and reports on stdout, one
line per event, flushed: "ready", then a JSON summary with how many commits it
made, how many compare-and-sets it lost (each one retried by the manager), and
how many times the manager asked for ``exclusive``.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

from creditmeter import BalanceConfig, BalanceManager, InsufficientBalance, VersionConflict
from creditmeter.stores.postgres import PostgresStore

CONFIG = BalanceConfig(enabled=True, start_balance=10**9)


class CountingStore(PostgresStore):
    """A PostgresStore that counts its commits, lost compare-and-sets and exclusive blocks."""

    commits = 0
    conflicts = 0
    exclusives = 0

    def commit(self, account, entries, *, expected_version):
        type(self).commits += 1
        try:
            super().commit(account, entries, expected_version=expected_version)
        except VersionConflict:
            type(self).conflicts += 1
            raise

    @contextlib.contextmanager
    def exclusive(self, user_id):
        type(self).exclusives += 1
        with super().exclusive(user_id):
            yield


def wait_for(go: Path) -> None:
    deadline = time.monotonic() + 60
    while not go.exists():
        if time.monotonic() > deadline:
            raise SystemExit("the start signal never came")
        time.sleep(0.001)


def summary(**fields: object) -> None:
    fields.update(
        commits=CountingStore.commits,
        conflicts=CountingStore.conflicts,
        exclusives=CountingStore.exclusives,
    )
    print(json.dumps(fields), flush=True)


def charge(dsn: str, prefix: str, user: str, count: str, go: str, tag: str) -> None:
    """Charge 1 credit ``count`` times once ``go`` exists; print a JSON summary."""
    with BalanceManager(CountingStore(dsn, prefix=prefix), CONFIG) as manager:
        manager.account(user)
        print("ready", flush=True)
        wait_for(Path(go))
        latencies = []
        started = time.perf_counter()
        for number in range(int(count)):
            begun = time.perf_counter()
            manager.charge(user, 1, request_id=f"{tag}-{number}")
            latencies.append(time.perf_counter() - begun)
        wall = time.perf_counter() - started
        latencies.sort()
        summary(
            done=int(count),
            wall=wall,
            p50_ms=latencies[len(latencies) // 2] * 1000,
            p99_ms=latencies[int(len(latencies) * 0.99)] * 1000,
            max_ms=latencies[-1] * 1000,
        )


def hold(dsn: str, prefix: str, user: str, count: str, go: str) -> None:
    """Hold and settle 1 credit ``count`` times once ``go`` exists; print a JSON summary."""
    store = CountingStore(dsn, prefix=prefix)
    with BalanceManager(store, BalanceConfig(enabled=True)) as manager:
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
        summary(ok=ok, refused=refused)


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    {"charge": charge, "hold": hold}[command](*arguments)
