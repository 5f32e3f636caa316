"""Metered streams that are never finished: dropped (finalised by ``__del__``) or cancelled.

A dropped stream is charged from its finaliser. The garbage collector can run
that finaliser in any thread at any allocation, including in a thread that
holds a lock the charge needs (the manager's user lock, the memory store's
lock): the charge must then never be taken synchronously (it would deadlock)
and must still land, exactly once. Tried here: the last reference dropped
inside the user lock, a reference cycle collected inside the user lock and
inside the memory store's lock, many streams dropped at once, and a dropped
stream in a forked child. Async streams: the consumer cancelled while
awaiting the next chunk, by asyncio (edge-triggered) and by anyio
(level-triggered: every later await in the scope is cancelled too).
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
from decimal import Decimal

import anyio
import pytest

from creditmeter import (
    AsyncBalanceManager,
    AsyncSQLiteStore,
    BalanceConfig,
    BalanceManager,
    EntryKind,
    MemoryStore,
    Pricing,
    SQLiteStore,
    TokenUsage,
    metering,
)
from creditmeter.metering import _finalizer  # where the finaliser reads FINALIZER_WAIT

START = 10**6
MODEL = "gpt-4o"
ESTIMATE = 10
PRICING = Pricing.librechat()
TIMEOUT = 10.0  # seconds; reached only when something hangs


def chunk(text):
    return {"choices": [{"delta": {"content": text}}]}


def charges(entries):
    return [e for e in entries if e.kind is EntryKind.CHARGE]


def settled_cost(output: int) -> Decimal:
    usage = TokenUsage(input=ESTIMATE, output=output)
    return PRICING.cost(MODEL, usage, incomplete=True).total


@pytest.fixture
def meter(monkeypatch):
    # A finaliser blocked by a lock waits this long for its charge, then lets it land later.
    monkeypatch.setattr(_finalizer, "FINALIZER_WAIT", 0.2)
    with BalanceManager(MemoryStore(), BalanceConfig(enabled=True, start_balance=START)) as m:
        yield m


def started_stream(meter, user="alice"):
    """A metered stream of three chunks, of which one has been read."""

    @meter.metered(user="user_id", model="model", estimate=lambda *a, **k: ESTIMATE)
    def stream(user_id, model):
        yield chunk("x")
        yield chunk("y")
        yield chunk("z")

    chunks = stream(user, MODEL)
    next(chunks)
    return chunks


def in_thread(target) -> threading.Thread:
    """Run ``target`` in a daemon thread and wait for it (a deadlock leaves it alive)."""
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(TIMEOUT)
    return thread


def assert_charged_once(meter, user="alice", output=1):
    assert metering._flush_finalizers(TIMEOUT), "the finaliser thread did not catch up"
    [entry] = charges(meter.ledger(user))
    assert entry.usage == TokenUsage(input=ESTIMATE, output=output)
    assert entry.cost == settled_cost(output)
    account = meter.account(user)
    assert account.holds == ()
    assert account.balance == START - entry.cost


@pytest.mark.parametrize("how", ["refcount", "cycle"])
def test_a_stream_dropped_inside_the_user_lock_never_deadlocks_and_is_charged_once(meter, how):
    # Before the fix: the finaliser charged synchronously and waited forever for the
    # lock its own thread held (the thread was still alive after 10 s).
    holder = [started_stream(meter)]
    if how == "cycle":
        holder[0].itself = holder[0]  # only the garbage collector can free it now

    def drop():
        stream = holder.pop()
        with meter._lock("alice"):
            del stream
            gc.collect()

    assert not in_thread(drop).is_alive(), "the finaliser deadlocked on the user lock"
    assert_charged_once(meter)


def test_a_stream_collected_inside_the_memory_store_lock_never_deadlocks(meter):
    holder = [started_stream(meter)]
    holder[0].itself = holder[0]

    def drop():
        holder.clear()
        with meter.store._lock:
            gc.collect()

    assert not in_thread(drop).is_alive(), "the finaliser deadlocked on the store lock"
    assert_charged_once(meter)


def test_a_stream_dropped_outside_any_lock_is_charged_before_del_returns(meter, monkeypatch):
    monkeypatch.setattr(_finalizer, "FINALIZER_WAIT", TIMEOUT)  # a bound, not a pause
    stream = started_stream(meter)
    del stream
    # No flush: with nothing in the way, the finaliser waits for its charge.
    [entry] = charges(meter.ledger("alice"))
    assert entry.cost == settled_cost(1)


def test_many_streams_dropped_inside_a_lock_are_each_charged_once(meter):
    # 60 users whose charges all need the held lock. A finaliser waits for its charge
    # only while the finaliser thread is not held up already: one wait of 0.2 s in
    # all, not 60 of them (12 s, past the 10 s bound), before the lock is let go.
    stripe = meter._lock("alice")
    users = [u for u in (f"user-{n}" for n in range(100_000)) if meter._lock(u) is stripe][:60]
    holder = [started_stream(meter, user) for user in users]

    def drop():
        with stripe:
            holder.clear()
            gc.collect()

    assert not in_thread(drop).is_alive()
    assert metering._flush_finalizers(TIMEOUT)
    for user in users:
        assert len(charges(meter.ledger(user))) == 1, user


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_charges_its_dropped_streams_itself(tmp_path, monkeypatch):
    monkeypatch.setattr(_finalizer, "FINALIZER_WAIT", 0.2)
    path = tmp_path / "credits.db"
    config = BalanceConfig(enabled=True, start_balance=START)
    with BalanceManager(SQLiteStore(path), config) as meter:
        started_stream(meter, "parent")  # starts the finaliser thread in the parent
        assert metering._flush_finalizers(TIMEOUT)
        pid = os.fork()
        if pid == 0:  # the child: its own finaliser thread, its own queue
            code = 1
            try:
                with BalanceManager(SQLiteStore(path), config) as child:
                    holder = [started_stream(child, "child")]

                    def drop():
                        stream = holder.pop()
                        with child._lock("child"):
                            del stream

                    thread = threading.Thread(target=drop, daemon=True)
                    thread.start()
                    thread.join(TIMEOUT)
                    if not thread.is_alive() and metering._flush_finalizers(TIMEOUT):
                        code = 0
            finally:
                os._exit(code)
        deadline = TIMEOUT * 3
        waited, status = 0.0, None
        while waited < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            threading.Event().wait(0.05)  # a poll interval, bounded by the deadline
            waited += 0.05
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        assert os.waitstatus_to_exitcode(status) == 0
        assert len(charges(meter.ledger("child"))) == 1
        assert len(charges(meter.ledger("parent"))) == 1


# --- async streams cancelled mid-stream ------------------------------------------------


def async_meter(tmp_path):
    # An SQLite store, whose every call really awaits (a worker thread): a cancellation
    # can then land in the middle of a charge.
    return AsyncBalanceManager(
        AsyncSQLiteStore(tmp_path / "credits.db"),
        BalanceConfig(enabled=True, start_balance=START),
    )


def gated_stream(meter, gate: asyncio.Event, kind: str):
    """A metered async stream that sends two chunks, then waits on ``gate``."""

    async def produce():
        yield chunk("x")
        yield chunk("y")
        await gate.wait()
        yield chunk("z")

    if kind == "async generator":

        @meter.metered(user="user_id", model="model", estimate=lambda *a, **k: ESTIMATE)
        async def stream(user_id, model):
            async for item in produce():
                yield item

        return stream("alice", MODEL)

    @meter.metered(user="user_id", model="model", estimate=lambda *a, **k: ESTIMATE)
    async def ask(user_id, model):
        return produce()

    return ask("alice", MODEL)


async def assert_async_charged_once(meter, output=2):
    await asyncio.wait_for(
        asyncio.gather(*list(metering._PENDING), return_exceptions=True), TIMEOUT
    )
    [entry] = charges(await meter.ledger("alice"))
    assert entry.usage == TokenUsage(input=ESTIMATE, output=output)
    assert entry.cost == settled_cost(output)
    account = await meter.account("alice")
    assert account.holds == ()
    assert account.balance == START - entry.cost


@pytest.mark.parametrize("kind", ["async generator", "coroutine returning a stream"])
def test_an_async_consumer_cancelled_mid_stream_is_charged_once(tmp_path, kind):
    async def main():
        async with async_meter(tmp_path) as meter:
            gate = asyncio.Event()
            got = []
            reading = asyncio.Event()

            async def consume():
                stream = gated_stream(meter, gate, kind)
                if kind != "async generator":
                    stream = await stream
                async for item in stream:
                    got.append(item)
                    if len(got) == 2:
                        reading.set()

            task = asyncio.create_task(consume())
            await asyncio.wait_for(reading.wait(), TIMEOUT)
            await asyncio.sleep(0)  # the consumer is now awaiting the third chunk
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, TIMEOUT)
            await assert_async_charged_once(meter)

    asyncio.run(main())


@pytest.mark.parametrize("kind", ["async generator", "coroutine returning a stream"])
def test_an_anyio_scope_cancelled_mid_stream_is_charged_once(tmp_path, kind):
    # anyio cancels every await inside a cancelled scope, the charge's own awaits too.
    # Before the fix: no charge and the hold left open (found [] charges).
    async def main():
        async with async_meter(tmp_path) as meter:
            gate = asyncio.Event()
            got = []

            async def consume(scope_ready):
                with anyio.CancelScope() as scope:
                    scope_ready.append(scope)
                    stream = gated_stream(meter, gate, kind)
                    if kind != "async generator":
                        stream = await stream
                    async for item in stream:
                        got.append(item)
                        if len(got) == 2:
                            scope.cancel()

            await asyncio.wait_for(consume([]), TIMEOUT)
            assert len(got) == 2
            await assert_async_charged_once(meter)

    asyncio.run(main())
