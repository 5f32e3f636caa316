"""``usage()`` on every backend, and on the generic fallback: sums that match the ledgers exactly.

Every test runs on every backend (the store's own ``sum_usage`` where it
has one) and on the fallback: ``ForwardOnly`` hides everything but the
``BalanceStore`` methods, so the manager has to sum ``ledger()`` itself
(over MemoryStore, sync and async, and SQLiteStore: the fallback only calls
``users()`` and ``ledger()``, which other tests hold every store to).

The property test runs random workloads (priced charges with ``TokenUsage``
on three models, plain charges with and without a model, grants, strict
charges that may be refused, holds settled for more or less than they held
or with a priced usage, holds released, charges clamped at zero) at times
around month ends, the leap day 2024-02-29, week and hour boundaries (the
clock also moves backwards), then compares ``usage()`` for random ``by``
keys, periods, users and ``[since, until)`` (given in UTC and other offsets)
with sums this file computes from ``ledger()`` on its own. The other tests
pin boundaries (since inclusive, until exclusive, at the start of an hour,
day, Monday, month, 2024-02-29 to 03-01, new year), the order of rows, the
fields of ``UsageRow`` and what ``calls``, ``cost`` and ``charged`` count.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from decimal import Decimal, Inexact, localcontext
from typing import Any

import attrs
import pytest
from fallback import open_meter, variants
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from creditmeter import EntryKind, InsufficientBalance, TokenUsage, UsageRow
from creditmeter.testing import FakeClock

LONG = os.environ.get("CREDITMETER_LONG") == "1"
EXAMPLES = 250 if LONG else 25
UTC = timezone.utc
US = timedelta(microseconds=1)
ZONES = [UTC, timezone(timedelta(hours=-8)), timezone(timedelta(hours=5, minutes=30))]
ZONES.append(timezone(timedelta(hours=14)))


def at(*parts: int) -> datetime:
    """A UTC moment: ``at(2024, 2, 29, 13)``."""
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


VARIANTS = variants()
every_backend = pytest.mark.parametrize(("backend", "variant"), VARIANTS, indirect=["backend"])
"""Runs a test on every backend and the fallback."""


@pytest.fixture
def reports(backend, variant, clock):
    return open_meter(backend, variant, clock)


# --- the sums, computed here from the ledgers (not with rules.Tally) -------------------------


def start_of(moment: datetime, period: str) -> datetime:
    """The UTC hour, day, week (from Monday) or month that holds ``moment``."""
    utc = moment.astimezone(UTC)
    if period == "hour":
        return datetime(utc.year, utc.month, utc.day, utc.hour, tzinfo=UTC)
    day = datetime(utc.year, utc.month, utc.day, tzinfo=UTC)
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=utc.weekday())
    return datetime(utc.year, utc.month, 1, tzinfo=UTC)


def expected_rows(entries, *, user=None, since=None, until=None, by=("model",), period=None):
    """The report's rows as tuples, summed from ``entries`` with exact arithmetic."""
    keys = (by,) if isinstance(by, str) else tuple(by)
    groups: dict[tuple, list] = {}
    with localcontext() as exact:
        exact.prec = 200
        exact.traps[Inexact] = True  # a rounded sum fails here, not silently
        for entry in entries:
            if entry.kind != EntryKind.CHARGE:
                continue
            if user is not None and entry.user_id != user:
                continue
            if since is not None and entry.at < since:
                continue
            if until is not None and entry.at >= until:
                continue
            key = (
                entry.user_id if "user" in keys else None,
                entry.model if "model" in keys else None,
                start_of(entry.at, period) if "period" in keys else None,
            )
            sums = groups.setdefault(key, [0, 0, 0, 0, 0, Decimal(0), Decimal(0)])
            sums[0] += 1
            if entry.usage is not None:
                sums[1] += entry.usage.input
                sums[2] += entry.usage.output
                sums[3] += entry.usage.cache_write
                sums[4] += entry.usage.cache_read
            taken = -entry.amount
            sums[5] += taken if entry.cost is None else entry.cost
            sums[6] += taken
    rows = [(*key, s[0], tuple(s[1:5]), s[5], s[6]) for key, s in groups.items()]
    return sorted(
        rows,
        key=lambda row: (row[0] or "", row[1] is not None, row[1] or "", row[2] or at(1970, 1, 1)),
    )


