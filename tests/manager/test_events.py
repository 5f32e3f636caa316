"""on_event: typed events after commits and refusals, on every backend.

Inputs tried: charges, grants, refills, holds settled and refused, a balance
falling through the low-balance threshold twice (and one that stays below),
a callback that raises, conflicts between two managers on one place; and
bad event options. Callbacks that call the manager back: test_reentrancy.py.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from decimal import Decimal

import pytest

from creditmeter import (
    BalanceConfig,
    BalanceManager,
    Charged,
    ConflictRetried,
    Denied,
    Granted,
    InsufficientBalance,
    InvalidInput,
    LowBalance,
    Refilled,
)

LOUD = BalanceConfig(
    enabled=True,
    start_balance=1000,
    auto_refill_enabled=True,
    refill_interval_value=1,
    refill_interval_unit="days",
    refill_amount=500,
)


@pytest.fixture
def heard():
    return []


@pytest.fixture
def loud(backend, clock, heard):
    return backend.manager(LOUD, clock=clock, on_event=heard.append, low_balance_threshold=100)


def test_events_follow_commits(loud, heard, clock):
    grant = loud.grant("u", 5)
    charge = loud.charge("u", 10)
    assert heard == [
        Granted(user_id="u", entry=grant, duration=heard[0].duration),
        Charged(user_id="u", entry=charge, duration=heard[1].duration),
    ]
    assert all(event.duration >= 0 for event in heard)
    loud.set_balance("u", 0)
    clock.advance(timedelta(days=1))
    refill = loud.maybe_refill("u")
    assert isinstance(heard[-1], Refilled)
    assert heard[-1].entry == refill


def test_low_balance_fires_once_per_crossing(loud, heard):
    loud.charge("u", 850)  # 1000 -> 150: still above
    loud.charge("u", 60)  # 150 -> 90: crossed
    loud.charge("u", 10)  # stays below: no new event
    loud.grant("u", 500)  # back above
    loud.charge("u", 500)  # crossed again
    lows = [event for event in heard if isinstance(event, LowBalance)]
    assert lows == [
        LowBalance(user_id="u", balance=Decimal(90), threshold=Decimal(100)),
        LowBalance(user_id="u", balance=Decimal(80), threshold=Decimal(100)),
    ]


def test_denials_are_events(loud, heard):
    with pytest.raises(InsufficientBalance):
        loud.require("u", 5000)
    with pytest.raises(InsufficientBalance):
        loud.charge("u", 5000, strict=True)
    with pytest.raises(InsufficientBalance):
        loud.hold("u", 5000)
    denied = [event for event in heard if isinstance(event, Denied)]
    assert len(denied) == 3
    assert {event.cost for event in denied} == {Decimal(5000)}
    assert all(event.available == 1000 for event in denied)


def test_a_settled_hold_is_one_charge_event(loud, heard):
    held = loud.hold("u", 10)
    loud.settle(held, 7)
    with pytest.raises(InsufficientBalance):
        loud.require("u", 10**6)
    assert [type(event) for event in heard] == [Charged, Denied]
    assert heard[0].entry.amount == -7


def test_a_failing_callback_is_logged_and_never_breaks_a_charge(backend, caplog):
    def explode(event):
        raise RuntimeError("dashboard down")

    meter = backend.manager(BalanceConfig(enabled=True), on_event=explode)
    with caplog.at_level(logging.ERROR, logger="creditmeter"):
        entry = meter.charge("u", 1)
    assert entry.amount == -1
    assert "on_event callback failed" in caplog.text
    assert meter.balance("u") == 19999


def test_conflicts_are_events(backend):
    heard = []
    first = backend.manager(on_event=heard.append)
    second = backend.manager()
    first.charge("u", 1)
    second.charge("u", 1)
    first.charge("u", 1)  # from a stale account: loses once, then retries
    assert ConflictRetried(user_id="u") in heard
    assert first.balance("u") == 20000 - 3


def test_bad_event_options(store):
    with pytest.raises(InvalidInput):
        BalanceManager(store, on_event="print")
    with pytest.raises(InvalidInput):
        BalanceManager(store, low_balance_threshold=-1)
