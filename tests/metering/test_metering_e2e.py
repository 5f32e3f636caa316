"""End to end: the real OpenAI and Anthropic SDK clients, metered, against a fake provider.

No network: every client talks through an ``httpx2.MockTransport`` (the SDKs are
built on ``httpx2``) to ``FakeProvider``, which answers as the provider does:
JSON results with usage, SSE streams with a final usage report, and errors
for a marker in the prompt. Expected costs come from ``Pricing.librechat()``.
"""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import AsyncIterator, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import pytest

from creditmeter import (
    AsyncBalanceManager,
    AsyncMemoryStore,
    AsyncMeteredStream,
    AsyncSQLiteStore,
    BalanceConfig,
    BalanceManager,
    EntryKind,
    InsufficientBalance,
    LedgerEntry,
    MemoryStore,
    MeteredStream,
    Pricing,
    SQLiteStore,
    TokenUsage,
)

START = Decimal(10**9)
CONFIG = BalanceConfig(enabled=True, start_balance=START)
PRICING = Pricing.librechat()
USER = "alice"

OPENAI_MODEL = "gpt-4o"
ANTHROPIC_MODEL = "claude-sonnet-4-20250514"

# What the fake provider reports. OpenAI's prompt_tokens includes the cached tokens;
# Anthropic's input_tokens excludes cache writes and reads.
OPENAI_PROMPT, OPENAI_CACHED, OPENAI_COMPLETION = 1200, 200, 345
OPENAI_USAGE = TokenUsage(input=1000, output=345, cache_read=200)
ANTHROPIC_INPUT, ANTHROPIC_WRITE, ANTHROPIC_READ, ANTHROPIC_OUTPUT = 900, 100, 400, 321
ANTHROPIC_USAGE = TokenUsage(input=900, output=321, cache_write=100, cache_read=400)

WORDS = ["Hello", ",", " world", "!", " How", " are", " you", "?"]  # one chunk each
ESTIMATE = 120  # input tokens, as an ``estimate=`` callable would count the prompt


def estimate(*_args: Any, **_kwargs: Any) -> int:
    return ESTIMATE


# --- the fake provider --------------------------------------------------------------


class SSEBody(httpx2.SyncByteStream, httpx2.AsyncByteStream):
    """A response body sent one SSE event at a time; remembers how far it got."""

    def __init__(self, events: list[bytes]) -> None:
        self.events = events
        self.sent = 0
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        for event in self.events:
            self.sent += 1
            yield event

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for event in self.events:
            self.sent += 1
            yield event

    def close(self) -> None:
        self.closed = True

    async def aclose(self) -> None:
        self.closed = True


