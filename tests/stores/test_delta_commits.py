"""Charges of a hot user as deltas on PostgreSQL: one statement each, none lost to another.

A manager whose compare-and-set lost, or whose user is hot, sends a plain
charge as ``commit_delta``: the server adds the cost to the balance it holds,
guarded by the rules' preconditions. Tried here on the real server:

- the statements a stale manager's charge sends (the lost commit, then one
  delta), and a delta whose guard fails (a refill setting changed under it),
  which falls back to ``exclusive()``;
- four processes (two sync, two async managers) charging one user with
  request ids, then every request sent again from a new process: each charge
  lands once, the ledger chains, and the balance is the start less the
  charges;
- an async delta cancelled while it waits for the row's lock: nothing written,
  no lock or connection kept, and the next charge works; the same for a
  manager's charge cancelled there, which also forgets the account it saw;
- a server that drops the connection under a delta: ``StoreError``, nothing
  half-written, and the next charge works (``tests/reliability/test_faults.py``
  sweeps a terminated backend and a lost reply over the delta statement too).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
from decimal import Decimal
from typing import Any

import pytest

if os.environ.get("CREDITMETER_REQUIRE_SERVICES") != "1":
    pytest.importorskip("psycopg", reason="the [postgres] extra (psycopg) is not installed")

import psycopg
from psycopg import sql
from services import POSTGRES_DSN, need, reach_postgres, unique

from creditmeter import (
    AsyncBalanceManager,
    BalanceConfig,
    BalanceManager,
    ConflictRetried,
    EntryKind,
    RefillSettings,
    StoreError,
    rules,
)
from creditmeter._ids import new_id
from creditmeter.stores.postgres import AsyncPostgresStore, PostgresStore

START = 10**6
CONFIG = BalanceConfig(enabled=True, start_balance=START)


@pytest.fixture
def prefix():
    need("postgres", reach_postgres)
    chosen = unique("cm_") + "_"
    yield chosen
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        names = sql.SQL(", ").join(
            sql.Identifier(chosen + name) for name in ("accounts", "ledger", "meta")
        )
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(names))


def statement(query: bytes) -> str:
    for piece, name in ((b"WITH cas AS", "commit"), (b"WITH d AS (UPDATE", "delta")):
        if piece in query:
            return name
    return "other"


def sent_by(store: PostgresStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the statements the store's writes and locks send, in order."""
    sent: list[str] = []
    execute = store._execute_commit
    fetch = store._fetch

    def counting_commit(pinned: Any, query: bytes, params: Any) -> Any:
        sent.append(statement(query))
        return execute(pinned, query, params)

    def counting_fetch(action: str, user_id: Any, query: bytes, params: Any) -> Any:
        sent.append("read")
        return fetch(action, user_id, query, params)

    lock_and_read = store._lock_and_read

    def counting_lock(*args: Any, **kwargs: Any) -> Any:
        sent.append("lock")  # exclusive(): the advisory lock, and the account with it
        return lock_and_read(*args, **kwargs)

    monkeypatch.setattr(store, "_execute_commit", counting_commit)
    monkeypatch.setattr(store, "_fetch", counting_fetch)
    monkeypatch.setattr(store, "_lock_and_read", counting_lock)
    return sent


def chained(entries: list[Any]) -> bool:
    total = Decimal(0)
    for entry in entries:
        total += entry.amount
        if entry.balance_after != total:
            return False
    return True


def test_a_stale_managers_charge_is_one_lost_commit_then_one_delta(prefix, monkeypatch):
    with (
        PostgresStore(POSTGRES_DSN, prefix=prefix) as one,
        PostgresStore(POSTGRES_DSN, prefix=prefix, create_schema=False) as two,
    ):
        heard: list[Any] = []
        stale = BalanceManager(one, CONFIG, on_event=heard.append)
        other = BalanceManager(two, CONFIG)
        stale.charge("u", 1)
        other.charge("u", Decimal("2.5"))  # what `stale` saw is old now
        sent = sent_by(one, monkeypatch)
        entry = stale.charge("u", Decimal("0.25"), request_id="r-1", metadata={"n": 1})
        assert sent == ["commit", "delta"]
        assert entry.balance_after == START - Decimal("3.75")
        assert entry.amount == Decimal("-0.25")
        assert ConflictRetried(user_id="u") in heard
        assert one.ledger("u")[-1] == entry
        # Hot now: the next charge goes as a delta at once, from the account it returned.
        sent.clear()
        assert stale.charge("u", 1).balance_after == START - Decimal("4.75")
        assert sent == ["delta"]
        assert stale.account("u") == two.load("u")
        # A repeat of the request is answered with its entry, charging nothing.
        assert stale.charge("u", Decimal("0.25"), request_id="r-1", metadata={"n": 1}) == entry
        assert other.balance("u") == START - Decimal("4.75")
        assert chained(two.ledger("u"))


