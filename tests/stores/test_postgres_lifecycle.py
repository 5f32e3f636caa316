"""PostgresStore and AsyncPostgresStore across a fork, cancellation, lock waits and URLs.

On the real server of ``services.py``; every test works under its own table
prefix and drops its tables afterwards.

- Fork: a store made and used before ``os.fork()`` (multiprocessing's fork
  start), then used by parent and child at once. Each side loads and charges
  users of its own, and both charge one shared user (whose writers lose
  compare-and-sets to each other, so some charges go as deltas); every load must
  return the user asked for, every charge must land once, neither side may
  hang, and the parent's connections must survive the child closing its
  store. The scenario runs in a subprocess of
  its own (``python tests/stores/test_postgres_lifecycle.py fork sync|async ...``),
  because a shared socket can hang a process in a blocking read. A store on a
  pool the caller gave cannot follow a fork: in the child it raises StoreError.
- Cancellation: an AsyncPostgresStore call cancelled at each of its await
  points in turn (and while it waits on the server or the pool) leaves the
  pool whole, no lock held, nothing half-written, and the next call works.
- Lock waits: a charge behind a user's row lock or advisory lock held by a
  session that never lets go ends with a ``StoreError`` naming the user and
  the wait, writes nothing, and the next charge works once the holder leaves.
- URLs: driver options reach the server exactly as percent-encoded in the URL;
  malformed URLs and bad creditmeter options are ``ConfigError``.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import subprocess
import sys
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

if os.environ.get("CREDITMETER_REQUIRE_SERVICES") != "1":
    pytest.importorskip("psycopg", reason="the [postgres] extra (psycopg) is not installed")

import attrs
import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool, ConnectionPool
from services import POSTGRES_DSN, need, reach_postgres, unique

from creditmeter import (
    AsyncBalanceManager,
    BalanceConfig,
    BalanceManager,
    ConfigError,
    StoreError,
)
from creditmeter.stores import open_async_store, open_store
from creditmeter.stores.postgres import AsyncPostgresStore, PostgresStore
from creditmeter.testing import make_entry

CONFIG = BalanceConfig(enabled=True, start_balance=10**6)
TESTS = str(Path(__file__).resolve().parents[1])  # services.py, for this file run as a script
# Loads per side in the fork scenario (the repro used 500: set this to repeat it).
FORK_LOADS = int(os.environ.get("CREDITMETER_FORK_LOADS", "200"))
FORK_USERS = 20  # per side
CHARGE_EVERY = 5  # every 5th load is followed by a charge, and one of SHARED
SHARED = "shared"  # the user both sides charge
SIDE_TIMEOUT = 20.0  # seconds one side of the fork scenario may take before it counts as hung


# --- the fork scenario (runs in a subprocess) ------------------------------------------


def _tally(result: dict[str, Any], user: str, account: Any) -> None:
    if account is None or account.user_id != user:
        result["wrong"] += 1


def _error(result: dict[str, Any], exc: BaseException) -> None:
    name = f"{type(exc).__name__}: {str(exc)[:70]}"
    result["errors"][name] = result["errors"].get(name, 0) + 1


def _new_result() -> dict[str, Any]:
    return {"loads": 0, "wrong": 0, "errors": {}, "charged": [], "hung": False}


def _sync_side(
    store: PostgresStore, side: str, tag: str, loads: int, result: dict[str, Any]
) -> None:
    meter = BalanceManager(store, CONFIG)
    for k in range(loads):
        user = f"{side}-{k % FORK_USERS}"
        try:
            _tally(result, user, store.load(user))
            result["loads"] += 1
            if k % CHARGE_EVERY == 0:
                request = f"{user}-{tag}{k}"
                meter.charge(user, 1, request_id=request)
                result["charged"].append(request)
                shared = f"{SHARED}-{tag}{k}"  # both sides charge it: deltas after losses
                meter.charge(SHARED, 1, request_id=shared)
                result["charged"].append(shared)
        except Exception as exc:
            _error(result, exc)


async def _async_side(
    store: AsyncPostgresStore, side: str, tag: str, loads: int, result: dict[str, Any]
) -> None:
    meter = AsyncBalanceManager(store, CONFIG)
    for k in range(loads):
        user = f"{side}-{k % FORK_USERS}"
        try:
            _tally(result, user, await store.load(user))
            result["loads"] += 1
            if k % CHARGE_EVERY == 0:
                request = f"{user}-{tag}{k}"
                await meter.charge(user, 1, request_id=request)
                result["charged"].append(request)
                shared = f"{SHARED}-{tag}{k}"
                await meter.charge(SHARED, 1, request_id=shared)
                result["charged"].append(shared)
        except Exception as exc:
            _error(result, exc)


def _watched(run: Any) -> dict[str, Any]:
    """Run one side in a thread; a side still running after SIDE_TIMEOUT counts as hung."""
    result = _new_result()
    thread = threading.Thread(target=run, args=(result,), daemon=True)
    thread.start()
    thread.join(SIDE_TIMEOUT)
    result["hung"] = thread.is_alive()
    return result


def _fork_scenario(kind: str, prefix: str, loads: int) -> dict[str, Any]:
    """Make and use a store, fork, and run both sides at once; report what each saw."""
    context = multiprocessing.get_context("fork")
    go = context.Event()
    mine, theirs = context.Pipe()
    loop = asyncio.new_event_loop()
    parent = os.getpid()
    app = f"cmfork-{parent}"
    if kind == "sync":
        store: Any = PostgresStore(
            POSTGRES_DSN, prefix=prefix, min_size=2, max_size=4, application_name=app
        )
        meter = BalanceManager(store, CONFIG)
        meter.balance(SHARED)
        for name in "pc":
            for i in range(FORK_USERS):
                meter.balance(f"{name}-{i}")

        def side(name: str, tag: str, count: int, *, close: bool = False) -> Any:
            def run(result: dict[str, Any]) -> None:
                go.wait(SIDE_TIMEOUT)
                _sync_side(store, name, tag, count, result)
                if close:
                    store.close()

            return run

    else:

        async def setup() -> AsyncPostgresStore:
            opened = await AsyncPostgresStore.open(
                POSTGRES_DSN, prefix=prefix, min_size=2, max_size=4, application_name=app
            )
            async_meter = AsyncBalanceManager(opened, CONFIG)
            await async_meter.balance(SHARED)
            for name in "pc":
                for i in range(FORK_USERS):
                    await async_meter.balance(f"{name}-{i}")
            return opened

        store = loop.run_until_complete(setup())

        def side(name: str, tag: str, count: int, *, close: bool = False) -> Any:
            async def work(result: dict[str, Any]) -> None:
                await _async_side(store, name, tag, count, result)
                if close:
                    await store.aclose()

            def run(result: dict[str, Any]) -> None:
                go.wait(SIDE_TIMEOUT)
                if os.getpid() == parent:
                    loop.run_until_complete(work(result))
                else:  # the child runs a loop of its own
                    asyncio.run(work(result))

            return run

    def child() -> None:
        # The child closes its store when done: that must not end the parent's sessions.
        theirs.send(_watched(side("c", "c", loads, close=True)))

    def sessions() -> set[int]:
        with raw() as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (app,)
            ).fetchall()
        return {row[0] for row in rows}

    before = sessions()
    process = context.Process(target=child)
    process.start()
    go.set()
    report: dict[str, Any] = {"parent": _watched(side("p", "p", loads))}
    report["child"] = mine.recv() if mine.poll(SIDE_TIMEOUT + 10) else {"hung": True}
    process.join(10)
    if process.is_alive():
        process.kill()
        process.join(10)
    report["child_exit"] = process.exitcode
    # The parent's sessions from before the fork all live on: the child's closing
    # its copies of their sockets did not end them.
    report["sessions_ended"] = len(before - sessions())
    if not report["parent"]["hung"]:
        # The child has closed its store and gone: the parent's connections still work.
        report["after"] = _watched(side("p", "after", 50, close=True))
    return report


def _run_fork_scenario(kind: str, prefix: str) -> dict[str, Any]:
    finished = subprocess.run(
        [sys.executable, __file__, "fork", kind, prefix, str(FORK_LOADS)],
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]),
        },
        capture_output=True,
        text=True,
        timeout=3 * SIDE_TIMEOUT + 60,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    report: dict[str, Any] = json.loads(finished.stdout.strip().splitlines()[-1])
    return report


# --- reaching the server, and cleaning up after ourselves ---------------------------------


@pytest.fixture(autouse=True)
def _postgres_server() -> None:
    need("postgres", reach_postgres)


def raw() -> psycopg.Connection[Any]:
    """A plain connection to the test server, behind the store's back."""
    return psycopg.connect(POSTGRES_DSN, autocommit=True, connect_timeout=5)