def as_tuples(rows):
    """``UsageRow``s as comparable tuples, after checking their types."""
    out = []
    for row in rows:
        assert isinstance(row, UsageRow)
        assert type(row.calls) is int
        assert type(row.cost) is Decimal
        assert type(row.charged) is Decimal
        assert isinstance(row.usage, TokenUsage)
        if row.period_start is not None:
            assert row.period_start.utcoffset() == timedelta(0)
        usage = row.usage
        tokens = (usage.input, usage.output, usage.cache_write, usage.cache_read)
        out.append(
            (row.user_id, row.model, row.period_start, row.calls, tokens, row.cost, row.charged)
        )
    return out


def every_entry(meter):
    return [entry for user in meter.users() for entry in meter.ledger(user)]


# --- random workloads ------------------------------------------------------------------------

EDGES = [
    at(2024, 2, 28, 23, 59, 59, 999999),
    at(2024, 2, 29),
    at(2024, 2, 29, 12, 59, 59, 999999),
    at(2024, 2, 29, 13),
    at(2024, 2, 29, 23, 59, 59, 999999),
    at(2024, 3, 1),
    at(2024, 3, 3, 23, 59, 59, 999999),  # a Sunday's last microsecond
    at(2024, 3, 4),  # Monday
    at(2024, 12, 31, 23, 59, 59, 999999),
    at(2025, 1, 1),
    at(2025, 1, 31, 23, 30),
    at(2025, 2, 1),
]
MOMENTS = st.one_of(
    st.sampled_from(EDGES),
    st.datetimes(
        min_value=datetime(2024, 2, 20),  # noqa: DTZ001 - Hypothesis wants naive bounds
        max_value=datetime(2025, 2, 5),  # noqa: DTZ001
        timezones=st.just(UTC),
    ),
)
USERS = ["alice", "bob", "Zoë"]  # "Zoë" sorts before "alice" by code point
MODELS = ["gpt-4o", "gpt-4o-mini", "claude-3-5-haiku"]
AMOUNTS = st.one_of(
    st.integers(1, 30000),
    st.sampled_from(
        [
            Decimal("0.000000000000000000000000000001"),
            Decimal("12.345678901234567890123456789012"),
            Decimal("0.5"),
            10**6,  # more than the start balance: clamped
            10**15,
        ]
    ),
)
USAGES = st.builds(
    TokenUsage,
    input=st.sampled_from([0, 1, 777, 10**6, 10**10]),
    output=st.integers(0, 5000),
    cache_write=st.integers(0, 100),
    cache_read=st.integers(0, 100),
)
PRICED = st.tuples(st.sampled_from(MODELS), USAGES)
OPS = st.one_of(
    st.tuples(st.just("priced"), st.sampled_from(USERS), PRICED, MOMENTS),
    st.tuples(
        st.just("plain"), st.sampled_from(USERS), AMOUNTS, st.sampled_from([None, "house"]), MOMENTS
    ),
    st.tuples(st.just("strict"), st.sampled_from(USERS), AMOUNTS, MOMENTS),
    st.tuples(st.just("grant"), st.sampled_from(USERS), AMOUNTS, MOMENTS),
    st.tuples(
        st.just("settle"),
        st.sampled_from(USERS),
        AMOUNTS,
        st.one_of(AMOUNTS, PRICED),
        MOMENTS,
        MOMENTS,
    ),
    st.tuples(st.just("release"), st.sampled_from(USERS), AMOUNTS, MOMENTS, MOMENTS),
)


