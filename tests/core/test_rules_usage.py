"""The pure rules of usage reports: where a period starts, and what a tally counts.

Inputs tried for ``period_start``: each period at its first and last
microsecond, leap days (2024-02-29), year ends, a Sunday and a Monday, the
first day of the calendar (0001-01-01, a Monday), a time given in another
zone, and an unknown period name.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from creditmeter import EntryKind, InvalidInput, LedgerEntry, TokenUsage
from creditmeter.queries import UsageQuery
from creditmeter.rules import Tally, period_start

UTC = timezone.utc
US = timedelta(microseconds=1)


def at(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


@pytest.mark.parametrize(
    ("moment", "period", "start"),
    [
        (at(2024, 2, 29, 23, 59, 59, 999_999), "day", at(2024, 2, 29)),
        (at(2024, 3, 1), "day", at(2024, 3, 1)),
        (at(2024, 2, 29, 12), "month", at(2024, 2, 1)),
        (at(2024, 3, 1) - US, "month", at(2024, 2, 1)),
        (at(2025, 1, 1) - US, "month", at(2024, 12, 1)),
        (at(2025, 1, 1) - US, "hour", at(2024, 12, 31, 23)),
        (at(2026, 11, 29, 23, 59), "week", at(2026, 11, 23)),  # a Sunday: the Monday before
        (at(2026, 11, 30), "week", at(2026, 11, 30)),  # a Monday starts its own week
        (at(2025, 1, 1), "week", at(2024, 12, 30)),  # a week across the year end
        (at(1, 1, 1, 5), "week", at(1, 1, 1)),  # the calendar's first day is a Monday
    ],
)
def test_period_starts(moment, period, start):
    assert period_start(moment, period) == start


def test_a_time_in_another_zone_is_placed_by_its_utc_time():
    tokyo = timezone(timedelta(hours=9))
    moment = datetime(2026, 12, 1, 3, 0, tzinfo=tokyo)  # 2026-11-30 18:00 UTC
    assert period_start(moment, "month") == at(2026, 11, 1)
    assert period_start(moment, "day") == at(2026, 11, 30)


def test_an_unknown_period_is_refused():
    with pytest.raises(InvalidInput, match="period"):
        period_start(at(2026, 1, 1), "year")  # type: ignore[arg-type]


@given(
    st.datetimes(
        min_value=datetime(1, 1, 8),  # noqa: DTZ001 - hypothesis takes naive bounds
        max_value=datetime(9999, 12, 1),  # noqa: DTZ001
        timezones=st.just(UTC),
    ),
    st.sampled_from(["hour", "day", "week", "month"]),
)
def test_a_period_holds_its_time_and_starts_where_the_next_ends(moment, period):
    start = period_start(moment, period)
    assert start <= moment
    assert period_start(start, period) == start  # a start is in its own period
    assert period_start(start - US, period) < start  # the microsecond before is not


def entry(kind, amount, *, cost=None, model=None, usage=None, user="u", when=None):
    return LedgerEntry(
        id="e",
        user_id=user,
        kind=kind,
        amount=Decimal(amount),
        balance_after=Decimal(0),
        at=when or at(2026, 11, 5),
        model=model,
        usage=usage,
        cost=None if cost is None else Decimal(cost),
    )


def test_a_tally_counts_charges_only_and_keeps_cost_and_charged_apart():
    tally = Tally(UsageQuery(None, at(2026, 11, 1), at(2026, 12, 1), ("model",), None))
    tally.add(entry(EntryKind.CHARGE, "-4", cost="10", model="m", usage=TokenUsage(input=3)))
    tally.add(entry(EntryKind.CHARGE, "-2.5"))  # no cost: it cost what it took
    tally.add(entry(EntryKind.GRANT, "100"))
    tally.add(entry(EntryKind.RELEASE, "0"))
    tally.add(entry(EntryKind.CHARGE, "-1", when=at(2026, 12, 1)))  # until is excluded
    tally.add(entry(EntryKind.CHARGE, "-1", when=at(2026, 11, 1)))  # since is included
    rows = tally.rows()
    assert [(r.model, r.calls, r.cost, r.charged, r.usage.input) for r in rows] == [
        (None, 2, Decimal("3.5"), Decimal("3.5"), 0),
        ("m", 1, Decimal(10), Decimal(4), 3),
    ]


def test_token_sums_may_pass_the_limit_of_one_call():
    tally = Tally(UsageQuery(None, None, None, (), None))
    big = TokenUsage(output=10**10)
    for _ in range(3):
        tally.add(entry(EntryKind.CHARGE, "-1", usage=big))
    (row,) = tally.rows()
    assert row.usage.output == 3 * 10**10
    assert (row.user_id, row.model, row.period_start) == (None, None, None)
