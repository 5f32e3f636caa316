"""Pricing and metering benchmark for creditmeter (issues 3 and 4, "Benchmark").

Measures, in one run on this machine:

1. Pricing (issue 3): ``Pricing.librechat().cost(model, usage)`` for a model
   whose key is cached, and for fresh model names (a key-cache miss on every
   op); ``BalanceManager(MemoryStore(), ...).charge(user, model=..., usage=...)``
   against the amount-only ``charge(user, 1)``.
2. The ``metered`` decorator (issue 4): a no-op function returning an
   OpenAI-shaped response (the real ``openai`` ``ChatCompletion``, and the same
   response as a plain dict), sync (``BalanceManager`` + ``MemoryStore``) and
   async (``AsyncBalanceManager`` + ``AsyncMemoryStore``, timed inside one event
   loop), bare, with the manager calls the decorator makes written by hand
   (``require`` + ``charge(usage=TokenUsage.from_response(result))``), and
   decorated.
3. Streams: a generator of 10 ``ChatCompletionChunk`` objects (the last one
   carrying usage) consumed fully, bare, by hand and decorated, sync and async.

Usage::

    python benchmarks/bench_metering.py [--quick] [--output benchmarks/RESULTS-metering.md]

A full run writes ``benchmarks/RESULTS-metering.md`` unless ``--output`` says
otherwise; ``--quick`` writes only when ``--output`` is given. ``--profile``
adds cProfile listings of pricing, the priced charge and the decorated calls.
"""

# The stand-ins for model calls take the arguments a real one would, and ignore them.
# ruff: noqa: ARG001

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import itertools
import math
import os
import platform
import pstats
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import common
from common import cpu_model, source_state
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionMessage
from openai.types.chat.chat_completion import Choice
from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from openai.types.completion_usage import CompletionTokensDetails, PromptTokensDetails

from creditmeter import (
    AsyncBalanceManager,
    AsyncMemoryStore,
    BalanceConfig,
    BalanceManager,
    MemoryStore,
    Pricing,
    StreamUsage,
    TokenUsage,
)

now_ns = time.perf_counter_ns
PACKAGES = ["creditmeter", "attrs", "cattrs", "tenacity", "openai", "pydantic"]
cpu_ns = time.thread_time_ns  # CPU time of this thread: what other processes cannot inflate
USER = "user-1"
MODEL = "gpt-4o-mini"
PROMPT = "Say hello."
# The usage of issue 3's example: 1,000 uncached input, 500 cache-read and 200 output tokens.
USAGE = TokenUsage(input=1000, output=200, cache_read=500)
# Issue 3's charge config. The default start balance (20,000) goes negative; no clamping.
CHARGE_CONFIG = BalanceConfig(enabled=True, allow_negative_balance=True)
# A decorated call is refused when the available balance is <= 0: start high enough
# that no run gets there (every call of this benchmark costs 307.5 credits).
METER_CONFIG = BalanceConfig(enabled=True, start_balance=10**12, allow_negative_balance=True)
PRICING_TARGET_US = 3.0
DECORATOR_TARGET_US = 15.0
STREAM_CHUNKS = 10


@dataclass(frozen=True)
class Sizes:
    """How much work each section does (ops per batch; every series runs ``repeats`` batches)."""

    cost_ops: int
    cold_ops: int
    charge_ops: int
    call_ops: int
    stream_ops: int
    repeats: int


# Many short rounds rather than a few long ones: on a shared machine the slow spells are
# shorter than a long batch, and short rounds let the medians step around them.
QUICK = Sizes(
    cost_ops=5_000, cold_ops=500, charge_ops=2_000, call_ops=500, stream_ops=100, repeats=15
)
FULL = Sizes(
    cost_ops=10_000, cold_ops=1_000, charge_ops=5_000, call_ops=2_000, stream_ops=400, repeats=41
)


# --- the responses ------------------------------------------------------------------


def completion_usage() -> CompletionUsage:
    """1,500 prompt tokens of which 500 cached, 200 completion tokens: ``USAGE``."""
    return CompletionUsage(
        prompt_tokens=1500,
        completion_tokens=200,
        total_tokens=1700,
        prompt_tokens_details=PromptTokensDetails(audio_tokens=0, cached_tokens=500),
        completion_tokens_details=CompletionTokensDetails(
            reasoning_tokens=0,
            audio_tokens=0,
            accepted_prediction_tokens=0,
            rejected_prediction_tokens=0,
        ),
    )


def chat_completion() -> ChatCompletion:
    """A Chat Completions response as the openai SDK returns it, usage included."""
    return ChatCompletion(
        id="chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
        object="chat.completion",
        created=1741570283,
        model="gpt-4o-mini-2024-07-18",
        choices=[
            Choice(
                index=0,
                message=ChatCompletionMessage(
                    role="assistant", content="Hello! How can I help?", refusal=None
                ),
                logprobs=None,
                finish_reason="stop",
            )
        ],
        usage=completion_usage(),
        service_tier="default",
        system_fingerprint="fp_fc9f1d7035",
    )


