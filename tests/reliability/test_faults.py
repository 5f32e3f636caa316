"""Fault injection: the store fails at its k-th call, for k = 1..30.

A fixed sequence of operations runs on a store whose k-th call fails (calls
counted over every statement or command the sequence sends, reads
included): a grant that opens an account, charge, hold, settle,
set_balance, a due refill under a FakeClock, a charge that opens a second
account, hold and release; three reads (balance, ledger, users); then, three
times, another writer (a second manager over the same store) writes a user
first, so that the manager's next write to that user loses its
compare-and-set and is retried under the store's ``exclusive()`` (the user's
lock: an flock for SQLite, the lock scripts for Redis, an advisory lock on a
pinned connection for PostgreSQL), the last time on a third account the
sequence opens. Holds are asked for with a request id, as every write of the
sequence is: that is what makes an operation safe to send again.

SQLite (``FaultySQLiteStore``: the real ``SQLiteStore`` whose connections
are wrapped so that the k-th ``execute`` raises
``sqlite3.OperationalError("disk I/O error")``), two kinds of fault:

``refused``
    the statement does not run and the transaction stays as it was (as
    after ``SQLITE_BUSY``, or any error the store must clean up after);
``rolled-back``
    SQLite rolled the whole transaction back, then raised (as after
    ``SQLITE_IOERR`` or ``SQLITE_FULL``).

Redis and PostgreSQL, sync and async stores, on the real servers (each test
under a key or table prefix of its own, dropped afterwards): the k-th
command or statement loses its connection for real. No store code is
mocked; the connection classes the drivers build (``connection_class`` of
redis-py's pool and of psycopg_pool) count the calls and, at the k-th:

``dropped``
    the server drops the connection before the call reaches it: ``CLIENT
    KILL ID`` (Redis), ``pg_terminate_backend(pid)`` (PostgreSQL), from a
    second connection, then the call is sent on the dead connection. The
    server never runs it.
``reply-lost``
    the server runs the call (a commit applies) and the connection drops
    before the reply arrives. Redis: the command is sent after ``CLIENT
    REPLY OFF`` and followed by ``CLIENT SETNAME <marker>``; once a second
    connection sees the marker (the command has run) it kills the client,
    which reads end of file. PostgreSQL (autocommit: one statement is one
    transaction): once the statement is sent, the hook waits until the
    reply has reached the client's socket and the backend is idle (the
    transaction committed), then resets the TCP connection (``SO_LINGER``
    0, which discards the unread reply) and gives libpq a dead socket in
    its place; the backend is gone when the call goes on. psycopg's
    automatic server-side prepared statements are off on these connections,
    so each call is one round trip.

For every k and kind of fault: the operation that meets the fault raises
``StoreError`` (caused by the driver's connection error), and the store
recovers by itself: the operation, sent again, succeeds, and so does the
rest of the sequence, whose final state equals that of a run without faults.
The stored state (every account and every ledger, read through another
store on the same file or namespace) right after the failure:

- ``refused``, ``rolled-back``, ``dropped``: equals the state before the
  operation;
- ``reply-lost``: the client cannot know whether the operation applied,
  since the server did everything but answer. The state equals either the
  state before or the state after the operation (as in a run without
  faults): a commit whose reply was lost had applied, while a read or a
  commit that lost its compare-and-set wrote nothing. Sending the operation
  again with the same request id does not apply it twice: the state is then
  the state after it, with one entry. An operation sent without a request
  id cannot be told apart from a new one (see
  ``test_without_a_request_id_a_lost_reply_applies_twice_when_sent_again``).

One exception, by design: PostgresStore runs a read (``load``, ``ledger``,
``users``, ``find_request``) and the ``exclusive()`` lock statement again on
another pooled connection when the server had dropped the one used, since
they are safe to repeat (see its module docstring); a fault there is absorbed
and the operation succeeds. A commit is never repeated by the stores. No
other call may swallow a fault.

The writer lock of SQLite (an ``flock`` of a lock file beside the database)
is the other I/O on its write path; an ``OSError`` from it is tried too.

MemoryStore has no I/O that can fail: its test is skipped on purpose.
``CREDITMETER_LONG`` changes nothing here: the sweep is the same either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import select
import socket
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

import attrs
import psycopg
import pytest
import redis
import redis.asyncio.connection
import redis.connection
from psycopg.waiting import Wait
from psycopg_pool import AsyncConnectionPool, ConnectionPool
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
    BalanceConfig,
    BalanceManager,
    EntryKind,
    SQLiteStore,
    StoreError,
)
from creditmeter.rules import HOLD_PREFIX
from creditmeter.stores import sqlite as sqlite_module
from creditmeter.stores.postgres import AsyncPostgresStore, PostgresStore
from creditmeter.stores.redis import (
    ACQUIRE_SCRIPT,
    COMMIT_SCRIPT,
    DELTA_SCRIPT,
    RECHECK_SCRIPT,
    RELEASE_SCRIPT,
    AsyncRedisStore,
    RedisStore,
)
from creditmeter.testing import Blocking, FakeClock

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
CONFIG = BalanceConfig(
    enabled=True,
    start_balance=1000,
    auto_refill_enabled=True,
    refill_interval_value=1,
    refill_interval_unit="hours",
    refill_amount=250,
    refill_mode="on_interval",
)
KS = range(1, 31)
WAIT = 10.0  # seconds: the longest a fault waits for the server


class FaultPlan:
    """Which call fails, and how; counts and names every call while armed."""

    def __init__(self) -> None:
        self.armed = False
        self.fail_at = 0
        self.mode = "refused"
        self.calls = 0
        self.trace: list[str] = []
        self.fired = 0  # faults injected so far
        self.hit = ""  # the name of the call the fault hit
        self.server: Any = None  # the second connection that drops the first (servers)

    def arm(self, fail_at: int, mode: str) -> None:
        self.armed, self.fail_at, self.mode = True, fail_at, mode

    def count(self, name: str) -> bool:
        """Count one call while armed; True if it is the one to fail."""
        if not self.armed:
            return False
        self.calls += 1
        self.trace.append(name)
        if self.calls != self.fail_at:
            return False
        self.fired += 1
        self.hit = name
        return True

    def before(self, real: sqlite3.Connection, sql: str) -> None:
        """SQLite: called before each statement; raises the fault at the k-th."""
        if not self.count(sql.split(None, 1)[0].upper()):
            return
        if self.mode == "rolled-back" and real.in_transaction:
            real.execute("ROLLBACK")  # what SQLite itself does on an I/O error
        raise sqlite3.OperationalError("disk I/O error")


@attrs.define
class Run:
    """What the operations of the sequence work on."""

    manager: Any  # a BalanceManager, or a blocking view of an AsyncBalanceManager
    other: Any  # a second manager over the same store: another writer
    held: list[Any] = attrs.Factory(list)


@attrs.define
class Faulty:
    """A store that fails as planned, managers over it, and a way to read what it holds."""

    run: Run
    stored: Callable[[], Any]  # every account and ledger, read by another store
    reader: Any  # a sync store on the same file or namespace
    cause: type[BaseException]  # what the StoreError's cause must be
    retried: frozenset[str] = frozenset()  # calls the store runs again by itself
    settle: Callable[[], object] = lambda: None  # let an event loop see what the server did


def managers(store: Any, loop: asyncio.AbstractEventLoop | None = None) -> Run:
    """Two managers over ``store`` on one FakeClock (blocking views if ``loop``)."""
    clock = FakeClock(T0)
    if loop is None:
        return Run(
            BalanceManager(store, CONFIG, clock=clock), BalanceManager(store, CONFIG, clock=clock)
        )
    return Run(
        Blocking(AsyncBalanceManager(store, CONFIG, clock=clock), loop=loop),
        Blocking(AsyncBalanceManager(store, CONFIG, clock=clock), loop=loop),
    )


# --- SQLite: an OSError at the k-th statement ---------------------------------------------


class FaultyConnection:
    """An ``sqlite3.Connection`` whose ``execute`` / ``executemany`` may fail first."""

    __slots__ = ("_plan", "_real")

    def __init__(self, real: sqlite3.Connection, plan: FaultPlan) -> None:
        self._real = real
        self._plan = plan

    def execute(self, sql: str, parameters: Any = ()) -> sqlite3.Cursor:
        self._plan.before(self._real, sql)
        return self._real.execute(sql, parameters)

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        # The store inserts a commit's entries in one call: one point where it may fail.
        self._plan.before(self._real, sql)
        return self._real.executemany(sql, rows)

    @property
    def in_transaction(self) -> bool:
        return self._real.in_transaction

    def close(self) -> None:
        self._real.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class FaultySQLiteStore(SQLiteStore):
    """The real SQLiteStore, but each thread's connection goes through a ``FaultPlan``."""

    def __init__(self, path: Path, plan: FaultPlan, **options: Any) -> None:
        self.plan = plan  # before __init__: it connects
        super().__init__(path, **options)

    def _connect(self) -> Any:
        handle = super()._connect()
        handle.conn = FaultyConnection(handle.conn, self.plan)
        return handle


