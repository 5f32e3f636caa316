"""The PostgreSQL stores' own reports: ``sum_usage``, ``scan_entries`` and ``users_page``.

On a real server (skipped without one, see services.py), each test under its
own table prefix. Covered: sums made by the server (GROUP BY, exact numeric)
equal ``rules.Tally`` over ``ledger()`` for a varied workload and every
grouping; period starts and ``[since, until)`` at month ends, 2024-02-29,
Mondays and hours; scans in commit order (a transaction that took a low
``seq`` and commits after later ones is not skipped, and comes after every
position returned before it commits), also with writers in threads while a
reader pages; malformed positions; ``users_page`` in code point order; the
upgrade of a schema version 1 database (by the store, concurrently, in a
schema, and by hand with ``create_schema=False``); an unknown version; the
async store.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import threading
import time
from datetime import datetime, timedelta, timezone
from decimal import Decimal, Inexact, localcontext
from pathlib import Path

import pytest

if os.environ.get("CREDITMETER_REQUIRE_SERVICES") != "1":
    pytest.importorskip("psycopg", reason="the [postgres] extra (psycopg) is not installed")

import psycopg
from psycopg import sql
from services import POSTGRES_DSN, need, unique

from creditmeter import (
    AsyncBalanceManager,
    BalanceConfig,
    BalanceManager,
    EntryKind,
    InsufficientBalance,
    InvalidInput,
    StoreError,
    TokenUsage,
    rules,
)
from creditmeter.queries import EntryQuery, UsageQuery
from creditmeter.serde import account_to_json, entry_to_json
from creditmeter.stores.base import AsyncReportStore, ReportStore
from creditmeter.stores.postgres import AsyncPostgresStore, PostgresStore
from creditmeter.stores.postgres.sql import commit_params
from creditmeter.testing import FakeClock, make_account, make_entry

UTC = timezone.utc
SQL_FILE = Path(__file__).parents[2] / "src" / "creditmeter" / "stores" / "postgres.sql"
START = Decimal(5000)
CONFIG = BalanceConfig(enabled=True, start_balance=START)
TABLES = ("accounts", "ledger", "meta")
WAIT = 60.0  # seconds to wait for other sessions of a shared server to end their transactions


def at(*parts: int) -> datetime:
    """A UTC moment: ``at(2024, 2, 29, 13)``."""
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


@pytest.fixture(autouse=True)
def _postgres_server() -> None:
    need("postgres", lambda: psycopg.connect(POSTGRES_DSN, connect_timeout=3).close())


def raw(**kwargs) -> psycopg.Connection:
    """A plain connection to the test server, for looking behind the store's back."""
    return psycopg.connect(POSTGRES_DSN, autocommit=True, **kwargs)


def table(prefix, name, schema=None):
    return (
        sql.Identifier(prefix + name) if schema is None else sql.Identifier(schema, prefix + name)
    )


def drop_tables(prefix, schema=None):
    with raw() as conn:
        if schema is not None:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        else:
            names = sql.SQL(", ").join(table(prefix, name) for name in TABLES)
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(names))


@pytest.fixture
def prefix():
    chosen = unique("cmr_") + "_"
    yield chosen
    drop_tables(chosen)


@pytest.fixture
def store(prefix):
    with PostgresStore(POSTGRES_DSN, prefix=prefix, max_size=6) as opened:
        yield opened


def every_entry(store):
    return [entry for user in store.users() for entry in store.ledger(user)]


def tallied(entries, query):
    tally = rules.Tally(query)
    for entry in entries:
        tally.add(entry)
    return tally.rows()


def summed(store, query):
    rows = store.sum_usage(query)
    for row in rows:
        assert type(row.calls) is int
        assert type(row.cost) is Decimal
        assert type(row.charged) is Decimal
        if row.period_start is not None:
            assert row.period_start.tzinfo is UTC
    return rules.sort_usage(rows)


GROUPINGS = [
    keys for size in range(4) for keys in itertools.combinations(("user", "model", "period"), size)
]


