"""PostgreSQL: the store for gateways on many hosts, with a ledger SQL can audit.

Two tables (and a one-row ``meta``), laid out in ``postgres.sql`` beside this
module, which ``create_schema()`` runs: accounts keyed by user id with a
``version`` for compare-and-set, and an append-only ledger ordered by a
``bigserial``, with a unique index on (user_id, request_id). Each row keeps the
record's JSON text exactly as ``serde`` wrote it (what the store reads back)
beside typed columns for SQL: ``numeric`` amounts, ``timestamptz`` times.

A commit is ONE statement, so one round trip and one transaction (the
connections run in autocommit mode): a data-modifying CTE does the
compare-and-set ``UPDATE … WHERE user_id = $u AND version = $expected`` (or
``INSERT … ON CONFLICT DO NOTHING`` for a new account), inserts the ledger rows
only if that touched a row, and returns the stored account if it did not. Zero
rows is ``VersionConflict`` carrying that account (read again in a second
trip only when the winner committed while this statement waited for the row,
so its snapshot still showed the expected version); a unique violation on the
request id is ``DuplicateRequest`` carrying the entry applied first (read in a
second trip, on that rare path); serialization failures and deadlocks are
``VersionConflict`` too, so managers retry them; anything else psycopg raises
is ``StoreError``, with the driver's error as its cause. On a local server the
one statement was measured faster than the same UPDATE and INSERT as an
explicit transaction (four round trips) and than both in psycopg's pipeline
mode (one round trip, more client work).

``exclusive(user_id)`` takes a pooled connection, waits for a session-level
``pg_advisory_lock`` on a 64-bit hash of the schema, table prefix and user
id, and pins that connection to the calling thread (a context variable for
the async store) until the block ends, so the manager's load and commit
inside it run on it, each in its own transaction. Every commit statement
takes the same key as a shared transaction-level lock before it writes the
account row, so while one session holds ``exclusive`` no other writer of that
user commits, from any process or host: managers use it after a lost
compare-and-set and for users contended lately, and writers of one hot user
then take turns instead of the last winner winning again. (A shared lock
costs an uncontended commit one lock-table entry, not a round trip.) A commit
inside the block that applies also releases the session lock in its own
statement (its shared lock keeps the next holder out until it has
committed), so a hot write is three round trips: lock, load, commit.
Session locks need session pooling: behind PgBouncer, use ``pool_mode =
session``, not ``transaction``. A nested ``exclusive`` on a user the block
holds already is counted in the process, not taken again on the server.

No wait is unbounded by default. Each connection of the store's own pool
gets ``lock_timeout`` (30 s unless given; the DSN's ``options`` win), so a
commit or ``exclusive()`` behind a session that holds the user's row or key
and never lets go ends in a ``StoreError`` naming the user; a free pooled
connection is awaited ``timeout`` seconds, a new one ``connect_timeout`` (10 s
unless the DSN says). ``statement_timeout`` is the server's unless the DSN's
``options`` set it.

A store made before ``os.fork()`` follows the fork: the child drops the
connections it inherited without a word to the server (their sockets are
pointed at /dev/null before libpq says goodbye, so the parent's sessions
live on) and opens a pool of its own on first use. The async store is
cancellation-safe at every await: a cancelled call gives its connection
back, and leaves no advisory lock held and no transaction open.

Idle pooled connections are checked before use without a round trip (a
readable socket on an idle connection means the server closed it, e.g. after
a restart or ``pg_terminate_backend``) and replaced, so a store recovers from
a server restart on its own. A read that finds its connection cut anyway is
run again on another; a commit cut in flight is a ``StoreError`` (it may or
may not have applied: the caller's request id settles that).

Every value is a bound parameter; table names come from a prefix (and an
optional schema) checked against ``[a-z_][a-z0-9_]*`` and quoted with
``psycopg.sql.Identifier``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hashlib
import os
import re
import select
import threading
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from importlib import resources
from types import TracebackType
from typing import Any

import psycopg
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout

from creditmeter.exceptions import ConfigError, DuplicateRequest, StoreError, VersionConflict
from creditmeter.models import Account, LedgerEntry
from creditmeter.serde import account_from_json, account_to_json, entry_from_json, entry_to_json

__all__ = [
    "DEFAULT_LOCK_TIMEOUT",
    "DEFAULT_PREFIX",
    "SCHEMA_VERSION",
    "AsyncPostgresStore",
    "PostgresStore",
    "schema_sql",
]

SCHEMA_VERSION = "1"
"""The layout ``postgres.sql`` creates, as recorded in the ``meta`` table."""

DEFAULT_PREFIX = "creditmeter_"
"""The table prefix used unless another is given: tables creditmeter_accounts, ..."""
_PREFIX = re.compile(r"[a-z_][a-z0-9_]{0,40}")
_SCHEMA = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_TABLES = ("meta", "accounts", "ledger")
_NAME_IN_FILE = re.compile(r"\bcreditmeter_([a-z_]+)\b")
_MAX_BIGINT = 2**63 - 1
# How many stale pooled connections to throw away before using whatever comes.
_STALE_TRIES = 64
_KEYS_KEPT = 10_000
_LOCK = b"SELECT pg_advisory_lock(%s)"
_UNLOCK = b"SELECT pg_advisory_unlock(%s)"

DEFAULT_LOCK_TIMEOUT = 30.0
"""Seconds a call waits for a user's lock held by another session before ``StoreError``."""
_MAX_LOCK_TIMEOUT = (2**31 - 1) / 1000  # the server's limit, in seconds
# Run on each new connection of a store's own pool: bound its lock waits, unless the
# connection string's options (or PGOPTIONS) set lock_timeout, which then stands.
_BOUND_LOCKS = (
    b"SELECT set_config('lock_timeout', %s, false) FROM pg_settings "
    b"WHERE name = 'lock_timeout' AND source <> 'client'"
)
# Connection states in which psycopg_pool takes a connection back without waiting.
_RETURNS_AT_ONCE = (TransactionStatus.IDLE, TransactionStatus.UNKNOWN)


# --- the DDL ------------------------------------------------------------------


@functools.cache
def _ddl_file() -> str:
    return resources.files(__package__).joinpath("postgres.sql").read_text(encoding="utf-8")


def _names(prefix: str, schema: str | None) -> dict[str, sql.Identifier]:
    """Every name ``postgres.sql`` uses, for this prefix: tables qualified, indexes not."""
    names: dict[str, sql.Identifier] = {}
    for found in _NAME_IN_FILE.findall(_ddl_file()):
        name = prefix + found
        if schema is not None and found in _TABLES:
            names[found] = sql.Identifier(schema, name)
        else:
            names[found] = sql.Identifier(name)
    return names


