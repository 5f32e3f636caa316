"""Holds: credits set aside before a call and settled after, so parallel calls cannot overspend.

Inputs tried: settle twice, release twice, release after settle, settle after
release, settle after expiry, a hold left by a crashed process, reserve()
blocks that settle, raise or do nothing, bad hold arguments, and thousands
of parallel holds on threads and tasks (on every backend; across
processes in test_processes.py), and a decorator whose parallel calls hold
their estimates.
"""

from __future__ import annotations

import asyncio
import os
import threading
from datetime import timedelta
from decimal import Decimal

import pytest
from backends import in_threads

from creditmeter import (
    AsyncBalanceManager,
    AsyncMemoryStore,
    BalanceConfig,
    BalanceManager,
    EntryKind,
    Hold,
    IdempotencyConflict,
    InsufficientBalance,
    InvalidInput,
    MemoryStore,
    Pricing,
    TokenUsage,
)


def kinds(meter, user="u"):
    return [e.kind for e in meter.ledger(user)]


def test_a_hold_sets_credits_aside_and_writes_no_entry(meter):
    held = meter.hold("u", 15000)
    assert isinstance(held, Hold)
    account = meter.account("u")
    assert account.balance == 20000
    assert account.available == 5000
    assert account.holds == (held,)
    assert kinds(meter) == [EntryKind.OPEN]
    with pytest.raises(InsufficientBalance) as refused:
        meter.hold("u", 5001)
    assert refused.value.available == 5000
    assert not meter.check("u", 5001).allowed


def test_settle_charges_the_actual_cost_once(meter):
    held = meter.hold("u", 1000)
    entry = meter.settle(held, 700)
    assert entry.kind is EntryKind.CHARGE
    assert entry.amount == -700
    assert entry.request_id == f"hold:{held.id}"
    assert meter.account("u").holds == ()
    assert meter.settle(held, 700) == entry  # a second settle: the first entry
    assert meter.settle(held, 999) == entry  # whatever it asks
    assert meter.release(held) == entry  # a release after a settle: a no-op
    assert meter.balance("u") == 20000 - 700
    assert kinds(meter) == [EntryKind.OPEN, EntryKind.CHARGE]


def test_settle_may_cost_more_than_was_held_and_clamps_like_a_charge(meter):
    held = meter.hold("u", 10)
    assert meter.settle(held, 30000).amount == -20000
    assert meter.balance("u") == 0


def test_release_charges_nothing_and_blocks_a_later_settle(meter):
    held = meter.hold("u", 1000)
    entry = meter.release(held)
    assert entry.kind is EntryKind.RELEASE
    assert entry.amount == 0
    assert meter.release(held) == entry  # a second release: a no-op
    with pytest.raises(InvalidInput, match="released"):
        meter.settle(held, 5)
    assert meter.balance("u") == 20000
    assert kinds(meter) == [EntryKind.OPEN, EntryKind.RELEASE]


def test_an_expired_hold_stops_counting_and_is_still_charged_once(meter, clock):
    held = meter.hold("u", 20000, ttl=timedelta(minutes=1))
    assert meter.account("u").available == 0
    clock.advance(timedelta(minutes=1))
    assert meter.account("u").available == 20000  # expired: no longer counted
    assert meter.check("u", 20000).allowed
    meter.grant("u", 1)  # the next write drops it from the record
    assert meter.store.load("u").holds == ()
    entry = meter.settle(held, 500)  # the work was done: charged
    assert entry.amount == -500
    assert meter.settle(held, 500) == entry
    assert meter.balance("u") == 20001 - 500


def test_a_crash_between_hold_and_settle_charges_nothing(backend, clock):
    crashed = backend.manager(clock=clock)
    crashed.hold("u", 5000, ttl=timedelta(minutes=10))  # ... and the process dies here
    survivor = backend.manager(clock=clock)
    assert survivor.account("u").available == 15000
    clock.advance(timedelta(minutes=10))
    assert survivor.account("u").available == 20000
    assert survivor.balance("u") == 20000
    assert kinds(survivor) == [EntryKind.OPEN]