def usage_queries(users, ranges):
    """Every grouping (each period where grouped by period), user and range."""
    for by in GROUPINGS:
        for period in ("hour", "day", "week", "month") if "period" in by else (None,):
            for user in (None, *users):
                for since, until in ranges:
                    yield UsageQuery(user, since, until, by, period)


# --- sums -----------------------------------------------------------------------------

MOMENTS = [
    at(2024, 1, 31, 23, 59, 59, 999999),
    at(2024, 2, 1),
    at(2024, 2, 28, 23, 59, 59, 999999),
    at(2024, 2, 29),
    at(2024, 2, 29, 13),
    at(2024, 2, 29, 23, 59, 59, 999999),
    at(2024, 3, 1),
    at(2024, 3, 3, 23, 59, 59, 999999),  # a Sunday's last microsecond
    at(2024, 3, 4),  # a Monday
    at(2024, 3, 4, 0, 59, 59, 999999),
    at(2024, 12, 31, 23, 59, 59, 999999),
    at(2025, 1, 1),
]
USERS = ["alice", "bob", "Zoë"]
MODELS = ["gpt-4o", "gpt-4o-mini", "claude-3-5-haiku"]
AMOUNTS = [
    1,
    250,
    Decimal("0.000000000000000000000000000001"),
    Decimal("12.345678901234567890123456789012"),
    Decimal("999999999999999.999999999999999999999999999999"),
    10**15,
    10**6,  # more than the start balance: clamped
]


def usages(rng):
    return TokenUsage(
        input=rng.choice([0, 1, 777, 10**6, 10**10]),
        output=rng.randint(0, 5000),
        cache_write=rng.choice([0, 0, 13]),
        cache_read=rng.choice([0, 7]),
    )


def workload(meter, clock, rng, steps):
    """Priced, plain, clamped and strict charges, grants, holds settled and released."""
    for _ in range(steps):
        user = rng.choice(USERS)
        clock.set(rng.choice(MOMENTS) + timedelta(minutes=rng.choice([0, 0, 7, 90])))
        step = rng.randrange(7)
        try:
            if step == 0:
                meter.charge(user, model=rng.choice(MODELS), usage=usages(rng))
            elif step == 1:
                meter.charge(user, rng.choice(AMOUNTS), model=rng.choice([None, "house"]))
            elif step == 2:
                meter.charge(user, rng.choice(AMOUNTS), strict=True)
            elif step == 3:
                meter.grant(user, rng.choice(AMOUNTS))
            elif step == 4:
                held = meter.hold(user, rng.choice(AMOUNTS[:4]))
                clock.set(rng.choice(MOMENTS))
                if rng.random() < 0.5:
                    meter.settle(held, model=rng.choice(MODELS), usage=usages(rng))
                else:
                    meter.settle(held, rng.choice(AMOUNTS))
            elif step == 5:
                held = meter.hold(user, rng.choice(AMOUNTS[:4]))
                meter.release(held)
            else:
                meter.charge(user, 10**6, model="gpt-4o", usage=TokenUsage(input=5))  # clamped
        except InsufficientBalance:
            pass


def test_sums_equal_the_tally_of_the_ledgers(store):
    clock = FakeClock(MOMENTS[0])
    meter = BalanceManager(store, CONFIG, clock=clock)
    workload(meter, clock, random.Random(15), 160)
    entries = every_entry(store)
    kinds = {entry.kind for entry in entries}
    assert {EntryKind.CHARGE, EntryKind.GRANT, EntryKind.RELEASE} <= kinds
    charges = [entry for entry in entries if entry.kind is EntryKind.CHARGE]
    assert any(entry.cost is not None and entry.cost != -entry.amount for entry in charges)
    assert any(entry.usage is None for entry in charges)
    assert any(abs(entry.amount) >= 10**14 for entry in entries)
    assert any(entry.amount.as_tuple().exponent == -30 for entry in entries)
    ranges = [
        (None, None),
        (at(2024, 2, 29), at(2024, 3, 1)),
        (at(2024, 3, 4), None),
        (None, at(2024, 2, 29, 13)),
    ]
    for query in usage_queries(USERS[:2], ranges):
        rows, expected = summed(store, query), tallied(entries, query)
        assert rows == expected, query
        # Digit for digit, trailing zeros and all: numeric sums keep their scale as Decimal's do.
        assert [(str(r.cost), str(r.charged)) for r in rows] == [
            (str(r.cost), str(r.charged)) for r in expected
        ]
    # The total beyond doubt: the sum of every charge, with more digits than a float or
    # Decimal's default context (28) could keep.
    [total] = summed(store, UsageQuery(None, None, None, (), None))
    with localcontext() as exact:
        exact.prec = 200
        exact.traps[Inexact] = True
        charged = sum((-entry.amount for entry in charges), Decimal(0))
    assert len(charged.as_tuple().digits) > 28
    assert total.charged == charged
    assert total.calls == len(charges)


