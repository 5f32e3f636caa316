"""Reports on Redis: ``scan_entries``, ``sum_usage`` and ``users_page`` of both Redis stores.

On a real Redis server (db 15, a key prefix of each test's own). Every sum is
held to what ``rules.Tally`` makes of ``ledger()``: a varied workload (priced
charges with usage, plain charges, grants, holds settled and released,
charges clamped at zero, amounts with 30 decimal places), grouped every way,
over ranges whose ends fall on entries. Entries whose times run far ahead of
or behind the server's clock are still found by narrow ranges. Writers in
threads commit while a reader pages with small limits: each pass reads a
prefix of the commit order, every entry once. User ids page in code point
order, non-ASCII ones included, also from data written before the sorted ids
existed. Malformed positions and limits are ``InvalidInput``; a server that
cannot be reached, a log key of another type and a corrupt log are
``StoreError``.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import socket
import threading
from datetime import datetime, timedelta, timezone
from decimal import Decimal, localcontext

import pytest

if os.environ.get("CREDITMETER_REQUIRE_SERVICES") != "1":
    pytest.importorskip("redis", reason="the redis package is not installed: pip install redis")

import redis
from services import REDIS_URL, need, unique

from creditmeter import (
    AsyncBalanceManager,
    BalanceConfig,
    BalanceManager,
    EntryKind,
    InvalidInput,
    StoreError,
    TokenUsage,
    rules,
)
from creditmeter.queries import EntryQuery, UsageQuery
from creditmeter.reports import _query
from creditmeter.stores.base import AsyncReportStore, ReportStore
from creditmeter.stores.redis import AsyncRedisStore, RedisStore
from creditmeter.testing import make_account, make_entry

START = 10**7
CONFIG = BalanceConfig(enabled=True, start_balance=START)
NOW = datetime.now(timezone.utc).replace(microsecond=0)
TINY = Decimal("0.000000000000000000000000000001")  # 30 places
FINE = Decimal("12.123456789012345678901234567891")


@pytest.fixture(autouse=True)
def _redis_server() -> None:
    need("redis", lambda: raw().ping())


def raw() -> redis.Redis:
    """A plain client on the test server, for looking behind the store's back."""
    return redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)


def drop_keys(prefix: str) -> None:
    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"
    with raw() as client:
        keys = list(client.scan_iter(match=pattern, count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])


@pytest.fixture
def prefix():
    chosen = unique("cmreport:")
    yield chosen
    drop_keys(chosen)


@pytest.fixture
def store(prefix):
    with RedisStore(REDIS_URL, prefix=prefix) as opened:
        yield opened


