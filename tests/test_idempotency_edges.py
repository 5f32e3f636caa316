"""Request ids at their edges: a hold asked for again after a release, and the longest ids.

A request held, released and then retried (a model call that failed once and
is tried again under the same request id) must hold again and be charged
exactly once: the retried hold is a new hold (its own id, found again by a
retry of it), its settle charges, and a retry after that settle replays the
settle's entry. Tried directly (hold / release / hold / settle, five
releases in a row, a late settle of the released hold) and through
``meter.metered(request_id=..., estimate=...)`` with a call that fails once.

Request ids of 1, 252, 253 and 256 characters (the longest accepted) work
end to end: hold, settle, release, a retried hold, a charge and its replay.
Ids of 257 characters, and "" (empty), are refused with InvalidInput and
nothing is written.

Sync and async, on MemoryStore, SQLite, Redis and PostgreSQL (the long ids of
252 and 256 characters only, there). Before the fix
the hold after a release reused the released hold's id, so its settle raised
InvalidInput ("was released") and the decorator's retried call was never
charged, its hold left open; ids of 253 to 256 characters made hold ids of
more than 256 characters, so their settle and release raised InvalidInput.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from test_reentrancy import KINDS, in_loop, open_async_store, open_store

from creditmeter import (
    AsyncBalanceManager,
    BalanceConfig,
    BalanceManager,
    EntryKind,
    InvalidInput,
    TokenUsage,
)

CONFIG = BalanceConfig(enabled=True, start_balance=10**6)
START = Decimal(10**6)
USAGE = TokenUsage(input=100, output=10)


def kinds(entries: list[Any]) -> list[EntryKind]:
    return [entry.kind for entry in entries]


def consistent(ledger: list[Any], balance: Decimal) -> None:
    assert sum(entry.amount for entry in ledger) == balance
    assert ledger[-1].balance_after == balance


# --- a hold asked for again after a release ------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_hold_released_then_held_again_is_charged_once(kind, tmp_path):
    with open_store(kind, tmp_path) as store:
        meter = BalanceManager(store, CONFIG)
        first = meter.hold("u", 100, request_id="r")
        released = meter.release(first)
        second = meter.hold("u", 100, request_id="r")
        assert second.id != first.id
        assert second.request_id == "r"
        assert meter.hold("u", 100, request_id="r") == second  # a retry finds it again
        assert meter.account("u").available == START - 100
        entry = meter.settle(second, 80)
        assert entry.kind is EntryKind.CHARGE
        assert entry.amount == -80
        assert meter.settle(second, 80) == entry  # settled once
        # A third try after the settle: it holds, and its settle replays the first charge.
        third = meter.hold("u", 100, request_id="r")
        assert third.id == second.id
        assert meter.settle(third, 80) == entry
        assert meter.account("u").holds == ()
        # The released hold stays released.
        assert meter.release(first) == released
        with pytest.raises(InvalidInput, match="released"):
            meter.settle(first, 5)
        assert meter.balance("u") == START - 80
        ledger = meter.ledger("u")
        assert kinds(ledger) == [EntryKind.OPEN, EntryKind.RELEASE, EntryKind.CHARGE]
        consistent(ledger, START - 80)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_many_releases_then_a_settle(kind, tmp_path):
    with open_store(kind, tmp_path) as store:
        meter = BalanceManager(store, CONFIG)
        ids = []
        for _ in range(6):
            held = meter.hold("u", 100, request_id="r")
            ids.append(held.id)
            meter.release(held)
        assert len(set(ids)) == 6
        last = meter.hold("u", 100, request_id="r")
        assert last.id not in ids
        entry = meter.settle(last, 70)
        again = meter.hold("u", 100, request_id="r")
        assert meter.settle(again, 70) == entry
        assert meter.balance("u") == START - 70
        assert meter.account("u").holds == ()
        assert kinds(meter.ledger("u")) == [EntryKind.OPEN] + [EntryKind.RELEASE] * 6 + [
            EntryKind.CHARGE
        ]


@pytest.mark.parametrize("kind", KINDS)
def test_async_hold_released_then_held_again_is_charged_once(kind, tmp_path):
    async def main() -> None:
        async with open_async_store(kind, tmp_path) as store:
            meter = AsyncBalanceManager(store, CONFIG)
            first = await meter.hold("u", 100, request_id="r")
            await meter.release(first)
            second = await meter.hold("u", 100, request_id="r")
            assert second.id != first.id
            assert await meter.hold("u", 100, request_id="r") == second
            entry = await meter.settle(second, 80)
            third = await meter.hold("u", 100, request_id="r")
            assert await meter.settle(third, 80) == entry
            assert (await meter.account("u")).holds == ()
            assert await meter.balance("u") == START - 80
            ledger = await meter.ledger("u")
            assert kinds(ledger) == [EntryKind.OPEN, EntryKind.RELEASE, EntryKind.CHARGE]
            consistent(ledger, START - 80)

    in_loop(main)


# --- through the decorator -------------------------------------------------------------


class Flaky(Exception):
    """The model call's first attempt failed."""