def test_the_manager_uses_the_store_sums(store):
    clock = FakeClock(at(2024, 2, 29, 13))
    meter = BalanceManager(store, CONFIG, clock=clock)
    meter.charge("u", model="gpt-4o", usage=TokenUsage(input=10**10, output=3))
    meter.charge("u", model="gpt-4o", usage=TokenUsage(input=10**10, cache_read=4))
    [row] = meter.usage(by="model")
    assert row.model == "gpt-4o"
    assert row.calls == 2
    assert row.usage.input == 2 * 10**10  # beyond one call's limit
    assert (row.usage.output, row.usage.cache_read) == (3, 4)


def test_period_starts_and_range_ends(store):
    clock = FakeClock(MOMENTS[0])
    meter = BalanceManager(store, BalanceConfig(enabled=True, start_balance=10**9), clock=clock)
    for moment in MOMENTS:
        clock.set(moment)
        meter.charge("u", 1, model="m")
    entries = every_entry(store)
    expected_starts = {
        "hour": {at(2024, 2, 29, 13), at(2024, 3, 4, 0), at(2024, 2, 29, 23)},
        "day": {at(2024, 2, 29), at(2024, 3, 3), at(2024, 3, 4), at(2025, 1, 1)},
        "week": {at(2024, 2, 26), at(2024, 3, 4), at(2024, 1, 29), at(2024, 12, 30)},
        "month": {at(2024, 1, 1), at(2024, 2, 1), at(2024, 3, 1), at(2024, 12, 1), at(2025, 1, 1)},
    }
    for period, some in expected_starts.items():
        rows = summed(store, UsageQuery(None, None, None, ("period",), period))
        starts = {row.period_start for row in rows}
        assert starts == {rules.period_start(moment, period) for moment in MOMENTS}
        assert some <= starts
        assert rows == tallied(entries, UsageQuery(None, None, None, ("period",), period))
    week = summed(store, UsageQuery(None, None, None, ("period",), "week"))
    assert all(row.period_start.weekday() == 0 for row in week)  # Mondays
    feb = {
        r.period_start: r.calls
        for r in summed(store, UsageQuery(None, None, None, ("period",), "month"))
    }
    assert feb[at(2024, 2, 1)] == 5  # Feb 1, 28 23:59:59.999999, 29, 29 13:00, 29 23:59:59.999999
    # since is inclusive, until exclusive, to the microsecond.
    for since, until, calls in [
        (at(2024, 2, 29), at(2024, 3, 1), 3),
        (at(2024, 2, 29) - timedelta(microseconds=1), at(2024, 3, 1), 4),
        (at(2024, 2, 29), at(2024, 3, 1) + timedelta(microseconds=1), 4),
        (at(2024, 3, 4), at(2024, 3, 4, 1), 2),
        (at(2024, 12, 31, 23, 59, 59, 999999), at(2025, 1, 1), 1),
        (at(2025, 1, 1), None, 1),
        (None, at(2024, 2, 1), 1),
    ]:
        query = UsageQuery(None, since, until, (), None)
        [row] = summed(store, query)
        assert row.calls == calls, (since, until)
        assert [row] == tallied(entries, query)
    assert summed(store, UsageQuery(None, at(2030, 1, 1), None, (), None)) == []
    assert summed(store, UsageQuery("nobody", None, None, ("user",), None)) == []


