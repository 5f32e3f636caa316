"""CreditMeterMiddleware on a real FastAPI app: holds, settles, refusals and disconnects."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from creditmeter import (
    AsyncBalanceManager,
    AsyncMemoryStore,
    BalanceConfig,
    Denied,
    EntryKind,
    Pricing,
    TokenUsage,
)
from creditmeter.integrations.asgi import (
    CreditMeterMiddleware,
    _SSEParser,
    estimate_prompt_tokens,
)

MODEL = "gpt-4o-mini"
CLAUDE = "claude-3-5-haiku-20241022"
START = 1_000_000
PRICING = Pricing.librechat()
WORDS = ["Hello", " there", ",", " friend", "!"]
PLAIN_USAGE = {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150}
STREAM_USAGE = {"prompt_tokens": 80, "completion_tokens": 5, "total_tokens": 85}
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello to my friend, please."},
]


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def chat_chunk(content: str | None = None, usage: dict[str, int] | None = None) -> bytes:
    chunk: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "model": MODEL}
    chunk["choices"] = [] if content is None else [{"index": 0, "delta": {"content": content}}]
    if usage is not None:
        chunk["usage"] = usage
    return sse(chunk)


class Upstream:
    """A FastAPI app answering like OpenAI and Anthropic, recording what reached it."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.seen_available: list[Decimal] = []
        self.meter: AsyncBalanceManager | None = None
        self.gate: asyncio.Event | None = None  # a stream waits on it after two chunks
        self.first_sent: asyncio.Event | None = None  # the test saw the first chunk
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self.chat)
        self.app.post("/v1/responses")(self.explode)
        self.app.post("/v1/messages")(self.messages)
        self.app.post("/v1/other")(self.other)
        self.app.get("/v1/chat/completions")(self.other)

    async def chat(self, request: Request) -> Any:
        body = await request.json()
        self.calls.append(body)
        user = request.headers.get("x-user-id")
        if self.meter is not None and user:  # what the user may still spend while the call runs
            account = await self.meter.account(user)
            self.seen_available.append(account.available)
        if not body.get("stream"):
            return {
                "id": "c1",
                "object": "chat.completion",
                "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}}],
                "usage": PLAIN_USAGE,
            }
        return StreamingResponse(self.chat_stream(), media_type="text/event-stream")

    async def chat_stream(self) -> AsyncIterator[bytes]:
        for n, word in enumerate(WORDS):
            if n == 1 and self.first_sent is not None:
                await asyncio.wait_for(self.first_sent.wait(), 5)
            if n == 2 and self.gate is not None:
                await self.gate.wait()  # until cancelled by the client's disconnect
            yield chat_chunk(word)
        yield chat_chunk(usage=STREAM_USAGE)
        yield sse("[DONE]")

    async def explode(self, request: Request) -> Any:
        self.calls.append(await request.json())
        raise RuntimeError("the upstream exploded")

    async def messages(self, request: Request) -> Any:
        body = await request.json()
        self.calls.append(body)
        if body.get("fail"):
            return JSONResponse({"type": "error", "error": {"type": "overloaded"}}, 529)
        return StreamingResponse(anthropic_stream(), media_type="text/event-stream")

    async def other(self) -> Any:
        return {"ok": True}


async def anthropic_stream() -> AsyncIterator[bytes]:
    start = {
        "type": "message_start",
        "message": {"usage": {"input_tokens": 40, "output_tokens": 1}},
    }
    yield b"event: message_start\n" + sse(start)
    for word in WORDS[:3]:
        delta = {"type": "content_block_delta", "index": 0, "delta": {"text": word}}
        yield b"event: content_block_delta\r\n" + sse(delta).replace(b"\n", b"\r\n")
    yield sse({"type": "message_delta", "usage": {"output_tokens": 12}})
    yield sse({"type": "message_stop"})


def manager(start: int = START, **options: Any) -> AsyncBalanceManager:
    return AsyncBalanceManager(
        AsyncMemoryStore(), BalanceConfig(enabled=True, start_balance=start), **options
    )


def build(meter: AsyncBalanceManager, **options: Any) -> Upstream:
    upstream = Upstream()
    upstream.meter = meter
    upstream.app.add_middleware(CreditMeterMiddleware, meter=meter, **options)
    return upstream


def drive(
    start: int,
    scenario: Callable[[AsyncBalanceManager, Upstream, httpx.AsyncClient], Awaitable[Any]],
    *,
    raise_app_exceptions: bool = True,
    **options: Any,
) -> Any:
    async def main() -> Any:
        async with manager(start) as meter:
            upstream = build(meter, **options)
            transport = httpx.ASGITransport(
                app=upstream.app, raise_app_exceptions=raise_app_exceptions
            )
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await scenario(meter, upstream, client)

    return asyncio.run(main())


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": MESSAGES, **extra}


