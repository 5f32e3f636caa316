"""``SQLiteStore``'s own reports: usage summed in SQL, scans in seq order, pages of user ids.

Schema 2 keeps each entry's time, kind, model, tokens and amounts in typed
columns beside its JSON, filled on insert; ``sum_usage`` sums them in SQL
(amounts as whole units plus nanos, exactly) and reads from the JSON only
the rows those columns cannot hold exactly (more than 9 places, or written
by older code). Every sum here is held to ``rules.Tally`` over ``ledger()``,
to the last digit and the decimal places of each total (``str`` equal).

Also: typed amounts read off the text equal those from the number's parts
(Hypothesis); period starts and ``[since, until)`` at the edges (month ends, the
leap day, Sunday to Monday, before 1970, years 1 and 9999); a sum past
2**63; a schema 1 file (the old DDL, written here) upgraded in place, also
by several processes opening it at once, and rows older code writes after
the upgrade; two processes committing while a third pages through
``scan_entries``; malformed positions; user ids in code point order; the
async twin; a read-only schema 1 file, reported from its JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import os
import pwd
import random
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from creditmeter import (
    AsyncSQLiteStore,
    BalanceConfig,
    BalanceManager,
    EntryKind,
    InsufficientBalance,
    InvalidInput,
    SQLiteStore,
    StoreError,
    TokenUsage,
    rules,
)
from creditmeter.models import LedgerEntry
from creditmeter.queries import EntryQuery, UsageQuery, UsageRow
from creditmeter.reports import _query
from creditmeter.serde import account_to_json, entry_from_json, entry_to_json
from creditmeter.stores import sqlite as sqlite_store
from creditmeter.testing import FakeClock

UTC = timezone.utc
CONFIG = BalanceConfig(enabled=True)
SPAWN = multiprocessing.get_context("spawn")
NUMBERS = itertools.count()


def at(*parts: int) -> datetime:
    """A UTC moment: ``at(2024, 2, 29, 13)``."""
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


US = timedelta(microseconds=1)
EDGES = [
    at(2024, 1, 31, 23, 59, 59, 999999),
    at(2024, 2, 1),
    at(2024, 2, 28, 23, 59, 59, 999999),
    at(2024, 2, 29),  # the leap day
    at(2024, 2, 29, 12, 59, 59, 999999),
    at(2024, 2, 29, 13),
    at(2024, 3, 1),
    at(2024, 3, 3, 23, 59, 59, 999999),  # a Sunday's last microsecond
    at(2024, 3, 4),  # Monday
    at(2024, 12, 31, 23, 59, 59, 999999),
    at(2025, 1, 1),
    at(1969, 12, 28, 23, 59, 59, 999999),  # before the epoch: a Sunday
    at(1969, 12, 29),  # Monday
    at(1969, 12, 31, 23, 59, 59, 999999),
    at(1970, 1, 1),
    at(1900, 2, 28, 23, 30),  # 1900 had no leap day
    at(1900, 3, 1),
    at(1, 1, 1),
    at(9999, 12, 31, 23, 59, 59, 999999),
]
WORKLOAD_EDGES = [edge for edge in EDGES if 1 < edge.year < 9999]  # holds add a ttl
MODELS = ["gpt-4o", "gpt-4o-mini", "claude-3-5-haiku"]
USERS = ["alice", "bob", "Zoë"]
AMOUNTS: list[Any] = [
    1,
    7,
    250,
    Decimal("0.5"),
    Decimal("1.50"),  # its places count: sums end in ...0
    Decimal("0.000000001"),  # 9 places: still typed
    Decimal("0.000000000000000000000000000001"),  # 30 places: summed from the JSON
    Decimal("12.345678901234567890123456789012"),
    10**6,  # more than the start balance: clamped
    10**15,
]
PERIODS: list[Any] = ["hour", "day", "week", "month"]
BY_KEYS: list[Any] = [
    (),
    ("user",),
    ("model",),
    ("period",),
    ("user", "model"),
    ("user", "period"),
    ("model", "period"),
    ("user", "model", "period"),
]


# --- helpers -----------------------------------------------------------------------------------


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "credits.db"


@pytest.fixture
def store(path: Path) -> Iterator[SQLiteStore]:
    with SQLiteStore(path, durability="normal") as opened:
        yield opened


def tallied(store: SQLiteStore, query: UsageQuery) -> list[UsageRow]:
    """What ``rules.Tally`` makes of every ledger of ``store``."""
    tally = rules.Tally(query)
    for user_id in store.users():
        for entry in store.ledger(user_id):
            tally.add(entry)
    return tally.rows()


def shown(rows: list[UsageRow]) -> list[tuple[Any, ...]]:
    """Rows sorted, with the amounts as text: equal places, not only equal values."""
    return [
        (
            row.user_id,
            row.model,
            row.period_start,
            row.calls,
            row.usage,
            str(row.cost),
            str(row.charged),
        )
        for row in rules.sort_usage(rows)
    ]


def usage_queries(seed: int, moments: list[datetime]) -> Iterator[UsageQuery]:
    """Every grouping and period, each with a few users and ranges."""
    pick = random.Random(seed)
    for by in BY_KEYS:
        for period in PERIODS if "period" in by else [None]:
            for _ in range(3):
                since, until = ordered_range(
                    pick.choice([None, *moments]), pick.choice([None, *moments])
                )
                user = pick.choice([None, None, *USERS, "nobody"])
                yield UsageQuery(user, since, until, by, period)


def ordered_range(since: datetime | None, until: datetime | None) -> tuple[Any, Any]:
    """``since`` before ``until`` (swapped if need be; equal ones end a microsecond later)."""
    if since is None or until is None or since < until:
        return since, until
    if since == until:
        after = near(until)[-1]
        return since, after if after > until else None
    return until, since


def near(moment: datetime) -> list[datetime]:
    """``moment`` and the microseconds either side of it that exist."""
    found = []
    for step in (-US, timedelta(0), US):
        with contextlib.suppress(OverflowError):
            found.append(moment + step)
    return found


def assert_sums_match(store: SQLiteStore, queries: Iterator[UsageQuery] | list[UsageQuery]) -> int:
    checked = 0
    for query in queries:
        assert shown(store.sum_usage(query)) == shown(tallied(store, query)), query
        checked += 1
    return checked


def run_workload(manager: BalanceManager, clock: FakeClock, seed: int, steps: int) -> None:
    """Priced and plain charges, grants, strict charges, holds settled and released."""
    pick = random.Random(seed)
    for _ in range(steps):
        user = pick.choice(USERS)
        clock.set(
            pick.choice(WORKLOAD_EDGES)
            + pick.choice([timedelta(0), timedelta(minutes=pick.randrange(90))])
        )
        kind = pick.choice(
            ["priced", "priced", "plain", "plain", "grant", "strict", "settle", "release"]
        )
        usage = TokenUsage(
            input=pick.choice([0, 1, 777, 10**6, 10**10]),
            output=pick.randrange(5000),
            cache_write=pick.randrange(100),
            cache_read=pick.randrange(100),
        )
        amount = pick.choice(AMOUNTS)
        try:
            if kind == "priced":
                manager.charge(user, model=pick.choice(MODELS), usage=usage)
            elif kind == "plain":
                manager.charge(user, amount, model=pick.choice([None, "house"]))
            elif kind == "grant":
                manager.grant(user, amount)
            elif kind == "strict":
                manager.charge(user, amount, strict=True)
            elif kind == "settle":
                held = manager.hold(user, pick.choice(AMOUNTS[:4]))
                clock.advance(timedelta(seconds=pick.randrange(1, 4000)))
                if pick.random() < 0.5:
                    manager.settle(held, model=pick.choice(MODELS), usage=usage)
                else:
                    manager.settle(held, amount)
            else:
                held = manager.hold(user, pick.choice(AMOUNTS[:4]))
                manager.release(held)
        except InsufficientBalance:
            pass


def raw(path: Path, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql, params).fetchall()


def entry(user_id: str, when: datetime, amount: Any, **fields: Any) -> LedgerEntry:
    """A charge entry as the rules would write it (a test may commit it to a store itself)."""
    return LedgerEntry(
        id=f"e-{next(NUMBERS)}",
        user_id=user_id,
        kind=fields.pop("kind", EntryKind.CHARGE),
        amount=Decimal(amount),
        balance_after=Decimal(0),
        at=when,
        **fields,
    )


def commit_entries(store: SQLiteStore, user_id: str, entries: list[LedgerEntry]) -> None:
    """Commit ``entries`` to ``user_id``'s ledger in one write (opening the account if new)."""
    account = store.load(user_id)
    if account is None:
        BalanceManager(store, CONFIG).balance(user_id)
        account = store.load(user_id)
    assert account is not None
    moved = attrs.evolve(account, version=account.version + 1)
    store.commit(moved, entries, expected_version=account.version)


