"""The store contract: a versioned compare-and-set of accounts plus an append-only ledger.

A store holds no business rule. It loads an account, and commits a new
account version together with its ledger entries, atomically, only if the
stored version is the expected one. See DESIGN.md section 5.

A store may also offer ``exclusive(user_id)``, a context manager during which
no other writer can commit to that user. Managers use it, when present, to
retry after a lost compare-and-set: under it a load and a commit cannot lose
again, so contended writers are served in turn rather than the last winner
winning again. SQLite's is an flock, Redis's a per-user lock with a queue
that its commit script honours, PostgreSQL's an advisory lock, MemoryStore's
a per-user lock (for several managers over one store); a store that cannot
offer one relies on the retry policy alone. A store whose commit waits while
another writer holds ``exclusive()`` (Redis, whose script holds such a
commit off) may set an int ``contention_retries``: a manager then retries a
lost compare-and-set that many times at once, from the account the conflict
reported, before it queues for ``exclusive()``.

A store may also offer ``commit_many(writes)`` (``BatchStore``): many commits,
each one atomic on its own, in one round trip or transaction. Managers use it
for ``charge_many`` and ``grant_many`` when present, and commit write by write
otherwise.

A store may also offer ``commit_delta`` (``DeltaStore``): a charge applied to
whatever balance the store holds, guarded so that the outcome is the one the
rules planned. Managers use it for a user whose writers lose compare-and-sets
to each other (a hot user), before they queue for ``exclusive()``: each
writer then commits in one round trip, none losing to another.

A store may also offer reports (``ReportStore``): ``scan_entries`` (ledger
entries of every user in commit order, a page at a time, from a position of
its own), ``sum_usage`` (charges summed by user, model and period) and
``users_page`` (user ids in order, a page at a time). Each is looked up on its
own; managers fall back to ``users()`` and ``ledger()`` for what a store lacks
(correct, but it reads every ledger: slow for many users).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from datetime import datetime
from decimal import Decimal
from typing import NamedTuple, Protocol, runtime_checkable

from creditmeter.exceptions import DuplicateRequest, VersionConflict
from creditmeter.models import Account, LedgerEntry
from creditmeter.queries import EntryQuery, Scan, UsageQuery, UsageRow

__all__ = [
    "AsyncBalanceStore",
    "AsyncBatchStore",
    "AsyncDeltaStore",
    "AsyncExclusiveStore",
    "AsyncReportStore",
    "BalanceStore",
    "BatchStore",
    "DeltaStore",
    "ExclusiveStore",
    "ReportStore",
    "Write",
    "WriteOutcome",
]


class Write(NamedTuple):
    """One commit of a batch: the arguments of ``commit()``, as a tuple."""

    account: Account
    entries: Sequence[LedgerEntry]
    expected_version: int | None


WriteOutcome = VersionConflict | DuplicateRequest | None
"""What ``commit_many`` reports for one write: ``None`` (applied) or the error it met."""


@runtime_checkable
class BalanceStore(Protocol):
    """What a manager needs from a storage backend."""

    def load(self, user_id: str) -> Account | None:
        """Return the stored account, or ``None`` if the user has none."""
        ...

    def commit(
        self,
        account: Account,
        entries: Sequence[LedgerEntry],
        *,
        expected_version: int | None,
    ) -> None:
        """Store ``account`` and append ``entries``, atomically, if the version still matches.

        Raises ``DuplicateRequest`` (with the entry applied first) when an
        entry's request id is already recorded for the user, and
        ``VersionConflict`` (with the stored account when it can be had in the
        same round trip) when the stored version is not ``expected_version``
        (``None``: the account must not exist). Nothing is written then.
        """
        ...

    def find_request(self, user_id: str, request_id: str) -> LedgerEntry | None:
        """Return the entry recorded under ``request_id`` for the user, if any."""
        ...

    def ledger(self, user_id: str, *, limit: int | None = None) -> list[LedgerEntry]:
        """Return the user's entries oldest first; with ``limit``, only the newest ``limit``."""
        ...

    def users(self) -> list[str]:
        """Return the ids of every user with an account, sorted."""
        ...

    def close(self) -> None:
        """Release the store's connections; further use is an error."""
        ...


@runtime_checkable
class ExclusiveStore(BalanceStore, Protocol):
    """A store that can keep other writers of one user out for a while."""

    def exclusive(self, user_id: str) -> AbstractContextManager[None]:
        """Hold off every other writer of ``user_id`` until the block ends."""
        ...


