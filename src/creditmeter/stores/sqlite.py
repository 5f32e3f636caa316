"""The embedded default: one SQLite file shared by the threads and processes of one host.

Accounts and ledger entries are JSON documents (see ``serde.py``) in two
tables. A commit is one ``BEGIN IMMEDIATE`` transaction: a compare-and-set
``UPDATE … WHERE version = ?`` (or an insert for a new account) and the
ledger inserts, with a unique index on (user_id, request_id).

Reports (``ReportStore``) run in SQL: schema 2 also keeps each entry's
time, kind, model, tokens and amounts in typed columns, filled by the same
insert, with an index on the time. ``sum_usage`` sums them exactly (amounts
as whole units plus nanos); ``scan_entries`` pages in seq order, which is
commit order; ``users_page`` walks the accounts' primary key. A schema 1
file is upgraded in place by the first process that opens it writable.

Writers queue on an ``flock`` of a lock file beside the database before they
begin: SQLite's own busy handler retries on a timer and was measured starving
writers under contention (p99 near 2 s with four processes), while a
blocking lock is handed over in order. A writer first tries the lock without
blocking; only if it is taken does the blocking ``flock`` run, on a waiter
thread with a descriptor of its own, while the writer waits for it at most
``lock_wait`` seconds. A wait given up stays in the queue: the store's next
contended writer takes it over (with its place), and if none comes, the
waiter thread lets go of the lock the moment it gets it.

Each thread that uses a store has its own connection and lock-file
descriptor (a handle); when the thread ends, the handle goes back to the
store, which keeps ``_MAX_IDLE`` of them for the next threads and closes the
rest, so a thread per request does not run the process out of descriptors.

No connection may be open across ``fork()``: SQLite keeps its lock state per
process, so a child that inherits an open connection believes it holds locks
it does not (measured: the child's writes failed with "database is locked",
or a parent closing its last connection deleted the WAL the child was still
writing to, losing the child's commits). Before a fork, each store waits (up
to ``_FORK_WAIT`` seconds) for the calls in flight in other threads and
closes every connection it has; the parent reopens them on its next calls,
and the child starts with none and closes its copies of the lock-file
descriptors, so no connection or ``flock`` is ever shared by two processes.

A file that this process may read but not write (permissions, a read-only
mount) is opened read-only: reads work, writes are a ``StoreError`` naming
the file.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import math
import os
import re
import sqlite3
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar
from urllib.parse import quote

from creditmeter._exact import EXACT
from creditmeter.exceptions import (
    ConfigError,
    DuplicateRequest,
    InvalidInput,
    StoreError,
    VersionConflict,
)
from creditmeter.models import Account, EntryKind, LedgerEntry
from creditmeter.queries import EntryQuery, Scan, UsageQuery, UsageRow
from creditmeter.rules import Tally, in_range, usage_sum
from creditmeter.serde import account_from_json, account_to_json, entry_from_json, entry_to_json
from creditmeter.stores.base import Write, WriteOutcome

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: SQLite's busy handler alone
    fcntl = None  # type: ignore[assignment]

__all__ = ["AsyncSQLiteStore", "Durability", "SQLiteStore"]

Durability = Literal["full", "normal"]
_T = TypeVar("_T")

# Schema 2 keeps an entry's fields apart from its JSON too (filled on insert), so that
# reports filter and sum in SQL: the time in microseconds since the epoch (UTC, floored),
# the kind, model and token counts, and each amount as whole units plus nanos with its
# number of decimal places (``_money``). ``cost_places`` is NULL when the entry has no
# cost. A row whose amounts have no exact form there (more than 9 places, or too large)
# has NULL units and nanos, and so does a row written by an older version (NULL at_us):
# reports sum those rows from their JSON instead, found through a partial index.
_TYPED_COLUMNS = (
    ("at_us", "INTEGER"),
    ("kind", "TEXT"),
    ("model", "TEXT"),
    ("input_tokens", "INTEGER"),
    ("output_tokens", "INTEGER"),
    ("cache_write_tokens", "INTEGER"),
    ("cache_read_tokens", "INTEGER"),
    ("amount_units", "INTEGER"),
    ("amount_nanos", "INTEGER"),
    ("amount_places", "INTEGER"),
    ("cost_units", "INTEGER"),
    ("cost_nanos", "INTEGER"),
    ("cost_places", "INTEGER"),
)
_SCHEMA_VERSION = "2"
_KNOWN_SCHEMAS = ("1", "2")  # "1": no typed columns; upgraded when opened writable

# Every SQL text here is built from this module's constants; values go in as parameters.
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS creditmeter_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS creditmeter_accounts (
    user_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL,
    data TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS creditmeter_ledger (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id TEXT NOT NULL,
    request_id TEXT,
    data TEXT NOT NULL,
    {", ".join(f"{name} {kind}" for name, kind in _TYPED_COLUMNS)}
);
CREATE UNIQUE INDEX IF NOT EXISTS creditmeter_ledger_request
    ON creditmeter_ledger (user_id, request_id) WHERE request_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS creditmeter_ledger_user ON creditmeter_ledger (user_id, seq);
INSERT OR IGNORE INTO creditmeter_meta (key, value) VALUES ('schema', '{_SCHEMA_VERSION}');
"""  # noqa: S608

# Made after the typed columns are filled (an index built at once is faster than one
# kept up row by row through an upgrade's backfill).
_TYPED_INDEXES = (
    "CREATE INDEX IF NOT EXISTS creditmeter_ledger_at ON creditmeter_ledger (at_us)",
    (
        "CREATE INDEX IF NOT EXISTS creditmeter_ledger_unsummed "
        "ON creditmeter_ledger (user_id) WHERE amount_units IS NULL"
    ),
)
_UNTYPED = (
    "SELECT seq, user_id, data FROM creditmeter_ledger "
    "WHERE at_us IS NULL AND seq > ? ORDER BY seq LIMIT 1000"
)
_FILL = (
    "UPDATE creditmeter_ledger SET "  # noqa: S608
    + ", ".join(f"{name} = ?" for name, _ in _TYPED_COLUMNS)
    + " WHERE seq = ?"
)

_LOAD = "SELECT data FROM creditmeter_accounts WHERE user_id = ?"
_INSERT_ACCOUNT = (
    "INSERT INTO creditmeter_accounts (user_id, version, data) VALUES (?, ?, ?) "
    "ON CONFLICT (user_id) DO NOTHING"
)
_UPDATE_ACCOUNT = (
    "UPDATE creditmeter_accounts SET version = ?, data = ? WHERE user_id = ? AND version = ?"
)
_INSERT_ENTRY = (
    "INSERT INTO creditmeter_ledger (user_id, request_id, data, "  # noqa: S608
    + ", ".join(name for name, _ in _TYPED_COLUMNS)
    + ") VALUES (?, ?, ?"
    + ", ?" * len(_TYPED_COLUMNS)
    + ")"
)
_FIND_REQUEST = "SELECT data FROM creditmeter_ledger WHERE user_id = ? AND request_id = ?"
_LEDGER = "SELECT data FROM creditmeter_ledger WHERE user_id = ? ORDER BY seq"
_LEDGER_TAIL = "SELECT data FROM creditmeter_ledger WHERE user_id = ? ORDER BY seq DESC LIMIT ?"
_USERS = "SELECT user_id FROM creditmeter_accounts ORDER BY user_id"
# BINARY collation compares UTF-8 bytes, whose order is the code point order Python sorts by.
_USERS_FIRST = "SELECT user_id FROM creditmeter_accounts ORDER BY user_id LIMIT ?"
_USERS_AFTER = "SELECT user_id FROM creditmeter_accounts WHERE user_id > ? ORDER BY user_id LIMIT ?"

_SQLITE_MAX_INT = 2**63 - 1

_MAX_IDLE = 4  # handles of ended threads kept for new threads; the rest are closed
_WAITER_IDLE = 10.0  # seconds an idle waiter thread stays for the next contended writer
_WAIT_SLICE = 3600.0  # a longer lock_wait is waited in slices (threading's limit is finite)
_FORK_WAIT = 10.0  # seconds a fork waits for the calls in flight in other threads
_READ_ONLY_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)

# Bumped in a forked child: the async store starts a new worker thread there.
_fork_generation = 0
_stores: weakref.WeakSet[SQLiteStore] = weakref.WeakSet()
_stores_lock = threading.Lock()
_forking = threading.local()  # .stores: the stores whose lock this thread's fork holds
# Connections a fork caught in the middle of a call: the child must never close them
# (closing runs SQLite's cleanup, which would write to the parent's WAL index).
_inherited: list[sqlite3.Connection] = []