@contextlib.contextmanager
def faulty_sqlite(where: Path, plan: FaultPlan) -> Iterator[Faulty]:
    """Managers over a faulty store, and a reader of what the file holds (a fresh store)."""
    path = where / "credits.db"

    def stored() -> Any:
        # A short busy timeout: a store that left a transaction open shows as "locked".
        with SQLiteStore(path, busy_timeout=0.5) as fresh:
            return normalized(fresh)

    with (
        FaultySQLiteStore(path, plan, busy_timeout=0.5) as store,
        SQLiteStore(path, busy_timeout=0.5) as reader,
    ):
        yield Faulty(managers(store), stored, reader, sqlite3.OperationalError)


# --- Redis: a connection killed at the k-th command ----------------------------------------

SOURCES = {
    "commit": COMMIT_SCRIPT,
    "delta": DELTA_SCRIPT,
    "acquire": ACQUIRE_SCRIPT,
    "recheck": RECHECK_SCRIPT,
    "release": RELEASE_SCRIPT,
}
SCRIPTS = {  # Redis names scripts by SHA1
    hashlib.sha1(script.encode()).hexdigest().encode(): name for name, script in SOURCES.items()
}


def redis_call(command: Any) -> str:
    """The name of a packed command: ``HGET``, ``EVALSHA-commit`` (the script's name), ..."""
    first = command if isinstance(command, (bytes, str)) else next(iter(command))
    parts = bytes(first if not isinstance(first, str) else first.encode()).split(b"\r\n", 5)
    name = parts[2].decode().upper()
    if name == "EVALSHA":
        name += "-" + SCRIPTS.get(parts[4], "?")
    return name


class RedisKiller:
    """A second connection to the server, which drops the faulty store's connections."""

    def __init__(self) -> None:
        self.client = redis.Redis.from_url(REDIS_URL, socket_timeout=WAIT)
        self.serial = 0
        self.connections: set[int] = set()  # the ids of every connection the store opened

    def kill(self, client_id: int) -> None:
        assert self.client.client_kill_filter(_id=client_id) == 1

    def close_all(self) -> int:
        """Close every connection the store has open, as a restart would; return how many."""
        return sum(self.client.client_kill_filter(_id=id_) for id_ in self.connections)

    def silenced(self, connection: Any, command: Any) -> tuple[list[bytes], str]:
        """The command between ``CLIENT REPLY OFF`` and a ``CLIENT SETNAME`` marker."""
        self.serial += 1
        marker = f"creditmeter-fault-{self.serial}"
        chunks = [command] if isinstance(command, (bytes, str)) else list(command)
        quiet = connection.pack_command("CLIENT", "REPLY", "OFF")
        named = connection.pack_command("CLIENT", "SETNAME", marker)
        return [*quiet, *chunks, *named], marker

    def kill_once_run(self, client_id: int, marker: str) -> None:
        """Wait until the client's connection carries ``marker`` (its command ran), then kill it."""
        deadline = time.monotonic() + WAIT
        while True:
            found = self.client.client_list(client_id=[client_id])
            if found and found[0]["name"] == marker:
                break
            assert time.monotonic() < deadline, f"the command before {marker} never ran"
            time.sleep(0.0005)
        self.kill(client_id)

    def close(self) -> None:
        self.client.close()


