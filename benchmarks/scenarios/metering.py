"""What one in-memory call costs: a charge, pricing, the ``metered`` decorator, a stream.

Issues 2, 3 and 4, all on MemoryStore, each table one interleaved run:
``charge(user, 1)`` beside its floor (a dict update under a lock), with the GC
paused, beside PyrateLimiter's ``try_acquire``, and priced (what pricing adds);
``Pricing.cost`` cached and on fresh names; and a no-op function returning an
openai ``ChatCompletion``, the same as a dict, or a 10-chunk stream, sync and
async: bare, with the manager calls the decorator makes written by hand, and
decorated (what the decorator adds).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from harness import Rounds, Section, ainterleave, interleave
from harness.floors import raw
from harness.report import fmt, versions
from harness.responses import CHUNKS, RESPONSE, RESPONSE_DICT, USAGE

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

TITLE = "Metering: a charge, pricing, the decorator and a stream, in memory"
USER, MODEL = "user-1", "gpt-4o-mini"
START = 10**12  # no call is refused, and balances never clamp
CONFIG = BalanceConfig(enabled=True, start_balance=START, allow_negative_balance=True)
COST = Pricing.librechat().cost(MODEL, USAGE).total
SHAPES = {"ChatCompletion": RESPONSE, "dict": RESPONSE_DICT, "stream": CHUNKS}
CHARGE_US, PRICING_US, DECORATOR_US = 5.0, 3.0, 15.0  # the targets


@dataclass(frozen=True)
class Sizes:
    """Ops per batch of each kind of series, and rounds."""

    charge_ops: int
    cost_ops: int
    cold_ops: int
    call_ops: int
    stream_ops: int
    repeats: int


# Many short rounds rather than a few long ones: the medians step around slow spells.
QUICK = Sizes(charge_ops=300, cost_ops=300, cold_ops=50, call_ops=100, stream_ops=20, repeats=5)
FULL = Sizes(
    charge_ops=5_000, cost_ops=10_000, cold_ops=1_000, call_ops=2_000, stream_ops=400, repeats=41
)


def expect(balance: Decimal, calls: int, each: Decimal, what: str) -> None:
    """Every call must have been charged exactly once, at the full price."""
    if balance != START - calls * each:
        raise RuntimeError(f"{what}: balance {balance}, expected {START - calls * each}")


def charges(sizes: Sizes) -> Rounds:
    """The amount-only and priced charges beside the floor, GC paused, and PyrateLimiter."""
    from pyrate_limiter import Duration, Limiter, Rate  # noqa: PLC0415

    one, paused, priced = (BalanceManager(MemoryStore(), CONFIG) for _ in range(3))
    limiter = Limiter(Rate(10**9, Duration.SECOND))
    calls: dict[str, Callable[[], object]] = {
        "floor: dict update under threading.Lock": raw("memory://").charge,
        "charge(user, 1)": lambda: one.charge(USER, 1),
        "charge(user, 1), GC paused in its batches": lambda: paused.charge(USER, 1),
        f"charge(user, model={MODEL!r}, usage)": lambda: priced.charge(
            USER, model=MODEL, usage=USAGE
        ),
        "PyrateLimiter InMemoryBucket try_acquire(user)": lambda: limiter.try_acquire(USER),
    }
    names = list(calls)
    rounds = interleave(calls, ops=sizes.charge_ops, repeats=sizes.repeats, gc_off=names[2:3])
    for manager, name, each in zip((one, paused, priced), names[1:4], (1, 1, COST), strict=True):
        expect(manager.balance(USER), rounds[name].calls, Decimal(each), name)
    return rounds


def pricing(sizes: Sizes) -> Rounds:
    """``Pricing.cost`` cached, and on a fresh name each op (a key-cache miss)."""
    cost = Pricing.librechat().cost
    known = (f"{MODEL}-{n:07d}" for n in itertools.count())
    unknown = (f"acme-chat-{n:07d}" for n in itertools.count())
    calls = {
        f"cost({MODEL!r}, usage), key cached": lambda: cost(MODEL, USAGE),
        f"cost('{MODEL}-<n>', usage), fresh name (matches a key)": lambda: cost(next(known), USAGE),
        "cost('acme-chat-<n>', usage), fresh name (no key)": lambda: cost(next(unknown), USAGE),
    }
    ops = dict(zip(calls, (sizes.cost_ops, sizes.cold_ops, sizes.cold_ops), strict=True))
    return interleave(calls, ops=ops, repeats=sizes.repeats)


def _usage(shape: str, result: Any) -> TokenUsage:
    """What the by-hand variant charges: the response's usage, or the stream's."""
    if shape != "stream":
        return TokenUsage.from_response(result)
    seen = StreamUsage()
    for chunk in result:
        seen.add(chunk)
    return seen.usage


def _sync_ask(response: object) -> Callable[..., Any]:
    """A stand-in for the model call: a function returning ``response``, or a generator."""
    if response is CHUNKS:

        def stream(prompt: str, *, user_id: str, model: str) -> Iterator[Any]:
            del prompt, user_id, model
            yield from CHUNKS

        return stream

    def ask(prompt: str, *, user_id: str, model: str) -> Any:
        del prompt, user_id, model
        return response

    return ask


def _async_ask(response: object) -> Callable[..., Any]:
    """The same as coroutine functions, and an async generator."""
    if response is CHUNKS:

        async def stream(prompt: str, *, user_id: str, model: str) -> AsyncIterator[Any]:
            del prompt, user_id, model
            for chunk in CHUNKS:
                yield chunk

        return stream

    async def ask(prompt: str, *, user_id: str, model: str) -> Any:
        del prompt, user_id, model
        return response

    return ask


def sync_rounds(sizes: Sizes) -> tuple[Rounds, dict[str, Any]]:
    """Sync, ``BalanceManager(MemoryStore())``: bare, by hand and decorated, per shape."""
    calls: dict[str, Callable[[], object]] = {}
    managers: dict[str, Any] = {}
    for shape, response in SHAPES.items():
        ask = _sync_ask(response)
        hand, meter = BalanceManager(MemoryStore(), CONFIG), BalanceManager(MemoryStore(), CONFIG)
        decorated = meter.metered(user="user_id", model="model")(ask)

        def by_hand(ask: Any = ask, hand: Any = hand, shape: str = shape) -> None:
            hand.require(USER)
            result = ask("Say hello.", user_id=USER, model=MODEL)
            hand.charge(USER, model=MODEL, usage=_usage(shape, result))

        read = list if shape == "stream" else (lambda result: result)
        calls[f"sync, {shape}: bare"] = lambda a=ask, r=read: r(a("Hi", user_id=USER, model=MODEL))
        calls[f"sync, {shape}: by hand"] = by_hand
        calls[f"sync, {shape}: decorated"] = lambda d=decorated, r=read: r(
            d("Hi", user_id=USER, model=MODEL)
        )
        managers |= {f"sync, {shape}: by hand": hand, f"sync, {shape}: decorated": meter}
    ops = {name: sizes.stream_ops if "stream" in name else sizes.call_ops for name in calls}
    return interleave(calls, ops=ops, repeats=sizes.repeats), managers


async def async_rounds(sizes: Sizes) -> Rounds:
    """The same over ``AsyncBalanceManager(AsyncMemoryStore())``, in one event loop."""
    calls: dict[str, Callable[[], Any]] = {}
    managers: dict[str, Any] = {}

    async def drain(result: Any) -> None:
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
        else:
            await result

    for shape, response in SHAPES.items():
        ask = _async_ask(response)
        hand = AsyncBalanceManager(AsyncMemoryStore(), CONFIG)
        meter = AsyncBalanceManager(AsyncMemoryStore(), CONFIG)
        decorated = meter.metered(user="user_id", model="model")(ask)

        async def by_hand(ask: Any = ask, hand: Any = hand, shape: str = shape) -> None:
            await hand.require(USER)
            if shape == "stream":
                seen = StreamUsage()
                async for chunk in ask("Say hello.", user_id=USER, model=MODEL):
                    seen.add(chunk)
                usage = seen.usage
            else:
                usage = TokenUsage.from_response(await ask("Say hello.", user_id=USER, model=MODEL))
            await hand.charge(USER, model=MODEL, usage=usage)

        calls[f"async, {shape}: bare"] = lambda a=ask: drain(a("Hi", user_id=USER, model=MODEL))
        calls[f"async, {shape}: by hand"] = by_hand
        calls[f"async, {shape}: decorated"] = lambda d=decorated: drain(
            d("Hi", user_id=USER, model=MODEL)
        )
        managers |= {f"async, {shape}: by hand": hand, f"async, {shape}: decorated": meter}
    ops = {name: sizes.stream_ops if "stream" in name else sizes.call_ops for name in calls}
    rounds = await ainterleave(calls, ops=ops, repeats=sizes.repeats)
    for name, manager in managers.items():
        expect(await manager.balance(USER), rounds[name].calls, COST, name)
    return rounds


def run(*, quick: bool, workdir: Path) -> Section:
    """Every table of the section, and its targets."""
    del workdir  # everything is in memory
    sizes = QUICK if quick else FULL
    charged, priced = charges(sizes), pricing(sizes)
    sync, managers = sync_rounds(sizes)
    for name, manager in managers.items():
        expect(manager.balance(USER), sync[name].calls, COST, name)
    asynchronous = asyncio.run(async_rounds(sizes))
    section = Section(TITLE)
    section.text(
        f"""Packages: {versions(["openai", "pydantic", "pyrate-limiter"])}. Each table is one
        interleaved run of {sizes.repeats} rounds, GC on; µs/op is the median over the
        batches, CPU µs/op the same in `time.thread_time_ns` (which waiting for a CPU does not
        inflate); "adds X µs" is the median over the rounds of the difference between two
        rows' batches. The usage priced, `{USAGE!r}` of `{MODEL}`, costs {COST.normalize():f}
        credits; balances are checked afterwards: every call charged once, at that price."""
    )
    section.lines += ["### A charge", ""]
    section.series_table(charged)
    section.lines += ["### Pricing", ""]
    section.text(
        """`Pricing.librechat().cost(model, usage)`; a fresh name misses the key cache and
        scans the table for the longest key it contains (else the legacy rules)."""
    )
    section.series_table(priced)
    section.lines += ["### The `metered` decorator, and a stream", ""]
    section.text(
        f"""A no-op `ask(prompt, *, user_id, model)` returning a prebuilt openai
        `ChatCompletion`, the same as a dict, or {len(CHUNKS)} `ChatCompletionChunk`s (the
        last carrying usage). *By hand*: `require`, `ask`, `charge(usage=...)` from
        `TokenUsage.from_response` or a `StreamUsage`. *Decorated*: `@manager.metered(...)`.
        Async: every batch awaited in one event loop."""
    )
    section.series_table(sync)
    section.series_table(asynchronous)
    names = list(charged.series)
    median = charged[names[1]].median
    section.check(
        f"Issue 2: MemoryStore charge ≤ {CHARGE_US:g} µs median",
        median <= CHARGE_US,
        f"{fmt(median, 2)} µs (GC on; {charged.ratio(names[1], names[0]):.1f}x its floor)",
    )
    name = f"Issue 3: pricing adds ≤ {PRICING_US:g} µs per charge (MemoryStore)"
    section.difference(name, charged, names[3], names[1], at_most=PRICING_US)
    for rounds in (sync, asynchronous):
        for shape in ("ChatCompletion", "dict"):
            mode = next(iter(rounds.series)).split(",")[0]
            section.difference(
                f"Issue 4: the decorator adds ≤ {DECORATOR_US:g} µs per call over the manager "
                f"calls it makes ({mode}, {shape})",
                rounds,
                f"{mode}, {shape}: decorated",
                f"{mode}, {shape}: by hand",
                at_most=DECORATOR_US,
            )
    return section