def chat_chunk(
    *,
    content: str | None = None,
    role: Any = None,
    finish_reason: Any = None,
    usage: CompletionUsage | None = None,
) -> ChatCompletionChunk:
    """One streamed chunk; a chunk with ``usage`` is the final usage chunk (no choices)."""
    choices = (
        []
        if usage is not None
        else [
            ChunkChoice(
                index=0,
                delta=ChoiceDelta(role=role, content=content),
                logprobs=None,
                finish_reason=finish_reason,
            )
        ]
    )
    return ChatCompletionChunk(
        id="chatcmpl-123",
        object="chat.completion.chunk",
        created=1694268190,
        model="gpt-4o-mini-2024-07-18",
        system_fingerprint="fp_44709d6fcb",
        choices=choices,
        usage=usage,
    )


def chat_chunks() -> list[ChatCompletionChunk]:
    """A stream with ``stream_options={"include_usage": True}``: role, 7 words, stop, usage."""
    chunks = [chat_chunk(role="assistant", content="")]
    chunks += [chat_chunk(content=f"word{i} ") for i in range(STREAM_CHUNKS - 3)]
    chunks.append(chat_chunk(finish_reason="stop"))
    chunks.append(chat_chunk(usage=completion_usage()))
    return chunks


RESPONSE = chat_completion()
RESPONSE_DICT = RESPONSE.model_dump()
CHUNKS = chat_chunks()
CALL_COST = Pricing.librechat().cost(MODEL, USAGE).total  # 307.5 credits


# --- timing helpers (as in bench_core.py) ------------------------------------------------


@dataclass
class Series:
    """µs/op of repeated batches: wall-clock time, and this thread's CPU time beside it."""

    name: str
    per_op_us: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)

    def add(self, batch: tuple[float, float]) -> None:
        wall, cpu = batch
        self.per_op_us.append(wall)
        self.cpu_us.append(cpu)

    @property
    def median(self) -> float:
        return statistics.median(self.per_op_us)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_us)

    @property
    def ops_per_s(self) -> float:
        return 1e6 / self.median


def timed_batch(fn: Callable[[], object], ops: int) -> tuple[float, float]:
    """Run ``fn`` ``ops`` times (GC on); return (wall, CPU) µs per call."""
    start, cpu_start = now_ns(), cpu_ns()
    for _ in range(ops):
        fn()
    return (now_ns() - start) / ops / 1000, (cpu_ns() - cpu_start) / ops / 1000


def timed_each(fn: Callable[[str], object], items: list[str]) -> tuple[float, float]:
    """Run ``fn`` once per item (GC on); return (wall, CPU) µs per call."""
    start, cpu_start = now_ns(), cpu_ns()
    for item in items:
        fn(item)
    ops = len(items)
    return (now_ns() - start) / ops / 1000, (cpu_ns() - cpu_start) / ops / 1000


async def atimed_batch(fn: Callable[[], Any], ops: int) -> tuple[float, float]:
    """Await ``fn()`` ``ops`` times in the running loop; return (wall, CPU) µs per call."""
    start, cpu_start = now_ns(), cpu_ns()
    for _ in range(ops):
        await fn()
    return (now_ns() - start) / ops / 1000, (cpu_ns() - cpu_start) / ops / 1000


def rotations(count: int, repeat: int) -> list[int]:
    """The order the series of one round run in: rotated each round, so none always goes first."""
    return [(i + repeat) % count for i in range(count)]


def differences(a: Series, b: Series, *, cpu: bool = False) -> list[float]:
    """Per-round differences ``a - b`` (wall, or CPU) of two series whose batches ran side by side.

    Batches of one round run back to back, so a slow spell of the machine shifts
    both; the median of these differences is the headline of every comparison.
    """
    if cpu:
        return [x - y for x, y in zip(a.cpu_us, b.cpu_us, strict=True)]
    return [x - y for x, y in zip(a.per_op_us, b.per_op_us, strict=True)]


def expect_balance(actual: Decimal, start: Decimal, charges: int, cost: Decimal, what: str) -> None:
    """Every call must have been charged exactly once, at the full price."""
    expected = start - charges * cost
    if actual != expected:
        raise RuntimeError(f"{what}: balance {actual}, expected {expected} ({charges} charges)")


# --- section 1: pricing ----------------------------------------------------------------------


