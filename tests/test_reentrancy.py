"""Callbacks that call the manager back: events are told after the user's lock is let go.

An ``on_event`` callback may write through the manager that told it: a
``LowBalance`` auto top-up grants the same user, a ``Charged`` event bills an
organisation (a user on the same lock stripe, found with
``hash(id) % LOCK_STRIPES``), a ``Denied`` event of a strict charge grants the
user, a ``ConflictRetried`` event reads the balance. Each runs sync (a thread
joined with a timeout) and async (an ``async def`` callback, awaited, under
``asyncio.wait_for``), on MemoryStore, SQLite, Redis and PostgreSQL. Events
of one call keep their order.

Before the fix the sync callbacks deadlocked on the manager's lock stripe
(the thread never finished) and the async callbacks were never awaited.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from services import (
    POSTGRES_DSN,
    REDIS_URL,
    drop_postgres_tables,
    drop_redis_keys,
    need,
    reach_postgres,
    reach_redis,
    unique,
)

from creditmeter import (
    AsyncBalanceManager,
    AsyncMemoryStore,
    AsyncSQLiteStore,
    BalanceConfig,
    BalanceManager,
    Charged,
    ConflictRetried,
    Denied,
    Granted,
    InsufficientBalance,
    LowBalance,
    MemoryStore,
    SQLiteStore,
)
from creditmeter._base import LOCK_STRIPES

WAIT = 10.0  # seconds a scenario may take before it counts as a deadlock
KINDS = ["memory", "sqlite", "redis", "postgres"]
CONFIG = BalanceConfig(enabled=True, start_balance=1000)


# --- stores of every kind, cleaned up after ----------------------------------------


@contextlib.contextmanager
def open_store(kind: str, folder: Path) -> Iterator[Any]:
    """A fresh sync store of ``kind``; its server-side data is dropped after."""
    if kind == "memory":
        with MemoryStore() as store:
            yield store
    elif kind == "sqlite":
        with SQLiteStore(folder / "credits.db", durability="normal") as store:
            yield store
    elif kind == "redis":
        need("redis", reach_redis)
        from creditmeter.stores.redis import RedisStore  # noqa: PLC0415 - the [redis] extra

        prefix = unique("cmre:")
        try:
            with RedisStore(REDIS_URL, prefix=prefix) as store:
                yield store
        finally:
            drop_redis_keys(prefix)
    else:
        need("postgres", reach_postgres)
        from creditmeter.stores.postgres import PostgresStore  # noqa: PLC0415

        prefix = unique("cmre_") + "_"
        try:
            with PostgresStore(POSTGRES_DSN, prefix=prefix) as store:
                yield store
        finally:
            drop_postgres_tables(prefix)


@contextlib.asynccontextmanager
async def open_async_store(kind: str, folder: Path) -> AsyncIterator[Any]:
    """A fresh async store of ``kind``; its server-side data is dropped after."""
    if kind == "memory":
        async with AsyncMemoryStore() as store:
            yield store
    elif kind == "sqlite":
        # "normal": no fsync per commit (these tests are about locks, not power cuts).
        async with AsyncSQLiteStore(folder / "credits.db", durability="normal") as store:
            yield store
    elif kind == "redis":
        need("redis", reach_redis)
        from creditmeter.stores.redis import AsyncRedisStore  # noqa: PLC0415

        prefix = unique("cmre:")
        try:
            async with AsyncRedisStore(REDIS_URL, prefix=prefix) as store:
                yield store
        finally:
            drop_redis_keys(prefix)
    else:
        need("postgres", reach_postgres)
        from creditmeter.stores.postgres import AsyncPostgresStore  # noqa: PLC0415

        prefix = unique("cmre_") + "_"
        try:
            async with AsyncPostgresStore(POSTGRES_DSN, prefix=prefix) as store:
                yield store
        finally:
            drop_postgres_tables(prefix)


def same_stripe(user: str) -> str:
    """Another id on ``user``'s lock stripe in this process (str hashes vary per process)."""
    stripe = hash(user) % LOCK_STRIPES
    for number in itertools.count():
        other = f"org-{number}"
        if hash(other) % LOCK_STRIPES == stripe:
            return other
    raise AssertionError("unreachable")  # pragma: no cover