def test_a_delta_refused_by_its_guard_falls_back_to_the_queue(prefix, monkeypatch):
    """Settings changed after the loss it retries: the delta loses, ``exclusive()`` serves."""
    with (
        PostgresStore(POSTGRES_DSN, prefix=prefix) as one,
        PostgresStore(POSTGRES_DSN, prefix=prefix, create_schema=False) as two,
    ):
        heard: list[Any] = []
        stale = BalanceManager(one, CONFIG, on_event=heard.append)
        other = BalanceManager(two, CONFIG)
        stale.charge("u", 1)
        other.charge("u", 1)
        settings = RefillSettings(enabled=True, interval_value=1, interval_unit="days", amount=5)
        commit = one.commit

        def commit_then_configure(*args: Any, **kwargs: Any) -> None:
            try:
                commit(*args, **kwargs)
            finally:  # lost: what it reported is stale by the time the delta goes
                monkeypatch.setattr(one, "commit", commit)
                other.configure_refill("u", settings)

        monkeypatch.setattr(one, "commit", commit_then_configure)
        sent = sent_by(one, monkeypatch)
        entry = stale.charge("u", 1)
        assert sent == ["commit", "delta", "lock", "commit"]
        assert heard.count(ConflictRetried(user_id="u")) == 2  # two losses, two retries
        assert entry.balance_after == START - 3
        stored = two.load("u")
        assert stored is not None
        assert stored.refill == settings  # the delta did not write the stale settings back
        assert stored.balance == START - 3
        assert chained(two.ledger("u"))


def test_a_charge_the_stored_balance_would_clamp_is_no_delta(prefix, monkeypatch):
    with (
        PostgresStore(POSTGRES_DSN, prefix=prefix) as one,
        PostgresStore(POSTGRES_DSN, prefix=prefix, create_schema=False) as two,
    ):
        stale = BalanceManager(one, CONFIG)
        stale.charge("u", START - 5)
        BalanceManager(two, CONFIG).charge("u", 1)  # 4 left
        sent = sent_by(one, monkeypatch)
        entry = stale.charge("u", 50)  # clamped: planned afresh under the lock
        assert "delta" not in sent
        assert entry.amount == -4
        assert entry.cost == 50
        assert entry.balance_after == 0


def test_a_strict_charge_is_no_delta(prefix, monkeypatch):
    """A strict charge may refill or refuse: after a loss it is planned again under the lock."""
    with (
        PostgresStore(POSTGRES_DSN, prefix=prefix) as one,
        PostgresStore(POSTGRES_DSN, prefix=prefix, create_schema=False) as two,
    ):
        stale = BalanceManager(one, CONFIG)
        stale.charge("u", 1)
        BalanceManager(two, CONFIG).charge("u", 1)
        sent = sent_by(one, monkeypatch)
        assert stale.charge("u", 1, strict=True).balance_after == START - 3
        assert sent == ["commit", "lock", "commit"]


# --- processes -------------------------------------------------------------------------

PER_WRITER = 150


def _writer(prefix: str, index: int, barrier: Any, replay: bool) -> None:
    user = "hot"
    if index % 2 == 0:
        with PostgresStore(POSTGRES_DSN, prefix=prefix, create_schema=False) as store:
            manager = BalanceManager(store, CONFIG)
            manager.balance(user)
            barrier.wait(60)
            for n in range(PER_WRITER):
                manager.charge(user, Decimal("0.5"), request_id=f"w{index}-{n}")
        return

    async def run() -> None:
        store = await AsyncPostgresStore.open(POSTGRES_DSN, prefix=prefix, create_schema=False)
        try:
            manager = AsyncBalanceManager(store, CONFIG)
            await manager.balance(user)
            barrier.wait(60)
            for n in range(PER_WRITER):
                await manager.charge(user, Decimal("0.5"), request_id=f"w{index}-{n}")
        finally:
            await store.aclose()

    asyncio.run(run())


def test_four_processes_on_one_user_land_each_charge_once(prefix):
    with PostgresStore(POSTGRES_DSN, prefix=prefix) as store:
        BalanceManager(store, CONFIG).balance("hot")
    context = multiprocessing.get_context("spawn")
    for replay in (False, True):  # the second round sends every request again
        barrier = context.Barrier(4)
        writers = [
            context.Process(target=_writer, args=(prefix, index, barrier, replay))
            for index in range(4)
        ]
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join(120)
            assert writer.exitcode == 0
    with PostgresStore(POSTGRES_DSN, prefix=prefix, create_schema=False) as store:
        entries = store.ledger("hot")
        charges = [e for e in entries if e.kind is EntryKind.CHARGE]
        assert len(charges) == 4 * PER_WRITER
        assert len({e.request_id for e in charges}) == 4 * PER_WRITER
        assert store.load("hot").balance == START - Decimal("0.5") * 4 * PER_WRITER
        assert chained(entries)


# --- cancellation and outages ---------------------------------------------------------------


