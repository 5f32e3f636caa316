"""An in-process store: a dict behind one lock. For tests and single-process gateways."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from types import TracebackType

from creditmeter.exceptions import DuplicateRequest, StoreError, VersionConflict
from creditmeter.models import Account, LedgerEntry

__all__ = ["AsyncMemoryStore", "MemoryStore"]


class MemoryStore:
    """Accounts and ledger in memory, safe across threads; nothing survives the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._accounts: dict[str, Account] = {}
        self._ledgers: dict[str, list[LedgerEntry]] = {}
        self._requests: dict[tuple[str, str], LedgerEntry] = {}
        self._closed = False

    def load(self, user_id: str) -> Account | None:
        """Return the stored account, or ``None``."""
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
        self._check_open()
        user_id = account.user_id
        with self._lock:
            requests = self._requests
            for entry in entries:
                if entry.request_id is not None:
                    found = requests.get((user_id, entry.request_id))
                    if found is not None:
                        raise DuplicateRequest(user_id, entry.request_id, entry=found)
            current = self._accounts.get(user_id)
            stored_version = None if current is None else current.version
            if stored_version != expected_version:
                raise VersionConflict(user_id, expected=expected_version, current=current)
            self._accounts[user_id] = account
            ledger = self._ledgers.get(user_id)
            if ledger is None:
                ledger = self._ledgers[user_id] = []
            ledger.extend(entries)
            for entry in entries:
                if entry.request_id is not None:
                    requests[user_id, entry.request_id] = entry

    def find_request(self, user_id: str, request_id: str) -> LedgerEntry | None:
        """Return the entry recorded under ``request_id``, if any."""
        self._check_open()
        return self._requests.get((user_id, request_id))

    def ledger(self, user_id: str, *, limit: int | None = None) -> list[LedgerEntry]:
        """Return the user's entries, oldest first (the newest ``limit`` if given)."""
        self._check_open()
        with self._lock:
            entries = self._ledgers.get(user_id, [])
            return list(entries[-limit:] if limit else entries) if limit != 0 else []

    def users(self) -> list[str]:
        """Return every user id, sorted."""
        self._check_open()
        with self._lock:
            return sorted(self._accounts)

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

    async def find_request(self, user_id: str, request_id: str) -> LedgerEntry | None:
        """Return the entry recorded under ``request_id``, if any."""
        return self.sync.find_request(user_id, request_id)

    async def ledger(self, user_id: str, *, limit: int | None = None) -> list[LedgerEntry]:
        """Return the user's entries, oldest first (the newest ``limit`` if given)."""
        return self.sync.ledger(user_id, limit=limit)

    async def users(self) -> list[str]:
        """Return every user id, sorted."""
        return self.sync.users()

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
