"""An in-process store: a dict behind one lock. For tests and single-process gateways.

Ledger entries are kept as tuples of plain values rather than as
``LedgerEntry`` objects: tuples of strings, numbers and times are not tracked
by the garbage collector, so a long ledger does not make every full
collection slower (measured: 110 ms pauses at 300,000 entries as objects,
12 ms as tuples). Reads rebuild the entries.

A store made before ``os.fork()`` works in both processes, each with its own
copy of the data: a fork waits for a commit in flight in another thread (so
the child's copy is whole), and the child gets new locks, since the threads
that held the parent's do not exist there.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import threading
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from types import TracebackType
from typing import Any

from creditmeter.exceptions import DuplicateRequest, InvalidInput, StoreError, VersionConflict
from creditmeter.models import Account, EntryKind, LedgerEntry
from creditmeter.pricing import Rates
from creditmeter.queries import EntryQuery, Scan, UsageQuery, UsageRow
from creditmeter.rules import Tally
from creditmeter.stores.base import Write, WriteOutcome
from creditmeter.usage import TokenUsage

Packed = tuple[Any, ...]


# A packed entry: its fields, flat, in this order. Token counts and rates follow only
# when the entry has either (``None`` in the place of the one it lacks), and the
# credit blocks drawn only when it drew some: a priced charge is one tuple, not three.
_MODEL, _COST, _PLAIN = 7, 8, 10  # positions; a plain entry's length
_COUNTS, _RATES, _DRAWN = 10, 14, 18
_NO_COUNTS = (None, None, None, None)


def _pack(entry: LedgerEntry) -> Packed:
    usage, rates, metadata, drawn = entry.usage, entry.rates, entry.metadata, entry.drawn
    meta = None if metadata is None else tuple(metadata.items())
    if usage is None and rates is None and not drawn:
        return (
            entry.id,
            entry.user_id,
            entry.kind._value_,  # the enum's value, without its descriptor's call
            entry.amount,
            entry.balance_after,
            entry.at,
            entry.request_id,
            entry.model,
            entry.cost,
            meta,
        )
    if usage is not None and rates is not None and not drawn:  # a priced charge
        return (
            entry.id,
            entry.user_id,
            entry.kind._value_,
            entry.amount,
            entry.balance_after,
            entry.at,
            entry.request_id,
            entry.model,
            entry.cost,
            meta,
            usage.input,
            usage.output,
            usage.cache_write,
            usage.cache_read,
            rates.prompt,
            rates.completion,
            rates.cache_write,
            rates.cache_read,
        )
    counts = (
        _NO_COUNTS
        if usage is None
        else (usage.input, usage.output, usage.cache_write, usage.cache_read)
    )
    prices = (
        _NO_COUNTS
        if rates is None
        else (rates.prompt, rates.completion, rates.cache_write, rates.cache_read)
    )
    head = (
        entry.id,
        entry.user_id,
        entry.kind._value_,
        entry.amount,
        entry.balance_after,
        entry.at,
        entry.request_id,
        entry.model,
        entry.cost,
        meta,
    )
    return (*head, *counts, *prices, drawn) if drawn else (*head, *counts, *prices)


def _counts(packed: Packed) -> tuple[int, int, int, int] | None:
    """A packed entry's token counts (input, output, cache write, cache read), if it has them."""
    if len(packed) == _PLAIN or packed[_COUNTS] is None:
        return None
    return packed[_COUNTS : _COUNTS + 4]


def _unpack(packed: Packed) -> LedgerEntry:
    (id_, user_id, kind, amount, after, at, request_id, model, cost, meta) = packed[:_PLAIN]
    usage = rates = None
    if len(packed) > _PLAIN:
        counts = _counts(packed)
        if counts is not None:
            usage = TokenUsage(
                input=counts[0], output=counts[1], cache_write=counts[2], cache_read=counts[3]
            )
        if packed[_RATES] is not None:
            prompt, completion, write, read = packed[_RATES : _RATES + 4]
            rates = Rates(prompt=prompt, completion=completion, cache_write=write, cache_read=read)
    return LedgerEntry(
        id=id_,
        user_id=user_id,
        kind=EntryKind(kind),
        amount=amount,
        balance_after=after,
        at=at,
        request_id=request_id,
        model=model,
        usage=usage,
        cost=cost,
        rates=rates,
        metadata=None if meta is None else dict(meta),
        drawn=packed[_DRAWN] if len(packed) > _DRAWN else (),
    )


