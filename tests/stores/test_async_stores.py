"""The async stores' own: SQLite off the loop, URLs, closed stores, sync and async on one file.

What the async manager does on every async store (the sync behaviour,
awaited; tasks on one user; two managers on one place) is in tests/manager/,
where every test also runs on the async backends.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from creditmeter import (
    AsyncBalanceManager,
    AsyncMemoryStore,
    AsyncSQLiteStore,
    BalanceConfig,
    BalanceManager,
    ConfigError,
    SQLiteStore,
    StoreError,
    open_async_store,
)

START = 10**9


def run(coroutine):
    return asyncio.run(coroutine)


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