def _before_fork() -> None:
    with _stores_lock:
        stores = sorted(_stores, key=id)  # one order for every forking thread: no deadlock
    held: list[SQLiteStore] = []
    _forking.stores = held
    for store in stores:
        store._before_fork()  # noqa: SLF001 - the module's own hook
        held.append(store)


def _after_fork_in_parent() -> None:
    stores: list[SQLiteStore] = getattr(_forking, "stores", [])
    _forking.stores = []
    for store in stores:
        store._after_fork_in_parent()  # noqa: SLF001


def _after_fork_in_child() -> None:
    global _fork_generation, _stores_lock, _waiters  # noqa: PLW0603 - process-wide, reset once
    _fork_generation += 1
    _stores_lock = threading.Lock()
    _forking.stores = []
    # The parent's waiter threads do not exist here; their descriptors are the parent's.
    closed = _waiters.forget()
    _waiters = _Waiters()
    for store in list(_stores):
        store._after_fork_in_child(closed)  # noqa: SLF001


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


_Typed = tuple[
    int,  # at_us
    str,  # kind
    str | None,  # model
    int | None,  # input_tokens
    int | None,  # output_tokens
    int | None,  # cache_write_tokens
    int | None,  # cache_read_tokens
    int | None,  # amount_units
    int | None,  # amount_nanos
    int,  # amount_places
    int | None,  # cost_units
    int | None,  # cost_nanos
    int | None,  # cost_places
]
"""An entry's values for the typed columns, in the order of ``_TYPED_COLUMNS``."""

_Prepared = tuple[str, int, str, list[tuple[object, ...]], int | None]
"""A write as SQL parameters: user id, version, account JSON, entry rows, expected version.

An entry row is its user id, request id and JSON, then its ``_Typed`` values.
"""

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_NANOS = 10**9
_MAX_PLACES = 9  # places a typed amount keeps: nanos
_MAX_UNITS = 2**62  # whole units a typed amount keeps: far from overflowing one INTEGER


def _money(value: Decimal) -> tuple[int | None, int | None, int]:
    """``value`` as whole units, nanos (0..10**9-1) and decimal places; no units if inexact.

    The places are those of its exponent (``Decimal("1.50")`` has 2), which a
    sum keeps: a report's sum has the places of its finest term, as
    ``rules.Tally``'s does.
    """
    if type(value) is not Decimal:  # an int, say, from a caller of the store itself
        value = Decimal(str(value))  # as its JSON has it
    # Read off the plain notation, as the JSON does: a third of the time of as_tuple().
    text = str(value)
    known = _MONEY_SEEN.get(text)  # by text, not value: 1 and 1.0 differ in places
    if known is not None:
        return known
    if "E" in text or not text[-1].isdigit():  # exponent notation (or not finite)
        return _money_exactly(value)
    whole, _, fraction = text.partition(".")
    places = len(fraction)
    if places > _MAX_PLACES:
        return None, None, places
    scaled = int(whole + fraction) * _SCALES[places]  # the value in nanos, exactly
    if not -_MAX_NANOS < scaled < _MAX_NANOS:
        return None, None, places
    units, nanos = divmod(scaled, _NANOS)
    if len(_MONEY_SEEN) >= _MONEY_SEEN_LIMIT:
        _MONEY_SEEN.clear()
    money = _MONEY_SEEN[text] = (units, nanos, places)
    return money


# Amounts repeat (a price per call, its negation): their parts, by their text, remembered.
_MONEY_SEEN: dict[str, tuple[int | None, int | None, int]] = {}
_MONEY_SEEN_LIMIT = 4096


_SCALES = tuple(10 ** (_MAX_PLACES - places) for places in range(_MAX_PLACES + 1))
_MAX_NANOS = _MAX_UNITS * _NANOS


def _money_exactly(value: Decimal) -> tuple[int | None, int | None, int]:
    """``_money`` by the number's parts: for values whose text has an exponent."""
    exponent = value.as_tuple().exponent
    places = -exponent if isinstance(exponent, int) and exponent < 0 else 0
    if places > _MAX_PLACES or not -_MAX_UNITS < value < _MAX_UNITS:
        return None, None, places
    units, nanos = divmod(int(EXACT.scaleb(value, _MAX_PLACES)), _NANOS)
    return units, nanos, places


def _typed(entry: LedgerEntry) -> _Typed:
    """The typed columns of ``entry`` (see ``_TYPED_COLUMNS``)."""
    at_us = _micros(entry.at)
    amount_units, amount_nanos, amount_places = _money(entry.amount)
    cost = entry.cost
    cost_units = cost_nanos = cost_places = None
    if cost is not None:
        cost_units, cost_nanos, cost_places = _money(cost)
        if cost_units is None:  # the row is summed from its JSON: both amounts
            amount_units = amount_nanos = None
    if amount_units is None:
        cost_units = cost_nanos = None
    usage = entry.usage
    return (
        at_us,
        entry.kind.value,
        entry.model,
        None if usage is None else usage.input,
        None if usage is None else usage.output,
        None if usage is None else usage.cache_write,
        None if usage is None else usage.cache_read,
        amount_units,
        amount_nanos,
        amount_places,
        cost_units,
        cost_nanos,
        cost_places,
    )


def _prepared(
    account: Account, entries: Sequence[LedgerEntry], expected_version: int | None
) -> _Prepared:
    user_id = account.user_id
    rows: list[tuple[object, ...]] = [
        (user_id, entry.request_id, entry_to_json(entry), *_typed(entry)) for entry in entries
    ]
    return (user_id, account.version, account_to_json(account), rows, expected_version)


def _micros(at: datetime) -> int:
    """``at`` as whole microseconds since the epoch (negative before 1970)."""
    since = at - _EPOCH
    return (since.days * 86_400 + since.seconds) * 1_000_000 + since.microseconds


# --- reports: the usage rules in SQL ------------------------------------------------

_HOUR_US = 3_600_000_000
_DAY_US = 24 * _HOUR_US
_WEEK_US = 7 * _DAY_US


def _floor_mod(expr: str, unit: int) -> str:
    """SQL for ``expr`` modulo ``unit``, never negative (SQLite's ``%`` keeps the sign)."""
    return f"((({expr}) % {unit}) + {unit}) % {unit}"


# The start of the period holding an entry, in microseconds since the epoch, as
# rules.period_start has it: UTC; weeks from Monday (the epoch fell on a Thursday).
_DAY_START = f"at_us - {_floor_mod('at_us', _DAY_US)}"
_PERIOD_START = {
    "hour": f"at_us - {_floor_mod('at_us', _HOUR_US)}",
    "day": _DAY_START,
    "week": f"at_us - {_floor_mod(f'at_us + {3 * _DAY_US}', _WEEK_US)}",
    "month": f"CAST(strftime('%s', ({_DAY_START}) / 1000000, 'unixepoch', 'start of month') "
    "AS INTEGER) * 1000000",
}

# Per group: calls, the four token sums, then the cost (an entry's cost, or what it took
# when it has none) and what was taken, each as units, nanos and the most places.
_SUMS = (
    "count(*), sum(input_tokens), sum(output_tokens), sum(cache_write_tokens), "
    "sum(cache_read_tokens), sum(coalesce(cost_units, -amount_units)), "
    "sum(coalesce(cost_nanos, -amount_nanos)), max(coalesce(cost_places, amount_places)), "
    "sum(amount_units), sum(amount_nanos), max(amount_places)"
)
_UNSUMMED = (
    "SELECT user_id, data FROM creditmeter_ledger INDEXED BY creditmeter_ledger_unsummed "
    "WHERE amount_units IS NULL"
)
_ALL_ENTRIES = "SELECT user_id, data FROM creditmeter_ledger"
_POSITION = re.compile(r"[0-9]{1,19}")


def _usage_filters(query: UsageQuery) -> tuple[str, list[object]]:
    """The WHERE clause (and its parameters) of the typed rows a usage query covers."""
    where = ["kind = ?"]
    params: list[object] = [EntryKind.CHARGE.value]
    if query.user_id is not None:
        where.append("user_id = ?")
        params.append(query.user_id)
    if query.since is not None:
        where.append("at_us >= ?")
        params.append(_micros(query.since))
    if query.until is not None:
        where.append("at_us < ?")
        params.append(_micros(query.until))
    return " AND ".join(where), params