def test_a_hold_priced_from_usage(meter):
    usage = TokenUsage(input=1000, output=500)
    held = meter.hold("u", model="gpt-4o", usage=usage)
    assert held.amount == 1000 * Decimal("2.5") + 500 * 10
    entry = meter.settle(held, model="gpt-4o", usage=TokenUsage(input=1000, output=100))
    assert entry.cost == 1000 * Decimal("2.5") + 100 * 10
    assert entry.usage == TokenUsage(input=1000, output=100)


def test_a_hold_with_a_request_id_is_taken_once(meter):
    first = meter.hold("u", 100, request_id="call-1")
    assert meter.hold("u", 100, request_id="call-1") == first
    assert meter.account("u").available == 20000 - 100
    with pytest.raises(IdempotencyConflict):
        meter.hold("u", 200, request_id="call-1")
    entry = meter.settle(first, 80)
    # A retried call takes the hold again and settles it again: charged once, nothing left held.
    again = meter.hold("u", 100, request_id="call-1")
    assert meter.settle(again, 80) == entry
    assert meter.account("u").holds == ()
    assert meter.balance("u") == 20000 - 80


BAD_HOLDS = [
    ({"amount": -1}, "zero or more"),
    ({"amount": 1, "ttl": timedelta(0)}, "ttl"),
    ({"amount": 1, "ttl": 60}, "ttl"),
    ({"amount": None}, "amount"),
    ({"amount": 1, "request_id": "hold:x"}, "reserved"),
]


def test_bad_hold_arguments(meter):
    # Tried: a negative amount, a zero ttl, a ttl that is not a timedelta, nothing to hold,
    # a request id in the namespace settles use.
    for kwargs, match in BAD_HOLDS:
        with pytest.raises(InvalidInput, match=match):
            meter.hold("u", **kwargs)
    assert meter.account("u").holds == ()


def test_a_ttl_that_runs_past_the_calendar_is_refused_and_writes_nothing(meter):
    """Tried: the longest timedelta, on a user with no account (the draft's way), on one
    with an account and no open hold, with an open hold (the fast path's way) and
    under a request id."""
    for setup in ("new", "plain", "held", "request"):
        user = f"ttl-{setup}"
        if setup != "new":
            meter.grant(user, 100)
        if setup == "held":
            meter.hold(user, 1)
        before = meter.store.load(user)
        request = "r" if setup == "request" else None
        with pytest.raises(InvalidInput, match="runs past the year 9999"):
            meter.hold(user, 1, ttl=timedelta.max, request_id=request)
        assert meter.store.load(user) == before


def test_settle_and_release_want_a_hold(meter):
    for call in (lambda: meter.settle("h1", 5), lambda: meter.release(None)):
        with pytest.raises(InvalidInput, match="Hold"):
            call()


def test_a_hold_is_checked_again_unless_it_is_the_very_one_handed_out(meter):
    """Tried: the hold hold() returned, settled twice; copies of it with a control
    character in the id, a naive expiry and a bad user id; a copy equal to it."""
    import attrs  # noqa: PLC0415

    hold = meter.hold("u", 100)
    for bad, match in (
        (attrs.evolve(hold, id="h\x00"), "control characters"),
        (attrs.evolve(hold, expires_at=hold.expires_at.replace(tzinfo=None)), "aware"),
        (attrs.evolve(hold, user_id=""), "user_id"),
    ):
        with pytest.raises(InvalidInput, match=match):
            meter.settle(bad, 5)
    assert meter.account("u").held == 100  # nothing written
    copy = attrs.evolve(hold)  # equal, but not the object handed out: checked, and fine
    first = meter.settle(copy, 5)
    assert meter.settle(hold, 5) == first  # the original: charged once all the same
    assert meter.settle(hold, 5) == first  # and again, now checked like any other
    assert meter.account("u").held == 0
    assert not meter._issued  # resolved: nothing kept


