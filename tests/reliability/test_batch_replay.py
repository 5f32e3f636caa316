"""Batches killed or cancelled midway, then replayed: no item lost, none doubled.

Killed: a child process (a real one, started with ``sys.executable``) runs
``charge_many`` over a log of items, each with its own request id, in batches
of 200, on an SQLite file (durability "full"), Redis or PostgreSQL. The
parent polls the store (the credits spent so far) and SIGKILLs the child as
soon as some but not all of the log is in; a round where the child finished
before a poll saw it midway is run again on a fresh store. Then the whole log
is replayed with ``charge_many``, in the same batches: every request id is
in the ledger exactly once, each balance is the start less the sum of its
user's items, every ledger sums to its balance, and every replayed item
reports its entry.

Cancelled: ``await meter.charge_many(...)`` on each async store is cancelled
at its 1st suspension, then its 2nd, and so on until a call finishes
uncancelled; after each cancel no lock of the manager is held, the manager's
last-seen accounts are not older than the store's, and a replay applies
every item exactly once.

Default: a log of 2,000 items over 7 users. ``CREDITMETER_LONG=1``: 20,000
items, three kills per store.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from typing import Any

import pytest
from backends import open_async_store

from creditmeter import AsyncBalanceManager, BalanceConfig, BalanceManager, ChargeItem, open_store

LONG = os.environ.get("CREDITMETER_LONG") == "1"
ITEMS = 20_000 if LONG else 2_000
KILLS = 3 if LONG else 1
BATCH = 200
USERS = 7
START = 10**9
CONFIG = BalanceConfig(enabled=True, start_balance=START)
TRIES = 5  # rounds run again when the child finished before a poll caught it midway
WAIT = 120.0

CHILD = textwrap.dedent(
    """
    import sys
    from creditmeter import BalanceConfig, BalanceManager, ChargeItem, open_store

    url, items, batch, users, start = sys.argv[1], *map(int, sys.argv[2:])
    log = [ChargeItem(f"user-{n % users}", n % 5 + 1, request_id=f"log-{n}") for n in range(items)]
    meter = BalanceManager(open_store(url), BalanceConfig(enabled=True, start_balance=start))
    for first in range(0, items, batch):
        meter.charge_many(log[first : first + batch])
    print("done", flush=True)
    """
)


def the_log(items: int) -> list[ChargeItem]:
    """The child's log, item for item."""
    return [ChargeItem(f"user-{n % USERS}", n % 5 + 1, request_id=f"log-{n}") for n in range(items)]


def spent(store: Any) -> int:
    """Credits the users have spent so far (an account not opened yet: none)."""
    total = 0
    for number in range(USERS):
        account = store.load(f"user-{number}")
        if account is not None:
            total += START - int(account.balance)
    return total


def kill_midway(url: str, log: list[ChargeItem]) -> int:
    """Run the child on ``url`` and SIGKILL it once some but not all of the log is in.

    Returns the credits in at the kill, or 0 if the child finished first.
    """
    everything = sum(int(item.amount) for item in log)
    args = [str(len(log)), str(BATCH), str(USERS), str(START)]
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, url, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        with open_store(url) as watcher:
            while child.poll() is None:
                with contextlib.suppress(Exception):  # tables or file not made yet
                    done = spent(watcher)
                    if 0 < done < everything:
                        child.send_signal(signal.SIGKILL)
                        child.wait(WAIT)
                        return done
        _, errors = child.communicate(timeout=WAIT)
        assert child.returncode == 0, errors.decode()
        return 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(WAIT)
        for pipe in (child.stdout, child.stderr):
            if pipe is not None:
                pipe.close()


def replay_and_check(url: str, log: list[ChargeItem]) -> None:
    """Replay the whole log in the child's batches; check exactly-once and the balances."""
    with open_store(url) as store:
        meter = BalanceManager(store, CONFIG)
        for first in range(0, len(log), BATCH):
            results = meter.charge_many(log[first : first + BATCH])
            assert all(result.ok for result in results), [r.error for r in results if not r.ok]
            for result in results:
                assert result.entry.request_id == result.item.request_id
        expected: Counter[str] = Counter()
        for item in log:
            expected[item.user_id] += int(item.amount)
        seen: Counter[str] = Counter()
        for user in sorted(expected):
            ledger = store.ledger(user)
            seen.update(entry.request_id for entry in ledger if entry.request_id is not None)
            balance = store.load(user).balance
            assert balance == START - expected[user]
            assert sum(entry.amount for entry in ledger) == balance
        assert seen == Counter(item.request_id for item in log)


