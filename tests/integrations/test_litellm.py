"""CreditMeterLogger with the real litellm package and no network.

LiteLLM's ``mock_response`` completions (plain, streamed, sync and async) go
through LiteLLM's whole call and logging path and return real
``ModelResponse`` objects with usage, without contacting a provider.

LiteLLM reports success events from the background (a logging thread for
sync calls, a worker task on the loop for async ones): the tests wait for
the logger to have handled them (a condition with a timeout, a wait-until,
never a timing assertion), then check the ledger.
"""

from __future__ import annotations

import os

# LiteLLM downloads its model cost map on import unless told to use the copy it ships.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

import asyncio
import contextlib
import functools
import io
import logging
import re
import subprocess
import sys
import threading
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import fastapi
import litellm
import pytest
from broken import BrokenSQLite
from litellm.caching.dual_cache import DualCache
from litellm.litellm_core_utils.logging_worker import GLOBAL_LOGGING_WORKER
from litellm.proxy._types import UserAPIKeyAuth
from litellm.types.utils import Choices, Message, ModelResponse, Usage

from creditmeter import (
    AsyncBalanceManager,
    AsyncMemoryStore,
    BalanceConfig,
    BalanceManager,
    ConfigError,
    EntryKind,
    InsufficientBalance,
    MemoryStore,
    Pricing,
    SQLiteStore,
    StoreError,
    TokenUsage,
    Unmetered,
)
from creditmeter.integrations.litellm import (
    CREDITS_PER_USD,
    REQUEST_PREFIX,
    CreditMeterLogger,
    LiteLLMCall,
    usd_to_credits,
)

# LiteLLM imports some modules on first use; one of them (its GitHub Copilot authenticator)
# builds a pydantic schema of a TypedDict with ReadOnly items, and pydantic warns about it.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Items? .* using the `ReadOnly` qualifier"
    ":UserWarning:pydantic._internal._generate_schema"
)

DOCS = Path(__file__).parents[2] / "docs" / "guides" / "litellm.md"
MODEL = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Say hello in five words"}]
START = Decimal(20000)  # LibreChat's start balance
TIMEOUT = 30.0  # seconds to wait for LiteLLM's background logging; reached only on a failure


class Recording(CreditMeterLogger):
    """The logger under test, noting each event LiteLLM delivered once it has been handled.

    LiteLLM reads its callback lists when it delivers an event, not when the
    call starts, so a call of an earlier test whose event is still queued can
    reach a logger registered after it. Such events (of calls started before
    this logger was made) are dropped, so each test counts only its own calls.
    """

    def __init__(self, meter, **options):
        super().__init__(meter, **options)
        self.handled = threading.Condition()
        self.events: list[tuple[str, dict, object]] = []
        self.since = datetime.now()  # noqa: DTZ005 - LiteLLM stamps calls with naive local time

    def _earlier(self, start_time) -> bool:
        return isinstance(start_time, datetime) and start_time < self.since

    def _note(self, name, kwargs, response):
        with self.handled:
            self.events.append((name, kwargs, response))
            self.handled.notify_all()

    def log_success_event(self, kwargs, response_obj, start_time, end_time):
        if self._earlier(start_time):
            return
        super().log_success_event(kwargs, response_obj, start_time, end_time)
        self._note("success", kwargs, response_obj)

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        if self._earlier(start_time):
            return
        await super().async_log_success_event(kwargs, response_obj, start_time, end_time)
        self._note("success", kwargs, response_obj)

    def log_failure_event(self, kwargs, response_obj, start_time, end_time):
        if self._earlier(start_time):
            return
        self._note("failure", kwargs, response_obj)

    async def async_log_failure_event(self, kwargs, response_obj, start_time, end_time):
        if self._earlier(start_time):
            return
        self._note("failure", kwargs, response_obj)

    def wait_for(self, count: int) -> list[tuple[str, dict, object]]:
        """Wait until ``count`` events have been handled; return them."""
        with self.handled:
            arrived = self.handled.wait_for(lambda: len(self.events) >= count, timeout=TIMEOUT)
            assert arrived, f"LiteLLM delivered {len(self.events)} of {count} events"
            return list(self.events)

    async def await_for(self, count: int) -> list[tuple[str, dict, object]]:
        """``wait_for`` from a coroutine, leaving the loop free to run LiteLLM's logging."""
        await GLOBAL_LOGGING_WORKER.flush()
        return await asyncio.to_thread(self.wait_for, count)


