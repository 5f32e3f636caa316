"""A store with nothing but ``BalanceStore``'s methods, so a manager uses its report fallback.

The report tests run each case on every backend (``native``) and on
these wrappers over some of them (``fallback``).
"""

from __future__ import annotations

from typing import Any

import pytest
from backends import BACKENDS


class ForwardOnly:
    """Forwards only ``BalanceStore``'s methods, so the manager must use its report fallback."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def load(self, user_id):
        return self._inner.load(user_id)

    def commit(self, *args, **kwargs):
        return self._inner.commit(*args, **kwargs)

    def find_request(self, user_id, request_id):
        return self._inner.find_request(user_id, request_id)

    def ledger(self, user_id, *, limit=None):
        return self._inner.ledger(user_id, limit=limit)

    def users(self):
        return self._inner.users()

    def close(self):
        """The backend closes the store it opened."""


class AsyncForwardOnly:
    """The async twin of ``ForwardOnly``."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    async def load(self, user_id):
        return await self._inner.load(user_id)

    async def commit(self, *args, **kwargs):
        return await self._inner.commit(*args, **kwargs)

    async def find_request(self, user_id, request_id):
        return await self._inner.find_request(user_id, request_id)

    async def ledger(self, user_id, *, limit=None):
        return await self._inner.ledger(user_id, limit=limit)

    async def users(self):
        return await self._inner.users()

    async def aclose(self):
        """The backend closes the store it opened."""


def variants(fallbacks: tuple[str, ...] = ("memory", "async-memory", "sqlite")) -> list[Any]:
    """Every backend natively, and ``fallbacks`` through the wrappers: (backend, variant)."""
    return [pytest.param(name, "native", id=name) for name in BACKENDS] + [
        pytest.param(name, "fallback", id=f"{name}-fallback") for name in fallbacks
    ]


def open_meter(backend, variant, clock, place=None):
    """A manager on ``place`` (the test's by default); the fallback hides the store's reports."""
    store = backend.store(place)
    if variant == "fallback":
        store = AsyncForwardOnly(store) if backend.is_async else ForwardOnly(store)
    return backend.manager(store=store, clock=clock)
