"""Store outages: the ASGI middleware and ``metered`` under ``on_store_error``.

Real outages only: a redis-server of our own (a free port, a temporary
directory; never the shared one on 6379) killed and started again on the same
port, and an SQLite store whose files are overwritten with garbage and then
put back. Tried: the store down before the call (closed: refused; open:
served unchecked, then charged or reported ``Unmetered``), the store dying
while the call runs (the answer is delivered, the lost charge reported), the
store coming back (the next call is charged), sync and async functions,
streams, and a bad policy value.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest
from broken import BrokenSQLite
from fastapi import FastAPI, Request

from creditmeter import (
    AsyncBalanceManager,
    AsyncSQLiteStore,
    BalanceConfig,
    BalanceManager,
    ConfigError,
    EntryKind,
    Pricing,
    SQLiteStore,
    StoreError,
    TokenUsage,
    Unmetered,
    metered,
)
from creditmeter.integrations.asgi import CreditMeterMiddleware

MODEL = "gpt-4o-mini"
START = 10**6
USAGE = {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150}
SPENT = TokenUsage(input=120, output=30)
PRICING = Pricing.librechat()
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50}
ALICE = {"x-user-id": "alice"}
TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server of this test module's own, which the tests kill and start again."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis  # noqa: PLC0415 - the [redis] extra

        self.process = subprocess.Popen(
            [
                shutil.which("redis-server") or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + TIMEOUT
        while not self._answers(redis):
            if time.monotonic() > deadline or self.process.poll() is not None:
                pytest.fail(f"redis-server did not start on port {self.port}")
            time.sleep(0.02)  # a poll interval, bounded by the deadline

    def _answers(self, redis: Any) -> bool:
        try:
            with redis.Redis(port=self.port, socket_connect_timeout=1) as client:
                return bool(client.ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(TIMEOUT)
        self.process = None


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server on PATH")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        if server.process is not None:
            server.stop()


@pytest.fixture
def redis_up(redis_server):
    """The module's redis-server, running (a test that stopped it left it stopped)."""
    if redis_server.process is None:
        redis_server.start()
    return redis_server


def config() -> BalanceConfig:
    return BalanceConfig(enabled=True, start_balance=START)


def charges(entries):
    return [e for e in entries if e.kind is EntryKind.CHARGE]


def problems(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


def assert_one_line_each(records: list[logging.LogRecord]) -> None:
    for record in records:
        assert record.exc_info is None, record.getMessage()
        assert "\n" not in record.getMessage()


# --- the ASGI middleware -------------------------------------------------------------


class App:
    """An OpenAI-like app behind the middleware, counting the calls that reach it."""

    def __init__(self, meter: AsyncBalanceManager, **options: Any) -> None:
        self.calls = 0
        self.during: Any = None  # run inside the handler (to break the store mid-call)
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            body = await request.json()
            self.calls += 1
            if self.during is not None:
                self.during()
            message = {"role": "assistant", "content": "Hi"}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            return {
                "id": "c1",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [choice],
                "usage": USAGE,
            }

        app.add_middleware(CreditMeterMiddleware, meter=meter, **options)
        self.app = app

    def client(self) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.app)  # an app that raises fails the test
        return httpx.AsyncClient(transport=transport, base_url="http://test")


def redis_meter(server: RedisServer, **options: Any) -> AsyncBalanceManager:
    from creditmeter import AsyncRedisStore  # noqa: PLC0415 - the [redis] extra

    return AsyncBalanceManager(AsyncRedisStore(server.url), config(), **options)