class NameSource:
    """Fresh model names, never seen by the pricing's key cache."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.counter = itertools.count()

    def take(self, count: int) -> list[str]:
        return [self.pattern.format(n=next(self.counter)) for _ in range(count)]


def bench_pricing(sizes: Sizes) -> dict[str, object]:
    pricing = Pricing.librechat()
    cost = pricing.cost
    if pricing.key_for(MODEL) != MODEL:
        raise RuntimeError(f"{MODEL} does not match its own key")

    def price(name: str) -> object:
        return cost(name, USAGE)

    cached = Series(f"`cost('{MODEL}', usage)`, key cached")
    known = Series(f"`cost('{MODEL}-<n>', usage)`, fresh name each op (cache miss; matches a key)")
    unknown = Series("`cost('acme-chat-<n>', usage)`, fresh name each op (cache miss; no key)")
    known_names = NameSource(MODEL + "-{n:07d}")
    unknown_names = NameSource("acme-chat-{n:07d}")
    cached_names = [MODEL] * sizes.cost_ops
    for _ in range(3):  # warm up every path
        timed_each(price, cached_names[:1000])
        timed_each(price, known_names.take(200))
        timed_each(price, unknown_names.take(200))
    for repeat in range(sizes.repeats):
        for index in rotations(3, repeat):
            if index == 0:
                cached.add(timed_each(price, cached_names))
            elif index == 1:
                names = known_names.take(sizes.cold_ops)
                known.add(timed_each(price, names))
                if pricing.key_for(names[-1]) != MODEL:
                    raise RuntimeError(f"{names[-1]!r} did not match {MODEL!r}")
            else:
                names = unknown_names.take(sizes.cold_ops)
                unknown.add(timed_each(price, names))
                if pricing.key_for(names[-1]) is not None:
                    raise RuntimeError(f"{names[-1]!r} matched a table key")
    return {
        "cached": cached,
        "known": known,
        "unknown": unknown,
        "table_keys": len(pricing.token_values),
        "legacy_rules": len(pricing.legacy),
        "cost": cost(MODEL, USAGE),
    }


def bench_charge(sizes: Sizes) -> dict[str, object]:
    ops, repeats = sizes.charge_ops, sizes.repeats
    by_amount = BalanceManager(MemoryStore(), CHARGE_CONFIG)
    priced = BalanceManager(MemoryStore(), CHARGE_CONFIG)
    amount_charge, priced_charge = by_amount.charge, priced.charge

    def charge_amount() -> None:
        amount_charge(USER, 1)

    def charge_priced() -> None:
        priced_charge(USER, model=MODEL, usage=USAGE)

    warm = 1000
    for _ in range(warm):
        charge_amount()
        charge_priced()
    amount_series = Series("`charge(user, 1)` (amount only)")
    priced_series = Series(f"`charge(user, model='{MODEL}', usage=usage)` (priced)")
    plan = [(amount_series, charge_amount), (priced_series, charge_priced)]
    for repeat in range(repeats):
        for index in rotations(2, repeat):
            series, fn = plan[index]
            series.add(timed_batch(fn, ops))
    charges = warm + ops * repeats
    start = CHARGE_CONFIG.start_balance
    expect_balance(by_amount.balance(USER), start, charges, Decimal(1), "amount-only charge")
    expect_balance(priced.balance(USER), start, charges, CALL_COST, "priced charge")
    by_amount.close()
    priced.close()
    return {
        "amount": amount_series,
        "priced": priced_series,
        "added": statistics.median(differences(priced_series, amount_series)),
        "added_per_batch": differences(priced_series, amount_series),
        "added_cpu": statistics.median(differences(priced_series, amount_series, cpu=True)),
        "ops": ops,
        "repeats": repeats,
        "ledger_len": charges,
    }


# --- section 2: the decorator, one call --------------------------------------------------


def bench_components(sizes: Sizes) -> list[Series]:
    """The pieces of a metered call, each timed alone: what the by-hand variant adds up."""
    manager = BalanceManager(MemoryStore(), METER_CONFIG)
    require = manager.require
    from_response = TokenUsage.from_response

    def stream_usage() -> None:
        seen = StreamUsage()
        for chunk in CHUNKS:
            seen.add(chunk)

    plan = [
        (Series("`manager.require(user)` (MemoryStore)"), lambda: require(USER), 1),
        (
            Series("`TokenUsage.from_response(response)`, ChatCompletion"),
            lambda: from_response(RESPONSE),
            1,
        ),
        (
            Series("`TokenUsage.from_response(response)`, dict"),
            lambda: from_response(RESPONSE_DICT),
            1,
        ),
        (
            Series(f"`StreamUsage().add(chunk)` over the {STREAM_CHUNKS} chunks, per stream"),
            stream_usage,
            10,
        ),
    ]
    for _, fn, per in plan:
        for _ in range(1000 // per):
            fn()
    for repeat in range(sizes.repeats):
        for index in rotations(len(plan), repeat):
            series, fn, per = plan[index]
            series.add(timed_batch(fn, sizes.call_ops // per))
    if from_response(RESPONSE) != USAGE or from_response(RESPONSE_DICT) != USAGE:
        raise RuntimeError("the responses do not carry USAGE")
    manager.close()
    return [series for series, _, _ in plan]


@dataclass
class CallResult:
    """The three series of one mode (sync/async) and response shape."""

    mode: str
    shape: str
    bare: Series
    by_hand: Series
    decorated: Series

    @property
    def added(self) -> float:
        """What the decorator adds over the manager calls it makes (median of per-round)."""
        return statistics.median(self.added_per_batch)

    @property
    def added_per_batch(self) -> list[float]:
        return differences(self.decorated, self.by_hand)

    @property
    def added_cpu(self) -> float:
        """The same in CPU time of the benchmark's thread."""
        return statistics.median(differences(self.decorated, self.by_hand, cpu=True))