ALICE = {"x-user-id": "alice"}


# --- plain and streamed calls through httpx ------------------------------------------


def test_plain_call_is_held_then_charged_the_priced_usage():
    body = chat_body(max_tokens=100)

    async def scenario(meter, upstream, client):
        response = await client.post("/v1/chat/completions", json=body, headers=ALICE)
        return response, upstream, await meter.ledger("alice"), await meter.account("alice")

    response, upstream, ledger, account = drive(START, scenario)
    assert response.status_code == 200
    assert response.json()["usage"] == PLAIN_USAGE
    # While the handler ran, the prompt estimate plus max_tokens was held.
    held = PRICING.cost(MODEL, TokenUsage(input=estimate_prompt_tokens(body), output=100)).total
    assert upstream.seen_available == [START - held]
    usage = TokenUsage(input=120, output=30)
    cost = PRICING.cost(MODEL, usage).total
    assert [e.kind for e in ledger] == [EntryKind.OPEN, EntryKind.CHARGE]
    charge = ledger[-1]
    assert (charge.cost, charge.usage, charge.model, charge.amount) == (cost, usage, MODEL, -cost)
    assert account.balance == account.available == START - cost
    assert sum(e.amount for e in ledger) == account.balance


def test_hold_counts_every_completion_limit_and_n_choices():
    body = chat_body(max_completion_tokens=50, n=3)

    async def scenario(meter, upstream, client):
        await client.post("/v1/chat/completions", json=body, headers=ALICE)
        return upstream.seen_available

    seen = drive(START, scenario, estimate=lambda body: 1000)
    assert seen == [START - PRICING.cost(MODEL, TokenUsage(input=1000, output=150)).total]


def test_streamed_call_is_charged_once_with_its_final_usage():
    async def scenario(meter, upstream, client):
        response = await client.post(
            "/v1/chat/completions", json=chat_body(stream=True, max_tokens=64), headers=ALICE
        )
        return response, await meter.ledger("alice"), await meter.account("alice")

    response, ledger, account = drive(START, scenario)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.endswith("data: [DONE]\n\n")
    charges = [e for e in ledger if e.kind is EntryKind.CHARGE]
    usage = TokenUsage(input=80, output=5)
    assert [(e.usage, e.cost) for e in charges] == [(usage, PRICING.cost(MODEL, usage).total)]
    assert account.available == account.balance == START - charges[0].cost


def test_anthropic_stream_merges_its_usage_events():
    async def scenario(meter, upstream, client):
        body = {"model": CLAUDE, "messages": MESSAGES, "max_tokens": 200, "stream": True}
        response = await client.post("/v1/messages", json=body, headers=ALICE)
        return response, await meter.ledger("alice")

    response, ledger = drive(START, scenario)
    assert response.status_code == 200
    usage = TokenUsage(input=40, output=12)
    assert [(e.kind, e.usage, e.cost) for e in ledger[1:]] == [
        (EntryKind.CHARGE, usage, PRICING.cost(CLAUDE, usage).total)
    ]


# --- refusals ------------------------------------------------------------------------