# --- scans ----------------------------------------------------------------------------


def scan_all(store, query, *, limit, after=None):
    """Page until the store says there is nothing more; the entries and the last position."""
    found = []
    position = after
    while True:
        page = store.scan_entries(query, after=position, limit=limit)
        assert len(page.entries) <= limit
        found += page.entries
        if page.position is None:
            return found, position
        position = page.position


def scan_until(store, query, wanted, *, limit, after=None):
    """Page (coming back while the store gives positions) until ``wanted`` entries were read.

    Other sessions of a shared server may hold the horizon back for a while;
    the scan then returns short pages with positions, and is asked again.
    """
    found = []
    position = after
    deadline = time.monotonic() + WAIT
    while len(found) < wanted:
        assert time.monotonic() < deadline, f"read {len(found)} of {wanted} entries"
        page = store.scan_entries(query, after=position, limit=limit)
        if page.position is not None:
            found += page.entries
            position = page.position
        elif len(found) + len(page.entries) >= wanted:
            found += page.entries
        else:  # the end for now: what is missing is not visible yet; read again from position
            time.sleep(0.01)
    return found, position


def test_scans_page_every_entry_once_in_order(store):
    clock = FakeClock(at(2024, 3, 1))
    meter = BalanceManager(store, CONFIG, clock=clock)
    for n in range(30):
        clock.set(at(2024, 3, 1) + timedelta(hours=n))
        meter.charge(USERS[n % 3], 1 + n, model=MODELS[n % 2])
        if n % 5 == 0:
            meter.grant(USERS[n % 3], 3)
    entries = every_entry(store)
    everything = EntryQuery(None, None, None, None)
    for limit in (1, 4, 7, 100):
        found, _ = scan_until(store, everything, len(entries), limit=limit)
        assert sorted(e.id for e in found) == sorted(e.id for e in entries)
        assert len({e.id for e in found}) == len(found)
    # Filters: one user (in its ledger's order), kinds, [since, until).
    alice = EntryQuery("alice", None, None, None)
    found, _ = scan_all(store, alice, limit=3)
    assert found == store.ledger("alice")
    grants = EntryQuery(None, None, None, frozenset({EntryKind.GRANT}))
    found, _ = scan_until(store, grants, 6, limit=2)
    assert {e.id for e in found} == {e.id for e in entries if e.kind is EntryKind.GRANT}
    window = EntryQuery("bob", at(2024, 3, 1, 4), at(2024, 3, 1, 10), frozenset({EntryKind.CHARGE}))
    found, _ = scan_all(store, window, limit=1)
    assert [e.at.hour for e in found] == [4, 7]


def test_a_low_seq_committed_late_comes_after_the_positions_before_it(store, prefix):
    meter = BalanceManager(store, CONFIG)
    for n in range(5):
        meter.charge("early", n + 1)
    # A commit of the store's own statement, left open: it has taken its seq.
    account = make_account("late", balance=Decimal(7), version=1)
    entry = make_entry("late", balance_after=Decimal(7), amount=Decimal(7))
    statement = store._sql.commit(new=True, entries=1)
    key = store._sql.lock_key("late")
    slow = psycopg.connect(POSTGRES_DSN)
    try:
        slow.execute(statement, commit_params(account, [entry], None, key))
        for n in range(5):
            meter.charge("after", n + 1)  # later seqs, committed first
        with raw() as conn:
            seqs = dict(
                conn.execute(
                    sql.SQL("SELECT user_id, max(seq) FROM {} GROUP BY user_id").format(
                        table(prefix, "ledger")
                    )
                ).fetchall()
            )
        assert seqs == {"early": seqs["early"], "after": seqs["after"]}  # "late" not visible
        everything = EntryQuery(None, None, None, None)
        before, position = scan_until(store, everything, 6, limit=2)  # the 6 of "early"
        assert {e.user_id for e in before} == {"early"}
        page = store.scan_entries(everything, after=position, limit=2)
        # Held back by the open transaction: nothing more, but a position to come back to.
        assert page.entries == []
        assert page.position is not None
        position = page.position
        slow.commit()
    finally:
        slow.close()
    with raw() as conn:
        late_seq = conn.execute(
            sql.SQL("SELECT seq FROM {} WHERE user_id = 'late'").format(table(prefix, "ledger"))
        ).fetchone()[0]
    assert late_seq < seqs["after"]  # took its seq before "after"'s, committed after them
    rest, _ = scan_until(store, everything, 7, after=position, limit=2)
    assert [e.user_id for e in rest] == ["late"] + ["after"] * 6
    assert rest[0] == entry
    assert {e.id for e in before + rest} == {e.id for e in every_entry(store)}