@pytest.fixture
def register():
    """``register(logger)`` puts it in ``litellm.callbacks``; the callbacks are restored after.

    LiteLLM copies ``litellm.callbacks`` into its other callback lists on the
    next call, so the logger is taken out of all of them, not only that one.
    """
    previous = litellm.callbacks
    added = []

    def add(logger):
        added.append(logger)
        litellm.callbacks = [*previous, logger]
        return logger

    yield add
    for logger in added:
        litellm.logging_callback_manager.remove_callback_from_all_lists(logger, require_self=False)
    litellm.callbacks = previous


@pytest.fixture
def meter():
    return BalanceManager(MemoryStore(), BalanceConfig(enabled=True))


def arun(coroutine):
    """Run a coroutine, then let LiteLLM's logging worker finish on the same loop."""

    async def main():
        try:
            return await coroutine
        finally:
            await GLOBAL_LOGGING_WORKER.flush()

    return asyncio.run(main())


def charges(entries):
    return [entry for entry in entries if entry.kind is EntryKind.CHARGE]


def priced(usage: TokenUsage) -> Decimal:
    return Pricing.librechat().cost(MODEL, usage).total


def reported_usage(response) -> TokenUsage:
    """The usage LiteLLM reported on a response, read field by field."""
    return TokenUsage(input=response.usage.prompt_tokens, output=response.usage.completion_tokens)


# --- reading LiteLLM's responses ------------------------------------------------------


def test_usage_is_read_from_litellm_model_responses():
    reply = litellm.completion(model=MODEL, messages=MESSAGES, mock_response="hello world")
    assert isinstance(reply, litellm.ModelResponse)
    assert TokenUsage.from_response(reply) == reported_usage(reply)
    assert reported_usage(reply).total > 0
    # LiteLLM maps Anthropic's cache counts into OpenAI's prompt_tokens_details.
    usage = litellm.Usage(
        prompt_tokens=100,
        completion_tokens=10,
        cache_creation_input_tokens=20,
        cache_read_input_tokens=30,
    )
    assert TokenUsage.from_response(litellm.ModelResponse(usage=usage)) == TokenUsage(
        input=50, output=10, cache_write=20, cache_read=30
    )


# --- charging after a call ---------------------------------------------------------------


def test_a_completion_is_charged_its_priced_usage(meter, register):
    logger = register(Recording(meter))
    reply = litellm.completion(
        model=MODEL, messages=MESSAGES, mock_response="hello world", user="alice"
    )
    logger.wait_for(1)
    [entry] = charges(meter.ledger("alice"))
    usage = reported_usage(reply)
    assert entry.usage == usage
    assert entry.model == MODEL
    assert entry.cost == priced(usage)
    assert entry.request_id == REQUEST_PREFIX + reply._hidden_params["litellm_call_id"]
    assert entry.metadata["response_id"] == reply.id
    assert meter.balance("alice") == START - priced(usage)