def _ddl(prefix: str, schema: str | None) -> list[sql.Composed]:
    """The statements of ``postgres.sql`` with this prefix's names, comments dropped."""
    text = re.sub(r"--[^\n]*", "", _ddl_file()).replace("{", "{{").replace("}", "}}")
    template = _NAME_IN_FILE.sub(lambda found: "{" + found[1] + "}", text)
    names = _names(prefix, schema)
    statements = [
        sql.SQL(statement.strip()).format(**names)
        for statement in template.split(";")
        if statement.strip()
    ]
    if schema is not None:
        statements.insert(
            0, sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema))
        )
    return statements


def schema_sql(prefix: str = DEFAULT_PREFIX, schema: str | None = None) -> str:
    """The DDL ``create_schema()`` runs for this prefix and schema, as one SQL script.

    For migrations kept by hand: ``print(schema_sql("billing_"))``. With the
    default prefix it is ``postgres.sql`` (shipped in this package) without
    its comments.
    """
    prefix, schema = _check_names(prefix, schema)
    return "".join(statement.as_string() + ";\n" for statement in _ddl(prefix, schema))


def _check_names(prefix: object, schema: object) -> tuple[str, str | None]:
    if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
        raise ConfigError(
            "prefix must be 1-41 characters of a-z, 0-9 and _, not starting with a digit, "
            f"got {prefix!r}"
        )
    if schema is not None and (not isinstance(schema, str) or not _SCHEMA.fullmatch(schema)):
        raise ConfigError(
            "schema must be None or 1-63 characters of a-z, 0-9 and _, "
            f"not starting with a digit, got {schema!r}"
        )
    return prefix, schema