def test_writers_in_threads_while_a_reader_pages(store):
    writers, charges = 4, 40
    done = threading.Event()
    failures = []
    kept = {None: [], "w0": []}  # per reader, entries of pages that gave a position: final
    ended = {}

    def write(n):
        try:
            meter = BalanceManager(store, CONFIG)
            for i in range(charges):
                meter.charge(f"w{(n + i) % 6}", 1, model=MODELS[i % 3], usage=TokenUsage(input=i))
        except Exception as exc:  # pragma: no cover - reported below
            failures.append(exc)

    def scan(user):
        try:
            query = EntryQuery(user, None, None, None)
            position = None
            while not done.is_set():
                page = store.scan_entries(query, after=position, limit=2)
                # A page without a position was the end for now: read again from the last one.
                if page.position is not None:
                    kept[user].extend(page.entries)
                    position = page.position
            ended[user] = position
        except Exception as exc:  # pragma: no cover - reported below
            failures.append(exc)

    readers = [threading.Thread(target=scan, args=(user,)) for user in kept]
    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for thread in readers + threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    for thread in readers:
        thread.join()
    assert failures == []
    entries = every_entry(store)
    assert len(entries) == writers * charges + 6  # and the 6 accounts' opening grants
    for user, read in kept.items():
        expected = [e for e in entries if user is None or e.user_id == user]
        assert len(read) > 2  # the reader really read while they wrote
        rest, _ = scan_until(
            store,
            EntryQuery(user, None, None, None),
            len(expected) - len(read),
            after=ended[user],
            limit=2,
        )
        ids = [e.id for e in read + rest]
        assert len(ids) == len(set(ids))  # never twice
        assert set(ids) == {e.id for e in expected}  # never skipped
        if user is not None:
            assert read + rest == store.ledger(user)  # a user's scan: in ledger order


def test_malformed_positions_are_invalid_input(store):
    BalanceManager(store, CONFIG).charge("u", 1)
    queries = [EntryQuery(None, None, None, None), EntryQuery("u", None, None, None)]
    bad = [
        "",
        "1",
        "1.",
        ".1",
        "a.b",
        "-1.2",
        "1.-2",
        "1.2.3",
        "01.2",
        " 1.2",
        "1.2\n",
        "1e3.4",
        "\uff11.\uff12",  # fullwidth digits
        f"{2**63}.1",
        f"1.{2**63}",
        "9" * 400 + ".1",
        5,
    ]
    for query in queries:
        for position in bad:
            with pytest.raises(InvalidInput, match="cursor"):
                store.scan_entries(query, after=position, limit=5)
        for limit in (0, -1, 2.5):
            with pytest.raises(InvalidInput):
                store.scan_entries(query, after=None, limit=limit)
    # Positions far past the end read nothing, and are not an error.
    last = f"{2**63 - 1}.{2**63 - 1}"
    assert store.scan_entries(queries[1], after=last, limit=5).entries == []
    assert store.scan_entries(queries[0], after=last, limit=5).entries == []
    meter = BalanceManager(store, CONFIG)
    with pytest.raises(InvalidInput):
        meter.entries(after="cm1.not-a-cursor")


