"""What the sync and async PostgreSQL stores share at run time.

The base class of both (names, repr, the schema check, following a fork),
the idle check of pooled connections, the connection each thread (sync)
or task (async) pins inside ``exclusive()``, and the reading of report rows
and scan positions.
"""

from __future__ import annotations

import os
import re
import select
import threading
import weakref
from collections.abc import Sequence
from contextvars import ContextVar
from datetime import timezone
from typing import Any

import psycopg
from psycopg import AsyncConnection, Connection
from psycopg.pq import TransactionStatus

from creditmeter.exceptions import InvalidInput, StoreError
from creditmeter.models import LedgerEntry
from creditmeter.queries import EntryQuery, Scan, UsageRow
from creditmeter.rules import usage_sum
from creditmeter.serde import entry_from_json
from creditmeter.stores.postgres.options import Options
from creditmeter.stores.postgres.sql import SCHEMA_VERSION, UPGRADES_FROM, Statements

__all__ = [
    "RETURNS_AT_ONCE",
    "STALE_TRIES",
    "StoreBase",
    "TaskPin",
    "ThreadPin",
    "parse_position",
    "scan_page",
    "stale",
    "usage_rows",
]

STALE_TRIES = 64
"""How many stale pooled connections to throw away before using whatever comes."""
RETURNS_AT_ONCE = (TransactionStatus.IDLE, TransactionStatus.UNKNOWN)
"""Connection states in which psycopg_pool takes a connection back without waiting."""


# --- connections ------------------------------------------------------------------


def _readable(fd: int) -> bool:
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([fd], [], [], 0)[0])  # pragma: no cover - Windows


def stale(conn: Connection[Any] | AsyncConnection[Any]) -> bool:
    """Tell whether an idle pooled connection was cut by the server (without a round trip).

    An idle connection has nothing to read; if its socket is readable the
    server has sent its goodbye (``pg_terminate_backend``, a restart) or
    closed it.
    """
    if conn.closed or conn.broken:
        return True
    try:
        return _readable(conn.pgconn.socket)
    except psycopg.OperationalError:
        return True


class ThreadPin(threading.local):
    """The connection ``exclusive()`` pinned to each thread, and the user keys it holds."""

    conn: Connection[Any] | None = None
    _held: dict[int, int]
    _read: dict[int, str | None]

    def get(self) -> Connection[Any] | None:
        """The current thread's pinned connection, if any."""
        return self.conn

    def held(self) -> dict[int, int]:
        """How many nested blocks hold each user's key on the pinned connection."""
        return self._held

    def read(self) -> dict[int, str | None]:
        """Per key taken on the pinned connection: the account JSON read with it, until used."""
        return self._read

    def pin(self, conn: Connection[Any], held: dict[int, int]) -> None:
        """Pin ``conn`` to the current thread, holding the keys counted in ``held``."""
        self.conn = conn
        self._held = held
        self._read = {}

    def unpin(self) -> None:
        """The current thread's calls take their connections from the pool again."""
        self.conn = None


class TaskPin:
    """The connection ``exclusive()`` pinned to each asyncio task, and the user keys it holds."""

    def __init__(self) -> None:
        self._conn: ContextVar[AsyncConnection[Any] | None] = ContextVar(
            f"creditmeter_postgres_{id(self)}", default=None
        )
        self._held: ContextVar[dict[int, int]] = ContextVar(f"creditmeter_postgres_held_{id(self)}")
        self._read: ContextVar[dict[int, str | None]] = ContextVar(
            f"creditmeter_postgres_read_{id(self)}"
        )

    def get(self) -> AsyncConnection[Any] | None:
        """The current task's pinned connection, if any."""
        return self._conn.get()

    def held(self) -> dict[int, int]:
        """How many nested blocks hold each user's key on the pinned connection."""
        return self._held.get()

    def read(self) -> dict[int, str | None]:
        """Per key taken on the pinned connection: the account JSON read with it, until used."""
        return self._read.get()

    def pin(self, conn: AsyncConnection[Any], held: dict[int, int]) -> None:
        """Pin ``conn`` to the current task, holding the keys counted in ``held``."""
        self._conn.set(conn)
        self._held.set(held)
        self._read.set({})

    def unpin(self) -> None:
        """The current task's calls take their connections from the pool again."""
        self._conn.set(None)


