"""Helpers of the server tests: the tokens, and ``Server`` (an app, its manager, a client).

``server`` is one app over an ``AsyncBalanceManager`` on a ``MemoryStore`` or
an SQLite file (``server_kind``), with balances on (start balance 1000) and
the fake clock; its ``client`` is a starlette ``TestClient`` run for the
whole test (one event loop), so the manager's locks and the SQLite worker
thread stay on one loop. ``call(coro_fn, ...)`` runs manager calls on it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from creditmeter import AsyncBalanceManager, AsyncMemoryStore, AsyncSQLiteStore, BalanceConfig
from creditmeter.testing import FakeClock

ADMIN = "admin-token-0123456789abcdef"
READ = "read-token-0123456789abcdef"
START = 1000


class Server:
    """An app, its manager and a client on one event loop."""

    def __init__(self, meter: AsyncBalanceManager, client: TestClient, path: Path | None) -> None:
        self.meter = meter
        self.client = client
        self.path = path

    def call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run an async manager method on the app's loop."""

        async def run() -> Any:
            return await function(*args, **kwargs)

        assert self.client.portal is not None
        return self.client.portal.call(run)

    def api(self, method: str, path: str, token: str | None = ADMIN, **kwargs: Any) -> Any:
        headers = dict(kwargs.pop("headers", {}))
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return self.client.request(method, path, headers=headers, **kwargs)

    def ledger(self, user: str) -> list[Any]:
        return self.call(self.meter.ledger, user)


def open_meter(
    kind: str, tmp_path: Path, clock: FakeClock
) -> tuple[AsyncBalanceManager, Path | None]:
    config = BalanceConfig(enabled=True, start_balance=START)
    if kind == "memory":
        return AsyncBalanceManager(AsyncMemoryStore(), config, clock=clock), None
    path = tmp_path / "server.db"
    return AsyncBalanceManager(AsyncSQLiteStore(path), config, clock=clock), path
