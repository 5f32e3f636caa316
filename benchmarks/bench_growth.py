"""Growth: does a charge cost more as a store fills with accounts and ledger rows?

Issue 9 asks for charge latency with 1, 10,000 and 1,000,000 accounts in the
store and with 1,000,000 ledger rows in SQLite, and for the cost not to grow
with either. For every store (MemoryStore, SQLiteStore, RedisStore,
PostgresStore) this module fills one store step by step to each size and
times, at each size:

- ``charge(user, 1)`` on one user (the manager remembers the account, so a
  charge is one commit);
- ``charge(user, 1)`` on a random existing user, spread over every account,
  the manager's remembered copy of that account dropped just before, so every
  charge loads the account and commits it: the store's read and write both
  land on a random row, page or key;
- the same random draw with the manager's remembered accounts left alone, as
  a gateway runs it (a figure, not judged: see the notes it prints);
- the first charge of a new user (opening the account and charging it).

At the largest size the same series run on a second store of the same kind
holding one account, interleaved round by round with the full store, and the
verdict compares the two batch by batch (the median over rounds of the
per-round ratio), so a slow spell of the shared machine slows both alike.

Accounts are filled in bulk with each store's own layout and serialisation
(``creditmeter.serde``): the account JSON and the opening ledger entry that
a first ``balance()`` would write, through ``executemany`` (SQLite), ``COPY``
(PostgreSQL), pipelined ``HSET``/``RPUSH``/``SADD`` (Redis) and the store's
dicts (MemoryStore). Each fill is checked with ``store.load``,
``manager.balance`` and ``store.ledger`` on accounts it wrote, and by
counting the stored accounts.

A second SQLite section holds 1,000 accounts and fills the ledger to
1,000,000 rows (1,000 entries per account, interleaved across accounts as
real charges would be), against a file with the same accounts and 1,000
rows: the same charges, and ``store.ledger(user)`` of a user with 5 entries.

Redis keys live under a fresh random prefix in database 15 and are deleted
afterwards (SCAN + UNLINK of that prefix only); PostgreSQL tables get a
fresh prefix and are dropped afterwards. A store whose server cannot be
reached is reported as such.

Run from the repository root::

    benchmarks/.venv/bin/python benchmarks/bench_growth.py --quick
    benchmarks/.venv/bin/python benchmarks/bench_growth.py --output growth.md
"""

from __future__ import annotations

import argparse
import functools
import gc
import itertools
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import common
from common import Section, Target, fmt, table

from creditmeter import BalanceConfig, BalanceManager, MemoryStore, SQLiteStore
from creditmeter._ids import new_id
from creditmeter.models import Account, EntryKind, LedgerEntry
from creditmeter.serde import account_to_json, entry_to_json
from creditmeter.stores.memory import _pack
from creditmeter.stores.sqlite import _LEDGER

RATIO = 1.25
SLACK_US = 5.0
START = Decimal(1_000_000_000)
ONE = Decimal(1)
NOW = datetime.now(timezone.utc)
CONFIG = BalanceConfig(enabled=True, start_balance=START)
CHUNK = 50_000
LEDGER_ACCOUNTS = 1_000
LIGHT_USER = "light-user"


@dataclass(frozen=True)
class Plan:
    """How much work a run does."""

    levels: tuple[int, ...]
    ledger_rows: int
    repeats: int
    ops: dict[str, int]


QUICK = Plan(
    levels=(1, 10_000, 50_000),
    ledger_rows=50_000,
    repeats=5,
    ops={"memory": 300, "sqlite": 60, "redis": 30, "postgres": 30},
)
FULL = Plan(
    levels=(1, 10_000, 1_000_000),
    ledger_rows=1_000_000,
    repeats=15,
    ops={"memory": 2_000, "sqlite": 300, "redis": 200, "postgres": 150},
)

SERIES = {
    "one": "one user",
    "random": "random user, load + commit",
    "gateway": "random user, manager cache on",
    "new": "new user",
    "ledger": f"ledger read ({LIGHT_USER}, 5 entries)",
}
JUDGED = ("one", "random", "new")


def accounts_text(count: int) -> str:
    return f"{count:,} account" + ("" if count == 1 else "s")


def log(message: str) -> None:
    print(f"[growth] {message}", file=sys.stderr, flush=True)


# --- accounts as a first balance() writes them ----------------------------------------


def uid(index: int) -> str:
    """A 24-hex user id (the shape of LibreChat's MongoDB ids), spread over the key space.

    The first 8 digits are a bijective hash of the index, so consecutive
    indices land far apart in every B-tree and hash table; the rest is the
    index itself.
    """
    return f"{index * 2654435761 % 2**32:08x}{index:016x}"


def opened(user_id: str) -> tuple[Account, LedgerEntry]:
    """An account as its first ``balance()`` leaves it, with its opening entry."""
    account = Account(
        user_id=user_id,
        balance=START,
        version=1,
        created_at=NOW,
        updated_at=NOW,
        last_refill=NOW,
    )
    entry = LedgerEntry(
        id=new_id(),
        user_id=user_id,
        kind=EntryKind.OPEN,
        amount=START,
        balance_after=START,
        at=NOW,
    )
    return account, entry


def charged(user_id: str, number: int) -> LedgerEntry:
    """The ``number``-th charge of 1 after the opening entry."""
    return LedgerEntry(
        id=new_id(),
        user_id=user_id,
        kind=EntryKind.CHARGE,
        amount=-ONE,
        balance_after=START - number,
        at=NOW,
        cost=ONE,
    )


def after_charges(user_id: str, charges: int) -> Account:
    """The account after its opening entry and ``charges`` charges of 1."""
    return Account(
        user_id=user_id,
        balance=START - charges,
        version=1 + charges,
        created_at=NOW,
        updated_at=NOW,
        last_refill=NOW,
    )