def test_a_streamed_completion_is_charged_once_with_the_final_usage(meter, register):
    logger = register(Recording(meter))
    stream = litellm.completion(
        model=MODEL,
        messages=MESSAGES,
        mock_response="hello world, how are you today",
        user="alice",
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    final = [chunk.usage for chunk in chunks if getattr(chunk, "usage", None) is not None]
    assert final, "the stream reports its usage in its last chunk"
    events = logger.wait_for(1)
    assert [name for name, _, _ in events] == ["success"]  # once, when the stream ended
    [entry] = charges(meter.ledger("alice"))
    usage = TokenUsage(input=final[-1].prompt_tokens, output=final[-1].completion_tokens)
    assert entry.usage == usage
    assert entry.cost == priced(usage)


def test_an_async_streamed_completion_is_charged_once(register):
    ameter = AsyncBalanceManager(AsyncMemoryStore(), BalanceConfig(enabled=True))
    logger = register(Recording(ameter))

    async def main():
        stream = await litellm.acompletion(
            model=MODEL,
            messages=MESSAGES,
            mock_response="hello world, how are you today",
            user="alice",
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        events = await logger.await_for(1)
        return chunks, events, await ameter.ledger("alice")

    chunks, events, ledger = arun(main())
    final = next(c.usage for c in reversed(chunks) if getattr(c, "usage", None) is not None)
    assert [name for name, _, _ in events] == ["success"]
    [entry] = charges(ledger)
    assert entry.usage == TokenUsage(input=final.prompt_tokens, output=final.completion_tokens)


def test_an_event_delivered_twice_charges_once(meter, register):
    logger = register(Recording(meter))
    litellm.completion(model=MODEL, messages=MESSAGES, mock_response="hello world", user="alice")
    [(_, kwargs, response)] = logger.wait_for(1)
    logger.log_success_event(kwargs, response, None, None)  # LiteLLM delivers it again
    arun(logger.async_log_success_event(kwargs, response, None, None))  # and once more, async
    assert len(charges(meter.ledger("alice"))) == 1


def test_cost_source_litellm_charges_its_response_cost_in_credits(register):
    # Rates of our own, so creditmeter's price and LiteLLM's cost cannot coincide.
    pricing = Pricing.librechat().with_rates({MODEL: {"prompt": 100, "completion": 100}})
    meter = BalanceManager(MemoryStore(), BalanceConfig(enabled=True), pricing=pricing)
    logger = register(Recording(meter, cost_source="litellm"))
    reply = litellm.completion(
        model=MODEL, messages=MESSAGES, mock_response="hello world", user="alice"
    )
    [(_, kwargs, _)] = logger.wait_for(1)
    usd = kwargs["response_cost"]
    assert usd == reply._hidden_params["response_cost"]
    assert usd > 0
    [entry] = charges(meter.ledger("alice"))
    assert entry.cost == Decimal(str(usd)) * 1_000_000 == Decimal(str(usd)) * CREDITS_PER_USD
    assert entry.cost != pricing.cost(MODEL, reported_usage(reply)).total
    assert entry.usage == reported_usage(reply)  # recorded alongside, for audits
    assert entry.metadata["response_cost_usd"] == usd


@pytest.mark.parametrize(
    ("user_from", "call"),
    [
        ("metadata.user_id", {"metadata": {"user_id": "bob"}, "user": "alice"}),
        (
            lambda call: call.metadata.get("tenant", "") + ":" + call.user,
            {
                "metadata": {"tenant": "acme"},
                "user": "bob",
            },
        ),
    ],
    ids=["metadata", "callable"],
)
def test_the_user_comes_from_where_user_from_says(meter, register, user_from, call):
    logger = register(Recording(meter, user_from=user_from))
    litellm.completion(model=MODEL, messages=MESSAGES, mock_response="hello world", **call)
    logger.wait_for(1)
    [paying] = [user for user in meter.users() if charges(meter.ledger(user))]
    assert paying == ("bob" if user_from == "metadata.user_id" else "acme:bob")


def test_a_call_without_a_user_is_not_charged(meter, register, caplog):
    logger = register(Recording(meter))
    with caplog.at_level(logging.WARNING, logger="creditmeter.litellm"):
        litellm.completion(model=MODEL, messages=MESSAGES, mock_response="hello world")
        logger.wait_for(1)
    assert meter.users() == []
    assert "names no user" in caplog.text


def test_a_failed_call_charges_nothing(meter, register):
    logger = register(Recording(meter))
    meter.account("alice")  # opened: its opening balance is all its ledger holds
    with pytest.raises(litellm.exceptions.InternalServerError, match="boom"):
        litellm.completion(
            model=MODEL, messages=MESSAGES, mock_response=Exception("boom"), user="alice"
        )
    events = logger.wait_for(1)
    assert [name for name, _, _ in events] == ["failure"]
    assert charges(meter.ledger("alice")) == []
    assert meter.balance("alice") == START


def test_a_failed_async_call_charges_nothing(register):
    ameter = AsyncBalanceManager(AsyncMemoryStore(), BalanceConfig(enabled=True))
    logger = register(Recording(ameter))

    async def main():
        with pytest.raises(litellm.exceptions.InternalServerError, match="boom"):
            await litellm.acompletion(
                model=MODEL, messages=MESSAGES, mock_response=Exception("boom"), user="alice"
            )
        return await logger.await_for(1), await ameter.ledger("alice")

    events, ledger = arun(main())
    assert [name for name, _, _ in events] == ["failure"]
    assert charges(ledger) == []


@pytest.mark.parametrize("kind", ["async manager", "sync manager"])
def test_twenty_concurrent_async_calls_are_each_charged_once(register, kind):
    if kind == "async manager":
        meter = AsyncBalanceManager(AsyncMemoryStore(), BalanceConfig(enabled=True))
    else:  # charged from LiteLLM's loop through a worker thread
        meter = BalanceManager(MemoryStore(), BalanceConfig(enabled=True))
    logger = register(Recording(meter))

    async def read(method, *args):
        found = getattr(meter, method)(*args)
        return await found if asyncio.iscoroutine(found) else found

    async def main():
        replies = await asyncio.gather(
            *(
                litellm.acompletion(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"question {n}"}],
                    mock_response=f"answer {n} " * (n + 1),
                    user="carol",
                )
                for n in range(20)
            )
        )
        await logger.await_for(20)
        return replies, await read("ledger", "carol"), await read("balance", "carol")

    replies, ledger, balance = arun(main())
    assert len(logger.events) == 20
    charged = charges(ledger)
    assert len(charged) == 20
    calls = {REQUEST_PREFIX + reply._hidden_params["litellm_call_id"] for reply in replies}
    assert {entry.request_id for entry in charged} == calls
    assert sum(entry.amount for entry in ledger) == balance
    assert balance == START - sum(priced(reported_usage(reply)) for reply in replies)