@pytest.mark.parametrize("kind", ["sqlite-full", "redis", "postgres"])
def test_a_batch_killed_midway_and_replayed_applies_each_item_once(kind, store_url, report):
    log = the_log(ITEMS)
    base = store_url(kind)
    tries = 0
    for _ in range(KILLS):
        for _ in range(TRIES):
            tries += 1
            # A fresh place per try: another file, or another key / table prefix.
            if kind == "sqlite-full":
                url = base.replace("credits.db", f"credits-{tries}.db")
            else:
                url = base.replace("prefix=", f"prefix=t{tries}")
            try:
                if kill_midway(url, log):
                    replay_and_check(url, log)
                    break
            finally:
                if kind != "sqlite-full":
                    _drop(kind, url)
        else:
            pytest.fail(f"the child finished {TRIES} times before a poll saw it midway")
    report("batch_replay", kind=kind, items=ITEMS, kills=KILLS, tries=tries)


def _drop(kind: str, url: str) -> None:
    """Remove a namespace this test made beside the fixture's own."""
    from services import drop_postgres_tables, drop_redis_keys  # noqa: PLC0415

    prefix = url.split("prefix=", 1)[1].split("&", 1)[0]
    if kind == "redis":
        drop_redis_keys(prefix)
    else:
        drop_postgres_tables(prefix)


# --- cancellation --------------------------------------------------------------------------


class _CancelledAt:
    """Await a coroutine, cancelling the awaiting task just as the coroutine suspends the k-th time.

    ``reached`` says whether it suspended that often; if not, it ran to its end.
    """

    def __init__(self, coro: Any, k: int) -> None:
        self.coro = coro
        self.k = k
        self.reached = False

    def __await__(self) -> Any:
        inner = self.coro.__await__()
        value: Any = None
        error: BaseException | None = None
        count = 0
        while True:
            try:
                yielded = inner.send(value) if error is None else inner.throw(error)
            except StopIteration as stop:
                return stop.value
            count += 1
            if count == self.k:
                self.reached = True
                task = asyncio.current_task()
                assert task is not None
                task.cancel()
            try:
                value, error = (yield yielded), None
            except BaseException as exc:
                value, error = None, exc


async def _cancel_at(coro: Any, k: int) -> bool:
    step = _CancelledAt(coro, k)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(asyncio.ensure_future(step), WAIT)
    return step.reached


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis", "postgres"])
def test_a_cancelled_batch_holds_nothing_and_a_replay_applies_each_item_once(kind, tmp_path):
    async def heard(event: Any) -> None:
        await asyncio.sleep(0)  # a callback that suspends: a cancel may land while telling

    async def main() -> int:
        async with open_async_store(kind, tmp_path) as store:
            meter = AsyncBalanceManager(store, CONFIG, on_event=heard)
            k = 1
            while True:
                log = [
                    ChargeItem(f"k{k}-u{n % 3}", n + 1, request_id=f"c{n}", strict=n % 4 == 0)
                    for n in range(12)
                ]
                reached = await _cancel_at(meter.charge_many(log), k)
                assert not any(lock.locked() for lock in meter._locks)
                for user in {item.user_id for item in log}:
                    seen = meter._seen.get(user)
                    assert seen is None or seen == await store.load(user)
                results = await meter.charge_many(log)
                assert all(result.ok for result in results)
                for user in {item.user_id for item in log}:
                    ledger = await store.ledger(user)
                    mine = [item for item in log if item.user_id == user]
                    ids = [entry.request_id for entry in ledger if entry.request_id is not None]
                    assert sorted(ids) == sorted(item.request_id for item in mine)
                    spent = sum(int(item.amount) for item in mine)
                    assert (await store.load(user)).balance == START - spent
                    assert sum(entry.amount for entry in ledger) == START - spent
                if not reached:
                    return k - 1
                k += 1

    loop = asyncio.new_event_loop()
    try:
        points = loop.run_until_complete(main())
    finally:
        loop.close()
    if kind != "memory":  # AsyncMemoryStore never suspends: nothing to cancel at
        assert points > 0
