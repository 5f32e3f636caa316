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
session``, not ``transaction``.

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
import re
import select
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from importlib import resources
from types import TracebackType
from typing import Any

import psycopg
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from creditmeter.exceptions import ConfigError, DuplicateRequest, StoreError, VersionConflict
from creditmeter.models import Account, LedgerEntry
from creditmeter.serde import account_from_json, account_to_json, entry_from_json, entry_to_json

__all__ = ["DEFAULT_PREFIX", "SCHEMA_VERSION", "AsyncPostgresStore", "PostgresStore", "schema_sql"]

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


def _failed(action: str, exc: BaseException) -> StoreError:
    detail = str(exc).strip() or type(exc).__name__
    return StoreError(f"PostgreSQL {action} failed: {detail}")


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
            return DuplicateRequest(user_id, request_id, entry=entry_from_json(found[request_id]))
    earlier: dict[str, LedgerEntry] = {}
    for entry in entries:  # not stored: the commit repeats a request id of its own
        request_id = entry.request_id
        if request_id is not None:
            if request_id in earlier:
                return DuplicateRequest(user_id, request_id, entry=earlier[request_id])
            earlier[request_id] = entry
    raise _failed("commit", exc) from exc


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
    ) -> None:
        self.prefix, self.schema = _check_names(prefix, schema)
        if type(create_schema) is not bool:
            raise ConfigError(f"create_schema must be True or False, got {create_schema!r}")
        self.create_schema = create_schema
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
    """What the sync and async stores share: their names, their repr, the schema check."""

    _options: _Options
    _sql: _Statements

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

    Tables are named ``{prefix}accounts``, ``{prefix}ledger`` and
    ``{prefix}meta``, in ``schema`` if given. ``create_schema=True`` (the
    default) creates them when the store is built, if missing.
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
        )
        self._options = options
        self._sql = _Statements(options.prefix, options.schema)
        self._local = threading.local()
        self._closed = False
        self._owns_pool = options.pool is None
        if options.pool is not None:
            self._pool: ConnectionPool[Any] = options.pool
            if options.create_schema:
                self.create_schema()
            return
        if options.create_schema:
            self.create_schema()  # on a connection of its own: a failure leaves nothing open
        self._pool = ConnectionPool(
            options.dsn or "",
            kwargs=options.kwargs,
            min_size=options.min_size,
            max_size=options.max_size,
            timeout=options.timeout,
            name=f"creditmeter-{options.prefix}",
            open=True,
        )
        try:
            # Filled before first use: a request that found it empty would grow it, and
            # psycopg_pool hands its connections out in turn (measured: a charge that
            # alternated between two connections took ~80 µs more than on one).
            self._pool.wait(timeout=options.timeout)
        except psycopg.Error as exc:  # the pool closed itself
            self._closed = True
            raise _failed("connect", exc) from exc

    # --- connections ----------------------------------------------------------

    def _getconn(self) -> psycopg.Connection[Any]:
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

        Waits for a PostgreSQL advisory lock on a connection that the calling
        thread then uses for every call on this store until the block ends;
        each call inside still runs in its own transaction. Commits by other
        sessions wait for the lock (see the module docstring). The lock is
        held until the block ends or, sooner, until a commit of this user in
        the block applies (which hands it on in the same statement). Blocks
        nest; a nested block on the same user keeps the lock to the end.
        """
        key = self._sql.lock_key(user_id)
        pinned: psycopg.Connection[Any] | None = getattr(self._local, "conn", None)
        conn = self._lock(key, pinned)
        if pinned is None:
            self._local.conn = conn
            self._local.held = {}
        held: dict[int, int] = self._local.held
        held[key] = held.get(key, 0) + 1
        try:
            yield
        finally:
            depth = held.pop(key, 0)  # 0: a commit in the block let go of it already
            if depth > 1:
                held[key] = depth - 1
            if pinned is None:
                self._local.conn = None
            try:
                if depth:
                    with _transaction(conn):
                        conn.execute(_UNLOCK, (key,))
            except BaseException as exc:
                # Closing frees the lock (nested: the outer ones too, the connection is lost
                # anyway); an error here leaves the block's own outcome standing.
                conn.close()
                if not isinstance(exc, Exception):
                    raise
            finally:
                if pinned is None:
                    self._pool.putconn(conn)

    def _lock(self, key: int, pinned: psycopg.Connection[Any] | None) -> psycopg.Connection[Any]:
        """Take the advisory lock on the pinned connection, else on one from the pool.

        A pooled connection the server had just dropped is replaced (a dead
        session holds no lock).
        """
        retries = _STALE_TRIES if pinned is None else 0
        while True:
            try:
                conn = pinned if pinned is not None else self._getconn()
            except psycopg.Error as exc:
                raise _failed("lock", exc) from exc
            lost = False
            try:
                with _transaction(conn):
                    conn.execute(_LOCK, (key,))
            except BaseException as exc:
                lost = conn.broken
                if pinned is None:
                    # The lock may have been granted: only closing the session surely frees it.
                    conn.close()
                    self._pool.putconn(conn)
                if not isinstance(exc, psycopg.Error):
                    raise
                if not (retries and lost):
                    raise _failed("lock", exc) from exc
                retries -= 1
            else:
                return conn

    # --- the contract ---------------------------------------------------------

    def load(self, user_id: str) -> Account | None:
        """Return the stored account, or ``None``."""
        rows = self._fetch("load", self._sql.load, (user_id,))
        return account_from_json(rows[0][0]) if rows else None

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
                raise _failed("commit", exc) from exc
            raise self._duplicate(user_id, entries, exc) from None
        except (errors.SerializationFailure, errors.DeadlockDetected) as exc:
            raise VersionConflict(user_id, expected=expected_version) from exc
        except psycopg.Error as exc:
            raise _failed("commit", exc) from exc
        assert row is not None  # the statement always returns one row
        if row[0]:
            if held is not None and release:
                del held[key]
            return
        current = None if row[1] is None else account_from_json(row[1])
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
            raise _failed("commit", read_exc) from exc
        return _duplicate(user_id, entries, dict(rows), exc)

    def find_request(self, user_id: str, request_id: str) -> LedgerEntry | None:
        """Return the entry recorded under ``request_id``, if any."""
        rows = self._fetch("read", self._sql.find_request, (user_id, request_id))
        return entry_from_json(rows[0][0]) if rows else None

    def ledger(self, user_id: str, *, limit: int | None = None) -> list[LedgerEntry]:
        """Return the user's entries, oldest first (the newest ``limit`` if given)."""
        if limit == 0:
            return []
        if limit is None:
            rows = self._fetch("read", self._sql.ledger_all, (user_id,))
        else:
            rows = self._fetch("read", self._sql.ledger_tail, (user_id, min(limit, _MAX_BIGINT)))
        return [entry_from_json(row[0]) for row in rows]

    def users(self) -> list[str]:
        """Return every user id, sorted (by code point, as Python sorts)."""
        return [row[0] for row in self._fetch("read", self._sql.users, ())]

    def _fetch(self, action: str, query: bytes, params: Sequence[Any]) -> list[tuple[Any, ...]]:
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
                    raise _failed(action, exc) from exc
                retries -= 1

    def close(self) -> None:
        """Close the pool if the store made it; further use raises ``StoreError``."""
        if self._closed:
            return
        self._closed = True
        if self._owns_pool:
            self._pool.close()

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