def test_an_async_manager_does_not_charge_sync_calls_and_says_so(register, caplog):
    ameter = AsyncBalanceManager(AsyncMemoryStore(), BalanceConfig(enabled=True))
    logger = register(Recording(ameter))
    with caplog.at_level(logging.ERROR, logger="creditmeter.litellm"):
        litellm.completion(
            model=MODEL, messages=MESSAGES, mock_response="hello world", user="alice"
        )
        logger.wait_for(1)
    assert "was not charged" in caplog.text
    assert asyncio.run(ameter.users()) == []


# --- refusing before a call -----------------------------------------------------------


def spy(func, seen):
    """``func``, noting each call in ``seen`` (its signature stays visible to ``guard``)."""

    @functools.wraps(func)
    def calling(*args, **kwargs):
        seen.append(kwargs.get("user"))
        return func(*args, **kwargs)

    @functools.wraps(func)
    async def acalling(*args, **kwargs):
        seen.append(kwargs.get("user"))
        return await func(*args, **kwargs)

    return acalling if asyncio.iscoroutinefunction(func) else calling


def test_guard_refuses_a_user_who_cannot_pay_before_litellm_runs(meter, register):
    logger = register(Recording(meter))
    meter.set_balance("broke", 0)
    seen: list = []
    completion = logger.guard(spy(litellm.completion, seen))
    with pytest.raises(InsufficientBalance) as refused:
        completion(model=MODEL, messages=MESSAGES, mock_response="hello world", user="broke")
    assert refused.value.user_id == "broke"
    assert refused.value.to_dict() == {"type": "token_balance", "balance": 0, "tokenCost": 0}
    assert seen == []  # LiteLLM was never called
    # A user who can pay goes through, and is charged once, by the logger.
    reply = completion(MODEL, MESSAGES, mock_response="hello world", user="alice")
    logger.wait_for(1)
    assert seen == ["alice"]
    assert [e.cost for e in charges(meter.ledger("alice"))] == [priced(reported_usage(reply))]
    assert charges(meter.ledger("broke")) == []


