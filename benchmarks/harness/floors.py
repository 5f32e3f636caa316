"""Raw floors: a charge of 1 done by hand the way each store does it, with nothing else.

``raw(url, variant)`` returns a ``Raw`` whose ``charge()`` charges ``USER`` 1
credit and returns how often it had to retry or wait. Variants:

- ``floor``, one writer: memory, a dict update under a lock; SQLite, ``BEGIN
  IMMEDIATE``, compare-and-set ``UPDATE``, ledger ``INSERT``, ``COMMIT`` with the
  store's schema and pragmas; Redis, the store's Lua commit script (``EVALSHA``);
  PostgreSQL, the store's commit statement on an autocommit connection.
- ``records`` (memory): under a lock, the records a charge writes, built with
  their attrs constructors: a new ``Account`` replacing the old one in a dict
  and a ``LedgerEntry`` appended to a list.
- ``cas`` (Redis, PostgreSQL): the floor, retried at once from the account a lost
  compare-and-set reports, without limit.
- ``turn`` (Redis, PostgreSQL): every charge in turn, as the store does for a hot
  user: the lock script (``BLPOP`` when queued) and the commit script that passes
  the lock on; an advisory lock, a load, the compare-and-set that also unlocks.
- ``delta`` (Redis, PostgreSQL): the store's delta script or statement
  (``commit_delta``), which a hot user's charges use: the cost added to the
  balance the server holds, with the account's text cut once from the stored
  row.
- ``busy`` and ``flock`` (SQLite): a read inside ``BEGIN IMMEDIATE``, waiting only
  in SQLite's busy handler, or behind an ``fcntl.flock`` of a lock file.

Rows are the store's own JSON (``harness.fill.ACCOUNT``, ``ENTRY``): as long as
the store's, and they read back as its accounts and entries.
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
import threading
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from creditmeter import Account, BalanceConfig, BalanceManager, EntryKind, LedgerEntry, open_store
from creditmeter._ids import new_id
from creditmeter.serde import account_from_json, account_split
from creditmeter.stores import sqlite as _sqlite_store
from harness.fill import ACCOUNT, ENTRY, entry
from harness.stores import base_url, kind_of, option, sqlite_path

USER = "user-1"
STAMP = datetime(2026, 1, 1, tzinfo=timezone.utc)  # the time in the raw rows


_SQLITE_INSERT: str = _sqlite_store._INSERT_ENTRY  # the raw floor writes the store's own row
_SQLITE_TYPED = _sqlite_store._typed(entry(USER, Decimal(-1), Decimal(0)))


def seed(url: str, config: BalanceConfig) -> None:
    """Open ``USER``'s account through the store, as its first ``balance()`` would."""
    with open_store(url) as store:
        BalanceManager(store, config).account(USER)