def chunks(indices: range, size: int = CHUNK) -> Iterator[list[str]]:
    """User ids of ``indices`` in chunks, each sorted (B-tree inserts in key order)."""
    for start in range(indices.start, indices.stop, size):
        yield sorted(uid(i) for i in range(start, min(start + size, indices.stop)))


# --- one store under test -------------------------------------------------------------


@dataclass
class Tally:
    """What the series did to one store file or key space, for the checks at the end."""

    created: int = 0  # accounts opened by the new-user series
    user0_charges: int = 0  # charges of 1 to uid(0), by any series


class Subject:
    """One store with accounts ``uid(0..filled-1)``, and the one manager that charges it."""

    def __init__(
        self,
        label: str,
        store: Any,
        *,
        series: tuple[str, ...],
        fill: Callable[[range], None] | None = None,
        count: Callable[[], int] | None = None,
        tally: Tally | None = None,
        filled: int = 0,
    ) -> None:
        self.label = label
        self.store = store
        self.series = series
        self._fill = fill
        self._count = count
        self.tally = tally or Tally()
        self.filled = filled
        self.base_charges = 0  # charges of uid(0) written by a fill
        self.manager = BalanceManager(store, CONFIG)

    def fill_to(self, count: int) -> float:
        """Add accounts up to ``count``; return the seconds it took."""
        added = range(self.filled, count)
        start = time.perf_counter()
        if added and self._fill is not None:
            self._fill(added)
        self.filled = max(self.filled, count)
        return time.perf_counter() - start

    def verify(self, added: range) -> str:
        """Check accounts the last fill wrote, and count the accounts; describe it."""
        picker = random.Random(added.start)
        checker = BalanceManager(self.store, CONFIG)
        sample = sorted({added.start, added.stop - 1} | {picker.choice(added) for _ in range(3)})
        for index in sample:
            user = uid(index)
            account = self.store.load(user)
            if account is None or account.version != 1 or account.balance != START:
                raise RuntimeError(f"{self.label}: filled account {user} reads back as {account}")
            if checker.balance(user) != START:
                raise RuntimeError(f"{self.label}: balance({user}) is not the filled balance")
            entries = self.store.ledger(user)
            if [(e.kind, e.amount) for e in entries] != [(EntryKind.OPEN, START)]:
                raise RuntimeError(f"{self.label}: ledger({user}) is {entries}")
        expected = self.filled + self.tally.created
        counted = self._count() if self._count is not None else expected
        if counted != expected:
            raise RuntimeError(f"{self.label}: {counted:,} accounts stored, {expected:,} expected")
        return f"{accounts_text(counted)} counted; {len(sample)} sampled: load, balance, ledger ok"

    def calls(
        self, picks: list[str], latencies: dict[str, list[int]]
    ) -> dict[str, Callable[[], None]]:
        """The timed callables over existing users, each recording its op's latency.

        All use the subject's one manager, as a process would: two managers
        charging one user would make each other lose compare-and-sets.
        """
        now_ns = common.now_ns
        tally = self.tally
        user0 = uid(0)
        charge = self.manager.charge
        seen = self.manager._seen
        cold_users = itertools.cycle(picks)
        gateway_users = itertools.cycle(picks[::-1])
        read = self.store.ledger
        one_lat, cold_lat, gateway_lat, read_lat = (
            latencies[name] for name in ("one", "random", "gateway", "ledger")
        )

        def one() -> None:
            start = now_ns()
            charge(user0, 1)
            one_lat.append(now_ns() - start)
            tally.user0_charges += 1

        def cold_random() -> None:
            user = next(cold_users)
            seen.pop(user, None)  # forget the account: this charge loads it, then commits
            start = now_ns()
            charge(user, 1)
            cold_lat.append(now_ns() - start)
            if user == user0:
                tally.user0_charges += 1

        def gateway_random() -> None:
            user = next(gateway_users)
            start = now_ns()
            charge(user, 1)
            gateway_lat.append(now_ns() - start)
            if user == user0:
                tally.user0_charges += 1

        def ledger_read() -> None:
            start = now_ns()
            read(LIGHT_USER)
            read_lat.append(now_ns() - start)

        every = {"one": one, "random": cold_random, "gateway": gateway_random}
        every["ledger"] = ledger_read
        return {name: call for name, call in every.items() if name in self.series}

    def new_call(self, latencies: list[int]) -> Callable[[], None]:
        """The timed callable of the new-user series."""
        now_ns = common.now_ns
        tally = self.tally
        charge = self.manager.charge
        seen = self.manager._seen

        def new() -> None:
            user = uid(next(_fresh_users))
            start = now_ns()
            charge(user, 1)
            latencies.append(now_ns() - start)
            seen.pop(user, None)  # leave the remembered accounts as the other series left them
            tally.created += 1

        return new

    def check_user0(self) -> str:
        """Every charge of uid(0) must show in its balance, exactly."""
        balance = BalanceManager(self.store, CONFIG).balance(uid(0))
        expected = START - self.base_charges - self.tally.user0_charges
        if balance != expected:
            raise RuntimeError(f"{self.label}: {uid(0)} holds {balance}, expected {expected}")
        lost = len(self.manager._hot)  # users whose compare-and-set this manager lost
        return (
            f"{self.tally.user0_charges:,} charges of {uid(0)}: its balance is exact; "
            f"users with a lost compare-and-set: {lost}"
        )


_fresh_users = itertools.count(2**40)  # indices of new users: never a filled one


@dataclass
class Stats:
    """One series at one point: µs/op of each batch (in round order), per-op p50 and p99."""

    batches: list[float]
    p50: float
    p99: float
    ops: int

    @property
    def median(self) -> float:
        return statistics.median(self.batches)

    def as_dict(self) -> dict[str, Any]:
        return {
            "median_us": self.median,
            "p50_us": self.p50,
            "p99_us": self.p99,
            "ops": self.ops,
            "batches_us": self.batches,
        }