def test_a_user_who_cannot_pay_gets_402_and_the_handler_never_runs():
    denied = []

    async def main():
        async with AsyncBalanceManager(
            AsyncMemoryStore(),
            BalanceConfig(enabled=True, start_balance=50),
            on_event=lambda event: denied.append(event) if isinstance(event, Denied) else None,
        ) as meter:
            upstream = build(meter, estimate=lambda body: 100)
            transport = httpx.ASGITransport(app=upstream.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                response = await client.post(
                    "/v1/chat/completions", json=chat_body(max_tokens=1000), headers=ALICE
                )
            return response, upstream.calls, await meter.ledger("alice")

    response, calls, ledger = asyncio.run(main())
    assert response.status_code == 402
    # 100 x 0.15 + 1000 x 0.6: the prompt estimate plus max_tokens at gpt-4o-mini's rates.
    # LibreChat's fields, and OpenAI's error object beside them for the SDKs.
    assert response.json() == {
        "error": {
            "message": "user 'alice' cannot pay cost 615.00: available 50 (balance 50)",
            "type": "insufficient_quota",
            "param": None,
            "code": "token_balance",
        },
        "type": "token_balance",
        "balance": 50,
        "tokenCost": 615,
        "promptTokens": 100,
    }
    assert calls == []
    assert ledger == []  # nothing was written, not even an opening
    assert [(d.user_id, d.cost) for d in denied] == [("alice", Decimal(615))]


def broke_app() -> tuple[AsyncBalanceManager, Upstream]:
    meter = AsyncBalanceManager(AsyncMemoryStore(), BalanceConfig(enabled=True, start_balance=0))
    return meter, build(meter, paths=["/v1/chat/completions", "/v1/messages"])


def test_the_openai_sdk_says_why_a_402_refused_the_call():
    # Before the fix the body had no "error" object: the SDK raised
    # APIStatusError('Error code: 402') and nothing more.
    async def main():
        meter, upstream = broke_app()
        transport = httpx2.ASGITransport(app=upstream.app)
        async with (
            meter,
            openai.AsyncOpenAI(
                base_url="http://test/v1",
                api_key="x",
                default_headers=ALICE,
                max_retries=0,
                http_client=httpx2.AsyncClient(transport=transport),
            ) as client,
        ):
            with pytest.raises(openai.APIStatusError) as refused:
                await client.chat.completions.create(model=MODEL, messages=MESSAGES)
            return refused.value, upstream.calls

    refused, calls = asyncio.run(main())
    assert refused.status_code == 402
    assert "Error code: 402 - user 'alice' cannot pay cost 3.00: available 0" in str(refused)
    assert refused.code == "token_balance"
    assert refused.type == "insufficient_quota"
    assert refused.response.json()["type"] == "token_balance"  # LibreChat's fields stay
    assert refused.response.json()["balance"] == 0
    assert calls == []


def test_the_anthropic_sdk_says_why_a_402_refused_the_call():
    async def main():
        meter, upstream = broke_app()
        transport = httpx2.ASGITransport(app=upstream.app)
        async with (
            meter,
            anthropic.AsyncAnthropic(
                base_url="http://test",
                api_key="x",
                default_headers=ALICE,
                max_retries=0,
                http_client=httpx2.AsyncClient(transport=transport),
            ) as client,
        ):
            with pytest.raises(anthropic.APIStatusError) as refused:
                await client.messages.create(
                    model=CLAUDE, max_tokens=10, messages=[{"role": "user", "content": "hi"}]
                )
            return refused.value, upstream.calls

    refused, calls = asyncio.run(main())
    assert refused.status_code == 402
    assert "cannot pay" in str(refused)
    assert "cannot pay" in refused.body["error"]["message"]
    assert calls == []


def test_missing_user_is_401_and_the_handler_never_runs():
    async def scenario(meter, upstream, client):
        response = await client.post("/v1/chat/completions", json=chat_body())
        blank = await client.post(
            "/v1/chat/completions", json=chat_body(), headers={"x-user-id": " "}
        )
        return response, blank, upstream.calls, await meter.users()

    response, blank, calls, users = drive(START, scenario)
    assert response.status_code == blank.status_code == 401
    assert response.json()["error"]["code"] == "missing_user"
    assert calls == []
    assert users == []


def test_user_from_a_callable_sync_or_async():
    def from_key(scope, headers):
        key = headers.get("authorization", "")
        return {"Bearer k-1": "carol"}.get(key)

    async def from_key_async(scope, headers):
        await asyncio.sleep(0)
        return from_key(scope, headers)

    async def scenario(meter, upstream, client):
        ok = await client.post(
            "/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer k-1"}
        )
        bad = await client.post(
            "/v1/chat/completions", json=chat_body(), headers={"Authorization": "Bearer nope"}
        )
        return ok.status_code, bad.status_code, await meter.users()

    for resolver in (from_key, from_key_async):
        assert drive(START, scenario, user=resolver) == (200, 401, ["carol"])


@pytest.mark.parametrize(
    "content",
    [b"not json", b"[1, 2]", b"", json.dumps(chat_body(max_tokens=-1)).encode()],
    ids=["garbage", "not-an-object", "empty", "negative-max-tokens"],
)
def test_a_malformed_request_is_400_and_never_held(content):
    async def scenario(meter, upstream, client):
        response = await client.post("/v1/chat/completions", content=content, headers=ALICE)
        return response, upstream.calls, await meter.ledger("alice")

    response, calls, ledger = drive(START, scenario)
    assert response.status_code == 400
    assert "error" in response.json()
    assert calls == []
    assert ledger == []  # nothing was written, not even an opening


# --- failures release the hold ---------------------------------------------------------