class DroppingRedisConnection(redis.connection.Connection):
    """redis-py's connection, whose k-th command (as planned) loses the connection."""

    plan: ClassVar[FaultPlan]
    client_id = 0
    _setting_up = False

    def on_connect_check_health(self, check_health: bool = True) -> None:
        self._setting_up = True  # the handshake's commands are not counted
        try:
            super().on_connect_check_health(check_health)
            self.send_command("CLIENT", "ID", check_health=False)
            self.client_id = self.read_response()
            self.plan.server.connections.add(self.client_id)
        finally:
            self._setting_up = False

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        plan = self.plan
        if self._setting_up or not plan.count(redis_call(command)):
            super().send_packed_command(command, check_health)
        elif plan.mode == "dropped":
            plan.server.kill(self.client_id)
            super().send_packed_command(command, check_health)
        else:
            silenced, marker = plan.server.silenced(self, command)
            super().send_packed_command(silenced, check_health)
            plan.server.kill_once_run(self.client_id, marker)


class DroppingAsyncRedisConnection(redis.asyncio.connection.Connection):
    """``DroppingRedisConnection`` for redis.asyncio (the killer's calls block the loop)."""

    plan: ClassVar[FaultPlan]
    client_id = 0
    _setting_up = False

    async def on_connect_check_health(self, check_health: bool = True) -> None:
        self._setting_up = True
        try:
            await super().on_connect_check_health(check_health)
            await self.send_command("CLIENT", "ID", check_health=False)
            self.client_id = await self.read_response()
            self.plan.server.connections.add(self.client_id)
        finally:
            self._setting_up = False

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        plan = self.plan
        if self._setting_up or not plan.count(redis_call(command)):
            await super().send_packed_command(command, check_health)
        elif plan.mode == "dropped":
            plan.server.kill(self.client_id)
            await super().send_packed_command(command, check_health)
        else:
            silenced, marker = plan.server.silenced(self, command)
            await super().send_packed_command(silenced, check_health)
            plan.server.kill_once_run(self.client_id, marker)


@contextlib.contextmanager
def redis_namespace(plan: FaultPlan) -> Iterator[str]:
    """A key prefix of the test's own, and the killer; both gone afterwards."""
    need("redis", reach_redis)
    prefix = unique("cmrel:") + ":"
    plan.server = RedisKiller()
    # A server that has not seen a script answers its first EVALSHA with NOSCRIPT and the
    # client loads it (SCRIPT LOAD, EVALSHA again): load every one, so that the k-th call
    # is the same on a fresh server as on one that ran the suite before.
    for script in SOURCES.values():
        plan.server.client.script_load(script)
    try:
        yield prefix
    finally:
        plan.server.close()
        drop_redis_keys(prefix)


@contextlib.contextmanager
def faulty_redis(where: Path, plan: FaultPlan) -> Iterator[Faulty]:
    dropping = type("Dropping", (DroppingRedisConnection,), {"plan": plan})
    with (
        redis_namespace(plan) as prefix,
        RedisStore(REDIS_URL, prefix=prefix, connection_class=dropping) as store,
        RedisStore(REDIS_URL, prefix=prefix) as reader,
    ):
        yield Faulty(
            managers(store), lambda: normalized(reader), reader, redis.exceptions.ConnectionError
        )


@contextlib.contextmanager
def faulty_async_redis(where: Path, plan: FaultPlan) -> Iterator[Faulty]:
    dropping = type("Dropping", (DroppingAsyncRedisConnection,), {"plan": plan})
    loop = asyncio.new_event_loop()
    try:
        with redis_namespace(plan) as prefix, RedisStore(REDIS_URL, prefix=prefix) as reader:
            store = AsyncRedisStore(REDIS_URL, prefix=prefix, connection_class=dropping)
            try:
                yield Faulty(
                    managers(store, loop),
                    lambda: normalized(reader),
                    reader,
                    redis.exceptions.ConnectionError,
                    settle=lambda: loop.run_until_complete(asyncio.sleep(0.02)),
                )
            finally:
                loop.run_until_complete(store.aclose())
    finally:
        loop.close()


# --- PostgreSQL: a backend terminated, or a reply lost, at the k-th statement ----------------

POSTGRES_CALLS = [  # (a piece of the statement, its name), first match wins
    (b"WITH cas AS", "commit"),
    (b"WITH d AS (UPDATE", "delta"),
    (b"pg_advisory_lock(", "lock"),
    (b"pg_advisory_unlock(", "unlock"),
    (b"SELECT request_id, data FROM", "find-requests"),
    (b"AND request_id = %s", "find"),
    (b"SELECT user_id FROM", "users"),
    (b'ledger"', "ledger"),
    (b'accounts" WHERE user_id', "load"),
]
# What PostgresStore runs again on another connection when the server dropped the one used.
POSTGRES_RETRIED = frozenset({"load", "find", "ledger", "users", "lock"})
POSTGRES_OPTIONS = {
    "autocommit": True,  # as the store's own pool
    "prepare_threshold": None,  # one round trip per call: no automatic PREPARE first
}


def postgres_call(query: Any) -> str:
    text = bytes(query) if isinstance(query, (bytes, bytearray)) else str(query).encode()
    for piece, name in POSTGRES_CALLS:
        if piece in text:
            return name
    return text.split(None, 1)[0].decode().upper()