def test_guard_refuses_async_calls(register):
    ameter = AsyncBalanceManager(AsyncMemoryStore(), BalanceConfig(enabled=True))
    logger = register(Recording(ameter))
    seen: list = []
    acompletion = logger.guard(spy(litellm.acompletion, seen))

    async def main():
        await ameter.set_balance("broke", 0)
        with pytest.raises(InsufficientBalance):
            await acompletion(model=MODEL, messages=MESSAGES, mock_response="hi", user="broke")
        await acompletion(model=MODEL, messages=MESSAGES, mock_response="hi", user="alice")
        await logger.await_for(1)
        return await ameter.ledger("alice"), await ameter.ledger("broke")

    alice, broke = arun(main())
    assert seen == ["alice"]
    assert len(charges(alice)) == 1
    assert charges(broke) == []


def test_guard_with_estimate_prompt_prices_the_prompt(meter):
    logger = CreditMeterLogger(meter, estimate_prompt=True)
    meter.set_balance("dave", Decimal("0.5"))  # less than the prompt costs at 0.15 per token
    seen: list = []
    completion = logger.guard(spy(litellm.completion, seen))
    with pytest.raises(InsufficientBalance) as refused:
        completion(model=MODEL, messages=MESSAGES, mock_response="hi", user="dave")
    tokens = litellm.token_counter(model=MODEL, messages=MESSAGES)
    assert refused.value.prompt_tokens == tokens
    assert refused.value.cost == Pricing.librechat().prompt_cost(MODEL, tokens)
    assert seen == []
    # Without the estimate, any balance above zero is enough to try.
    CreditMeterLogger(meter).guard(spy(litellm.completion, seen))(
        model=MODEL, messages=MESSAGES, mock_response="hi", user="dave"
    )
    assert seen == ["dave"]


def test_guarding_a_sync_function_needs_a_sync_manager():
    ameter = AsyncBalanceManager(AsyncMemoryStore(), BalanceConfig(enabled=True))
    with pytest.raises(TypeError, match="not async"):
        CreditMeterLogger(ameter).guard(litellm.completion)


def proxy_request(user: str | None, key_owner: str) -> dict:
    """The ``data`` the proxy hands its pre-call hooks for a chat completion."""
    request: dict = {
        "model": MODEL,
        "messages": MESSAGES,
        "stream": False,
        "metadata": {
            "user_api_key_hash": "88dc28d0f030c55ed4ab77ed8faf098196cb1c05df778539800c9f1243fe6b4b",
            "user_api_key_alias": None,
            "user_api_key_user_id": key_owner,
            "user_api_key_team_id": None,
            "user_api_key_end_user_id": user,
            "headers": {"content-type": "application/json"},
            "endpoint": "http://0.0.0.0:4000/v1/chat/completions",
        },
        "proxy_server_request": {
            "url": "http://0.0.0.0:4000/v1/chat/completions",
            "method": "POST",
            "body": {"model": MODEL, "messages": MESSAGES},
        },
    }
    if user is not None:
        request["user"] = user
    return request


@pytest.mark.parametrize("kind", ["async manager", "sync manager"])
def test_the_proxy_pre_call_hook_refuses_with_402(kind):
    if kind == "async manager":
        meter = AsyncBalanceManager(AsyncMemoryStore(), BalanceConfig(enabled=True))
    else:
        meter = BalanceManager(MemoryStore(), BalanceConfig(enabled=True))
    logger = CreditMeterLogger(meter)
    key = UserAPIKeyAuth(api_key="sk-hashed", user_id="key-owner")

    async def main():
        broke = meter.set_balance("broke", 0)
        if asyncio.iscoroutine(broke):
            await broke
        with pytest.raises(fastapi.HTTPException) as refused:
            await logger.async_pre_call_hook(
                key, DualCache(), proxy_request("broke", "key-owner"), "acompletion"
            )
        passed = await logger.async_pre_call_hook(
            key, DualCache(), proxy_request("alice", "key-owner"), "acompletion"
        )
        return refused.value, passed

    refused, passed = asyncio.run(main())
    assert refused.status_code == 402
    assert refused.detail["type"] == "token_balance"
    assert refused.detail["balance"] == 0
    assert "broke" in refused.detail["error"]
    assert isinstance(refused.__cause__, InsufficientBalance)
    assert passed is None  # the request goes on unchanged