def test_asgi_store_down_is_a_503_with_retry_after_and_one_log_line(redis_up, caplog):
    # Before the fix: the StoreError escaped the middleware (a plain-text 500 and a
    # traceback of 88 lines in the server's log).
    async def main():
        async with redis_meter(redis_up) as meter:
            app = App(meter, retry_after=7)
            async with app.client() as client:
                first = await client.post("/v1/chat/completions", json=BODY, headers=ALICE)
                assert first.status_code == 200
                redis_up.stop()
                caplog.clear()
                down = await client.post("/v1/chat/completions", json=BODY, headers=ALICE)
                logged = problems(caplog)
                redis_up.start()
                back = await client.post("/v1/chat/completions", json=BODY, headers=ALICE)
            ledger = await meter.ledger("alice")
        return app, down, logged, back, ledger

    app, down, logged, back, ledger = asyncio.run(main())
    assert down.status_code == 503
    assert down.headers["retry-after"] == "7"
    assert down.headers["content-type"] == "application/json"
    error = down.json()["error"]
    assert error["code"] == "store_unavailable"
    assert error["type"] == "service_unavailable"
    assert "try again" in error["message"]
    assert len(logged) == 1, [r.getMessage() for r in logged]
    assert_one_line_each(logged)
    assert "answered 503" in logged[0].getMessage()
    assert app.calls == 2  # the refused request never reached the app
    # The server came back empty (no persistence): the next request opened and charged.
    assert back.status_code == 200
    assert [e.usage for e in charges(ledger)] == [SPENT]


def test_asgi_store_down_with_the_sqlite_store(tmp_path, caplog):
    broken = BrokenSQLite(tmp_path / "credits.db")

    async def main():
        async with AsyncBalanceManager(AsyncSQLiteStore(broken.files[0]), config()) as meter:
            app = App(meter)
            async with app.client() as client:
                await client.post("/v1/chat/completions", json=BODY, headers=ALICE)
                broken.break_()
                caplog.clear()
                down = await client.post("/v1/chat/completions", json=BODY, headers=ALICE)
                logged = problems(caplog)
                broken.repair()
                back = await client.post("/v1/chat/completions", json=BODY, headers=ALICE)
            ledger = await meter.ledger("alice")
        return down, logged, back, ledger

    down, logged, back, ledger = asyncio.run(main())
    assert (down.status_code, down.headers["retry-after"]) == (503, "5")
    assert len(logged) == 1
    assert_one_line_each(logged)
    assert back.status_code == 200
    assert len(charges(ledger)) == 2


def test_the_openai_sdk_shows_why_the_gateway_answered_503(tmp_path):
    broken = BrokenSQLite(tmp_path / "credits.db")

    async def main():
        async with AsyncBalanceManager(AsyncSQLiteStore(broken.files[0]), config()) as meter:
            await meter.balance("alice")
            broken.break_()
            app = App(meter)
            sdk = openai.AsyncOpenAI(
                base_url="http://test/v1",
                api_key="x",
                default_headers=ALICE,
                max_retries=0,
                http_client=httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app.app)),
            )
            async with sdk:
                with pytest.raises(openai.InternalServerError) as refused:
                    await sdk.chat.completions.create(model=MODEL, messages=BODY["messages"])
            broken.repair()
        return refused.value

    refused = asyncio.run(main())
    assert refused.status_code == 503
    assert "credit store is unavailable" in str(refused)
    assert refused.code == "store_unavailable"


def test_asgi_open_policy_serves_and_reports_the_unmetered_call(redis_up, caplog):
    events: list[Any] = []

    async def main():
        async with redis_meter(redis_up, on_event=events.append) as meter:
            app = App(meter, on_store_error="open")
            async with app.client() as client:
                redis_up.stop()
                caplog.clear()
                served = await client.post("/v1/chat/completions", json=BODY, headers=ALICE)
                logged = problems(caplog)
                redis_up.start()
                back = await client.post("/v1/chat/completions", json=BODY, headers=ALICE)
            ledger = await meter.ledger("alice")
        return app, served, logged, back, ledger

    app, served, logged, back, ledger = asyncio.run(main())
    assert served.status_code == 200
    assert served.json()["usage"] == USAGE
    assert app.calls == 2
    unmetered = [e for e in events if isinstance(e, Unmetered)]
    assert len(unmetered) == 1
    [event] = unmetered
    assert (event.user_id, event.operation, event.model, event.usage) == (
        "alice",
        "charge",
        MODEL,
        SPENT,
    )
    assert "Redis" in event.error
    # One warning (served unchecked), one error (the charge after could not be taken).
    assert [r.levelno for r in logged] == [logging.WARNING, logging.ERROR]
    assert_one_line_each(logged)
    assert back.status_code == 200
    assert [e.usage for e in charges(ledger)] == [SPENT]