class Raw:
    """Charges of 1 to ``USER`` by hand; ``charge()`` returns its retries or waits."""

    def __init__(self, variant: str, tag: str) -> None:
        self.variant = variant
        self.ids = (f"{tag}-{n:x}" for n in itertools.count())
        self.version = 0
        self.balance = 0

    def rows(self) -> tuple[int, int, str, str, str]:
        """The next version and balance, and the account, entry id and entry rows."""
        version, balance, entry_id = self.version + 1, self.balance - 1, next(self.ids)
        account = ACCOUNT.format(user=USER, balance=balance, version=version)
        entry = ENTRY.format(id=entry_id, user=USER, balance=balance)
        return version, balance, account, entry_id, entry

    def charge(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        """Let go of the connection."""


class _Memory(Raw):
    def __init__(self) -> None:
        super().__init__("floor", "")
        self.lock = threading.Lock()
        self.balances = {USER: 0}

    def charge(self) -> int:
        with self.lock:
            self.balances[USER] -= 1
        return 0


class _Records(Raw):
    def __init__(self) -> None:
        super().__init__("records", "")
        self.lock = threading.Lock()
        now = datetime.now(timezone.utc)
        self.accounts = {
            USER: Account(
                user_id=USER,
                balance=Decimal(0),
                version=1,
                created_at=now,
                updated_at=now,
                last_refill=now,
            )
        }
        self.ledger: list[LedgerEntry] = []

    def charge(self) -> int:
        with self.lock:
            account, now, cost = self.accounts[USER], datetime.now(timezone.utc), Decimal(1)
            balance = account.balance - cost
            self.ledger.append(
                LedgerEntry(
                    id=new_id(),
                    user_id=USER,
                    kind=EntryKind.CHARGE,
                    amount=-cost,
                    balance_after=balance,
                    at=now,
                    cost=cost,
                )
            )
            self.accounts[USER] = Account(
                user_id=USER,
                balance=balance,
                version=account.version + 1,
                created_at=account.created_at,
                updated_at=now,
                last_refill=account.last_refill,
            )
        return 0


class _SQLite(Raw):
    SELECT = "SELECT version, data FROM creditmeter_accounts WHERE user_id = ?"
    UPDATE = (
        "UPDATE creditmeter_accounts SET version = ?, data = ? WHERE user_id = ? AND version = ?"
    )
    # The store's own insert: its typed columns too (issue 15), filled with a charge of 1's.
    INSERT = _SQLITE_INSERT

    def __init__(self, url: str, variant: str, tag: str) -> None:
        super().__init__(variant, tag)
        path = sqlite_path(url)
        self.conn = sqlite3.connect(path, isolation_level=None, timeout=30)
        self.conn.execute("PRAGMA busy_timeout = 30000")  # the store's default wait
        sync = "FULL" if option(url, "durability") != "normal" else "NORMAL"
        self.conn.execute(f"PRAGMA synchronous = {sync}")
        self.lock = os.open(path + ".rawlock", os.O_RDWR | os.O_CREAT, 0o600)
        self.read()

    def read(self) -> None:
        version, data = self.conn.execute(self.SELECT, (USER,)).fetchone()
        self.version, self.balance = version, int(Decimal(json.loads(data)["balance"]))

    def write(self) -> bool:
        version, balance, account, _, entry = self.rows()
        execute = self.conn.execute
        if execute(self.UPDATE, (version, account, USER, self.version)).rowcount != 1:
            return False
        execute(self.INSERT, (USER, None, entry, *_SQLITE_TYPED))
        execute("COMMIT")
        self.version, self.balance = version, balance
        return True

    def charge(self) -> int:
        if self.variant == "floor":
            self.conn.execute("BEGIN IMMEDIATE")
            if not self.write():
                raise RuntimeError("the raw SQLite floor lost a compare-and-set alone")
            return 0
        import fcntl  # noqa: PLC0415 - not on Windows

        busy = 0
        while True:
            if self.variant == "flock":
                fcntl.flock(self.lock, fcntl.LOCK_EX)
            try:
                self.conn.execute("BEGIN IMMEDIATE")  # waits only in SQLite's busy handler
                self.read()
                if not self.write():
                    raise RuntimeError("compare-and-set lost inside BEGIN IMMEDIATE")
            except sqlite3.OperationalError:  # busy_timeout ran out
                busy += 1
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
            else:
                return busy
            finally:
                if self.variant == "flock":
                    fcntl.flock(self.lock, fcntl.LOCK_UN)

    def close(self) -> None:
        self.conn.close()
        os.close(self.lock)


class _Redis(Raw):
    def __init__(self, url: str, variant: str, tag: str) -> None:
        from creditmeter.stores import redis as module  # noqa: PLC0415

        super().__init__(variant, tag)
        self.store = open_store(url)
        self.client = self.store.client  # type: ignore[attr-defined]
        self.layout = self.store._layout  # type: ignore[attr-defined]
        self.user_keys = self.layout.keys(USER)
        self.shas = {
            name: self.client.script_load(getattr(module, f"{name.upper()}_SCRIPT"))
            for name in ("commit", "acquire", "recheck")
        }
        account = self.store.load(USER)
        assert account is not None
        self.version, self.balance = account.version, int(account.balance)
        # KEYS and ARGV as the store builds them; each charge fills in its own values:
        # ARGV 1-4 expected version, version, account, commit token; 6 lock token; 9 entry.
        charge = entry(USER, Decimal(-1), account.balance)
        self.keys, self.args = self.layout.commit_call(account, [charge], account.version)
        if variant == "delta":
            self.shas["delta"] = self.client.script_load(module.DELTA_SCRIPT)
            # ARGV 8 commit token, 13 the entry's text before its balance_after.
            self.delta_keys, self.delta_args = self.layout.delta_call(account, charge, None)

    def commit(self, token: bytes = b"") -> Any:
        version, balance, account, entry_id, entry = self.rows()
        args = self.args
        args[0], args[1] = b"%d" % self.version, b"%d" % version
        args[2], args[3], args[5] = account.encode(), entry_id.encode(), token
        args[8] = entry.encode()
        reply = self.client.evalsha(self.shas["commit"], len(self.keys), *self.keys, *args)
        if reply == 0:
            self.version, self.balance = version, balance
        return reply

    def take(self, reply: Any) -> None:
        data = json.loads(reply[1])
        self.version, self.balance = data["version"], int(Decimal(data["balance"]))

    def add(self) -> bool:
        """One delta: 1 credit off the stored balance, whatever version it is."""
        entry_id = next(self.ids)
        args = self.delta_args
        args[7] = new_id().encode()
        args[12] = ENTRY.format(id=entry_id, user=USER, balance="\x00").split("\x00")[0].encode()
        keys = self.delta_keys
        reply = self.client.evalsha(self.shas["delta"], len(keys), *keys, *args)
        return isinstance(reply, list) and reply[0] == 0

    def charge(self) -> int:
        if self.variant == "delta":
            if not self.add():
                raise RuntimeError("the raw Redis delta was refused")
            return 0
        if self.variant != "turn":
            lost = 0
            while (reply := self.commit()) != 0:
                if self.variant == "floor":
                    raise RuntimeError("the raw Redis floor lost a compare-and-set alone")
                lost += 1
                self.take(reply)
            return lost
        token = next(self.ids).encode()
        keys, args = self.layout.acquire_call(self.user_keys, token)
        reply = self.client.evalsha(self.shas["acquire"], len(keys), *keys, *args)
        waited = 0
        while reply[0] != 1:
            waited = 1
            popped = self.client.blpop([self.user_keys.wake + token], timeout=0.25)
            if popped is not None:
                reply = [1, popped[1]]
                break
            keys, args = self.layout.recheck_call(self.user_keys, token)
            reply = self.client.evalsha(self.shas["recheck"], len(keys), *keys, *args)
        self.take(reply)
        if self.commit(token) != 0:
            raise RuntimeError("a commit under the lock lost")
        return waited

    def close(self) -> None:
        self.store.close()


class _Postgres(Raw):
    def __init__(self, url: str, variant: str, tag: str) -> None:
        import psycopg  # noqa: PLC0415

        from creditmeter.stores.postgres import _Statements  # noqa: PLC0415

        super().__init__(variant, tag)
        statements = _Statements(option(url, "prefix"), None)  # the store's own statements
        self.update = statements.commit(new=False, entries=1)
        self.update_unlock = statements.commit(new=False, entries=1, release=True)
        self.select = statements.load
        self.key = statements.lock_key(USER)
        self.delta = statements.delta(floor=False)
        self.conn = psycopg.connect(base_url(url), autocommit=True)
        self.load()
        if variant == "delta":
            (text,) = self.conn.execute(self.select, (USER,)).fetchone()  # type: ignore[misc]
            self.pieces = account_split(account_from_json(text))

    def load(self) -> None:
        (text,) = self.conn.execute(self.select, (USER,)).fetchone()  # type: ignore[misc]
        data = json.loads(text)
        self.version, self.balance = data["version"], int(Decimal(data["balance"]))

    def attempt(self, *, unlock: bool = False) -> bool:
        """One compare-and-set from the account last seen; ``unlock`` also frees the lock."""
        version, balance, account, entry_id, entry = self.rows()
        params = [
            version, Decimal(balance), STAMP, STAMP, account, USER, self.version, self.key,
            entry_id, "charge", Decimal(-1), Decimal(balance), Decimal(1), STAMP, None, None,
            None, None, None, None,  # no usage: the token columns
            entry, USER, *([self.key] if unlock else []),
        ]  # fmt: skip
        row = self.conn.execute(self.update_unlock if unlock else self.update, params).fetchone()
        if row[0]:  # type: ignore[index]
            self.version, self.balance = version, balance
            return True
        if row[1] is None:  # type: ignore[index]
            self.load()
        else:
            data = json.loads(row[1])  # type: ignore[index]
            self.version, self.balance = data["version"], int(Decimal(data["balance"]))
        return False

    def add(self) -> bool:
        """One delta: 1 credit off the stored balance, whatever version it is."""
        a, b, c, updated, d = self.pieces
        entry_id = next(self.ids)
        ea, eb = ENTRY.format(id=entry_id, user=USER, balance="\x00").split("\x00")
        params = {
            "user": USER, "amount": Decimal(-1), "updated": STAMP, "floor": None,
            "a": a, "b": b, "c": c, "d": d, "updated_text": updated, "key": self.key,
            "id": entry_id, "kind": "charge", "cost": Decimal(1), "at": STAMP, "request": None,
            "model": None, "input": None, "output": None, "cache_write": None, "cache_read": None,
            "ea": ea, "eb": eb,
        }  # fmt: skip
        row = self.conn.execute(self.delta, params).fetchone()
        return row is not None and row[1] is not None

    def charge(self) -> int:
        if self.variant == "delta":
            if not self.add():
                raise RuntimeError("the raw PostgreSQL delta was refused")
            return 0
        if self.variant == "turn":
            self.conn.execute(b"SELECT pg_advisory_lock(%s)", (self.key,))
            self.load()
            if self.attempt(unlock=True):
                return 0
            self.conn.execute(b"SELECT pg_advisory_unlock(%s)", (self.key,))
            return 1
        lost = 0
        while not self.attempt():
            if self.variant == "floor":
                raise RuntimeError("the raw PostgreSQL floor lost a compare-and-set alone")
            lost += 1
        return lost

    def close(self) -> None:
        self.conn.close()


def raw(url: str, variant: str = "floor", tag: str = "raw") -> Raw:
    """Raw charges of ``variant`` on the (seeded) ``USER`` of the store at ``url``."""
    kind = kind_of(url)
    if kind == "memory":
        return _Records() if variant == "records" else _Memory()
    if kind.startswith("sqlite"):
        return _SQLite(url, variant, tag)
    return (_Redis if kind == "redis" else _Postgres)(url, variant, tag)
