"""The ``metered`` decorator on plain functions: sync, async, generators, misuse.

The provider-SDK end to end tests are in test_metering_e2e.py. Inputs tried
here: user/model/request_id by parameter name (positional, keyword, default,
**kwargs) and by callable; the acting_as context; estimates as int and as
TokenUsage; results with usage, without usage, with unreadable usage; each
on_missing_usage mode; raising functions; sync and async generators consumed
fully, closed early, failing midway, and dropped; mismatched managers.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
from decimal import Decimal

import pytest

from creditmeter import (
    AsyncBalanceManager,
    AsyncMemoryStore,
    BalanceConfig,
    BalanceManager,
    ConfigError,
    EntryKind,
    InsufficientBalance,
    InvalidInput,
    MemoryStore,
    Pricing,
    TokenUsage,
)

START = 10**6
PRICING = Pricing.librechat()


def response(prompt=100, completion=20):
    return {"usage": {"prompt_tokens": prompt, "completion_tokens": completion}}


def cost(model, usage, *, incomplete=False):
    return PRICING.cost(model, usage, incomplete=incomplete).total


@pytest.fixture
def meter():
    with BalanceManager(MemoryStore(), BalanceConfig(enabled=True, start_balance=START)) as m:
        yield m


def charges(manager, user="alice"):
    return [e for e in manager.ledger(user) if e.kind is EntryKind.CHARGE]


def test_charges_the_priced_usage(meter):
    @meter.metered(user="user_id", model="model")
    def ask(prompt, *, user_id, model="gpt-4o"):
        return response()

    assert ask("hi", user_id="alice") == response()
    (entry,) = charges(meter)
    assert entry.cost == cost("gpt-4o", TokenUsage(input=100, output=20))
    assert entry.model == "gpt-4o"
    assert meter.balance("alice") == START - entry.cost


def test_keeps_name_docstring_and_signature(meter):
    def ask(prompt: str, *, user_id: str) -> dict:
        """Ask a model."""
        return response()

    wrapped = meter.metered(user="user_id")(ask)
    assert wrapped.__name__ == "ask"
    assert wrapped.__doc__ == "Ask a model."
    assert inspect.signature(wrapped) == inspect.signature(ask)


@pytest.mark.parametrize(
    "how",
    ["positional", "keyword", "default", "kwargs", "callable", "keyword-only", "mixed"],
)
def test_user_and_model_are_found_however_passed(meter, how):
    if how in ("keyword-only", "mixed"):

        @meter.metered(user="user_id", model="model")
        def ask(prompt, model="gpt-4o", *, user_id="bob"):
            return response()

        if how == "keyword-only":
            ask("x", model="gpt-4o-mini", user_id="alice")
            ask("y")  # both defaults: bob, gpt-4o
            assert [e.model for e in charges(meter, "bob")] == ["gpt-4o"]
        else:  # the model by position, the user by keyword
            ask("x", "gpt-4o-mini", user_id="alice")
            assert charges(meter, "bob") == []
    elif how == "callable":

        @meter.metered(user=lambda p, **k: k["who"], model=lambda p, **k: "gpt-4o-mini")
        def ask(prompt, **kwargs):
            return response()

        ask("x", who="alice")
    elif how == "kwargs":

        @meter.metered(user="who", model="model")
        def ask(prompt, **kwargs):
            return response()

        ask("x", who="alice", model="gpt-4o-mini")
    else:

        @meter.metered(user="user_id", model="model")
        def ask(user_id="alice", model="gpt-4o-mini"):
            return response()

        if how == "positional":
            ask("alice", "gpt-4o-mini")
        elif how == "keyword":
            ask(user_id="alice", model="gpt-4o-mini")
        else:
            ask()
    (entry,) = charges(meter)
    assert entry.model == "gpt-4o-mini"


@pytest.mark.parametrize("passed", [{}, {"user_id": None}, {"user_id": 42}, {"user_id": ""}])
def test_a_named_user_missing_or_malformed_is_invalid_input_before_the_call(meter, passed):
    """Tried: the keyword left out (its default None), None, an int, an empty string."""
    ran = []

    @meter.metered(user="user_id", model="model")
    def ask(prompt, model="gpt-4o", *, user_id=None):
        ran.append(prompt)
        return response()

    users = meter.users()
    with pytest.raises(InvalidInput):
        ask("x", **passed)
    assert ran == []
    assert meter.users() == users


def test_user_from_acting_as(meter):
    @meter.metered(model=lambda: "gpt-4o")
    def ask():
        return response()

    with meter.acting_as("bob"):
        ask()
    assert len(charges(meter, "bob")) == 1
    with pytest.raises(InvalidInput, match="no user"):
        ask()


def test_refuses_before_the_call_when_broke(meter):
    meter.set_balance("alice", 0)
    calls = []

    @meter.metered(user="user_id")
    def ask(user_id):
        calls.append(1)
        return response()

    with pytest.raises(InsufficientBalance):
        ask("alice")
    assert calls == []


def test_estimate_prices_the_prompt_like_librechat(meter):
    meter.set_balance("alice", 1000)
    calls = []

    @meter.metered(user="user_id", model="model", estimate=lambda user_id, model, n: n)
    def ask(user_id, model, n):
        calls.append(n)
        return response(prompt=n, completion=0)

    ask("alice", "gpt-4o", 400)  # 400 x 2.5 = 1000: equal is enough
    with pytest.raises(InsufficientBalance) as refused:
        ask("alice", "gpt-4o", 1)  # nothing left
    assert refused.value.to_dict()["promptTokens"] == 1
    assert calls == [400]


def test_a_raising_call_charges_nothing(meter):
    @meter.metered(user="user_id")
    def ask(user_id):
        raise TimeoutError("provider down")

    with pytest.raises(TimeoutError, match="provider down"):
        ask("alice")
    assert charges(meter) == []


def test_missing_usage_warns_and_charges_the_estimate(meter, caplog):
    @meter.metered(user="user_id", model="model", estimate=lambda **k: 50)
    def ask(*, user_id, model):
        return {"no": "usage"}

    with caplog.at_level(logging.WARNING, logger="creditmeter"):
        ask(user_id="alice", model="gpt-4o")
    assert "alice" in caplog.text
    assert "gpt-4o" in caplog.text
    (entry,) = charges(meter)
    assert entry.usage == TokenUsage(input=50)


def test_missing_usage_error_and_ignore(meter):
    @meter.metered(user="user_id", on_missing_usage="error")
    def strict(user_id):
        return "text"

    @meter.metered(user="user_id", on_missing_usage="ignore")
    def lax(user_id):
        return {"usage": {"prompt_tokens": -1, "completion_tokens": 1}}

    with pytest.raises(InvalidInput, match="no usage"):
        strict("alice")
    assert lax("alice")["usage"]["prompt_tokens"] == -1
    assert charges(meter) == []


def test_custom_usage_reader_and_request_id(meter):
    @meter.metered(
        user="user_id",
        model=lambda **k: "gpt-4o",
        usage=lambda result: TokenUsage(input=result["in"], output=result["out"]),
        request_id="rid",
    )
    def ask(*, user_id, rid):
        return {"in": 10, "out": 10}

    first = ask(user_id="alice", rid="req-1")
    ask(user_id="alice", rid="req-1")
    assert first == {"in": 10, "out": 10}
    assert len(charges(meter)) == 1


def chunk(text=None, usage=None):
    return {"choices": [{"delta": {"content": text}}] if text else [], "usage": usage}


def test_a_generator_is_charged_once_when_exhausted(meter):
    @meter.metered(user="user_id", model="model")
    def stream(user_id, model):
        yield chunk("a")
        yield chunk("b")
        yield chunk(usage={"prompt_tokens": 30, "completion_tokens": 2})

    out = list(stream("alice", "gpt-4o"))
    assert len(out) == 3
    (entry,) = charges(meter)
    assert entry.cost == cost("gpt-4o", TokenUsage(input=30, output=2))


def test_a_stream_closed_early_is_charged_incomplete(meter):
    @meter.metered(user="user_id", model="model", estimate=lambda user_id, model: 100)
    def stream(user_id, model):
        for _ in range(10):
            yield chunk("x")

    with stream("alice", "gpt-4o") as chunks:
        for number, _ in enumerate(chunks):
            if number == 2:
                break
    (entry,) = charges(meter)
    usage = TokenUsage(input=100, output=3)
    assert entry.usage == usage
    assert entry.cost == cost("gpt-4o", usage, incomplete=True)


def test_a_stream_failing_midway_is_charged_for_what_it_produced(meter):
    @meter.metered(user="user_id", model="model")
    def stream(user_id, model):
        yield chunk("x")
        raise ConnectionError("dropped")

    chunks = stream("alice", "gpt-4o")
    with pytest.raises(ConnectionError):
        list(chunks)
    (entry,) = charges(meter)
    assert entry.usage == TokenUsage(output=1)
    chunks.close()  # closing after the failure charges nothing more
    assert len(charges(meter)) == 1


def test_a_stream_that_fails_before_any_chunk_charges_nothing(meter):
    @meter.metered(user="user_id")
    def stream(user_id):
        raise ConnectionError("refused")
        yield  # pragma: no cover

    with pytest.raises(ConnectionError):
        next(stream("alice"))
    assert charges(meter) == []


def test_a_dropped_stream_is_still_charged_once(meter):
    @meter.metered(user="user_id", model="model", estimate=lambda *a: 10)
    def stream(user_id, model):
        yield chunk("x")
        yield chunk("y")

    chunks = stream("alice", "gpt-4o")
    next(chunks)
    del chunks
    gc.collect()
    (entry,) = charges(meter)
    assert entry.usage == TokenUsage(input=10, output=1)


def test_wrong_manager_kind_is_a_type_error_when_decorating(meter):
    async def coroutine(user_id):
        return response()

    async def agen(user_id):
        yield 1

    for func in (coroutine, agen):
        with pytest.raises(TypeError, match="AsyncBalanceManager"):
            meter.metered(user="user_id")(func)
    async_meter = AsyncBalanceManager(AsyncMemoryStore())
    with pytest.raises(TypeError, match="BalanceManager"):
        async_meter.metered(user="user_id")(lambda user_id: None)


@pytest.mark.parametrize(
    "options",
    [
        {"user": "nope"},
        {"user": 5},
        {"on_missing_usage": "loud"},
        {"estimate": 5},
        {"usage": "usage"},
    ],
    ids=[
        "unknown-parameter",
        "not-a-name",
        "bad-mode",
        "estimate-not-callable",
        "usage-not-callable",
    ],
)
def test_bad_decorator_options_fail_when_decorating(meter, options):
    with pytest.raises(ConfigError):
        meter.metered(**options)(lambda user_id: None)


# --- async ----------------------------------------------------------------------


async def async_meter():
    return AsyncBalanceManager(AsyncMemoryStore(), BalanceConfig(enabled=True, start_balance=START))


async def async_charges(manager, user="alice"):
    return [e for e in await manager.ledger(user) if e.kind is EntryKind.CHARGE]


def test_async_function_charged_and_refused():
    async def main():
        async with await async_meter() as meter:

            @meter.metered(user="user_id", model="model")
            async def ask(user_id, model="gpt-4o"):
                await asyncio.sleep(0)
                return response()

            assert inspect.iscoroutinefunction(ask)
            await ask("alice")
            (entry,) = await async_charges(meter)
            assert entry.cost == cost("gpt-4o", TokenUsage(input=100, output=20))
            await meter.set_balance("alice", 0)
            with pytest.raises(InsufficientBalance):
                await ask("alice")

    asyncio.run(main())


def test_async_generator_charged_once_and_incomplete_when_closed():
    async def main():
        async with await async_meter() as meter:

            @meter.metered(user="user_id", model="model", estimate=lambda *a: 7)
            async def stream(user_id, model):
                for _ in range(5):
                    yield chunk("x")

            assert inspect.isasyncgenfunction(stream)
            full = [c async for c in stream("alice", "gpt-4o")]
            assert len(full) == 5
            partial = stream("bob", "gpt-4o")
            await partial.__anext__()
            await partial.__anext__()
            await partial.aclose()
            (complete,) = await async_charges(meter, "alice")
            (cut,) = await async_charges(meter, "bob")
            # No usage reported: the estimate plus one output token per chunk.
            assert complete.usage == TokenUsage(input=7, output=5)
            assert cut.usage == TokenUsage(input=7, output=2)
            assert cut.cost == cost("gpt-4o", TokenUsage(input=7, output=2), incomplete=True)

    asyncio.run(main())


def test_coroutine_returning_an_async_stream():
    async def main():
        async with await async_meter() as meter:

            async def provider():
                yield chunk("a")
                yield chunk(usage={"prompt_tokens": 5, "completion_tokens": 1})

            @meter.metered(user="user_id", model=lambda *a: "gpt-4o")
            async def ask(user_id):
                return provider()

            stream = await ask("alice")
            got = [c async for c in stream]
            assert len(got) == 2
            (entry,) = await async_charges(meter)
            assert entry.usage == TokenUsage(input=5, output=1)

    asyncio.run(main())


def test_acting_as_reaches_tasks():
    async def main():
        async with await async_meter() as meter:

            @meter.metered()
            async def ask():
                return response(prompt=1, completion=1)

            with meter.acting_as("carol"):
                await asyncio.gather(*(asyncio.create_task(ask()) for _ in range(5)))
            assert len(await async_charges(meter, "carol")) == 5

    asyncio.run(main())


def test_fifty_concurrent_async_calls_each_charged_once():
    async def main():
        async with await async_meter() as meter:

            @meter.metered(user="user_id", model="model")
            async def ask(user_id, model):
                await asyncio.sleep(0)
                return response(prompt=10, completion=10)

            await asyncio.gather(*(ask("alice", "gpt-4o") for _ in range(50)))
            entries = await meter.ledger("alice")
            assert len([e for e in entries if e.kind is EntryKind.CHARGE]) == 50
            balance = await meter.balance("alice")
            assert sum(e.amount for e in entries) == balance
            each = cost("gpt-4o", TokenUsage(input=10, output=10))
            assert balance == START - 50 * each
            assert isinstance(balance, Decimal)

    asyncio.run(main())


def test_a_stream_closed_after_its_usage_report_is_charged_as_complete(meter):
    @meter.metered(user="user_id", model="model")
    def stream(user_id, model):
        yield chunk("a")
        yield chunk(usage={"prompt_tokens": 8, "completion_tokens": 1})
        yield "[DONE]"

    chunks = stream("alice", "gpt-4o")
    next(chunks)
    next(chunks)  # the usage report: the generation is over
    chunks.close()
    (entry,) = charges(meter)
    assert entry.cost == cost("gpt-4o", TokenUsage(input=8, output=1))  # no cancel rate


def test_an_anthropic_stream_cut_short_counts_the_chunks_it_sent(meter):
    start = {
        "type": "message_start",
        "message": {"usage": {"input_tokens": 10, "output_tokens": 1}},
    }
    delta = {"type": "content_block_delta", "delta": {"text": "x"}}

    @meter.metered(user="user_id", model="model")
    def stream(user_id, model):
        yield start
        for _ in range(6):
            yield delta

    chunks = stream("alice", "claude-3-5-sonnet")
    for _ in range(5):  # message_start and four deltas
        next(chunks)
    chunks.close()
    (entry,) = charges(meter)
    # message_start's output count is a placeholder: four deltas were sent.
    assert entry.usage == TokenUsage(input=10, output=4)
    assert entry.cost == cost("claude-3-5-sonnet", TokenUsage(input=10, output=4), incomplete=True)