@pytest.fixture
def prefix():
    chosen = unique("cmlife_") + "_"
    yield chosen
    with raw() as conn:
        names = sql.SQL(", ").join(
            sql.Identifier(chosen + name) for name in ("accounts", "ledger", "meta")
        )
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(names))


def check_ledgers(prefix: str, users: list[str]) -> dict[str, list[str]]:
    """Assert every user's ledger chains and sums to its balance; return its request ids."""
    requests: dict[str, list[str]] = {}
    with PostgresStore(POSTGRES_DSN, prefix=prefix, create_schema=False) as store:
        for user in users:
            account = store.load(user)
            assert account is not None, user
            entries = store.ledger(user)
            running = Decimal(0)
            for entry in entries:
                running += entry.amount
                assert entry.balance_after == running, (user, entry)
            assert running == account.balance, user
            requests[user] = [entry.request_id for entry in entries if entry.request_id]
    return requests


# --- 1. fork ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_store_used_before_fork_serves_parent_and_child_apart(kind, prefix):
    report = _run_fork_scenario(kind, prefix)
    counts = {
        name: {key: value for key, value in side.items() if key != "charged"}
        for name, side in report.items()
        if isinstance(side, dict)
    }
    for name in ("parent", "child"):
        side = report[name]
        assert not side["hung"], f"the {name} hung: {counts}"
        assert side["wrong"] == 0, f"the {name} was given another user's account: {counts}"
        assert side["errors"] == {}, f"the {name} failed: {counts}"
        assert side["loads"] == FORK_LOADS
    assert report["child_exit"] == 0
    assert report["sessions_ended"] == 0, counts
    after = report["after"]
    assert (after["wrong"], after["errors"], after["hung"]) == (0, {}, False), counts
    # Every charge landed exactly once, on the user it was for.
    users = [f"{side}-{i}" for side in "pc" for i in range(FORK_USERS)] + [SHARED]
    found = check_ledgers(prefix, users)
    charged = report["parent"]["charged"] + report["child"]["charged"] + after["charged"]
    assert sorted(r for ids in found.values() for r in ids) == sorted(charged)
    for user, ids in found.items():
        assert all(r.startswith(user + "-") for r in ids), (user, ids)