def measure(subjects: list[Subject], plan: Plan, kind: str) -> dict[str, dict[str, Stats]]:
    """Time every subject's series, interleaved round by round: label -> series -> Stats.

    The series over existing accounts run first, then the new-user series:
    while the first run, a store holds exactly the accounts it was filled
    with.
    """
    ops = plan.ops[kind]
    warmup = max(1, ops // 5)
    draws = ops * plan.repeats + warmup
    picker = random.Random(sum(subject.filled for subject in subjects))
    latencies: dict[str, list[int]] = {}
    existing: dict[str, Callable[[], object]] = {}
    fresh: dict[str, Callable[[], object]] = {}
    for subject in subjects:
        picks = [uid(picker.randrange(subject.filled)) for _ in range(draws)]
        per = {name: latencies.setdefault(f"{subject.label}|{name}", []) for name in SERIES}
        for name, call in subject.calls(picks, per).items():
            existing[f"{subject.label}|{name}"] = call
        if "new" in subject.series:
            fresh[f"{subject.label}|new"] = subject.new_call(per["new"])
    results: dict[str, common.Series] = {}
    for group in (existing, fresh):
        if not group:
            continue
        for timed in group.values():
            for _ in range(warmup):
                timed()
        for key in group:
            latencies[key].clear()
        results.update(common.interleaved(group, ops=ops, repeats=plan.repeats, warmup=0))
    out: dict[str, dict[str, Stats]] = {}
    for key, series in results.items():
        label, name = key.split("|")
        lat = latencies[key]
        out.setdefault(label, {})[name] = Stats(
            batches=series.per_op_us,
            p50=common.percentile(lat, 50) / 1000,
            p99=common.percentile(lat, 99) / 1000,
            ops=len(lat),
        )
    return out


# --- filling each store ------------------------------------------------------------------


def fill_memory(store: MemoryStore, added: range) -> None:
    """Accounts and their packed opening entries straight into MemoryStore's dicts."""
    accounts = store._accounts
    ledgers = store._ledgers
    with store._lock:
        for index in added:
            account, entry = opened(uid(index))
            accounts[account.user_id] = account
            ledgers[account.user_id] = [_pack(entry)]


_INSERT_ACCOUNT = "INSERT INTO creditmeter_accounts (user_id, version, data) VALUES (?, ?, ?)"
_INSERT_ENTRY = "INSERT INTO creditmeter_ledger (user_id, request_id, data) VALUES (?, ?, ?)"


def _fill_connection(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA synchronous = OFF")  # the fill only; the store keeps its own setting
    conn.execute("PRAGMA cache_size = -262144")
    return conn


def fill_sqlite(store: SQLiteStore, added: range) -> None:
    """``executemany`` into the store's tables, a transaction per chunk, under its writer lock."""
    conn = _fill_connection(store.path)
    try:
        with store.exclusive(""):
            for users in chunks(added):
                pairs = [opened(user) for user in users]
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(
                    _INSERT_ACCOUNT, [(a.user_id, a.version, account_to_json(a)) for a, _ in pairs]
                )
                conn.executemany(
                    _INSERT_ENTRY, [(e.user_id, e.request_id, entry_to_json(e)) for _, e in pairs]
                )
                conn.execute("COMMIT")
            # Leave no long WAL behind: the first timed commits would checkpoint it.
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def fill_sqlite_ledger(store: SQLiteStore, users: list[str], per_user: int) -> None:
    """Give each user ``per_user - 1`` charges of 1, interleaved across users as they come."""
    conn = _fill_connection(store.path)
    try:
        with store.exclusive(""):
            conn.execute("BEGIN IMMEDIATE")
            for number in range(1, per_user):
                conn.executemany(
                    _INSERT_ENTRY, [(u, None, entry_to_json(charged(u, number))) for u in users]
                )
            conn.executemany(
                "UPDATE creditmeter_accounts SET version = ?, data = ? WHERE user_id = ?",
                [(per_user, account_to_json(after_charges(u, per_user - 1)), u) for u in users],
            )
            conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def sqlite_count(path: str, what: str = "creditmeter_accounts") -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute(f"SELECT count(*) FROM {what}").fetchone()[0])
    finally:
        conn.close()


def sqlite_plan(path: str) -> str:
    """The plan SQLite picks for the store's ledger read (its own statement)."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("EXPLAIN QUERY PLAN " + _LEDGER, (LIGHT_USER,)).fetchall()
    finally:
        conn.close()
    return "; ".join(str(row[-1]) for row in rows)


def _resp(*parts: bytes) -> bytes:
    """One Redis command in the wire protocol (RESP)."""
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


def fill_redis(store: Any, added: range) -> None:
    """HSET (v, d, t) and RPUSH per user and one SADD per chunk, pipelined, in the store's keys.

    The commands are written in RESP by hand and sent down one of the
    store's connections; redis-py's own pipeline spends ~30 µs a user
    packing and parsing, which would make a million accounts a minute.
    """
    layout = store._layout
    pool = store.client.connection_pool
    conn = pool.get_connection()
    try:
        for users in chunks(added, 5_000):
            commands = []
            for user in users:
                account, entry = opened(user)
                keys = layout.keys(user)
                commands.append(
                    _resp(
                        b"HSET",
                        keys.account,
                        b"v",
                        b"%d" % account.version,
                        b"d",
                        account_to_json(account).encode(),
                        b"t",
                        new_id().encode(),
                    )
                )
                commands.append(_resp(b"RPUSH", keys.ledger, entry_to_json(entry).encode()))
            commands.append(_resp(b"SADD", layout.users_key, *(u.encode() for u in users)))
            conn.send_packed_command([b"".join(commands)])
            for _ in commands:
                reply = conn.read_response()
                if isinstance(reply, Exception):
                    raise reply
    finally:
        pool.release(conn)


def drop_redis_keys(url: str, prefix: str) -> int:
    """UNLINK every key under ``prefix`` (SCAN MATCH; never FLUSHDB); return how many."""
    import redis  # noqa: PLC0415 - only when Redis is benchmarked

    dropped = 0
    with redis.Redis.from_url(url) as client:
        batch: list[bytes] = []
        for key in client.scan_iter(match=prefix + "*", count=10_000):
            batch.append(key)
            if len(batch) >= 10_000:
                dropped += client.unlink(*batch)
                batch = []
        if batch:
            dropped += client.unlink(*batch)
    return dropped


def _copy_value(value: object) -> str:
    """A value in COPY's text format: ``\\N`` for NULL, backslashes doubled.

    Every value here is a hex id, a number, an ISO time or serde's JSON, which
    escapes tabs and newlines itself: only backslashes need escaping.
    """
    return "\\N" if value is None else str(value).replace("\\", "\\\\")


@functools.cache
def _iso(value: datetime) -> str:
    return value.isoformat()


def fill_postgres(dsn: str, prefix: str, added: range) -> None:
    """COPY into the store's tables (typed columns and JSON), a transaction per chunk."""
    import psycopg  # noqa: PLC0415 - only when PostgreSQL is benchmarked
    from psycopg import sql  # noqa: PLC0415

    accounts = sql.SQL(
        "COPY {} (user_id, version, balance, created_at, updated_at, last_refill, data) FROM STDIN"
    ).format(sql.Identifier(prefix + "accounts"))
    ledger = sql.SQL(
        "COPY {} (id, user_id, kind, amount, balance_after, cost, at, request_id, model, data) "
        "FROM STDIN"
    ).format(sql.Identifier(prefix + "ledger"))
    with psycopg.connect(dsn) as conn:
        for users in chunks(added):
            pairs = [opened(user) for user in users]
            account_rows = "".join(
                f"{a.user_id}\t{a.version}\t{a.balance}\t{_iso(a.created_at)}\t"
                f"{_iso(a.updated_at)}\t{_iso(a.last_refill)}\t"
                f"{_copy_value(account_to_json(a))}\n"
                for a, _ in pairs
            )
            entry_rows = "".join(
                f"{e.id}\t{e.user_id}\t{e.kind.value}\t{e.amount}\t{e.balance_after}\t"
                f"{_copy_value(e.cost)}\t{_iso(e.at)}\t{_copy_value(e.request_id)}\t"
                f"{_copy_value(e.model)}\t{_copy_value(entry_to_json(e))}\n"
                for _, e in pairs
            )
            with conn.cursor() as cursor:
                with cursor.copy(accounts) as copy:
                    copy.write(account_rows)
                with cursor.copy(ledger) as copy:
                    copy.write(entry_rows)
            conn.commit()
    if len(added) > 1:
        settle_postgres(dsn, prefix)


def settle_postgres(dsn: str, prefix: str) -> None:
    """VACUUM ANALYZE the filled tables and CHECKPOINT, as autovacuum would have by now.

    Without it the first read of each freshly copied row sets its hint bits
    (a write), the planner has no statistics, and the fill's dirty pages are
    flushed while the charges are timed.
    """
    import psycopg  # noqa: PLC0415
    from psycopg import sql  # noqa: PLC0415

    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in ("accounts", "ledger"):
            conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(sql.Identifier(prefix + name)))
        conn.execute("CHECKPOINT")


