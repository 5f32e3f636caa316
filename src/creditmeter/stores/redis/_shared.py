"""What the sync and async Redis stores share at run time (the rest is ``layout``).

The errors that mean the server failed, what a forked child leaves to its
parent, the user locks each thread (sync) or task (async) holds through
``exclusive()``, and what a scan of entries keeps.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from contextvars import ContextVar

from redis.exceptions import RedisClusterException, RedisError

from creditmeter import rules
from creditmeter._ids import new_id
from creditmeter.exceptions import InvalidInput, StoreError
from creditmeter.models import LedgerEntry
from creditmeter.queries import EntryQuery
from creditmeter.stores.redis.layout import Held

__all__ = [
    "ERRORS",
    "FORK_LOCK",
    "LEFT_TO_PARENT",
    "TaskHolds",
    "ThreadHolds",
    "check_limit",
    "covers",
    "failed",
    "made_before_fork",
]

# What a Redis call raises when the server or the link fails (a cluster client raises
# RedisClusterException, which is not a RedisError, when no node can serve it).
ERRORS = (RedisError, RedisClusterException, OSError)


def failed(what: str, exc: BaseException) -> StoreError:
    """The ``StoreError`` that reports a failed Redis call."""
    return StoreError(f"Redis {what} failed: {type(exc).__name__}: {exc}")


def covers(query: EntryQuery, entry: LedgerEntry) -> bool:
    """Whether a scan keeps ``entry``: made in ``[since, until)``, of one of ``kinds``."""
    return rules.in_range(entry.at, query.since, query.until) and (
        query.kinds is None or entry.kind in query.kinds
    )


def check_limit(limit: int) -> None:
    """Refuse a page size that is not a positive int (``InvalidInput``)."""
    if type(limit) is not int or limit < 1:
        raise InvalidInput(f"limit must be a positive int, got {limit!r}")


# The clients a forked child stopped using. Their sockets are the parent's too, and so,
# for redis.asyncio, is the selector of the event loop they are registered with: closing
# them in the child would unregister the parent's sockets from it. So the child never
# closes them, and keeps them referenced so that no finalizer does either (one set of
# connections per store and fork).
LEFT_TO_PARENT: list[object] = []

# Serializes a store's switch to new connections after a fork (threads may race to it);
# a new lock in each child, as a thread of the parent may have held this one at the fork.
FORK_LOCK = [threading.Lock()]


def _renew_fork_lock() -> None:
    FORK_LOCK[0] = threading.Lock()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_renew_fork_lock)


def made_before_fork(kind: str, pid: int) -> StoreError:
    """The error of a store, on a client given, that a forked child cannot use."""
    return StoreError(
        f"this {kind} uses a client made in process {pid}, before os.fork(), that it cannot "
        "replace in this process: make the client (and the store) after the fork, or give "
        "the store a URL"
    )


class ThreadHolds:
    """The user locks each thread holds through one store's ``exclusive()``."""

    def __init__(self) -> None:
        self._local = threading.local()  # .held: user id -> Held, the thread's locks

    def get(self, user_id: str) -> Held | None:
        """The current thread's lock on ``user_id``, if it holds one."""
        held: dict[str, Held] | None = getattr(self._local, "held", None)
        return held.get(user_id) if held else None

    @contextlib.contextmanager
    def holding(self, user_id: str, held: Held) -> Iterator[None]:
        """Record ``held`` as the current thread's lock on ``user_id`` until the block ends."""
        by_thread: dict[str, Held] = self._local.__dict__.setdefault("held", {})
        by_thread[user_id] = held
        try:
            yield
        finally:
            del by_thread[user_id]


# The locks each task holds through an async store's exclusive(): (store, user id) -> lock.
_TASK_HELD: ContextVar[dict[tuple[str, str], Held] | None] = ContextVar(
    "creditmeter_redis_held", default=None
)


class TaskHolds:
    """The user locks each asyncio task holds through one store's ``exclusive()``."""

    def __init__(self) -> None:
        self._ident = new_id()  # names this store's locks in _TASK_HELD

    def get(self, user_id: str) -> Held | None:
        """The current task's lock on ``user_id``, if it holds one."""
        held = _TASK_HELD.get()
        return held.get((self._ident, user_id)) if held else None

    @contextlib.contextmanager
    def holding(self, user_id: str, held: Held) -> Iterator[None]:
        """Record ``held`` as the current task's lock on ``user_id`` until the block ends."""
        reset = _TASK_HELD.set({**(_TASK_HELD.get() or {}), (self._ident, user_id): held})
        try:
            yield
        finally:
            # A block never left is closed by the loop's finalizer, in another context.
            with contextlib.suppress(ValueError):
                _TASK_HELD.reset(reset)
