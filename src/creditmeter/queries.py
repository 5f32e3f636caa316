"""What usage reports and ledger scans ask for and answer: queries, ``UsageRow``, ``EntryPage``.

The manager validates a caller's arguments into a ``UsageQuery`` or an
``EntryQuery`` (aware UTC times, known group keys and kinds) and hands it to
the store, which answers with ``UsageRow``s or a ``Scan``. Which entries count
as usage, and where a period starts, are rules (``rules.period_start``,
``rules.tally``); stores that sum in SQL compute the same thing, and the
contract suite holds them to it.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Literal, NamedTuple

import attrs

from creditmeter.models import EntryKind, LedgerEntry
from creditmeter.usage import TokenUsage

__all__ = [
    "GROUP_KEYS",
    "PERIODS",
    "EntryPage",
    "EntryQuery",
    "GroupKey",
    "Period",
    "Scan",
    "UsageQuery",
    "UsageRow",
]

Period = Literal["hour", "day", "week", "month"]
GroupKey = Literal["user", "model", "period"]

PERIODS: tuple[Period, ...] = ("hour", "day", "week", "month")
"""The periods a report can be split by (UTC calendar; weeks start on Monday)."""

GROUP_KEYS: tuple[GroupKey, ...] = ("user", "model", "period")
"""What a report's rows can be grouped by."""


@attrs.frozen(kw_only=True)
class UsageRow:
    """The charges of one group of a usage report: one user, model and/or period.

    A key the report was not grouped by is ``None`` (and so is ``model`` for
    charges made without one). ``calls`` counts ``CHARGE`` entries (settled
    holds included); ``usage`` sums their tokens of each kind (charges made
    without usage add none); ``cost`` sums their full priced costs and
    ``charged`` what was really taken from balances (less than ``cost`` where
    a charge was clamped at zero). Sums over many calls may exceed the
    per-call token limit.
    """

    user_id: str | None
    model: str | None
    period_start: datetime | None
    calls: int
    usage: TokenUsage
    cost: Decimal
    charged: Decimal


@attrs.frozen(kw_only=True)
class EntryPage:
    """One page of ``entries()``: the entries, and the cursor of the next page.

    Pass ``next`` as ``after`` to get the next page; it is ``None`` when
    there was nothing more to read.
    """

    entries: list[LedgerEntry]
    next: str | None


class UsageQuery(NamedTuple):
    """A validated ``usage()`` call, as stores get it: ``since <= at < until``, in UTC."""

    user_id: str | None
    since: datetime | None
    until: datetime | None
    by: tuple[GroupKey, ...]
    period: Period | None


class EntryQuery(NamedTuple):
    """A validated ``entries()`` call, as stores get it: ``since <= at < until``, in UTC."""

    user_id: str | None
    since: datetime | None
    until: datetime | None
    kinds: frozenset[EntryKind] | None


class Scan(NamedTuple):
    """A store's page of a scan: the entries, and where the next page starts.

    ``position`` is the store's own text (the manager wraps it in a cursor);
    ``None`` when there was nothing more to read.
    """

    entries: list[LedgerEntry]
    position: str | None