def test_a_handler_that_raises_releases_the_hold_and_the_error_propagates():
    async def scenario(meter, upstream, client):
        with pytest.raises(RuntimeError, match="exploded"):
            await client.post("/v1/responses", json={"model": MODEL, "input": "hi"}, headers=ALICE)
        return upstream.calls, await meter.ledger("alice"), await meter.account("alice")

    calls, ledger, account = drive(START, scenario)
    assert len(calls) == 1  # the handler ran (and raised)
    assert [e.kind for e in ledger] == [EntryKind.OPEN, EntryKind.RELEASE]
    assert account.balance == account.available == START


def test_a_handler_that_raises_is_a_500_and_charges_nothing():
    async def scenario(meter, upstream, client):
        response = await client.post(
            "/v1/responses", json={"model": MODEL, "input": "hi"}, headers=ALICE
        )
        return response.status_code, await meter.ledger("alice")

    status, ledger = drive(START, scenario, raise_app_exceptions=False)
    assert status == 500
    assert [(e.kind, e.amount) for e in ledger[1:]] == [(EntryKind.RELEASE, 0)]


def test_an_error_status_releases_the_hold():
    async def scenario(meter, upstream, client):
        body = {"model": CLAUDE, "messages": MESSAGES, "max_tokens": 10, "fail": True}
        response = await client.post("/v1/messages", json=body, headers=ALICE)
        return response.status_code, await meter.ledger("alice"), await meter.account("alice")

    status, ledger, account = drive(START, scenario)
    assert status == 529
    assert [e.kind for e in ledger] == [EntryKind.OPEN, EntryKind.RELEASE]
    assert account.balance == account.available == START


def test_unmetered_routes_pass_through_untouched():
    async def scenario(meter, upstream, client):
        posted = await client.post("/v1/other", content=b"not even json")
        got = await client.get("/v1/chat/completions")
        return posted, got, await meter.users()

    posted, got, users = drive(START, scenario)
    assert posted.status_code == got.status_code == 200
    assert posted.json() == got.json() == {"ok": True}
    assert users == []  # no account was even opened


def test_custom_paths():
    async def scenario(meter, upstream, client):
        metered = await client.post("/v1/other", json=chat_body(), headers=ALICE)
        free = await client.post("/v1/chat/completions", json=chat_body(), headers=ALICE)
        return metered.status_code, free.status_code, await meter.ledger("alice")

    metered, free, ledger = drive(START, scenario, paths=["/v1/other"])
    assert (metered, free) == (200, 200)
    # /v1/other answers without usage: charged the estimate, with a warning.
    assert [(e.kind, e.usage) for e in ledger[1:]] == [
        (EntryKind.CHARGE, TokenUsage(input=estimate_prompt_tokens(chat_body())))
    ]


# --- the ASGI protocol itself: streaming, disconnects ----------------------------------


def scope_for(path: str = "/v1/chat/completions", user: bytes = b"bob") -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"x-user-id", user), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
    }


STREAM_BODY = json.dumps(chat_body(stream=True, max_tokens=64)).encode()


class Client:
    """An ASGI client by hand: the request body in two parts, then whatever the test wants."""

    def __init__(self, *, fail_after: int | None = None) -> None:
        self.fail_after = fail_after
        self.messages: list[dict[str, Any]] = []
        self.bodies: list[bytes] = []
        self.left = asyncio.Event()
        self.got_two = asyncio.Event()
        self.parts = [STREAM_BODY[:10], STREAM_BODY[10:]]

    async def receive(self) -> dict[str, Any]:
        if self.parts:
            part = self.parts.pop(0)
            return {"type": "http.request", "body": part, "more_body": bool(self.parts)}
        await self.left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            if self.fail_after is not None and len(self.bodies) == self.fail_after:
                raise OSError("the client went away")
            self.bodies.append(message.get("body", b""))
            if len(self.bodies) == 2:
                self.got_two.set()
        self.messages.append(message)


def test_stream_chunks_are_passed_on_as_they_come_and_charged_before_the_usage_arrives():
    async def main():
        async with manager() as meter:
            upstream = build(meter)
            upstream.first_sent = asyncio.Event()
            client = Client()
            charged_when_usage_arrived = []

            async def send(message):
                body = message.get("body", b"")
                if b'"usage"' in body:
                    ledger = await meter.ledger("bob")
                    charged_when_usage_arrived.append([e.kind for e in ledger])
                await client.send(message)
                if body:
                    upstream.first_sent.set()  # the stream waits for this before chunk 2

            await asyncio.wait_for(upstream.app(scope_for(), client.receive, send), 5)
            client.left.set()
            return client, charged_when_usage_arrived

    client, charged = asyncio.run(main())
    # One body message per chunk the app produced: nothing was held back.
    assert len(client.bodies) == len(WORDS) + 3  # words, usage, [DONE], the closing empty one
    assert client.bodies[0] == chat_chunk(WORDS[0])
    assert charged == [[EntryKind.OPEN, EntryKind.CHARGE]]