class PostgresKiller:
    """A second connection to the server, which drops the faulty store's connections."""

    def __init__(self) -> None:
        self.conn = psycopg.connect(POSTGRES_DSN, autocommit=True, connect_timeout=3)
        self.application_name = unique("creditmeter-faults-")  # names the store's connections
        self.opened: set[int] = set()  # the backends of the connections the pool opened

    def close_all(self) -> int:
        """Terminate the backend of every idle connection of the store, as a restart would.

        Returns how many. Only connections the pool has finished opening
        (``self.opened``): one the pool is still opening in the background
        could take the server's goodbye in with its handshake, and the idle
        check would not see it (the store's idle check is best effort; a
        commit on such a connection is a StoreError, as documented).
        """
        pids = [
            row[0]
            for row in self.conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE pid = ANY(%s) AND state = 'idle'",
                (list(self.opened),),
            )
        ]
        self.terminate(*pids)
        return len(pids)

    def terminate(self, *pids: int) -> None:
        """Terminate the backends and wait until they have exited (their goodbye is sent)."""
        for pid in pids:
            self.conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        self.wait_gone(pids)

    def wait_gone(self, pids: Any) -> None:
        deadline = time.monotonic() + WAIT
        while self.conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", (list(pids),)
        ).fetchone() != (0,):
            assert time.monotonic() < deadline, f"backends {pids} did not end"
            time.sleep(0.0005)

    def state(self, pid: int) -> str | None:
        row = self.conn.execute(
            "SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone()
        return None if row is None else row[0]

    def cut_after_reply(self, conn: Any) -> None:
        """The statement just sent has run and committed: drop the connection before its reply.

        Waits until the reply has reached the socket and the backend is idle
        again, then resets the TCP connection (``SO_LINGER`` 0: the unread
        reply is discarded) and puts a socket that reads end of file in its
        place, for libpq to find; waits until the backend has exited.
        """
        fd = conn.pgconn.socket
        pid = conn.info.backend_pid
        readable, _, _ = select.select([fd], [], [], WAIT)
        assert readable, "no reply from the server"
        deadline = time.monotonic() + WAIT
        while self.state(pid) != "idle":
            assert time.monotonic() < deadline, f"backend {pid} never went idle"
            time.sleep(0.0005)
        tcp = socket.socket(fileno=os.dup(fd))
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        dead, peer = socket.socketpair()
        peer.close()
        os.dup2(dead.fileno(), fd)  # libpq's descriptor now reads end of file
        dead.close()
        tcp.close()  # the last reference to the TCP socket: reset, the reply discarded
        self.wait_gone([pid])

    def close(self) -> None:
        self.conn.close()


def losing_reply(gen: Any, cut: Callable[[], None]) -> Any:
    """Drive psycopg's generator ``gen``; when it first waits to read (sent), ``cut()``."""
    waiting_to_read = False
    ready = None
    while True:
        try:
            state = gen.send(ready)
        except StopIteration as stop:
            return stop.value
        if state == Wait.R and not waiting_to_read:
            waiting_to_read = True
            cut()
        ready = yield state


class DroppingPostgresConnection(psycopg.Connection):
    """psycopg's connection, whose k-th statement (as planned) loses the connection."""

    plan: ClassVar[FaultPlan]
    _lose_reply = False

    def execute(self, query: Any, params: Any = None, **options: Any) -> Any:
        plan = self.plan
        if plan.count(postgres_call(query)):
            if plan.mode == "dropped":
                plan.server.terminate(self.info.backend_pid)
            else:
                self._lose_reply = True
        return super().execute(query, params, **options)

    def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
        if self._lose_reply:
            self._lose_reply = False
            gen = losing_reply(gen, lambda: self.plan.server.cut_after_reply(self))
        return super().wait(gen, *args, **kwargs)


class DroppingAsyncPostgresConnection(psycopg.AsyncConnection):
    """``DroppingPostgresConnection`` for asyncio (the killer's calls block the loop)."""

    plan: ClassVar[FaultPlan]
    _lose_reply = False

    async def execute(self, query: Any, params: Any = None, **options: Any) -> Any:
        plan = self.plan
        if plan.count(postgres_call(query)):
            if plan.mode == "dropped":
                plan.server.terminate(self.info.backend_pid)
            else:
                self._lose_reply = True
        return await super().execute(query, params, **options)

    async def wait(self, gen: Any, *args: Any, **kwargs: Any) -> Any:
        if self._lose_reply:
            self._lose_reply = False
            gen = losing_reply(gen, lambda: self.plan.server.cut_after_reply(self))
        return await super().wait(gen, *args, **kwargs)


@contextlib.contextmanager
def postgres_namespace(plan: FaultPlan) -> Iterator[str]:
    """A table prefix of the test's own, and the killer; both gone afterwards."""
    need("postgres", reach_postgres)
    prefix = unique("cmrel_") + "_"
    plan.server = PostgresKiller()
    try:
        yield prefix
    finally:
        plan.server.close()
        drop_postgres_tables(prefix)


def postgres_pool(pool_class: type[Any], plan: FaultPlan, base: type[Any]) -> Any:
    dropping = type("Dropping", (base,), {"plan": plan})

    def opened(conn: Any) -> None:
        plan.server.opened.add(conn.info.backend_pid)

    async def opened_async(conn: Any) -> None:
        opened(conn)

    return pool_class(
        POSTGRES_DSN,
        connection_class=dropping,
        kwargs={**POSTGRES_OPTIONS, "application_name": plan.server.application_name},
        configure=opened_async if pool_class is AsyncConnectionPool else opened,
        min_size=1,
        max_size=4,
        timeout=WAIT,
        open=False,
    )


@contextlib.contextmanager
def faulty_postgres(where: Path, plan: FaultPlan) -> Iterator[Faulty]:
    with postgres_namespace(plan) as prefix:
        pool = postgres_pool(ConnectionPool, plan, DroppingPostgresConnection)
        pool.open(wait=True, timeout=WAIT)
        try:
            with (
                PostgresStore(pool, prefix=prefix) as store,
                PostgresStore(POSTGRES_DSN, prefix=prefix, create_schema=False) as reader,
            ):
                yield Faulty(
                    managers(store),
                    lambda: normalized(reader),
                    reader,
                    psycopg.OperationalError,
                    POSTGRES_RETRIED,
                )
        finally:
            pool.close()


@contextlib.contextmanager
def faulty_async_postgres(where: Path, plan: FaultPlan) -> Iterator[Faulty]:
    loop = asyncio.new_event_loop()
    try:
        with postgres_namespace(plan) as prefix:
            pool = postgres_pool(AsyncConnectionPool, plan, DroppingAsyncPostgresConnection)
            loop.run_until_complete(pool.open(wait=True, timeout=WAIT))
            try:
                store = loop.run_until_complete(AsyncPostgresStore.open(pool, prefix=prefix))
                try:
                    with PostgresStore(POSTGRES_DSN, prefix=prefix, create_schema=False) as reader:
                        yield Faulty(
                            managers(store, loop),
                            lambda: normalized(reader),
                            reader,
                            psycopg.OperationalError,
                            POSTGRES_RETRIED,
                        )
                finally:
                    loop.run_until_complete(store.aclose())
            finally:
                loop.run_until_complete(pool.close())
    finally:
        loop.close()


# kind -> context manager(location, plan) giving a Faulty
FAULT_INJECTORS: dict[str, Callable[[Path, FaultPlan], Any]] = {
    "sqlite": faulty_sqlite,
    "redis": faulty_redis,
    "redis-async": faulty_async_redis,
    "postgres": faulty_postgres,
    "postgres-async": faulty_async_postgres,
}
# kind -> the kinds of fault swept
MODES: dict[str, tuple[str, ...]] = {
    "sqlite": ("refused", "rolled-back"),
    **{kind: ("dropped", "reply-lost") for kind in FAULT_INJECTORS if kind != "sqlite"},
}


# --- the sequence ------------------------------------------------------------------------


def normalized(store: Any) -> Any:
    """Every account and ledger, with the random ids (entries, holds) masked."""

    def mask(request_id: str | None) -> str | None:
        if request_id is not None and request_id.startswith(HOLD_PREFIX):
            return HOLD_PREFIX + "*"
        return request_id

    users = store.users()
    accounts = {}
    ledgers = {}
    for user in users:
        account = store.load(user)
        accounts[user] = attrs.evolve(
            account, holds=tuple(attrs.evolve(h, id="*") for h in account.holds)
        )
        ledgers[user] = [
            attrs.evolve(e, id="*", request_id=mask(e.request_id)) for e in store.ledger(user)
        ]
    return users, accounts, ledgers


def _refill(run: Run) -> None:
    run.manager.clock.set(T0 + timedelta(hours=2))  # the refill is due (setting twice is harmless)
    entry = run.manager.maybe_refill("alice")
    if entry is None:  # sent again: the first try applied it (its reply was lost)
        entry = run.manager.ledger("alice", limit=1)[0]
    assert entry.kind is EntryKind.REFILL


OPERATIONS: list[tuple[str, Callable[[Run], Any]]] = [
    ("grant (opens alice)", lambda r: r.manager.grant("alice", 100, request_id="grant-1")),
    ("charge", lambda r: r.manager.charge("alice", Decimal("12.5"), request_id="charge-1")),
    ("hold", lambda r: r.held.append(r.manager.hold("alice", 40, request_id="hold-1"))),
    ("settle", lambda r: r.manager.settle(r.held[-1], 25)),
    ("set_balance", lambda r: r.manager.set_balance("alice", 500, request_id="set-1")),
    ("refill (due)", _refill),
    ("charge (opens bob)", lambda r: r.manager.charge("bob", 5, request_id="charge-2")),
    ("hold bob", lambda r: r.held.append(r.manager.hold("bob", 3, request_id="hold-2"))),
    ("release", lambda r: r.manager.release(r.held[-1])),
    ("read bob's balance", lambda r: r.manager.balance("bob")),
    ("read alice's ledger", lambda r: r.manager.ledger("alice")),
    ("read the users", lambda r: r.manager.users()),
    # Another writer gets in first: the manager's next write to that user loses its
    # compare-and-set and is retried under the store's exclusive().
    ("another writer grants alice", lambda r: r.other.grant("alice", 7, request_id="grant-2")),
    ("charge alice (lost CAS)", lambda r: r.manager.charge("alice", 3, request_id="charge-3")),
    ("another writer charges bob", lambda r: r.other.charge("bob", 2, request_id="charge-4")),
    (
        "hold bob (lost CAS)",
        lambda r: r.held.append(r.manager.hold("bob", 4, request_id="hold-3")),
    ),
    ("grant (opens carol)", lambda r: r.manager.grant("carol", 10, request_id="grant-3")),
    ("another writer sets carol", lambda r: r.other.set_balance("carol", 50, request_id="set-2")),
    ("charge carol (lost CAS)", lambda r: r.manager.charge("carol", 1, request_id="charge-5")),
]

# The calls each store makes for the sequence, in order (checked by the test below; the
# async stores make the same calls as their sync twins). If a store's calls change,
# update these: they name the k-th call in the test ids.
TRACE = [  # SQLite: statements (a commit's entries are one INSERT, executemany)
    *["SELECT", "BEGIN", "INSERT", "INSERT", "COMMIT"],  # grant, opening alice
    *["BEGIN", "UPDATE", "INSERT", "COMMIT"],  # charge
    *["SELECT", "BEGIN", "UPDATE", "COMMIT"],  # hold: its request's earlier holds; no entry
    *["BEGIN", "UPDATE", "INSERT", "COMMIT"],  # settle
    *["BEGIN", "UPDATE", "INSERT", "COMMIT"],  # set_balance
    *["SELECT", "BEGIN", "UPDATE", "INSERT", "COMMIT"],  # refill: read fresh, then write
    *["SELECT", "BEGIN", "INSERT", "INSERT", "COMMIT"],  # charge, opening bob
    *["SELECT", "BEGIN", "UPDATE", "COMMIT"],  # hold bob
    *["BEGIN", "UPDATE", "INSERT", "COMMIT"],  # release
    *["SELECT", "SELECT", "SELECT"],  # the three reads
    *["SELECT", "BEGIN", "UPDATE", "INSERT", "COMMIT"],  # another writer grants alice
    # the charge loses its compare-and-set, reads what won; then again under exclusive()
    *["BEGIN", "UPDATE", "SELECT", "ROLLBACK", "SELECT", "BEGIN", "UPDATE", "INSERT", "COMMIT"],
    *["SELECT", "BEGIN", "UPDATE", "INSERT", "COMMIT"],  # another writer charges bob
    # hold: its request's holds, then as the charge above
    *["SELECT", "BEGIN", "UPDATE", "SELECT", "ROLLBACK", "SELECT", "BEGIN", "UPDATE", "COMMIT"],
    *["SELECT", "BEGIN", "INSERT", "INSERT", "COMMIT"],  # grant, opening carol
    *["SELECT", "BEGIN", "UPDATE", "INSERT", "COMMIT"],  # another writer sets carol
    *["BEGIN", "UPDATE", "SELECT", "ROLLBACK", "SELECT", "BEGIN", "UPDATE", "INSERT", "COMMIT"],
]
REDIS_TRACE = [  # commands (EVALSHA named by its script)
    *["HGET", "EVALSHA-commit"],  # grant, opening alice: read it (none), then commit
    "EVALSHA-commit",  # charge: from the account last seen
    *["HGET", "EVALSHA-commit"],  # hold: how the request's earlier holds ended, then commit
    *["EVALSHA-commit"] * 2,  # settle, set_balance
    *["HGET", "EVALSHA-commit"],  # refill: read fresh, then commit
    *["HGET", "EVALSHA-commit"],  # charge, opening bob
    *["HGET", "EVALSHA-commit"],  # hold bob (its request's holds), then commit
    "EVALSHA-commit",  # release
    *["HGET", "LRANGE", "SSCAN"],  # the three reads
    *["HGET", "EVALSHA-commit"],  # another writer grants alice
    # the charge loses its compare-and-set, then goes as a delta on what the loss reported
    *["EVALSHA-commit", "EVALSHA-delta"],
    *["HGET", "EVALSHA-commit"],  # another writer charges bob
    # hold bob: lost CAS, again from what it reported (holds are no delta)
    *["HGET", "EVALSHA-commit", "EVALSHA-commit"],
    *["HGET", "EVALSHA-commit"],  # grant, opening carol
    *["HGET", "EVALSHA-commit"],  # another writer sets carol
    *["EVALSHA-commit", "EVALSHA-delta"],  # charge carol: as alice's
]
POSTGRES_TRACE = [  # statements, named by what they do
    *["load", "commit"],  # grant, opening alice
    "commit",  # charge
    *["find", "commit"],  # hold: how the request's earlier holds ended, then commit
    *["commit"] * 2,  # settle, set_balance
    *["load", "commit"],  # refill
    *["load", "commit"],  # charge, opening bob
    *["find", "commit"],  # hold bob
    "commit",  # release
    *["load", "ledger", "users"],  # the three reads
    *["load", "commit"],  # another writer grants alice
    # the charge loses its compare-and-set, then goes as a delta on what the loss reported
    *["commit", "delta"],
    *["load", "commit"],  # another writer charges bob
    # hold bob loses; holds are no delta: exclusive(), the advisory lock, load, commit
    *["find", "commit", "lock", "load", "commit"],
    *["load", "commit"],  # grant, opening carol
    *["load", "commit"],  # another writer sets carol
    *["commit", "delta"],  # charge carol: as alice's
]
TRACES = {
    "sqlite": TRACE,
    "redis": REDIS_TRACE,
    "redis-async": REDIS_TRACE,
    "postgres": POSTGRES_TRACE,
    "postgres-async": POSTGRES_TRACE,
}
# The calls that write (a fault there may leave the outcome unknown: reply-lost).
COMMITS = {"COMMIT", "EVALSHA-commit", "EVALSHA-delta", "commit", "delta"}


@attrs.frozen
class Reference:
    """A run without faults: the calls made, the state after each operation, the final state."""

    trace: list[str]
    after: list[Any]

    @property
    def final(self) -> Any:
        return self.after[-1]


@attrs.frozen
class Outcome:
    """What a fault did to the sequence."""

    failed: str  # the operation that met it
    call: str  # the call it hit
    absorbed: bool  # the store ran the call again by itself: no error
    applied: bool  # reply-lost: the failed operation had applied all the same


def record_reference(faulty: Faulty, plan: FaultPlan) -> Reference:
    plan.arm(0, "count")  # count, never fail
    after = []
    for _, operation in OPERATIONS:
        operation(faulty.run)
        after.append(faulty.stored())
    return Reference(list(plan.trace), after)


def run_sequence(faulty: Faulty, plan: FaultPlan, reference: Reference) -> Outcome:
    """Run every operation; check the one that meets the fault; say what happened."""
    outcome = None
    for index, (name, operation) in enumerate(OPERATIONS):
        before = faulty.stored() if plan.fired == 0 else None
        fired = plan.fired
        error: StoreError | None = None
        try:
            operation(faulty.run)
        except StoreError as caught:
            error = caught
        if plan.fired == fired:
            assert error is None, f"{name}: a StoreError without the fault: {error}"
            continue
        assert plan.fired == fired + 1
        assert outcome is None, "a second operation failed"
        after = reference.after[index]
        if error is None:
            assert plan.hit in faulty.retried, f"{name}: the fault at {plan.hit} was swallowed"
            assert faulty.stored() == after
            outcome = Outcome(name, plan.hit, absorbed=True, applied=False)
            continue
        assert isinstance(error.__cause__, faulty.cause), repr(error.__cause__)
        now = faulty.stored()
        if plan.mode == "reply-lost":
            assert now in (before, after), f"{name}: neither the state before nor after"
        else:
            assert now == before, f"{name}: the failed operation wrote something"
        outcome = Outcome(name, plan.hit, absorbed=False, applied=now != before)
        operation(faulty.run)  # the next call, the same operation again, succeeds
        assert faulty.stored() == after, f"{name}: sent again, it did not apply exactly once"
    assert outcome is not None, f"the sequence never made call {plan.fail_at}"
    return outcome


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Reference]:
    """``references(kind)``: the run without faults on that kind (made once per module)."""
    made: dict[str, Reference] = {}

    def reference(kind: str) -> Reference:
        if kind not in made:
            plan = FaultPlan()
            with FAULT_INJECTORS[kind](tmp_path_factory.mktemp("reference"), plan) as faulty:
                made[kind] = record_reference(faulty, plan)
        return made[kind]

    return reference