def _usage_sql(query: UsageQuery) -> tuple[str, list[object]]:
    """One statement that sums the typed rows a usage query covers, per group."""
    where, params = _usage_filters(query)
    columns = ["NULL", "NULL", "NULL"]
    keys = []
    if "user" in query.by:
        # The unary plus makes SQLite sort the rows rather than read them through the
        # user index to skip the sort: a page read per row, measured 1.5x slower.
        columns[0] = "+user_id"
        keys.append("+user_id")
    if "model" in query.by:
        columns[1] = "model"
        keys.append("model")
    if "period" in query.by and query.period is not None:
        columns[2] = _PERIOD_START[query.period]
        keys.append(columns[2])
    sql = (
        f"SELECT {', '.join(columns)}, {_SUMS} FROM creditmeter_ledger "  # noqa: S608
        f"WHERE {where} AND amount_units IS NOT NULL"
    )
    if keys:
        sql += " GROUP BY " + ", ".join(keys)
    return sql, params


def _decimal(units: int | None, nanos: int | None, places: int | None) -> Decimal:
    """A typed sum as a Decimal with ``places`` decimal places (exact: it has no more)."""
    total = EXACT.scaleb(Decimal((units or 0) * _NANOS + (nanos or 0)), -_MAX_PLACES)
    return EXACT.quantize(total, EXACT.scaleb(_ONE, -(places or 0)))


_ONE = Decimal(1)


def _usage_row(row: tuple[Any, ...]) -> UsageRow:
    """A ``UsageRow`` from one row of ``_usage_sql``."""
    user_id, model, start, calls, tokens_in, tokens_out, written, cached, *money = row
    cost_units, cost_nanos, cost_places, units, nanos, places = money
    return UsageRow(
        user_id=user_id,
        model=model,
        period_start=None if start is None else _EPOCH + timedelta(microseconds=start),
        calls=calls,
        usage=usage_sum(tokens_in or 0, tokens_out or 0, written or 0, cached or 0),
        cost=_decimal(cost_units, cost_nanos, cost_places),
        charged=EXACT.minus(_decimal(units, nanos, places)),
    )


def _merged(rows: list[UsageRow], more: list[UsageRow]) -> list[UsageRow]:
    """``rows`` with the rows of ``more`` added in, group by group."""
    if not more:
        return rows
    groups = {(row.user_id, row.model, row.period_start): row for row in rows}
    for extra in more:
        key = (extra.user_id, extra.model, extra.period_start)
        have = groups.get(key)
        if have is None:
            groups[key] = extra
            continue
        usage, added = have.usage, extra.usage
        groups[key] = UsageRow(
            user_id=have.user_id,
            model=have.model,
            period_start=have.period_start,
            calls=have.calls + extra.calls,
            usage=usage_sum(
                usage.input + added.input,
                usage.output + added.output,
                usage.cache_write + added.cache_write,
                usage.cache_read + added.cache_read,
            ),
            cost=EXACT.add(have.cost, extra.cost),
            charged=EXACT.add(have.charged, extra.charged),
        )
    return list(groups.values())


def _position(after: str | None) -> int:
    """The seq a scan position names (0: from the start); ``InvalidInput`` if malformed."""
    if after is None:
        return 0
    if type(after) is not str or _POSITION.fullmatch(after) is None or int(after) > _SQLITE_MAX_INT:
        raise InvalidInput(f"after is not a position of this SQLite store: {after!r:.80}")
    return int(after)


def _scan_filters(query: EntryQuery, *, legacy: bool) -> tuple[str, list[object]]:
    """The filters of a scan after ``seq > ?`` (`` AND …``), and their parameters.

    The time and kind filters pass the rows without typed columns (NULL
    ``at_us``), which are checked in Python; a legacy file has none at all.
    The unary plus on ``at_us`` keeps SQLite walking the ledger in seq
    order rather than through the time index.
    """
    where = ""
    params: list[object] = []
    if query.user_id is not None:
        where += " AND user_id = ?"
        params.append(query.user_id)
    if legacy:
        return where, params
    typed = []
    if query.since is not None:
        typed.append("+at_us >= ?")
        params.append(_micros(query.since))
    if query.until is not None:
        typed.append("+at_us < ?")
        params.append(_micros(query.until))
    if query.kinds is not None:
        kinds = sorted(kind.value for kind in query.kinds)
        typed.append(f"kind IN ({', '.join('?' * len(kinds))})")
        params.extend(kinds)
    if typed:
        where += f" AND (at_us IS NULL OR ({' AND '.join(typed)}))"
    return where, params


def _covers(query: EntryQuery, entry: LedgerEntry) -> bool:
    """Whether a scan covers ``entry`` (its user is checked in SQL)."""
    return in_range(entry.at, query.since, query.until) and (
        query.kinds is None or entry.kind in query.kinds
    )


def _finish(conn: sqlite3.Connection) -> None:
    """COMMIT; if the COMMIT itself fails, roll back so the connection is clean again."""
    try:
        conn.execute("COMMIT")
    except sqlite3.Error:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise


class _Abandoned(Exception):
    """The asyncio task awaiting this call was cancelled before the call took the lock."""


class _Job:
    """What a call on the async store's worker thread knows of the task awaiting it."""

    __slots__ = ("abandoned", "handle", "wait")

    def __init__(self) -> None:
        self.abandoned = False  # set by the loop when the awaiting task is cancelled
        self.handle: _Handle | None = None  # exclusive(): the handle whose lock it holds
        self.wait: _Wait | None = None  # the lock wait the worker is in for it, if any

    def abandon(self) -> None:
        """From the loop: the task is gone; a lock wait for it stops at once."""
        self.abandoned = True
        wait = self.wait
        if wait is not None:
            with wait.mutex:
                wait.wake()


# The states of a _Wait, changed only with its mutex held.
_WAITING = "waiting"  # queued in the kernel, a caller waits for it
_ABANDONED = "abandoned"  # queued, nobody waits: the next contended caller may adopt it
_GRANTED = "granted"  # the waiter thread got the lock for the caller waiting
_FAILED = "failed"  # flock failed (error); the caller waiting reports it
_DONE = "done"  # over: the caller took the descriptor, or the waiter thread closed it


class _Wait:
    """One blocking ``flock`` of the lock file, run on a waiter thread with its own descriptor.

    The descriptor belongs to the waiter thread until the caller takes it
    (granted); a wait nobody waits for any more is closed by the waiter thread
    as soon as its ``flock`` returns, which lets go of the lock at once.
    """

    __slots__ = ("error", "fd", "mutex", "signal", "state")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.mutex = threading.Lock()  # guards state
        # Released to wake the caller waiting (a bare lock: the cheapest wake-up there is).
        self.signal = threading.Lock()
        self.signal.acquire()
        self.state = _WAITING
        self.error: OSError | None = None

    def wake(self) -> None:
        """With ``mutex`` held: wake the caller waiting, if it was not woken already."""
        if self.signal.locked():
            self.signal.release()

    def run(self) -> None:
        """On a waiter thread: block until the lock is ours, then hand it over or let go."""
        error = None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError as exc:
            error = exc
        with self.mutex:
            if self.state == _WAITING:
                self.state = _GRANTED if error is None else _FAILED
                self.error = error
                self.wake()
                return
            self.state = _DONE  # abandoned: nobody wants the lock
        self.close()

    def close(self) -> None:
        """Let go of the lock (if this descriptor has it) and close the descriptor, once."""
        _waiters.discard(self)  # first: a fork from now on must not close the number again
        with contextlib.suppress(OSError):
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        with contextlib.suppress(OSError):
            os.close(self.fd)