def test_send_failing_mid_stream_charges_once_as_incomplete():
    async def main():
        async with manager() as meter:
            upstream = build(meter)
            client = Client(fail_after=3)
            with pytest.raises(OSError, match="went away"):
                await asyncio.wait_for(upstream.app(scope_for(), client.receive, client.send), 5)
            client.left.set()
            return client, await meter.ledger("bob"), await meter.account("bob")

    client, ledger, account = asyncio.run(main())
    assert len(client.bodies) == 3
    body = json.loads(STREAM_BODY)
    # No usage reached the client: the estimate plus one token per chunk it got, at 1.15.
    usage = TokenUsage(input=estimate_prompt_tokens(body), output=3)
    charges = [e for e in ledger if e.kind is EntryKind.CHARGE]
    assert [(e.usage, e.cost) for e in charges] == [
        (usage, PRICING.cost(MODEL, usage, incomplete=True).total)
    ]
    assert len(ledger) == 2
    assert account.available == account.balance == START - charges[0].cost


def test_client_disconnect_mid_stream_charges_once_as_incomplete():
    async def main():
        async with manager() as meter:
            upstream = build(meter)
            upstream.gate = asyncio.Event()  # never set: the stream hangs after two chunks
            client = Client()

            async def leave_after_two():
                await client.got_two.wait()
                client.left.set()

            leaving = asyncio.ensure_future(leave_after_two())
            await asyncio.wait_for(upstream.app(scope_for(), client.receive, client.send), 5)
            await leaving
            return client, await meter.ledger("bob"), await meter.account("bob")

    client, ledger, account = asyncio.run(main())
    assert len(client.bodies) == 2
    usage = TokenUsage(input=estimate_prompt_tokens(json.loads(STREAM_BODY)), output=2)
    assert [(e.kind, e.usage, e.cost) for e in ledger[1:]] == [
        (EntryKind.CHARGE, usage, PRICING.cost(MODEL, usage, incomplete=True).total)
    ]
    assert account.available == account.balance


def test_client_gone_before_the_body_arrives_runs_nothing():
    async def main():
        async with manager() as meter:
            upstream = build(meter)

            async def receive():
                return {"type": "http.disconnect"}

            async def send(message):
                raise AssertionError("nothing is sent to a client that left")

            await upstream.app(scope_for(), receive, send)
            return upstream.calls, await meter.ledger("bob")

    calls, ledger = asyncio.run(main())
    assert calls == []
    assert ledger == []


def test_middleware_needs_an_async_manager():
    with pytest.raises(TypeError, match="AsyncBalanceManager"):
        CreditMeterMiddleware(FastAPI(), object())  # type: ignore[arg-type]


# --- the pieces ----------------------------------------------------------------------------


def test_sse_parser_finds_the_same_events_however_the_stream_is_cut():
    stream = (
        b": a comment\r\n"
        b'event: message_start\r\ndata: {"a": 1}\r\n\r\n'
        b"data: first line\ndata: second line\n\n"
        b"id: 7\ndata:no-space\n\n"
        b"data: [DONE]"  # no closing blank line: flushed at the end
    )
    expected = [b'{"a": 1}', b"first line\nsecond line", b"no-space", b"[DONE]"]
    for size in range(1, len(stream) + 1):
        parser = _SSEParser()
        events = []
        for at in range(0, len(stream), size):
            events += parser.feed(stream[at : at + size])
        events += parser.close()
        assert events == expected, size


def test_sse_parser_skips_an_oversized_line_and_keeps_going(monkeypatch):
    monkeypatch.setattr("creditmeter.integrations.asgi.MAX_EVENT_BYTES", 16)
    parser = _SSEParser()
    events = parser.feed(b"data: " + b"x" * 40)
    events += parser.feed(b"y" * 40 + b"\n\ndata: ok\n\n")
    assert events == [b"ok"]


def test_default_estimate_counts_text_not_media():
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 10_000}}
    body = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "x" * 40}, image]},
            {"role": "assistant", "tool_calls": [{"function": {"arguments": "y" * 20}}]},
        ]
    }
    assert estimate_prompt_tokens(body) == (40 + 20) // 4 + 2 * 4
    assert estimate_prompt_tokens({"input": "z" * 9, "instructions": "w" * 3}) == 3
    assert estimate_prompt_tokens({}) == 1