# --- the async store -----------------------------------------------------------


class AsyncPostgresStore(_Common):
    """``PostgresStore`` for asyncio, over a ``psycopg_pool.AsyncConnectionPool``.

    The same arguments and tables as ``PostgresStore``. An async pool opens in
    a running event loop, so the store opens it (and creates the schema, with
    ``create_schema=True``) on first use; ``await AsyncPostgresStore.open(dsn)``
    does that at once, so a bad DSN or a missing server fails there. A pool
    you give must be open already (``await pool.open()``), and is never
    closed by the store.
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
        self._opening: asyncio.Lock | None = None
        self._owns_pool = options.pool is None
        pool: AsyncConnectionPool[Any] | None = options.pool
        if pool is None:
            pool = AsyncConnectionPool(
                options.dsn or "",
                kwargs=options.kwargs,
                min_size=options.min_size,
                max_size=options.max_size,
                timeout=options.timeout,
                name=f"creditmeter-{options.prefix}",
                open=False,
            )
        self._pool: AsyncConnectionPool[Any] = pool

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
        )
        try:
            await store._ensure_open()
        except BaseException:
            await store.aclose()
            raise
        return store

    async def _ensure_open(self) -> None:
        if self._ready:
            return
        if self._closed:
            raise StoreError("the store is closed")
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._ready:
                return
            if self._options.create_schema:
                await self.create_schema()
            if self._owns_pool:
                try:
                    # Filled before first use, as in PostgresStore.
                    await self._pool.open(wait=True, timeout=self._options.timeout)
                except psycopg.Error as exc:  # the pool closed itself
                    raise _failed("connect", exc) from exc
            self._ready = True

    # --- connections ----------------------------------------------------------

    async def _getconn(self) -> psycopg.AsyncConnection[Any]:
        if not self._ready:
            await self._ensure_open()
        if self._closed:
            raise StoreError("the store is closed")
        pool = self._pool
        for _ in range(_STALE_TRIES):
            conn: psycopg.AsyncConnection[Any] = await pool.getconn()
            if not _stale(conn):
                return conn
            await conn.close()
            await pool.putconn(conn)
        last: psycopg.AsyncConnection[Any] = await pool.getconn()  # pragma: no cover - all stale
        return last  # pragma: no cover

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
            await self._pool.putconn(conn)

    async def create_schema(self) -> None:
        """Create the schema, tables and indexes if missing (``postgres.sql``); idempotent."""
        try:
            if self._options.dsn is not None:
                # A connection of its own: no pool to open first, and the real error if any.
                conn = await psycopg.AsyncConnection.connect(
                    self._options.dsn, **self._options.kwargs
                )
                async with conn:
                    await self._create_on(conn)
                return
            conn = await self._pool.getconn()
            try:
                await self._create_on(conn)
            finally:
                await self._pool.putconn(conn)
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
        calling task, and given back even if the task is cancelled.
        """
        key = self._sql.lock_key(user_id)
        pinned = self._pinned.get()
        conn = await self._lock(key, pinned)
        if pinned is None:
            self._pinned.set(conn)
            self._held.set({})
        held = self._held.get()
        held[key] = held.get(key, 0) + 1
        try:
            yield
        finally:
            depth = held.pop(key, 0)  # 0: a commit in the block let go of it already
            if depth > 1:
                held[key] = depth - 1
            if pinned is None:
                self._pinned.set(None)
            # Shielded: a cancelled caller must still let go of the lock and the connection.
            await asyncio.shield(
                self._unlock(conn, key if depth else None, give_back=pinned is None)
            )

    async def _lock(
        self, key: int, pinned: psycopg.AsyncConnection[Any] | None
    ) -> psycopg.AsyncConnection[Any]:
        """Take the advisory lock on the pinned connection, else on one from the pool."""
        retries = _STALE_TRIES if pinned is None else 0
        while True:
            try:
                conn = pinned if pinned is not None else await self._getconn()
            except psycopg.Error as exc:
                raise _failed("lock", exc) from exc
            lost = False
            try:
                async with _async_transaction(conn):
                    await conn.execute(_LOCK, (key,))
            except BaseException as exc:
                lost = conn.broken
                if pinned is None:
                    # The lock may have been granted: only closing the session surely frees it.
                    await asyncio.shield(self._discard(conn))
                if not isinstance(exc, psycopg.Error):
                    raise
                if not (retries and lost):
                    raise _failed("lock", exc) from exc
                retries -= 1
            else:
                return conn

    async def _discard(self, conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.close()
        await self._pool.putconn(conn)

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
        rows = await self._fetch("load", self._sql.load, (user_id,))
        return account_from_json(rows[0][0]) if rows else None

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
        held = self._held.get(None) if self._pinned.get() is not None else None
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
                raise _failed("commit", exc) from exc
            raise await self._duplicate(user_id, entries, exc) from None
        except (errors.SerializationFailure, errors.DeadlockDetected) as exc:
            raise VersionConflict(user_id, expected=expected_version) from exc
        except psycopg.Error as exc:
            raise _failed("commit", exc) from exc
        assert row is not None  # the statement always returns one row
        if row[0]:
            if held is not None and release:
                del held[key]
            return
        current = None if row[1] is None else account_from_json(row[1])
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
            raise _failed("commit", read_exc) from exc
        return _duplicate(user_id, entries, dict(rows), exc)

    async def find_request(self, user_id: str, request_id: str) -> LedgerEntry | None:
        """Return the entry recorded under ``request_id``, if any."""
        rows = await self._fetch("read", self._sql.find_request, (user_id, request_id))
        return entry_from_json(rows[0][0]) if rows else None

    async def ledger(self, user_id: str, *, limit: int | None = None) -> list[LedgerEntry]:
        """Return the user's entries, oldest first (the newest ``limit`` if given)."""
        if limit == 0:
            return []
        if limit is None:
            rows = await self._fetch("read", self._sql.ledger_all, (user_id,))
        else:
            tail = (user_id, min(limit, _MAX_BIGINT))
            rows = await self._fetch("read", self._sql.ledger_tail, tail)
        return [entry_from_json(row[0]) for row in rows]

    async def users(self) -> list[str]:
        """Return every user id, sorted (by code point, as Python sorts)."""
        return [row[0] for row in await self._fetch("read", self._sql.users, ())]

    async def _fetch(
        self, action: str, query: bytes, params: Sequence[Any]
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
                    raise _failed(action, exc) from exc
                retries -= 1

    async def aclose(self) -> None:
        """Close the pool if the store made it; further use raises ``StoreError``."""
        if self._closed:
            return
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
