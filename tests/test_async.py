"""AsyncBalanceManager and the async stores: the sync behaviour, awaited, off the loop.

The state machine (test_state_machine.py) and the contract suite
(test_contract.py) also run against the async stores and manager.
"""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta

import pytest

from creditmeter import (
    AsyncBalanceManager,
    AsyncMemoryStore,
    AsyncSQLiteStore,
    BalanceConfig,
    BalanceManager,
    ConfigError,
    EntryKind,
    IdempotencyConflict,
    InsufficientBalance,
    SQLiteStore,
    StoreError,
    open_async_store,
)
from creditmeter.testing import FakeClock

START = 10**9


def run(coroutine):
    return asyncio.run(coroutine)


@pytest.fixture(params=["memory", "sqlite"])
def make_store(request, tmp_path):
    def make():
        if request.param == "memory":
            return AsyncMemoryStore()
        return AsyncSQLiteStore(tmp_path / "credits.db")

    return make


def test_the_same_rules_awaited(make_store):
    async def main():
        clock = FakeClock()
        config = BalanceConfig(
            enabled=True,
            auto_refill_enabled=True,
            refill_interval_value=1,
            refill_interval_unit="days",
            refill_amount=500,
        )
        async with AsyncBalanceManager(make_store(), config, clock=clock) as meter:
            assert await meter.balance("u") == 20000
            first = await meter.charge("u", 20000, request_id="r")
            assert await meter.charge("u", 20000, request_id="r") == first
            with pytest.raises(IdempotencyConflict):
                await meter.charge("u", 1, request_id="r")
            assert not (await meter.check("u", 1)).allowed
            with pytest.raises(InsufficientBalance):
                await meter.require("u")
            clock.advance(timedelta(days=1))
            refill = await meter.maybe_refill("u")
            assert refill is not None
            assert refill.amount == 500
            await meter.grant("u", 5, reason="thanks")
            await meter.set_balance("u", 42)
            kinds = [e.kind for e in await meter.ledger("u")]
            assert kinds == [
                EntryKind.OPEN,
                EntryKind.CHARGE,
                EntryKind.REFILL,
                EntryKind.GRANT,
                EntryKind.ADJUST,
            ]
            assert [e.kind for e in await meter.ledger("u", limit=1)] == [EntryKind.ADJUST]
            assert await meter.users() == ["u"]
            assert (await meter.account("u")).balance == 42

    run(main())


def test_tasks_charging_one_user_are_all_applied(make_store):
    async def main():
        config = BalanceConfig(enabled=True, start_balance=START)
        async with AsyncBalanceManager(make_store(), config) as meter:
            await asyncio.gather(*(meter.charge("hot", 1, request_id=f"t{n}") for n in range(200)))
            entries = await meter.ledger("hot")
            assert len([e for e in entries if e.kind is EntryKind.CHARGE]) == 200
            assert await meter.balance("hot") == START - 200

    run(main())


def test_two_async_managers_on_one_sqlite_file_retry_their_conflicts(tmp_path):
    async def main():
        config = BalanceConfig(enabled=True, start_balance=START)
        path = tmp_path / "credits.db"
        async with (
            AsyncBalanceManager(AsyncSQLiteStore(path), config) as one,
            AsyncBalanceManager(AsyncSQLiteStore(path), config) as two,
        ):
            await one.account("hot")
            await asyncio.gather(*(m.charge("hot", 1) for _ in range(100) for m in (one, two)))
            assert await one.balance("hot") == START - 200
            assert len(await two.ledger("hot")) == 201

    run(main())


def test_sqlite_work_never_runs_on_the_event_loop_thread(tmp_path):
    threads = set()

    class Recording(AsyncSQLiteStore):
        def __init__(self, path):
            super().__init__(path)
            original = self.sync.commit

            def commit(*args, **kwargs):
                threads.add(threading.get_ident())
                return original(*args, **kwargs)

            self.sync.commit = commit

    async def main():
        async with AsyncBalanceManager(Recording(tmp_path / "c.db"), BalanceConfig()) as meter:
            await meter.grant("u", 1)
            return threading.get_ident()

    loop_thread = run(main())
    assert threads
    assert loop_thread not in threads


def test_open_async_store_urls(tmp_path):
    async def main():
        memory = open_async_store("memory://")
        sqlite = open_async_store(f"sqlite:///{tmp_path}/x.db?durability=normal")
        assert isinstance(memory, AsyncMemoryStore)
        assert isinstance(sqlite, AsyncSQLiteStore)
        assert sqlite.sync.durability == "normal"
        await memory.aclose()
        await sqlite.aclose()
        with pytest.raises(ConfigError, match="known schemes"):
            open_async_store("mongodb://x")

    run(main())


@pytest.mark.parametrize(
    "url",
    ["mongodb://admin:pw-1@db/x", "mongodb://admin:pw-1@[db/x", "nope://:pw-1@[::1"],
)
def test_an_unknown_store_url_never_shows_its_password(url):
    # Tried: a parsable URL, and two that urlsplit cannot read (which were shown whole).
    with pytest.raises(ConfigError, match="known schemes") as caught:
        open_async_store(url)
    assert "pw-1" not in str(caught.value)
    assert "***" in str(caught.value)


def test_a_closed_async_store_refuses_work(tmp_path):
    async def main():
        store = AsyncSQLiteStore(tmp_path / "c.db")
        await store.aclose()
        with pytest.raises(StoreError, match="closed"):
            await store.load("u")

    run(main())


def test_async_sqlite_sees_sync_writes(tmp_path):
    path = tmp_path / "c.db"
    with SQLiteStore(path) as sync_store:
        BalanceManager(sync_store, BalanceConfig(enabled=True)).charge("u", 5)

    async def main():
        async with AsyncBalanceManager(AsyncSQLiteStore(path), BalanceConfig(enabled=True)) as m:
            return await m.balance("u")

    assert run(main()) == 20000 - 5