def _key(*parts: str) -> int:
    """A signed 64-bit advisory lock key for these strings."""
    digest = hashlib.blake2b("\x00".join(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


# --- statements -----------------------------------------------------------------

_ENTRY_ROW = (
    "({n}, %s::text, %s::text, %s::numeric, %s::numeric, %s::numeric, %s::timestamptz, "
    "%s::text, %s::text, %s::text)"
)


class _Statements:
    """Every statement of one store, composed once into bytes."""

    def __init__(self, prefix: str, schema: str | None) -> None:
        names = _names(prefix, schema)
        self.accounts = names["accounts"]
        self.ledger = names["ledger"]
        self.meta = names["meta"]
        self.request_index = prefix + "ledger_request"
        self.ddl = [statement.as_bytes() for statement in _ddl(prefix, schema)]
        self.key_space = (schema or "", prefix)
        self.schema_lock = _key("creditmeter-schema", *self.key_space)
        self.load = self._bytes("SELECT data FROM {accounts} WHERE user_id = %s")
        self.find_request = self._bytes(
            "SELECT data FROM {ledger} WHERE user_id = %s AND request_id = %s"
        )
        self.find_requests = self._bytes(
            "SELECT request_id, data FROM {ledger} WHERE user_id = %s AND request_id = ANY(%s)"
        )
        self.ledger_all = self._bytes("SELECT data FROM {ledger} WHERE user_id = %s ORDER BY seq")
        self.ledger_tail = self._bytes(
            "SELECT data FROM (SELECT seq, data FROM {ledger} WHERE user_id = %s "
            "ORDER BY seq DESC LIMIT %s) AS tail ORDER BY seq"
        )
        self.users = self._bytes('SELECT user_id FROM {accounts} ORDER BY user_id COLLATE "C"')
        self.schema_version = self._bytes("SELECT value FROM {meta} WHERE key = 'schema'")
        self._commits: dict[tuple[bool, int, bool], bytes] = {}
        self._keys: dict[str, int] = {}

    def _bytes(self, template: str) -> bytes:
        query = sql.SQL(template).format(accounts=self.accounts, ledger=self.ledger, meta=self.meta)
        return query.as_bytes()

    def lock_key(self, user_id: str) -> int:
        """The advisory lock key of a user (remembered: every commit needs it)."""
        keys = self._keys
        key = keys.get(user_id)
        if key is None:
            if len(keys) >= _KEYS_KEPT:
                keys.clear()
            key = keys[user_id] = _key("creditmeter-user", *self.key_space, user_id)
        return key

    def commit(self, *, new: bool, entries: int, release: bool = False) -> bytes:
        """The one statement of a commit: compare-and-set, ledger rows, current row if lost.

        With ``release``, a commit that applies also lets go of the session's
        ``exclusive`` lock on the user (one more parameter: the key). The
        shared transaction-level lock the statement took on the same key
        still holds until the transaction has committed, so the next holder
        of ``exclusive`` cannot read the account before this commit shows.
        """
        query = self._commits.get((new, entries, release))
        if query is not None:
            return query
        # Every commit waits while another session holds exclusive() on the user: a
        # shared transaction-level advisory lock, taken before the row is written.
        held = "pg_advisory_xact_lock_shared(%s::bigint) IS NOT NULL"
        if new:
            cas = (
                "INSERT INTO {accounts} "
                "(user_id, version, balance, created_at, updated_at, last_refill, data) "
                "SELECT %s::text, %s::bigint, %s::numeric, %s::timestamptz, %s::timestamptz, "
                f"%s::timestamptz, %s::text WHERE {held} "
                "ON CONFLICT (user_id) DO NOTHING RETURNING user_id"
            )
        else:
            # Table names are sql.Identifier; every value is a parameter.
            cas = (
                "UPDATE {accounts} SET version = %s, balance = %s, updated_at = %s, "  # noqa: S608
                "last_refill = %s, data = %s WHERE user_id = %s AND version = %s "
                f"AND {held} RETURNING user_id"
            )
        text = "WITH cas AS (" + cas + ")"
        if entries:
            rows = ", ".join(_ENTRY_ROW.format(n=n) for n in range(entries))
            text += (
                ", added AS (INSERT INTO {ledger} (user_id, id, kind, amount, balance_after, "  # noqa: S608
                "cost, at, request_id, model, data) SELECT cas.user_id, e.id, e.kind, e.amount, "
                "e.balance_after, e.cost, e.at, e.request_id, e.model, e.data FROM cas, "
                f"(VALUES {rows}) AS e (n, id, kind, amount, balance_after, cost, at, "
                "request_id, model, data) ORDER BY e.n" + (" RETURNING 1)" if release else ")")
            )
        text += (
            " SELECT EXISTS (SELECT FROM cas), (SELECT data FROM {accounts} "
            "WHERE user_id = %s AND NOT EXISTS (SELECT FROM cas))"
        )
        if release:
            # An advisory unlock is not undone by a rollback: it runs only once the ledger
            # rows are in (a duplicate request id fails the statement before it).
            after = " WHERE (SELECT count(*) FROM added) >= 0" if entries else ""
            text += f", (SELECT pg_advisory_unlock(%s::bigint) FROM cas{after})"  # noqa: S608
        query = self._commits[new, entries, release] = self._bytes(text)
        return query


def _commit_params(
    account: Account,
    entries: Sequence[LedgerEntry],
    expected_version: int | None,
    key: int,
    *,
    release: bool = False,
) -> list[Any]:
    user_id = account.user_id
    data = account_to_json(account)
    params: list[Any]
    if expected_version is None:
        params = [
            user_id,
            account.version,
            account.balance,
            account.created_at,
            account.updated_at,
            account.last_refill,
            data,
            key,
        ]
    else:
        params = [
            account.version,
            account.balance,
            account.updated_at,
            account.last_refill,
            data,
            user_id,
            expected_version,
            key,
        ]
    for entry in entries:
        params += (
            entry.id,
            entry.kind.value,
            entry.amount,
            entry.balance_after,
            entry.cost,
            entry.at,
            entry.request_id,
            entry.model,
            entry_to_json(entry),
        )
    params.append(user_id)
    if release:
        params.append(key)
    return params


def _failed(action: str, exc: BaseException, user_id: str | None = None) -> StoreError:
    """The ``StoreError`` for a driver error: the call, the user, and any wait given up."""
    detail = str(exc).strip() or type(exc).__name__
    where = (
        f"PostgreSQL {action}" if user_id is None else f"PostgreSQL {action} for user {user_id!r}"
    )
    if isinstance(exc, errors.LockNotAvailable):
        return StoreError(
            f"{where} gave up waiting for a lock that another session holds on the user "
            f"(its row, or its exclusive() key) after lock_timeout: {detail}"
        )
    if isinstance(exc, PoolTimeout):
        return StoreError(
            f"{where} found no free connection in the pool within its timeout: {detail}"
        )
    return StoreError(f"{where} failed: {detail}")


def _lost_race(current: Account | None, expected_version: int | None) -> bool:
    """Tell whether the account read with a lost compare-and-set predates the winner.

    The statement reads with the snapshot it started with; if the winning
    writer committed after that (the UPDATE waited for its row lock), the row
    read still holds the expected version and must be read again.
    """
    return (None if current is None else current.version) == expected_version


def _duplicate(
    user_id: str, entries: Sequence[LedgerEntry], found: dict[str, str], exc: Exception
) -> DuplicateRequest:
    for entry in entries:
        request_id = entry.request_id
        if request_id is not None and request_id in found:
            return DuplicateRequest(
                user_id, request_id, entry=entry_from_json(found[request_id], user_id=user_id)
            )
    earlier: dict[str, LedgerEntry] = {}
    for entry in entries:  # not stored: the commit repeats a request id of its own
        request_id = entry.request_id
        if request_id is not None:
            if request_id in earlier:
                return DuplicateRequest(user_id, request_id, entry=earlier[request_id])
            earlier[request_id] = entry
    raise _failed("commit", exc, user_id) from exc


def _request_ids(entries: Sequence[LedgerEntry]) -> list[str]:
    return [entry.request_id for entry in entries if entry.request_id is not None]


# --- connections ------------------------------------------------------------------


def _readable(fd: int) -> bool:
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(0))
    return bool(select.select([fd], [], [], 0)[0])  # pragma: no cover - Windows


def _stale(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> bool:
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


def _pool_settings(min_size: object, max_size: object, timeout: object) -> tuple[int, int, float]:
    if type(min_size) is not int or type(max_size) is not int or not 0 <= min_size <= max_size:
        raise ConfigError(
            f"need 0 <= min_size <= max_size (whole numbers), got {min_size!r}, {max_size!r}"
        )
    if max_size < 1:
        raise ConfigError("max_size must be at least 1")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return min_size, max_size, float(timeout)


def _lock_setting(lock_timeout: object) -> str | None:
    """``lock_timeout`` seconds as the server setting (``"250ms"``); ``None`` stays ``None``."""
    if lock_timeout is None:
        return None
    if (
        isinstance(lock_timeout, bool)
        or not isinstance(lock_timeout, (int, float))
        or not 0 < lock_timeout <= _MAX_LOCK_TIMEOUT  # also refuses NaN
    ):
        raise ConfigError(
            f"lock_timeout must be None or a number of seconds above 0 and at most "
            f"{_MAX_LOCK_TIMEOUT}, got {lock_timeout!r}"
        )
    return f"{max(1, round(lock_timeout * 1000))}ms"


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

_STORES: weakref.WeakSet[_Common] = weakref.WeakSet()
# Pools inherited over a fork: never closed (their close would end the parent's
# sessions and join threads that do not exist here), and kept so never collected.
_LEFT_BEHIND: list[object] = []


def _in_forked_child() -> None:
    for store in list(_STORES):
        store._after_fork()  # noqa: SLF001 - a class of this module


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_in_forked_child)


def _drop_silently(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> None:
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


class _Options:
    """What both stores take: table names, connection settings, and their checks."""

    def __init__(
        self,
        target: object,
        *,
        pool_class: type[Any],
        prefix: object,
        schema: object,
        create_schema: object,
        min_size: object,
        max_size: object,
        timeout: object,
        application_name: object,
        lock_timeout: object,
    ) -> None:
        self.prefix, self.schema = _check_names(prefix, schema)
        if type(create_schema) is not bool:
            raise ConfigError(f"create_schema must be True or False, got {create_schema!r}")
        self.create_schema = create_schema
        self.lock_timeout = _lock_setting(lock_timeout)
        if isinstance(target, pool_class):
            self.dsn: str | None = None
            self.pool: Any = target
            return
        if not isinstance(target, str):
            raise ConfigError(
                f"a PostgreSQL store needs a DSN or a {pool_class.__name__}, "
                f"got {type(target).__name__}"
            )
        try:
            given = conninfo_to_dict(target)
        except psycopg.Error as exc:
            raise ConfigError(f"not a PostgreSQL DSN: {exc}") from None
        self.min_size, self.max_size, self.timeout = _pool_settings(min_size, max_size, timeout)
        if application_name is not None and not isinstance(application_name, str):
            raise ConfigError(f"application_name must be a str, got {application_name!r}")
        self.dsn = target
        self.pool = None
        self.kwargs: dict[str, Any] = {"autocommit": True}
        if application_name is not None or "application_name" not in given:
            self.kwargs["application_name"] = application_name or "creditmeter"
        if "connect_timeout" not in given:
            self.kwargs["connect_timeout"] = 10
        self.where = f"{given.get('host', 'localhost')}/{given.get('dbname', '')}"


class _Common:
    """What the sync and async stores share: names, repr, schema check, fork handling."""

    _options: _Options
    _sql: _Statements
    _owns_pool: bool
    _closed: bool
    _pool: Any
    # The process whose pool the store uses, and the last one that let go of a parent's.
    _pid: int
    _left: int
    # Every connection the store's own pool made (and the schema connection), so a
    # forked child can let go of them all.
    _conns: weakref.WeakSet[Any]

    def _start(self) -> None:
        self._pid = self._left = os.getpid()
        self._conns = weakref.WeakSet()
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
            raise StoreError(
                f"the creditmeter tables with prefix {self.prefix!r} hold schema {value!r}; "
                f"this version of creditmeter reads schema {SCHEMA_VERSION!r}"
            )

    def _bound_params(self) -> tuple[str] | None:
        """The parameter of ``_BOUND_LOCKS`` for a new session, or ``None`` to leave it."""
        setting = self._options.lock_timeout
        return None if setting is None else (setting,)

    def _after_fork(self) -> None:
        """In the at-fork hook of a child process (the only thread there yet)."""
        self._leave_parent()

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

    def _forget_connections(self) -> None:
        """Drop per-thread or per-task state that pointed at the parent's connections."""
        raise NotImplementedError  # pragma: no cover

    def _foreign_pool(self) -> StoreError:
        return StoreError(
            f"this {type(self).__name__} runs on a pool made in process {self._pid}, and a "
            "pool cannot cross os.fork(): make the pool and the store in each process after "
            "forking, or give the store a DSN (it then opens a pool of its own in the child)"
        )


# --- the sync store -------------------------------------------------------------


class PostgresStore(_Common):
    """Accounts and ledger in PostgreSQL, safe across threads, processes and hosts.

    Give a DSN (``"postgresql://user@host/db"``) and the store makes its own
    ``psycopg_pool.ConnectionPool`` (``min_size``..``max_size`` connections in
    autocommit mode, ``application_name`` "creditmeter" unless the DSN or the
    argument names one; ``timeout`` seconds to wait for a free connection),
    which ``close()`` closes. Or give an open ``ConnectionPool`` of your own:
    the store uses it and never closes it (its connections should be in
    autocommit mode, else each call pays a ``BEGIN`` and a ``COMMIT``).

    ``lock_timeout`` (seconds, default 30; ``None`` leaves the server's
    setting) bounds every wait for a user's lock: a commit behind another
    session's row lock or ``exclusive()``, and ``exclusive()`` itself. Past
    it the call raises ``StoreError`` naming the user. It is set on each
    connection the store opens, unless the DSN's ``options`` set
    ``lock_timeout`` themselves (then theirs stands); a pool of your own
    keeps its connections' settings.

    Tables are named ``{prefix}accounts``, ``{prefix}ledger`` and
    ``{prefix}meta``, in ``schema`` if given. ``create_schema=True`` (the
    default) creates them when the store is built, if missing.

    A store made before ``os.fork()`` may be used in both processes: the
    child lets go of the inherited connections (without closing the
    parent's sessions) and opens a pool of its own. A pool you gave cannot
    follow: in the child every call raises ``StoreError``.
    """

    def __init__(
        self,
        dsn_or_pool: str | ConnectionPool[Any],
        *,
        prefix: str = DEFAULT_PREFIX,
        schema: str | None = None,
        create_schema: bool = True,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 30.0,
        application_name: str | None = None,
        lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        options = _Options(
            dsn_or_pool,
            pool_class=ConnectionPool,
            prefix=prefix,
            schema=schema,
            create_schema=create_schema,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            application_name=application_name,
            lock_timeout=lock_timeout,
        )
        self._options = options
        self._sql = _Statements(options.prefix, options.schema)
        self._local = threading.local()
        self._fork_lock = threading.Lock()
        self._closed = False
        self._owns_pool = options.pool is None
        self._start()
        if options.pool is not None:
            self._pool: ConnectionPool[Any] = options.pool
            if options.create_schema:
                self.create_schema()
            return
        if options.create_schema:
            self.create_schema()  # on a connection of its own: a failure leaves nothing open
        try:
            self._pool = self._open_pool()
        except StoreError:
            self._closed = True
            raise

    def _open_pool(self) -> ConnectionPool[Any]:
        options = self._options
        pool: ConnectionPool[Any] = ConnectionPool(
            options.dsn or "",
            kwargs=options.kwargs,
            min_size=options.min_size,
            max_size=options.max_size,
            timeout=options.timeout,
            configure=self._configure,
            name=f"creditmeter-{options.prefix}",
            open=True,
        )
        try:
            # Filled before first use: a request that found it empty would grow it, and
            # psycopg_pool hands its connections out in turn (measured: a charge that
            # alternated between two connections took ~80 µs more than on one).
            pool.wait(timeout=options.timeout)
        except psycopg.Error as exc:  # the pool closed itself
            raise _failed("connect", exc) from exc
        return pool

    def _configure(self, conn: psycopg.Connection[Any]) -> None:
        """Set up a new connection of the store's own: remembered, lock waits bounded."""
        self._conns.add(conn)
        bound = self._bound_params()
        if bound is not None:
            conn.execute(_BOUND_LOCKS, bound)

    # --- connections ----------------------------------------------------------

    def _getconn(self) -> psycopg.Connection[Any]:
        if self._pid != os.getpid():
            self._follow_fork()
        if self._closed:
            raise StoreError("the store is closed")
        pool = self._pool
        for _ in range(_STALE_TRIES):
            conn: psycopg.Connection[Any] = pool.getconn()
            if not _stale(conn):
                return conn
            conn.close()
            pool.putconn(conn)
        last: psycopg.Connection[Any] = pool.getconn()  # pragma: no cover - all stale
        return last  # pragma: no cover

    def _follow_fork(self) -> None:
        """First use in a forked child: let go of the parent's pool, open one of our own."""
        with self._fork_lock:
            pid = os.getpid()
            if self._pid == pid:
                return
            self._leave_parent()
            if not self._owns_pool:
                raise self._foreign_pool()
            if not self._closed:
                self._pool = self._open_pool()
            self._pid = pid

    def _after_fork(self) -> None:
        self._fork_lock = threading.Lock()  # another thread of the parent may have held it
        super()._after_fork()

    def _forget_connections(self) -> None:
        self._local = threading.local()  # a pinned connection was the parent's

    @contextlib.contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """The thread's pinned connection (inside ``exclusive``), else one from the pool."""
        conn: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        if conn is not None:
            with _transaction(conn):
                yield conn
            return
        conn = self._getconn()
        try:
            with _transaction(conn):
                yield conn
        finally:
            self._pool.putconn(conn)

    def create_schema(self) -> None:
        """Create the schema, tables and indexes if missing (``postgres.sql``); idempotent."""
        try:
            if self._options.dsn is not None:
                with psycopg.connect(self._options.dsn, **self._options.kwargs) as conn:
                    self._configure(conn)
                    self._create_on(conn)
            else:
                with self._connection() as conn:
                    self._create_on(conn)
        except psycopg.Error as exc:
            raise _failed("create_schema", exc) from exc

    def _create_on(self, conn: psycopg.Connection[Any]) -> None:
        with conn.transaction():
            conn.execute(b"SET LOCAL client_min_messages = warning")
            conn.execute(b"SELECT pg_advisory_xact_lock(%s)", (self._sql.schema_lock,))
            for statement in self._sql.ddl:
                conn.execute(statement)
            self._check_version(conn.execute(self._sql.schema_version).fetchone())

    @contextlib.contextmanager
    def exclusive(self, user_id: str) -> Iterator[None]:
        """Keep every other writer of ``user_id`` (in any process, on any host) out.

        Waits (at most ``lock_timeout``) for a PostgreSQL advisory lock on a
        connection that the calling thread then uses for every call on this
        store until the block ends; each call inside still runs in its own
        transaction. Commits by other sessions wait for the lock (see the
        module docstring). The lock is held until the block ends or, sooner,
        until a commit of this user in the block applies (which hands it on
        in the same statement). Blocks nest; a nested block on the same user
        keeps the lock to the end.
        """
        key = self._sql.lock_key(user_id)
        pid = os.getpid()
        pinned: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        held: dict[int, int] = self._local.held if pinned is not None else {}
        if held.get(key):
            conn = pinned  # the thread holds this user already: counted here, no round trip
        else:
            conn = self._lock(key, pinned, user_id)
            if pinned is None:
                self._local.conn = conn
                self._local.held = held
        assert conn is not None
        held[key] = held.get(key, 0) + 1
        try:
            yield
        finally:
            if os.getpid() == pid:  # else a forked child: the lock and connection are the parent's
                self._leave(conn, key, held, give_back=pinned is None)

    def _leave(
        self, conn: psycopg.Connection[Any], key: int, held: dict[int, int], *, give_back: bool
    ) -> None:
        """The end of an ``exclusive`` block: unlock at depth 1, give the connection back."""
        depth = held.pop(key, 0)  # 0: a commit in the block let go of it already
        if depth > 1:
            held[key] = depth - 1
        if give_back:
            self._local.conn = None
        try:
            if depth == 1:
                with _transaction(conn):
                    conn.execute(_UNLOCK, (key,))
        except BaseException as exc:
            # Closing frees the lock (nested: the outer ones too, the connection is lost
            # anyway); an error here leaves the block's own outcome standing.
            conn.close()
            if not isinstance(exc, Exception):
                raise
        finally:
            if give_back:
                self._pool.putconn(conn)

    def _lock(
        self, key: int, pinned: psycopg.Connection[Any] | None, user_id: str
    ) -> psycopg.Connection[Any]:
        """Take the advisory lock on the pinned connection, else on one from the pool.

        A pooled connection the server had just dropped is replaced (a dead
        session holds no lock).
        """
        retries = _STALE_TRIES if pinned is None else 0
        while True:
            try:
                conn = pinned if pinned is not None else self._getconn()
            except psycopg.Error as exc:
                raise _failed("exclusive", exc, user_id) from exc
            lost = False
            try:
                with _transaction(conn):
                    conn.execute(_LOCK, (key,))
            except errors.LockNotAvailable as exc:  # lock_timeout: not granted
                if pinned is None:
                    self._pool.putconn(conn)
                raise _failed("exclusive", exc, user_id) from exc
            except BaseException as exc:
                lost = conn.broken
                self._lock_failed(conn, key, pinned=pinned is not None, exc=exc)
                if not isinstance(exc, psycopg.Error):
                    raise
                if not (retries and lost):
                    raise _failed("exclusive", exc, user_id) from exc
                retries -= 1
            else:
                return conn

    def _lock_failed(
        self, conn: psycopg.Connection[Any], key: int, *, pinned: bool, exc: BaseException
    ) -> None:
        """After a failed or interrupted lock statement: make sure the lock is not kept.

        It may have been granted (an interrupt that came after the server
        granted it): closing the session surely frees it; on a pinned
        connection, unlocking does (the key was not held before).
        """
        if not pinned:
            conn.close()
            self._pool.putconn(conn)
        elif not isinstance(exc, Exception):
            _release(conn, key)

    # --- the contract ---------------------------------------------------------

    def load(self, user_id: str) -> Account | None:
        """Return the stored account, or ``None``."""
        rows = self._fetch("load", user_id, self._sql.load, (user_id,))
        return account_from_json(rows[0][0], user_id=user_id) if rows else None

    def commit(
        self,
        account: Account,
        entries: Sequence[LedgerEntry],
        *,
        expected_version: int | None,
    ) -> None:
        """Store the account and entries in one statement if the version still matches."""
        user_id = account.user_id
        key = self._sql.lock_key(user_id)
        pinned: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        # Inside exclusive(user) (not nested in another for the same user), a commit that
        # applies hands the lock on in the same statement: no round trip to unlock.
        held: dict[int, int] | None = None if pinned is None else self._local.held
        release = held is not None and held.get(key) == 1
        query = self._sql.commit(
            new=expected_version is None, entries=len(entries), release=release
        )
        params = _commit_params(account, entries, expected_version, key, release=release)
        try:
            row = self._execute_commit(pinned, query, params)
        except errors.UniqueViolation as exc:
            if exc.diag.constraint_name != self._sql.request_index:
                raise _failed("commit", exc, user_id) from exc
            raise self._duplicate(user_id, entries, exc) from None
        except (errors.SerializationFailure, errors.DeadlockDetected) as exc:
            raise VersionConflict(user_id, expected=expected_version) from exc
        except psycopg.Error as exc:
            raise _failed("commit", exc, user_id) from exc
        except BaseException:
            if release and held is not None and pinned is not None:
                # Interrupted: whether the lock went with the commit is unknown; let go of it.
                del held[key]
                _release(pinned, key)
            raise
        assert row is not None  # the statement always returns one row
        if row[0]:
            if held is not None and release:
                del held[key]
            return
        current = None if row[1] is None else account_from_json(row[1], user_id=user_id)
        if _lost_race(current, expected_version):
            current = self.load(user_id)
        raise VersionConflict(user_id, expected=expected_version, current=current)

    def _execute_commit(
        self, pinned: psycopg.Connection[Any] | None, query: bytes, params: list[Any]
    ) -> tuple[Any, ...] | None:
        """The body of ``_connection()``, inline: this is every write's path."""
        conn = self._getconn() if pinned is None else pinned
        try:
            if conn.autocommit:
                return conn.execute(query, params).fetchone()
            with conn.transaction():
                return conn.execute(query, params).fetchone()
        finally:
            if pinned is None:
                self._pool.putconn(conn)

    def _duplicate(
        self, user_id: str, entries: Sequence[LedgerEntry], exc: Exception
    ) -> DuplicateRequest:
        try:
            with self._connection() as conn:
                rows = conn.execute(
                    self._sql.find_requests, (user_id, _request_ids(entries))
                ).fetchall()
        except psycopg.Error as read_exc:
            raise _failed("commit", read_exc, user_id) from exc
        return _duplicate(user_id, entries, dict(rows), exc)

    def find_request(self, user_id: str, request_id: str) -> LedgerEntry | None:
        """Return the entry recorded under ``request_id``, if any."""
        rows = self._fetch("read", user_id, self._sql.find_request, (user_id, request_id))
        return entry_from_json(rows[0][0], user_id=user_id) if rows else None

    def ledger(self, user_id: str, *, limit: int | None = None) -> list[LedgerEntry]:
        """Return the user's entries, oldest first (the newest ``limit`` if given)."""
        if limit == 0:
            return []
        if limit is None:
            rows = self._fetch("read", user_id, self._sql.ledger_all, (user_id,))
        else:
            tail = (user_id, min(limit, _MAX_BIGINT))
            rows = self._fetch("read", user_id, self._sql.ledger_tail, tail)
        return [entry_from_json(row[0], user_id=user_id) for row in rows]

    def users(self) -> list[str]:
        """Return every user id, sorted (by code point, as Python sorts)."""
        return [row[0] for row in self._fetch("read", None, self._sql.users, ())]

    def _fetch(
        self, action: str, user_id: str | None, query: bytes, params: Sequence[Any]
    ) -> list[tuple[Any, ...]]:
        """Run a read; again on another connection if the server had dropped the one used.

        The server can cut pooled connections (several at once) between the
        idle check and the query, before its goodbye arrives; a read is safe
        to repeat. Writes are not repeated: a commit cut in flight may or may
        not have applied, which only the caller's request id settles.
        """
        # Each dropped connection is discarded, so this ends; never inside exclusive().
        retries = _STALE_TRIES if getattr(self._local, "conn", None) is None else 0
        while True:
            lost = False
            try:
                with self._connection() as conn:
                    try:
                        return conn.execute(query, params).fetchall()
                    except psycopg.OperationalError:
                        lost = conn.broken
                        raise
            except psycopg.Error as exc:
                if not (retries and lost):
                    raise _failed(action, exc, user_id) from exc
                retries -= 1

    def close(self) -> None:
        """Close the pool if the store made it; further use raises ``StoreError``."""
        if self._closed:
            return
        if self._pid != os.getpid():
            self._leave_parent()  # closing the parent's pool would end its sessions
        elif self._owns_pool:
            self._pool.close()
        self._closed = True

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return self._describe("PostgresStore")


@contextlib.contextmanager
def _transaction(conn: psycopg.Connection[Any]) -> Iterator[None]:
    if conn.autocommit:
        yield
    else:
        with conn.transaction():
            yield


def _release(conn: psycopg.Connection[Any], key: int) -> None:
    """Let go of a lock this session may or may not hold (the key was not held before)."""
    try:
        if not conn.closed:
            with _transaction(conn):
                conn.execute(_UNLOCK, (key,))
    except psycopg.Error:
        conn.close()  # a closed session holds no lock


# --- the async store -----------------------------------------------------------


class AsyncPostgresStore(_Common):
    """``PostgresStore`` for asyncio, over a ``psycopg_pool.AsyncConnectionPool``.

    The same arguments and tables as ``PostgresStore``. An async pool opens in
    a running event loop, so the store opens it (and creates the schema, with
    ``create_schema=True``) on first use; ``await AsyncPostgresStore.open(dsn)``
    does that at once, so a bad DSN or a missing server fails there. A pool
    you give must be open already (``await pool.open()``), and is never
    closed by the store.

    Every call may be cancelled at any await: it gives its connection back
    and leaves no lock held and no transaction open. A cancelled commit may
    or may not have applied (as with one cut in flight: a request id settles
    it), never in part.
    """

    def __init__(
        self,
        dsn_or_pool: str | AsyncConnectionPool[Any],
        *,
        prefix: str = DEFAULT_PREFIX,
        schema: str | None = None,
        create_schema: bool = True,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 30.0,
        application_name: str | None = None,
        lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
    ) -> None:
        options = _Options(
            dsn_or_pool,
            pool_class=AsyncConnectionPool,
            prefix=prefix,
            schema=schema,
            create_schema=create_schema,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            application_name=application_name,
            lock_timeout=lock_timeout,
        )
        self._options = options
        self._sql = _Statements(options.prefix, options.schema)
        self._pinned: contextvars.ContextVar[psycopg.AsyncConnection[Any] | None] = (
            contextvars.ContextVar(f"creditmeter_postgres_{id(self)}", default=None)
        )
        self._held: contextvars.ContextVar[dict[int, int]] = contextvars.ContextVar(
            f"creditmeter_postgres_held_{id(self)}"
        )
        self._closed = False
        self._ready = False
        self._created = not options.create_schema
        self._opening: asyncio.Lock | None = None
        self._owns_pool = options.pool is None
        self._start()
        pool: AsyncConnectionPool[Any] | None = options.pool
        self._pool: AsyncConnectionPool[Any] = self._new_pool() if pool is None else pool

    def _new_pool(self) -> AsyncConnectionPool[Any]:
        """The store's own pool, not open yet (it opens in the running loop)."""
        options = self._options
        return AsyncConnectionPool(
            options.dsn or "",
            kwargs=options.kwargs,
            min_size=options.min_size,
            max_size=options.max_size,
            timeout=options.timeout,
            configure=self._configure,
            name=f"creditmeter-{options.prefix}",
            open=False,
        )

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Set up a new connection of the store's own: remembered, lock waits bounded."""
        self._conns.add(conn)
        bound = self._bound_params()
        if bound is not None:
            await conn.execute(_BOUND_LOCKS, bound)

    @classmethod
    async def open(
        cls,
        dsn_or_pool: str | AsyncConnectionPool[Any],
        *,
        prefix: str = DEFAULT_PREFIX,
        schema: str | None = None,
        create_schema: bool = True,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 30.0,
        application_name: str | None = None,
        lock_timeout: float | None = DEFAULT_LOCK_TIMEOUT,
    ) -> AsyncPostgresStore:
        """Build the store and open it now: pool opened, schema created (if asked)."""
        store = cls(
            dsn_or_pool,
            prefix=prefix,
            schema=schema,
            create_schema=create_schema,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            application_name=application_name,
            lock_timeout=lock_timeout,
        )
        try:
            await store._ensure_open()
        except BaseException:
            await store.aclose()
            raise
        return store

    async def _ensure_open(self) -> None:
        if self._pid != os.getpid():
            self._follow_fork()
        if self._ready:
            return
        if self._closed:
            raise StoreError("the store is closed")
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._ready:
                return
            if not self._created:
                await self.create_schema()
                self._created = True
            if self._owns_pool:
                try:
                    # Filled before first use, as in PostgresStore.
                    await self._pool.open(wait=True, timeout=self._options.timeout)
                except psycopg.Error as exc:  # the pool closed itself
                    raise _failed("connect", exc) from exc
            self._ready = True

    def _follow_fork(self) -> None:
        """First use in a forked child: let go of the parent's pool, make one of our own."""
        self._leave_parent()
        if not self._owns_pool:
            raise self._foreign_pool()
        if not self._closed:
            self._pool = self._new_pool()  # opened by _ensure_open, in this process's loop
        self._pid = os.getpid()

    def _forget_connections(self) -> None:
        # The parent's event loop does not run here: its pool, lock and tasks are dead.
        self._ready = False
        self._opening = None

    # --- connections ----------------------------------------------------------

    async def _getconn(self) -> psycopg.AsyncConnection[Any]:
        if not self._ready or self._pid != os.getpid():
            await self._ensure_open()
        if self._closed:
            raise StoreError("the store is closed")
        pool = self._pool
        for _ in range(_STALE_TRIES):
            conn: psycopg.AsyncConnection[Any] = await pool.getconn()
            if not _stale(conn):
                return conn
            await conn.close()
            await self._give_back(conn)
        last: psycopg.AsyncConnection[Any] = await pool.getconn()  # pragma: no cover - all stale
        return last  # pragma: no cover

    async def _give_back(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Return a connection to the pool, even if the caller is being cancelled.

        An idle (or closed) connection goes back without the pool waiting on
        anything; one left in a transaction is rolled back by the pool first,
        and a cancel must not cut that short (the connection would be lost to
        the pool), so that return runs shielded.
        """
        if conn.pgconn.transaction_status in _RETURNS_AT_ONCE:
            await self._pool.putconn(conn)
        else:
            await asyncio.shield(self._pool.putconn(conn))

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """The task's pinned connection (inside ``exclusive``), else one from the pool."""
        conn = self._pinned.get()
        if conn is not None:
            async with _async_transaction(conn):
                yield conn
            return
        conn = await self._getconn()
        try:
            async with _async_transaction(conn):
                yield conn
        finally:
            await self._give_back(conn)

    async def create_schema(self) -> None:
        """Create the schema, tables and indexes if missing (``postgres.sql``); idempotent."""
        try:
            if self._options.dsn is not None:
                # A connection of its own: no pool to open first, and the real error if any.
                conn = await psycopg.AsyncConnection.connect(
                    self._options.dsn, **self._options.kwargs
                )
                async with conn:
                    await self._configure(conn)
                    await self._create_on(conn)
                return
            if self._pid != os.getpid():
                self._follow_fork()  # a pool of yours cannot follow: StoreError
            conn = await self._pool.getconn()
            try:
                await self._create_on(conn)
            finally:
                await self._give_back(conn)
        except psycopg.Error as exc:
            raise _failed("create_schema", exc) from exc

    async def _create_on(self, conn: psycopg.AsyncConnection[Any]) -> None:
        async with conn.transaction():
            await conn.execute(b"SET LOCAL client_min_messages = warning")
            await conn.execute(b"SELECT pg_advisory_xact_lock(%s)", (self._sql.schema_lock,))
            for statement in self._sql.ddl:
                await conn.execute(statement)
            cursor = await conn.execute(self._sql.schema_version)
            self._check_version(await cursor.fetchone())

    @contextlib.asynccontextmanager
    async def exclusive(self, user_id: str) -> AsyncIterator[None]:
        """Keep every other writer of ``user_id`` out until the block ends.

        As ``PostgresStore.exclusive``; the connection is pinned to the
        calling task, and given back even if the task is cancelled (at any
        await, entering, inside or leaving the block).
        """
        key = self._sql.lock_key(user_id)
        pid = os.getpid()
        pinned = self._pinned.get()
        held: dict[int, int] = self._held.get() if pinned is not None else {}
        if held.get(key):
            conn = pinned  # the task holds this user already: counted here, no round trip
        else:
            conn = await self._lock(key, pinned, user_id)
            if pinned is None:
                self._pinned.set(conn)
                self._held.set(held)
        assert conn is not None
        held[key] = held.get(key, 0) + 1
        try:
            yield
        finally:
            if os.getpid() == pid:  # else a forked child: the lock and connection are the parent's
                depth = held.pop(key, 0)  # 0: a commit in the block let go of it already
                if depth > 1:
                    held[key] = depth - 1
                if pinned is None:
                    self._pinned.set(None)
                if depth == 1 or pinned is None:
                    # Shielded: a cancelled caller must still let go of the lock and the
                    # connection.
                    await asyncio.shield(
                        self._unlock(conn, key if depth == 1 else None, give_back=pinned is None)
                    )

    async def _lock(
        self, key: int, pinned: psycopg.AsyncConnection[Any] | None, user_id: str
    ) -> psycopg.AsyncConnection[Any]:
        """Take the advisory lock on the pinned connection, else on one from the pool."""
        retries = _STALE_TRIES if pinned is None else 0
        while True:
            try:
                conn = pinned if pinned is not None else await self._getconn()
            except psycopg.Error as exc:
                raise _failed("exclusive", exc, user_id) from exc
            lost = False
            try:
                async with _async_transaction(conn):
                    await conn.execute(_LOCK, (key,))
            except errors.LockNotAvailable as exc:  # lock_timeout: not granted
                if pinned is None:
                    await self._give_back(conn)
                raise _failed("exclusive", exc, user_id) from exc
            except BaseException as exc:
                lost = conn.broken
                # Shielded: a second cancel must not cut it short.
                await asyncio.shield(
                    self._lock_failed(conn, key, pinned=pinned is not None, exc=exc)
                )
                if not isinstance(exc, psycopg.Error):
                    raise
                if not (retries and lost):
                    raise _failed("exclusive", exc, user_id) from exc
                retries -= 1
            else:
                return conn

    async def _lock_failed(
        self, conn: psycopg.AsyncConnection[Any], key: int, *, pinned: bool, exc: BaseException
    ) -> None:
        """As ``PostgresStore._lock_failed`` (here the lock may be granted before a cancel)."""
        if not pinned:
            await conn.close()
            await self._pool.putconn(conn)
        elif not isinstance(exc, Exception):
            await _async_release(conn, key)

    async def _unlock(
        self, conn: psycopg.AsyncConnection[Any], key: int | None, *, give_back: bool
    ) -> None:
        try:
            if key is not None:
                async with _async_transaction(conn):
                    await conn.execute(_UNLOCK, (key,))
        except BaseException as exc:
            # Closing frees the lock (nested: the outer ones too, the connection is lost
            # anyway); an error here leaves the block's own outcome standing.
            await conn.close()
            if not isinstance(exc, Exception):
                raise
        finally:
            if give_back:
                await self._pool.putconn(conn)

    # --- the contract ---------------------------------------------------------

    async def load(self, user_id: str) -> Account | None:
        """Return the stored account, or ``None``."""
        rows = await self._fetch("load", user_id, self._sql.load, (user_id,))
        return account_from_json(rows[0][0], user_id=user_id) if rows else None

    async def commit(
        self,
        account: Account,
        entries: Sequence[LedgerEntry],
        *,
        expected_version: int | None,
    ) -> None:
        """Store the account and entries in one statement if the version still matches."""
        user_id = account.user_id
        key = self._sql.lock_key(user_id)
        pinned = self._pinned.get()
        held = self._held.get(None) if pinned is not None else None
        release = held is not None and held.get(key) == 1  # as in PostgresStore.commit
        query = self._sql.commit(
            new=expected_version is None, entries=len(entries), release=release
        )
        params = _commit_params(account, entries, expected_version, key, release=release)
        try:
            async with self._connection() as conn:
                cursor = await conn.execute(query, params)
                row = await cursor.fetchone()
        except errors.UniqueViolation as exc:
            if exc.diag.constraint_name != self._sql.request_index:
                raise _failed("commit", exc, user_id) from exc
            raise await self._duplicate(user_id, entries, exc) from None
        except (errors.SerializationFailure, errors.DeadlockDetected) as exc:
            raise VersionConflict(user_id, expected=expected_version) from exc
        except psycopg.Error as exc:
            raise _failed("commit", exc, user_id) from exc
        except BaseException:
            if release and held is not None and pinned is not None:
                # Cancelled: whether the lock went with the commit is unknown; let go of it.
                del held[key]
                await asyncio.shield(_async_release(pinned, key))
            raise
        assert row is not None  # the statement always returns one row
        if row[0]:
            if held is not None and release:
                del held[key]
            return
        current = None if row[1] is None else account_from_json(row[1], user_id=user_id)
        if _lost_race(current, expected_version):
            current = await self.load(user_id)
        raise VersionConflict(user_id, expected=expected_version, current=current)

    async def _duplicate(
        self, user_id: str, entries: Sequence[LedgerEntry], exc: Exception
    ) -> DuplicateRequest:
        try:
            async with self._connection() as conn:
                cursor = await conn.execute(
                    self._sql.find_requests, (user_id, _request_ids(entries))
                )
                rows = await cursor.fetchall()
        except psycopg.Error as read_exc:
            raise _failed("commit", read_exc, user_id) from exc
        return _duplicate(user_id, entries, dict(rows), exc)

    async def find_request(self, user_id: str, request_id: str) -> LedgerEntry | None:
        """Return the entry recorded under ``request_id``, if any."""
        rows = await self._fetch("read", user_id, self._sql.find_request, (user_id, request_id))
        return entry_from_json(rows[0][0], user_id=user_id) if rows else None

    async def ledger(self, user_id: str, *, limit: int | None = None) -> list[LedgerEntry]:
        """Return the user's entries, oldest first (the newest ``limit`` if given)."""
        if limit == 0:
            return []
        if limit is None:
            rows = await self._fetch("read", user_id, self._sql.ledger_all, (user_id,))
        else:
            tail = (user_id, min(limit, _MAX_BIGINT))
            rows = await self._fetch("read", user_id, self._sql.ledger_tail, tail)
        return [entry_from_json(row[0], user_id=user_id) for row in rows]

    async def users(self) -> list[str]:
        """Return every user id, sorted (by code point, as Python sorts)."""
        return [row[0] for row in await self._fetch("read", None, self._sql.users, ())]

    async def _fetch(
        self, action: str, user_id: str | None, query: bytes, params: Sequence[Any]
    ) -> list[tuple[Any, ...]]:
        """Run a read; again on another connection if the server had dropped the one used."""
        retries = _STALE_TRIES if self._pinned.get() is None else 0
        while True:
            lost = False
            try:
                async with self._connection() as conn:
                    try:
                        cursor = await conn.execute(query, params)
                        return await cursor.fetchall()
                    except psycopg.OperationalError:
                        lost = conn.broken
                        raise
            except psycopg.Error as exc:
                if not (retries and lost):
                    raise _failed(action, exc, user_id) from exc
                retries -= 1

    async def aclose(self) -> None:
        """Close the pool if the store made it; further use raises ``StoreError``."""
        if self._closed:
            return
        if self._pid != os.getpid():
            self._leave_parent()  # closing the parent's pool would end its sessions
            self._closed = True
        else:
            self._closed = True
            if self._owns_pool:
                await self._pool.close()

    async def __aenter__(self) -> AsyncPostgresStore:
        await self._ensure_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return self._describe("AsyncPostgresStore")


@contextlib.asynccontextmanager
async def _async_transaction(conn: psycopg.AsyncConnection[Any]) -> AsyncIterator[None]:
    if conn.autocommit:
        yield
    else:
        async with conn.transaction():
            yield


async def _async_release(conn: psycopg.AsyncConnection[Any], key: int) -> None:
    """Let go of a lock this session may or may not hold (the key was not held before)."""
    try:
        if not conn.closed:
            async with _async_transaction(conn):
                await conn.execute(_UNLOCK, (key,))
    except psycopg.Error:
        await conn.close()  # a closed session holds no lock