class Clock:
    """The managers' clock, moved by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **step: float) -> None:
        self.now += timedelta(**step)


USERS = ["alice", "bob", "é", "e\u0301", "中文", "\U0001f600", "a:b{c}"]
MODELS = ["gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet"]


def workload(meter: BalanceManager, clock: Clock, seed: int = 7, steps: int = 120) -> None:
    """Every kind of entry, at times hours apart across weeks and months."""
    rnd = random.Random(seed)
    for _ in range(steps):
        user = rnd.choice(USERS)
        pick = rnd.random()
        if pick < 0.35:
            usage = TokenUsage(
                input=rnd.randint(0, 3000),
                output=rnd.randint(0, 900),
                cache_write=rnd.choice([0, 0, 120]),
                cache_read=rnd.choice([0, 40]),
            )
            meter.charge(user, model=rnd.choice(MODELS), usage=usage)
        elif pick < 0.5:
            meter.charge(user, rnd.choice([Decimal(3), FINE, TINY]))
        elif pick < 0.6:
            meter.charge(user, Decimal(2), model=rnd.choice(MODELS))  # a model, no usage
        elif pick < 0.7:
            meter.grant(user, rnd.choice([Decimal(50), FINE, TINY]))
        elif pick < 0.8:
            hold = meter.hold(user, 40)
            clock.advance(minutes=rnd.randint(1, 90))
            meter.settle(hold, model=rnd.choice(MODELS), usage=TokenUsage(input=10, output=5))
        elif pick < 0.87:
            hold = meter.hold(user, 25, model="gpt-4o", usage=TokenUsage(input=5))
            meter.release(hold)
        else:
            meter.charge("poor", rnd.choice([Decimal(START * 2), FINE]))  # clamped at zero
        clock.advance(hours=rnd.choice([1, 3, 7, 26]), minutes=rnd.randint(0, 59))


def expected(store: RedisStore, query: UsageQuery) -> list:
    tally = rules.Tally(query)
    for user in store.users():
        for entry in store.ledger(user):
            tally.add(entry)
    return tally.rows()


def every_entry(store: RedisStore) -> list:
    return [entry for user in store.users() for entry in store.ledger(user)]


def queries(times: list[datetime], users: list[str]) -> list[UsageQuery]:
    middle, late = times[len(times) // 3], times[2 * len(times) // 3]
    ranges = [(None, None), (middle, None), (None, late), (middle, late), (late, late + TICK)]
    ranges.append((times[0] - timedelta(days=400), times[0]))  # before everything: empty
    groupings = [
        ((), None),
        (("user",), None),
        (("model",), None),
        (("user", "model"), None),
        *((("period",), period) for period in ("hour", "day", "week", "month")),
        (("user", "model", "period"), "day"),
    ]
    return [
        _query.usage_query(user, since, until, by, period)
        for since, until in ranges
        for by, period in groupings
        for user in (None, *users)
    ]


TICK = timedelta(microseconds=1)


# --- sums ----------------------------------------------------------------------


def test_the_stores_are_report_stores(store):
    assert isinstance(store, ReportStore)
    assert isinstance(AsyncRedisStore(REDIS_URL, prefix="unused:"), AsyncReportStore)


def test_sums_equal_tally_over_the_ledgers(store):
    clock = Clock(NOW - timedelta(days=70))
    meter = BalanceManager(store, CONFIG, clock=clock)
    workload(meter, clock)
    times = sorted(entry.at for entry in every_entry(store))
    kinds = {entry.kind for entry in every_entry(store)}
    assert kinds >= {EntryKind.CHARGE, EntryKind.GRANT, EntryKind.RELEASE, EntryKind.OPEN}
    poor = [e for e in store.ledger("poor") if e.kind is EntryKind.CHARGE]
    assert any(e.cost is not None and e.cost != -e.amount for e in poor)  # clamped
    checked = 0
    for query in queries(times, ["alice", "中文", "nobody"]):
        got = rules.sort_usage(store.sum_usage(query))
        assert got == expected(store, query), query
        checked += bool(got)
    assert checked > 50
    # Through the manager too (it sorts, and validates).
    assert meter.usage(by=("user", "model")) == expected(
        store, _query.usage_query(None, None, None, ("user", "model"), None)
    )


def test_sums_are_exact_past_decimals_default_precision(store):
    meter = BalanceManager(store, BalanceConfig(enabled=True, start_balance=10**15))
    amounts = [
        Decimal("123456789012345.123456789012345678901234567891"),
        TINY,
        Decimal("99999999999999.999999999999999999999999999999"),
        FINE,
    ] * 3
    for number, amount in enumerate(amounts):
        meter.charge(f"u{number % 2}", amount)
    (row,) = meter.usage(by=())
    assert row.calls == len(amounts)
    with localcontext() as exact:
        exact.prec = 100
        total = sum(amounts, Decimal(0))
        odd = sum(amounts[1::2], Decimal(0))
    assert str(total) == "670370367037071.740740734074074073407407407346"  # 45 digits
    assert row.charged == row.cost == total
    per_user = {r.user_id: r.charged for r in meter.usage(by="user")}
    assert per_user["u1"] == odd
    assert str(odd) == "36.370370367037037036703703703676"


def test_range_ends_fall_on_entries(store, prefix):
    base = datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=timezone.utc)
    times = [base - TICK, base, base + TICK, base + 2 * TICK, base + 3 * TICK]
    entries = [
        make_entry(
            "alice", balance_after=Decimal(-n - 1), kind=EntryKind.CHARGE, amount=Decimal(-1), at=at
        )
        for n, at in enumerate(times)
    ]
    store.commit(make_account("alice"), entries, expected_version=None)
    since, until = times[1], times[3]  # [since, until): the 2nd and 3rd entries
    for user in (None, "alice"):
        for period in ("hour", "day", "month"):  # base is in February, base + TICK in March
            rows = rules.sort_usage(
                store.sum_usage(_query.usage_query(user, since, until, ("period",), period))
            )
            assert [(r.period_start.month, r.calls) for r in rows] == [(2, 1), (3, 1)]
        (week,) = store.sum_usage(_query.usage_query(user, since, until, ("period",), "week"))
        assert (week.period_start.day, week.calls) == (26, 2)  # Monday, Feb 26
        scan = store.scan_entries(EntryQuery(user, since, until, None), after=None, limit=10)
        assert scan.entries == entries[1:3]
        assert scan.position is None
        assert store.sum_usage(_query.usage_query(user, until, None, (), None))[0].calls == 2
        assert store.sum_usage(_query.usage_query(user, None, since, (), None))[0].calls == 1


def test_entries_far_from_the_servers_clock_are_found_by_narrow_ranges(store, prefix):
    clock = Clock(NOW)
    meter = BalanceManager(store, CONFIG, clock=clock)
    offsets = [timedelta(0), timedelta(days=3), -timedelta(days=30), timedelta(hours=5)]
    made = []
    for number, offset in enumerate(offsets):
        clock.now = datetime.now(timezone.utc) + offset
        made.append(meter.charge(f"user{number}", Decimal(number + 1)))
    with raw() as client:
        skew = client.hgetall(f"{prefix}log-skew")
    assert int(skew[b"ahead"]) >= timedelta(days=3) // timedelta(milliseconds=1) - 60_000
    assert int(skew[b"behind"]) >= timedelta(days=30) // timedelta(milliseconds=1) - 60_000
    charges = frozenset({EntryKind.CHARGE})
    for entry in made:
        query = EntryQuery(None, entry.at, entry.at + TICK, charges)
        assert store.scan_entries(query, after=None, limit=10).entries == [entry]
        (row,) = store.sum_usage(_query.usage_query(None, entry.at, entry.at + TICK, (), None))
        assert row.charged == -entry.amount


# --- scans -----------------------------------------------------------------------


def read_all(store, query: EntryQuery, limit: int) -> list:
    found, position = [], None
    while True:
        scan = store.scan_entries(query, after=position, limit=limit)
        assert len(scan.entries) <= limit
        found += scan.entries
        if scan.position is None:
            return found
        position = scan.position


def test_scans_filter_and_page_in_commit_order(store):
    clock = Clock(NOW - timedelta(days=20))
    meter = BalanceManager(store, CONFIG, clock=clock)
    workload(meter, clock, seed=3, steps=60)
    everything = read_all(store, EntryQuery(None, None, None, None), 1000)
    assert sorted(e.id for e in everything) == sorted(e.id for e in every_entry(store))
    for user in store.users():  # each user's entries in ledger order
        assert [e for e in everything if e.user_id == user] == store.ledger(user)
    times = sorted(e.at for e in everything)
    middle, late = times[len(times) // 3], times[2 * len(times) // 3]
    for user in (None, "alice", "é"):
        for since, until in ((None, None), (middle, None), (None, late), (middle, late)):
            for kinds in (None, frozenset({EntryKind.CHARGE}), frozenset({EntryKind.GRANT})):
                query = EntryQuery(user, since, until, kinds)
                want = [
                    e
                    for e in (everything if user is None else store.ledger(user))
                    if rules.in_range(e.at, since, until) and (kinds is None or e.kind in kinds)
                ]
                for limit in (1, 2, 7, 10_000):
                    assert read_all(store, query, limit) == want, (query, limit)
    page = meter.entries(user="alice", limit=2)  # the manager wraps positions in cursors
    assert page.entries == store.ledger("alice")[:2]
    after = meter.entries(user="alice", after=page.next, limit=2)
    assert after.entries == store.ledger("alice")[2:4]


def test_writers_in_threads_while_a_reader_pages(store, prefix):
    writers, per_writer = 4, 60
    done = threading.Event()
    failures: list[BaseException] = []

    def write(number: int) -> None:
        try:
            with RedisStore(REDIS_URL, prefix=prefix) as own:  # as another process would
                meter = BalanceManager(own if number % 2 else store, CONFIG)
                for step in range(per_writer):
                    user = "shared" if step % 3 == 0 else f"w{number}-{step % 4}"
                    meter.charge(user, 1, model="gpt-4o", request_id=f"{number}:{step}")
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    passes = []
    query = EntryQuery(None, None, None, None)
    while not done.is_set():
        if not any(thread.is_alive() for thread in threads):
            done.set()  # one more pass, after every commit
        passes.append([e.id for e in read_all(store, query, random.choice([1, 2, 3]))])
    for thread in threads:
        thread.join()
    assert not failures
    final = passes[-1]
    ledgers = every_entry(store)
    assert len(final) == len(set(final)) == len(ledgers)  # every entry, once
    assert set(final) == {e.id for e in ledgers}
    by_id = {e.id: e for e in ledgers}
    for user in store.users():
        assert [i for i in final if by_id[i].user_id == user] == [e.id for e in store.ledger(user)]
    assert len(passes) > 1
    for seen in passes:  # read while others committed: a prefix of the commit order
        assert seen == final[: len(seen)]


# --- user ids --------------------------------------------------------------------

IDS = [
    "",
    "A",
    "Z",
    "a",
    "a\x00",
    "ab",
    "z",
    "\x7f",
    "é",
    "e\u0301",
    "ß",
    "中文",
    "\ufffd",
    "\uffff",
    "\U00010000",
    "\U0001f600",
    "{u}",
]


def page_all(store, limit: int, after: str | None = None) -> list[str]:
    found = []
    while True:
        page = store.users_page(after=after, limit=limit)
        found += page
        if len(page) < limit:
            return found
        after = page[-1]


def test_users_page_in_code_point_order(store):
    for user in reversed(IDS):
        store.commit(make_account(user), [], expected_version=None)
    for limit in (1, 2, 5, 100):
        assert page_all(store, limit) == sorted(IDS)
    for after in ("", "a", "a\x00\x00", "é", "\uffff", "\U0010ffff"):
        assert store.users_page(after=after, limit=100) == [u for u in sorted(IDS) if u > after]
    meter = BalanceManager(store, CONFIG)
    assert list(meter.iter_users(page_size=3)) == sorted(IDS)


def test_users_page_builds_the_sorted_ids_for_data_from_before_them(store, prefix):
    for user in IDS:
        store.commit(make_account(user), [], expected_version=None)
    with raw() as client:
        client.delete(f"{prefix}users-sorted")  # as written before this version
        assert page_all(store, 4) == sorted(IDS)
        assert client.zcard(f"{prefix}users-sorted") == len(IDS)
        client.sadd(f"{prefix}users", "old-writer")  # an earlier version, still running
        assert page_all(store, 4) == sorted([*IDS, "old-writer"])


# --- bad input, failures ---------------------------------------------------------

BAD_LOG_POSITIONS = [
    "",
    "abc",
    "1",
    "1-",
    "-1",
    "1-2-3",
    " 1-0",
    "1-0 ",
    "1.5-0",
    "\u0661-0",
    "18446744073709551616-0",
    "0-18446744073709551616",
    "1" * 21 + "-0",
]
BAD_LEDGER_POSITIONS = ["", "-1", "x", "1-0", "+1", " 1", str(2**62 + 1), "9" * 20]


def test_malformed_positions_and_limits_are_invalid_input(store, prefix):
    BalanceManager(store, CONFIG).charge("alice", 1)
    with raw() as client:
        before = {key: client.dump(key) for key in client.scan_iter(match=f"{prefix}*")}
    for position in BAD_LOG_POSITIONS:
        with pytest.raises(InvalidInput, match="cursor"):
            store.scan_entries(EntryQuery(None, None, None, None), after=position, limit=5)
    for position in BAD_LEDGER_POSITIONS:
        with pytest.raises(InvalidInput, match="cursor"):
            store.scan_entries(EntryQuery("alice", None, None, None), after=position, limit=5)
    for limit in (0, -1, 1.5, True):
        with pytest.raises(InvalidInput):
            store.scan_entries(EntryQuery(None, None, None, None), after=None, limit=limit)
        with pytest.raises(InvalidInput):
            store.users_page(after=None, limit=limit)
    with pytest.raises(InvalidInput):
        store.users_page(after="\ud800", limit=5)
    last = f"{2**64 - 1}-{2**64 - 1}"  # well formed: nothing can come after it
    assert store.scan_entries(EntryQuery(None, None, None, None), after=last, limit=5) == (
        [],
        None,
    )
    with raw() as client:
        assert {key: client.dump(key) for key in client.scan_iter(match=f"{prefix}*")} == before


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_server_is_a_store_error():
    query = EntryQuery(None, None, None, None)
    with RedisStore(f"redis://127.0.0.1:{closed_port()}/0", socket_connect_timeout=1) as down:
        for call in (
            lambda: down.scan_entries(query, after=None, limit=5),
            lambda: down.scan_entries(query._replace(user_id="u"), after=None, limit=5),
            lambda: down.sum_usage(_query.usage_query(None, NOW, None, ("user",), None)),
            lambda: down.sum_usage(_query.usage_query("u", None, None, ("user",), None)),
            lambda: down.users_page(after=None, limit=5),
        ):
            with pytest.raises(StoreError) as caught:
                call()
            assert isinstance(caught.value.__cause__, redis.exceptions.ConnectionError)


def test_a_bad_log_is_a_store_error_and_a_commit_writes_nothing(store, prefix):
    meter = BalanceManager(store, CONFIG)
    meter.charge("alice", 1)
    query = EntryQuery(None, None, None, None)
    with raw() as client:
        client.xadd(f"{prefix}log", {"u": "alice"})  # no index
        with pytest.raises(StoreError, match="malformed"):
            store.scan_entries(query, after=None, limit=5)
        client.delete(f"{prefix}log")
        client.xadd(f"{prefix}log", {"u": "alice", "i": "7"})  # no such entry
        with pytest.raises(StoreError, match="not in that user's ledger"):
            store.sum_usage(_query.usage_query(None, None, None, (), None))
        client.delete(f"{prefix}log")
        client.set(f"{prefix}log", "not a stream")
        with pytest.raises(StoreError):
            store.scan_entries(query, after=None, limit=5)
        ledger = store.ledger("alice")
        with pytest.raises(StoreError):
            meter.charge("alice", 1)
        assert store.ledger("alice") == ledger  # refused before its first write


def test_entries_from_before_the_log_are_in_one_users_reports_only(store, prefix):
    meter = BalanceManager(store, CONFIG)
    meter.charge("alice", 5)
    with raw() as client:
        client.delete(f"{prefix}log", f"{prefix}log-skew")  # as written before this version
    meter.charge("alice", 7)
    meter.charge("bob", 1)
    charges = frozenset({EntryKind.CHARGE})
    everyone = store.scan_entries(EntryQuery(None, None, None, charges), after=None, limit=10)
    assert [(e.user_id, e.amount) for e in everyone.entries] == [("alice", -7), ("bob", -1)]
    (alice,) = store.sum_usage(_query.usage_query("alice", None, None, (), None))
    assert alice.charged == 12  # her whole ledger
    rows = store.sum_usage(_query.usage_query(None, None, None, ("user",), None))
    assert {row.user_id: row.charged for row in rows} == {"alice": 7, "bob": 1}


@pytest.mark.parametrize("options", [{"decode_responses": True}, {"protocol": 2}])
def test_clients_that_decode_or_speak_resp2(prefix, options):
    client = redis.Redis.from_url(REDIS_URL, **options)
    try:
        store = RedisStore(client=client, prefix=prefix)
        clock = Clock(NOW - timedelta(days=3))
        meter = BalanceManager(store, CONFIG, clock=clock)
        workload(meter, clock, seed=11, steps=25)
        query = _query.usage_query(None, None, None, ("user", "model"), None)
        assert rules.sort_usage(store.sum_usage(query)) == expected(store, query)
        assert sorted(e.id for e in read_all(store, EntryQuery(None, None, None, None), 4)) == (
            sorted(e.id for e in every_entry(store))
        )
        assert page_all(store, 2) == store.users()
    finally:
        client.close()


# --- async -----------------------------------------------------------------------


def test_the_async_store(prefix):
    async def main() -> None:
        async with AsyncRedisStore(REDIS_URL, prefix=prefix) as store:
            clock = Clock(NOW - timedelta(days=10))
            meter = AsyncBalanceManager(store, CONFIG, clock=clock)
            rnd = random.Random(5)
            for _ in range(40):
                user = rnd.choice(USERS)
                if rnd.random() < 0.6:
                    usage = TokenUsage(input=rnd.randint(1, 500), output=rnd.randint(1, 90))
                    await meter.charge(user, model=rnd.choice(MODELS), usage=usage)
                else:
                    hold = await meter.hold(user, 30)
                    await meter.settle(hold, FINE)
                clock.advance(hours=rnd.randint(1, 30))
            with RedisStore(REDIS_URL, prefix=prefix) as sync:
                everything = every_entry(sync)
                times = sorted(e.at for e in everything)
                for query in queries(times, ["alice"])[::3]:
                    got = rules.sort_usage(await store.sum_usage(query))
                    assert got == expected(sync, query), query
                users = sync.users()
            found, position = [], None
            while True:
                scan = await store.scan_entries(
                    EntryQuery(None, None, None, None), after=position, limit=3
                )
                found += scan.entries
                if scan.position is None:
                    break
                position = scan.position
            assert sorted(e.id for e in found) == sorted(e.id for e in everything)
            assert [u async for u in meter.iter_users(page_size=2)] == users
            with pytest.raises(InvalidInput):
                await store.scan_entries(EntryQuery(None, None, None, None), after="x", limit=3)
        url = f"redis://127.0.0.1:{closed_port()}/0"
        async with AsyncRedisStore(url, socket_connect_timeout=1) as down:
            with pytest.raises(StoreError):
                await down.scan_entries(EntryQuery(None, None, None, None), after=None, limit=3)
            with pytest.raises(StoreError):
                await down.sum_usage(_query.usage_query(None, None, None, (), None))
            with pytest.raises(StoreError):
                await down.users_page(after=None, limit=3)

    asyncio.run(main())