def test_report_reads_fail_as_store_errors(prefix):
    with PostgresStore(POSTGRES_DSN, prefix=prefix, create_schema=False) as store:  # no tables
        with pytest.raises(StoreError, match="does not exist"):
            store.scan_entries(EntryQuery(None, None, None, None), after=None, limit=5)
        with pytest.raises(StoreError, match="does not exist"):
            store.scan_entries(EntryQuery("u", None, None, None), after="1.2", limit=5)
        with pytest.raises(StoreError, match="does not exist"):
            store.sum_usage(UsageQuery(None, None, None, ("model",), None))
        with pytest.raises(StoreError, match="does not exist"):
            store.users_page(after=None, limit=5)
        with pytest.raises(InvalidInput):
            store.users_page(after=None, limit=0)


# --- users --------------------------------------------------------------------------------


def test_users_page_in_code_point_order(store):
    ids = ["a", "B", "b", "é", "e\u0301", "Zoë", "😀", "\uffee", "a b", "a\u00a0b", "~", "0"]
    meter = BalanceManager(store, CONFIG)
    for user_id in ids:
        meter.grant(user_id, 1)
    expected = sorted(ids)
    for size in (1, 2, 5, 100):
        found, after = [], None
        while True:
            page = store.users_page(after=after, limit=size)
            found += page
            if len(page) < size:
                break
            after = page[-1]
        assert found == expected
    assert store.users_page(after="e", limit=3) == [u for u in expected if u > "e"][:3]
    assert store.users_page(after="\U0010ffff", limit=3) == []
    assert list(meter.iter_users(page_size=2)) == expected


# --- the schema -------------------------------------------------------------------------------

V1_DDL = """
CREATE TABLE IF NOT EXISTS {meta} (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS {accounts} (
    user_id text COLLATE "C" PRIMARY KEY, version bigint NOT NULL, balance numeric NOT NULL,
    created_at timestamptz NOT NULL, updated_at timestamptz NOT NULL,
    last_refill timestamptz NOT NULL, data text NOT NULL);
CREATE TABLE IF NOT EXISTS {ledger} (
    seq bigserial PRIMARY KEY, id text NOT NULL, user_id text COLLATE "C" NOT NULL,
    kind text NOT NULL, amount numeric NOT NULL, balance_after numeric NOT NULL, cost numeric,
    at timestamptz NOT NULL, request_id text COLLATE "C", model text, data text NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS {ledger_request}
    ON {ledger} (user_id, request_id) WHERE request_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS {ledger_user} ON {ledger} (user_id, seq);
INSERT INTO {meta} (key, value) VALUES ('schema', '1') ON CONFLICT (key) DO NOTHING
"""


def version_1_database(prefix, schema=None):
    """Tables as creditmeter's schema version 1 made them, with a few rows written as it did."""
    names = {name: table(prefix, name, schema) for name in TABLES}
    names.update(ledger_request=sql.Identifier(prefix + "ledger_request"))
    names.update(ledger_user=sql.Identifier(prefix + "ledger_user"))
    balance = Decimal(100)
    entries = [
        make_entry(
            "old", balance_after=balance, kind=EntryKind.GRANT, amount=balance, at=at(2024, 1, 1)
        ),
        make_entry(
            "old",
            balance_after=Decimal(90),
            kind=EntryKind.CHARGE,
            amount=Decimal(-10),
            cost=Decimal(10),
            model="gpt-4o",
            usage=TokenUsage(input=1000, output=20),  # no cache counts: left out of the JSON
            at=at(2024, 1, 2),
        ),
        make_entry(
            "old",
            balance_after=Decimal(85),
            kind=EntryKind.CHARGE,
            amount=Decimal(-5),
            model="gpt-4o",
            usage=TokenUsage(input=1, output=2, cache_write=3, cache_read=4),
            # \u0000 in JSON, which PostgreSQL's JSON types refuse; "usage" in a string.
            metadata={"note": "a\x00b", "x": '"usage":{"input":99}'},
            at=at(2024, 1, 3),
        ),
        make_entry(
            "old",
            balance_after=Decimal(80),
            kind=EntryKind.CHARGE,
            amount=Decimal(-5),
            at=at(2024, 1, 4),
        ),
    ]
    account = make_account("old", balance=Decimal(80), version=4)
    with raw() as conn, conn.transaction():
        if schema is not None:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        for statement in V1_DDL.split(";"):
            conn.execute(sql.SQL(statement).format(**names))
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (user_id, version, balance, created_at, updated_at, last_refill, "
                "data) VALUES (%s, %s, %s, %s, %s, %s, %s)"
            ).format(names["accounts"]),
            (
                "old",
                account.version,
                account.balance,
                account.created_at,
                account.updated_at,
                account.last_refill,
                account_to_json(account),
            ),
        )
        for entry in entries:
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (id, user_id, kind, amount, balance_after, cost, at, "
                    "request_id, model, data) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                ).format(names["ledger"]),
                (
                    entry.id,
                    entry.user_id,
                    entry.kind.value,
                    entry.amount,
                    entry.balance_after,
                    entry.cost,
                    entry.at,
                    entry.request_id,
                    entry.model,
                    entry_to_json(entry),
                ),
            )
    return entries