def run(meter, clock, op) -> None:
    """Apply one workload step; refusals for lack of credits write nothing and are fine."""
    kind, user = op[0], op[1]
    try:
        if kind == "priced":
            (model, usage), when = op[2], op[3]
            clock.set(when)
            meter.charge(user, model=model, usage=usage)
        elif kind == "plain":
            clock.set(op[4])
            meter.charge(user, op[2], model=op[3])
        elif kind == "strict":
            clock.set(op[3])
            meter.charge(user, op[2], strict=True)
        elif kind == "grant":
            clock.set(op[3])
            meter.grant(user, op[2])
        elif kind == "settle":
            clock.set(op[4])
            held = meter.hold(user, op[2])
            clock.set(op[5])
            if isinstance(op[3], tuple):
                meter.settle(held, model=op[3][0], usage=op[3][1])
            else:
                meter.settle(held, op[3])
        else:
            clock.set(op[3])
            held = meter.hold(user, op[2])
            clock.set(op[4])
            meter.release(held)
    except InsufficientBalance:
        pass


@st.composite
def queries(draw):
    keys = draw(st.lists(st.sampled_from(["user", "model", "period"]), unique=True, max_size=3))
    period = draw(st.sampled_from(["hour", "day", "week", "month"])) if "period" in keys else None
    shape = draw(st.sampled_from(["tuple", "list", "str"]))
    by: Any = tuple(keys) if shape == "tuple" else keys
    if shape == "str" and len(keys) == 1:
        by = keys[0]
    since, until = draw(st.none() | MOMENTS), draw(st.none() | MOMENTS)
    if since is not None and until is not None:
        if since == until:
            until = None
        elif since > until:
            since, until = until, since
    zone = draw(st.sampled_from(ZONES))
    return {
        "user": draw(st.sampled_from([None, None, *USERS, "nobody"])),
        "since": None if since is None else since.astimezone(zone),
        "until": None if until is None else until.astimezone(zone),
        "by": by,
        "period": period,
    }


@every_backend
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(workload=st.lists(OPS, max_size=10), asked=st.lists(queries(), min_size=1, max_size=6))
def test_usage_equals_the_sum_of_the_ledgers(backend, variant, workload, asked):
    place = backend.new_place()
    try:
        clock = FakeClock(EDGES[0])
        meter = open_meter(backend, variant, clock, place)
        for op in workload:
            run(meter, clock, op)
        entries = every_entry(meter)
        for query in asked:
            assert as_tuples(meter.usage(**query)) == expected_rows(entries, **query), query
    finally:
        backend.close_place(place)


# --- boundaries ------------------------------------------------------------------------------

BOUNDARIES = [
    ("hour", at(2024, 2, 29, 13)),
    ("hour", at(2024, 2, 29)),
    ("day", at(2024, 2, 29)),
    ("day", at(2024, 3, 1)),  # leap day -> March
    ("week", at(2024, 3, 4)),  # Sunday 23:59:59.999999 -> Monday
    ("week", at(2025, 1, 6)),
    ("month", at(2024, 2, 1)),
    ("month", at(2024, 3, 1)),
    ("month", at(2025, 1, 1)),  # new year
]


def calls(rows):
    return sum(row.calls for row in rows)