def test_asgi_store_dying_during_the_call_delivers_the_answer_and_reports_it(redis_up, caplog):
    # Before the fix: the settle's StoreError was logged with a full traceback.
    events: list[Any] = []

    async def main():
        async with redis_meter(redis_up, on_event=events.append) as meter:
            app = App(meter)
            app.during = redis_up.stop
            async with app.client() as client:
                caplog.clear()
                served = await client.post("/v1/chat/completions", json=BODY, headers=ALICE)
                logged = problems(caplog)
            redis_up.start()
        return served, logged

    served, logged = asyncio.run(main())
    assert served.status_code == 200
    assert served.json()["usage"] == USAGE
    [event] = [e for e in events if isinstance(e, Unmetered)]
    assert (event.operation, event.usage) == ("settle", SPENT)
    assert len(logged) == 1
    assert_one_line_each(logged)


def test_asgi_refuses_a_bad_policy(tmp_path):
    meter = AsyncBalanceManager(AsyncSQLiteStore(tmp_path / "credits.db"), config())

    async def main():
        async with meter:
            for bad in ("ajar", None, True):
                with pytest.raises(ConfigError, match="on_store_error"):
                    CreditMeterMiddleware(FastAPI(), meter, on_store_error=bad)
            for bad in (-1, 1.5, "5"):
                with pytest.raises(ConfigError, match="retry_after"):
                    CreditMeterMiddleware(FastAPI(), meter, retry_after=bad)

    asyncio.run(main())


# --- metered ------------------------------------------------------------------------------


def reply() -> dict[str, Any]:
    return {"usage": USAGE}


@pytest.fixture
def sqlite_meter(tmp_path):
    broken = BrokenSQLite(tmp_path / "credits.db")
    events: list[Any] = []
    with BalanceManager(SQLiteStore(broken.files[0]), config(), on_event=events.append) as meter:
        meter.balance("alice")  # the files exist
        yield meter, broken, events


@pytest.mark.parametrize("estimate", [None, 10], ids=["check", "hold"])
def test_metered_closed_refuses_a_call_it_cannot_check(sqlite_meter, estimate):
    meter, broken, _ = sqlite_meter
    calls = []

    @metered(meter, user="user_id", model="model", estimate=estimate and (lambda *a, **k: 10))
    def ask(user_id, model=MODEL):
        calls.append(user_id)
        return reply()

    broken.break_()
    with pytest.raises(StoreError):
        ask("alice")
    assert calls == []
    broken.repair()
    assert ask("alice") == reply()
    assert len(charges(meter.ledger("alice"))) == 1


@pytest.mark.parametrize("estimate", [None, 10], ids=["check", "hold"])
def test_metered_open_runs_the_call_and_reports_it_unmetered(sqlite_meter, estimate, caplog):
    # Before the fix (no policy): StoreError before the call, which never ran.
    meter, broken, events = sqlite_meter
    calls = []

    @metered(
        meter,
        user="user_id",
        model="model",
        estimate=estimate and (lambda *a, **k: 10),
        on_store_error="open",
    )
    def ask(user_id, model=MODEL):
        calls.append(user_id)
        return reply()

    broken.break_()
    caplog.clear()
    assert ask("alice") == reply()
    assert calls == ["alice"]
    [event] = events[-1:]
    assert isinstance(event, Unmetered)
    assert (event.operation, event.usage, event.model) == ("charge", SPENT, MODEL)
    logged = problems(caplog)
    assert [r.levelno for r in logged] == [logging.WARNING, logging.ERROR]
    assert_one_line_each(logged)
    broken.repair()
    ask("alice")
    assert [e.usage for e in charges(meter.ledger("alice"))] == [SPENT]