def test_the_holds_handed_out_are_remembered_within_a_bound(monkeypatch):
    import creditmeter._base as base  # noqa: PLC0415
    import creditmeter.aio as aio  # noqa: PLC0415
    import creditmeter.manager as manager  # noqa: PLC0415

    for module in (base, aio, manager):  # each reads it where the hot path inlines it
        monkeypatch.setattr(module, "SEEN_LIMIT", 8)
    meter = BalanceManager(MemoryStore(), BalanceConfig(enabled=True, start_balance=1000))
    holds = [meter.hold(f"u{n}", 1) for n in range(30)]  # left open: never popped
    assert len(meter._issued) <= 8
    for hold in holds:  # forgotten or not, each settles once
        assert meter.settle(hold, 1).amount == -1


def test_reserve_settles_or_releases(meter):
    with meter.reserve("u", 1000) as reservation:
        assert meter.account("u").available == 19000
        reservation.settle(400)
    with meter.reserve("u", 1000):
        pass  # settled nothing: released
    with pytest.raises(RuntimeError), meter.reserve("u", 1000):
        raise RuntimeError("the model call failed")
    assert meter.balance("u") == 19600
    assert meter.account("u").holds == ()
    assert kinds(meter) == [
        EntryKind.OPEN,
        EntryKind.CHARGE,
        EntryKind.RELEASE,
        EntryKind.RELEASE,
    ]


# --- oversubscription ----------------------------------------------------------

# 8,000 holds of 1 on a balance of 5,000 with CREDITMETER_LONG=1, as the holds issue
# measured; by default 400 on 250 per backend (and 800 on 500 across processes, in
# test_processes.py), enough for every thread to be refused many times.
LONG = os.environ.get("CREDITMETER_LONG") == "1"
BALANCE, ATTEMPTS = (5000, 8000) if LONG else (250, 400)
THREADS = 8


def test_parallel_holds_never_overspend(backend):
    """Threads hold and settle 1 credit at a time through two managers on one place.

    On an async backend each thread's calls are tasks of one event loop, so
    tasks hold at once; the two managers (two stores, except for memory) keep
    each other out only through the store.
    """
    config = BalanceConfig(enabled=True, start_balance=BALANCE)
    managers = [backend.manager(config), backend.manager(config)]
    managers[0].account("u")
    outcomes = []
    lock = threading.Lock()

    def work(number):
        meter = managers[number % 2]
        mine = []
        for _ in range(ATTEMPTS // THREADS):
            try:
                held = meter.hold("u", 1)
            except InsufficientBalance:
                mine.append("refused")
                continue
            meter.settle(held, 1)
            mine.append("ok")
        with lock:
            outcomes.extend(mine)

    in_threads(THREADS, work)
    assert (outcomes.count("ok"), outcomes.count("refused")) == (BALANCE, ATTEMPTS - BALANCE)
    store = managers[1].store
    account = store.load("u")
    entries = store.ledger("u")
    assert account.balance == 0
    assert account.holds == ()
    assert [e.kind for e in entries].count(EntryKind.CHARGE) == BALANCE
    running = Decimal(0)
    for entry in entries:
        running += entry.amount
        assert entry.balance_after == running
        assert running >= 0
    assert running == account.balance


def test_the_decorator_holds_its_estimate_so_parallel_calls_cannot_overspend():
    async def main():
        config = BalanceConfig(enabled=True, start_balance=1000)
        pricing = Pricing.librechat().with_rates({"house": {"prompt": 2.5, "completion": 2.5}})
        async with AsyncBalanceManager(AsyncMemoryStore(), config, pricing=pricing) as meter:
            running = []
            lowest = []

            # Each call really costs 50 credits: 10 prompt + 10 completion tokens at rate 2.5.
            @meter.metered(user="user_id", model="model", estimate=lambda **_: 10)
            async def ask(*, user_id, model="house", max_tokens=10):
                running.append(1)
                await asyncio.sleep(0.001)
                lowest.append((await meter.account(user_id)).available)
                return {"usage": {"prompt_tokens": 10, "completion_tokens": 10}}

            results = await asyncio.gather(
                *(ask(user_id="u") for _ in range(100)), return_exceptions=True
            )
            refused = [r for r in results if isinstance(r, InsufficientBalance)]
            assert len(running) <= 20
            assert len(running) + len(refused) == 100
            assert min(lowest) >= 0
            assert await meter.balance("u") == 1000 - 50 * len(running)
            assert await meter.balance("u") >= 0

    asyncio.run(main())