def _series_for(mode: str, shape: str) -> tuple[Series, Series, Series]:
    return (
        Series(f"{mode}, {shape}: bare function"),
        Series(f"{mode}, {shape}: by hand (`require` + `charge(usage=from_response(result))`)"),
        Series(f"{mode}, {shape}: `@meter.metered(user='user_id', model='model')`"),
    )


def bench_sync_calls(sizes: Sizes, shape: str, response: object) -> CallResult:
    """Sync: bare, by hand and decorated over ``BalanceManager(MemoryStore())``."""
    hand_manager = BalanceManager(MemoryStore(), METER_CONFIG)
    meter = BalanceManager(MemoryStore(), METER_CONFIG)

    def ask(prompt: str, *, user_id: str, model: str) -> Any:
        return response

    def ask_by_hand(prompt: str, *, user_id: str, model: str) -> Any:
        hand_manager.require(user_id)
        result = ask(prompt, user_id=user_id, model=model)
        hand_manager.charge(user_id, model=model, usage=TokenUsage.from_response(result))
        return result

    ask_metered = meter.metered(user="user_id", model="model")(ask)
    if ask_metered(PROMPT, user_id=USER, model=MODEL) is not response:
        raise RuntimeError("the decorated function changed the result")
    fns = [
        lambda: ask(PROMPT, user_id=USER, model=MODEL),
        lambda: ask_by_hand(PROMPT, user_id=USER, model=MODEL),
        lambda: ask_metered(PROMPT, user_id=USER, model=MODEL),
    ]
    warm = 1000
    for fn in fns:
        for _ in range(warm):
            fn()
    series = _series_for("sync", shape)
    for repeat in range(sizes.repeats):
        for index in rotations(3, repeat):
            series[index].add(timed_batch(fns[index], sizes.call_ops))
    charges = warm + sizes.call_ops * sizes.repeats
    start = METER_CONFIG.start_balance
    expect_balance(hand_manager.balance(USER), start, charges, CALL_COST, "sync by hand")
    expect_balance(meter.balance(USER), start, charges + 1, CALL_COST, "sync decorated")
    hand_manager.close()
    meter.close()
    return CallResult("sync", shape, *series)


async def bench_async_calls(sizes: Sizes, shape: str, response: object) -> CallResult:
    """Async: the same over ``AsyncBalanceManager(AsyncMemoryStore())``, in one event loop."""
    hand_manager = AsyncBalanceManager(AsyncMemoryStore(), METER_CONFIG)
    meter = AsyncBalanceManager(AsyncMemoryStore(), METER_CONFIG)

    async def ask(prompt: str, *, user_id: str, model: str) -> Any:
        return response

    async def ask_by_hand(prompt: str, *, user_id: str, model: str) -> Any:
        await hand_manager.require(user_id)
        result = await ask(prompt, user_id=user_id, model=model)
        await hand_manager.charge(user_id, model=model, usage=TokenUsage.from_response(result))
        return result

    ask_metered = meter.metered(user="user_id", model="model")(ask)
    if await ask_metered(PROMPT, user_id=USER, model=MODEL) is not response:
        raise RuntimeError("the decorated function changed the result")
    fns = [
        lambda: ask(PROMPT, user_id=USER, model=MODEL),
        lambda: ask_by_hand(PROMPT, user_id=USER, model=MODEL),
        lambda: ask_metered(PROMPT, user_id=USER, model=MODEL),
    ]
    warm = 1000
    for fn in fns:
        for _ in range(warm):
            await fn()
    series = _series_for("async", shape)
    for repeat in range(sizes.repeats):
        for index in rotations(3, repeat):
            series[index].add(await atimed_batch(fns[index], sizes.call_ops))
    charges = warm + sizes.call_ops * sizes.repeats
    start = METER_CONFIG.start_balance
    expect_balance(await hand_manager.balance(USER), start, charges, CALL_COST, "async by hand")
    expect_balance(await meter.balance(USER), start, charges + 1, CALL_COST, "async decorated")
    await hand_manager.aclose()
    await meter.aclose()
    return CallResult("async", shape, *series)


# --- section 3: streams -----------------------------------------------------------------