@runtime_checkable
class AsyncBalanceStore(Protocol):
    """The async twin of ``BalanceStore``: the same contract, awaited, closed with ``aclose``.

    It may also offer ``exclusive(user_id)`` as an async context manager, with
    the same meaning as on a sync store.
    """

    async def load(self, user_id: str) -> Account | None:
        """Return the stored account, or ``None`` if the user has none."""
        ...

    async def commit(
        self,
        account: Account,
        entries: Sequence[LedgerEntry],
        *,
        expected_version: int | None,
    ) -> None:
        """Store ``account`` and append ``entries`` atomically if the version still matches."""
        ...

    async def find_request(self, user_id: str, request_id: str) -> LedgerEntry | None:
        """Return the entry recorded under ``request_id`` for the user, if any."""
        ...

    async def ledger(self, user_id: str, *, limit: int | None = None) -> list[LedgerEntry]:
        """Return the user's entries oldest first; with ``limit``, only the newest ``limit``."""
        ...

    async def users(self) -> list[str]:
        """Return the ids of every user with an account, sorted."""
        ...

    async def aclose(self) -> None:
        """Release the store's connections."""
        ...


@runtime_checkable
class AsyncExclusiveStore(AsyncBalanceStore, Protocol):
    """An async store that can keep other writers of one user out for a while."""

    def exclusive(self, user_id: str) -> AbstractAsyncContextManager[None]:
        """Hold off every other writer of ``user_id`` until the block ends."""
        ...


@runtime_checkable
class BatchStore(BalanceStore, Protocol):
    """A store that commits many writes (of different users) in one round trip or transaction."""

    def commit_many(self, writes: Sequence[Write]) -> list[WriteOutcome]:
        """Commit each write as ``commit()`` would; return one outcome per write, in order.

        Each write is atomic on its own: one that meets a ``VersionConflict``
        or a ``DuplicateRequest`` (returned in its slot, with what ``commit()``
        would carry) leaves nothing, and the others still apply. Any other
        failure raises ``StoreError``; some writes may have applied then.
        """
        ...


@runtime_checkable
class AsyncBatchStore(AsyncBalanceStore, Protocol):
    """The async twin of ``BatchStore``."""

    async def commit_many(self, writes: Sequence[Write]) -> list[WriteOutcome]:
        """Commit each write as ``commit()`` would; return one outcome per write, in order."""
        ...


@runtime_checkable
class DeltaStore(BalanceStore, Protocol):
    """A store that applies a charge to the balance it holds, not to a version (``rules.Delta``)."""

    def commit_delta(
        self, account: Account, entry: LedgerEntry, *, floor: Decimal | None
    ) -> tuple[Decimal, int, datetime]:
        """Add ``entry.amount`` to the stored balance and append ``entry``, atomically, if guarded.

        ``account`` is the account as planned from a version the caller saw.
        The guard: the stored account equals ``account`` in every field but
        ``balance``, ``version`` and ``updated_at``, and its balance is at
        least ``floor`` (``None``: any). Then the store writes ``account``
        with the new balance, the stored version plus one and the later of
        the two ``updated_at``, appends ``entry`` with ``balance_after`` the
        new balance, and returns ``(balance, version, updated_at)`` as
        written. Else it writes nothing and raises ``VersionConflict`` (with
        the stored account when it can be had in the same round trip,
        ``None`` when there is none). When the guard holds but a request id
        of ``entry`` is recorded already, it raises ``DuplicateRequest``, as
        ``commit`` does.
        """
        ...


@runtime_checkable
class AsyncDeltaStore(AsyncBalanceStore, Protocol):
    """The async twin of ``DeltaStore``."""

    async def commit_delta(
        self, account: Account, entry: LedgerEntry, *, floor: Decimal | None
    ) -> tuple[Decimal, int, datetime]:
        """Add ``entry.amount`` to the stored balance and append ``entry`` if guarded."""
        ...


@runtime_checkable
class ReportStore(BalanceStore, Protocol):
    """A store that scans its ledger, sums usage and pages user ids itself (with indexes)."""

    def scan_entries(self, query: EntryQuery, *, after: str | None, limit: int) -> Scan:
        """Return up to ``limit`` entries the query covers, in commit order, after ``after``.

        ``after`` is a ``Scan.position`` this store returned for the same
        query (``None``: from the start); a malformed one raises
        ``InvalidInput``. A page never skips or repeats an entry, even while
        others commit: an entry committed later comes after every position
        returned before it.
        """
        ...

    def sum_usage(self, query: UsageQuery) -> list[UsageRow]:
        """Return the query's charges summed per group, as ``rules.Tally`` sums them (any order)."""
        ...

    def users_page(self, *, after: str | None, limit: int) -> list[str]:
        """Return up to ``limit`` user ids greater than ``after``, sorted by code point."""
        ...


@runtime_checkable
class AsyncReportStore(AsyncBalanceStore, Protocol):
    """The async twin of ``ReportStore``."""

    async def scan_entries(self, query: EntryQuery, *, after: str | None, limit: int) -> Scan:
        """Return up to ``limit`` entries the query covers, in commit order, after ``after``."""
        ...

    async def sum_usage(self, query: UsageQuery) -> list[UsageRow]:
        """Return the query's charges summed per group, as ``rules.Tally`` sums them."""
        ...

    async def users_page(self, *, after: str | None, limit: int) -> list[str]:
        """Return up to ``limit`` user ids greater than ``after``, sorted by code point."""
        ...