@pytest.mark.parametrize("kind", list(FAULT_INJECTORS))
def test_the_sequence_makes_the_calls_expected(references: Any, kind: str) -> None:
    """TRACES name the k-th call of each store; if a store's calls change, update them."""
    assert references(kind).trace == TRACES[kind]
    assert len(TRACES[kind]) >= max(KS)


def test_every_store_ends_in_the_same_state(references: Any) -> None:
    """The sequence means the same on every store (ids masked): one reference for all."""
    finals = {kind: references(kind).after for kind in FAULT_INJECTORS}
    first = finals.pop("sqlite")
    for kind, after in finals.items():
        assert after == first, kind


def sweep() -> list[Any]:
    return [
        pytest.param(kind, mode, k, id=f"{kind}-{mode}-k{k}-{TRACES[kind][k - 1]}")
        for kind, modes in MODES.items()
        for mode in modes
        for k in KS
    ]


OUTCOMES: list[tuple[str, str, Outcome]] = []  # (kind, mode, outcome) of each test of the sweep


@pytest.mark.parametrize(("kind", "mode", "k"), sweep())
def test_fault_at_kth_call(
    tmp_path: Path, references: Any, worker: Any, kind: str, mode: str, k: int
) -> None:
    reference = references(kind)
    plan = FaultPlan()
    with FAULT_INJECTORS[kind](tmp_path, plan) as faulty:
        plan.arm(k, mode)
        outcome = run_sequence(faulty, plan, reference)
        assert plan.fired == 1
        plan.armed = False
        final = faulty.stored()
        worker.check_invariants(faulty.reader, now=T0 + timedelta(hours=2))
    assert final == reference.final  # as if the fault had never happened
    OUTCOMES.append((kind, mode, outcome))