# --- fork ---------------------------------------------------------------------------
#
# A child process made by os.fork() inherits the parent's pooled connections: the
# same sockets, used from two processes, interleave replies (one process reads the
# other's rows), and the pool's worker threads (or, for the async pool, its tasks)
# do not exist in the child. So every store notices a changed pid and, in the child,
# lets go of what it inherited without a word to the server (the parent's sessions
# live on) and makes a pool of its own. An at-fork hook does the letting go at once,
# so the child holds no copy of the parent's sockets (a copy would keep a crashed
# parent's sessions, and their advisory locks, alive); the pid check covers forks
# that skip the hook.

_STORES: weakref.WeakSet[StoreBase] = weakref.WeakSet()
# Pools inherited over a fork: never closed (their close would end the parent's
# sessions and join threads that do not exist here), and kept so never collected.
_LEFT_BEHIND: list[object] = []


def _in_forked_child() -> None:
    for store in list(_STORES):
        store._after_fork()  # noqa: SLF001 - a class of this module


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_in_forked_child)


def _drop_silently(conn: Connection[Any] | AsyncConnection[Any]) -> None:
    """Let go of a connection inherited over a fork without a word to the server.

    The socket's descriptor is pointed at /dev/null first, so libpq's goodbye
    (a Terminate message that would end the parent's session) goes nowhere.
    """
    pgconn = conn.pgconn
    try:
        fd = pgconn.socket
    except psycopg.OperationalError:  # closed already
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
    pgconn.finish()


class StoreBase:
    """What the sync and async stores share: names, repr, schema check, fork handling."""

    _options: Options
    _sql: Statements
    _owns_pool: bool
    _closed: bool
    _pool: Any
    # The process whose pool the store uses, and the last one that let go of a parent's.
    _pid: int
    _left: int
    # Every connection the store's own pool made (and the schema connection), so a
    # forked child can let go of them all.
    _conns: weakref.WeakSet[Any]
    # Serializes following a fork (threads may race to it).
    _fork_lock: threading.Lock

    def _start(self) -> None:
        self._pid = self._left = os.getpid()
        self._conns = weakref.WeakSet()
        self._fork_lock = threading.Lock()
        _STORES.add(self)

    @property
    def prefix(self) -> str:
        """The table prefix."""
        return self._options.prefix

    @property
    def schema(self) -> str | None:
        """The schema of the tables, or ``None`` for the connection's ``search_path``."""
        return self._options.schema

    def _describe(self, name: str) -> str:
        where = f"{self._options.where!r}, " if self._options.dsn is not None else "pool, "
        return f"{name}({where}prefix={self.prefix!r}, schema={self.schema!r})"

    def _check_version(self, row: tuple[Any, ...] | None) -> None:
        value = None if row is None else row[0]
        if value != SCHEMA_VERSION:
            raise self._wrong_version(value)

    def _needs_ddl(self, value: str | None) -> bool:
        """Before the DDL: whether to run it for the stored version (``None``: no tables yet).

        The current version needs nothing (and so takes no table lock); an
        older one the DDL upgrades; any other is left alone: ``StoreError``.
        """
        if value == SCHEMA_VERSION:
            return False
        if value is None or value in UPGRADES_FROM:
            return True
        raise self._wrong_version(value)

    def _wrong_version(self, value: str | None) -> StoreError:
        return StoreError(
            f"the creditmeter tables with prefix {self.prefix!r} hold schema {value!r}; "
            f"this version of creditmeter reads schema {SCHEMA_VERSION!r}"
        )

    def _bound_params(self) -> tuple[str] | None:
        """The parameter of ``BOUND_LOCKS`` for a new session, or ``None`` to leave it."""
        setting = self._options.lock_timeout
        return None if setting is None else (setting,)

    def _after_fork(self) -> None:
        """In the at-fork hook of a child process (the only thread there yet)."""
        self._fork_lock = threading.Lock()  # another thread of the parent may have held it
        self._leave_parent()

    def _follow_fork(self) -> None:
        """First use in a forked child: let go of the parent's pool, make one of our own.

        The new pool opens on first use, as a new store's does. A pool the
        caller gave cannot follow: ``StoreError``.
        """
        with self._fork_lock:
            pid = os.getpid()
            if self._pid == pid:
                return
            self._leave_parent()
            if not self._owns_pool:
                raise self._foreign_pool()
            if not self._closed:
                self._pool = self._new_pool()
            self._pid = pid

    def _leave_parent(self) -> None:
        """In a forked child: let go of the parent's connections and pool (once)."""
        pid = os.getpid()
        if self._left == pid or self._closed:
            return
        self._left = pid
        for conn in list(self._conns):
            _drop_silently(conn)
        self._conns = weakref.WeakSet()
        pool = getattr(self, "_pool", None)  # None: forked while the store was being built
        if self._owns_pool and pool is not None:
            _LEFT_BEHIND.append(pool)
        self._forget_connections()

    def _new_pool(self) -> Any:
        """The store's own pool, not open yet."""
        raise NotImplementedError  # pragma: no cover

    def _forget_connections(self) -> None:
        """Drop what pointed at the parent's connections, or at its threads or event loop."""
        raise NotImplementedError  # pragma: no cover

    def _foreign_pool(self) -> StoreError:
        return StoreError(
            f"this {type(self).__name__} runs on a pool made in process {self._pid}, and a "
            "pool cannot cross os.fork(): make the pool and the store in each process after "
            "forking, or give the store a DSN (it then opens a pool of its own in the child)"
        )


