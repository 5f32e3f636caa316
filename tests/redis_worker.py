"""Worker processes for the Redis multi-process tests: ``python tests/redis_worker.py COMMAND ...``.

Each worker opens its own ``RedisStore`` on the given URL and key prefix
(nothing crosses a process boundary but the server) and reports on stdout, one
line per event, flushed: "ready", then a JSON summary.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from creditmeter import BalanceConfig, BalanceManager, InsufficientBalance, VersionConflict
from creditmeter.stores.redis import RedisStore

CONFIG = BalanceConfig(enabled=True, start_balance=10**9)


class CountingStore(RedisStore):
    """A RedisStore that counts its commits and the compare-and-sets it lost."""

    commits = 0
    conflicts = 0

    def commit(self, account, entries, *, expected_version):
        type(self).commits += 1
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


def summary(**fields: object) -> None:
    fields.update(commits=CountingStore.commits, conflicts=CountingStore.conflicts)
    print(json.dumps(fields), flush=True)


def charge(url: str, prefix: str, user: str, count: str, go: str, tag: str) -> None:
    """Charge 1 credit ``count`` times once ``go`` exists; print a JSON summary."""
    with BalanceManager(CountingStore(url, prefix=prefix), CONFIG) as manager:
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


def hold(url: str, prefix: str, user: str, count: str, go: str) -> None:
    """Hold and settle 1 credit ``count`` times once ``go`` exists; print a JSON summary."""
    with BalanceManager(CountingStore(url, prefix=prefix), BalanceConfig(enabled=True)) as manager:
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
