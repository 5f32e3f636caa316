# unasync-target: _sync.py
# unasync-rename: AsyncPostgresStore -> PostgresStore
# unasync-rename: AsyncConnectionPool -> ConnectionPool
# unasync-rename: AsyncConnection -> Connection
# unasync-rename: TaskPin -> ThreadPin
# unasync-rename: self._pinned -> self._local
# unasync-rename: async_shielded -> shielded
"""``AsyncPostgresStore``: the PostgreSQL store's connections, round trips and locks.

``_async.py`` is written by hand; ``_sync.py`` is generated from it by
``tools/unasync.py``. The package docstring describes the design.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from decimal import Decimal
from types import TracebackType
from typing import Any

import psycopg
from psycopg import AsyncConnection, errors
from psycopg_pool import AsyncConnectionPool

from creditmeter._compat import AsyncLock, async_shielded
from creditmeter.exceptions import DuplicateRequest, InvalidInput, StoreError, VersionConflict
from creditmeter.models import Account, LedgerEntry
from creditmeter.queries import EntryQuery, Scan, UsageQuery, UsageRow
from creditmeter.serde import account_from_json, entry_from_json
from creditmeter.stores.base import Write, WriteOutcome
from creditmeter.stores.postgres import _shared
from creditmeter.stores.postgres._shared import (
    RETURNS_AT_ONCE,
    STALE_TRIES,
    StoreBase,
    TaskPin,
    parse_position,
    scan_page,
    usage_rows,
)
from creditmeter.stores.postgres.failures import duplicate, failed, lost_race
from creditmeter.stores.postgres.options import DEFAULT_LOCK_TIMEOUT, DEFAULT_PREFIX, Options
from creditmeter.stores.postgres.sql import (
    BOUND_LOCKS,
    LOCK,
    MAX_BIGINT,
    UNLOCK,
    Statements,
    commit_params,
    delta_params,
    request_ids,
    scan_params,
    sum_params,
)

__all__ = ["AsyncPostgresStore"]


class AsyncPostgresStore(StoreBase):
    """Accounts and ledger in PostgreSQL, safe across threads, tasks, processes and hosts.

    Give a DSN (``"postgresql://user@host/db"``) and the store makes its own
    psycopg_pool ``AsyncConnectionPool`` (``min_size``..``max_size``
    connections in autocommit mode, ``application_name`` "creditmeter"
    unless the DSN or the argument names one; ``timeout`` seconds to wait for
    a free connection), which ``aclose()`` closes. Or give an open
    ``AsyncConnectionPool`` of your own: the store uses it and never closes
    it (its connections should be in autocommit mode, else each call pays a
    ``BEGIN`` and a ``COMMIT``).

    The store opens its pool, and creates the tables if asked, before its
    first call: the sync store when it is built; the async one, whose pool
    opens in a running event loop, on its first call or on entering it as a
    context manager, or at once in its ``open()``, where a bad DSN or a
    missing server then fails.

    ``lock_timeout`` (seconds, default 30; ``None`` leaves the server's
    setting) bounds every wait for a user's lock: a commit behind another
    session's row lock or ``exclusive()``, and ``exclusive()`` itself. Past
    it the call raises ``StoreError`` naming the user. It is set on each
    connection the store opens, unless the DSN's ``options`` set
    ``lock_timeout`` themselves (then theirs stands); a pool of your own
    keeps its connections' settings.

    Tables are named ``{prefix}accounts``, ``{prefix}ledger`` and
    ``{prefix}meta``, in ``schema`` if given. ``create_schema=True`` (the
    default) creates them if missing.

    A store made before ``os.fork()`` may be used in both processes: the
    child lets go of the inherited connections (without closing the
    parent's sessions) and opens a pool of its own. A pool you gave cannot
    follow: in the child every call raises ``StoreError``.

    A call cut short (a cancelled task, an interrupt) gives its connection
    back and leaves no lock held and no transaction open. A commit cut short
    may or may not have applied (as with one cut in flight: a request id
    settles it), never in part.
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
        options = Options(
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
        self._sql = Statements(options.prefix, options.schema)
        self._pinned = TaskPin()
        self._closed = False
        self._ready = False
        self._created = not options.create_schema
        self._opening = AsyncLock()
        self._owns_pool = options.pool is None
        self._start()
        pool: AsyncConnectionPool[Any] | None = options.pool
        self._pool: AsyncConnectionPool[Any] = self._new_pool() if pool is None else pool
        # A sync store opens now; an async one needs a running event loop, so opens later.
        # sync-only: self._open_now()

    # async-only: begin
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
        await store._open_now()
        return store

    # async-only: end

    def _new_pool(self) -> AsyncConnectionPool[Any]:
        """The store's own pool, not open yet (``_ensure_open`` opens it)."""
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

    async def _configure(self, conn: AsyncConnection[Any]) -> None:
        """Set up a new connection of the store's own: remembered, lock waits bounded."""
        self._conns.add(conn)
        bound = self._bound_params()
        if bound is not None:
            await conn.execute(BOUND_LOCKS, bound)

    async def _open_now(self) -> None:
        """Open the pool and create the tables (if asked) now; if that fails, close and raise."""
        try:
            await self._ensure_open()
        except BaseException:
            await self.aclose()
            raise

    async def _ensure_open(self) -> None:
        """Create the tables (if asked) and open the store's own pool, once.

        In a forked child, first let go of the parent's pool and make one of
        this process's.
        """
        if self._pid != os.getpid():
            self._follow_fork()
        if self._ready:
            return
        if self._closed:
            raise StoreError("the store is closed")
        async with self._opening:
            if self._ready:
                return
            if not self._created:
                await self.create_schema()
                self._created = True
            if self._owns_pool:
                try:
                    # Filled before first use: a request that found it empty would grow it,
                    # and psycopg_pool hands its connections out in turn (measured: a charge
                    # that alternated between two connections took ~80 µs more than on one).
                    await self._pool.open(wait=True, timeout=self._options.timeout)
                except psycopg.Error as exc:  # the pool closed itself
                    raise failed("connect", exc) from exc
            self._ready = True

    def _forget_connections(self) -> None:
        # The parent's pool, its lock and (async) its event loop's tasks are dead here.
        self._ready = False
        self._opening = AsyncLock()
        # sync-only: self._local = ThreadPin()  # a pinned connection was the parent's

    # --- connections ----------------------------------------------------------

    async def _getconn(self) -> AsyncConnection[Any]:
        if not self._ready or self._pid != os.getpid():
            await self._ensure_open()
        if self._closed:
            raise StoreError("the store is closed")
        return await self._take()

    async def _take(self) -> AsyncConnection[Any]:
        """A connection from the pool, passing over those the server has cut."""
        pool = self._pool
        for _ in range(STALE_TRIES):
            conn: AsyncConnection[Any] = await pool.getconn()
            # Looked up on its module, where a test may replace it.
            if not _shared.stale(conn):
                return conn
            await conn.close()
            await self._give_back(conn)
        last: AsyncConnection[Any] = await pool.getconn()  # pragma: no cover - all stale
        return last  # pragma: no cover

    async def _give_back(self, conn: AsyncConnection[Any]) -> None:
        """Return a connection to the pool, whatever cut the caller short."""
        # sync-only: self._pool.putconn(conn)
        # async-only: begin
        # An idle (or closed) connection goes back without the pool waiting on anything;
        # one left in a transaction is rolled back by the pool first, and a cancel must
        # not cut that short (the connection would be lost to the pool).
        if conn.pgconn.transaction_status in RETURNS_AT_ONCE:
            await self._pool.putconn(conn)
        else:
            await async_shielded(self._pool.putconn, conn)
        # async-only: end

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[AsyncConnection[Any]]:
        """The pinned connection (inside ``exclusive``), else one from the pool."""
        conn = self._pinned.get()
        if conn is not None:
            async with _transaction(conn):
                yield conn
            return
        conn = await self._getconn()
        try:
            async with _transaction(conn):
                yield conn
        finally:
            await self._give_back(conn)

    async def create_schema(self) -> None:
        """Create the schema, tables and indexes if missing (``postgres.sql``); idempotent."""
        try:
            if self._options.dsn is not None:
                # A connection of its own: no pool to open first, and the real error if any.
                async with await AsyncConnection.connect(
                    self._options.dsn, **self._options.kwargs
                ) as conn:
                    await self._configure(conn)
                    await self._create_on(conn)
                return
            if self._pid != os.getpid():
                self._follow_fork()  # a pool of yours cannot follow: StoreError
            conn = await self._take()
            try:
                await self._create_on(conn)
            finally:
                await self._give_back(conn)
        except psycopg.Error as exc:
            raise failed("create_schema", exc) from exc

    async def _create_on(self, conn: AsyncConnection[Any]) -> None:
        async with conn.transaction():
            await conn.execute(b"SET LOCAL client_min_messages = warning")
            await conn.execute(b"SELECT pg_advisory_xact_lock(%s)", (self._sql.schema_lock,))
            # Under the lock: a store that finds the current version takes no table lock
            # (ALTER TABLE would take the ledger's, even with nothing to add).
            if not self._needs_ddl(await self._stored_version(conn)):
                return
            for statement in self._sql.ddl:
                await conn.execute(statement)
            cursor = await conn.execute(self._sql.schema_version)
            self._check_version(await cursor.fetchone())

    async def _stored_version(self, conn: AsyncConnection[Any]) -> str | None:
        """The schema version the meta table records; ``None`` if there is none (yet)."""
        try:
            async with conn.transaction():  # a savepoint: the table may not exist
                cursor = await conn.execute(self._sql.schema_version)
                row = await cursor.fetchone()
        except (errors.UndefinedTable, errors.InvalidSchemaName):
            return None
        return None if row is None else str(row[0])

    @asynccontextmanager
    async def exclusive(self, user_id: str) -> AsyncIterator[None]:
        """Keep every other writer of ``user_id`` (in any process, on any host) out.

        Waits (at most ``lock_timeout``) for a PostgreSQL advisory lock on a
        connection that the calling thread (or task) then uses for every call
        on this store until the block ends; each call inside still runs in
        its own transaction. Commits by other sessions wait for the lock (see
        the package docstring). The lock is held until the block ends or,
        sooner, until a commit of this user in the block applies (which hands
        it on in the same statement). Blocks nest; a nested block on the same
        user keeps the lock to the end. However the block ends (an error, a
        cancel), the lock is let go of and the connection given back.
        """
        key = self._sql.lock_key(user_id)
        pid = os.getpid()
        pinned = self._pinned.get()
        held = self._pinned.held() if pinned is not None else {}
        if held.get(key):
            conn = pinned  # held by this caller already: counted here, no round trip
        else:
            conn, data = await self._lock(key, pinned, user_id)
            if pinned is None:
                self._pinned.pin(conn, held)
            self._pinned.read()[key] = data  # the block's first load() needs no round trip
        assert conn is not None
        read = self._pinned.read()
        held[key] = held.get(key, 0) + 1
        try:
            yield
        finally:
            if os.getpid() == pid:  # else a forked child: the lock and connection are the parent's
                depth = held.pop(key, 0)  # 0: a commit in the block let go of it already
                if depth <= 1:
                    read.pop(key, None)
                if depth > 1:
                    held[key] = depth - 1
                if pinned is None:
                    self._pinned.unpin()
                if depth == 1 or pinned is None:
                    # Shielded: a caller cut short must still let go of the lock and the
                    # connection.
                    await async_shielded(
                        self._unlock, conn, key if depth == 1 else None, give_back=pinned is None
                    )

    async def _lock(
        self, key: int, pinned: AsyncConnection[Any] | None, user_id: str
    ) -> tuple[AsyncConnection[Any], str | None]:
        """Take the advisory lock on the pinned connection, else on one from the pool.

        The user's account is read in the same round trip, by a second
        statement pipelined behind the lock's (its snapshot is taken once the
        lock is granted, so it sees every commit made before): the account
        JSON, or ``None``. A pooled connection the server had just dropped is
        replaced (a dead session holds no lock).
        """
        retries = STALE_TRIES if pinned is None else 0
        while True:
            try:
                conn = pinned if pinned is not None else await self._getconn()
            except psycopg.Error as exc:
                raise failed("exclusive", exc, user_id) from exc
            lost = False
            try:
                async with _transaction(conn):
                    data = await self._lock_and_read(conn, key, user_id, pinned=pinned is not None)
            except errors.LockNotAvailable as exc:  # lock_timeout: not granted
                if pinned is None:
                    await self._give_back(conn)
                raise failed("exclusive", exc, user_id) from exc
            except BaseException as exc:
                lost = conn.broken
                # Shielded: nothing may cut it short (a second cancel, say).
                await async_shielded(
                    self._lock_failed, conn, key, pinned=pinned is not None, exc=exc
                )
                if not isinstance(exc, psycopg.Error):
                    raise
                if not (retries and lost):
                    raise failed("exclusive", exc, user_id) from exc
                retries -= 1
            else:
                return conn, data

    async def _lock_and_read(
        self, conn: AsyncConnection[Any], key: int, user_id: str, *, pinned: bool
    ) -> str | None:
        """``LOCK`` then the account's load, as one pipeline: one round trip.

        On a pinned connection the load is not prepared here: a lock that
        times out makes the server skip it, and the connection cannot be
        closed (it holds the block's other locks) to forget a name psycopg
        gave it (see ``_after_failed_pipeline``).
        """
        async with conn.pipeline() as pipeline:
            await conn.execute(LOCK, (key,))
            cursor = await conn.execute(
                self._sql.load, (user_id,), prepare=False if pinned else None
            )
            await pipeline.sync()
            row = await cursor.fetchone()
        return None if row is None else str(row[0])

    async def _lock_failed(
        self, conn: AsyncConnection[Any], key: int, *, pinned: bool, exc: BaseException
    ) -> None:
        """After a failed or interrupted lock statement: make sure the lock is not kept.

        It may have been granted (a cancel or an interrupt that came after the
        server granted it): closing the session surely frees it; on a pinned
        connection, unlocking does (the key was not held before).
        """
        if not pinned:
            await conn.close()
            await self._pool.putconn(conn)
        elif not isinstance(exc, Exception):
            await _release(conn, key)

    async def _unlock(
        self, conn: AsyncConnection[Any], key: int | None, *, give_back: bool
    ) -> None:
        """The end of an ``exclusive`` block: let go of ``key`` (if given) and the connection."""
        try:
            if key is not None:
                async with _transaction(conn):
                    await conn.execute(UNLOCK, (key,))
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
        if self._pinned.get() is not None:
            read = self._pinned.read()
            key = self._sql.lock_key(user_id)
            if key in read:  # read as exclusive() took the lock: no writer can have moved it
                data = read.pop(key)
                return None if data is None else account_from_json(data, user_id=user_id)
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
        # Inside exclusive(user) (not nested in another for the same user), a commit that
        # applies hands the lock on in the same statement: no round trip to unlock.
        held = None if pinned is None else self._pinned.held()
        release = held is not None and held.get(key) == 1
        query = self._sql.commit(
            new=expected_version is None, entries=len(entries), release=release
        )
        params = commit_params(account, entries, expected_version, key, release=release)
        try:
            row = await self._execute_commit(pinned, query, params)
        except errors.UniqueViolation as exc:
            if exc.diag.constraint_name != self._sql.request_index:
                raise failed("commit", exc, user_id) from exc
            raise await self._duplicate(user_id, entries, exc) from None
        except (errors.SerializationFailure, errors.DeadlockDetected) as exc:
            raise VersionConflict(user_id, expected=expected_version) from exc
        except psycopg.Error as exc:
            raise failed("commit", exc, user_id) from exc
        except BaseException:
            if release and held is not None and pinned is not None:
                # Cut short: whether the lock went with the commit is unknown; let go of it.
                del held[key]
                await async_shielded(_release, pinned, key)
            raise
        assert row is not None  # the statement always returns one row
        if row[0]:
            if held is not None and release:
                del held[key]
            return
        current = None if row[1] is None else account_from_json(row[1], user_id=user_id)
        if lost_race(current, expected_version):
            current = await self.load(user_id)
        raise VersionConflict(user_id, expected=expected_version, current=current)

    async def commit_delta(
        self, account: Account, entry: LedgerEntry, *, floor: Decimal | None
    ) -> tuple[Decimal, int, datetime]:
        """Add the entry's amount to the stored balance in one statement, if guarded.

        See ``DeltaStore``. The statement waits, as ``commit`` does, while
        another session holds ``exclusive()`` on the user, and takes the
        row's lock for as long as its own transaction: writers of one user
        queue on the row instead of losing to each other.
        """
        user_id = account.user_id
        query = self._sql.delta(floor=floor is not None)
        params = delta_params(account, entry, floor, self._sql.lock_key(user_id))
        try:
            row = await self._execute_commit(self._pinned.get(), query, params)
        except errors.UniqueViolation as exc:
            if exc.diag.constraint_name != self._sql.request_index:
                raise failed("commit", exc, user_id) from exc
            raise await self._duplicate(user_id, (entry,), exc) from None
        except (errors.SerializationFailure, errors.DeadlockDetected) as exc:
            raise VersionConflict(user_id, expected=account.version - 1) from exc
        except psycopg.Error as exc:
            raise failed("commit", exc, user_id) from exc
        if row is None:  # no account
            raise VersionConflict(user_id, expected=account.version - 1)
        balance, version, updated_at, stored = row
        if version is not None:
            return balance, version, updated_at.astimezone(timezone.utc)
        current = account_from_json(stored, user_id=user_id)
        raise VersionConflict(user_id, expected=account.version - 1, current=current)

    async def _execute_commit(
        self, pinned: AsyncConnection[Any] | None, query: bytes, params: list[Any] | dict[str, Any]
    ) -> tuple[Any, ...] | None:
        """The body of ``_connection()``, inline: this is every write's path."""
        if pinned is not None:
            self._pinned.read().clear()  # what exclusive() read is stale once a commit applies
        conn = await self._getconn() if pinned is None else pinned
        try:
            if conn.autocommit:
                cursor = await conn.execute(query, params)
                return await cursor.fetchone()
            async with conn.transaction():
                cursor = await conn.execute(query, params)
                return await cursor.fetchone()
        finally:
            if pinned is None:
                await self._give_back(conn)

    async def commit_many(self, writes: Sequence[Write]) -> list[WriteOutcome]:
        """Commit each write as ``commit()`` would, in one transaction sent as one pipeline.

        Each write is its commit statement; one whose compare-and-set loses
        writes nothing and gets its ``VersionConflict``, while the others
        apply. Writes run in order of user id, so that two batches take the
        users' rows in the same order. If a statement fails (a request id
        applied before, a serialization failure or a deadlock), nothing of
        it applies (its connection is closed: see ``_after_failed_pipeline``)
        and each write is committed on its own, as ``commit()`` does, which
        reports what it met. Any other failure
        raises ``StoreError``.
        """
        if not writes:
            return []
        order = sorted(range(len(writes)), key=lambda n: writes[n].account.user_id)
        statements = []
        for n in order:
            account, entries, expected_version = writes[n]
            key = self._sql.lock_key(account.user_id)
            query = self._sql.commit(new=expected_version is None, entries=len(entries))
            statements.append((query, commit_params(account, entries, expected_version, key)))
        try:
            rows = await self._pipelined(statements)
        except (errors.UniqueViolation, errors.SerializationFailure, errors.DeadlockDetected):
            return [await self._commit_alone(write) for write in writes]
        except psycopg.Error as exc:
            raise failed("commit", exc) from exc
        outcomes: list[WriteOutcome] = [None] * len(writes)
        for n, row in zip(order, rows, strict=True):
            assert row is not None  # the statement always returns one row
            if row[0]:
                continue
            account, _, expected_version = writes[n]
            user_id = account.user_id
            current = None if row[1] is None else account_from_json(row[1], user_id=user_id)
            if lost_race(current, expected_version):
                current = await self.load(user_id)
            outcomes[n] = VersionConflict(user_id, expected=expected_version, current=current)
        return outcomes

    async def _pipelined(
        self, statements: list[tuple[bytes, list[Any]]]
    ) -> list[tuple[Any, ...] | None]:
        """Run the statements in one transaction, pipelined: BEGIN, each one, COMMIT."""
        pinned = self._pinned.get()
        conn = await self._getconn() if pinned is None else pinned
        try:
            cursors = []
            failure: psycopg.Error | None = None
            try:
                # BEGIN and COMMIT by hand: psycopg's transaction() would nest a pipeline.
                async with conn.pipeline():
                    try:
                        await conn.execute(b"BEGIN")
                        for query, params in statements:
                            cursor = conn.cursor()
                            await cursor.execute(query, params)
                            cursors.append(cursor)
                        await conn.execute(b"COMMIT")  # skipped by the server after a failure
                    except psycopg.Error as exc:  # kept for after the pipeline's own end
                        failure = exc
            except psycopg.Error as exc:
                failure = failure or exc
            if failure is not None:
                await self._after_failed_pipeline(conn, pinned=pinned is not None)
                raise failure
            return [await cursor.fetchone() for cursor in cursors]
        finally:
            if pinned is None:
                await self._give_back(conn)

    @staticmethod
    async def _after_failed_pipeline(conn: AsyncConnection[Any], *, pinned: bool) -> None:
        """Close a connection whose pipeline failed (the pool replaces it), or reset a pinned one.

        When a statement fails, the server skips the rest of the pipeline, but
        psycopg has already named any statement in it that reached its prepare
        threshold, and raises before it reads that the statement was skipped:
        it would send the name, never prepared, on every later use ("prepared
        statement does not exist"). A closed connection takes the names with
        it. A pinned one holds the block's locks and cannot be closed:
        ``rollback()``, unlike a ``ROLLBACK`` statement, forgets psycopg's
        names and deallocates the server's.
        """
        if conn.broken:
            return
        if not pinned:
            await conn.close()
        elif conn.pgconn.transaction_status not in RETURNS_AT_ONCE:
            await conn.rollback()

    async def _commit_alone(self, write: Write) -> WriteOutcome:
        """One write of a batch committed on its own: ``None``, or the conflict it met."""
        try:
            await self.commit(write.account, write.entries, expected_version=write.expected_version)
        except (VersionConflict, DuplicateRequest) as met:
            return met
        return None

    async def _duplicate(
        self, user_id: str, entries: Sequence[LedgerEntry], exc: Exception
    ) -> DuplicateRequest:
        try:
            async with self._connection() as conn:
                cursor = await conn.execute(
                    self._sql.find_requests, (user_id, request_ids(entries))
                )
                rows = await cursor.fetchall()
        except psycopg.Error as read_exc:
            raise failed("commit", read_exc, user_id) from exc
        return duplicate(user_id, entries, dict(rows), exc)

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
            tail = (user_id, min(limit, MAX_BIGINT))
            rows = await self._fetch("read", user_id, self._sql.ledger_tail, tail)
        return [entry_from_json(row[0], user_id=user_id) for row in rows]

    async def users(self) -> list[str]:
        """Return every user id, sorted (by code point, as Python sorts)."""
        return [row[0] for row in await self._fetch("read", None, self._sql.users, ())]

    # --- reports ----------------------------------------------------------------

    async def scan_entries(self, query: EntryQuery, *, after: str | None, limit: int) -> Scan:
        """Up to ``limit`` entries the query covers, in commit order, after position ``after``.

        Positions are ``"<tx>.<seq>"``: the transaction id and ``seq`` of the
        last row read. A scan of every user reads rows in ``(tx, seq)`` order,
        and only those below the oldest transaction still running (the
        horizon), so a row committed later always sorts after every position
        returned before (``seq`` alone is not commit order: a transaction can
        take a ``seq`` and commit after others took later ones). A scan of one
        user reads in ``seq`` order, which is commit order within a user. A
        page cut short by the horizon still gives a position; a long-running
        transaction anywhere on the server holds the horizon back, and with it
        the scan, until it ends. ``InvalidInput`` for a malformed position.
        """
        if type(limit) is not int or limit < 1:
            raise InvalidInput(f"limit must be a positive int, got {limit!r}")
        start = parse_position(after)
        statement = self._sql.scan(
            user=query.user_id is not None,
            since=query.since is not None,
            until=query.until is not None,
            kinds=query.kinds is not None,
        )
        params = scan_params(query, start, min(limit, MAX_BIGINT - 1))
        rows = await self._fetch("scan", query.user_id, statement, params)
        return scan_page(query, start, limit, rows)

    async def sum_usage(self, query: UsageQuery) -> list[UsageRow]:
        """The query's charges summed per group, by the server, as ``rules.Tally`` sums them.

        Exact: counts and token sums are ``numeric`` sums of integers, amounts
        ``numeric`` sums of ``numeric``s. Periods start at ``date_trunc`` of
        the time in UTC (weeks on Monday), as ``rules.period_start``.
        """
        rows = await self._fetch("usage", query.user_id, self._sql.sums(query), sum_params(query))
        return usage_rows(rows)

    async def users_page(self, *, after: str | None, limit: int) -> list[str]:
        """Up to ``limit`` user ids greater than ``after``, by code point (the key's index)."""
        if type(limit) is not int or limit < 1:
            raise InvalidInput(f"limit must be a positive int, got {limit!r}")
        size = min(limit, MAX_BIGINT)
        if after is None:
            rows = await self._fetch("read", None, self._sql.users_first, (size,))
        else:
            rows = await self._fetch("read", None, self._sql.users_after, (after, size))
        return [row[0] for row in rows]

    async def _fetch(
        self, action: str, user_id: str | None, query: bytes, params: Sequence[Any]
    ) -> list[tuple[Any, ...]]:
        """Run a read; again on another connection if the server had dropped the one used.

        The server can cut pooled connections (several at once) between the
        idle check and the query, before its goodbye arrives; a read is safe
        to repeat. Writes are not repeated: a commit cut in flight may or may
        not have applied, which only the caller's request id settles.
        """
        # Each dropped connection is discarded, so this ends; never inside exclusive().
        retries = STALE_TRIES if self._pinned.get() is None else 0
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
                    raise failed(action, exc, user_id) from exc
                retries -= 1

    async def aclose(self) -> None:
        """Close the pool if the store made it; further use raises ``StoreError``."""
        if self._closed:
            return
        if self._pid != os.getpid():
            self._leave_parent()  # closing the parent's pool would end its sessions
            self._closed = True
            return
        self._closed = True
        if self._owns_pool:
            await self._pool.close()

    async def __aenter__(self) -> AsyncPostgresStore:
        await self._ensure_open()  # async-only
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


@asynccontextmanager
async def _transaction(conn: AsyncConnection[Any]) -> AsyncIterator[None]:
    """A transaction around the block, unless the connection commits each statement itself."""
    if conn.autocommit:
        yield
    else:
        async with conn.transaction():
            yield


async def _release(conn: AsyncConnection[Any], key: int) -> None:
    """Let go of a lock this session may or may not hold (the key was not held before)."""
    try:
        if not conn.closed:
            async with _transaction(conn):
                await conn.execute(UNLOCK, (key,))
    except psycopg.Error:
        await conn.close()  # a closed session holds no lock