# --- reports ---------------------------------------------------------------------------

_POSITION = re.compile(r"(0|[1-9][0-9]{0,18})\.(0|[1-9][0-9]{0,18})")
_BIGINT = 2**63


def parse_position(position: str | None) -> tuple[int, int] | None:
    """The ``(tx, seq)`` of a scan position ``"<tx>.<seq>"``; ``InvalidInput`` if malformed."""
    if position is None:
        return None
    found = _POSITION.fullmatch(position) if type(position) is str else None
    if found is None:
        raise InvalidInput("after is not a cursor of this store")
    tx, seq = int(found[1]), int(found[2])
    if tx >= _BIGINT or seq >= _BIGINT:
        raise InvalidInput("after is not a cursor of this store")
    return tx, seq


def _entries(rows: Sequence[tuple[Any, ...]], user_id: str | None) -> list[LedgerEntry]:
    return [entry_from_json(row[-1], user_id=user_id) for row in rows]


def scan_page(
    query: EntryQuery,
    after: tuple[int, int] | None,
    limit: int,
    rows: Sequence[tuple[Any, ...]],
) -> Scan:
    """A ``Scan`` from the rows of ``Statements.scan`` (``limit + 1`` were asked for).

    A full page's position is its last row. A short page of every user has
    read all there is below the horizon; if rows lie at or above it (their
    transactions were running, or began after the oldest one running), the
    next page starts at the horizon, so the scan comes back for them, and
    skips what it passed over below.
    """
    if query.user_id is not None:
        if len(rows) <= limit:
            return Scan(_entries(rows, query.user_id), None)
        page = rows[:limit]
        return Scan(_entries(page, query.user_id), f"{page[-1][0]}.{page[-1][1]}")
    horizon, more = rows[0][0], rows[0][1]
    found = [row[2:] for row in rows if row[2] is not None]
    if len(found) > limit:
        page = found[:limit]
        return Scan(_entries(page, None), f"{page[-1][0]}.{page[-1][1]}")
    if not more:
        return Scan(_entries(found, None), None)
    start = max((horizon, 0), after or (0, 0))
    return Scan(_entries(found, None), f"{start[0]}.{start[1]}")


def usage_rows(rows: Sequence[tuple[Any, ...]]) -> list[UsageRow]:
    """``UsageRow``s from the rows of ``Statements.sums``."""
    return [
        UsageRow(
            user_id=user_id,
            model=model,
            period_start=None if start is None else start.replace(tzinfo=timezone.utc),
            calls=calls,
            usage=usage_sum(int(tokens_in), int(tokens_out), int(written), int(read)),
            cost=cost,
            charged=charged,
        )
        for (
            user_id,
            model,
            start,
            calls,
            tokens_in,
            tokens_out,
            written,
            read,
            cost,
            charged,
        ) in rows
    ]