def ledger_columns(prefix, schema=None):
    with raw() as conn:
        return conn.execute(
            sql.SQL(
                "SELECT input_tokens, output_tokens, cache_write_tokens, cache_read_tokens, tx "
                "FROM {} ORDER BY seq"
            ).format(table(prefix, "ledger", schema))
        ).fetchall()


def stored_version(prefix, schema=None):
    with raw() as conn:
        return conn.execute(
            sql.SQL("SELECT value FROM {} WHERE key = 'schema'").format(
                table(prefix, "meta", schema)
            )
        ).fetchone()[0]


def check_upgraded(store, prefix, entries, schema=None):
    assert stored_version(prefix, schema) == "2"
    assert ledger_columns(prefix, schema) == [
        (None, None, None, None, 0),
        (1000, 20, 0, 0, 0),
        (1, 2, 3, 4, 0),
        (None, None, None, None, 0),
    ]
    assert store.ledger("old") == entries
    meter = BalanceManager(store, CONFIG)
    meter.charge("old", model="gpt-4o", usage=TokenUsage(input=5))
    entries = store.ledger("old")
    for by in (("model",), ("user", "period")):
        query = UsageQuery(None, None, None, by, "day" if "period" in by else None)
        assert summed(store, query) == tallied(entries, query)
    found, _ = scan_until(store, EntryQuery(None, None, None, None), 5, limit=2)
    assert found == entries  # the old rows (tx 0) first, then the new one
    assert ledger_columns(prefix, schema)[-1][-1] > 0


def test_a_version_1_database_is_upgraded_by_the_store(prefix):
    entries = version_1_database(prefix)
    with PostgresStore(POSTGRES_DSN, prefix=prefix) as store:
        check_upgraded(store, prefix, entries)


def test_stores_starting_together_upgrade_once(prefix):
    entries = version_1_database(prefix)
    failures = []

    def start():
        try:
            with PostgresStore(POSTGRES_DSN, prefix=prefix) as opened:
                opened.load("old")
        except Exception as exc:  # pragma: no cover - reported below
            failures.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    with PostgresStore(POSTGRES_DSN, prefix=prefix) as store:
        check_upgraded(store, prefix, entries)


def test_a_version_1_database_in_a_schema_is_upgraded():
    schema = unique("cmr_schema_")
    try:
        entries = version_1_database("billing_", schema)
        with PostgresStore(POSTGRES_DSN, prefix="billing_", schema=schema) as store:
            check_upgraded(store, "billing_", entries, schema)
    finally:
        drop_tables("billing_", schema)