@pytest.mark.parametrize("kind", KINDS)
def test_metered_call_retried_after_a_failure_is_charged_once(kind, tmp_path):
    with open_store(kind, tmp_path) as store:
        meter = BalanceManager(store, CONFIG)
        attempts = []

        @meter.metered(
            user="user",
            model=lambda *a, **k: "gpt-4o",
            estimate=lambda *a, **k: 100,
            usage=lambda result: result,
            request_id="request_id",
        )
        def call(user: str, request_id: str) -> TokenUsage:
            attempts.append(request_id)
            if len(attempts) == 1:
                raise Flaky
            return USAGE

        with pytest.raises(Flaky):
            call("u", request_id="req-1")
        assert call("u", request_id="req-1") == USAGE
        assert call("u", request_id="req-1") == USAGE  # a retry after success: no new charge
        charges = [e for e in meter.ledger("u") if e.kind is EntryKind.CHARGE]
        assert len(charges) == 1
        assert charges[0].usage == USAGE
        assert meter.account("u").holds == ()
        consistent(meter.ledger("u"), meter.balance("u"))
        assert meter.balance("u") == START - charges[0].cost


@pytest.mark.parametrize("kind", KINDS)
def test_async_metered_call_retried_after_a_failure_is_charged_once(kind, tmp_path):
    async def main() -> None:
        async with open_async_store(kind, tmp_path) as store:
            meter = AsyncBalanceManager(store, CONFIG)
            attempts = []

            @meter.metered(
                user="user",
                model=lambda *a, **k: "gpt-4o",
                estimate=lambda *a, **k: 100,
                usage=lambda result: result,
                request_id="request_id",
            )
            async def call(user: str, request_id: str) -> TokenUsage:
                attempts.append(request_id)
                if len(attempts) == 1:
                    raise Flaky
                return USAGE

            with pytest.raises(Flaky):
                await call("u", request_id="req-1")
            assert await call("u", request_id="req-1") == USAGE
            assert await call("u", request_id="req-1") == USAGE
            ledger = await meter.ledger("u")
            assert len([e for e in ledger if e.kind is EntryKind.CHARGE]) == 1
            assert (await meter.account("u")).holds == ()
            consistent(ledger, await meter.balance("u"))

    in_loop(main)


# --- the longest request ids ---------------------------------------------------------

LENGTHS = [1, 252, 253, 256]


def long_id(length: int, fill: str = "r") -> str:
    return (fill * length)[:length]


@pytest.mark.parametrize(
    ("kind", "length"),
    [(kind, length) for kind in ("memory", "sqlite") for length in LENGTHS]
    + [(kind, length) for kind in ("redis", "postgres") for length in (252, 256)],
)
def test_accepted_request_ids_work_end_to_end(kind, length, tmp_path):
    with open_store(kind, tmp_path) as store:
        meter = BalanceManager(store, CONFIG)
        request = long_id(length)
        held = meter.hold("u", 100, request_id=request)
        assert held.request_id == request
        assert len(held.id) <= 251  # "hold:" + id fits the 256 characters of any request id
        entry = meter.settle(held, 60)
        assert meter.settle(meter.hold("u", 100, request_id=request), 60) == entry
        other = long_id(length, "é")  # a second id of the same length, not ASCII
        first = meter.hold("u", 100, request_id=other)
        meter.release(first)
        second = meter.hold("u", 100, request_id=other)
        assert second.id != first.id
        assert meter.settle(second, 40).amount == -40
        charged = meter.charge("u", 5, request_id=long_id(length, "c"))
        assert meter.charge("u", 5, request_id=long_id(length, "c")) == charged
        assert meter.account("u").holds == ()
        assert meter.balance("u") == START - 105
        consistent(meter.ledger("u"), START - 105)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
@pytest.mark.parametrize("length", LENGTHS)
def test_async_accepted_request_ids_work_end_to_end(kind, length, tmp_path):
    async def main() -> None:
        async with open_async_store(kind, tmp_path) as store:
            meter = AsyncBalanceManager(store, CONFIG)
            request = long_id(length)
            held = await meter.hold("u", 100, request_id=request)
            entry = await meter.settle(held, 60)
            assert await meter.settle(await meter.hold("u", 100, request_id=request), 60) == entry
            first = await meter.hold("u", 100, request_id=long_id(length, "x"))
            await meter.release(first)
            assert (await meter.account("u")).holds == ()
            assert await meter.balance("u") == START - 60

    in_loop(main)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
@pytest.mark.parametrize(
    "request_id", ["r" * 257, "é" * 257, ""], ids=["257", "257-accented", "empty"]
)
def test_refused_request_ids_write_nothing(kind, request_id, tmp_path):
    with open_store(kind, tmp_path) as store:
        meter = BalanceManager(store, CONFIG)
        meter.grant("u", 1)
        before = (store.load("u"), store.ledger("u"))
        calls = [
            lambda: meter.hold("u", 100, request_id=request_id),
            lambda: meter.charge("u", 1, request_id=request_id),
            lambda: meter.grant("u", 1, request_id=request_id),
            lambda: meter.set_balance("u", 1, request_id=request_id),
        ]
        for call in calls:
            with pytest.raises(InvalidInput, match="request_id"):
                call()
        assert (store.load("u"), store.ledger("u")) == before