@every_backend
def test_since_is_inclusive_and_until_exclusive_at_period_starts(reports, clock):
    for number, (period, edge) in enumerate(BOUNDARIES):
        user = f"edge-{number}"
        for when in (edge - US, edge, edge + US):
            clock.set(when)
            reports.charge(user, 1)
        assert calls(reports.usage(user=user)) == 3
        assert calls(reports.usage(user=user, since=edge)) == 2
        assert calls(reports.usage(user=user, until=edge)) == 1
        assert calls(reports.usage(user=user, since=edge, until=edge + US)) == 1
        assert calls(reports.usage(user=user, since=edge - US, until=edge)) == 1
        assert calls(reports.usage(user=user, since=edge + US, until=edge + 2 * US)) == 1
        assert reports.usage(user=user, since=edge + 2 * US) == []
        rows = reports.usage(user=user, by="period", period=period)
        assert [(row.period_start, row.calls) for row in rows] == [
            (start_of(edge - US, period), 1),
            (edge, 2),
        ], (period, edge)
        assert rows[1].period_start.utcoffset() == timedelta(0)
        for zone in ZONES:  # the same instants, written in other offsets
            local = edge.astimezone(zone)
            assert calls(reports.usage(user=user, since=local)) == 2, zone
            assert calls(reports.usage(user=user, until=local)) == 1, zone
            assert calls(reports.usage(user=user, since=local, until=local + US)) == 1, zone
        charges = reports.entries(user=user, since=edge, kinds=["charge"]).entries
        assert [entry.at for entry in charges] == [edge, edge + US]
        assert [entry.at for entry in reports.entries(user=user, until=edge).entries] == [
            edge - US,  # the account's OPEN entry
            edge - US,
        ]


@every_backend
def test_periods_split_in_utc_whatever_the_offset_of_the_clock(reports, clock):
    # 2024-03-01 01:00 at +02:00 is 2024-02-29 23:00 UTC: the leap day, February, its week.
    clock.set(datetime(2024, 3, 1, 1, tzinfo=timezone(timedelta(hours=2))))
    reports.charge("u", 7)
    clock.set(at(2024, 3, 1))
    reports.charge("u", 3)
    expected = {
        "hour": [(at(2024, 2, 29, 23), 7), (at(2024, 3, 1), 3)],
        "day": [(at(2024, 2, 29), 7), (at(2024, 3, 1), 3)],
        "week": [(at(2024, 2, 26), 10)],  # Monday 2024-02-26
        "month": [(at(2024, 2, 1), 7), (at(2024, 3, 1), 3)],
    }
    for period, rows in expected.items():
        found = reports.usage(by=("period",), period=period)
        assert [(row.period_start, row.charged) for row in found] == rows, period


# --- rows, their order and what they count ---------------------------------------------------


def test_usage_row_has_the_documented_fields():
    names = [field.name for field in attrs.fields(UsageRow)]
    assert names == ["user_id", "model", "period_start", "calls", "usage", "cost", "charged"]


@every_backend
def test_rows_sorted_by_keys_with_no_model_first(reports, clock):
    clock.set(at(2024, 2, 29, 10))
    for user, model in [("bob", "house"), ("alice", "gpt-4o"), ("Zed", None), ("alice", None)]:
        reports.charge(user, 1, model=model)
        reports.charge(user, 1, model="Zeta")  # sorts before "gpt-4o" by code point
    rows = reports.usage(by=("user", "model"))
    assert [(row.user_id, row.model) for row in rows] == [
        ("Zed", None),
        ("Zed", "Zeta"),
        ("alice", None),
        ("alice", "Zeta"),
        ("alice", "gpt-4o"),
        ("bob", "Zeta"),
        ("bob", "house"),
    ]
    assert [row.model for row in reports.usage()] == [None, "Zeta", "gpt-4o", "house"]
    assert [row.model for row in reports.usage(by=["model"])] == [None, "Zeta", "gpt-4o", "house"]
    assert [row.user_id for row in reports.usage(by="user")] == ["Zed", "alice", "bob"]
    # grouped by model then period: the periods of one model in time order
    clock.set(at(2024, 1, 5))
    reports.charge("alice", 1, model="Zeta")
    rows = reports.usage(by=("period", "model"), period="month")
    assert [(row.model, row.period_start) for row in rows] == [
        (None, at(2024, 2, 1)),
        ("Zeta", at(2024, 1, 1)),
        ("Zeta", at(2024, 2, 1)),
        ("gpt-4o", at(2024, 2, 1)),
        ("house", at(2024, 2, 1)),
    ]