class _Waiters:
    """Daemon threads that run blocking ``flock`` calls, reused, and gone when idle.

    One thread per wait in progress (a thread blocked in ``flock`` cannot be
    interrupted), so their number is bounded by the writers waiting at once,
    not by the calls made. Daemon threads: one blocked on a lock a stopped
    process holds must not keep the interpreter from exiting.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.queue: collections.deque[_Wait] = collections.deque()
        self.idle = 0  # threads free for the next wait
        self.live: set[_Wait] = set()  # every wait whose descriptor the waiter side owns

    def start(self, wait: _Wait) -> None:
        """Run ``wait`` on an idle thread, or on a new one."""
        with self.cond:
            self.live.add(wait)
            self.queue.append(wait)
            if self.idle >= len(self.queue):  # an idle thread for each queued wait
                self.cond.notify()
                return
        try:
            threading.Thread(
                target=self._serve, name="creditmeter-sqlite-lock", daemon=True
            ).start()
        except BaseException:
            with self.cond:
                if wait not in self.queue:
                    return  # a thread that came free meanwhile runs it
                self.queue.remove(wait)
                self.live.discard(wait)
            raise

    def discard(self, wait: _Wait) -> None:
        """The descriptor of ``wait`` is no longer the waiter side's to close."""
        with self.cond:
            self.live.discard(wait)

    def _serve(self) -> None:
        while True:
            with self.cond:
                if not self.queue:
                    self.idle += 1
                    try:
                        while not self.queue:
                            if not self.cond.wait(_WAITER_IDLE) and not self.queue:
                                return
                    finally:
                        self.idle -= 1
                wait = self.queue.popleft()
            wait.run()

    def forget(self) -> set[int]:
        """In a forked child: close this process's copies of the waits' descriptors."""
        closed = set()
        for wait in list(self.live):
            with contextlib.suppress(OSError):
                os.close(wait.fd)
            closed.add(wait.fd)
        return closed


_waiters = _Waiters()


class _Handle:
    """One connection and one descriptor of the lock file, used by one thread at a time.

    ``depth`` counts the writer-lock holders of the owning thread (nested
    ``exclusive()`` and commits); ``busy`` is true while a statement runs.
    Only the store's lock guards the fields another thread reads (``close()``
    and forks): ``depth``, ``busy``, ``dead`` and the two resources.
    """

    __slots__ = ("busy", "conn", "dead", "depth", "lock_fd", "pid")

    def __init__(self, conn: sqlite3.Connection | None, lock_fd: int | None) -> None:
        self.conn = conn
        self.lock_fd = lock_fd
        self.depth = 0
        self.busy = False
        self.dead = False
        self.pid = os.getpid()

    def close(self) -> None:
        conn, self.conn = self.conn, None
        fd, self.lock_fd = self.lock_fd, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


class _Owner:
    """Sits in a thread's slot of the store's thread-local, and outlives it by nothing.

    When the thread ends, it hands the thread's handle back to the store
    without taking any lock: this may run at any point of the thread that
    drops it.
    """

    __slots__ = ("handle", "returned")

    def __init__(self, handle: _Handle, returned: collections.deque[_Handle]) -> None:
        self.handle = handle
        self.returned = returned

    def __del__(self) -> None:
        handle = self.handle
        # A fork's copy belongs to the parent: the child never touches it. At
        # interpreter exit the modules this needs may be gone: nothing to hand back then.
        with contextlib.suppress(Exception):
            if not handle.dead and handle.pid == os.getpid():
                self.returned.append(handle)