def test_fault_injection_figures(report: Any) -> None:
    """What the sweep above injected and saw, for benchmarks/RELIABILITY.md."""
    figures: dict[str, Any] = {}
    for kind, modes in MODES.items():
        seen = [outcome for k, _, outcome in OUTCOMES if k == kind]
        figures[kind] = {
            "modes": list(modes),
            "calls_in_sequence": len(TRACES[kind]),
            "faults_injected": len(seen),
            "on_a_commit": sum(1 for o in seen if o.call in COMMITS),
            "store_errors": sum(1 for o in seen if not o.absorbed),
            "absorbed_by_a_retried_read": sum(1 for o in seen if o.absorbed),
            "reply_lost_after_the_commit_applied": sum(1 for o in seen if o.applied),
        }
    report(
        "faults",
        stores=list(FAULT_INJECTORS),
        operations=len(OPERATIONS),
        faults_injected=len(OUTCOMES),
        by_store=figures,
    )


# --- the reply that never came ------------------------------------------------------------

SERVER_KINDS = [kind for kind in FAULT_INJECTORS if kind != "sqlite"]


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_a_charge_whose_reply_was_lost_applies_once_when_sent_again(
    tmp_path: Path, kind: str
) -> None:
    """The commit applied, then the connection dropped before the reply: the client cannot know.

    The charge raises StoreError though the server applied it. Sent again with
    the same request id, it returns the entry recorded the first time and
    charges nothing more: retrying with the request id is always safe.
    """
    plan = FaultPlan()
    with FAULT_INJECTORS[kind](tmp_path, plan) as faulty:
        manager = faulty.run.manager
        manager.grant("alice", 100, request_id="grant-1")
        before = faulty.stored()
        plan.arm(1, "reply-lost")  # the charge's first call is its commit
        with pytest.raises(StoreError) as caught:
            manager.charge("alice", 7, request_id="call-1")
        assert plan.trace == [TRACES[kind][1]]  # the commit, as in the sequence
        assert isinstance(caught.value.__cause__, faulty.cause)
        plan.armed = False
        applied = faulty.stored()
        assert applied != before  # the server had applied it
        (entry,) = [e for e in faulty.reader.ledger("alice") if e.request_id == "call-1"]
        assert manager.charge("alice", 7, request_id="call-1") == entry
        assert faulty.stored() == applied  # charged once
        assert faulty.reader.load("alice").balance == 1000 + 100 - 7


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_without_a_request_id_a_lost_reply_applies_twice_when_sent_again(
    tmp_path: Path, kind: str
) -> None:
    """Why the request id matters: without one, nothing tells a retry from a new charge.

    The store promises no more than it can: the failed call's StoreError says
    the outcome is unknown, and a charge sent again without a request id is a
    second charge. (Redis commits carry a token against a driver that re-sends
    the same commit by itself; a new call from the caller is a new commit.)
    """
    plan = FaultPlan()
    with FAULT_INJECTORS[kind](tmp_path, plan) as faulty:
        manager = faulty.run.manager
        manager.grant("alice", 100)
        plan.arm(1, "reply-lost")
        with pytest.raises(StoreError):
            manager.charge("alice", 7)
        plan.armed = False
        manager.charge("alice", 7)
        charges = [e for e in faulty.reader.ledger("alice") if e.kind is EntryKind.CHARGE]
        assert len(charges) == 2
        assert faulty.reader.load("alice").balance == 1000 + 100 - 14