def test_the_proxy_pre_call_hook_can_bill_the_key_owner():
    meter = BalanceManager(MemoryStore(), BalanceConfig(enabled=True))
    meter.set_balance("key-owner", 0)
    logger = CreditMeterLogger(meter, user_from="metadata.user_api_key_user_id")
    key = UserAPIKeyAuth(api_key="sk-hashed", user_id="key-owner")
    with pytest.raises(fastapi.HTTPException) as refused:
        asyncio.run(
            logger.async_pre_call_hook(
                key, DualCache(), proxy_request("alice", "key-owner"), "acompletion"
            )
        )
    assert refused.value.status_code == 402
    # A request that names no user is let through, with a warning.
    asyncio.run(
        CreditMeterLogger(meter).async_pre_call_hook(
            key, DualCache(), proxy_request(None, "key-owner"), "acompletion"
        )
    )


def test_the_call_view_reads_arguments_requests_and_events():
    arguments = {"model": MODEL, "user": "u", "litellm_metadata": {"k": "v"}, "messages": []}
    assert LiteLLMCall.from_arguments(arguments).metadata == {"k": "v"}
    assert LiteLLMCall.from_request(arguments).hook == "pre_call"
    event = LiteLLMCall.from_event(
        {"model": MODEL, "user": "u", "litellm_params": {"metadata": {"user_id": "x"}}}
    )
    assert (event.hook, event.user, event.metadata["user_id"]) == ("success", "u", "x")


# --- configuration ----------------------------------------------------------------------


def test_bad_configuration_is_refused(meter):
    with pytest.raises(TypeError, match="BalanceManager"):
        CreditMeterLogger(object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="user_from"):
        CreditMeterLogger(meter, user_from="header.x-user")
    with pytest.raises(ConfigError, match="user_from"):
        CreditMeterLogger(meter, user_from="metadata.")
    with pytest.raises(ConfigError, match="cost_source"):
        CreditMeterLogger(meter, cost_source="openai")  # type: ignore[arg-type]


# --- metering litellm.completion with the decorator alone -----------------------------


def test_metered_wraps_litellm_completion_directly(meter):
    # Without the logger: meter.metered() checks and charges around the call itself.
    completion = meter.metered(user="user", model="model")(litellm.completion)
    reply = completion(model=MODEL, messages=MESSAGES, mock_response="hello world", user="erin")
    stream = completion(
        model=MODEL,
        messages=MESSAGES,
        mock_response="hello world",
        user="erin",
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    final = next(c.usage for c in reversed(chunks) if getattr(c, "usage", None) is not None)
    assert [entry.usage for entry in charges(meter.ledger("erin"))] == [
        reported_usage(reply),
        TokenUsage(input=final.prompt_tokens, output=final.completion_tokens),
    ]
    meter.set_balance("erin", 0)
    with pytest.raises(InsufficientBalance):
        completion(model=MODEL, messages=MESSAGES, mock_response="hello world", user="erin")


# --- the documentation ------------------------------------------------------------------


def test_the_docs_example_runs(register):
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)
    runnable = [block for block in blocks if "proxy_handler_instance" not in block]
    assert runnable
    namespace: dict = {}
    output = io.StringIO()
    previous = litellm.callbacks
    try:
        with contextlib.redirect_stdout(output):
            for block in runnable:
                exec(compile(block, str(DOCS), "exec"), namespace)
    finally:
        meter_logger = namespace.get("meter_logger")
        if meter_logger is not None:
            register(meter_logger)  # taken out of LiteLLM's callback lists after the test
        litellm.callbacks = previous
    meter = namespace["meter"]
    [entry] = charges(wait_until_charged(meter, "alice"))  # LiteLLM's logging thread charges
    assert entry.cost == priced(reported_usage(namespace["reply"]))
    assert "{'type': 'token_balance', 'balance': 0, 'tokenCost': 0}" in output.getvalue()