def test_create_schema_false_leaves_version_1_alone_until_upgraded_by_hand(prefix):
    entries = version_1_database(prefix)
    with PostgresStore(POSTGRES_DSN, prefix=prefix, create_schema=False) as store:
        assert stored_version(prefix) == "1"
        with pytest.raises(StoreError, match="does not exist"):
            BalanceManager(store, CONFIG).charge("old", 1)
        # As postgres.sql says: the file, prefix put in, in one transaction.
        text = SQL_FILE.read_text(encoding="utf-8")
        code = "\n".join(line for line in text.splitlines() if not line.startswith("--"))
        with raw() as conn, conn.transaction():
            for statement in code.replace("creditmeter_", prefix).split(";"):
                if statement.strip():
                    conn.execute(statement)
        check_upgraded(store, prefix, entries)


def test_a_store_finding_version_2_takes_no_table_lock(store, prefix):
    with raw() as conn, conn.transaction():
        # Any lock on the ledger: ALTER TABLE would wait for it.
        conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(table(prefix, "ledger")))
        with PostgresStore(POSTGRES_DSN, prefix=prefix, lock_timeout=2) as second:
            second.create_schema()
            assert second.users() == []


def test_an_unknown_version_fails_and_changes_nothing(store, prefix):
    with raw() as conn:
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(prefix + "ledger_commit")))
        conn.execute(sql.SQL("UPDATE {} SET value = '99'").format(table(prefix, "meta")))
    with pytest.raises(StoreError, match=r"schema '99'.*reads schema '2'"):
        PostgresStore(POSTGRES_DSN, prefix=prefix)
    with raw() as conn:
        found = conn.execute(
            "SELECT count(*) FROM pg_indexes WHERE indexname = %s", (prefix + "ledger_commit",)
        ).fetchone()[0]
    assert found == 0  # the DDL did not run


def test_new_rows_hold_their_token_counts_and_transaction(store, prefix):
    meter = BalanceManager(store, CONFIG)
    meter.charge(
        "u", model="gpt-4o", usage=TokenUsage(input=7, output=8, cache_write=9, cache_read=10)
    )
    meter.charge("u", 1)
    rows = ledger_columns(prefix)
    assert rows[1][:4] == (7, 8, 9, 10)
    assert rows[2][:4] == (None, None, None, None)
    assert rows[1][4] > 0
    assert rows[1][4] != rows[2][4]  # one transaction each


# --- the async store ----------------------------------------------------------------------------


def test_the_async_store_reports(prefix):
    async def main():
        async with AsyncPostgresStore(POSTGRES_DSN, prefix=prefix) as store:
            assert isinstance(store, AsyncReportStore)
            clock = FakeClock(at(2024, 2, 29, 23, 30))
            meter = AsyncBalanceManager(store, CONFIG, clock=clock)
            for n in range(12):
                clock.advance(timedelta(minutes=17))
                await meter.charge(
                    USERS[n % 3], n + 1, model=MODELS[n % 2], usage=TokenUsage(input=n)
                )
            entries = [e for user in await store.users() for e in await store.ledger(user)]
            for by, period in [(("model",), None), (("user", "period"), "hour")]:
                query = UsageQuery(None, None, at(2024, 3, 1, 2), by, period)
                assert rules.sort_usage(await store.sum_usage(query)) == tallied(entries, query)
            found, position = [], None
            deadline = time.monotonic() + WAIT
            while len(found) < len(entries):
                assert time.monotonic() < deadline
                page = await store.scan_entries(
                    EntryQuery(None, None, None, None), after=position, limit=5
                )
                if page.position is not None or len(found) + len(page.entries) == len(entries):
                    found += page.entries
                    position = page.position or position
            assert sorted(e.id for e in found) == sorted(e.id for e in entries)
            assert await store.users_page(after="Zoë", limit=1) == ["alice"]
            with pytest.raises(InvalidInput):
                await store.scan_entries(EntryQuery(None, None, None, None), after="x", limit=5)
            page = await meter.entries(user="bob", limit=2)
            assert page.entries == (await store.ledger("bob"))[:2]

    asyncio.run(main())


def test_the_sync_store_is_a_report_store(store):
    assert isinstance(store, ReportStore)