@pytest.mark.parametrize("kind", SERVER_KINDS)
def test_connections_the_server_closed_while_idle_are_replaced(
    tmp_path: Path, references: Any, kind: str
) -> None:
    """Before every operation the server closes each connection of the store, as a restart does.

    No operation may fail: a pooled connection found closed is replaced
    before use (a command is never sent on it), and the final state is that
    of the run without faults.

    Regression (fixed in stores/redis.py): AsyncRedisStore on redis-py 8.1.0
    handed out pooled connections the server had closed (with RESP3, redis-py's
    default, its async pool skips the check at checkout: redis/redis-py#4252),
    so after a Redis restart, an idle ``timeout`` or a ``CLIENT KILL`` the next
    command on each pooled connection failed with ``StoreError`` (Connection
    closed by server), here 18 of the 19 operations. The sync RedisStore and
    both PostgreSQL stores already replaced such connections.
    """
    plan = FaultPlan()
    with FAULT_INJECTORS[kind](tmp_path, plan) as faulty:
        closed = 0
        for _, operation in OPERATIONS:
            closed += plan.server.close_all()
            faulty.settle()
            operation(faulty.run)
        assert closed >= len(OPERATIONS) - 1
        assert faulty.stored() == references(kind).final


# --- SQLite: the writer lock and COMMIT -----------------------------------------------