def postgres_count(dsn: str, prefix: str) -> int:
    import psycopg  # noqa: PLC0415
    from psycopg import sql  # noqa: PLC0415

    with psycopg.connect(dsn) as conn:
        query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(prefix + "accounts"))
        row = conn.execute(query).fetchone()
    return int(row[0]) if row else -1


def postgres_plan(dsn: str, prefix: str) -> str:
    """The plan PostgreSQL picks for the store's ledger read of one user."""
    import psycopg  # noqa: PLC0415
    from psycopg import sql  # noqa: PLC0415

    query = sql.SQL("EXPLAIN SELECT data FROM {} WHERE user_id = %s ORDER BY seq").format(
        sql.Identifier(prefix + "ledger")
    )
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(query, (uid(1),)).fetchall()
    return "; ".join(str(row[0]).strip() for row in rows)


def drop_postgres(dsn: str, prefixes: list[str]) -> None:
    import psycopg  # noqa: PLC0415
    from psycopg import sql  # noqa: PLC0415

    with psycopg.connect(dsn, autocommit=True) as conn:
        for prefix in prefixes:
            names = sql.SQL(", ").join(
                sql.Identifier(prefix + name) for name in ("accounts", "ledger", "meta")
            )
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(names))


def unreachable(kind: str) -> str | None:
    """``None`` if the store's server answers, else why not."""
    try:
        if kind == "redis":
            import redis  # noqa: PLC0415

            with redis.Redis.from_url(common.REDIS_URL, socket_connect_timeout=3) as client:
                client.ping()
        elif kind == "postgres":
            import psycopg  # noqa: PLC0415

            with psycopg.connect(common.POSTGRES_URL, connect_timeout=3) as conn:
                conn.execute("SELECT 1")
    except Exception as exc:  # an import, a refused connection, authentication: all say why
        lines = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return None


# --- the kinds of store ----------------------------------------------------------------------


class Kit:
    """How to open, fill, count and clean up one kind of store."""

    name = ""
    kind = ""

    def make(self, label: str) -> Subject:
        raise NotImplementedError

    def after_fill(self, subject: Subject) -> str | None:  # noqa: ARG002 - an override hook
        """A note on the store once filled to a level, if the kind has one."""
        return None

    def extra(self, subjects: list[Subject]) -> list[Subject]:  # noqa: ARG002 - an override hook
        """More subjects for the largest level (SQLite: the same files at durability full)."""
        return []

    def cleanup(self) -> list[str]:
        """Remove what the run left; notes to report."""
        return []