def bench_sync_streams(sizes: Sizes) -> CallResult:
    hand_manager = BalanceManager(MemoryStore(), METER_CONFIG)
    meter = BalanceManager(MemoryStore(), METER_CONFIG)

    def stream(prompt: str, *, user_id: str, model: str) -> Iterator[ChatCompletionChunk]:
        yield from CHUNKS

    stream_metered = meter.metered(user="user_id", model="model")(stream)

    def bare() -> None:
        for _chunk in stream(PROMPT, user_id=USER, model=MODEL):
            pass

    def by_hand() -> None:
        hand_manager.require(USER)
        seen = StreamUsage()
        for chunk in stream(PROMPT, user_id=USER, model=MODEL):
            seen.add(chunk)
        hand_manager.charge(USER, model=MODEL, usage=seen.usage)

    def decorated() -> None:
        for _chunk in stream_metered(PROMPT, user_id=USER, model=MODEL):
            pass

    fns = [bare, by_hand, decorated]
    warm = 200
    for fn in fns:
        for _ in range(warm):
            fn()
    series = _stream_series("sync")
    for repeat in range(sizes.repeats):
        for index in rotations(3, repeat):
            series[index].add(timed_batch(fns[index], sizes.stream_ops))
    charges = warm + sizes.stream_ops * sizes.repeats
    start = METER_CONFIG.start_balance
    expect_balance(hand_manager.balance(USER), start, charges, CALL_COST, "sync stream by hand")
    expect_balance(meter.balance(USER), start, charges, CALL_COST, "sync stream decorated")
    hand_manager.close()
    meter.close()
    return CallResult("sync", "stream", *series)


async def bench_async_streams(sizes: Sizes) -> CallResult:
    hand_manager = AsyncBalanceManager(AsyncMemoryStore(), METER_CONFIG)
    meter = AsyncBalanceManager(AsyncMemoryStore(), METER_CONFIG)

    async def stream(
        prompt: str, *, user_id: str, model: str
    ) -> AsyncIterator[ChatCompletionChunk]:
        for chunk in CHUNKS:
            yield chunk

    stream_metered = meter.metered(user="user_id", model="model")(stream)

    async def bare() -> None:
        async for _chunk in stream(PROMPT, user_id=USER, model=MODEL):
            pass

    async def by_hand() -> None:
        await hand_manager.require(USER)
        seen = StreamUsage()
        async for chunk in stream(PROMPT, user_id=USER, model=MODEL):
            seen.add(chunk)
        await hand_manager.charge(USER, model=MODEL, usage=seen.usage)

    async def decorated() -> None:
        async for _chunk in stream_metered(PROMPT, user_id=USER, model=MODEL):
            pass

    fns = [bare, by_hand, decorated]
    warm = 200
    for fn in fns:
        for _ in range(warm):
            await fn()
    series = _stream_series("async")
    for repeat in range(sizes.repeats):
        for index in rotations(3, repeat):
            series[index].add(await atimed_batch(fns[index], sizes.stream_ops))
    charges = warm + sizes.stream_ops * sizes.repeats
    start = METER_CONFIG.start_balance
    expect_balance(await hand_manager.balance(USER), start, charges, CALL_COST, "async stream")
    expect_balance(await meter.balance(USER), start, charges, CALL_COST, "async stream decorated")
    await hand_manager.aclose()
    await meter.aclose()
    return CallResult("async", "stream", *series)


def _stream_series(mode: str) -> tuple[Series, Series, Series]:
    what = f"{mode}, {STREAM_CHUNKS}-chunk stream consumed fully"
    return (
        Series(f"{what}: bare generator"),
        Series(f"{what}: by hand (`require`, `StreamUsage.add` per chunk, `charge`)"),
        Series(f"{what}: decorated"),
    )


async def bench_async(sizes: Sizes) -> dict[str, object]:
    calls = [
        await bench_async_calls(sizes, "ChatCompletion", RESPONSE),
        await bench_async_calls(sizes, "dict", RESPONSE_DICT),
    ]
    gc.collect()
    return {"calls": calls, "stream": await bench_async_streams(sizes)}


# --- profiling (optional) ---------------------------------------------------------------