def _sse(data: object, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event is not None else ""
    payload = data if isinstance(data, str) else json.dumps(data)
    return f"{head}data: {payload}\n\n".encode()


class FakeProvider:
    """Answers OpenAI chat completions and Anthropic messages like the real APIs.

    A prompt containing ``FAIL-500`` or ``FAIL-400`` gets that HTTP error;
    ``FAIL-MIDSTREAM`` gets an error event after two content chunks.
    """

    def __init__(self, *, delay: float = 0.0) -> None:
        self.delay = delay
        self.requests: list[dict[str, Any]] = []
        self.bodies: list[SSEBody] = []
        self.in_flight = 0
        self.max_in_flight = 0

    @property
    def calls(self) -> int:
        return len(self.requests)

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        body = json.loads(request.content)
        self.requests.append(body)
        path = request.url.path
        anthropic_api = path == "/v1/messages"
        if path not in ("/v1/chat/completions", "/v1/messages"):
            return httpx2.Response(404, json={"error": {"message": f"no route {path}"}})
        prompt = json.dumps(body.get("messages"))
        for status in (500, 400):
            if f"FAIL-{status}" in prompt:
                return self._error(status, anthropic_api=anthropic_api)
        if anthropic_api:
            return self._anthropic_stream(body) if body.get("stream") else self._anthropic(body)
        return self._openai_stream(body) if body.get("stream") else self._openai(body)

    async def ahandle(self, request: httpx2.Request) -> httpx2.Response:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            return self.handle(request)
        finally:
            self.in_flight -= 1

    def _error(self, status: int, *, anthropic_api: bool) -> httpx2.Response:
        message = f"fake provider failure {status}"
        if anthropic_api:
            kind = "api_error" if status == 500 else "invalid_request_error"
            body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
        else:
            kind = "server_error" if status == 500 else "invalid_request_error"
            body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        return httpx2.Response(status, json=body)

    def _stream_response(self, events: list[bytes]) -> httpx2.Response:
        body = SSEBody(events)
        self.bodies.append(body)
        return httpx2.Response(200, headers={"content-type": "text/event-stream"}, stream=body)

    # OpenAI chat completions

    @staticmethod
    def _openai_usage() -> dict[str, Any]:
        return {
            "prompt_tokens": OPENAI_PROMPT,
            "completion_tokens": OPENAI_COMPLETION,
            "total_tokens": OPENAI_PROMPT + OPENAI_COMPLETION,
            "prompt_tokens_details": {"cached_tokens": OPENAI_CACHED, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        }

    def _openai(self, body: dict[str, Any]) -> httpx2.Response:
        return httpx2.Response(
            200,
            json={
                "id": f"chatcmpl-{self.calls}",
                "object": "chat.completion",
                "created": 1_700_000_000,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(WORDS)},
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                ],
                "usage": self._openai_usage(),
            },
        )

    def _openai_stream(self, body: dict[str, Any]) -> httpx2.Response:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        midstream_error = "FAIL-MIDSTREAM" in json.dumps(body.get("messages"))

        def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None) -> bytes:
            data: dict[str, Any] = {
                "id": f"chatcmpl-{self.calls}",
                "object": "chat.completion.chunk",
                "created": 1_700_000_000,
                "model": body["model"],
                "choices": choices,
            }
            if include_usage:
                data["usage"] = usage  # null on every chunk but the last, as OpenAI sends
            return _sse(data)

        events = []
        for i, word in enumerate(WORDS):
            if midstream_error and i == 2:
                error = {"message": "overloaded", "type": "server_error"}
                events.append(_sse({"error": error}))
                break
            delta: dict[str, Any] = {"content": word}
            if i == 0:
                delta["role"] = "assistant"
            last = i == len(WORDS) - 1
            choice = {"index": 0, "delta": delta, "finish_reason": "stop" if last else None}
            events.append(chunk([choice], None))
        else:
            if include_usage:
                events.append(chunk([], self._openai_usage()))
            events.append(_sse("[DONE]"))
        return self._stream_response(events)

    # Anthropic messages

    def _anthropic_message(self, body: dict[str, Any], *, streaming: bool) -> dict[str, Any]:
        return {
            "id": f"msg_{self.calls}",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [] if streaming else [{"type": "text", "text": "".join(WORDS)}],
            "stop_reason": None if streaming else "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": ANTHROPIC_INPUT,
                "output_tokens": 1 if streaming else ANTHROPIC_OUTPUT,
                "cache_creation_input_tokens": ANTHROPIC_WRITE,
                "cache_read_input_tokens": ANTHROPIC_READ,
            },
        }

    def _anthropic(self, body: dict[str, Any]) -> httpx2.Response:
        return httpx2.Response(200, json=self._anthropic_message(body, streaming=False))

    def _anthropic_stream(self, body: dict[str, Any]) -> httpx2.Response:
        message = self._anthropic_message(body, streaming=True)
        events = [
            _sse({"type": "message_start", "message": message}, "message_start"),
            _sse(
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
                "content_block_start",
            ),
            _sse({"type": "ping"}, "ping"),
        ]
        events += [
            _sse(
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": word},
                },
                "content_block_delta",
            )
            for word in WORDS
        ]
        events += [
            _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            _sse(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": ANTHROPIC_OUTPUT},
                },
                "message_delta",
            ),
            _sse({"type": "message_stop"}, "message_stop"),
        ]
        return self._stream_response(events)


# --- clients, managers and the metered functions ------------------------------------


def openai_client(provider: FakeProvider) -> openai.OpenAI:
    return openai.OpenAI(
        api_key="test",
        base_url="http://fake.test/v1",
        max_retries=0,
        http_client=httpx2.Client(transport=httpx2.MockTransport(provider.handle)),
    )


def async_openai_client(provider: FakeProvider) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key="test",
        base_url="http://fake.test/v1",
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(provider.ahandle)),
    )


def anthropic_client(provider: FakeProvider) -> anthropic.Anthropic:
    # Anthropic's SDK adds /v1/messages to the base URL itself.
    return anthropic.Anthropic(
        api_key="test",
        base_url="http://fake.test",
        max_retries=0,
        http_client=httpx2.Client(transport=httpx2.MockTransport(provider.handle)),
    )


def async_anthropic_client(provider: FakeProvider) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        api_key="test",
        base_url="http://fake.test",
        max_retries=0,
        http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(provider.ahandle)),
    )


