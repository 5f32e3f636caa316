# Generated from src/creditmeter/reports/_async.py by tools/unasync.py.
# Do not edit: change the source, then run `python tools/unasync.py`.
"""``usage``, ``entries`` and ``iter_users``: the mixin ``ReportMixin`` of the async manager.

Each asks the store's own ``sum_usage``, ``scan_entries`` or ``users_page``
(``ReportStore``) when it has one, and otherwise falls back to ``users()``
and ``ledger()``: correct, but it reads every ledger it covers, so it is slow
for many users. The fallback pages entries user by user (in user id order,
each user's in ledger order) rather than in commit order: an entry committed
to a user the pages have passed is not seen by them.

This is the source of both mixins: ``_sync.py`` (``ReportMixin``) is generated
from it by ``tools/unasync.py``.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING

from creditmeter import _validate, rules
from creditmeter._base import ManagerBase
from creditmeter.exceptions import InvalidInput
from creditmeter.models import EntryKind, LedgerEntry
from creditmeter.queries import EntryPage, EntryQuery, GroupKey, Period, Scan, UsageRow
from creditmeter.reports import _query
from creditmeter.stores.base import BalanceStore

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = ["ReportMixin"]

_GENERIC = "generic"  # the origin of the fallback's cursors


class ReportMixin(ManagerBase):
    """Usage reports and ledger scans over every user (see the module)."""

    store: BalanceStore

    def usage(
        self,
        *,
        user: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        by: GroupKey | tuple[GroupKey, ...] | list[GroupKey] = ("model",),
        period: Period | None = None,
    ) -> list[UsageRow]:
        """Sum the charges made in ``[since, until)``, grouped by ``by``; rows sorted by key.

        ``by`` takes any of ``"user"``, ``"model"`` and ``"period"``;
        ``period`` (``"hour"``, ``"day"``, ``"week"`` from Monday, or
        ``"month"``, in UTC) is needed with ``"period"``. ``user`` keeps one
        user's charges. Settled holds count as charges; releases count
        nothing. Times must be aware.
        """
        query = _query.usage_query(user, since, until, by, period)
        native = getattr(self.store, "sum_usage", None)
        if native is not None:
            return rules.sort_usage(native(query))
        tally = rules.Tally(query)
        for user_id in self._users_of(query.user_id):
            for entry in self.store.ledger(user_id):
                tally.add(entry)
        return tally.rows()

    def entries(
        self,
        *,
        user: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        kinds: Iterable[EntryKind | str] | None = None,
        after: str | None = None,
        limit: int = 1000,
    ) -> EntryPage:
        """One page of ledger entries of every user (or ``user``), in commit order.

        Filters: entries made in ``[since, until)`` and of ``kinds``. Pass
        the page's ``next`` as ``after`` for the next page (with the same
        filters); ``next`` is ``None`` at the end. A page never skips or
        repeats an entry, even while others are written. ``limit`` is
        1..10,000.
        """
        query = _query.entry_query(user, since, until, kinds)
        size = _query.page_size(limit)
        native = getattr(self.store, "scan_entries", None)
        origin = _GENERIC if native is None else _query.store_origin(self.store)
        position = _query.decode_cursor(after, origin, query)
        if native is not None:
            scan: Scan = native(query, after=position, limit=size)
        else:
            scan = self._scan_fallback(query, position, size)
        cursor = (
            None if scan.position is None else _query.encode_cursor(origin, query, scan.position)
        )
        return EntryPage(entries=scan.entries, next=cursor)

    def iter_users(self, *, after: str | None = None, page_size: int = 1000) -> Iterator[str]:
        """Yield every user id greater than ``after``, in order, ``page_size`` ids a read.

        A user added while it runs is yielded if its id sorts after the last
        id of the page read before it came. Unlike ``users()``, a store with
        ``users_page`` never loads all ids at once. The arguments are checked
        at the call (``InvalidInput``), before anything is read.
        """
        last = None if after is None else _validate.user_id(after)
        size = _query.page_size(page_size, "page_size")
        return self._users_after(last, size)

    def _users_after(self, last: str | None, size: int) -> Iterator[str]:
        native = getattr(self.store, "users_page", None)
        while True:
            if native is not None:
                page: list[str] = native(after=last, limit=size)
            else:
                page = _after(self.store.users(), last)[:size]
            for user_id in page:  # noqa: UP028 - an async generator cannot yield from
                yield user_id
            if len(page) < size:
                return
            last = page[-1]

    def _users_of(self, user_id: str | None) -> list[str]:
        return self.store.users() if user_id is None else [user_id]

    def _scan_fallback(self, query: EntryQuery, position: str | None, limit: int) -> Scan:
        """A page in (user id, ledger index) order; the position is ``"<index>:<user id>"``."""
        start_user, start_index = _fallback_position(position)
        users = self._users_of(query.user_id)
        if start_user is not None:
            users = users[bisect.bisect_left(users, start_user) :]
        found: list[LedgerEntry] = []
        for user_id in users:
            index = start_index if user_id == start_user else 0
            ledger = self.store.ledger(user_id)
            while index < len(ledger):
                entry = ledger[index]
                index += 1
                if _covers(query, entry):
                    found.append(entry)
                    if len(found) == limit:
                        return Scan(found, f"{index}:{user_id}")
        return Scan(found, None)


def _after(users: list[str], last: str | None) -> list[str]:
    return users if last is None else users[bisect.bisect_right(users, last) :]


def _fallback_position(position: str | None) -> tuple[str | None, int]:
    if position is None:
        return None, 0
    index, _, user_id = position.partition(":")
    if not index.isdigit() or not _:
        raise InvalidInput("after is not a cursor of this store")
    return user_id, int(index)


def _covers(query: EntryQuery, entry: LedgerEntry) -> bool:
    return rules.in_range(entry.at, query.since, query.until) and (
        query.kinds is None or entry.kind in query.kinds
    )
