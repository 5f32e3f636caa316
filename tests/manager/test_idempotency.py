"""Request ids at their edges, on every backend: a hold asked for again after a release,
and the longest ids.

A request held, released and then retried (a model call that failed once and
is tried again under the same request id) must hold again and be charged
exactly once: the retried hold is a new hold (its own id, found again by a
retry of it), its settle charges, and a retry after that settle replays the
settle's entry. Tried directly (hold / release / hold / settle, six
releases in a row, a late settle of the released hold) and through
``meter.metered(request_id=..., estimate=...)`` with a call that fails once.

Request ids of 1, 252, 253 and 256 characters (the longest accepted), ASCII
and not, work end to end: hold, settle, release, a retried hold, a charge and
its replay. Ids of 257 characters, and "" (empty), are refused with
InvalidInput and nothing is written. Before the fix the hold after a release
reused the released hold's id, so its settle raised InvalidInput ("was
released") and the decorator's retried call was never charged, its hold left
open; ids of 253 to 256 characters made hold ids of more than 256
characters, so their settle and release raised InvalidInput.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from creditmeter import BalanceConfig, EntryKind, InvalidInput, TokenUsage

CONFIG = BalanceConfig(enabled=True, start_balance=10**6)
START = Decimal(10**6)
USAGE = TokenUsage(input=100, output=10)


def kinds(entries: list[Any]) -> list[EntryKind]:
    return [entry.kind for entry in entries]


def consistent(ledger: list[Any], balance: Decimal) -> None:
    assert sum(entry.amount for entry in ledger) == balance
    assert ledger[-1].balance_after == balance


@pytest.fixture
def meter(backend):
    return backend.manager(CONFIG)


# --- a hold asked for again after a release ------------------------------------------


def test_hold_released_then_held_again_is_charged_once(meter):
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


def test_many_releases_then_a_settle(meter):
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


# --- through the decorator -------------------------------------------------------------


class Flaky(Exception):
    """The model call's first attempt failed."""


def test_metered_call_retried_after_a_failure_is_charged_once(meter):
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


# --- the longest request ids ---------------------------------------------------------

LENGTHS = [1, 252, 253, 256]


def long_id(length: int, fill: str = "r") -> str:
    return (fill * length)[:length]


def test_accepted_request_ids_work_end_to_end(meter):
    for length in LENGTHS:
        user = f"u{length}"
        request = long_id(length)
        held = meter.hold(user, 100, request_id=request)
        assert held.request_id == request
        assert len(held.id) <= 251  # "hold:" + id fits the 256 characters of any request id
        entry = meter.settle(held, 60)
        assert meter.settle(meter.hold(user, 100, request_id=request), 60) == entry
        other = long_id(length, "é")  # a second id of the same length, not ASCII
        first = meter.hold(user, 100, request_id=other)
        meter.release(first)
        second = meter.hold(user, 100, request_id=other)
        assert second.id != first.id
        assert meter.settle(second, 40).amount == -40
        charged = meter.charge(user, 5, request_id=long_id(length, "c"))
        assert meter.charge(user, 5, request_id=long_id(length, "c")) == charged
        assert meter.account(user).holds == ()
        assert meter.balance(user) == START - 105
        consistent(meter.ledger(user), START - 105)
    assert len(meter.users()) == len(LENGTHS)


def test_refused_request_ids_write_nothing(meter):
    meter.grant("u", 1)
    before = (meter.store.load("u"), meter.store.ledger("u"))
    for request_id in ["r" * 257, "é" * 257, ""]:
        calls = [
            lambda: meter.hold("u", 100, request_id=request_id),  # noqa: B023 - called at once
            lambda: meter.charge("u", 1, request_id=request_id),  # noqa: B023
            lambda: meter.grant("u", 1, request_id=request_id),  # noqa: B023
            lambda: meter.set_balance("u", 1, request_id=request_id),  # noqa: B023
        ]
        for call in calls:
            with pytest.raises(InvalidInput, match="request_id"):
                call()
    assert (meter.store.load("u"), meter.store.ledger("u")) == before
