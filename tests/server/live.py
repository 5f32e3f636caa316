"""The app served for real: uvicorn on a loopback port, over an SQLite file with some history.

The browser and Node.js tests talk to the server the way a person or a
gateway would, over TCP. ``seed`` fills a store with a few users and a month
of charges by three models (so the charts have bars), at fixed times;
``LiveServer`` serves ``create_app`` over the same file from a thread with
its own event loop (the ``AsyncBalanceManager`` is made on that loop and
closed there). Both use clocks that stand still at ``NOW``, so pages and
screenshots come out the same on every run.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import TracebackType

import uvicorn

from creditmeter import (
    AsyncBalanceManager,
    AsyncSQLiteStore,
    BalanceConfig,
    BalanceManager,
    SQLiteStore,
    TokenUsage,
)
from creditmeter.server import create_app
from creditmeter.testing import FakeClock

ADMIN_TOKEN = "live-admin-token-4d1f0c9a7b2e"
READ_TOKEN = "live-read-token-8e3b5a6c1d7f"
NOW = datetime(2026, 3, 14, 15, 0, tzinfo=timezone.utc)
CONFIG = BalanceConfig(enabled=True, start_balance=20_000)

USERS = (
    "team-alpha-ana",
    "team-alpha-bruno",
    "team-alpha-chen",
    "team-beta-dana",
    "team-beta-emeka",
    "ops-fatima",
)
"""Seeded users; the ``team-alpha-`` prefix finds three of them."""

_MODELS = (
    ("gpt-4o-mini", TokenUsage(input=1_200, output=300)),
    ("gpt-4o", TokenUsage(input=400, output=150)),
    ("claude-3-5-sonnet", TokenUsage(input=300, output=120)),
)


def seed(path: Path) -> None:
    """Users with grants and three weeks of charges (some days skipped), at fixed times."""
    clock = FakeClock(NOW - timedelta(days=24))
    with BalanceManager(SQLiteStore(path), CONFIG, clock=clock) as meter:
        for number, user in enumerate(USERS):
            meter.grant(user, 150_000 + 50_000 * number, reason="seed: starting credits")
        for day in range(24):
            clock.set(NOW - timedelta(days=23 - day, hours=3))
            for number, user in enumerate(USERS):
                if (day + number) % 4 == 0:
                    continue
                model, usage = _MODELS[(day + number) % len(_MODELS)]
                calls = 1 + (day * (number + 2)) % 4
                for call in range(calls):
                    meter.charge(
                        user, model=model, usage=usage, request_id=f"seed-{user}-{day}-{call}"
                    )


def free_socket() -> socket.socket:
    """A listening TCP socket on a free loopback port (bound before the server starts)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


class LiveServer:
    """``create_app`` over the SQLite file ``path``, served by uvicorn from a thread.

    Use as a context manager; ``url`` is the base URL (no trailing slash).
    The socket is bound before the thread starts, so ``url`` is known at once
    and no other process can take the port in between.
    """

    def __init__(self, path: Path, *, clock: FakeClock | None = None) -> None:
        self.path = path
        self.clock = clock or FakeClock(NOW)
        self._socket = free_socket()
        host, port = self._socket.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        self._server: uvicorn.Server | None = None
        self._thread = threading.Thread(target=self._run, name="live-server", daemon=True)
        self._failure: BaseException | None = None

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported by start() / stop() in the test's thread
            self._failure = exc

    async def _serve(self) -> None:
        meter = AsyncBalanceManager(AsyncSQLiteStore(self.path), CONFIG, clock=self.clock)
        try:
            app = create_app(meter, admin_token=ADMIN_TOKEN, read_token=READ_TOKEN)
            config = uvicorn.Config(
                app,
                log_level="warning",
                access_log=False,
                lifespan="off",
                ws="none",
                timeout_graceful_shutdown=5,
            )
            self._server = uvicorn.Server(config)
            await self._server.serve(sockets=[self._socket])
        finally:
            await meter.aclose()

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not (self._server is not None and self._server.started):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"the live server did not start: {self._failure!r}")
            time.sleep(0.01)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.should_exit = True
        self._thread.join(timeout=15)
        with contextlib.suppress(OSError):
            self._socket.close()
        if self._thread.is_alive():
            raise RuntimeError("the live server did not stop within 15 s")
        if self._failure is not None and kind is None:
            raise RuntimeError("the live server failed") from self._failure


def reader(path: Path) -> BalanceManager:
    """A sync manager over the same file, to read back what the server wrote."""
    return BalanceManager(SQLiteStore(path), CONFIG, clock=FakeClock(NOW))