def _listing(title: str, run: Callable[[], object], lines: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    out = io.StringIO()
    out.write(f"### cProfile: {title}\n\n```\n")
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(lines)
    out.write("```\n\n")
    return out.getvalue()


def profile_text(ops: int) -> str:
    pricing = Pricing.librechat()
    parts = []

    def costs() -> None:
        for _ in range(ops):
            pricing.cost(MODEL, USAGE)

    parts.append(_listing(f"`cost('{MODEL}', usage)` (key cached) x {ops}", costs, 14))
    names = NameSource("acme-chat-profile-{n:07d}").take(ops // 10)

    def cold() -> None:
        for name in names:
            pricing.cost(name, USAGE)

    parts.append(_listing(f"`cost('acme-chat-<n>', usage)` (cache miss) x {ops // 10}", cold, 8))
    manager = BalanceManager(MemoryStore(), CHARGE_CONFIG)

    def charges() -> None:
        for _ in range(ops):
            manager.charge(USER, model=MODEL, usage=USAGE)

    parts.append(_listing(f"priced `charge` x {ops}", charges, 22))
    meter = BalanceManager(MemoryStore(), METER_CONFIG)

    @meter.metered(user="user_id", model="model")
    def ask(prompt: str, *, user_id: str, model: str) -> ChatCompletion:
        return RESPONSE

    def calls() -> None:
        for _ in range(ops // 2):
            ask(PROMPT, user_id=USER, model=MODEL)

    parts.append(_listing(f"sync decorated call (ChatCompletion) x {ops // 2}", calls, 30))

    @meter.metered(user="user_id", model="model")
    def stream(prompt: str, *, user_id: str, model: str) -> Iterator[ChatCompletionChunk]:
        yield from CHUNKS

    def streams() -> None:
        for _ in range(ops // 20):
            for _chunk in stream(PROMPT, user_id=USER, model=MODEL):
                pass

    parts.append(_listing(f"sync decorated stream x {ops // 20}", streams, 22))
    return "".join(parts).rstrip() + "\n"


# --- report -----------------------------------------------------------------------------


def cpu_times() -> tuple[int, int] | None:
    """(steal, total) jiffies from /proc/stat, or None where there is none."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    values = [int(x) for x in fields]
    steal = values[7] if len(values) > 7 else 0
    return steal, sum(values[:8])


def met(ok: bool) -> str:
    return "met" if ok else "not met"


def fmt(x: float, digits: int = 2) -> str:
    return f"{x:,.{digits}f}"


def span(values: list[float]) -> str:
    """The middle half (interquartile range) of some per-round differences."""
    low, _, high = statistics.quantiles(values, n=4)
    return f"{fmt(low)} to {fmt(high)}"


def series_rows(rows: list[Series], *, base: Series | None = None) -> list[str]:
    head = "| what | median µs/op | min | max | mean of all batches | ops/s | CPU µs/op |"
    rule = "|---|---:|---:|---:|---:|---:|---:|"
    if base is not None:
        head += " over the first row, µs (median per round) | the same in CPU µs |"
        rule += "---:|---:|"
    lines = [head, rule]
    for s in rows:
        line = (
            f"| {s.name} | {fmt(s.median)} | {fmt(min(s.per_op_us))} | "
            f"{fmt(max(s.per_op_us))} | {fmt(statistics.fmean(s.per_op_us))} | "
            f"{fmt(s.ops_per_s, 0)} | {fmt(s.cpu_median)} |"
        )
        if base is not None:
            line += (
                f" {fmt(statistics.median(differences(s, base)))} | "
                f"{fmt(statistics.median(differences(s, base, cpu=True)))} |"
            )
        lines.append(line)
    return lines


def call_rows(results: list[CallResult], unit: str) -> list[str]:
    lines = [
        (
            f"| mode | result | bare µs/{unit} | by hand µs/{unit} | decorated µs/{unit} "
            f"| decorated {unit}s/s | decorator over by hand, µs (middle half of the rounds) "
            "| the same in CPU µs | decorated over bare, µs (medians) |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.mode} | {r.shape} | {fmt(r.bare.median)} | {fmt(r.by_hand.median)} | "
            f"{fmt(r.decorated.median)} | {fmt(r.decorated.ops_per_s, 0)} | "
            f"{fmt(r.added)} ({span(r.added_per_batch)}) | {fmt(r.added_cpu)} | "
            f"{fmt(r.decorated.median - r.bare.median)} |"
        )
    return lines


def machine_lines() -> list[str]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return [
        f"- CPUs (nproc): {affinity}; CPU: {cpu_model()}",
        f"- OS: {platform.system()} {platform.release()} ({platform.machine()})",
        f"- Python {platform.python_version()} ({platform.python_implementation()})",
        f"- Packages: {common.versions(PACKAGES)}",
        f"- creditmeter source: {source_state()}",
    ]


def render(results: dict[str, Any], args: argparse.Namespace, command: str) -> str:
    sizes: Sizes = results["sizes"]
    pricing = results["pricing"]
    charge = results["charge"]
    calls: list[CallResult] = results["calls"]
    streams: list[CallResult] = results["streams"]
    cost = pricing["cost"]
    lines = [
        "# creditmeter pricing and metering benchmark",
        "",
        f"- Date: {results['date']}",
        *machine_lines(),
        (
            f"- Command: `{command}` ({'quick' if args.quick else 'full'} run, "
            f"{results['elapsed_s']:.0f} s)"
        ),
        (
            f"- 1-minute load average at start: {fmt(results['load'])}; CPU steal during the "
            f"run (from /proc/stat): {fmt(results['steal_pct'], 1)}%"
        ),
        (
            "- Timer: `time.perf_counter_ns`, GC on; µs/op is the median over repeated batches "
            "(each batch's total time / its op count); the mean of all batches keeps every "
            "GC pause and slow spell in; ops/s = 1e6 / median µs/op. CPU µs/op: the same "
            "median in `time.thread_time_ns`, which time spent waiting for a CPU (other "
            "processes on a busy machine) does not inflate; verdicts use wall-clock time. "
            "The series "
            "compared in one table run in rounds: one batch of each, back to back, the order "
            'rotated each round. A difference between two series ("adds X µs") is the '
            "median of their per-round differences, so a slow spell of the machine, which "
            "shifts a whole round, cancels out."
        ),
        (
            f"- Usage priced everywhere: `TokenUsage(input=1000, output=200, cache_read=500)` "
            f"of `{MODEL}` (key `{cost.key}`; rates prompt {cost.rates.prompt}, completion "
            f"{cost.rates.completion}, cache read {cost.rates.cache_read}): "
            f"{cost.total.normalize():f} credits per call."
        ),
        "",
        "## 1. Pricing (issue 3)",
        "",
        (
            f"`Pricing.librechat().cost(model, usage)` ({pricing['table_keys']} table keys, "
            f"{pricing['legacy_rules']} legacy rules), {sizes.repeats} batches each: "
            f"{sizes.cost_ops:,} ops for the cached key, {sizes.cold_ops:,} for the cold names. "
            "A cold name is a name the key cache has not seen: every op scans the table for "
            "the longest key the name contains (and, with no match, the legacy rules), then "
            "caches it; the cache holds 4,096 names and is emptied when full, so these runs "
            "also pay its periodic clearing. The usage object is built once."
        ),
        "",
        *series_rows([pricing["cached"], pricing["known"], pricing["unknown"]]),
        "",
        (
            f"`BalanceManager(MemoryStore(), BalanceConfig(enabled=True, "
            f"allow_negative_balance=True))`, one manager per variant for all batches, "
            f"{charge['repeats']} interleaved batches of {charge['ops']:,} charges each "
            f"(ledgers grow to {charge['ledger_len']:,} entries); the same `TokenUsage` "
            "object every time. Balances are checked afterwards: every charge moved exactly "
            "its cost."
        ),
        "",
        *series_rows([charge["amount"], charge["priced"]], base=charge["amount"]),
        "",
        (
            f"**Pricing adds {fmt(charge['added'])} µs per charge** (median of the per-round "
            f"differences; the middle half of them {span(charge['added_per_batch'])} µs; in CPU "
            f"time {fmt(charge['added_cpu'])} µs). That "
            "covers everything a priced charge does beyond the amount-only one: validating "
            "the model name, `Pricing.cost`, validating the total, and the bigger ledger "
            "entry (model, usage, rates)."
        ),
        "",
        "## 2. The `metered` decorator, one call (issue 4)",
        "",
        (
            "A no-op function `ask(prompt, *, user_id, model)` returning one prebuilt response: "
            "the openai SDK's `ChatCompletion` (with `usage`: 1,500 prompt tokens of which 500 "
            "cached, 200 completion tokens), or the same response as a plain dict "
            "(`model_dump()`). Three variants, each with its own manager "
            "(`BalanceConfig(enabled=True, start_balance=10**12, allow_negative_balance=True)`, "
            "so no call is refused):"
        ),
        "",
        "- **bare**: `ask(...)` itself.",
        (
            "- **by hand**: the manager calls the decorator makes, written out: "
            "`manager.require(user_id)`, then `ask(...)`, then "
            "`manager.charge(user_id, model=model, usage=TokenUsage.from_response(result))`."
        ),
        "- **decorated**: `@manager.metered(user='user_id', model='model')` around `ask`.",
        "",
        (
            "Sync: `BalanceManager(MemoryStore())`. Async: `AsyncBalanceManager("
            "AsyncMemoryStore())` and `async def ask`, every batch timed inside one running "
            f"event loop ({sizes.call_ops:,} sequential awaits per batch). {sizes.repeats} "
            f"batches of {sizes.call_ops:,} calls per series. Balances are checked afterwards: "
            "every call was charged exactly once."
        ),
        "",
        *call_rows(calls, "call"),
        "",
        "All series:",
        "",
        *series_rows([s for r in calls for s in (r.bare, r.by_hand, r.decorated)]),
        "",
        (
            "Where a by-hand call's time goes: its pieces timed alone (sync, interleaved "
            f"batches of {sizes.call_ops:,}; the priced charge is section 1's):"
        ),
        "",
        *series_rows([*results["components"][:3], charge["priced"]]),
        "",
        (
            f"Sum for a ChatCompletion: {fmt(components_sum(results, 1))} µs; for a dict: "
            f"{fmt(components_sum(results, 2))} µs (by hand, measured whole: "
            f"{fmt(calls[0].by_hand.median)} and {fmt(calls[1].by_hand.median)} µs). Each "
            "piece alone runs in a tight loop with warm caches; strung together they run "
            "slower than the sum (the call counts do add up under cProfile), so read this as "
            "a split of the time, not as a floor."
        ),
        "",
        "## 3. Streams",
        "",
        (
            f"A generator function yielding {STREAM_CHUNKS} prebuilt `ChatCompletionChunk` "
            "objects (a role chunk, 7 content chunks, a `finish_reason` chunk, and a final "
            "chunk with no choices carrying `usage`, as with "
            '`stream_options={"include_usage": True}`), consumed fully with a `for` loop '
            "(`async for` over an async generator function in async mode). By hand: "
            "`require`, a `StreamUsage` fed every chunk, `charge(usage=seen.usage)`. "
            f"{sizes.repeats} batches of {sizes.stream_ops:,} streams per series; times are "
            "per stream."
        ),
        "",
        *call_rows(streams, "stream"),
        "",
        *series_rows([s for r in streams for s in (r.bare, r.by_hand, r.decorated)]),
        "",
        (
            "Reading the usage of one stream alone (sync; a fresh `StreamUsage` fed all "
            f"{STREAM_CHUNKS} chunks): {fmt(results['components'][3].median)} µs per stream, "
            f"{fmt(results['components'][3].median / STREAM_CHUNKS)} µs per chunk."
        ),
        "",
        "## Targets",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
    ]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in targets(results)]
    if results.get("profile"):
        lines += ["", "## Profiles (cProfile adds its own overhead)", "", results["profile"]]
    return "\n".join(lines).rstrip() + "\n"


def components_sum(results: dict[str, Any], reader: int) -> float:
    """require + from_response (``reader``: 1 ChatCompletion, 2 dict) + the priced charge."""
    parts = results["components"]
    return parts[0].median + parts[reader].median + results["charge"]["priced"].median


def targets(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    charge = results["charge"]
    cached = results["pricing"]["cached"].median
    out = [
        (
            f"Issue 3: pricing adds ≤ {PRICING_TARGET_US:g} µs per charge (MemoryStore)",
            (
                f"{fmt(charge['added'])} µs (middle half of the rounds "
                f"{span(charge['added_per_batch'])}; CPU time {fmt(charge['added_cpu'])} µs; "
                f"medians {fmt(charge['priced'].median)} priced, "
                f"{fmt(charge['amount'].median)} amount-only); `cost` alone with the key "
                f"cached {fmt(cached)} µs"
            ),
            met(charge["added"] <= PRICING_TARGET_US),
        )
    ]
    for r in results["calls"]:
        out.append(
            (
                (
                    f"Issue 4: the decorator adds ≤ {DECORATOR_TARGET_US:g} µs per call over "
                    f"the manager calls it makes ({r.mode}, {r.shape})"
                ),
                (
                    f"{fmt(r.added)} µs (middle half of the rounds {span(r.added_per_batch)}; "
                    f"CPU time {fmt(r.added_cpu)} µs; medians "
                    f"{fmt(r.decorated.median)} decorated, {fmt(r.by_hand.median)} by hand)"
                ),
                met(r.added <= DECORATOR_TARGET_US),
            )
        )
    return out


# --- main ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (well under a minute)")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="write the report here (default for a full run: benchmarks/RESULTS-metering.md)",
    )
    parser.add_argument("--profile", action="store_true", help="append cProfile listings")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    output = args.output
    if output is None and not args.quick:
        output = Path(__file__).resolve().parent / "RESULTS-metering.md"
    command = "python benchmarks/bench_metering.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    started = time.monotonic()
    cpu_before = cpu_times()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    results: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "sizes": sizes,
    }
    print("1/3 pricing ...", flush=True)
    results["pricing"] = bench_pricing(sizes)
    gc.collect()
    results["charge"] = bench_charge(sizes)
    gc.collect()
    print("2/3 decorator, sync ...", flush=True)
    sync_calls = [
        bench_sync_calls(sizes, "ChatCompletion", RESPONSE),
        bench_sync_calls(sizes, "dict", RESPONSE_DICT),
    ]
    gc.collect()
    sync_stream = bench_sync_streams(sizes)
    gc.collect()
    results["components"] = bench_components(sizes)
    gc.collect()
    print("3/3 decorator, async ...", flush=True)
    async_results = asyncio.run(bench_async(sizes))
    gc.collect()
    results["calls"] = [*sync_calls, *async_results["calls"]]
    results["streams"] = [sync_stream, async_results["stream"]]
    if args.profile:
        print("profiling ...", flush=True)
        results["profile"] = profile_text(20_000 if args.quick else 100_000)
    results["elapsed_s"] = time.monotonic() - started
    cpu_after = cpu_times()
    results["load"] = load_before
    results["steal_pct"] = math.nan
    if cpu_before is not None and cpu_after is not None and cpu_after[1] > cpu_before[1]:
        steal = cpu_after[0] - cpu_before[0]
        results["steal_pct"] = 100 * steal / (cpu_after[1] - cpu_before[1])
    report = render(results, args, command)
    print()
    print(report)
    if output is not None:
        output.write_text(report, encoding="utf-8")
        print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