# --- 1. sums --------------------------------------------------------------------------------


def test_sums_equal_the_tally_of_the_ledgers(store: SQLiteStore) -> None:
    clock = FakeClock(EDGES[0])
    manager = BalanceManager(store, CONFIG, clock=clock)
    run_workload(manager, clock, seed=15, steps=300)
    kinds = {
        kind for (kind,) in raw(Path(store.path), "SELECT DISTINCT kind FROM creditmeter_ledger")
    }
    assert {"open", "grant", "charge", "release"} <= kinds
    charges = [e for u in store.users() for e in store.ledger(u) if e.kind is EntryKind.CHARGE]
    assert any(e.cost is not None and e.cost != -e.amount for e in charges)  # clamped
    assert any(e.usage is not None for e in charges)
    assert any(e.usage is None for e in charges)
    # Both ways of summing are used: rows with more than 9 places come from the JSON.
    untyped = raw(
        Path(store.path), "SELECT count(*) FROM creditmeter_ledger WHERE amount_units IS NULL"
    )
    assert untyped[0][0] > 0
    assert assert_sums_match(store, usage_queries(15, EDGES)) == 60


def test_30_places_and_near_10_15_sum_exactly(store: SQLiteStore) -> None:
    tiny = Decimal("0.000000000000000000000000000001")
    huge = Decimal("999999999999999.123456789")
    huge_and_tiny = Decimal("999999999999999.123456789000000000000000000001")
    when = at(2024, 5, 5, 5)
    commit_entries(
        store,
        "alice",
        [
            entry("alice", when, -tiny, model="m"),
            entry("alice", when, -huge, model="m"),
            # clamped: the cost is more than was taken
            entry("alice", when, -huge, cost=huge_and_tiny, model="m"),
            entry("alice", when, Decimal("-1.50"), model="m"),
            entry("alice", when, -(10**15), model="m"),
        ],
    )
    rows = store.sum_usage(UsageQuery("alice", None, None, ("model",), None))
    assert len(rows) == 1
    assert rows[0].calls == 5
    assert str(rows[0].charged) == "2999999999999999.746913578000000000000000000001"
    assert str(rows[0].cost) == "2999999999999999.746913578000000000000000000002"
    assert shown(rows) == shown(tallied(store, UsageQuery("alice", None, None, ("model",), None)))
    # The 30-place row went through the JSON, the huge one through SQL.
    untyped = raw(
        Path(store.path), "SELECT count(*) FROM creditmeter_ledger WHERE amount_units IS NULL"
    )
    assert untyped == [(2,)]


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.decimals(allow_nan=False, allow_infinity=False),
        st.decimals(allow_nan=False, allow_infinity=False, places=9),
        st.integers(-(2**70), 2**70).map(Decimal),
        st.sampled_from(
            [
                Decimal(text)
                for text in (
                    "-0",
                    "-0.00",
                    "0E+3",
                    "1E-7",
                    "-1.5",
                    "4611686018427387904",
                    "-4611686018427387903.999999999",
                    "1.0000000000",
                )
            ]
        ),
    )
)
def test_the_typed_amount_read_off_the_text_equals_the_one_from_its_parts(value: Decimal) -> None:
    """Tried: any finite decimal, those of 9 places, integers past 2**62 either way,
    negative zeros, exponents either way, the bounds, 10 places."""
    assert sqlite_store._money(value) == sqlite_store._money_exactly(value)