def wait_until_charged(meter, user):
    """The user's ledger once it holds a charge (a wait-until, with a timeout)."""
    pause = threading.Event()  # never set: its wait() is a sleep
    for _ in range(int(TIMEOUT / 0.01)):
        ledger = meter.ledger(user)
        if charges(ledger):
            return ledger
        pause.wait(0.01)
    pytest.fail(f"{user} was never charged")


def test_the_docs_proxy_module_builds_its_logger(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)
    [module] = [block for block in blocks if "proxy_handler_instance" in block]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(module, str(DOCS), "exec"), namespace)
    handler = namespace["proxy_handler_instance"]
    assert isinstance(handler, CreditMeterLogger)
    assert "async_pre_call_hook" in vars(type(handler))  # the proxy calls it only then
    asyncio.run(namespace["meter"].aclose())


# --- cost_source="litellm": calls LiteLLM cannot price, and its float noise ---------------


def test_a_call_litellm_cannot_price_is_charged_at_creditmeters_rates(meter, register, caplog):
    # An OpenAI-compatible model missing from LiteLLM's price map. LiteLLM leaves
    # response_cost unset and reports 0.0 in its logging payload, with the failure beside
    # it. Before the fix: charged 0 credits (entry.cost == 0).
    logger = register(Recording(meter, cost_source="litellm"))
    with caplog.at_level(logging.WARNING, logger="creditmeter.litellm"):
        reply = litellm.completion(
            model="openai/my-private-model",
            messages=MESSAGES,
            mock_response="hello world",
            user="alice",
        )
        [(_, kwargs, _)] = logger.wait_for(1)
    assert kwargs["standard_logging_object"]["response_cost"] == 0.0  # LiteLLM's "no price"
    assert kwargs["standard_logging_object"]["response_cost_failure_debug_info"] is not None
    [entry] = charges(meter.ledger("alice"))
    usage = reported_usage(reply)
    assert entry.cost == Pricing.librechat().cost("my-private-model", usage).total > 0
    assert "response_cost_usd" not in entry.metadata
    assert "could not price model 'my-private-model'" in caplog.text


def test_litellms_float_cost_is_converted_without_its_noise(meter, register):
    # 22 prompt and 125 completion tokens of gpt-4o-mini: LiteLLM sums the two float
    # prices to 7.829999999999999e-05 USD. Before the fix: 78.29999999999999 credits.
    logger = register(Recording(meter, cost_source="litellm"))
    reply = ModelResponse(
        model=MODEL,
        choices=[Choices(index=0, finish_reason="stop", message=Message(content="hi"))],
        usage=Usage(prompt_tokens=22, completion_tokens=125, total_tokens=147),
    )
    litellm.completion(model=MODEL, messages=MESSAGES, mock_response=reply, user="alice")
    [(_, kwargs, _)] = logger.wait_for(1)
    assert kwargs["response_cost"] == 7.829999999999999e-05  # the noise is really there
    [entry] = charges(meter.ledger("alice"))
    assert entry.cost == Decimal("78.3")
    assert str(entry.cost) == "78.3"


@pytest.mark.parametrize(
    ("usd", "expected"),
    [
        (0.00022499999999999997, "225"),
        (0.00019994999999999998, "199.95"),
        (1.35e-05, "13.5"),
        (0.1 + 0.2, "300000"),
        (12.5, "12500000"),
        (0.0, "0"),
        (1e-30, "1E-24"),
        (5e-324, "0"),
    ],
)
def test_usd_to_credits_keeps_the_digits_a_float_holds(usd, expected):
    assert str(usd_to_credits(usd)) == expected