__all__ = ["AsyncMemoryStore", "MemoryStore"]


def _index(position: str | None) -> int:
    if position is None:
        return 0
    if not position.isdigit() or len(position) > 20:  # 2**64 has 20 digits
        raise InvalidInput("after is not a cursor of this store")
    return int(position)


FORK_WAIT = 5.0
"""Seconds a fork waits for a store's lock (held only for the dict updates of one call)."""

# Every store of this module, for the fork hooks below.
_STORES: weakref.WeakSet[MemoryStore | AsyncMemoryStore] = weakref.WeakSet()
_TAKEN: list[threading.Lock] = []  # the locks the forking thread took, to let go after


def _live() -> list[MemoryStore | AsyncMemoryStore]:
    while True:  # another thread may make a store meanwhile: copy again
        try:
            return list(_STORES)
        except RuntimeError:  # noqa: PERF203  # pragma: no cover - changed size while copied
            continue


def _before_fork() -> None:
    locks = [store._lock for store in _live() if isinstance(store, MemoryStore)]  # noqa: SLF001
    _TAKEN.extend(lock for lock in locks if lock.acquire(timeout=FORK_WAIT))


def _after_fork_in_parent() -> None:
    while _TAKEN:
        _TAKEN.pop().release()


def _after_fork_in_child() -> None:
    _TAKEN.clear()
    for store in _live():
        store._after_fork()  # noqa: SLF001


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )


class _Writer:
    """One user's ``exclusive()`` lock, and how many blocks hold it or wait for it."""

    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.users = 0