def wait_child(pid: int, timeout: float = 15) -> int:
    """The exit code of a forked child, which gets ``timeout`` seconds (then it is killed)."""
    for _ in range(int(timeout * 100)):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        threading.Event().wait(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError("the child hung")


def in_child(call: Any) -> int:
    """Fork; in the child, run ``call()`` (0: the expected StoreError, 1: none, 2: another)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports by its exit code
        code = 1
        try:
            call()
        except StoreError as exc:
            code = 0 if "os.fork()" in str(exc) else 2
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    return wait_child(pid)


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")  # Python 3.12+: threads
def test_a_store_on_a_pool_of_yours_refuses_to_cross_a_fork(prefix):
    with (
        ConnectionPool(POSTGRES_DSN, kwargs={"autocommit": True}, min_size=1) as pool,
        PostgresStore(pool, prefix=prefix) as store,
    ):
        assert store.load("u") is None
        assert in_child(lambda: store.load("u")) == 0  # a typed error, not the shared socket
        assert store.load("u") is None  # the parent's pool is untouched


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
def test_an_async_store_on_a_pool_of_yours_refuses_to_cross_a_fork(prefix):
    loop = asyncio.new_event_loop()
    try:
        pool = AsyncConnectionPool(
            POSTGRES_DSN, kwargs={"autocommit": True}, min_size=1, open=False
        )
        loop.run_until_complete(pool.open(wait=True))
        store = loop.run_until_complete(AsyncPostgresStore.open(pool, prefix=prefix))
        assert loop.run_until_complete(store.load("u")) is None
        assert in_child(lambda: asyncio.run(store.load("u"))) == 0
        assert loop.run_until_complete(store.load("u")) is None
        loop.run_until_complete(store.aclose())
        loop.run_until_complete(pool.close())
    finally:
        loop.close()


# --- 2. cancellation -----------------------------------------------------------------


def accounts_table(prefix: str) -> sql.Identifier:
    return sql.Identifier(prefix + "accounts")


async def until(predicate: Any, timeout: float = 10) -> None:
    """Wait (bounded) until ``predicate()`` is true."""

    async def poll() -> None:
        while True:
            if predicate():
                return
            await asyncio.sleep(0.001)

    await asyncio.wait_for(poll(), timeout)


async def settle(store: AsyncPostgresStore) -> None:
    """Wait (bounded) until the store's pool has every connection back, idle."""

    def settled() -> bool:
        stats = store._pool.get_stats()
        return stats["pool_available"] == stats["pool_size"] and not stats["requests_waiting"]

    await until(settled)


class Checker:
    """Checks, after a cancelled call, that the store holds nothing and still works."""

    def __init__(self, store: AsyncPostgresStore, app: str, prefix: str, users: list[str]):
        self.store = store
        self.app = app
        self.users = users
        self.meter = AsyncBalanceManager(store, CONFIG)
        self.conn: psycopg.AsyncConnection[Any] | None = None
        names = {"accounts": accounts_table(prefix), "ledger": sql.Identifier(prefix + "ledger")}
        self.take_locks = sql.SQL(
            "SELECT count(pg_advisory_xact_lock(k)) FROM unnest(%s::bigint[]) AS k "
            "UNION ALL SELECT count(*) FROM (SELECT FROM {accounts} WHERE user_id = ANY(%s) "
            "FOR UPDATE) AS rows"
        ).format(**names)
        # Per user: does the ledger sum to the balance, and end on it?
        self.sums = sql.SQL(
            "SELECT bool_and(a.balance = (SELECT sum(amount) FROM {ledger} l "
            "WHERE l.user_id = a.user_id) AND a.balance = (SELECT balance_after FROM {ledger} l "
            "WHERE l.user_id = a.user_id ORDER BY seq DESC LIMIT 1)) FROM {accounts} a"
        ).format(**names)

    async def __aenter__(self) -> Checker:
        self.conn = await psycopg.AsyncConnection.connect(
            POSTGRES_DSN, autocommit=True, connect_timeout=5
        )
        await self.conn.execute("SET lock_timeout = '5s'")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.conn is not None
        await self.conn.close()

    async def __call__(self) -> None:
        conn = self.conn
        assert conn is not None
        await settle(self.store)
        # No session of the store holds an advisory lock, runs a statement or sits in a
        # transaction (polled for a while: a session closed mid-statement ends on its own).
        for _ in range(1000):
            cursor = await conn.execute(
                "SELECT count(*) FILTER (WHERE l.locktype = 'advisory' AND l.granted), "
                "count(DISTINCT a.pid) FILTER (WHERE a.state <> 'idle') "
                "FROM pg_stat_activity a LEFT JOIN pg_locks l ON l.pid = a.pid "
                "WHERE a.application_name = %s AND a.pid <> pg_backend_pid()",
                (self.app,),
            )
            locks_and_busy = await cursor.fetchone()
            if locks_and_busy == (0, 0):
                break
            await asyncio.sleep(0.005)
        assert locks_and_busy == (0, 0), "advisory locks held, sessions busy"
        # Another session takes every user's advisory lock and row lock (lock_timeout 5 s).
        keys = [self.store._sql.lock_key(user) for user in self.users]
        async with conn.transaction():
            cursor = await conn.execute(self.take_locks, (keys, self.users))
            assert await cursor.fetchall() == [(len(keys),), (len(self.users),)]
        # The next call works, and nothing is half-written.
        await self.meter.charge(self.users[0], 1)
        cursor = await conn.execute(self.sums)
        assert await cursor.fetchone() == (True,)


class CancelAt:
    """Await ``coro``, cancelling the task that runs it at the coroutine's n-th suspension.

    Every ``yield`` of the coroutine to the event loop is one await point
    that really waits; the cancel is scheduled just as the n-th is reached,
    so it lands there (on the future it waits for, or when it resumes).
    """

    def __init__(self, coro: Any, n: int) -> None:
        self.coro = coro
        self.n = n
        self.suspensions = 0

    def __await__(self) -> Any:
        inner = self.coro.__await__()
        sent: Any = None
        thrown: BaseException | None = None
        while True:
            try:
                waited = inner.send(sent) if thrown is None else inner.throw(thrown)
            except StopIteration as stop:
                return stop.value
            self.suspensions += 1
            if self.suspensions == self.n:
                task = asyncio.current_task()
                assert task is not None
                asyncio.get_running_loop().call_soon(task.cancel)
            try:
                sent, thrown = (yield waited), None
            except BaseException as exc:
                sent, thrown = None, exc


async def cancel_in_turn(call: Any, check: Checker, most: int = 200) -> int:
    """Cancel ``call()`` at its first await point, then its second, ..., checking after each.

    Stops once the call completes with fewer await points; returns how many
    cancels took effect (one per await point).
    """

    async def run(n: int) -> Any:
        return await CancelAt(call(), n)

    for n in range(1, most):
        task = asyncio.ensure_future(run(n))
        done, _ = await asyncio.wait({task}, timeout=15)
        assert task in done, f"a call cancelled at its await point {n} did not end"
        await asyncio.wait_for(check(), 15)
        if not task.cancelled():
            assert task.exception() is None, f"at await point {n}: {task.exception()!r}"
            return n - 1
    raise AssertionError(f"the call has more than {most} await points")


async def add_one(store: AsyncPostgresStore, user: str) -> None:
    """A grant of 1 written straight to the store: load, then one commit."""
    account = await store.load(user)
    assert account is not None
    entry = make_entry(user, amount=Decimal(1), balance_after=account.balance + 1)
    grown = attrs.evolve(account, version=account.version + 1, balance=account.balance + 1)
    await store.commit(grown, [entry], expected_version=account.version)


@pytest.fixture
def cancellation(prefix):
    """An open AsyncPostgresStore with users "u" and "v", and its Checker (used in a loop)."""

    async def make(**options: Any) -> tuple[AsyncPostgresStore, Checker]:
        app = unique("cmcancel-")
        store = await AsyncPostgresStore.open(
            POSTGRES_DSN, prefix=prefix, application_name=app, **options
        )
        meter = AsyncBalanceManager(store, CONFIG)
        await meter.grant("u", 1, request_id="r-1")
        await meter.balance("v")
        return store, Checker(store, app, prefix, ["u", "v"])

    return make


def _calls(store: AsyncPostgresStore) -> dict[str, Any]:
    async def exclusive() -> None:
        async with store.exclusive("u"):
            pass

    async def exclusive_write() -> None:
        async with store.exclusive("u"):
            await add_one(store, "u")

    async def nested_same() -> None:
        async with store.exclusive("u"):
            async with store.exclusive("u"):
                await add_one(store, "u")
            await add_one(store, "u")

    async def nested_other() -> None:
        async with store.exclusive("u"), store.exclusive("v"):
            await add_one(store, "v")

    return {
        "load": lambda: store.load("u"),
        "commit": lambda: add_one(store, "u"),
        "find_request": lambda: store.find_request("u", "r-1"),
        "ledger": lambda: store.ledger("u"),
        "ledger tail": lambda: store.ledger("u", limit=2),
        "users": store.users,
        "exclusive": exclusive,
        "exclusive, then load and commit inside": exclusive_write,
        "exclusive nested on the same user": nested_same,
        "exclusive nested on another user": nested_other,
    }


CALLS = [
    "load",
    "commit",
    "find_request",
    "ledger",
    "ledger tail",
    "users",
    "exclusive",
    "exclusive, then load and commit inside",
    "exclusive nested on the same user",
    "exclusive nested on another user",
]


@pytest.mark.parametrize("name", CALLS)
def test_a_call_cancelled_at_any_await_leaves_nothing_behind(cancellation, name):
    async def main() -> int:
        store, check = await cancellation()
        try:
            async with check:
                return await cancel_in_turn(_calls(store)[name], check)
        finally:
            await store.aclose()

    cancelled = asyncio.run(asyncio.wait_for(main(), 120))
    assert cancelled > 0


def test_calls_cancelled_while_they_wait_leave_nothing_behind(cancellation, prefix):
    """Cancelled (once, then twice) while the server or the pool keeps them waiting."""

    async def main() -> None:
        store, check = await cancellation(max_size=2)
        holder = await psycopg.AsyncConnection.connect(POSTGRES_DSN, autocommit=True)
        try:
            async with check:
                key = store._sql.lock_key("u")
                waits = {
                    "commit behind a row lock": (
                        sql.SQL("SELECT 1 FROM {} WHERE user_id = 'u' FOR UPDATE").format(
                            accounts_table(prefix)
                        ),
                        lambda: add_one(store, "u"),
                    ),
                    "commit behind an exclusive() holder": (
                        sql.SQL("SELECT pg_advisory_xact_lock({})").format(key),
                        lambda: add_one(store, "u"),
                    ),
                    "exclusive() behind another holder": (
                        sql.SQL("SELECT pg_advisory_xact_lock({})").format(key),
                        _calls(store)["exclusive"],
                    ),
                    "a nested exclusive() behind another holder": (
                        sql.SQL("SELECT pg_advisory_xact_lock({})").format(
                            store._sql.lock_key("v")
                        ),
                        _calls(store)["exclusive nested on another user"],
                    ),
                }
                for name, (hold, call) in waits.items():
                    for cancels in (1, 2):
                        before = await store.load("u")
                        async with holder.transaction():
                            await holder.execute(hold)
                            task = asyncio.ensure_future(call())
                            await wait_until_blocked(holder, check.app)
                            for _ in range(cancels):
                                task.cancel()
                                await asyncio.sleep(0)
                            done, _ = await asyncio.wait({task}, timeout=15)
                            assert task in done, name
                            assert task.cancelled(), name
                        if cancels == 1:  # the server cancelled the statement: nothing written
                            assert await store.load("u") == before, name
                        # After a second cancel, which cut psycopg's cancel request short (it
                        # then closed the connection), the server ran the statement on once the
                        # holder let go, as with a commit cut in flight: whole, or not at all.
                        # check() waits for that session to end, then checks every ledger.
                        await check()

                # Waiting for a pooled connection: both are taken by exclusive() blocks.
                inside = asyncio.Event()
                leave = asyncio.Event()

                async def occupy(user: str) -> None:
                    async with store.exclusive(user):
                        inside.set()
                        await leave.wait()

                occupiers = [asyncio.ensure_future(occupy(user)) for user in ("u", "v")]
                await asyncio.wait_for(inside.wait(), 10)
                await until(lambda: not store._pool.get_stats()["pool_available"])
                waiter = asyncio.ensure_future(store.load("u"))
                await until(lambda: store._pool.get_stats()["requests_waiting"])
                waiter.cancel()
                done, _ = await asyncio.wait({waiter}, timeout=15)
                assert waiter in done
                assert waiter.cancelled()
                leave.set()
                await asyncio.wait_for(asyncio.gather(*occupiers), 10)
                await check()
        finally:
            await holder.close()
            await store.aclose()

    asyncio.run(asyncio.wait_for(main(), 120))


async def wait_until_blocked(holder: psycopg.AsyncConnection[Any], app: str) -> None:
    """Wait (bounded) until a session of the store waits for a lock."""

    async def blocked() -> None:
        while True:
            cursor = await holder.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                "AND wait_event_type = 'Lock'",
                (app,),
            )
            row = await cursor.fetchone()
            if row is not None and row[0]:
                return
            await asyncio.sleep(0.002)

    await asyncio.wait_for(blocked(), 10)