def finishes(scenario: Callable[[], object]) -> object:
    """Run ``scenario`` in a thread; fail (not hang) if it has not finished within WAIT."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = scenario()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive(), "deadlocked: the call never returned"
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome.get("result")


def in_loop(main: Callable[[], Any]) -> Any:
    """Run an async scenario; fail (not hang) if it has not finished within WAIT."""

    async def bounded() -> Any:
        return await asyncio.wait_for(main(), WAIT)

    return asyncio.run(bounded())


# --- sync --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_low_balance_top_up_from_the_callback(kind, tmp_path):
    heard: list[object] = []

    def top_up(event: object) -> None:
        heard.append(event)
        if isinstance(event, LowBalance):
            meter.grant(event.user_id, 500, reason="auto top-up")

    with open_store(kind, tmp_path) as store:
        meter = BalanceManager(store, CONFIG, on_event=top_up, low_balance_threshold=100)
        entry = finishes(lambda: meter.charge("alice", 950))
        assert meter.balance("alice") == 1000 - 950 + 500
        # One call's events in order: the charge, then the crossing; the grant's own after.
        assert [type(event) for event in heard] == [Charged, LowBalance, Granted]
        assert heard[0].entry == entry
        ledger = meter.ledger("alice")
        assert sum(e.amount for e in ledger) == ledger[-1].balance_after == 550


@pytest.mark.parametrize("kind", KINDS)
def test_billing_an_org_on_the_same_lock_stripe(kind, tmp_path):
    user = "alice"
    org = same_stripe(user)
    assert org != user
    assert hash(org) % LOCK_STRIPES == hash(user) % LOCK_STRIPES

    def bill_org(event: object) -> None:
        if isinstance(event, Charged) and event.user_id == user:
            meter.charge(org, -event.entry.amount, request_id=f"org:{event.entry.id}")

    with open_store(kind, tmp_path) as store:
        meter = BalanceManager(store, CONFIG, on_event=bill_org)
        finishes(lambda: [meter.charge(user, 10) for _ in range(3)])
        assert meter.balance(user) == 970
        assert meter.balance(org) == 970


@pytest.mark.parametrize("kind", KINDS)
def test_denied_strict_charge_grants_from_the_callback(kind, tmp_path):
    def on_denied(event: object) -> None:
        if isinstance(event, Denied):
            meter.grant(event.user_id, event.cost)

    with open_store(kind, tmp_path) as store:
        meter = BalanceManager(store, CONFIG, on_event=on_denied)

        def refused_then_paid() -> Decimal:
            with pytest.raises(InsufficientBalance):
                meter.charge("alice", 5000, strict=True)
            return meter.charge("alice", 5000, strict=True).balance_after

        assert finishes(refused_then_paid) == 1000


def test_conflict_retried_callback_reads_the_manager(tmp_path):
    path = tmp_path / "credits.db"
    heard: list[object] = []

    def on_conflict(event: object) -> None:
        if isinstance(event, ConflictRetried):
            heard.append(("balance", first.balance(event.user_id)))
        else:
            heard.append(type(event))

    with SQLiteStore(path) as one, SQLiteStore(path) as two:
        first = BalanceManager(one, CONFIG, on_event=on_conflict)
        second = BalanceManager(two, CONFIG)
        first.charge("alice", 1)
        second.charge("alice", 1)  # first's remembered account is stale now
        finishes(lambda: first.charge("alice", 1))
        # The retry's event is told after the call, before its charge's, in order.
        assert heard == [Charged, ("balance", 997), Charged]
        assert first.balance("alice") == 997


def test_two_threads_billing_each_other_never_deadlock():
    """Thread one charges A, whose callback bills B; thread two the reverse (lock order A-B, B-A).

    With callbacks told under the lock, each thread held its user's stripe
    while waiting for the other's: a deadlock within a few rounds.
    """
    rounds = 200
    partner = {"a": "b", "b": "a"}

    def bill(event: object) -> None:
        if isinstance(event, Charged) and not (event.entry.metadata or {}).get("billed"):
            meter.charge(partner[event.user_id], 1, metadata={"billed": True})

    with MemoryStore() as store:
        meter = BalanceManager(
            store, BalanceConfig(enabled=True, start_balance=10**6), on_event=bill
        )

        def both() -> None:
            threads = [
                threading.Thread(target=lambda u=u: [meter.charge(u, 1) for _ in range(rounds)])
                for u in ("a", "b")
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(WAIT)
                assert not thread.is_alive()

        finishes(both)
        assert meter.balance("a") == meter.balance("b") == 10**6 - 2 * rounds


# --- async -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_async_low_balance_top_up_from_the_callback(kind, tmp_path):
    async def main() -> None:
        heard: list[object] = []

        async def top_up(event: object) -> None:
            heard.append(event)
            if isinstance(event, LowBalance):
                await meter.grant(event.user_id, 500, reason="auto top-up")

        async with open_async_store(kind, tmp_path) as store:
            meter = AsyncBalanceManager(store, CONFIG, on_event=top_up, low_balance_threshold=100)
            await meter.charge("alice", 950)
            assert await meter.balance("alice") == 550
            assert [type(event) for event in heard] == [Charged, LowBalance, Granted]

    in_loop(main)


@pytest.mark.parametrize("kind", KINDS)
def test_async_billing_an_org_on_the_same_lock_stripe(kind, tmp_path):
    user = "alice"
    org = same_stripe(user)

    async def main() -> None:
        async def bill_org(event: object) -> None:
            if isinstance(event, Charged) and event.user_id == user:
                await meter.charge(org, -event.entry.amount)

        async with open_async_store(kind, tmp_path) as store:
            meter = AsyncBalanceManager(store, CONFIG, on_event=bill_org)
            for _ in range(3):
                await meter.charge(user, 10)
            assert await meter.balance(org) == 970

    in_loop(main)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_async_denied_strict_charge_grants_from_the_callback(kind, tmp_path):
    async def main() -> None:
        async def on_denied(event: object) -> None:
            if isinstance(event, Denied):
                await meter.grant(event.user_id, event.cost)

        async with open_async_store(kind, tmp_path) as store:
            meter = AsyncBalanceManager(store, CONFIG, on_event=on_denied)
            with pytest.raises(InsufficientBalance):
                await meter.charge("alice", 5000, strict=True)
            assert (await meter.charge("alice", 5000, strict=True)).balance_after == 1000

    in_loop(main)


def test_async_plain_callbacks_still_hear_every_event_in_order():
    async def main() -> list[object]:
        heard: list[object] = []
        async with AsyncBalanceManager(
            AsyncMemoryStore(), CONFIG, on_event=heard.append, low_balance_threshold=100
        ) as meter:
            await meter.grant("alice", 1)
            await meter.charge("alice", 950)
            with pytest.raises(InsufficientBalance):
                await meter.charge("alice", 5000, strict=True)
        return heard

    heard = in_loop(main)
    assert [type(event) for event in heard] == [Granted, Charged, LowBalance, Denied]
