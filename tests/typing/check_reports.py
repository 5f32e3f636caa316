"""What a type checker sees of the reports: checked by ``mypy --strict tests/typing``.

Like ``check_api.py``, never run. ``usage``, ``entries`` and ``iter_users``
return exact types on both managers (the async ones once awaited, and
``iter_users`` an async iterator there); ``by`` and ``period`` take only the
names the API knows, so a misspelt one is an error the ``type: ignore``
lines expect (``warn_unused_ignores`` fails the check if one stops being
an error).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from decimal import Decimal

from creditmeter import (
    AsyncBalanceManager,
    BalanceManager,
    EntryKind,
    EntryPage,
    LedgerEntry,
    TokenUsage,
    UsageRow,
)

if sys.version_info >= (3, 11):
    from typing import assert_type
else:  # pragma: no cover - the checker reads one branch
    from typing_extensions import assert_type


def sync_reports(meter: BalanceManager, since: datetime) -> None:
    """The sync manager's reports."""
    rows = meter.usage(user="u", since=since, until=None, by=("user", "period"), period="week")
    assert_type(rows, list[UsageRow])
    assert_type(meter.usage(by="model"), list[UsageRow])
    assert_type(meter.usage(by=["model", "user"]), list[UsageRow])
    row = rows[0]
    assert_type(row.user_id, str | None)
    assert_type(row.model, str | None)
    assert_type(row.period_start, datetime | None)
    assert_type(row.calls, int)
    assert_type(row.usage, TokenUsage)
    assert_type(row.cost, Decimal)
    assert_type(row.charged, Decimal)
    page = meter.entries(user="u", kinds=[EntryKind.CHARGE, "grant"], limit=10)
    assert_type(page, EntryPage)
    assert_type(page.entries, list[LedgerEntry])
    assert_type(page.next, str | None)
    assert_type(meter.entries(after=page.next), EntryPage)
    assert_type(meter.iter_users(after="a", page_size=10), Iterator[str])
    meter.usage(by="models")  # type: ignore[arg-type]  # not a group key
    meter.usage(by="period", period="year")  # type: ignore[arg-type]  # not a period


async def async_reports(meter: AsyncBalanceManager) -> None:
    """The async twins: awaited, the same types; ``iter_users`` is iterated with ``async for``."""
    assert_type(await meter.usage(by=("model",)), list[UsageRow])
    assert_type(await meter.entries(limit=5), EntryPage)
    users = meter.iter_users(page_size=100)
    assert_type(users, AsyncIterator[str])
    async for user in users:
        assert_type(user, str)
    page: EntryPage = meter.entries()  # type: ignore[assignment]  # not awaited
    del page