# --- 3. bounded waits -------------------------------------------------------------------


def hold(prefix: str, store: Any, user: str, what: str) -> psycopg.Connection[Any]:
    """A raw session that takes the user's row lock and/or advisory lock and keeps them."""
    holder = raw()
    holder.execute("BEGIN")
    if what in ("row lock", "both"):
        holder.execute(
            sql.SQL("SELECT 1 FROM {} WHERE user_id = %s FOR UPDATE").format(
                accounts_table(prefix)
            ),
            (user,),
        )
    if what in ("advisory lock", "both"):
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (store._sql.lock_key(user),))
    return holder


def in_thread(call: Any) -> BaseException | None:
    """Run ``call()`` in a thread, bounded; return what it raised."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(15)
    assert not thread.is_alive(), "the call is still waiting"
    return outcome[0]


def test_connections_have_a_lock_timeout_by_default(prefix):
    with PostgresStore(POSTGRES_DSN, prefix=prefix) as store, store._pool.connection() as conn:
        assert conn.execute("SHOW lock_timeout").fetchone() == ("30s",)


@pytest.mark.parametrize("what", ["row lock", "advisory lock", "both"])
def test_a_charge_behind_a_held_lock_gives_up_after_lock_timeout(prefix, what):
    with PostgresStore(POSTGRES_DSN, prefix=prefix, lock_timeout=0.1) as store:
        meter = BalanceManager(store, CONFIG)
        meter.grant("hot user", 5)
        before = store.ledger("hot user")
        holder = hold(prefix, store, "hot user", what)
        try:
            failed = in_thread(lambda: meter.charge("hot user", 1, request_id="c-1"))
            assert isinstance(failed, StoreError), repr(failed)
            assert "'hot user'" in str(failed), str(failed)
            assert "lock_timeout" in str(failed), str(failed)
            if what != "row lock":  # exclusive() waits for the same advisory lock
                failed = in_thread(lambda: store.exclusive("hot user").__enter__())
                assert isinstance(failed, StoreError), repr(failed)
                assert "'hot user'" in str(failed), str(failed)
                assert "lock_timeout" in str(failed), str(failed)
        finally:
            holder.rollback()
            holder.close()
        assert store.ledger("hot user") == before  # nothing written
        entry = meter.charge("hot user", 1, request_id="c-1")  # the holder let go
        assert store.ledger("hot user") == [*before, entry]
        assert store._pool.get_stats()["pool_available"] == store._pool.get_stats()["pool_size"]


@pytest.mark.parametrize("what", ["row lock", "advisory lock", "both"])
def test_an_async_charge_behind_a_held_lock_gives_up_after_lock_timeout(prefix, what):
    async def main() -> None:
        store = await AsyncPostgresStore.open(POSTGRES_DSN, prefix=prefix, lock_timeout=0.1)
        try:
            meter = AsyncBalanceManager(store, CONFIG)
            await meter.grant("hot user", 5)
            before = await store.ledger("hot user")
            holder = hold(prefix, store, "hot user", what)
            try:
                with pytest.raises(StoreError, match=r"'hot user'.*lock_timeout"):
                    await asyncio.wait_for(meter.charge("hot user", 1, request_id="c-1"), 15)
                if what != "row lock":

                    async def enter() -> None:
                        async with store.exclusive("hot user"):
                            pass  # pragma: no cover - the lock is held

                    with pytest.raises(StoreError, match=r"'hot user'.*lock_timeout"):
                        await asyncio.wait_for(enter(), 15)
            finally:
                holder.rollback()
                holder.close()
            assert await store.ledger("hot user") == before
            entry = await meter.charge("hot user", 1, request_id="c-1")
            assert await store.ledger("hot user") == [*before, entry]
            await settle(store)
        finally:
            await store.aclose()

    asyncio.run(main())


def test_a_pool_with_no_free_connection_is_a_store_error_naming_the_wait(prefix):
    with PostgresStore(POSTGRES_DSN, prefix=prefix, max_size=1, timeout=0.2) as store:
        inside = threading.Event()
        leave = threading.Event()

        def occupy() -> None:
            with store.exclusive("u"):
                inside.set()
                leave.wait(15)

        thread = threading.Thread(target=occupy)
        thread.start()
        try:
            assert inside.wait(15)
            failed = in_thread(lambda: store.load("somebody"))
            assert isinstance(failed, StoreError), repr(failed)
            assert "'somebody'" in str(failed), str(failed)
            assert "free connection" in str(failed), str(failed)
        finally:
            leave.set()
            thread.join(15)
        assert store.load("somebody") is None


# --- 4. URLs ----------------------------------------------------------------------------


SETTINGS = [
    ("options=-c%20lock_timeout%3D1234", "SHOW lock_timeout", "1234ms"),
    ("options=-c%20statement_timeout%3D5s", "SHOW statement_timeout", "5s"),
    ("application_name=a%26b", "SELECT current_setting('application_name')", "a&b"),
    (
        "application_name=100%25%20sure%3F%23",
        "SELECT current_setting('application_name')",
        "100% sure?#",
    ),
    ("application_name=x#y", "SELECT current_setting('application_name')", "x#y"),
    ("lock_timeout=0.25", "SHOW lock_timeout", "250ms"),
]


@pytest.mark.parametrize(("option", "query", "expected"), SETTINGS)
def test_url_options_reach_the_server_exactly(prefix, option, query, expected):
    url = f"{POSTGRES_DSN}?prefix={prefix}&{option}"
    with open_store(url) as store, store._pool.connection() as conn:
        assert store.prefix == prefix
        assert conn.execute(query).fetchone() == (expected,)


@pytest.mark.parametrize(("option", "query", "expected"), SETTINGS)
def test_async_url_options_reach_the_server_exactly(prefix, option, query, expected):
    async def main() -> None:
        store = open_async_store(f"{POSTGRES_DSN}?{option}&prefix={prefix}")
        try:
            await store.users()
            async with store._pool.connection() as conn:
                cursor = await conn.execute(query)
                assert await cursor.fetchone() == (expected,)
        finally:
            await store.aclose()

    asyncio.run(main())


def test_a_url_without_a_host_keeps_its_query(prefix):
    # postgresql:///db names no host: libpq takes it from the query (or its default).
    url = f"postgresql:///test?host=127.0.0.1&port=5432&user=postgres&prefix={prefix}"
    with open_store(url) as store:
        assert store.load("u") is None


def test_lock_timeout_from_the_dsn_or_the_argument(prefix):
    dsn = f"{POSTGRES_DSN}?options=-c%20lock_timeout%3D1234"
    with PostgresStore(dsn, prefix=prefix) as store, store._pool.connection() as conn:
        assert conn.execute("SHOW lock_timeout").fetchone() == ("1234ms",)  # the DSN's stands
    with (
        PostgresStore(dsn, prefix=prefix, lock_timeout=2) as store,
        store._pool.connection() as conn,
    ):
        assert conn.execute("SHOW lock_timeout").fetchone() == (
            "1234ms",
        )  # the DSN has the last word
    with (
        PostgresStore(POSTGRES_DSN, prefix=prefix, lock_timeout=2) as store,
        store._pool.connection() as conn,
    ):
        assert conn.execute("SHOW lock_timeout").fetchone() == ("2s",)
    with (
        PostgresStore(POSTGRES_DSN, prefix=prefix, lock_timeout=None) as store,
        store._pool.connection() as conn,
    ):
        assert conn.execute("SHOW lock_timeout").fetchone() == ("0",)  # the server's


BAD_URLS = [
    "postgresql://[::1/test",  # malformed host
    "postgresql://user:secret@[::1/test",  # malformed, with a password not to show
    "?prefix={prefix}&prefix={prefix}",  # creditmeter's option given twice
    "?prefix",  # no value
    "?prefix=Bad-Name",
    "?schema=1st",
    "?bogus=1",  # neither creditmeter's nor libpq's
    "?lock_timeout=soon",
    "?lock_timeout=-1",
    "?lock_timeout=0",
    "?lock_timeout=nan",
    "?options=-c%20lock_timeout%3D1&bogus=2",
]


@pytest.mark.parametrize("bad", BAD_URLS)
def test_bad_urls_are_config_errors(prefix, bad):
    url = bad.format(prefix=prefix)
    if url.startswith("?"):
        url = POSTGRES_DSN + url
    for opener in (open_store, open_async_store):
        with pytest.raises(ConfigError) as caught:
            opener(url)
        assert "secret" not in str(caught.value)


@pytest.mark.parametrize("bad", [-1, 0, float("nan"), float("inf"), "1", True, 10**10], ids=repr)
def test_bad_lock_timeouts_are_config_errors(bad):
    for store_class in (PostgresStore, AsyncPostgresStore):
        with pytest.raises(ConfigError, match="lock_timeout"):
            store_class(POSTGRES_DSN, lock_timeout=bad)


if __name__ == "__main__" and sys.argv[1:2] == ["fork"]:
    kind_, prefix_, loads_ = sys.argv[2], sys.argv[3], int(sys.argv[4])
    print(json.dumps(_fork_scenario(kind_, prefix_, loads_)), flush=True)
    os._exit(0)  # no finalizers: a hung side's thread may still be blocked on a socket
