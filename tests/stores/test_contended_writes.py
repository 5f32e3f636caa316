"""Writers of one hot user: how the Redis and PostgreSQL stores take turns (issue 14).

Redis: a commit that meets another writer's lock, from the version stored,
waits for the lock and is sent again (at most ``lock_wait``), so a manager
retries a lost compare-and-set at once ``contention_retries`` times before
it queues. PostgreSQL: ``exclusive()`` reads the account in the round trip
that takes the lock, with a snapshot taken once the lock is granted.
"""

from __future__ import annotations

import asyncio
import re
import threading
from decimal import Decimal

import pytest

redis = pytest.importorskip("redis", reason="the [redis] extra is not installed")
psycopg = pytest.importorskip("psycopg", reason="the [postgres] extra is not installed")

from psycopg import sql  # noqa: E402
from services import POSTGRES_DSN, REDIS_URL, need, unique  # noqa: E402

from creditmeter import (  # noqa: E402
    AsyncPostgresStore,
    AsyncRedisStore,
    BalanceConfig,
    BalanceManager,
    PostgresStore,
    RedisStore,
    StoreError,
    VersionConflict,
)
from creditmeter.testing import make_account  # noqa: E402

START = 10**9
CONFIG = BalanceConfig(enabled=True, start_balance=START)


def _ping() -> None:
    with redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2) as client:
        client.ping()


def _connect() -> None:
    psycopg.connect(POSTGRES_DSN, connect_timeout=3).close()


@pytest.fixture
def redis_prefix():
    need("redis", _ping)
    chosen = unique("cmtest:")
    yield chosen
    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", chosen) + "*"
    with redis.Redis.from_url(REDIS_URL) as client:
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            client.delete(*keys)


@pytest.fixture
def pg_prefix():
    need("postgres", _connect)
    chosen = unique("cm_") + "_"
    yield chosen
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        names = sql.SQL(", ").join(
            sql.Identifier(chosen + name) for name in ("accounts", "ledger", "meta")
        )
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(names))


def redis_keys(prefix: str, user: str = "alice") -> list[bytes]:
    with redis.Redis.from_url(REDIS_URL) as client:
        tag = f"{prefix}{{u{user.encode().hex()}}}:"
        return sorted(
            key for key in client.scan_iter(match=tag.replace("{", "\\{") + "*") if b"lock" in key
        )


# --- Redis: a commit waits for another writer's lock --------------------------------


def test_redis_commit_held_off_by_a_lock_is_sent_again_once_it_is_let_go(redis_prefix):
    with (
        RedisStore(REDIS_URL, prefix=redis_prefix) as holder,
        RedisStore(REDIS_URL, prefix=redis_prefix) as other,
    ):
        holder.commit(make_account(), [], expected_version=None)
        result: list[object] = []
        started = threading.Event()

        def commit_behind_the_lock() -> None:
            started.set()
            try:
                other.commit(make_account(version=2, balance=Decimal(7)), [], expected_version=1)
                result.append("applied")
            except Exception as exc:  # reported to the test thread
                result.append(exc)

        with holder.exclusive("alice"):
            thread = threading.Thread(target=commit_behind_the_lock)
            thread.start()
            started.wait()
            thread.join(0.05)
            assert thread.is_alive()  # held off while the lock is held
            assert holder.load("alice").version == 1
        thread.join(10)  # the block wrote nothing and let go: the commit is good again
        assert result == ["applied"]
        assert other.load("alice").balance == 7
    assert redis_keys(redis_prefix) == []


def test_redis_commit_held_off_then_overtaken_is_a_conflict_with_the_winner(redis_prefix):
    with (
        RedisStore(REDIS_URL, prefix=redis_prefix) as holder,
        RedisStore(REDIS_URL, prefix=redis_prefix) as other,
    ):
        holder.commit(make_account(), [], expected_version=None)
        result: list[object] = []

        def commit_behind_the_lock() -> None:
            try:
                other.commit(make_account(version=2), [], expected_version=1)
            except VersionConflict as conflict:
                result.append(conflict.current)

        with holder.exclusive("alice"):
            thread = threading.Thread(target=commit_behind_the_lock)
            thread.start()
            thread.join(0.05)
            winner = make_account(version=2, balance=Decimal(3))
            holder.commit(winner, [], expected_version=1)
        thread.join(10)
        assert result == [winner]  # it lost to the holder, and was told what won
        assert len(holder.ledger("alice")) == 0
    assert redis_keys(redis_prefix) == []


def test_async_redis_commit_cancelled_while_held_off_writes_nothing_and_holds_nothing(
    redis_prefix,
):
    async def main() -> None:
        async with (
            AsyncRedisStore(REDIS_URL, prefix=redis_prefix) as holder,
            AsyncRedisStore(REDIS_URL, prefix=redis_prefix) as other,
        ):
            await holder.commit(make_account(), [], expected_version=None)
            async with holder.exclusive("alice"):
                waiting = asyncio.ensure_future(
                    other.commit(make_account(version=2), [], expected_version=1)
                )
                await asyncio.sleep(0.02)
                assert not waiting.done()
                waiting.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await waiting
            assert (await holder.load("alice")).version == 1  # the cancelled commit never applied
            # Nothing left behind: the next writer commits in one go.
            await other.commit(make_account(version=2), [], expected_version=1)
            assert (await other.load("alice")).version == 2

    asyncio.run(main())
    assert redis_keys(redis_prefix) == []