def test_remembered_typed_amounts_keep_each_texts_places_and_stay_bounded() -> None:
    """Equal values of other notations (1, 1.0, 1.00, -1) are remembered apart; the memory
    of amounts seen is cleared at its limit rather than growing."""
    for text in ("1", "1.0", "1.00", "-1", "1", "1.0"):
        assert sqlite_store._money(Decimal(text)) == sqlite_store._money_exactly(Decimal(text))
    assert sqlite_store._money(Decimal("1.00"))[2] == 2
    assert sqlite_store._money(Decimal(1))[2] == 0
    for n in range(sqlite_store._MONEY_SEEN_LIMIT + 10):
        assert sqlite_store._money(Decimal(n).scaleb(-3)) == (n // 1000, n % 1000 * 10**6, 3)
    assert len(sqlite_store._MONEY_SEEN) <= sqlite_store._MONEY_SEEN_LIMIT


def test_a_sum_past_2_63_is_still_exact(store: SQLiteStore) -> None:
    """9,300 charges of 10**15 pass SQLite's integer range: the sum falls back to the JSON."""
    count = 9_300
    when = at(2024, 1, 1)
    commit_entries(
        store,
        "whale",
        [entry("whale", when + i * US, -(10**15), model="big") for i in range(count)],
    )
    for by in BY_KEYS[:3]:
        query = UsageQuery(None, None, None, by, "day" if "period" in by else None)
        rows = store.sum_usage(query)
        assert shown(rows) == shown(tallied(store, query))
        assert sum(row.charged for row in rows) == count * 10**15
    typed = raw(
        Path(store.path), "SELECT sum(amount_units) FROM creditmeter_ledger WHERE seq < 9000"
    )
    assert typed[0][0] < -(2**62)  # the typed column holds them: SQLite's SUM is what overflows


def test_period_starts_and_ranges_at_the_edges(store: SQLiteStore) -> None:
    clock = FakeClock(EDGES[0])
    manager = BalanceManager(store, CONFIG, clock=clock)
    moments = sorted({moment for edge in EDGES for moment in near(edge)})
    for number, moment in enumerate(moments):
        clock.set(moment)
        manager.charge(USERS[number % 3], 1, model=MODELS[number % 2])
    for moment in moments:
        stored = raw(
            Path(store.path),
            "SELECT at_us FROM creditmeter_ledger WHERE kind = 'charge' AND data LIKE ?",
            f'%"at":"{moment.isoformat()}"%',
        )
        assert stored == [((moment - at(1970, 1, 1)) // US,)]  # floored before 1970 too
    for period in PERIODS:
        query = UsageQuery(None, None, None, ("period",), period)
        rows = store.sum_usage(query)
        assert shown(rows) == shown(tallied(store, query))
        assert {row.period_start for row in rows} == {
            rules.period_start(m, period) for m in moments
        }
    # since is inclusive and until exclusive, to the microsecond.
    for edge in EDGES:
        around = near(edge)
        before = around[0] if around[0] < edge else None
        after = around[-1] if around[-1] > edge else None
        for since, until in [(edge, None), (None, edge), (edge, after), (before, edge)]:
            query = UsageQuery(None, since, until, ("user",), None)
            assert shown(store.sum_usage(query)) == shown(tallied(store, query)), query
        exactly = UsageQuery(None, edge, after, (), None)
        assert [row.calls for row in store.sum_usage(exactly)] == [1]


def test_no_charges_no_rows(store: SQLiteStore) -> None:
    BalanceManager(store, CONFIG).grant("alice", 5)
    for by in BY_KEYS:
        period = "day" if "period" in by else None
        assert store.sum_usage(UsageQuery(None, None, None, by, period)) == []


# --- 2. scans --------------------------------------------------------------------------------


def every_entry_in_seq_order(path: Path) -> list[tuple[int, LedgerEntry]]:
    return [
        (seq, entry_from_json(data))
        for seq, data in raw(path, "SELECT seq, data FROM creditmeter_ledger ORDER BY seq")
    ]


def scan_all(store: SQLiteStore, query: EntryQuery, limits: list[int]) -> list[LedgerEntry]:
    found: list[LedgerEntry] = []
    position = None
    for page in range(100_000):
        scan = store.scan_entries(query, after=position, limit=limits[page % len(limits)])
        assert len(scan.entries) <= limits[page % len(limits)]
        found.extend(scan.entries)
        if scan.position is None:
            return found
        position = scan.position
    raise AssertionError("the scan never ended")


def covers(query: EntryQuery, item: LedgerEntry) -> bool:
    return (
        (query.user_id is None or item.user_id == query.user_id)
        and rules.in_range(item.at, query.since, query.until)
        and (query.kinds is None or item.kind in query.kinds)
    )


def test_scans_give_the_covered_entries_in_seq_order(store: SQLiteStore) -> None:
    clock = FakeClock(EDGES[0])
    run_workload(BalanceManager(store, CONFIG, clock=clock), clock, seed=3, steps=80)
    ordered = [item for _, item in every_entry_in_seq_order(Path(store.path))]
    pick = random.Random(3)
    kinds_choices = [
        None,
        frozenset({EntryKind.CHARGE}),
        frozenset({EntryKind.GRANT, EntryKind.RELEASE, EntryKind.OPEN}),
    ]
    for _ in range(40):
        since, until = ordered_range(pick.choice([None, *EDGES]), pick.choice([None, *EDGES]))
        query = EntryQuery(
            pick.choice([None, None, *USERS]), since, until, pick.choice(kinds_choices)
        )
        expected = [item for item in ordered if covers(query, item)]
        assert scan_all(store, query, [pick.randrange(1, 6), pick.randrange(1, 30)]) == expected, (
            query
        )


def test_a_full_last_page_ends_the_scan(store: SQLiteStore) -> None:
    manager = BalanceManager(store, CONFIG)
    for _ in range(3):
        manager.charge("alice", 1)
    query = EntryQuery(None, None, None, None)
    first = store.scan_entries(query, after=None, limit=2)
    assert [e.kind for e in first.entries] == [EntryKind.OPEN, EntryKind.CHARGE]
    last = store.scan_entries(query, after=first.position, limit=2)
    assert len(last.entries) == 2
    assert last.position is None
    manager.charge("alice", 1)  # committed after the end: read from the last position given
    assert [e.amount for e in store.scan_entries(query, after=first.position, limit=5).entries] == [
        -1
    ] * 3


@pytest.mark.parametrize(
    "position",
    ["", "x", "-1", "+1", "1.0", " 1", "1 ", "1\n", "0x10", "١٢", "9" * 20, str(2**63), "1e3"],
)
def test_malformed_positions_are_invalid_input(store: SQLiteStore, position: str) -> None:
    query = EntryQuery(None, None, None, None)
    with pytest.raises(InvalidInput):
        store.scan_entries(query, after=position, limit=5)
    # The same through the manager, in a cursor of the right store and query.
    cursor = _query.encode_cursor("SQLiteStore", query, position)
    with pytest.raises(InvalidInput):
        BalanceManager(store, CONFIG).entries(after=cursor)


def test_a_position_past_the_end_reads_nothing(store: SQLiteStore) -> None:
    BalanceManager(store, CONFIG).charge("alice", 1)
    query = EntryQuery(None, None, None, None)
    assert store.scan_entries(query, after=str(2**63 - 1), limit=5) == ([], None)
    assert len(store.scan_entries(query, after="0", limit=5).entries) == 2


# --- 3. users_page ---------------------------------------------------------------------------


def test_users_page_pages_in_code_point_order(store: SQLiteStore) -> None:
    # U+FF5E sorts before U+1F600 by code point (and in UTF-8) but after it in UTF-16.
    ids = [
        "b",
        "a",
        "Zoë",
        "zoe",
        "é",
        "ß",
        "Ω",
        "中文",
        "\uff5e",
        "😀",
        "\U0010fffd",
        "a b",
        "a!",
        "A",
    ]
    manager = BalanceManager(store, CONFIG)
    for user_id in ids:
        manager.balance(user_id)
    assert store.users_page(after=None, limit=100) == sorted(ids)
    paged: list[str] = []
    after = None
    for _ in range(len(ids)):
        page = store.users_page(after=after, limit=3)
        paged.extend(page)
        if len(page) < 3:
            break
        after = page[-1]
    assert paged == sorted(ids)
    assert store.users_page(after="b", limit=2) == sorted(ids)[sorted(ids).index("b") + 1 :][:2]
    assert store.users_page(after="\uff5e", limit=5) == ["😀", "\U0010fffd"]
    assert store.users_page(after="zz", limit=100) == sorted(i for i in ids if i > "zz")
    assert list(manager.iter_users(page_size=4)) == sorted(ids)


# --- 4. schema 1 files --------------------------------------------------------------------------

OLD_SCHEMA = """
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
    data TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS creditmeter_ledger_request
    ON creditmeter_ledger (user_id, request_id) WHERE request_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS creditmeter_ledger_user ON creditmeter_ledger (user_id, seq);
INSERT OR IGNORE INTO creditmeter_meta (key, value) VALUES ('schema', '1');
"""


def write_v1_file(path: Path, seed: int = 1) -> None:
    """A schema 1 file as the previous version wrote it: the old DDL, JSON rows only."""
    scratch = path.parent / f"scratch-{seed}.db"
    clock = FakeClock(EDGES[0])
    with SQLiteStore(scratch, durability="normal") as made:  # the rules' entries, as JSON
        run_workload(BalanceManager(made, CONFIG, clock=clock), clock, seed=seed, steps=60)
        accounts = [made.load(user_id) for user_id in made.users()]
    rows = raw(scratch, "SELECT user_id, request_id, data FROM creditmeter_ledger ORDER BY seq")
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(OLD_SCHEMA)
        conn.executemany(
            "INSERT INTO creditmeter_accounts (user_id, version, data) VALUES (?, ?, ?)",
            [(a.user_id, a.version, account_to_json(a)) for a in accounts if a is not None],
        )
        conn.executemany(
            "INSERT INTO creditmeter_ledger (user_id, request_id, data) VALUES (?, ?, ?)", rows
        )
        conn.commit()


def test_a_schema_1_file_is_upgraded_in_place(path: Path) -> None:
    write_v1_file(path)
    before = raw(path, "SELECT seq, user_id, request_id, data FROM creditmeter_ledger ORDER BY seq")
    with SQLiteStore(path, durability="normal") as store:
        assert raw(path, "SELECT value FROM creditmeter_meta WHERE key = 'schema'") == [("2",)]
        assert (
            raw(path, "SELECT seq, user_id, request_id, data FROM creditmeter_ledger ORDER BY seq")
            == before
        )
        assert raw(
            path, "SELECT count(*) FROM creditmeter_ledger WHERE at_us IS NULL OR kind IS NULL"
        ) == [(0,)]
        indexes = {
            name for (name,) in raw(path, "SELECT name FROM sqlite_master WHERE type = 'index'")
        }
        assert {"creditmeter_ledger_at", "creditmeter_ledger_unsummed"} <= indexes
        assert assert_sums_match(store, usage_queries(1, EDGES)) == 60
        ordered = [item for _, item in every_entry_in_seq_order(path)]
        query = EntryQuery(None, EDGES[2], EDGES[9], frozenset({EntryKind.CHARGE}))
        assert scan_all(store, query, [3]) == [item for item in ordered if covers(query, item)]
        # New writes go on, typed.
        BalanceManager(store, CONFIG, clock=FakeClock(EDGES[3])).charge("alice", 2, model="m")
        assert (
            assert_sums_match(store, [UsageQuery(None, None, None, ("user", "model"), None)]) == 1
        )
    with SQLiteStore(path) as again:  # a second open changes nothing
        assert again.sum_usage(UsageQuery(None, None, None, (), None)) == tallied(
            again, UsageQuery(None, None, None, (), None)
        )


def open_and_charge(path: str, name: str, go: Any, out: Any) -> None:
    """In a process of its own: open the file when told to, charge once, report."""
    try:
        go.wait(30)
        with SQLiteStore(path, durability="normal") as store:
            BalanceManager(store, CONFIG).charge("alice", 1, request_id=f"from-{name}")
        out.put((name, "ok"))
    except Exception as exc:  # reported to the test, which fails on it
        out.put((name, repr(exc)))


def test_processes_opening_a_schema_1_file_at_once_upgrade_it_once(path: Path) -> None:
    write_v1_file(path, seed=2)
    go, out = SPAWN.Event(), SPAWN.Queue()
    workers = [
        SPAWN.Process(target=open_and_charge, args=(str(path), f"p{n}", go, out)) for n in range(3)
    ]
    for worker in workers:
        worker.start()
    go.set()
    results = sorted(out.get(timeout=60) for _ in workers)
    for worker in workers:
        worker.join(30)
    assert results == [(f"p{n}", "ok") for n in range(3)]
    columns = [row[1] for row in raw(path, "PRAGMA table_info(creditmeter_ledger)")]
    assert len(columns) == len(set(columns)) == 17
    with SQLiteStore(path) as store:
        assert (
            assert_sums_match(store, [UsageQuery(None, None, None, ("user", "model"), None)]) == 1
        )
        charges = store.sum_usage(UsageQuery("alice", None, None, ("model",), None))
        assert sum(row.calls for row in charges) == sum(
            1 for e in store.ledger("alice") if e.kind is EntryKind.CHARGE
        )


def test_rows_older_code_writes_after_the_upgrade_are_counted(path: Path) -> None:
    """A process still running the previous version inserts JSON only (NULL typed columns)."""
    with SQLiteStore(path, durability="normal") as store:
        manager = BalanceManager(store, CONFIG, clock=FakeClock(at(2024, 3, 1)))
        manager.charge("alice", 3, model="m")
        late = entry(
            "alice", at(2024, 3, 2), Decimal("-2.25"), model="m", usage=TokenUsage(input=9)
        )
        grant = entry("alice", at(2024, 3, 3), 5, kind=EntryKind.GRANT)
        with contextlib.closing(sqlite3.connect(path)) as conn:  # what schema 1 code runs
            conn.executemany(
                "INSERT INTO creditmeter_ledger (user_id, request_id, data) VALUES (?, ?, ?)",
                [("alice", None, entry_to_json(late)), ("alice", None, entry_to_json(grant))],
            )
            conn.commit()
        query = UsageQuery(None, None, None, ("model", "period"), "day")
        rows = store.sum_usage(query)
        assert shown(rows) == shown(tallied(store, query))
        assert sum(row.calls for row in rows) == 2
        assert sum(row.usage.input for row in rows) == 9
        for scan in [
            EntryQuery(None, at(2024, 3, 2), None, None),
            EntryQuery(None, None, None, frozenset({EntryKind.GRANT})),
            EntryQuery("alice", at(2024, 3, 1, 12), at(2024, 3, 3), None),
        ]:
            assert scan_all(store, scan, [1]) == [
                item for _, item in every_entry_in_seq_order(path) if covers(scan, item)
            ]
    with SQLiteStore(path) as reopened:  # the next open fills them in
        assert raw(path, "SELECT count(*) FROM creditmeter_ledger WHERE at_us IS NULL") == [(0,)]
        assert shown(reopened.sum_usage(query)) == shown(rows)


def test_an_unknown_schema_is_a_store_error(path: Path) -> None:
    SQLiteStore(path).close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("UPDATE creditmeter_meta SET value = '3' WHERE key = 'schema'")
        conn.commit()
    before = raw(path, "SELECT * FROM sqlite_master")
    with pytest.raises(StoreError, match="unknown creditmeter schema"):
        SQLiteStore(path)
    assert raw(path, "SELECT * FROM sqlite_master") == before


def read_only_reports(path: str, out: Any) -> None:
    """As ``nobody`` when run by root (root ignores permission bits): report from a v1 file."""
    try:
        if os.geteuid() == 0:
            with (
                tempfile.TemporaryDirectory() as warm,  # import everything while we may
                SQLiteStore(Path(warm) / "w.db") as scratch,
            ):
                BalanceManager(scratch, CONFIG).charge("u", 1)
                scratch.sum_usage(UsageQuery(None, None, None, ("period",), "month"))
                scratch.scan_entries(
                    EntryQuery(None, at(2000, 1, 1), None, None), after=None, limit=1
                )
            nobody = pwd.getpwnam("nobody")
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
        with SQLiteStore(path) as store:
            result: dict[str, Any] = {"read_only": store.read_only}
            sums = [q for q in usage_queries(4, EDGES) if q.user_id != "nobody"][::4]
            result["sums"] = all(
                shown(store.sum_usage(q)) == shown(tallied(store, q)) for q in sums
            )
            ordered = [item for _, item in every_entry_in_seq_order(Path(path))]
            query = EntryQuery(None, EDGES[1], EDGES[10], frozenset({EntryKind.CHARGE}))
            scanned = scan_all(store, query, [2])
            result["scan"] = scanned == [item for item in ordered if covers(query, item)]
            result["users"] = store.users_page(after=None, limit=10) == store.users()
        out.put(result)
    except Exception as exc:
        out.put({"error": repr(exc)})


def test_a_read_only_schema_1_file_is_reported_from_its_json() -> None:
    base = Path(tempfile.mkdtemp(prefix="creditmeter-ro-", dir="/tmp"))
    try:
        base.chmod(0o755)
        path = base / "credits.db"
        write_v1_file(path, seed=4)
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("PRAGMA journal_mode = DELETE")  # no -wal: read as immutable
        (base / "scratch-4.db").unlink()
        path.chmod(0o444)
        if os.geteuid() != 0:
            base.chmod(0o555)
        out = SPAWN.Queue()
        reader = SPAWN.Process(target=read_only_reports, args=(str(path), out))
        reader.start()
        result = out.get(timeout=60)
        reader.join(30)
        assert result == {
            "read_only": True,
            "sums": True,
            "scan": True,
            "users": True,
        }
        assert raw(path, "SELECT value FROM creditmeter_meta WHERE key = 'schema'") == [("1",)]
    finally:
        base.chmod(0o755)
        shutil.rmtree(base)


# --- 5. scans while other processes commit ---------------------------------------------------


def write_charges(path: str, name: str, count: int, gates: Any, out: Any) -> None:
    """A writer process: ``count`` grants and charges over three users, one commit each.

    Half way it waits until the reader has read a page: the second half is
    committed after positions were handed out.
    """
    go, started = gates
    try:
        go.wait(30)
        with SQLiteStore(path, durability="normal") as store:
            manager = BalanceManager(store, CONFIG)
            for number in range(count):
                if number == count // 2:
                    started.wait(30)
                user = USERS[number % 3]
                if number % 5 == 0:
                    manager.grant(user, 2, request_id=f"{name}-{number}")
                else:
                    manager.charge(user, 1, model=MODELS[number % 3], request_id=f"{name}-{number}")
        out.put((name, "ok"))
    except Exception as exc:
        out.put((name, repr(exc)))


def page_through(path: str, gates: Any, done: Any, out: Any) -> None:
    """The reader: pages through two scans at once, with small limits, until writers are done.

    A page that ends with no position (nothing more just now) is read again
    later from the position before it; once the writers are done, such a
    page is the end of its scan.
    """
    go, started = gates
    try:
        go.wait(30)
        queries = {
            "all": EntryQuery(None, None, None, None),
            "charges": EntryQuery(None, at(2000, 1, 1), None, frozenset({EntryKind.CHARGE})),
        }
        seen: dict[str, list[str]] = {name: [] for name in queries}
        positions: dict[str, str | None] = dict.fromkeys(queries)
        pages = 0
        with SQLiteStore(path) as store:
            while queries:
                finished = done.is_set()  # before the reads: then they saw every commit
                for name, query in list(queries.items()):
                    scan = store.scan_entries(query, after=positions[name], limit=pages % 7 + 1)
                    pages += 1
                    if scan.position is not None:
                        seen[name].extend(e.id for e in scan.entries)
                        positions[name] = scan.position
                    elif finished:
                        seen[name].extend(e.id for e in scan.entries)
                        del queries[name]
                started.set()
                if not finished:
                    time.sleep(0.001)  # let the writers on: the machine is small
        out.put(("reader", seen, pages))
    except Exception as exc:
        out.put(("reader", repr(exc), 0))


def test_paging_while_two_processes_commit_sees_every_entry_once_in_seq_order(path: Path) -> None:
    SQLiteStore(path).close()
    gates, done, out = (SPAWN.Event(), SPAWN.Event()), SPAWN.Event(), SPAWN.Queue()
    writers = [
        SPAWN.Process(target=write_charges, args=(str(path), f"w{n}", 200, gates, out))
        for n in range(2)
    ]
    reader = SPAWN.Process(target=page_through, args=(str(path), gates, done, out))
    for process in [*writers, reader]:
        process.start()
    gates[0].set()
    finished = [out.get(timeout=120) for _ in writers]
    done.set()
    _, seen, pages = out.get(timeout=120)
    for process in [*writers, reader]:
        process.join(30)
    assert sorted(finished) == [("w0", "ok"), ("w1", "ok")]
    assert isinstance(seen, dict), seen
    everything = every_entry_in_seq_order(path)
    assert len(everything) == 2 * 200 + 3  # and three opens
    assert seen["all"] == [item.id for _, item in everything]
    assert seen["charges"] == [item.id for _, item in everything if item.kind is EntryKind.CHARGE]
    assert pages > 2 * len(everything) / 7


# --- 6. the async twin -----------------------------------------------------------------------


def test_the_async_store_offers_the_same_reports(path: Path) -> None:
    clock = FakeClock(EDGES[0])
    with SQLiteStore(path, durability="normal") as store:
        run_workload(BalanceManager(store, CONFIG, clock=clock), clock, seed=6, steps=40)
        usage = UsageQuery(None, None, None, ("user", "model", "period"), "week")
        scan = EntryQuery(None, EDGES[0], None, frozenset({EntryKind.CHARGE}))
        expected = (
            store.sum_usage(usage),
            scan_all(store, scan, [4]),
            store.users_page(after="alice", limit=5),
        )

    async def read() -> tuple[Any, ...]:
        async with AsyncSQLiteStore(path) as astore:
            found, position = [], None
            while True:
                page = await astore.scan_entries(scan, after=position, limit=4)
                found.extend(page.entries)
                if page.position is None:
                    break
                position = page.position
            with pytest.raises(InvalidInput):
                await astore.scan_entries(scan, after="?", limit=4)
            return (
                await astore.sum_usage(usage),
                found,
                await astore.users_page(after="alice", limit=5),
            )

    got = asyncio.run(read())
    assert shown(got[0]) == shown(expected[0])
    assert got[1:] == expected[1:]