EXISTING = ("one", "random", "gateway", "new")


class MemoryKit(Kit):
    name = "MemoryStore"
    kind = "memory"

    def make(self, label: str) -> Subject:
        store = MemoryStore()
        return Subject(
            label,
            store,
            series=EXISTING,
            fill=lambda added: fill_memory(store, added),
            count=lambda: len(store._accounts),
        )

    def after_fill(self, subject: Subject) -> str | None:
        start = time.perf_counter()
        gc.collect()
        pause = (time.perf_counter() - start) * 1000
        return (
            f"{accounts_text(subject.filled)}: a full garbage collection (`gc.collect()`) takes "
            f"{fmt(pause)} ms, {len(gc.get_objects()):,} objects tracked"
        )


class SQLiteKit(Kit):
    name = "SQLiteStore (normal)"
    kind = "sqlite"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.paths: list[Path] = []

    def make(self, label: str) -> Subject:
        path = self.folder / f"growth-{label}.db"
        self.paths.append(path)
        store = SQLiteStore(path, durability="normal")
        return Subject(
            label,
            store,
            series=EXISTING,
            fill=lambda added: fill_sqlite(store, added),
            count=lambda: sqlite_count(str(path)),
        )

    def extra(self, subjects: list[Subject]) -> list[Subject]:
        full = []
        for subject in subjects:
            store = SQLiteStore(subject.store.path, durability="full")
            full.append(
                Subject(
                    f"{subject.label}-full",
                    store,
                    series=("one", "random", "new"),
                    tally=subject.tally,
                    filled=subject.filled,
                )
            )
        return full

    def cleanup(self) -> list[str]:
        sizes = []
        for path in self.paths:
            if path.exists():
                sizes.append(f"{path.name} {path.stat().st_size / 2**20:,.0f} MiB")
            for suffix in ("", "-wal", "-shm", ".lock"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        return [f"files (removed afterwards): {', '.join(sizes)}"] if sizes else []


class RedisKit(Kit):
    name = "RedisStore"
    kind = "redis"

    def __init__(self) -> None:
        self.base = f"cmgrowth:{uuid.uuid4().hex[:10]}:"

    def make(self, label: str) -> Subject:
        from creditmeter.stores.redis import RedisStore  # noqa: PLC0415

        store = RedisStore(common.REDIS_URL, prefix=f"{self.base}{label}:")
        users_key = store._layout.users_key
        return Subject(
            label,
            store,
            series=EXISTING,
            fill=lambda added: fill_redis(store, added),
            count=lambda: int(store.client.scard(users_key)),
        )

    def after_fill(self, subject: Subject) -> str | None:
        used = subject.store.client.info("memory")["used_memory"] / 2**20
        return (
            f"{accounts_text(subject.filled)}: server used_memory {used:,.0f} MiB "
            "(the whole server, other users' keys included)"
        )

    def cleanup(self) -> list[str]:
        dropped = drop_redis_keys(common.REDIS_URL, self.base)
        return [f"key prefix `{self.base}`: {dropped:,} keys unlinked afterwards (SCAN MATCH)"]


class PostgresKit(Kit):
    name = "PostgresStore"
    kind = "postgres"

    def __init__(self) -> None:
        self.base = f"cmgrowth_{uuid.uuid4().hex[:10]}_"
        self.prefixes: list[str] = []
        self.plan = ""

    def make(self, label: str) -> Subject:
        from creditmeter.stores.postgres import PostgresStore  # noqa: PLC0415

        dsn = common.POSTGRES_URL
        prefix = f"{self.base}{label}_"
        self.prefixes.append(prefix)
        store = PostgresStore(dsn, prefix=prefix)

        def fill(added: range) -> None:
            fill_postgres(dsn, prefix, added)
            if label == "big":
                self.plan = postgres_plan(dsn, prefix)

        return Subject(
            label, store, series=EXISTING, fill=fill, count=lambda: postgres_count(dsn, prefix)
        )

    def cleanup(self) -> list[str]:
        drop_postgres(common.POSTGRES_URL, self.prefixes)
        notes = [f"table prefix `{self.base}`: tables dropped afterwards"]
        if self.plan:
            notes.append(f"ledger read plan after the last fill (`{uid(1)}`): `{self.plan}`")
        return notes


# --- a store's growth run ----------------------------------------------------------------


@dataclass
class Growth:
    """What one store's run measured."""

    name: str
    rows: dict[str, dict[str, Stats]] = field(default_factory=dict)  # row -> series -> Stats
    fills: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (big row, its control row)
    plan: str = ""  # the query plan of the ledger read, where shown
    error: str | None = None
    seconds: float = 0.0


def _close(subjects: list[Subject], notes: list[str]) -> None:
    for subject in subjects:
        try:
            subject.store.close()
        except Exception as exc:
            notes.append(f"closing {subject.label} failed: {type(exc).__name__}: {exc}")


def grow(kit: Kit, plan: Plan) -> Growth:
    """Fill one store level by level and time the series at each level."""
    result = Growth(kit.name)
    started = time.perf_counter()
    opened_subjects: list[Subject] = []
    try:
        big = kit.make("big")
        opened_subjects.append(big)
        for level in plan.levels:
            before = big.filled
            seconds = big.fill_to(level)
            checked = big.verify(range(before, level))
            added = level - before
            result.fills.append(
                [
                    kit.name,
                    f"{level:,}",
                    f"{added:,}",
                    fmt(seconds, 2),
                    f"{added / seconds:,.0f}" if added >= 1_000 else "-",
                    checked,
                ]
            )
            log(f"{kit.name}: {accounts_text(level)} (fill {fmt(seconds, 1)} s); timing")
            note = kit.after_fill(big)
            if note:
                result.notes.append(note)
            subjects = [big]
            if level == plan.levels[-1]:
                control = kit.make("control")
                opened_subjects.append(control)
                control.fill_to(1)
                control.verify(range(1))
                subjects.append(control)
            timing = time.perf_counter()
            measured = measure(subjects, plan, kit.kind)
            log(f"{kit.name}: timed in {fmt(time.perf_counter() - timing, 1)} s")
            if level == plan.levels[-1]:
                # After the others, not interleaved with them: another manager charging
                # the same users would make each lose compare-and-sets to the other.
                extra = kit.extra(subjects)
                opened_subjects.extend(extra)
                measured.update(measure(extra, plan, kit.kind))
            rows = {
                "big": f"{level:,}",
                "control": "1 (control, same rounds)",
                "big-full": f"{level:,}, durability full",
                "control-full": "1 (control, same rounds), durability full",
            }
            for label, series in measured.items():
                result.rows[rows[label]] = series
            for big_label in ("big", "big-full"):
                control_label = big_label.replace("big", "control")
                if level == plan.levels[-1] and {big_label, control_label} <= set(measured):
                    result.pairs.append((rows[big_label], rows[control_label]))
        result.notes += [f"{s.label}: {s.check_user0()}" for s in opened_subjects]
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        log(f"{kit.name}: failed: {result.error}")
    finally:
        _close(opened_subjects, result.notes)
        cleaning = time.perf_counter()
        try:
            result.notes += kit.cleanup()
            log(f"{kit.name}: cleaned up in {fmt(time.perf_counter() - cleaning, 1)} s")
        except Exception as exc:
            result.notes.append(f"cleanup failed: {type(exc).__name__}: {exc}")
        del opened_subjects
        gc.collect()
        result.seconds = time.perf_counter() - started
    return result


def grow_ledger(folder: Path, plan: Plan) -> Growth:
    """SQLite with 1,000 accounts: 1,000 ledger rows against ``plan.ledger_rows``, same rounds."""
    result = Growth("SQLiteStore (normal), ledger")
    started = time.perf_counter()
    per_user = plan.ledger_rows // LEDGER_ACCOUNTS
    subjects: list[Subject] = []
    paths: list[Path] = []
    try:
        for label in ("heavy", "control"):
            path = folder / f"growth-ledger-{label}.db"
            paths.append(path)
            store = SQLiteStore(path, durability="normal")
            subject = Subject(label, store, series=("one", "random", "new", "ledger"))
            subjects.append(subject)
            light = subject.manager
            light.grant(LIGHT_USER, 100)
            for _ in range(3):
                light.charge(LIGHT_USER, 1)  # 5 entries: open, grant, 3 charges
            subject.tally.created += 1
            seconds = time.perf_counter()
            fill_sqlite(store, range(LEDGER_ACCOUNTS))
            subject.filled = LEDGER_ACCOUNTS
            users = [uid(i) for i in range(LEDGER_ACCOUNTS)]
            if label == "heavy":
                fill_sqlite_ledger(store, users, per_user)
                subject.base_charges = per_user - 1
            seconds = time.perf_counter() - seconds
            rows = sqlite_count(str(path), "creditmeter_ledger")
            added = rows - 5
            sample = [users[0], users[-1], users[LEDGER_ACCOUNTS // 2]]
            for user in sample:
                entries = store.ledger(user)
                balance = BalanceManager(store, CONFIG).balance(user)
                if (
                    len(entries) != 1 + subject.base_charges
                    or sum((e.amount for e in entries), Decimal(0)) != balance
                ):
                    raise RuntimeError(f"ledger fill of {user} reads back wrong")
            if len(store.ledger(LIGHT_USER)) != 5:
                raise RuntimeError("the light user does not have 5 entries")
            result.fills.append(
                [
                    f"SQLiteStore, ledger ({label})",
                    f"{rows:,} ledger rows, {LEDGER_ACCOUNTS + 1:,} accounts",
                    f"{added:,} rows, {LEDGER_ACCOUNTS:,} accounts",
                    fmt(seconds, 2),
                    f"{added / seconds:,.0f} rows",
                    (
                        f"{len(sample)} accounts: entries and ledger sum = balance; "
                        f"{LIGHT_USER}: 5 entries"
                    ),
                ]
            )
        log(f"ledger: {plan.ledger_rows:,} rows filled; timing")
        result.plan = f"`{sqlite_plan(str(paths[0]))}`"
        result.notes.append(f"ledger read plan ({plan.ledger_rows:,} rows): {result.plan}")
        measured = measure(subjects, plan, "sqlite")
        big_row = f"{plan.ledger_rows:,} ledger rows"
        control_row = f"{LEDGER_ACCOUNTS:,} ledger rows (control, same rounds)"
        result.rows[big_row] = measured["heavy"]
        result.rows[control_row] = measured["control"]
        result.pairs.append((big_row, control_row))
        result.notes += [f"{s.label}: {s.check_user0()}" for s in subjects]
        sizes = [f"{p.name} {p.stat().st_size / 2**20:,.0f} MiB" for p in paths]
        result.notes.append(f"files (removed afterwards): {', '.join(sizes)}")
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        log(f"ledger: failed: {result.error}")
    finally:
        _close(subjects, result.notes)
        for path in paths:
            for suffix in ("", "-wal", "-shm", ".lock"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        result.seconds = time.perf_counter() - started
    return result


# --- the report ------------------------------------------------------------------------------


def paired(big: Stats, control: Stats) -> tuple[float, float]:
    """Median over rounds of big ÷ control and of big - control (µs), batch by batch.

    The two batches of a round ran moments apart, so a slow spell of the
    shared machine lands on both; pairing them cancels it better than a
    ratio of the two medians would.
    """
    rounds = list(zip(big.batches, control.batches, strict=True))
    ratio = statistics.median(b / c for b, c in rounds)
    return ratio, statistics.median(b - c for b, c in rounds)


def flat(big: Stats, control: Stats) -> bool:
    """The criterion: within RATIO of the control, or within SLACK_US of it, whichever is looser."""
    ratio, difference = paired(big, control)
    return ratio <= RATIO or difference <= SLACK_US


def versus(big: Stats, control: Stats) -> str:
    ratio, difference = paired(big, control)
    return f"{ratio:.2f}x ({difference:+.1f} µs)"


def para(text: str) -> str:
    """A paragraph written across source lines, as one Markdown line."""
    return " ".join(text.split())


def store_tables(growth: Growth, series: tuple[str, ...], first_column: str) -> str:
    """Medians (row -> µs/op per series) with the ratio rows, then p50 / p99."""
    header = [first_column, *(f"{SERIES[name]} µs/op" for name in series)]
    medians = [
        [row, *(fmt(stats[name].median) if name in stats else "-" for name in series)]
        for row, stats in growth.rows.items()
    ]
    for big_row, control_row in growth.pairs:
        big, control = growth.rows[big_row], growth.rows[control_row]
        medians.append(
            [
                f"{big_row} ÷ control",
                *(
                    versus(big[name], control[name])
                    + ("" if flat(big[name], control[name]) or name not in JUDGED else " over")
                    if name in big and name in control
                    else "-"
                    for name in series
                ),
            ]
        )
    p_header = [first_column, *(f"{SERIES[name]} p50 / p99" for name in series)]
    spread = [
        [
            row,
            *(
                f"{fmt(stats[name].p50)} / {fmt(stats[name].p99)}" if name in stats else "-"
                for name in series
            ),
        ]
        for row, stats in growth.rows.items()
    ]
    return table(header, medians) + "\n\n" + table(p_header, spread)


def judged(
    name: str, big: dict[str, Stats], control: dict[str, Stats], series: tuple[str, ...]
) -> Target:
    """A target line: each series of ``big`` flat against ``control``."""
    measured = "; ".join(f"{SERIES[s]} {versus(big[s], control[s])}" for s in series)
    return Target(name, measured, all(flat(big[s], control[s]) for s in series))


def growth_data(growth: Growth) -> dict[str, Any]:
    return {
        "rows": {
            row: {name: stats.as_dict() for name, stats in series.items()}
            for row, series in growth.rows.items()
        },
        "fills": growth.fills,
        "notes": growth.notes,
        "error": growth.error,
        "seconds": growth.seconds,
    }


def section(
    results: list[Growth], ledger: Growth, plan: Plan, *, quick: bool, wall: float
) -> Section:
    """The Markdown, the target lines and the raw figures."""
    largest = f"{plan.levels[-1]:,}"
    criterion = f"within {RATIO}x or +{SLACK_US:g} µs"
    sizes = ", ".join(f"{n:,}" for n in plan.levels)
    ops = ", ".join(f"{kind} {count:,}" for kind, count in plan.ops.items())
    lines = [
        para(
            f"""**Quick run: {sizes} accounts and {plan.ledger_rows:,} ledger rows** (the full
            run goes to 1,000,000 of each; quick figures are few and noisy)."""
            if quick
            else f"Accounts: {sizes}; ledger rows: {plan.ledger_rows:,}."
        ),
        "",
        para(
            """Each store is filled step by step with accounts as a first `balance()` writes
            them: the account and its opening ledger entry, serialised by `creditmeter.serde`
            into the store's own tables or keys (SQLite `executemany`, PostgreSQL `COPY`, Redis
            pipelined `HSET`/`RPUSH`/`SADD`, MemoryStore's dicts). Each fill is checked
            (`store.load`, `manager.balance` and `store.ledger` on filled accounts, and a count
            of the accounts); SQLite's WAL is then checkpointed, PostgreSQL's tables VACUUM
            ANALYZEd and CHECKPOINTed (as autovacuum would have done to a table some hours
            old). At each size these are timed, each a `BalanceManager.charge(user, 1)`
            (`BalanceConfig(enabled=True)`, one manager per store, as in one process):"""
        ),
        "",
        para(
            """- **one user**: the same user every time; the manager remembers its account, so
            a charge is one commit;"""
        ),
        para(
            """- **random user, load + commit**: a user drawn at random from every account in
            the store, forgotten by the manager just before, so the charge loads the account
            and commits it: the store's read and write land on a random row, page or key;"""
        ),
        para(
            """- **random user, manager cache on**: the same draw, the manager left as a gateway
            runs it (a figure, not judged: see the notes below);"""
        ),
        para(
            """- **new user**: the first charge of a user the store has never seen (it opens the
            account, then charges it). These run after the others, so the existing-user series
            see exactly the filled accounts; each new account stays in the store."""
        ),
        "",
        para(
            f"""At the largest size ({largest}) the same series also run on a second store of
            the same kind holding 1 account, interleaved round by round with the full one
            (`common.interleaved`). **Criterion (flat):** at the largest size, for each of one
            user, random user (load + commit) and new user, the full store's batch is compared
            with the control's batch of the same round, and the median over the rounds of that
            ratio is at most {RATIO}, or the median of the differences at most +{SLACK_US:g} µs
            (whichever is looser; the µs allowance matters only for MemoryStore, whose charge is
            ~12 µs). Pairing the two batches of a round, which ran moments apart, keeps a slow
            spell of the shared machine from landing on one side only. The "÷ control" rows
            show that paired ratio and difference; the tables show the median µs/op over
            {plan.repeats} batches ({ops} ops each) and p50 / p99 over every timed op. SQLite
            runs at durability `normal`, so that an fsync per commit does not hide the growth;
            the largest size is timed at `full` too, after the `normal` series."""
        ),
        "",
    ]
    fills = [row for growth in [*results, ledger] for row in growth.fills]
    if fills:
        lines += [
            "### Fills",
            "",
            table(["store", "filled to", "added", "fill s", "per s", "checked"], fills),
            "",
        ]
    targets: list[Target] = []
    data: dict[str, Any] = {
        "quick": quick,
        "levels": list(plan.levels),
        "ledger_rows": plan.ledger_rows,
        "criterion": {"ratio": RATIO, "slack_us": SLACK_US, "series": list(JUDGED)},
    }
    for growth in results:
        lines += [f"### {growth.name}", ""]
        data[growth.name] = growth_data(growth)
        if growth.error:
            lines += [f"**Not measured:** {growth.error}", ""]
        if growth.rows:
            lines += [store_tables(growth, EXISTING, "accounts"), ""]
        for big_row, control_row in growth.pairs:
            name = growth.name
            if "durability full" in big_row:
                name = name.replace("(normal)", "(full)")
            targets.append(
                judged(
                    f"Growth, {name}: charge at {largest} accounts {criterion} of 1 account",
                    growth.rows[big_row],
                    growth.rows[control_row],
                    JUDGED,
                )
            )
        if not growth.pairs:
            targets.append(
                Target(
                    f"Growth, {growth.name}: charge at {largest} accounts {criterion} of 1 account",
                    f"not measured: {growth.error}",
                    None,
                )
            )
        lines += [f"- {note}" for note in growth.notes]
        lines += [f"- wall time: {fmt(growth.seconds)} s", ""]
    rows = f"{plan.ledger_rows:,}"
    per_user = plan.ledger_rows // LEDGER_ACCOUNTS
    lines += [
        f"### {ledger.name}",
        "",
        para(
            f"""Two SQLite files (durability `normal`) with the same {LEDGER_ACCOUNTS:,}
            accounts: one with {rows} ledger rows ({per_user:,} entries per account, inserted
            round-robin across the accounts as charges arrive), one with {LEDGER_ACCOUNTS:,}
            (the opening entries). Both hold `{LIGHT_USER}`, made through the manager before
            the fill (5 entries: open, grant, 3 charges); the ledger read is
            `store.ledger('{LIGHT_USER}')`. The one user is `{uid(0)}`, with {per_user:,}
            entries in the big file. Same rounds, same criterion."""
        ),
        "",
    ]
    data["ledger"] = growth_data(ledger)
    if ledger.error:
        lines += [f"**Not measured:** {ledger.error}", ""]
    if ledger.rows:
        lines += [store_tables(ledger, ("one", "random", "new", "ledger"), "ledger"), ""]
    if ledger.pairs:
        big, control = (ledger.rows[row] for row in ledger.pairs[0])
        targets.append(
            judged(
                f"Growth, SQLiteStore (normal): charge with {rows} ledger rows {criterion} of "
                f"{LEDGER_ACCOUNTS:,} rows",
                big,
                control,
                JUDGED,
            )
        )
        read = judged(
            f"Growth, SQLiteStore: ledger(user) of a 5-entry user with {rows} ledger rows "
            f"{criterion} of {LEDGER_ACCOUNTS:,} rows",
            big,
            control,
            ("ledger",),
        )
        targets.append(Target(read.name, f"{read.measured}; plan: {ledger.plan}", read.met))
    else:
        targets.append(
            Target(
                f"Growth, SQLiteStore: charge and ledger read with {rows} ledger rows",
                f"not measured: {ledger.error}",
                None,
            )
        )
    lines += [f"- {note}" for note in ledger.notes]
    lines += [f"- wall time: {fmt(ledger.seconds)} s", ""]
    lines += [
        "Notes:",
        "",
        para(
            """- *random user, manager cache on*: a `BalanceManager` remembers the accounts it
            last wrote (up to 10,000; then it forgets them all and starts again) and charges a
            remembered account with one commit; any other charge first loads the account (for
            Redis and PostgreSQL, one more round trip). With 1 account every draw is
            remembered; with far more accounts than that, almost none is. That cost grows with
            the number of users charged lately, not with what the store holds: *random user,
            load + commit* pays the same load in the 1-account store."""
        ),
        f"- wall time of the whole section: {fmt(wall)} s.",
    ]
    data["wall_s"] = wall
    return Section(
        title="Growth: charge latency as accounts and the ledger grow",
        markdown="\n".join(lines),
        targets=targets,
        data=data,
    )


def run(*, quick: bool, workdir: Path) -> Section:
    """Fill and time every store; SQLite files go in a folder of their own under ``workdir``."""
    plan = QUICK if quick else FULL
    started = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="growth-", dir=workdir))
    results: list[Growth] = []
    try:
        results.append(grow(MemoryKit(), plan))
        results.append(grow(SQLiteKit(folder), plan))
        ledger = grow_ledger(folder, plan)
        for kind, name, kit in (
            ("redis", "RedisStore", RedisKit),
            ("postgres", "PostgresStore", PostgresKit),
        ):
            url = common.REDIS_URL if kind == "redis" else common.POSTGRES_URL
            why = unreachable(kind)
            if why is None:
                results.append(grow(kit(), plan))
            else:
                log(f"{name}: not reachable at {url}: {why}")
                results.append(Growth(name, error=f"server not reachable at `{url}`: {why}"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return section(results, ledger, plan, quick=quick, wall=time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="up to 50,000 accounts (~15 s)")
    parser.add_argument("--output", type=Path, help="write the report (Markdown) here")
    parser.add_argument(
        "--dir", type=Path, help="where the SQLite files go (default: a temporary folder)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cm-growth-") as scratch:
        workdir = args.dir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        result = run(quick=args.quick, workdir=workdir)
    report = "\n".join(
        [
            f"# {result.title}",
            "",
            *common.machine_lines(["redis", "psycopg"]),
            "",
            result.markdown,
            "",
            "## Targets",
            "",
            table(
                ["target", "measured", "verdict"],
                [[t.name, t.measured, common.verdict(t.met)] for t in result.targets],
            ),
            "",
        ]
    )
    print(report)
    if args.output:
        args.output.write_text(report, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