@pytest.fixture(params=["memory", "sqlite"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def meter(store_kind: str, tmp_path: Path) -> Iterator[BalanceManager]:
    store = MemoryStore() if store_kind == "memory" else SQLiteStore(tmp_path / "c.db")
    with BalanceManager(store, CONFIG) as manager:
        yield manager


@pytest.fixture
def make_async_meter(store_kind: str, tmp_path: Path) -> Callable[[], AsyncBalanceManager]:
    """Builds the async manager inside the test's event loop; the test closes it."""

    def make() -> AsyncBalanceManager:
        if store_kind == "memory":
            return AsyncBalanceManager(AsyncMemoryStore(), CONFIG)
        return AsyncBalanceManager(AsyncSQLiteStore(tmp_path / "c.db"), CONFIG)

    return make


def _messages(prompt: str) -> Any:  # the SDKs type messages as TypedDicts
    return [{"role": "user", "content": prompt}]


def metered_openai(meter: BalanceManager, client: openai.OpenAI, **options: Any) -> Any:
    @meter.metered(user="user_id", model="model", **options)
    def ask(
        prompt: str,
        *,
        user_id: str,
        model: str = OPENAI_MODEL,
        stream: bool = False,
        request_id: str | None = None,
    ) -> Any:
        if stream:
            return client.chat.completions.create(
                model=model,
                messages=_messages(prompt),
                user=user_id,
                stream=True,
                stream_options={"include_usage": True},
            )
        return client.chat.completions.create(model=model, messages=_messages(prompt), user=user_id)

    return ask


def metered_async_openai(
    meter: AsyncBalanceManager, client: openai.AsyncOpenAI, **options: Any
) -> Any:
    @meter.metered(user="user_id", model="model", **options)
    async def ask(
        prompt: str,
        *,
        user_id: str,
        model: str = OPENAI_MODEL,
        stream: bool = False,
        request_id: str | None = None,
    ) -> Any:
        if stream:
            return await client.chat.completions.create(
                model=model,
                messages=_messages(prompt),
                user=user_id,
                stream=True,
                stream_options={"include_usage": True},
            )
        return await client.chat.completions.create(
            model=model, messages=_messages(prompt), user=user_id
        )

    return ask


def metered_anthropic(meter: BalanceManager, client: anthropic.Anthropic, **options: Any) -> Any:
    @meter.metered(user="user_id", model="model", **options)
    def ask(
        prompt: str,
        *,
        user_id: str,
        model: str = ANTHROPIC_MODEL,
        stream: bool = False,
        request_id: str | None = None,
    ) -> Any:
        return client.messages.create(
            model=model,
            max_tokens=1024,
            messages=_messages(prompt),
            stream=stream,
        )

    return ask


def metered_async_anthropic(
    meter: AsyncBalanceManager, client: anthropic.AsyncAnthropic, **options: Any
) -> Any:
    @meter.metered(user="user_id", model="model", **options)
    async def ask(
        prompt: str,
        *,
        user_id: str,
        model: str = ANTHROPIC_MODEL,
        stream: bool = False,
        request_id: str | None = None,
    ) -> Any:
        return await client.messages.create(
            model=model,
            max_tokens=1024,
            messages=_messages(prompt),
            stream=stream,
        )

    return ask


# --- checking the ledger --------------------------------------------------------------


def charges(entries: list[LedgerEntry]) -> list[LedgerEntry]:
    return [entry for entry in entries if entry.kind is EntryKind.CHARGE]


def assert_charged_once(
    entries: list[LedgerEntry],
    balance: Decimal,
    *,
    model: str,
    usage: TokenUsage,
    incomplete: bool = False,
) -> None:
    """Exactly one CHARGE, for the priced usage, and the ledger adds up to the balance."""
    cost = PRICING.cost(model, usage, incomplete=incomplete)
    [entry] = charges(entries)
    assert entry.user_id == USER
    assert entry.model == model
    assert entry.usage == usage
    assert entry.rates == cost.rates
    assert entry.cost == cost.total
    assert entry.amount == -cost.total
    assert balance == START - cost.total
    assert sum(e.amount for e in entries) == balance


def assert_not_charged(entries: list[LedgerEntry], balance: Decimal) -> None:
    assert charges(entries) == []
    assert balance == START
    assert sum(e.amount for e in entries) == balance


# --- 1. a normal call is charged exactly ----------------------------------------------


def test_openai_call_is_charged_the_priced_usage(meter: BalanceManager) -> None:
    provider = FakeProvider()
    with openai_client(provider) as client:
        ask = metered_openai(meter, client)
        completion = ask("Say hello", user_id=USER)
    assert isinstance(completion, openai.types.chat.ChatCompletion)
    assert completion.choices[0].message.content == "".join(WORDS)
    assert provider.calls == 1
    assert provider.requests[0]["user"] == USER
    assert_charged_once(
        meter.ledger(USER), meter.balance(USER), model=OPENAI_MODEL, usage=OPENAI_USAGE
    )


def test_async_openai_call_is_charged_the_priced_usage(
    make_async_meter: Callable[[], AsyncBalanceManager],
) -> None:
    async def scenario() -> None:
        provider = FakeProvider()
        async with make_async_meter() as meter, async_openai_client(provider) as client:
            ask = metered_async_openai(meter, client)
            completion = await ask("Say hello", user_id=USER, model="gpt-4o-mini")
            assert isinstance(completion, openai.types.chat.ChatCompletion)
            assert provider.calls == 1
            assert_charged_once(
                await meter.ledger(USER),
                await meter.balance(USER),
                model="gpt-4o-mini",
                usage=OPENAI_USAGE,
            )

    asyncio.run(scenario())


def test_anthropic_call_is_charged_the_priced_usage(meter: BalanceManager) -> None:
    provider = FakeProvider()
    with anthropic_client(provider) as client:
        ask = metered_anthropic(meter, client)
        message = ask("Say hello", user_id=USER)
    assert isinstance(message, anthropic.types.Message)
    assert provider.calls == 1
    assert_charged_once(
        meter.ledger(USER), meter.balance(USER), model=ANTHROPIC_MODEL, usage=ANTHROPIC_USAGE
    )


def test_async_anthropic_call_is_charged_the_priced_usage(
    make_async_meter: Callable[[], AsyncBalanceManager],
) -> None:
    async def scenario() -> None:
        provider = FakeProvider()
        async with make_async_meter() as meter, async_anthropic_client(provider) as client:
            ask = metered_async_anthropic(meter, client)
            message = await ask("Say hello", user_id=USER)
            assert isinstance(message, anthropic.types.Message)
            assert_charged_once(
                await meter.ledger(USER),
                await meter.balance(USER),
                model=ANTHROPIC_MODEL,
                usage=ANTHROPIC_USAGE,
            )

    asyncio.run(scenario())


# --- 2. a stream consumed fully is charged once with the final usage ------------------


def _openai_text(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_openai_stream_is_charged_once_with_the_final_usage(meter: BalanceManager) -> None:
    provider = FakeProvider()
    with openai_client(provider) as client:
        ask = metered_openai(meter, client)
        stream = ask("Say hello", user_id=USER, stream=True)
        assert isinstance(stream, MeteredStream)
        assert isinstance(stream.response, httpx2.Response)  # the SDK stream's attributes
        assert provider.requests[0]["stream_options"] == {"include_usage": True}
        first = next(stream)
        assert charges(meter.ledger(USER)) == []  # nothing charged mid-stream
        chunks = [first, *stream]
    assert _openai_text(chunks) == "".join(WORDS)
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert_charged_once(
        meter.ledger(USER), meter.balance(USER), model=OPENAI_MODEL, usage=OPENAI_USAGE
    )
    stream.close()  # closing an ended stream charges nothing more
    assert len(charges(meter.ledger(USER))) == 1


def test_async_openai_stream_is_charged_once_with_the_final_usage(
    make_async_meter: Callable[[], AsyncBalanceManager],
) -> None:
    async def scenario() -> None:
        provider = FakeProvider()
        async with make_async_meter() as meter, async_openai_client(provider) as client:
            ask = metered_async_openai(meter, client)
            stream = await ask("Say hello", user_id=USER, stream=True)
            assert isinstance(stream, AsyncMeteredStream)
            chunks = [chunk async for chunk in stream]
            assert _openai_text(chunks) == "".join(WORDS)
            assert_charged_once(
                await meter.ledger(USER),
                await meter.balance(USER),
                model=OPENAI_MODEL,
                usage=OPENAI_USAGE,
            )
            await stream.aclose()
            assert len(charges(await meter.ledger(USER))) == 1

    asyncio.run(scenario())


def _anthropic_text(events: list[Any]) -> str:
    return "".join(e.delta.text for e in events if e.type == "content_block_delta")


def test_anthropic_event_stream_is_charged_once_with_the_final_usage(
    meter: BalanceManager,
) -> None:
    provider = FakeProvider()
    with anthropic_client(provider) as client:
        ask = metered_anthropic(meter, client)
        stream = ask("Say hello", user_id=USER, stream=True)
        assert isinstance(stream, MeteredStream)
        events = list(stream)
    assert [e.type for e in events][:2] == ["message_start", "content_block_start"]
    assert events[-1].type == "message_stop"
    assert _anthropic_text(events) == "".join(WORDS)
    assert_charged_once(
        meter.ledger(USER), meter.balance(USER), model=ANTHROPIC_MODEL, usage=ANTHROPIC_USAGE
    )


def test_async_anthropic_event_stream_is_charged_once_with_the_final_usage(
    make_async_meter: Callable[[], AsyncBalanceManager],
) -> None:
    async def scenario() -> None:
        provider = FakeProvider()
        async with make_async_meter() as meter, async_anthropic_client(provider) as client:
            ask = metered_async_anthropic(meter, client)
            stream = await ask("Say hello", user_id=USER, stream=True)
            assert isinstance(stream, AsyncMeteredStream)
            async with stream:
                events = [event async for event in stream]
            assert _anthropic_text(events) == "".join(WORDS)
            assert_charged_once(
                await meter.ledger(USER),
                await meter.balance(USER),
                model=ANTHROPIC_MODEL,
                usage=ANTHROPIC_USAGE,
            )

    asyncio.run(scenario())


def test_generator_over_anthropic_message_stream_is_charged_once(meter: BalanceManager) -> None:
    """A generator around ``client.messages.stream`` (the SDK's MessageStream helper)."""
    provider = FakeProvider()
    with anthropic_client(provider) as client:

        @meter.metered(user="user_id", model="model")
        def ask(prompt: str, *, user_id: str, model: str = ANTHROPIC_MODEL) -> Iterator[Any]:
            with client.messages.stream(
                model=model,
                max_tokens=1024,
                messages=_messages(prompt),
            ) as events:
                yield from events

        text = "".join(
            event.text for event in ask("Say hello", user_id=USER) if event.type == "text"
        )
    assert text == "".join(WORDS)
    assert_charged_once(
        meter.ledger(USER), meter.balance(USER), model=ANTHROPIC_MODEL, usage=ANTHROPIC_USAGE
    )


def test_async_generator_over_anthropic_message_stream_is_charged_once(
    make_async_meter: Callable[[], AsyncBalanceManager],
) -> None:
    async def scenario() -> None:
        provider = FakeProvider()
        async with make_async_meter() as meter, async_anthropic_client(provider) as client:

            @meter.metered(user="user_id", model="model")
            async def ask(
                prompt: str, *, user_id: str, model: str = ANTHROPIC_MODEL
            ) -> AsyncIterator[Any]:
                async with client.messages.stream(
                    model=model,
                    max_tokens=1024,
                    messages=_messages(prompt),
                ) as events:
                    async for event in events:
                        yield event

            text = "".join(
                [
                    event.text
                    async for event in ask("Say hello", user_id=USER)
                    if event.type == "text"
                ]
            )
            assert text == "".join(WORDS)
            assert_charged_once(
                await meter.ledger(USER),
                await meter.balance(USER),
                model=ANTHROPIC_MODEL,
                usage=ANTHROPIC_USAGE,
            )

    asyncio.run(scenario())


# --- 3. a stream closed after 3 chunks is charged once, as incomplete ------------------

CUT_SHORT = TokenUsage(input=ESTIMATE, output=3)  # the estimate plus one token per chunk


def _take_three_then_stop(stream: Any, how: str) -> None:
    if how == "close":
        for _ in range(3):
            next(stream)
        stream.close()
    else:  # leave a ``with`` block early
        with stream:
            for i, _chunk in enumerate(stream):
                if i == 2:
                    break


@pytest.mark.parametrize("how", ["close", "with"])
def test_openai_stream_closed_after_three_chunks_is_charged_as_incomplete(
    meter: BalanceManager, how: str
) -> None:
    provider = FakeProvider()
    with openai_client(provider) as client:
        ask = metered_openai(meter, client, estimate=estimate)
        stream = ask("Say hello", user_id=USER, stream=True)
        _take_three_then_stop(stream, how)
        [body] = provider.bodies
        assert body.closed  # the HTTP response was closed through the wrapper
        assert body.sent < len(body.events)
        assert stream.response.is_closed
        assert list(stream) == []  # a closed stream yields nothing more
        stream.close()  # closing again charges nothing more
        del stream
        gc.collect()  # nor does finalizing it
    assert_charged_once(
        meter.ledger(USER),
        meter.balance(USER),
        model=OPENAI_MODEL,
        usage=CUT_SHORT,
        incomplete=True,
    )


@pytest.mark.parametrize("how", ["aclose", "async with"])
def test_async_openai_stream_closed_after_three_chunks_is_charged_as_incomplete(
    make_async_meter: Callable[[], AsyncBalanceManager], how: str
) -> None:
    async def scenario() -> None:
        provider = FakeProvider()
        async with make_async_meter() as meter, async_openai_client(provider) as client:
            ask = metered_async_openai(meter, client, estimate=estimate)
            stream = await ask("Say hello", user_id=USER, stream=True)
            if how == "aclose":
                for _ in range(3):
                    await stream.__anext__()
                await stream.aclose()
            else:
                async with stream:
                    seen = 0
                    async for _chunk in stream:
                        seen += 1
                        if seen == 3:
                            break
            [body] = provider.bodies
            assert body.closed
            assert stream.response.is_closed
            await stream.aclose()
            assert_charged_once(
                await meter.ledger(USER),
                await meter.balance(USER),
                model=OPENAI_MODEL,
                usage=CUT_SHORT,
                incomplete=True,
            )

    asyncio.run(scenario())


def test_anthropic_stream_closed_early_is_charged_the_reported_usage_as_incomplete(
    meter: BalanceManager,
) -> None:
    """Anthropic's message_start carries usage, so a cut stream is charged that (spec)."""
    provider = FakeProvider()
    with anthropic_client(provider) as client:
        ask = metered_anthropic(meter, client, estimate=estimate)
        stream = ask("Say hello", user_id=USER, stream=True)
        with stream:
            events = [next(stream) for _ in range(3)]
        assert [e.type for e in events] == [
            "message_start",
            "content_block_start",
            "content_block_delta",
        ]
        assert provider.bodies[0].closed
    reported = TokenUsage(input=900, output=1, cache_write=100, cache_read=400)
    assert_charged_once(
        meter.ledger(USER),
        meter.balance(USER),
        model=ANTHROPIC_MODEL,
        usage=reported,
        incomplete=True,
    )


def test_openai_stream_failing_midway_is_charged_once_as_incomplete(
    meter: BalanceManager,
) -> None:
    provider = FakeProvider()
    with openai_client(provider) as client:
        ask = metered_openai(meter, client, estimate=estimate)
        stream = ask("FAIL-MIDSTREAM", user_id=USER, stream=True)
        received = []
        with pytest.raises(openai.APIError, match="overloaded"):
            received.extend(stream)
        assert len(received) == 2
        stream.close()
    assert_charged_once(
        meter.ledger(USER),
        meter.balance(USER),
        model=OPENAI_MODEL,
        usage=TokenUsage(input=ESTIMATE, output=2),
        incomplete=True,
    )


def test_openai_stream_dropped_unfinished_is_charged_once_as_incomplete(
    meter: BalanceManager,
) -> None:
    provider = FakeProvider()
    with openai_client(provider) as client:
        ask = metered_openai(meter, client, estimate=estimate)
        stream = ask("Say hello", user_id=USER, stream=True)
        for _ in range(3):
            next(stream)
        del stream  # neither exhausted nor closed
        gc.collect()
        assert provider.bodies[0].closed
    assert_charged_once(
        meter.ledger(USER),
        meter.balance(USER),
        model=OPENAI_MODEL,
        usage=CUT_SHORT,
        incomplete=True,
    )


def test_async_openai_stream_dropped_unfinished_is_charged_once_as_incomplete(
    make_async_meter: Callable[[], AsyncBalanceManager],
) -> None:
    async def scenario() -> None:
        provider = FakeProvider()
        async with make_async_meter() as meter, async_openai_client(provider) as client:
            ask = metered_async_openai(meter, client, estimate=estimate)
            stream = await ask("Say hello", user_id=USER, stream=True)
            seen = 0
            async for _chunk in stream:
                seen += 1
                if seen == 3:
                    break
            del stream  # neither exhausted nor closed
            gc.collect()
            await asyncio.sleep(0.05)  # room for a charge the finalizer scheduled
            assert_charged_once(
                await meter.ledger(USER),
                await meter.balance(USER),
                model=OPENAI_MODEL,
                usage=CUT_SHORT,
                incomplete=True,
            )

    asyncio.run(scenario())


# --- streams that report no usage --------------------------------------------------------


def _ask_without_usage(meter: BalanceManager, client: openai.OpenAI, **options: Any) -> Any:
    @meter.metered(user="user_id", model="model", **options)
    def ask(prompt: str, *, user_id: str, model: str = OPENAI_MODEL) -> Any:
        # No stream_options: OpenAI sends no usage chunk.
        return client.chat.completions.create(model=model, messages=_messages(prompt), stream=True)

    return ask


def test_openai_stream_without_usage_logs_and_charges_the_estimate_and_chunks(
    meter: BalanceManager, caplog: pytest.LogCaptureFixture
) -> None:
    provider = FakeProvider()
    with openai_client(provider) as client, caplog.at_level("WARNING", logger="creditmeter"):
        ask = _ask_without_usage(meter, client, estimate=estimate)
        chunks = list(ask("Say hello", user_id=USER))
    assert all(chunk.usage is None for chunk in chunks)
    [record] = [r for r in caplog.records if r.name == "creditmeter"]
    assert record.levelname == "WARNING"
    assert USER in record.getMessage()
    assert OPENAI_MODEL in record.getMessage()
    assert_charged_once(
        meter.ledger(USER),
        meter.balance(USER),
        model=OPENAI_MODEL,
        usage=TokenUsage(input=ESTIMATE, output=len(WORDS)),
    )


def test_openai_stream_without_usage_or_estimate_logs_what_it_charges(
    meter: BalanceManager, caplog: pytest.LogCaptureFixture
) -> None:
    provider = FakeProvider()
    with openai_client(provider) as client, caplog.at_level("WARNING", logger="creditmeter"):
        ask = _ask_without_usage(meter, client)
        list(ask("Say hello", user_id=USER))
    [record] = [r for r in caplog.records if r.name == "creditmeter"]
    charged = charges(meter.ledger(USER))
    says_nothing = "charging nothing" in record.getMessage()
    assert says_nothing == (charged == []), (record.getMessage(), charged)


# --- the user from acting_as ---------------------------------------------------------------


def test_acting_as_user_is_charged_for_a_real_call(meter: BalanceManager) -> None:
    provider = FakeProvider()
    with openai_client(provider) as client:

        @meter.metered(model="model")
        def ask(prompt: str, *, model: str = OPENAI_MODEL) -> Any:
            return client.chat.completions.create(model=model, messages=_messages(prompt))

        with meter.acting_as(USER):
            ask("Say hello")
    assert_charged_once(
        meter.ledger(USER), meter.balance(USER), model=OPENAI_MODEL, usage=OPENAI_USAGE
    )


# --- 4. a provider error charges nothing and propagates unchanged ----------------------


@pytest.mark.parametrize(
    ("marker", "error"),
    [("FAIL-500", openai.InternalServerError), ("FAIL-400", openai.BadRequestError)],
)
def test_openai_error_charges_nothing_and_propagates(
    meter: BalanceManager, marker: str, error: type[openai.APIStatusError]
) -> None:
    provider = FakeProvider()
    raised: list[BaseException] = []
    with openai_client(provider) as client:
        call = metered_openai(meter, client, estimate=estimate)

        def ask(prompt: str, *, user_id: str, stream: bool = False) -> Any:
            try:
                return call(prompt, user_id=user_id, stream=stream)
            except BaseException as exc:
                raised.append(exc)
                raise

        for stream in (False, True):
            with pytest.raises(error) as info:
                ask(f"please {marker}", user_id=USER, stream=stream)
            assert type(info.value) is error
            assert info.value is raised[-1]
            assert info.value.status_code == int(marker[-3:])
    assert provider.calls == 2
    assert_not_charged(meter.ledger(USER), meter.balance(USER))


def test_openai_sdk_error_is_the_same_object(meter: BalanceManager) -> None:
    provider = FakeProvider()
    raised: list[BaseException] = []
    with openai_client(provider) as client:

        @meter.metered(user="user_id", model="model")
        def ask(prompt: str, *, user_id: str, model: str = OPENAI_MODEL) -> Any:
            try:
                return client.chat.completions.create(model=model, messages=_messages(prompt))
            except openai.APIStatusError as exc:
                raised.append(exc)
                raise

        with pytest.raises(openai.InternalServerError) as info:
            ask("FAIL-500", user_id=USER)
    assert info.value is raised[0]
    assert_not_charged(meter.ledger(USER), meter.balance(USER))


def test_async_openai_error_charges_nothing_and_propagates(
    make_async_meter: Callable[[], AsyncBalanceManager],
) -> None:
    async def scenario() -> None:
        provider = FakeProvider()
        async with make_async_meter() as meter, async_openai_client(provider) as client:
            ask = metered_async_openai(meter, client, estimate=estimate)
            with pytest.raises(openai.InternalServerError) as info:
                await ask("FAIL-500", user_id=USER)
            assert type(info.value) is openai.InternalServerError
            with pytest.raises(openai.BadRequestError):
                await ask("FAIL-400", user_id=USER, stream=True)
            assert provider.calls == 2
            assert_not_charged(await meter.ledger(USER), await meter.balance(USER))

    asyncio.run(scenario())


def test_anthropic_error_charges_nothing_and_propagates(meter: BalanceManager) -> None:
    provider = FakeProvider()
    with anthropic_client(provider) as client:
        ask = metered_anthropic(meter, client, estimate=estimate)
        with pytest.raises(anthropic.InternalServerError) as info:
            ask("FAIL-500", user_id=USER)
        assert type(info.value) is anthropic.InternalServerError
        with pytest.raises(anthropic.BadRequestError):
            ask("FAIL-400", user_id=USER, stream=True)
    assert provider.calls == 2
    assert_not_charged(meter.ledger(USER), meter.balance(USER))


def test_async_anthropic_error_charges_nothing_and_propagates(
    make_async_meter: Callable[[], AsyncBalanceManager],
) -> None:
    async def scenario() -> None:
        provider = FakeProvider()
        async with make_async_meter() as meter, async_anthropic_client(provider) as client:
            ask = metered_async_anthropic(meter, client)
            with pytest.raises(anthropic.InternalServerError):
                await ask("FAIL-500", user_id=USER, stream=True)
            assert_not_charged(await meter.ledger(USER), await meter.balance(USER))

    asyncio.run(scenario())


# --- 5. 50 concurrent async calls for one user -----------------------------------------


def test_fifty_concurrent_async_calls_are_each_charged_once(
    make_async_meter: Callable[[], AsyncBalanceManager],
) -> None:
    calls = 50
    cost = PRICING.cost(OPENAI_MODEL, OPENAI_USAGE).total

    async def scenario() -> None:
        provider = FakeProvider(delay=0.01)
        async with make_async_meter() as meter, async_openai_client(provider) as client:
            ask = metered_async_openai(meter, client)
            await meter.balance(USER)  # opened before the rush: START is the reference
            results = await asyncio.gather(
                *(ask(f"question {i}", user_id=USER) for i in range(calls))
            )
            assert len(results) == calls
            assert provider.calls == calls
            assert provider.max_in_flight > 1  # the calls really overlapped
            entries = await meter.ledger(USER)
            balance = await meter.balance(USER)
            found = charges(entries)
            assert len(found) == calls
            assert len({entry.id for entry in found}) == calls
            assert all(entry.cost == cost for entry in found)
            assert sum(entry.amount for entry in entries) == balance
            assert balance == START - calls * cost

    asyncio.run(scenario())


# --- 6. a user who cannot pay is refused before the provider is called -----------------


def test_user_who_cannot_pay_is_refused_without_calling_the_provider(
    meter: BalanceManager,
) -> None:
    provider = FakeProvider()
    meter.set_balance(USER, 0)
    with openai_client(provider) as client, anthropic_client(provider) as claude:
        ask = metered_openai(meter, client)
        ask_claude = metered_anthropic(meter, claude, estimate=estimate)
        with pytest.raises(InsufficientBalance):
            ask("Say hello", user_id=USER)
        with pytest.raises(InsufficientBalance):
            ask("Say hello", user_id=USER, stream=True)
        with pytest.raises(InsufficientBalance):
            ask_claude("Say hello", user_id=USER)
    assert provider.calls == 0
    assert charges(meter.ledger(USER)) == []
    assert meter.balance(USER) == 0


def test_async_user_who_cannot_pay_is_refused_without_calling_the_provider(
    make_async_meter: Callable[[], AsyncBalanceManager],
) -> None:
    async def scenario() -> None:
        provider = FakeProvider()
        async with (
            make_async_meter() as meter,
            async_openai_client(provider) as client,
            async_anthropic_client(provider) as claude,
        ):
            await meter.set_balance(USER, 0)
            ask = metered_async_openai(meter, client, estimate=estimate)
            ask_claude = metered_async_anthropic(meter, claude)
            with pytest.raises(InsufficientBalance):
                await ask("Say hello", user_id=USER, stream=True)
            with pytest.raises(InsufficientBalance):
                await ask_claude("Say hello", user_id=USER)
            assert provider.calls == 0
            assert charges(await meter.ledger(USER)) == []

    asyncio.run(scenario())


# --- 7. request_id= makes a repeated call idempotent ------------------------------------


def test_repeated_request_id_is_charged_once(meter: BalanceManager) -> None:
    provider = FakeProvider()
    with openai_client(provider) as client:
        ask = metered_openai(meter, client, request_id="request_id")
        ask("Say hello", user_id=USER, request_id="req-1")
        ask("Say hello", user_id=USER, request_id="req-1")
        for _ in range(2):
            chunks = list(ask("Say hello", user_id=USER, stream=True, request_id="s-1"))
            assert _openai_text(chunks) == "".join(WORDS)
    assert provider.calls == 4
    entries = meter.ledger(USER)
    found = charges(entries)
    assert [entry.request_id for entry in found] == ["req-1", "s-1"]
    cost = PRICING.cost(OPENAI_MODEL, OPENAI_USAGE).total
    assert [entry.cost for entry in found] == [cost, cost]
    assert meter.balance(USER) == START - 2 * cost
    assert sum(entry.amount for entry in entries) == meter.balance(USER)


def test_async_repeated_request_id_is_charged_once(
    make_async_meter: Callable[[], AsyncBalanceManager],
) -> None:
    async def scenario() -> None:
        provider = FakeProvider()
        async with make_async_meter() as meter, async_anthropic_client(provider) as client:
            ask = metered_async_anthropic(meter, client, request_id="request_id")
            first = await ask("Say hello", user_id=USER, request_id="req-1")
            second = await ask("Say hello", user_id=USER, request_id="req-1")
            assert first.id != second.id  # the provider answered twice
            assert provider.calls == 2
            assert_charged_once(
                await meter.ledger(USER),
                await meter.balance(USER),
                model=ANTHROPIC_MODEL,
                usage=ANTHROPIC_USAGE,
            )

    asyncio.run(scenario())