class _AsyncWriter:
    """The async twin of ``_Writer``, and the task inside (once per nested block)."""

    __slots__ = ("lock", "owner", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0
        self.owner: list[object] = []


class MemoryStore:
    """Accounts and ledger in memory, safe across threads; nothing survives the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._accounts: dict[str, Account] = {}
        self._ledgers: dict[str, list[Packed]] = {}
        self._requests: dict[tuple[str, str], Packed] = {}
        self._log: list[Packed] = []  # every entry, in commit order (for scan_entries)
        self._sorted_users: list[str] = []  # for users_page: sorted when a page is asked for
        self._new_users: list[str] = []  # opened since, not yet sorted in
        # Users whose exclusive() is held or awaited; dropped when the last block ends.
        self._writers: dict[str, _Writer] = {}
        self._closed = False
        _STORES.add(self)

    def _after_fork(self) -> None:
        self._lock = threading.Lock()
        self._writers = {}

    @contextlib.contextmanager
    def exclusive(self, user_id: str) -> Iterator[None]:
        """Keep every other ``exclusive`` block of this user (any thread) out until it ends.

        Managers take it after a lost compare-and-set, so that writers of a hot
        user load and commit in turn instead of losing to each other again.
        Re-entrant in one thread; other users are not held up.
        """
        self._check_open()
        writers = self._writers
        with self._lock:
            writer = writers.get(user_id)
            if writer is None:
                writer = writers[user_id] = _Writer()
            writer.users += 1
        try:
            with writer.lock:
                yield
        finally:
            with self._lock:
                writer.users -= 1
                if writer.users == 0 and writers.get(user_id) is writer:
                    del writers[user_id]

    def load(self, user_id: str) -> Account | None:
        """Return the stored account, or ``None``."""
        if self._closed:  # as commit: the check's frame only when it fails
            self._check_open()
        return self._accounts.get(user_id)

    def commit(
        self,
        account: Account,
        entries: Sequence[LedgerEntry],
        *,
        expected_version: int | None,
    ) -> None:
        """Store the account and entries if the stored version is ``expected_version``."""
        if self._closed:
            self._check_open()
        with self._lock:
            met = self._commit_one(account, entries, expected_version)
        if met is not None:
            raise met

    def commit_many(self, writes: Sequence[Write]) -> list[WriteOutcome]:
        """Commit each write as ``commit()`` would, all under one hold of the lock.

        One outcome per write: ``None`` (applied), or the ``VersionConflict``
        or ``DuplicateRequest`` it met (it wrote nothing; the others apply).
        """
        self._check_open()
        with self._lock:
            return [self._commit_one(*write) for write in writes]

    def _commit_one(  # noqa: C901 - flat on purpose: the hot path of every write
        self, account: Account, entries: Sequence[LedgerEntry], expected_version: int | None
    ) -> WriteOutcome:
        """With the lock held: one write, applied (``None``) or what it met (nothing written)."""
        user_id = account.user_id
        requests = self._requests
        mine: dict[str, Packed] | None = None  # request ids in this write
        request: tuple[str, str] | None = None  # the request key of a write of one entry
        if not entries:  # a hold, or a drop of one: the account alone
            packed = []
        elif len(entries) == 1:  # a charge or a grant: the usual write, without a loop
            (entry,) = entries
            packed = [_pack(entry)]
            request_id = entry.request_id
            if request_id is not None:
                request = (user_id, request_id)  # one key for the look-up and the write
                found = requests.get(request)
                if found is not None:
                    return DuplicateRequest(user_id, request_id, entry=_unpack(found))
        else:
            packed = [_pack(entry) for entry in entries]
            recorded = self._new_requests(user_id, entries, packed)
            if isinstance(recorded, DuplicateRequest):
                return recorded
            mine = recorded
        accounts = self._accounts
        current = accounts.get(user_id)
        if (None if current is None else current.version) != expected_version:
            return VersionConflict(user_id, expected=expected_version, current=current)
        accounts[user_id] = account
        ledger = self._ledgers.get(user_id)
        if ledger is None:  # the user's first commit: the account is new
            ledger = self._ledgers[user_id] = []
            self._new_users.append(user_id)
        if packed:
            ledger.extend(packed)
            self._log.extend(packed)
            if request is not None:
                requests[request] = packed[0]
            elif mine is not None:
                for named, row in mine.items():
                    requests[user_id, named] = row
        return None

    def _new_requests(
        self, user_id: str, entries: Sequence[LedgerEntry], packed: list[Packed]
    ) -> dict[str, Packed] | DuplicateRequest | None:
        """The request ids of a write's entries, or the first that repeats one recorded."""
        requests = self._requests
        mine: dict[str, Packed] | None = None  # request ids earlier in this write
        for entry, row in zip(entries, packed, strict=True):
            request_id = entry.request_id
            if request_id is not None:
                found = requests.get((user_id, request_id))
                if found is None and mine is not None:
                    found = mine.get(request_id)
                if found is not None:
                    return DuplicateRequest(user_id, request_id, entry=_unpack(found))
                if mine is None:
                    mine = {}
                mine[request_id] = row
        return mine

    def find_request(self, user_id: str, request_id: str) -> LedgerEntry | None:
        """Return the entry recorded under ``request_id``, if any."""
        self._check_open()
        found = self._requests.get((user_id, request_id))
        return None if found is None else _unpack(found)

    def ledger(self, user_id: str, *, limit: int | None = None) -> list[LedgerEntry]:
        """Return the user's entries, oldest first (the newest ``limit`` if given)."""
        self._check_open()
        with self._lock:
            entries = self._ledgers.get(user_id, [])
            if limit == 0:
                return []
            chosen = entries[-limit:] if limit else list(entries)
        return [_unpack(packed) for packed in chosen]

    def users(self) -> list[str]:
        """Return every user id, sorted."""
        self._check_open()
        with self._lock:
            return sorted(self._accounts)

    # --- reports (ReportStore) -------------------------------------------------

    def scan_entries(self, query: EntryQuery, *, after: str | None, limit: int) -> Scan:
        """Up to ``limit`` entries the query covers, in commit order, after position ``after``.

        Positions are indexes into the log of every entry (or the user's
        ledger, for a query of one user). Both lists only grow, under the
        lock, so the entries below a length read once stay as they are: the
        scan reads them without holding up writers.
        """
        self._check_open()
        index = _index(after)
        with self._lock:
            source = self._log if query.user_id is None else self._ledgers.get(query.user_id, [])
            end = len(source)
        since, until = query.since, query.until
        kinds = None if query.kinds is None else {kind.value for kind in query.kinds}
        found: list[Packed] = []
        while index < end and len(found) < limit:
            row = source[index]
            index += 1
            at = row[5]
            if (
                (kinds is None or row[2] in kinds)
                and (since is None or at >= since)
                and (until is None or at < until)
            ):
                found.append(row)
        position = str(index) if len(found) == limit and index < end else None
        return Scan([_unpack(row) for row in found], position)

    def sum_usage(self, query: UsageQuery) -> list[UsageRow]:
        """The query's charges summed per group, read from the log without unpacking it."""
        self._check_open()
        with self._lock:
            source = self._log if query.user_id is None else self._ledgers.get(query.user_id, [])
            end = len(source)
        tally = Tally(query)
        add = tally.add_values
        charge = EntryKind.CHARGE.value
        for index in range(end):
            row = source[index]
            if row[2] == charge:
                add(row[1], charge, row[5], row[3], row[_COST], row[_MODEL], _counts(row))
        return tally.rows()

    def users_page(self, *, after: str | None, limit: int) -> list[str]:
        """Up to ``limit`` user ids after ``after``, sorted.

        The ids are sorted when a page is asked for after new users came (in
        place: timsort merges the sorted run with the new ids in about linear
        time), and kept sorted for the next pages, as a database keeps an index.
        """
        self._check_open()
        with self._lock:
            users = self._sorted_users
            if self._new_users:
                users += self._new_users
                users.sort()
                self._new_users.clear()
            start = 0 if after is None else bisect.bisect_right(users, after)
            return users[start : start + limit]

    def close(self) -> None:
        """Mark the store closed; the data is dropped."""
        self._closed = True

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError("the store is closed")


class AsyncMemoryStore:
    """``MemoryStore`` for asyncio: the same dict and lock, awaited (nothing ever blocks)."""

    def __init__(self) -> None:
        self.sync = MemoryStore()
        # Users whose exclusive() is held or awaited; dropped when the last block ends.
        self._writers: dict[str, _AsyncWriter] = {}
        _STORES.add(self)

    def _after_fork(self) -> None:
        self._writers = {}

    @contextlib.asynccontextmanager
    async def exclusive(self, user_id: str) -> AsyncIterator[None]:
        """Keep every other ``exclusive`` block of this user (any task) out until it ends.

        Re-entrant in one task; waiting never blocks the event loop. A task
        cancelled while waiting or inside lets go of everything it had.
        """
        self.sync._check_open()  # noqa: SLF001 - a class of this module
        task = asyncio.current_task()
        writers = self._writers
        writer = writers.get(user_id)
        if writer is None:
            writer = writers[user_id] = _AsyncWriter()
        owner = writer.owner
        if owner and owner[0] is task:
            owner.append(task)
            try:
                yield
            finally:
                owner.pop()
            return
        writer.users += 1
        try:
            async with writer.lock:
                owner.append(task)
                try:
                    yield
                finally:
                    owner.clear()
        finally:
            writer.users -= 1
            if writer.users == 0 and writers.get(user_id) is writer:
                del writers[user_id]

    async def load(self, user_id: str) -> Account | None:
        """Return the stored account, or ``None``."""
        return self.sync.load(user_id)

    async def commit(
        self,
        account: Account,
        entries: Sequence[LedgerEntry],
        *,
        expected_version: int | None,
    ) -> None:
        """Store the account and entries if the stored version is ``expected_version``."""
        self.sync.commit(account, entries, expected_version=expected_version)

    async def commit_many(self, writes: Sequence[Write]) -> list[WriteOutcome]:
        """Commit each write as ``commit()`` would (see ``MemoryStore.commit_many``)."""
        return self.sync.commit_many(writes)

    async def find_request(self, user_id: str, request_id: str) -> LedgerEntry | None:
        """Return the entry recorded under ``request_id``, if any."""
        return self.sync.find_request(user_id, request_id)

    async def ledger(self, user_id: str, *, limit: int | None = None) -> list[LedgerEntry]:
        """Return the user's entries, oldest first (the newest ``limit`` if given)."""
        return self.sync.ledger(user_id, limit=limit)

    async def users(self) -> list[str]:
        """Return every user id, sorted."""
        return self.sync.users()

    async def scan_entries(self, query: EntryQuery, *, after: str | None, limit: int) -> Scan:
        """Up to ``limit`` entries the query covers, in commit order (see ``MemoryStore``)."""
        return self.sync.scan_entries(query, after=after, limit=limit)

    async def sum_usage(self, query: UsageQuery) -> list[UsageRow]:
        """The query's charges summed per group."""
        return self.sync.sum_usage(query)

    async def users_page(self, *, after: str | None, limit: int) -> list[str]:
        """Up to ``limit`` user ids after ``after``, sorted."""
        return self.sync.users_page(after=after, limit=limit)

    async def aclose(self) -> None:
        """Mark the store closed."""
        self.sync.close()

    async def __aenter__(self) -> AsyncMemoryStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
