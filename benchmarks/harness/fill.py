"""Bulk fill: a store holding many accounts (or ledger rows) in seconds, in its own layout.

Accounts are written as a first ``balance()`` leaves them: the account and
its opening ledger entry, serialised by ``creditmeter.serde``, straight into
the store's tables or keys: MemoryStore's dicts, SQLite ``executemany``,
Redis pipelined ``HSET``/``RPUSH``/``SADD`` and PostgreSQL ``COPY``. This
module and ``floors`` are the only ones that reach into a store's internals.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from creditmeter._ids import new_id
from creditmeter.models import Account, EntryKind, LedgerEntry
from creditmeter.serde import account_to_json, entry_to_json
from harness.stores import base_url, kind_of, option, pg

NOW = datetime.now(timezone.utc)
CHUNK = 50_000
_INSERT_ACCOUNT = "INSERT INTO creditmeter_accounts (user_id, version, data) VALUES (?, ?, ?)"
_INSERT_ENTRY = "INSERT INTO creditmeter_ledger (user_id, request_id, data) VALUES (?, ?, ?)"


def uid(index: int) -> str:
    """A 24-hex user id (LibreChat's MongoDB id shape), consecutive indices far apart."""
    return f"{index * 2654435761 % 2**32:08x}{index:016x}"


def account(user: str, balance: Decimal, version: int = 1) -> Account:
    """An account as a store holds it."""
    return Account(
        user_id=user,
        balance=balance,
        version=version,
        created_at=NOW,
        updated_at=NOW,
        last_refill=NOW,
    )


def entry(
    user: str, amount: Decimal, after: Decimal, kind: EntryKind = EntryKind.CHARGE
) -> LedgerEntry:
    """A ledger entry as a store holds it (a charge costs what it takes)."""
    cost = -amount if kind is EntryKind.CHARGE else None
    return LedgerEntry(
        id=new_id(), user_id=user, kind=kind, amount=amount, balance_after=after, at=NOW, cost=cost
    )


def opened(user: str, start: Decimal) -> tuple[Account, LedgerEntry]:
    """An account as its first ``balance()`` leaves it, with its opening entry."""
    return account(user, start), entry(user, start, start, EntryKind.OPEN)


def _template(text: str, **marks: object) -> str:
    text = text.replace("{", "{{").replace("}", "}}")
    for name, value in marks.items():
        text = text.replace(str(value), "{" + name + "}")
    return text


_USER, _BALANCE, _VERSION = "u-9111111119", Decimal(922222229), 933333339
_ENTRY = entry(_USER, Decimal(-1), _BALANCE)
#: The store's JSON of an account and of a charge of 1, as ``str.format`` templates.
ACCOUNT = _template(
    account_to_json(account(_USER, _BALANCE, _VERSION)),
    user=_USER,
    balance=_BALANCE,
    version=_VERSION,
)
ENTRY = _template(entry_to_json(_ENTRY), id=_ENTRY.id, user=_USER, balance=_BALANCE)


def _chunks(added: range, size: int = CHUNK) -> Iterator[list[str]]:
    """User ids of ``added`` in chunks, each sorted (B-tree inserts in key order)."""
    for first in range(added.start, added.stop, size):
        yield sorted(uid(i) for i in range(first, min(first + size, added.stop)))


def fill(url: str, store: Any, added: range, start: Decimal) -> None:
    """Add accounts ``uid(i)`` for ``i`` in ``added`` to ``store`` (opened on ``url``)."""
    kind = kind_of(url)
    if kind == "memory":
        from creditmeter.stores.memory import _pack  # noqa: PLC0415

        with store._lock:
            for index in added:
                account, entry = opened(uid(index), start)
                store._accounts[account.user_id] = account
                store._ledgers[account.user_id] = [_pack(entry)]
                store._log.append(store._ledgers[account.user_id][0])
                store._new_users.append(account.user_id)
    elif kind.startswith("sqlite"):
        with _sqlite(store) as conn:
            for users in _chunks(added):
                pairs = [opened(user, start) for user in users]
                conn.execute("BEGIN IMMEDIATE")
                rows = [(a.user_id, a.version, account_to_json(a)) for a, _ in pairs]
                conn.executemany(_INSERT_ACCOUNT, rows)
                rows = [(e.user_id, e.request_id, entry_to_json(e)) for _, e in pairs]
                conn.executemany(_INSERT_ENTRY, rows)
                conn.execute("COMMIT")
    elif kind == "redis":
        _fill_redis(store, added, start)
    else:
        _fill_postgres(url, added, start)


class _sqlite:  # noqa: N801 - a context manager read as a function
    """A fill connection to the store's file, under the store's writer lock; WAL truncated after."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def __enter__(self) -> sqlite3.Connection:
        self.lock = self.store.exclusive("")
        self.lock.__enter__()
        self.conn = sqlite3.connect(self.store.path, isolation_level=None)
        self.conn.execute("PRAGMA synchronous = OFF")  # the fill only; the store keeps its own
        self.conn.execute("PRAGMA cache_size = -262144")
        return self.conn

    def __exit__(self, *exc: object) -> None:
        try:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # else timed commits would
            self.conn.close()
        finally:
            self.lock.__exit__(None, None, None)


def fill_ledger(store: Any, users: list[str], per_user: int, start: Decimal) -> None:
    """Give each SQLite user ``per_user - 1`` charges of 1, interleaved across users."""
    update = "UPDATE creditmeter_accounts SET version = ?, data = ? WHERE user_id = ?"
    with _sqlite(store) as conn:
        conn.execute("BEGIN IMMEDIATE")
        for n in range(1, per_user):
            rows = [(u, None, ENTRY.format(id=new_id(), user=u, balance=start - n)) for u in users]
            conn.executemany(_INSERT_ENTRY, rows)
        after = start - (per_user - 1)
        rows = [
            (per_user, ACCOUNT.format(user=u, balance=after, version=per_user), u) for u in users
        ]
        conn.executemany(update, rows)
        conn.execute("COMMIT")


def _resp(*parts: bytes) -> bytes:
    """One Redis command in the wire protocol (RESP)."""
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def _fill_redis(store: Any, added: range, start: Decimal) -> None:
    """HSET and RPUSH per user, SADD per chunk, written in RESP down one store connection.

    redis-py's own pipeline spends ~30 µs a user packing and parsing: a
    million accounts would take a minute.
    """
    layout = store._layout
    pool = store.client.connection_pool
    conn = pool.get_connection()
    try:
        for users in _chunks(added, 5_000):
            commands = []
            for user in users:
                account, entry = opened(user, start)
                keys = layout.keys(user)
                data = account_to_json(account).encode()
                token = new_id().encode()
                commands.append(_resp(b"HSET", keys.account, b"v", b"1", b"d", data, b"t", token))
                commands.append(_resp(b"RPUSH", keys.ledger, entry_to_json(entry).encode()))
            commands.append(_resp(b"SADD", layout.users_key, *(u.encode() for u in users)))
            conn.send_packed_command([b"".join(commands)])
            for _ in commands:
                reply = conn.read_response()
                if isinstance(reply, Exception):
                    raise reply
    finally:
        pool.release(conn)


def _fill_postgres(url: str, added: range, start: Decimal) -> None:
    """COPY into the store's tables, a transaction per chunk; then VACUUM ANALYZE, CHECKPOINT.

    Without the VACUUM the first read of each copied row sets its hint bits
    (a write), the planner has no statistics, and the fill's dirty pages are
    flushed while the charges are timed.
    """
    import psycopg  # noqa: PLC0415
    from psycopg import sql  # noqa: PLC0415

    prefix = option(url, "prefix")
    columns = {
        "accounts": "user_id, version, balance, created_at, updated_at, last_refill, data",
        "ledger": "id, user_id, kind, amount, balance_after, cost, at, request_id, model, data",
    }
    copy = {
        table: sql.SQL(f"COPY {{}} ({names}) FROM STDIN").format(sql.Identifier(prefix + table))
        for table, names in columns.items()
    }
    with psycopg.connect(base_url(url)) as conn, conn.cursor() as cursor:
        for users in _chunks(added):
            pairs = [opened(user, start) for user in users]
            with cursor.copy(copy["accounts"]) as rows:
                for a, _ in pairs:
                    data = account_to_json(a)
                    rows.write_row((a.user_id, 1, a.balance, NOW, NOW, NOW, data))
            with cursor.copy(copy["ledger"]) as rows:
                for _, e in pairs:
                    data = entry_to_json(e)
                    rows.write_row(
                        (e.id, e.user_id, "open", e.amount, e.amount, None, NOW, None, None, data)
                    )
            conn.commit()
    if len(added) > 1:
        for table in columns:
            pg(url, "VACUUM (ANALYZE) {}", table)
        pg(url, "CHECKPOINT")


def count(url: str, store: Any, table: str = "accounts") -> int:
    """Rows of the store's ``accounts`` (or ``ledger``) table: accounts or entries it holds."""
    kind = kind_of(url)
    if kind == "memory":
        return len(store._accounts if table == "accounts" else store._ledgers)
    if kind == "redis":
        return int(store.client.scard(store._layout.users_key))
    if kind.startswith("sqlite"):
        return int(_sqlite_rows(store.path, f"SELECT count(*) FROM creditmeter_{table}")[0][0])
    return int(pg(url, "SELECT count(*) FROM {}", table)[0][0])


def ledger_plan(url: str, store: Any, user: str) -> str:
    """The plan SQLite or PostgreSQL picks for the store's ledger read of one user."""
    if kind_of(url).startswith("sqlite"):
        from creditmeter.stores.sqlite import _LEDGER  # noqa: PLC0415

        rows = _sqlite_rows(store.path, "EXPLAIN QUERY PLAN " + _LEDGER, user)
        return "; ".join(str(row[-1]) for row in rows)
    query = "EXPLAIN SELECT data FROM {} WHERE user_id = %s ORDER BY seq"
    return "; ".join(str(row[0]).strip() for row in pg(url, query, "ledger", params=(user,)))


def _sqlite_rows(path: str, query: str, *params: object) -> list[Any]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(query, params).fetchall()
    finally:
        conn.close()
