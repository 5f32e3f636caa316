"""What the PostgreSQL driver and server report, as creditmeter's errors.

A lost compare-and-set is ``VersionConflict`` (the stores raise it), a
request id applied before is ``DuplicateRequest`` carrying that entry, and any
other driver error is ``StoreError`` with the driver's error as its cause.
"""

from __future__ import annotations

from collections.abc import Sequence

from psycopg import errors
from psycopg_pool import PoolTimeout

from creditmeter.exceptions import DuplicateRequest, StoreError
from creditmeter.models import Account, LedgerEntry
from creditmeter.serde import entry_from_json

__all__ = ["duplicate", "failed", "lost_race"]


def failed(action: str, exc: BaseException, user_id: str | None = None) -> StoreError:
    """The ``StoreError`` for a driver error: the call, the user, and any wait given up."""
    detail = str(exc).strip() or type(exc).__name__
    where = (
        f"PostgreSQL {action}" if user_id is None else f"PostgreSQL {action} for user {user_id!r}"
    )
    if isinstance(exc, errors.LockNotAvailable):
        return StoreError(
            f"{where} gave up waiting for a lock that another session holds on the user "
            f"(its row, or its exclusive() key) after lock_timeout: {detail}"
        )
    if isinstance(exc, PoolTimeout):
        return StoreError(
            f"{where} found no free connection in the pool within its timeout: {detail}"
        )
    return StoreError(f"{where} failed: {detail}")


def lost_race(current: Account | None, expected_version: int | None) -> bool:
    """Tell whether the account read with a lost compare-and-set predates the winner.

    The statement reads with the snapshot it started with; if the winning
    writer committed after that (the UPDATE waited for its row lock), the row
    read still holds the expected version and must be read again.
    """
    return (None if current is None else current.version) == expected_version


def duplicate(
    user_id: str, entries: Sequence[LedgerEntry], found: dict[str, str], exc: Exception
) -> DuplicateRequest:
    """The ``DuplicateRequest`` for a commit that broke the unique index on request ids.

    ``found`` maps the request ids of ``entries`` already stored to their
    entries' JSON. If none is stored, the commit repeated a request id of its
    own; if not that either, ``exc`` was something else: ``StoreError``.
    """
    for entry in entries:
        request_id = entry.request_id
        if request_id is not None and request_id in found:
            return DuplicateRequest(
                user_id, request_id, entry=entry_from_json(found[request_id], user_id=user_id)
            )
    earlier: dict[str, LedgerEntry] = {}
    for entry in entries:  # not stored: the commit repeats a request id of its own
        request_id = entry.request_id
        if request_id is not None:
            if request_id in earlier:
                return DuplicateRequest(user_id, request_id, entry=earlier[request_id])
            earlier[request_id] = entry
    raise failed("commit", exc, user_id) from exc