def _lock_row(prefix: str, user: str) -> psycopg.Connection[Any]:
    """A session that holds the user's account row (FOR UPDATE) until it rolls back."""
    conn = psycopg.connect(POSTGRES_DSN)
    table = sql.Identifier(prefix + "accounts")
    conn.execute(sql.SQL("SELECT 1 FROM {} WHERE user_id = %s FOR UPDATE").format(table), (user,))
    return conn


def test_async_delta_cancelled_behind_a_row_lock_writes_nothing_and_keeps_nothing(prefix):
    async def main() -> None:
        store = await AsyncPostgresStore.open(POSTGRES_DSN, prefix=prefix)
        try:
            manager = AsyncBalanceManager(store, CONFIG)
            await manager.charge("u", 1)
            seen = await store.load("u")
            planned = rules.charge_delta(
                seen, "u", Decimal(3), config=CONFIG, now=seen.updated_at, new_id=new_id
            )
            holder = _lock_row(prefix, "u")
            try:
                task = asyncio.ensure_future(
                    store.commit_delta(
                        planned.change.account, planned.change.entry, floor=planned.floor
                    )
                )
                done, _ = await asyncio.wait([task], timeout=0.3)
                assert not done  # waiting for the row
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            finally:
                holder.rollback()
                holder.close()
            assert await store.load("u") == seen
            assert len(await store.ledger("u")) == 2  # opening and the first charge
            reached = await store.commit_delta(
                planned.change.account, planned.change.entry, floor=planned.floor
            )
            assert reached[:2] == (START - 4, seen.version + 1)
            assert store._pool.get_stats().get("pool_available", 0) >= 1
        finally:
            await store.aclose()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_managers_delta_cancelled_forgets_what_it_saw(prefix, monkeypatch):
    """Cancelled in its delta (the lost commit's retry): nothing half-written, next call right."""

    async def main() -> None:
        one = await AsyncPostgresStore.open(POSTGRES_DSN, prefix=prefix)
        two = await AsyncPostgresStore.open(POSTGRES_DSN, prefix=prefix, create_schema=False)
        holder: list[psycopg.Connection[Any]] = []
        try:
            stale = AsyncBalanceManager(one, CONFIG)
            await stale.charge("u", 1)
            await AsyncBalanceManager(two, CONFIG).charge("u", 1)
            commit = one.commit

            async def commit_then_lock(*args: Any, **kwargs: Any) -> None:
                try:
                    await commit(*args, **kwargs)
                finally:  # the loss is reported; hold the row before the delta goes
                    holder.append(_lock_row(prefix, "u"))

            monkeypatch.setattr(one, "commit", commit_then_lock)
            task = asyncio.ensure_future(stale.charge("u", 5))
            done, _ = await asyncio.wait([task], timeout=0.5)
            assert not done
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            holder[0].rollback()
            monkeypatch.setattr(one, "commit", commit)
            assert "u" not in stale._seen
            assert (await two.load("u")).balance == START - 2
            assert (await stale.charge("u", 5)).balance_after == START - 7
            assert chained(await two.ledger("u"))
        finally:
            for conn in holder:
                conn.close()
            await one.aclose()
            await two.aclose()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_a_delta_on_a_dropped_connection_is_a_store_error_and_the_next_works(prefix):
    with (
        PostgresStore(POSTGRES_DSN, prefix=prefix) as one,
        PostgresStore(POSTGRES_DSN, prefix=prefix, create_schema=False) as two,
    ):
        BalanceManager(one, CONFIG).charge("u", 1)
        seen = one.load("u")
        planned = rules.charge_delta(
            seen, "u", Decimal(2), config=CONFIG, now=seen.updated_at, new_id=new_id
        )
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
            holder = _lock_row(prefix, "u")
            try:
                # The delta waits on the row; the server then ends its backend.
                outcome: list[BaseException | tuple[Any, ...]] = []

                def send() -> None:
                    try:
                        outcome.append(
                            two.commit_delta(
                                planned.change.account, planned.change.entry, floor=planned.floor
                            )
                        )
                    except BaseException as exc:  # reported below
                        outcome.append(exc)

                thread = threading.Thread(target=send)
                thread.start()
                pid = None
                for _ in range(200):
                    row = admin.execute(
                        "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND query LIKE 'WITH d AS (UPDATE%%'"
                    ).fetchone()
                    if row is not None:
                        pid = row[0]
                        break
                    thread.join(0.05)
                assert pid is not None, "the delta never waited on the row"
                admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                thread.join(30)
                assert not thread.is_alive()
            finally:
                holder.rollback()
                holder.close()
        assert isinstance(outcome[0], StoreError)
        assert two.load("u") == seen
        reached = two.commit_delta(
            planned.change.account, planned.change.entry, floor=planned.floor
        )
        assert reached[:2] == (START - 3, seen.version + 1)
        assert chained(two.ledger("u"))