# --- the store down ------------------------------------------------------------------------


@pytest.fixture
def sqlite_meter(tmp_path):
    broken = BrokenSQLite(tmp_path / "credits.db")
    events: list = []
    store = SQLiteStore(broken.files[0])
    with BalanceManager(store, BalanceConfig(enabled=True), on_event=events.append) as meter:
        meter.balance("alice")
        yield meter, broken, events


def test_a_charge_the_store_cannot_take_is_one_log_line_and_an_unmetered_event(
    sqlite_meter, register, caplog
):
    # Before the fix: logger.exception, a traceback per call, and no event.
    meter, broken, events = sqlite_meter
    logger = register(Recording(meter))
    broken.break_()
    with caplog.at_level(logging.WARNING):
        reply = litellm.completion(
            model=MODEL, messages=MESSAGES, mock_response="hello world", user="alice"
        )
        [(_, kwargs, _)] = logger.wait_for(1)
    broken.repair()
    [event] = [e for e in events if isinstance(e, Unmetered)]
    assert (event.user_id, event.operation, event.model) == ("alice", "charge", MODEL)
    assert event.usage == reported_usage(reply)
    assert event.request_id == REQUEST_PREFIX + kwargs["litellm_call_id"]
    records = [r for r in caplog.records if r.name.startswith("creditmeter")]
    assert len(records) == 1
    assert records[0].exc_info is None
    assert "unmetered" in records[0].getMessage()


def test_guard_under_both_store_policies(sqlite_meter):
    meter, broken, _ = sqlite_meter
    seen: list = []
    closed = CreditMeterLogger(meter).guard(spy(litellm.completion, seen))
    opened = CreditMeterLogger(meter, on_store_error="open").guard(spy(litellm.completion, seen))
    broken.break_()
    with pytest.raises(StoreError):
        closed(model=MODEL, messages=MESSAGES, mock_response="hi", user="alice")
    assert seen == []
    opened(model=MODEL, messages=MESSAGES, mock_response="hi", user="alice")
    assert seen == ["alice"]
    broken.repair()
    with pytest.raises(ConfigError, match="on_store_error"):
        CreditMeterLogger(meter, on_store_error="ajar")  # type: ignore[arg-type]


def test_the_proxy_pre_call_hook_answers_503_when_the_store_is_down(sqlite_meter, caplog):
    meter, broken, _ = sqlite_meter
    key = UserAPIKeyAuth(api_key="sk-hashed", user_id="key-owner")
    broken.break_()

    async def main():
        with pytest.raises(fastapi.HTTPException) as refused:
            await CreditMeterLogger(meter).async_pre_call_hook(
                key, DualCache(), proxy_request("alice", "key-owner"), "acompletion"
            )
        passed = await CreditMeterLogger(meter, on_store_error="open").async_pre_call_hook(
            key, DualCache(), proxy_request("alice", "key-owner"), "acompletion"
        )
        return refused.value, passed

    with caplog.at_level(logging.WARNING, logger="creditmeter.litellm"):
        refused, passed = asyncio.run(main())
    broken.repair()
    assert refused.status_code == 503
    assert refused.headers == {"Retry-After": "5"}
    assert passed is None
    assert [r.levelno for r in caplog.records] == [logging.ERROR, logging.WARNING]
    assert all(r.exc_info is None for r in caplog.records)


# --- without the extra ---------------------------------------------------------------------


def test_importing_without_litellm_says_which_extra_to_install():
    # Before the fix: a bare "ModuleNotFoundError: No module named 'litellm'".
    code = (
        "import sys\n"
        "sys.modules['litellm'] = None\n"
        "try:\n"
        "    import creditmeter.integrations.litellm\n"
        "except ModuleNotFoundError as exc:\n"
        "    print(exc.name)\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    name, message = done.stdout.splitlines()[:2]
    assert name == "litellm"
    assert "pip install 'creditmeter[litellm]'" in message