@every_backend
def test_calls_cost_and_charged(reports, clock):
    clock.set(at(2024, 2, 29, 10))
    reports.charge("alice", model="gpt-4o", usage=TokenUsage(input=1000, output=500))  # 7500
    reports.charge("alice", 10)
    reports.charge("alice", 5, model="house")
    held = reports.hold("alice", 100)
    settled = reports.settle(held, 150)  # more than held
    assert reports.settle(held, 150) == settled  # settled once, counted once
    released = reports.hold("alice", 100)
    reports.release(released)  # counts nothing
    less = reports.hold("alice", 100)
    reports.settle(less, model="gpt-4o", usage=TokenUsage(input=10))  # 25, less than held
    reports.set_balance("bob", 30)
    clamped = reports.charge("bob", 100, model="gpt-4o")
    assert (clamped.cost, clamped.amount) == (100, -30)
    empty = reports.charge("bob", model="gpt-4o", usage=TokenUsage(input=2, output=1))  # 15
    assert (empty.cost, empty.amount) == (15, 0)

    none = TokenUsage()
    assert reports.usage() == [
        UsageRow(
            user_id=None,
            model=None,
            period_start=None,
            calls=2,
            usage=none,
            cost=Decimal(160),
            charged=Decimal(160),
        ),
        UsageRow(
            user_id=None,
            model="gpt-4o",
            period_start=None,
            calls=4,
            usage=TokenUsage(input=1012, output=501),
            cost=Decimal(7640),
            charged=Decimal(7555),
        ),
        UsageRow(
            user_id=None,
            model="house",
            period_start=None,
            calls=1,
            usage=none,
            cost=Decimal(5),
            charged=Decimal(5),
        ),
    ]
    assert reports.usage(by=()) == [
        UsageRow(
            user_id=None,
            model=None,
            period_start=None,
            calls=7,
            usage=TokenUsage(input=1012, output=501),
            cost=Decimal(7805),
            charged=Decimal(7720),
        )
    ]
    bob = reports.usage(by=["user"], user="bob")
    assert [(row.user_id, row.calls, row.cost, row.charged) for row in bob] == [
        ("bob", 2, Decimal(115), Decimal(30))
    ]
    assert reports.usage(user="nobody") == []
    assert as_tuples(reports.usage(by=("user", "model"))) == expected_rows(
        every_entry(reports), by=("user", "model")
    )


@every_backend
def test_no_charges_no_rows(reports):
    assert reports.usage() == []
    reports.grant("alice", 5)
    reports.set_balance("alice", 3)
    assert reports.usage(by=("user", "model", "period"), period="day") == []


@every_backend
def test_sums_are_exact_and_may_pass_the_per_call_token_limit(reports, clock):
    clock.set(at(2024, 2, 29))
    reports.grant("rich", 10**15)
    reports.grant("rich", 10**15)
    tiny = Decimal("0.000000000000000000000000000001")
    reports.charge("rich", tiny)
    reports.charge("rich", 10**15)
    reports.charge("rich", Decimal("0.123456789012345678901234567891"))
    (row,) = reports.usage(by=())
    total = Decimal("1000000000000000.123456789012345678901234567892")
    assert (row.cost, row.charged) == (total, total)
    reports.set_balance("rich", 0)
    huge = TokenUsage(input=10**10, output=10**10)
    reports.charge("tokens", model="gpt-4o", usage=huge)
    reports.charge("tokens", model="gpt-4o", usage=huge)
    (row,) = reports.usage(user="tokens")
    assert (row.usage.input, row.usage.output) == (2 * 10**10, 2 * 10**10)
    assert row.cost == 2 * (10**10 * Decimal("2.5") + 10**11)
    assert row.charged == 20000  # the start balance, all that could be taken