def test_a_failed_commit_statement_leaves_no_transaction_open(tmp_path: Path) -> None:
    """The COMMIT of a charge fails once: other writers and the next write must go on.

    Regression (fixed in d4b706d): commit() issued ROLLBACK only when _apply()
    failed. When the COMMIT statement itself raised (SQLITE_BUSY, or any error
    after which SQLite keeps the transaction), the transaction stayed open on the
    thread's connection, which kept SQLite's RESERVED lock: every other connection
    and process waited busy_timeout (30 s by default) and failed with "database is
    locked" (even opening a new SQLiteStore on the file did), and every later
    write on that thread failed with "cannot start a transaction within a
    transaction" until the store was closed.
    """
    plan = FaultPlan()
    with faulty_sqlite(tmp_path, plan) as faulty:
        manager = faulty.run.manager
        manager.grant("alice", 100)
        plan.arm(4, "refused")  # BEGIN, UPDATE, INSERT, COMMIT: the COMMIT fails
        with pytest.raises(StoreError):
            manager.charge("alice", 1)
        try:
            # another writer of the file gets in within its busy timeout
            with SQLiteStore(tmp_path / "credits.db", busy_timeout=0.5) as other:
                BalanceManager(other, CONFIG, clock=FakeClock(T0)).charge("bob", 1)
        finally:
            manager.charge("alice", 1)  # and this thread writes again


@pytest.mark.skip(reason="MemoryStore does no I/O: there is no call that can fail")
def test_memory_store_faults() -> None:
    """Kept so the report lists MemoryStore as considered, and skipped on purpose."""


# --- the writer lock ---------------------------------------------------------------------


class FailingFlock:
    """Stands in for the fcntl module: taking the lock fails with ENOLCK while armed."""

    LOCK_EX = fcntl.LOCK_EX
    LOCK_NB = fcntl.LOCK_NB
    LOCK_UN = fcntl.LOCK_UN
    armed = False

    @classmethod
    def flock(cls, fd: int, operation: int) -> None:
        if cls.armed and operation & fcntl.LOCK_EX:
            raise OSError(errno.ENOLCK, "No locks available")
        fcntl.flock(fd, operation)


def test_writer_lock_failure_is_a_store_error(tmp_path: Path, monkeypatch: Any) -> None:
    """fcntl.flock() failing (ENOLCK, as on some network file systems) is a StoreError.

    Regression (fixed in d4b706d): _Handle.acquire() runs before the try of
    commit(), exclusive() and _writing(), and the OSError escaped raw. Nothing is
    written and the next write succeeds.
    """
    with SQLiteStore(tmp_path / "credits.db") as store:
        manager = BalanceManager(store, CONFIG, clock=FakeClock(T0))
        manager.grant("alice", 1)
        monkeypatch.setattr(sqlite_module, "fcntl", FailingFlock)
        FailingFlock.armed = True
        before = normalized(store)
        try:
            with pytest.raises(StoreError):
                manager.charge("alice", 1)
        finally:
            FailingFlock.armed = False
        assert normalized(store) == before
        manager.charge("alice", 1)


def test_lock_file_that_cannot_be_opened_is_a_store_error(tmp_path: Path, monkeypatch: Any) -> None:
    """A new thread that cannot open the .lock file (EMFILE) gets a StoreError.

    Regression (fixed in d4b706d): _connect() opened the sqlite3 connection, then
    os.open()ed the lock file outside any try: the OSError escaped raw and the
    connection just opened was leaked (neither closed nor listed for close()).
    """
    real_open = sqlite_module.os.open

    def no_more_files(path: Any, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith(".lock"):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, *args, **kwargs)

    real_connect = sqlite3.connect
    connections: list[sqlite3.Connection] = []

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        connections.append(real_connect(*args, **kwargs))
        return connections[-1]

    monkeypatch.setattr(sqlite_module.sqlite3, "connect", connect)
    with SQLiteStore(tmp_path / "credits.db") as store:
        manager = BalanceManager(store, CONFIG, clock=FakeClock(T0))
        manager.grant("alice", 1)
        errors: list[BaseException] = []

        def in_a_new_thread() -> None:  # a new thread opens its own connection
            try:
                manager.charge("alice", 1)
            except BaseException as exc:
                errors.append(exc)

        monkeypatch.setattr(sqlite_module.os, "open", no_more_files)
        thread = threading.Thread(target=in_a_new_thread)
        thread.start()
        thread.join()
        monkeypatch.undo()
    for connection in connections:  # the one the failed thread leaked, too
        connection.close()
    assert len(errors) == 1
    assert isinstance(errors[0], StoreError), repr(errors[0])


@pytest.mark.parametrize("mode", ["refused", "rolled-back"])
@pytest.mark.parametrize("fail_at", range(1, 12))
def test_a_batch_whose_store_fails_writes_nothing_and_its_replay_applies_once(
    tmp_path: Path, fail_at: int, mode: str
) -> None:
    """charge_many on SQLite with an I/O error at its k-th statement (k = 1..11, both kinds).

    The batch is one transaction: the failure is a StoreError, the file holds
    what it held before, the manager's last-seen accounts are not trusted
    afterwards, and the same batch sent again (a replay) applies every item once.
    """
    from creditmeter import ChargeItem  # noqa: PLC0415

    plan = FaultPlan()
    items = [
        ChargeItem(user, 5 + number, request_id=f"{user}-{number}")
        for number in range(3)
        for user in ("alice", "bob", "carol")
    ]
    with faulty_sqlite(tmp_path, plan) as faulty:
        manager = faulty.run.manager
        for user in ("alice", "bob", "carol"):
            manager.grant(user, 100)
        before = faulty.stored()
        start = {user: faulty.reader.load(user).balance for user in ("alice", "bob", "carol")}
        plan.arm(fail_at, mode)
        with pytest.raises(StoreError):
            manager.charge_many(items)
        plan.armed = False
        assert plan.fired == 1, plan.trace
        assert faulty.stored() == before
        results = manager.charge_many(items)
        assert all(result.ok for result in results)
        for user in ("alice", "bob", "carol"):
            ledger = faulty.reader.ledger(user)
            charges = [entry for entry in ledger if entry.kind is EntryKind.CHARGE]
            assert sorted(entry.request_id for entry in charges) == [
                f"{user}-{n}" for n in range(3)
            ]
            assert faulty.reader.load(user).balance == sum(entry.amount for entry in ledger)
            assert faulty.reader.load(user).balance == start[user] - (5 + 6 + 7)