class SQLiteStore:
    """Accounts and ledger in one SQLite file (WAL mode), safe across threads and processes.

    ``durability="full"`` (the default) syncs every commit to disk before it
    returns (``synchronous=FULL``): an acknowledged charge survives a power
    loss. ``"normal"`` (``synchronous=NORMAL``) survives a crash of the
    process but may lose the last commits on power loss, for several times
    the throughput. The file is created with mode 0600. A file this process
    can read but not write is opened read-only (``read_only`` is then true):
    reads work, and every write raises ``StoreError``.

    A write waits at most ``lock_wait`` seconds (default 30, as SQLite's
    ``busy_timeout``) for the writer lock that another process or thread
    holds, then raises ``StoreError`` naming the lock file, having written
    nothing; ``lock_wait=0`` never waits.

    Safe to share between threads (each gets its own connection, returned
    when the thread ends) and across ``fork()`` (each process opens its own).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Durability = "full",
        busy_timeout: float = 30.0,
        lock_wait: float = 30.0,
    ) -> None:
        if durability not in ("full", "normal"):
            raise ConfigError(f"durability must be 'full' or 'normal', got {durability!r}")
        if (
            not isinstance(lock_wait, (int, float))
            or isinstance(lock_wait, bool)
            or not 0 <= lock_wait < math.inf
        ):
            raise ConfigError(
                f"lock_wait must be a finite number of seconds >= 0, got {lock_wait!r}"
            )
        self.path = os.fspath(path)
        if "\x00" in self.path or any(0xD800 <= ord(c) <= 0xDFFF for c in self.path):
            raise StoreError(
                f"cannot open SQLite store {self.path!r}: NUL or lone surrogate in path"
            )
        if self.path in ("", ":memory:") or self.path.startswith("file:"):
            raise ConfigError("SQLiteStore needs a file path; use MemoryStore for memory")
        self.durability: Durability = durability
        self.read_only = False
        self._read_only_why = ""
        # Resolved once: a later chdir() must not make new connections open another file.
        self._file = str(Path(self.path).absolute())
        self._busy_ms = int(busy_timeout * 1000)
        self.lock_wait = float(lock_wait)
        self._lock_path = self._file + ".lock"
        self._local = threading.local()  # .owner: this thread's _Owner
        self._jobs = threading.local()  # .job: the async call this thread is running
        # Held as the bare lock on the hot path: a Condition's `with` runs two Python frames.
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._all: set[_Handle] = set()  # every open handle, for close() and forks
        self._idle: list[_Handle] = []
        self._returned: collections.deque[_Handle] = collections.deque()
        self._busy = 0  # handles running a statement
        self._abandoned: list[_Wait] = []  # lock waits given up, still queued: adoptable
        self._fork_pending = False
        self._closed = False
        # A read-only file at schema 1 has no typed columns: reports read its JSON.
        self._legacy = False
        self._create_file()
        with _stores_lock:
            _stores.add(self)
        self._init_schema()

    # --- files and connections ----------------------------------------------

    def _create_file(self) -> None:
        """Create the file and its lock file, or find that they can only be read."""
        try:
            fd = os.open(self._file, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            if exc.errno not in _READ_ONLY_ERRNOS or not Path(self._file).is_file():
                raise StoreError(f"cannot open SQLite store {self.path!r}: {exc.strerror}") from exc
            self._read_only(f"the file is not writable: {exc.strerror}")
            return
        os.close(fd)
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            if exc.errno not in _READ_ONLY_ERRNOS:
                raise StoreError(
                    f"cannot open SQLite store {self._lock_path!r}: {exc.strerror}"
                ) from exc
            self._read_only(f"its lock file {self._lock_path!r} is not writable: {exc.strerror}")
            return
        os.close(fd)

    def _read_only(self, why: str) -> None:
        try:
            fd = os.open(self._file, os.O_RDONLY)
        except OSError as exc:
            raise StoreError(f"cannot open SQLite store {self.path!r}: {exc.strerror}") from exc
        os.close(fd)
        self.read_only = True
        self._read_only_why = why

    def _open_connection(self) -> sqlite3.Connection:
        """A new connection with this store's settings (read-only ones for a read-only file)."""
        try:
            if self.read_only:
                conn = self._open_read_only()
            else:
                conn = sqlite3.connect(
                    self._file,
                    isolation_level=None,
                    check_same_thread=False,
                    timeout=self._busy_ms / 1000,
                )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open SQLite store {self.path!r}: {exc}") from exc
        try:
            synchronous = "FULL" if self.durability == "full" else "NORMAL"
            conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
            conn.execute(f"PRAGMA synchronous = {synchronous}")
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"cannot open SQLite store {self.path!r}: {exc}") from exc
        return conn

    def _open_read_only(self) -> sqlite3.Connection:
        """A read-only connection: ``mode=ro``, or ``immutable=1`` when that cannot read.

        To read a WAL database SQLite needs its -wal and -shm files; in a
        directory this process cannot write it cannot make them. If no writer
        has the file open (there is no -wal file), the file alone holds every
        commit, and is read as immutable.
        """
        uri = f"file:{quote(self._file)}?mode=ro"
        conn = sqlite3.connect(
            uri,
            uri=True,
            isolation_level=None,
            check_same_thread=False,
            timeout=self._busy_ms / 1000,
        )
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError:
            conn.close()
            if Path(self._file + "-wal").exists():
                raise
            conn = sqlite3.connect(
                uri + "&immutable=1", uri=True, isolation_level=None, check_same_thread=False
            )
        return conn

    def _connect(self) -> _Handle:
        """Open a new handle (a connection and a lock-file descriptor) and list it."""
        self._start_call()
        try:
            conn = self._open_connection()
            lock_fd = None
            if fcntl is not None and not self.read_only:
                try:
                    lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
                except OSError as exc:
                    conn.close()
                    raise StoreError(f"cannot open the SQLite writer lock: {exc.strerror}") from exc
            handle = _Handle(conn, lock_fd)
            with self._mutex:
                listed = not self._closed
                if listed:
                    self._all.add(handle)
            if not listed:
                handle.close()
                raise StoreError("the store is closed")
        finally:
            self._end_call()
        return handle

    def _handle(self) -> _Handle:
        """Return this thread's handle: its own, else one an ended thread gave back, else new."""
        owner: _Owner | None = getattr(self._local, "owner", None)
        if owner is not None and not owner.handle.dead:
            return owner.handle
        with self._mutex:
            if self._closed:
                raise StoreError("the store is closed")
            retired = self._take_returned()
            handle = self._idle.pop() if self._idle else None
        for old in retired:
            old.close()
        if handle is None:
            handle = self._connect()
        # Outside the lock: replacing a previous owner runs its __del__.
        self._local.owner = _Owner(handle, self._returned)
        return handle

    def _take_returned(self) -> list[_Handle]:
        """With the lock held: file the handles of ended threads; return those to close."""
        retired = []
        while self._returned:
            handle = self._returned.popleft()
            if handle.dead:
                continue
            if not self._closed and handle.depth == 0 and len(self._idle) < _MAX_IDLE:
                self._idle.append(handle)
            else:  # closing it lets go of a lock its thread died holding
                handle.dead = True
                self._all.discard(handle)
                retired.append(handle)
        return retired

    def _start_call(self) -> None:
        """Count a call in flight (forks wait for it), after any pending fork."""
        with self._mutex:
            while self._fork_pending:
                self._cond.wait(1.0)
            self._busy += 1

    def _end_call(self) -> None:
        with self._mutex:
            self._busy -= 1
            if self._fork_pending and not self._busy:
                self._cond.notify_all()

    def _enter(self, handle: _Handle) -> sqlite3.Connection:
        """Mark ``handle`` busy and return its connection, reopened if a fork closed it."""
        with self._mutex:
            while self._fork_pending:
                self._cond.wait(1.0)
            if self._closed or handle.dead:
                raise StoreError("the store is closed")
            handle.busy = True
            self._busy += 1
            conn = handle.conn
            retired = self._take_returned() if self._returned else []
        for old in retired:
            old.close()
        if conn is None:
            try:
                conn = self._open_connection()
            except BaseException:
                self._leave(handle)
                raise
            handle.conn = conn
        return conn

    def _leave(self, handle: _Handle) -> None:
        with self._mutex:
            handle.busy = False
            self._busy -= 1
            if self._fork_pending and not self._busy:
                self._cond.notify_all()
            retire = self._retire(handle)
        if retire:
            handle.close()

    def _retire(self, handle: _Handle) -> bool:
        """With the lock held: True if ``handle`` of a closed store is now free to close."""
        if not self._closed or handle.dead or handle.busy or handle.depth:
            return False
        handle.dead = True
        self._all.discard(handle)
        return True

    def _acquire(self, handle: _Handle, job: _Job | None = None) -> None:
        """Take the writer lock for this thread (nested holders only count)."""
        with self._mutex:
            if self._closed or handle.dead:
                raise StoreError("the store is closed")
            handle.depth += 1
            fd = handle.lock_fd if handle.depth == 1 else None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._wait_for_lock(handle, job)
            except OSError as exc:
                self._release(handle, locked=False)
                raise StoreError(f"cannot take the SQLite writer lock: {exc}") from exc
        if job is not None and job.abandoned:
            self._release(handle)
            raise _Abandoned

    def _wait_for_lock(self, handle: _Handle, job: _Job | None) -> None:
        """Wait at most ``lock_wait`` for the writer lock that another holder has.

        On success the handle's lock descriptor is the one that got the lock;
        otherwise the handle is released (it holds nothing) and this raises.
        """
        wait = None
        state = _WAITING
        if self.lock_wait > 0:
            deadline = time.monotonic() + self.lock_wait
            wait = self._adopt() or self._start_wait(handle)
            try:
                state = self._await(wait, deadline, job)
            except BaseException:  # KeyboardInterrupt in the wait, say: hold nothing
                self._release(handle, locked=False)
                raise
        if wait is not None and state == _GRANTED:
            with self._mutex:
                # The descriptor that holds the lock becomes the handle's; the old one
                # holds nothing. Under the lock: close() and forks see one or the other.
                old, handle.lock_fd = handle.lock_fd, wait.fd
                if old is not None:
                    with contextlib.suppress(OSError):
                        os.close(old)
            _waiters.discard(wait)
            return
        self._release(handle, locked=False)
        if wait is not None and state == _FAILED:
            wait.close()
            raise StoreError(f"cannot take the SQLite writer lock: {wait.error}") from wait.error
        if wait is not None:
            with self._mutex:
                if not self._closed:
                    self._abandoned.append(wait)
        if job is not None and job.abandoned:
            raise _Abandoned
        raise StoreError(
            f"SQLite store {self.path!r}: gave up waiting for the writer lock "
            f"{self._lock_path!r} after lock_wait = {self.lock_wait:g} s; another process "
            "or thread holds it. Nothing was written."
        )

    def _start_wait(self, handle: _Handle) -> _Wait:
        """Queue a new blocking wait for the lock, on a descriptor of its own."""
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            self._release(handle, locked=False)
            raise StoreError(f"cannot open the SQLite writer lock: {exc.strerror}") from exc
        wait = _Wait(fd)
        try:
            _waiters.start(wait)
        except BaseException as exc:
            os.close(fd)
            self._release(handle, locked=False)
            raise StoreError(f"cannot wait for the SQLite writer lock: {exc}") from exc
        return wait

    @staticmethod
    def _await(wait: _Wait, deadline: float, job: _Job | None) -> str:
        """Wait for ``wait`` until ``deadline`` (or the async caller goes); return its state.

        A wait still queued is marked abandoned (another caller may adopt it);
        a granted or failed one is marked done: the caller takes it.
        """
        if job is not None:
            job.wait = wait
        try:
            while True:
                with wait.mutex:
                    state = wait.state
                    left = deadline - time.monotonic()
                    if state != _WAITING or left <= 0 or (job is not None and job.abandoned):
                        wait.state = _ABANDONED if state == _WAITING else _DONE
                        return state
                try:
                    # A wake-up left from an earlier caller of an adopted wait loops once more.
                    wait.signal.acquire(timeout=min(left, _WAIT_SLICE))
                except BaseException:  # KeyboardInterrupt, say: nobody waits any more
                    with wait.mutex:
                        state = wait.state
                        wait.state = _ABANDONED if state == _WAITING else _DONE
                    if state in (_GRANTED, _FAILED):  # got for nobody: let go at once
                        wait.close()
                    raise
        finally:
            if job is not None:
                job.wait = None

    def _adopt(self) -> _Wait | None:
        """Take over a wait given up earlier that is still queued (oldest first), if any."""
        while True:
            with self._mutex:
                if not self._abandoned:
                    return None
                wait = self._abandoned.pop(0)
            with wait.mutex:
                if wait.state == _ABANDONED:
                    wait.state = _WAITING
                    return wait

    def _release(self, handle: _Handle, *, locked: bool = True) -> None:
        error = None
        with self._mutex:
            handle.depth -= 1
            # Under the store's lock: close() cannot close this descriptor meanwhile.
            if not handle.depth and locked and handle.lock_fd is not None:
                try:
                    fcntl.flock(handle.lock_fd, fcntl.LOCK_UN)
                except OSError as exc:
                    error = exc
            retire = self._retire(handle)
        if retire:
            handle.close()
        if error is not None:
            raise StoreError(f"cannot release the SQLite writer lock: {error}") from error

    # --- forks (called by the module's at-fork hooks) -----------------------

    def _before_fork(self) -> None:
        """Hold the store still across the fork, with no connection open."""
        self._cond.acquire()
        self._fork_pending = True
        self._cond.wait_for(lambda: not self._busy, _FORK_WAIT)
        retired = self._take_returned() + self._idle
        self._idle = []
        for handle in retired:
            handle.dead = True
            self._all.discard(handle)
            handle.close()
        for handle in self._all:
            if not handle.busy and handle.conn is not None:
                conn, handle.conn = handle.conn, None  # its thread reopens it when next used
                with contextlib.suppress(sqlite3.Error):
                    conn.close()

    def _after_fork_in_parent(self) -> None:
        self._fork_pending = False
        self._cond.notify_all()
        self._cond.release()

    def _after_fork_in_child(self, closed: set[int]) -> None:
        """Start with nothing: close the inherited lock descriptors, keep no connection.

        ``closed``: descriptors already closed here (the parent's lock waits).
        """
        handles = self._all
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._all = set()
        self._idle = []
        self._abandoned = []
        self._returned = collections.deque()
        self._busy = 0
        self._fork_pending = False
        for handle in handles:
            handle.dead = True
            if handle.conn is not None:  # in flight in another thread when the fork came
                _inherited.append(handle.conn)
                handle.conn = None
            if handle.lock_fd is not None:  # the parent keeps its own descriptor and lock
                if handle.lock_fd not in closed:
                    with contextlib.suppress(OSError):
                        os.close(handle.lock_fd)
                handle.lock_fd = None
        self._local = threading.local()

    # --- the writer lock ----------------------------------------------------

    @contextlib.contextmanager
    def exclusive(self, user_id: str) -> Iterator[None]:  # noqa: ARG002 - one lock for the file
        """Keep every other writer of this file (in any process) out until the block ends.

        Managers use it to retry after a lost compare-and-set: reading and
        committing under the writer lock cannot lose again, and the waiting
        writers are served in turn instead of the last winner winning again.
        """
        handle = self._handle()
        self._acquire(handle)
        try:
            yield
        finally:
            self._release(handle)

    def _hold(self, job: _Job) -> None:
        """The async store's exclusive(): take the lock unless the caller gave up waiting."""
        if job.abandoned:
            return
        handle = self._handle()
        with contextlib.suppress(_Abandoned):
            self._acquire(handle, job)
            job.handle = handle

    def _let_go(self, job: _Job) -> None:
        """Release what ``_hold(job)`` took, if it took anything (once)."""
        handle, job.handle = job.handle, None
        if handle is not None:
            self._release(handle)

    def _init_schema(self) -> None:
        try:
            if self.read_only:
                self._check_schema()
                return
            self._enable_wal()
            handle = self._handle()
            self._acquire(handle)
            try:
                conn = self._enter(handle)
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        for statement in _SCHEMA.split(";"):
                            if statement.strip():
                                conn.execute(statement)
                        self._upgrade(conn)
                    except BaseException:
                        if conn.in_transaction:
                            conn.execute("ROLLBACK")
                        raise
                    _finish(conn)
                finally:
                    self._leave(handle)
            finally:
                self._release(handle)
        except sqlite3.Error as exc:
            self.close()
            raise StoreError(f"cannot open SQLite store {self.path!r}: {exc}") from exc
        except StoreError:
            self.close()
            raise

    def _check_schema(self) -> None:
        handle = self._handle()
        conn = self._enter(handle)
        try:
            tables = {
                row[0]
                for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            if "creditmeter_meta" not in tables:
                raise StoreError(
                    f"{self.path!r} is not a creditmeter store, and is read-only "
                    f"({self._read_only_why})"
                )
            self._check_schema_on(conn)
        finally:
            self._leave(handle)

    def _check_schema_on(self, conn: sqlite3.Connection) -> str:
        """The file's schema version, if this code knows it; else ``StoreError``."""
        row = conn.execute("SELECT value FROM creditmeter_meta WHERE key = 'schema'").fetchone()
        if row is None or row[0] not in _KNOWN_SCHEMAS:
            raise StoreError(f"{self.path!r} holds an unknown creditmeter schema")
        self._legacy = row[0] != _SCHEMA_VERSION
        return str(row[0])

    def _upgrade(self, conn: sqlite3.Connection) -> None:
        """Within the schema's transaction: bring the file to schema 2 and fill typed columns.

        A schema 1 file gets the typed columns (filled from each entry's
        JSON) and its version is raised, all or nothing: the transaction and
        the writer lock keep other processes opening it out until it is done.
        Rows written since by a process still running older code (NULL
        ``at_us``) are filled on every open.
        """
        if self._check_schema_on(conn) == "1":
            for name, kind in _TYPED_COLUMNS:
                conn.execute(f"ALTER TABLE creditmeter_ledger ADD COLUMN {name} {kind}")
            conn.execute(
                "UPDATE creditmeter_meta SET value = ? WHERE key = 'schema'", (_SCHEMA_VERSION,)
            )
        self._fill_typed(conn)
        for statement in _TYPED_INDEXES:
            conn.execute(statement)
        self._legacy = False

    @staticmethod
    def _fill_typed(conn: sqlite3.Connection) -> None:
        """Fill the typed columns of the rows that lack them, from their JSON.

        A row whose JSON cannot be read is left as it is: reads of it report
        it corrupt, as ``ledger()`` does.
        """
        last = 0
        while True:
            rows = conn.execute(_UNTYPED, (last,)).fetchall()
            if not rows:
                return
            filled = []
            for seq, user_id, data in rows:
                last = seq
                try:
                    entry = entry_from_json(data, user_id=user_id)
                except StoreError:
                    continue
                filled.append((*_typed(entry), seq))
            conn.executemany(_FILL, filled)

    def _enable_wal(self) -> None:
        """Refuse another application's database, then switch the file to WAL.

        Both under the writer lock, and outside a transaction (as WAL needs).
        Without the lock, a process opening a new file while another one is
        still creating the schema asks for the exclusive lock that the other
        one needs to commit; SQLite settles that deadlock by failing one of
        them at once ("database is locked"), without waiting. The check comes
        first because switching to WAL rewrites the file's header.
        """
        handle = self._handle()
        self._acquire(handle)
        try:
            conn = self._enter(handle)
            try:
                tables = {
                    row[0]
                    for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                }
                if tables and "creditmeter_meta" not in tables:
                    raise StoreError(
                        f"{self.path!r} is an SQLite database but not a creditmeter store"
                    )
                conn.execute("PRAGMA journal_mode = WAL")
            finally:
                self._leave(handle)
        finally:
            self._release(handle)

    # --- the contract -------------------------------------------------------

    def load(self, user_id: str) -> Account | None:
        """Return the stored account, or ``None``."""
        handle = self._handle()
        conn = self._enter(handle)
        try:
            row = conn.execute(_LOAD, (user_id,)).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite load from {self.path!r} failed: {exc}") from exc
        finally:
            self._leave(handle)
        return None if row is None else account_from_json(row[0], user_id=user_id)

    def commit(
        self,
        account: Account,
        entries: Sequence[LedgerEntry],
        *,
        expected_version: int | None,
    ) -> None:
        """Store the account and entries in one transaction if the version still matches."""
        job = self._writable()
        write = _prepared(account, entries, expected_version)
        self._transaction(job, lambda conn: self._apply(conn, write))

    def commit_many(self, writes: Sequence[Write]) -> list[WriteOutcome]:
        """Commit each write as ``commit()`` would, all in ONE transaction (one sync to disk).

        Each write runs in a savepoint of its own: one that meets a
        ``VersionConflict`` or a ``DuplicateRequest`` (returned in its slot)
        is rolled back alone and the others apply. Any other failure rolls
        the whole transaction back (nothing is written) and raises
        ``StoreError``. Waits for the writer lock as ``commit()`` does.
        """
        job = self._writable()
        if not writes:
            return []
        prepared = [_prepared(*write) for write in writes]
        return self._transaction(
            job, lambda conn: [self._apply_saved(conn, write) for write in prepared]
        )

    def _writable(self) -> _Job | None:
        """Refuse a write to a read-only file, or for a call that was given up; its job."""
        job: _Job | None = getattr(self._jobs, "job", None)
        if self.read_only:
            raise StoreError(
                f"cannot write to SQLite store {self.path!r}: opened read-only "
                f"({self._read_only_why})"
            )
        if job is not None and job.abandoned:
            raise _Abandoned
        return job

    def _transaction(self, job: _Job | None, body: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``body`` in one ``BEGIN IMMEDIATE`` transaction under the writer lock.

        Whatever ``body`` raises rolls the transaction back; an SQLite failure
        is ``StoreError``.
        """
        handle = self._handle()
        self._acquire(handle, job)
        try:
            conn = self._enter(handle)
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = body(conn)
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                _finish(conn)
            except sqlite3.Error as exc:
                raise StoreError(f"SQLite commit to {self.path!r} failed: {exc}") from exc
            finally:
                self._leave(handle)
        finally:
            self._release(handle)
        return result

    @staticmethod
    def _apply(conn: sqlite3.Connection, write: _Prepared) -> None:
        """One write: the account's compare-and-set, then its entries; raises what it meets."""
        user_id, version, data, rows, expected_version = write
        if expected_version is None:
            cursor = conn.execute(_INSERT_ACCOUNT, (user_id, version, data))
        else:
            cursor = conn.execute(_UPDATE_ACCOUNT, (version, data, user_id, expected_version))
        if cursor.rowcount != 1:
            row = conn.execute(_LOAD, (user_id,)).fetchone()
            current = None if row is None else account_from_json(row[0], user_id=user_id)
            raise VersionConflict(user_id, expected=expected_version, current=current)
        if not rows:  # a hold writes no entry
            return
        try:
            conn.executemany(_INSERT_ENTRY, rows)
        except sqlite3.IntegrityError:
            raise SQLiteStore._duplicate(conn, user_id, rows) from None

    @staticmethod
    def _apply_saved(conn: sqlite3.Connection, write: _Prepared) -> WriteOutcome:
        """One write of ``commit_many``, in a savepoint: applied (``None``) or what it met."""
        conn.execute("SAVEPOINT creditmeter_write")
        try:
            SQLiteStore._apply(conn, write)
        except (VersionConflict, DuplicateRequest) as met:
            conn.execute("ROLLBACK TO creditmeter_write")  # the write leaves nothing
            conn.execute("RELEASE creditmeter_write")
            return met
        conn.execute("RELEASE creditmeter_write")
        return None

    @staticmethod
    def _duplicate(
        conn: sqlite3.Connection, user_id: str, rows: list[tuple[object, ...]]
    ) -> DuplicateRequest:
        """The request id of ``rows`` applied before (stored, or earlier in ``rows`` itself).

        Called inside the transaction, after an insert of ``rows`` failed.
        """
        earlier: dict[str, str] = {}
        for row in rows:
            request_id, data = row[1], row[2]
            if not isinstance(request_id, str) or not isinstance(data, str):
                continue
            found = conn.execute(_FIND_REQUEST, (user_id, request_id)).fetchone()
            # A row the failed statement inserted before the failing one is found as
            # itself (the same text): that is not a repeat.
            stored = found[0] if found is not None and found[0] != data else None
            first = stored if stored is not None else earlier.get(request_id)
            if first is not None:
                return DuplicateRequest(
                    user_id, request_id, entry=entry_from_json(first, user_id=user_id)
                )
            earlier[request_id] = data
        raise StoreError(f"SQLite commit for user {user_id!r} broke a constraint it should not")

    def find_request(self, user_id: str, request_id: str) -> LedgerEntry | None:
        """Return the entry recorded under ``request_id``, if any."""
        handle = self._handle()
        conn = self._enter(handle)
        try:
            row = conn.execute(_FIND_REQUEST, (user_id, request_id)).fetchone()
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite read of {self.path!r} failed: {exc}") from exc
        finally:
            self._leave(handle)
        return None if row is None else entry_from_json(row[0], user_id=user_id)

    def ledger(self, user_id: str, *, limit: int | None = None) -> list[LedgerEntry]:
        """Return the user's entries, oldest first (the newest ``limit`` if given)."""
        handle = self._handle()
        conn = self._enter(handle)
        try:
            if limit is None:
                rows = conn.execute(_LEDGER, (user_id,)).fetchall()
            else:
                rows = conn.execute(_LEDGER_TAIL, (user_id, min(limit, _SQLITE_MAX_INT))).fetchall()
                rows.reverse()
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite read of {self.path!r} failed: {exc}") from exc
        finally:
            self._leave(handle)
        return [entry_from_json(row[0], user_id=user_id) for row in rows]

    def users(self) -> list[str]:
        """Return every user id, sorted."""
        handle = self._handle()
        conn = self._enter(handle)
        try:
            return [row[0] for row in conn.execute(_USERS)]
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite read of {self.path!r} failed: {exc}") from exc
        finally:
            self._leave(handle)

    # --- reports (ReportStore) ----------------------------------------------

    def _read(self, body: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``body`` on this thread's connection; an SQLite failure is ``StoreError``."""
        handle = self._handle()
        conn = self._enter(handle)
        try:
            return body(conn)
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite read of {self.path!r} failed: {exc}") from exc
        finally:
            self._leave(handle)

    def sum_usage(self, query: UsageQuery) -> list[UsageRow]:
        """The query's charges summed per group, in SQL (as ``rules.Tally`` sums them).

        Typed rows are summed by SQLite in whole units and nanos, exactly;
        rows without typed amounts (see ``_TYPED_COLUMNS``) are read from
        their JSON and added in. Should a sum pass 2**63 (some 9 * 10**18
        credits or tokens in one group), the query's rows are summed from
        their JSON instead.
        """
        return self._read(lambda conn: self._sum_usage(conn, query))

    def _sum_usage(self, conn: sqlite3.Connection, query: UsageQuery) -> list[UsageRow]:
        tally = Tally(query)
        user_filter: tuple[str, ...] = () if query.user_id is None else (query.user_id,)
        if self._legacy:
            where = "" if query.user_id is None else " WHERE user_id = ?"
            self._tally(conn, tally, _ALL_ENTRIES + where, user_filter)
            return tally.rows()
        sql, params = _usage_sql(query)
        try:
            rows = [_usage_row(row) for row in conn.execute(sql, params) if row[3]]
        except sqlite3.OperationalError as exc:
            if "overflow" not in str(exc):
                raise
            where, params = _usage_filters(query)
            self._tally(
                conn, tally, f"{_ALL_ENTRIES} WHERE amount_units IS NULL OR ({where})", params
            )
            return tally.rows()
        # The rows SQL left out, as few as SQL can tell (older code's rows have no kind).
        where, params = _usage_filters(query)
        mine = "" if query.user_id is None else " AND user_id = ?"
        unsummed = f"{_UNSUMMED}{mine} AND (at_us IS NULL OR ({where}))"
        self._tally(conn, tally, unsummed, [*user_filter, *params])
        return _merged(rows, tally.rows())

    @staticmethod
    def _tally(conn: sqlite3.Connection, tally: Tally, sql: str, params: Sequence[object]) -> None:
        """Add the entries ``sql`` selects (user id, JSON) to ``tally``, which filters them."""
        for user_id, data in conn.execute(sql, params):
            tally.add(entry_from_json(data, user_id=user_id))

    def scan_entries(self, query: EntryQuery, *, after: str | None, limit: int) -> Scan:
        """Up to ``limit`` entries the query covers, in commit order, after position ``after``.

        A position is the last seq read, as text. Writers commit one at a
        time and AUTOINCREMENT never hands out a seq twice, so every entry a
        later commit adds has a higher seq than any a read could see before:
        seq order is commit order, and a page starting after a seq skips
        nothing. Filters run in SQL on the typed columns; rows without them
        are checked in Python.
        """
        start = _position(after)
        return self._read(lambda conn: self._scan(conn, query, start, after is None, limit))

    def _scan(
        self, conn: sqlite3.Connection, query: EntryQuery, start: int, first: bool, limit: int
    ) -> Scan:
        where, params = _scan_filters(query, legacy=self._legacy)
        if first and query.since is not None and query.user_id is None and not self._legacy:
            lowest = self._lowest_seq(conn, query)
            if lowest is None:
                return Scan([], None)
            start = max(start, lowest - 1)
        checked = query.since is not None or query.until is not None or query.kinds is not None
        at = "NULL" if self._legacy else "at_us"
        rows = conn.execute(
            f"SELECT seq, user_id, data, {at} FROM creditmeter_ledger "  # noqa: S608
            f"WHERE seq > ?{where} ORDER BY seq LIMIT ?",
            (start, *params, min(limit, _SQLITE_MAX_INT - 1) + 1),
        ).fetchall()
        found: list[LedgerEntry] = []
        last = start
        for seq, user_id, data, at_us in rows:
            if len(found) == limit:
                return Scan(found, str(last))
            last = seq
            entry = entry_from_json(data, user_id=user_id)
            if at_us is None and checked and not _covers(query, entry):
                continue  # a row without typed columns, which SQL could not filter
            found.append(entry)
        # Only a page cut short by rows that Python turned down ends before the last row.
        return Scan(found, str(last) if len(rows) > limit else None)

    @staticmethod
    def _lowest_seq(conn: sqlite3.Connection, query: EntryQuery) -> int | None:
        """The lowest seq a first page may hold: read through the time index, not the ledger.

        Rows committed after this read have higher seqs than every row it saw.
        Without INDEXED BY, SQLite answers ``min(seq)`` by walking the ledger
        from its start to the first row in range: the whole table for a
        recent ``since``, where the index reads only the rows in range.
        """
        bounds = "at_us >= ?" if query.until is None else "at_us >= ? AND at_us < ?"
        params = [_micros(time) for time in (query.since, query.until) if time is not None]
        typed = conn.execute(
            "SELECT min(seq) FROM creditmeter_ledger INDEXED BY creditmeter_ledger_at "  # noqa: S608
            f"WHERE {bounds}",
            params,
        ).fetchone()[0]
        untyped = conn.execute(
            "SELECT min(seq) FROM creditmeter_ledger WHERE at_us IS NULL"
        ).fetchone()[0]
        found = [seq for seq in (typed, untyped) if seq is not None]
        return min(found) if found else None

    def users_page(self, *, after: str | None, limit: int) -> list[str]:
        """Up to ``limit`` user ids after ``after``, sorted, read from the accounts' key."""
        size = max(0, min(limit, _SQLITE_MAX_INT))
        sql, params = (_USERS_FIRST, (size,)) if after is None else (_USERS_AFTER, (after, size))
        return self._read(lambda conn: [row[0] for row in conn.execute(sql, params)])

    def close(self) -> None:
        """Close every connection and lock descriptor this process opened, in every thread.

        A handle in use by another thread at that moment is closed by that
        thread as soon as its call (or its ``exclusive()`` block) ends. Further
        use raises ``StoreError``.
        """
        owner: _Owner | None = getattr(self._local, "owner", None)
        mine = None if owner is None else owner.handle
        conns = []
        with self._mutex:
            self._closed = True
            # Waits given up stay with their waiter threads, which close them once they
            # get the lock (closing a descriptor a thread is blocked on could close
            # another file that reuses its number).
            self._abandoned = []
            retired = self._take_returned() + self._idle
            self._idle = []
            for handle in list(self._all):
                if handle.busy:
                    continue
                if handle.depth and handle is not mine:
                    # Another thread holds (or waits for) the writer lock with it:
                    # that thread closes the descriptor when it lets go.
                    if handle.conn is not None:
                        conns.append(handle.conn)
                        handle.conn = None
                    continue
                retired.append(handle)
            for handle in retired:
                handle.dead = True
                self._all.discard(handle)
        for handle in retired:
            handle.close()
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        with _stores_lock:
            _stores.discard(self)
        self._local = threading.local()  # outside the lock: this runs the owners' __del__

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        read_only = ", read_only=True" if self.read_only else ""
        return f"SQLiteStore({self.path!r}, durability={self.durability!r}{read_only})"


class AsyncSQLiteStore:
    """``SQLiteStore`` for asyncio: every call runs on one worker thread, never on the loop.

    One thread keeps each connection (and the writer lock it holds) on the
    thread that opened it; SQLite serializes writers anyway. Opening the
    store (creating the file and schema) happens in the constructor.

    Every await is cancellation-safe: a cancelled call that had not taken
    the writer lock yet writes nothing and stops waiting for it at once,
    so the worker goes on with the next call; a commit that holds the lock
    completes (all or nothing) after its caller has gone. ``lock_wait`` is
    as for ``SQLiteStore``. A forked child starts its own worker
    thread on its first call.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Durability = "full",
        busy_timeout: float = 30.0,
        lock_wait: float = 30.0,
    ) -> None:
        self.sync = SQLiteStore(
            path, durability=durability, busy_timeout=busy_timeout, lock_wait=lock_wait
        )
        self.path = self.sync.path
        self._executor = self._new_executor()
        self._generation = _fork_generation
        self._closed = False

    @staticmethod
    def _new_executor() -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="creditmeter-sqlite")

    def _worker(self) -> ThreadPoolExecutor:
        if self._generation != _fork_generation:
            # A forked child: the parent's worker thread does not exist here, and the
            # executor inherited from it would queue every call forever.
            self._executor = self._new_executor()
            self._generation = _fork_generation
        return self._executor

    async def _run(
        self, job: _Job | None, call: Callable[..., _T], *args: object, **kwargs: object
    ) -> _T:
        if self._closed:
            raise StoreError("the store is closed")
        future = self._worker().submit(call, *args, **kwargs)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            # A call still queued is dropped with the future; one already running
            # stops waiting for the writer lock, or lets go of it once it has it.
            if job is not None:
                job.abandon()
            raise

    async def load(self, user_id: str) -> Account | None:
        """Return the stored account, or ``None``."""
        return await self._run(None, self.sync.load, user_id)

    async def commit(
        self,
        account: Account,
        entries: Sequence[LedgerEntry],
        *,
        expected_version: int | None,
    ) -> None:
        """Store the account and entries in one transaction if the version still matches."""
        job = _Job()
        await self._run(job, self._commit, job, account, entries, expected_version)

    def _commit(
        self,
        job: _Job,
        account: Account,
        entries: Sequence[LedgerEntry],
        expected_version: int | None,
    ) -> None:
        """On the worker thread: the sync commit, told which call it runs for."""
        jobs = self.sync._jobs  # noqa: SLF001 - the store's own twin
        jobs.job = job
        try:
            self.sync.commit(account, entries, expected_version=expected_version)
        finally:
            jobs.job = None

    async def commit_many(self, writes: Sequence[Write]) -> list[WriteOutcome]:
        """Commit each write as ``commit()`` would, in one transaction (see ``SQLiteStore``)."""
        job = _Job()
        return await self._run(job, self._commit_many, job, writes)

    def _commit_many(self, job: _Job, writes: Sequence[Write]) -> list[WriteOutcome]:
        """On the worker thread: the sync ``commit_many``, told which call it runs for."""
        jobs = self.sync._jobs  # noqa: SLF001 - the store's own twin
        jobs.job = job
        try:
            return self.sync.commit_many(writes)
        finally:
            jobs.job = None

    async def find_request(self, user_id: str, request_id: str) -> LedgerEntry | None:
        """Return the entry recorded under ``request_id``, if any."""
        return await self._run(None, self.sync.find_request, user_id, request_id)

    async def ledger(self, user_id: str, *, limit: int | None = None) -> list[LedgerEntry]:
        """Return the user's entries, oldest first (the newest ``limit`` if given)."""
        return await self._run(None, self.sync.ledger, user_id, limit=limit)

    async def users(self) -> list[str]:
        """Return every user id, sorted."""
        return await self._run(None, self.sync.users)

    async def scan_entries(self, query: EntryQuery, *, after: str | None, limit: int) -> Scan:
        """Up to ``limit`` entries the query covers, in commit order (see ``SQLiteStore``)."""
        return await self._run(None, self.sync.scan_entries, query, after=after, limit=limit)

    async def sum_usage(self, query: UsageQuery) -> list[UsageRow]:
        """The query's charges summed per group (see ``SQLiteStore``)."""
        return await self._run(None, self.sync.sum_usage, query)

    async def users_page(self, *, after: str | None, limit: int) -> list[str]:
        """Up to ``limit`` user ids after ``after``, sorted."""
        return await self._run(None, self.sync.users_page, after=after, limit=limit)

    def _submit_let_go(self, job: _Job) -> Future[None] | None:
        """Queue the release of what ``job`` holds behind its own hold (one worker: in order)."""
        try:
            return self._worker().submit(self.sync._let_go, job)  # noqa: SLF001
        except RuntimeError:  # shut down by aclose(): closing let go of every lock
            return None

    @contextlib.asynccontextmanager
    async def exclusive(self, user_id: str) -> AsyncIterator[None]:  # noqa: ARG002 - one lock
        """Keep every other writer of this file out until the block ends (see ``SQLiteStore``)."""
        job = _Job()
        try:
            await self._run(job, self.sync._hold, job)  # noqa: SLF001 - the store's own twin
        except asyncio.CancelledError:
            self._submit_let_go(job)  # the hold may have gone through meanwhile
            raise
        try:
            yield
        finally:
            # Shielded: a caller cancelled again meanwhile still lets go of the lock.
            released = self._submit_let_go(job)
            if released is not None:
                await asyncio.shield(asyncio.wrap_future(released))

    async def aclose(self) -> None:
        """Close every connection and stop the worker thread.

        The closing runs even if this call is cancelled, once the worker has
        finished the calls queued before it.
        """
        if self._closed:
            return
        self._closed = True
        executor = self._worker()
        closed = executor.submit(self.sync.close)
        executor.shutdown(wait=False)
        await asyncio.shield(asyncio.wrap_future(closed))

    async def __aenter__(self) -> AsyncSQLiteStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncSQLiteStore({self.path!r}, durability={self.sync.durability!r})"