def test_redis_commit_behind_a_killed_holders_lock_waits_only_for_its_lease(redis_prefix):
    """A holder that vanished (its lock left behind) keeps a commit out for its lease only."""
    with RedisStore(REDIS_URL, prefix=redis_prefix, lock_wait=10) as store:
        store.commit(make_account(), [], expected_version=None)
        lock = f"{redis_prefix}{{u{b'alice'.hex()}}}:lock"
        with redis.Redis.from_url(REDIS_URL) as client:
            client.set(lock, "a-killed-writer", px=300)
        store.commit(make_account(version=2), [], expected_version=1)  # waits out the lease
        assert store.load("alice").version == 2
    assert redis_keys(redis_prefix) == []


def test_manager_retries_at_once_then_queues_as_the_store_says(redis_prefix, monkeypatch):
    """``contention_retries`` losses in a row, then ``exclusive()``; 0: the queue at once.

    A grant: a plain charge would go as a delta after its loss (test_redis_delta.py).
    """
    with (
        RedisStore(REDIS_URL, prefix=redis_prefix) as store,
        RedisStore(REDIS_URL, prefix=redis_prefix) as other,
    ):
        manager = BalanceManager(store, CONFIG)
        manager.charge("u", 1)
        BalanceManager(other, CONFIG).charge("u", 5)  # the manager's account is stale now
        sent: list[str] = []
        evalsha = store.client.evalsha
        names = {store._commit_script.sha: "commit", store._acquire_script.sha: "acquire"}

        def counting(sha: str, *args: object) -> object:
            sent.append(names.get(sha, "other"))
            return evalsha(sha, *args)

        monkeypatch.setattr(store.client, "evalsha", counting)
        monkeypatch.setattr(store, "contention_retries", 0)
        manager.grant("u", 1)
        assert sent == ["commit", "acquire", "commit"]  # lost, then in turn
        assert manager.balance("u") == START - 5


# --- PostgreSQL: exclusive() reads the account with the lock ---------------------------


def test_postgres_exclusive_reads_the_account_in_the_lock_round_trip(pg_prefix, monkeypatch):
    with PostgresStore(POSTGRES_DSN, prefix=pg_prefix) as store:
        BalanceManager(store, CONFIG).charge("u", 1)
        statements: list[bytes] = []
        fetch = store._fetch

        def counting(action, user_id, query, params):  # type: ignore[no-untyped-def]
            statements.append(query)
            return fetch(action, user_id, query, params)

        monkeypatch.setattr(store, "_fetch", counting)
        with store.exclusive("u"):
            first = store.load("u")
            assert statements == []  # read with the lock
            assert store.load("u") == first  # a second read goes to the server
            assert len(statements) == 1
        with store.exclusive("nobody"):
            assert store.load("nobody") is None


def test_postgres_exclusive_waiter_reads_what_the_holder_committed(pg_prefix):
    """The read behind the lock sees a commit made while it waited (its snapshot is later)."""
    with (
        PostgresStore(POSTGRES_DSN, prefix=pg_prefix) as one,
        PostgresStore(POSTGRES_DSN, prefix=pg_prefix, create_schema=False) as two,
    ):
        manager = BalanceManager(one, CONFIG)
        manager.charge("u", 1)
        seen: list[object] = []

        def waiter() -> None:
            with two.exclusive("u"):
                seen.append(two.load("u"))

        with one.exclusive("u"):
            account = one.load("u")
            thread = threading.Thread(target=waiter)
            thread.start()
            thread.join(0.1)
            assert thread.is_alive()  # waiting for the lock
            assert account is not None
            manager.charge("u", 2)  # inside the block: committed, and the lock handed on
        thread.join(10)
        assert len(seen) == 1
        assert seen[0].version == one.load("u").version
        assert seen[0].balance == START - 3


def test_async_postgres_cancelled_exclusive_waiter_holds_nothing(pg_prefix):
    async def main() -> None:
        one = await AsyncPostgresStore.open(POSTGRES_DSN, prefix=pg_prefix)
        two = await AsyncPostgresStore.open(POSTGRES_DSN, prefix=pg_prefix, create_schema=False)
        try:
            await one.commit(make_account(), [], expected_version=None)
            async with one.exclusive("alice"):
                waiter = asyncio.ensure_future(two.exclusive("alice").__aenter__())
                await asyncio.sleep(0.05)
                assert not waiter.done()
                waiter.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await waiter
                await one.commit(make_account(version=2), [], expected_version=1)
            assert two._pinned.get() is None
            async with two.exclusive("alice"):  # free: taken at once, with the account
                assert (await two.load("alice")).version == 2
        finally:
            await one.aclose()
            await two.aclose()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_postgres_held_lock_keeps_a_commit_waiting_within_lock_timeout(pg_prefix):
    with (
        PostgresStore(POSTGRES_DSN, prefix=pg_prefix) as one,
        PostgresStore(POSTGRES_DSN, prefix=pg_prefix, create_schema=False, lock_timeout=0.2) as two,
    ):
        one.commit(make_account(), [], expected_version=None)
        with one.exclusive("alice"), pytest.raises(StoreError, match="lock"):
            two.commit(make_account(version=2), [], expected_version=1)
        assert one.load("alice").version == 1