@pytest.mark.parametrize("estimate", [None, 10], ids=["check", "hold"])
def test_metered_store_dying_during_the_call_still_returns_its_result(
    sqlite_meter, estimate, caplog
):
    # Before the fix: the charge's StoreError replaced the result the call had produced.
    meter, broken, events = sqlite_meter

    @metered(meter, user="user_id", model="model", estimate=estimate and (lambda *a, **k: 10))
    def ask(user_id, model=MODEL):
        broken.break_()
        return reply()

    caplog.clear()
    assert ask("alice") == reply()
    [event] = [e for e in events if isinstance(e, Unmetered)]
    assert event.operation == ("charge" if estimate is None else "settle")
    assert event.usage == SPENT
    assert len(problems(caplog)) == 1
    assert_one_line_each(problems(caplog))


def test_a_metered_stream_whose_store_dies_ends_normally(sqlite_meter):
    meter, broken, events = sqlite_meter

    @metered(meter, user="user_id", model="model", estimate=lambda *a, **k: 10)
    def stream(user_id, model=MODEL):
        yield {"choices": [{"delta": {"content": "a"}}]}
        broken.break_()
        yield {"choices": [], "usage": USAGE}

    assert len(list(stream("alice"))) == 2  # before the fix: StoreError from next()
    [event] = [e for e in events if isinstance(e, Unmetered)]
    assert (event.operation, event.usage) == ("settle", SPENT)


def test_async_metered_under_both_policies(tmp_path, caplog):
    broken = BrokenSQLite(tmp_path / "credits.db")
    events: list[Any] = []

    async def main():
        store = AsyncSQLiteStore(broken.files[0])
        async with AsyncBalanceManager(store, config(), on_event=events.append) as meter:
            await meter.balance("alice")

            @metered(meter, user="user_id", model="model", estimate=lambda *a, **k: 10)
            async def closed(user_id, model=MODEL):
                return reply()

            @meter.metered(user="user_id", model="model", on_store_error="open")
            async def opened(user_id, model=MODEL):
                return reply()

            @metered(meter, user="user_id", model="model", estimate=lambda *a, **k: 10)
            async def stream(user_id, model=MODEL):
                yield {"choices": [{"delta": {"content": "a"}}]}
                broken.break_()
                yield {"choices": [], "usage": USAGE}

            broken.break_()
            with pytest.raises(StoreError):
                await closed("alice")
            assert await opened("alice") == reply()
            broken.repair()
            assert len([c async for c in stream("alice")]) == 2
            broken.repair()
            await closed("alice")
            return await meter.ledger("alice")

    ledger = asyncio.run(main())
    assert [(e.operation, e.usage) for e in events if isinstance(e, Unmetered)] == [
        ("charge", SPENT),
        ("settle", SPENT),
    ]
    assert [e.usage for e in charges(ledger)] == [SPENT]
    assert_one_line_each(problems(caplog))


def test_the_manager_method_takes_the_policy(sqlite_meter):
    meter, broken, events = sqlite_meter

    @meter.metered(user="user_id", model="model", on_store_error="open")
    def opened(user_id, model=MODEL):
        return reply()

    @meter.metered(user="user_id", model="model")
    def closed(user_id, model=MODEL):
        return reply()

    broken.break_()
    assert opened("alice") == reply()
    with pytest.raises(StoreError):
        closed("alice")
    assert [type(e) for e in events[-1:]] == [Unmetered]
    with pytest.raises(ConfigError, match="on_store_error"):
        meter.metered(user="user_id", on_store_error="ajar")(reply)


def test_metered_refuses_a_bad_policy(sqlite_meter):
    meter, _, _ = sqlite_meter
    with pytest.raises(ConfigError, match="on_store_error"):
        metered(meter, user="user_id", on_store_error="ajar")(reply)


def test_the_unmetered_event_is_a_frozen_value_that_pickles():
    event = Unmetered(user_id="alice", operation="charge", error="down", usage=SPENT)
    assert pickle.loads(pickle.dumps(event)) == event
    assert (event.amount, event.request_id, event.incomplete) == (None, None, False)
    with pytest.raises(AttributeError):
        event.user_id = "bob"  # type: ignore[misc]
