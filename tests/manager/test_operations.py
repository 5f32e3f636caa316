"""LibreChat parity through the manager, on every backend: open, charge, grant, refill, replay.

Inputs tried: a user seen for the first time; refills before they are due,
when due and depleted, after a year missed, with the clock moved backwards,
through ``check``/``require`` and a strict charge, and per-user refill
settings set and reset; charges that clamp at zero, balances turned off,
request ids repeated with the same and other parameters (also strict, once
broke); a ledger read whole and by ``limit``; two managers on one place, one
of them stale; the largest exact balances and too many decimal places.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest

from creditmeter import (
    BalanceConfig,
    EntryKind,
    IdempotencyConflict,
    InsufficientBalance,
    InvalidInput,
    RefillSettings,
)

REFILL = BalanceConfig(
    enabled=True,
    auto_refill_enabled=True,
    refill_interval_value=1,
    refill_interval_unit="days",
    refill_amount=500,
)


@pytest.fixture
def refilling(backend, clock):
    return backend.manager(REFILL, clock=clock)


def kinds(entries):
    return [entry.kind for entry in entries]


def test_start_balance_on_first_sight(meter):
    assert meter.balance("new-user") == 20000
    assert kinds(meter.ledger("new-user")) == [EntryKind.OPEN]
    assert meter.balance("new-user") == 20000  # opened once only
    assert len(meter.ledger("new-user")) == 1
    assert meter.users() == ["new-user"]


def test_every_operation_in_one_ledger(refilling, clock):
    first = refilling.charge("u", 20000, request_id="r")
    assert refilling.charge("u", 20000, request_id="r") == first
    assert not refilling.check("u", 1).allowed
    with pytest.raises(InsufficientBalance):
        refilling.require("u")
    clock.advance(timedelta(days=1))
    assert refilling.maybe_refill("u").amount == 500
    refilling.grant("u", 5, reason="thanks")
    refilling.set_balance("u", 42)
    entries = refilling.ledger("u")
    assert kinds(entries) == [
        EntryKind.OPEN,
        EntryKind.CHARGE,
        EntryKind.REFILL,
        EntryKind.GRANT,
        EntryKind.ADJUST,
    ]
    assert entries[3].metadata == {"reason": "thanks"}
    assert kinds(refilling.ledger("u", limit=1)) == [EntryKind.ADJUST]
    assert kinds(refilling.ledger("u", limit=2)) == [EntryKind.GRANT, EntryKind.ADJUST]
    assert refilling.account("u").balance == 42
    assert refilling.users() == ["u"]


def test_refill_only_when_due_and_depleted(refilling, clock):
    refilling.set_balance("u", 0)
    assert refilling.maybe_refill("u") is None  # not due: opened now
    clock.advance(timedelta(days=1))
    entry = refilling.maybe_refill("u")
    assert entry is not None
    assert entry.kind is EntryKind.REFILL
    assert entry.amount == 500
    assert refilling.balance("u") == 500
    assert refilling.account("u").last_refill == clock()
    clock.advance(timedelta(days=1))
    assert refilling.maybe_refill("u") is None  # due, but not depleted
    assert refilling.maybe_refill("u", cost=500) is not None  # balance - cost <= 0


def test_one_refill_however_many_intervals_missed(refilling, clock):
    refilling.set_balance("u", 0)
    clock.advance(timedelta(days=365))
    assert refilling.maybe_refill("u").amount == 500
    assert refilling.maybe_refill("u", cost=10**6) is None
    assert refilling.balance("u") == 500


def test_clock_moving_backwards_never_refills_twice(refilling, clock):
    refilling.set_balance("u", 0)
    clock.advance(timedelta(days=2))
    refilling.charge("u", 0)
    assert refilling.maybe_refill("u") is not None
    refilled_at = refilling.account("u").last_refill
    refilling.set_balance("u", 0)
    clock.advance(timedelta(days=-30))
    assert refilling.maybe_refill("u") is None
    clock.advance(timedelta(days=30, hours=23))
    assert refilling.maybe_refill("u") is None  # still under a day since the refill
    assert refilling.account("u").last_refill == refilled_at


def test_check_applies_a_due_refill_and_allows_equal(refilling, clock):
    refilling.set_balance("u", 0)
    assert not refilling.check("u", 1).allowed
    clock.advance(timedelta(days=1))
    result = refilling.check("u", 500)
    assert result.allowed
    assert result.balance == 500
    with pytest.raises(InsufficientBalance) as caught:
        refilling.require("u", 501)
    assert caught.value.to_dict() == {"type": "token_balance", "balance": 500, "tokenCost": 501}


def test_strict_charge_refills_first_and_a_plain_one_does_not(refilling, clock):
    refilling.set_balance("u", 0)
    refilling.set_balance("v", 0)
    clock.advance(timedelta(days=1))
    entry = refilling.charge("u", 300, strict=True)
    assert entry.balance_after == 200
    assert kinds(refilling.ledger("u"))[-2:] == [EntryKind.REFILL, EntryKind.CHARGE]
    plain = refilling.charge("v", 300)
    assert plain.amount == 0
    assert plain.cost == 300
    assert refilling.balance("v") == 0


def test_configure_refill_overrides_and_resets(meter, clock):
    own = RefillSettings(enabled=True, interval_value=1, interval_unit="hours", amount=Decimal(7))
    account = meter.configure_refill("u", own)
    assert account.refill == own
    assert meter.account("u").refill == own  # as stored
    entry = meter.ledger("u")[-1]
    assert entry.kind is EntryKind.ADJUST
    assert entry.amount == 0
    assert entry.metadata == {"refill": "enabled, 7 every 1 hours"}
    meter.set_balance("u", 0)
    clock.advance(timedelta(hours=1))
    assert meter.maybe_refill("u").amount == 7  # the config has auto refill off
    assert meter.configure_refill("u", None).refill is None
    assert meter.ledger("u")[-1].metadata == {"refill": "follow the config"}
    clock.advance(timedelta(hours=1))
    assert meter.maybe_refill("u") is None
    assert sum(e.amount for e in meter.ledger("u")) == meter.balance("u")


def test_admin_writes_keep_their_reason_and_metadata(meter, clock):
    """set_balance, maybe_refill and configure_refill record who and why, as grant does."""
    who = {"actor": "admin", "via": "console"}
    meter.set_balance("u", 0, reason="reset for the trial", metadata=who)
    assert meter.ledger("u")[-1].metadata == {**who, "reason": "reset for the trial"}
    own = RefillSettings(enabled=True, interval_value=1, interval_unit="hours", amount=Decimal(7))
    meter.configure_refill("u", own, reason="trial plan", metadata={**who, "refill": "mine"})
    assert meter.ledger("u")[-1].metadata == {  # the settings' description wins its key
        **who,
        "reason": "trial plan",
        "refill": "enabled, 7 every 1 hours",
    }
    assert meter.maybe_refill("u", reason="early", metadata=who) is None  # not due: nothing
    clock.advance(timedelta(hours=1))
    entry = meter.maybe_refill("u", reason="monthly", metadata=who)
    assert entry.kind is EntryKind.REFILL
    assert entry.metadata == {**who, "reason": "monthly"}
    assert meter.ledger("u")[-1] == entry


def test_admin_writes_refuse_bad_reason_or_metadata_and_write_nothing(meter, clock):
    """Tried: a reason that is not text or over 1,000 characters; metadata not a dict."""
    meter.set_balance("u", 5)
    before = meter.ledger("u")
    clock.advance(timedelta(hours=1))
    own = RefillSettings(enabled=True, interval_value=1, interval_unit="hours", amount=Decimal(7))
    for bad in ({"reason": 5}, {"reason": "x" * 1001}, {"metadata": ["not", "a", "dict"]}):
        with pytest.raises(InvalidInput):
            meter.set_balance("u", 9, **bad)
        with pytest.raises(InvalidInput):
            meter.maybe_refill("u", **bad)
        with pytest.raises(InvalidInput):
            meter.configure_refill("u", own, **bad)
    assert meter.ledger("u") == before


def test_configure_refill_refuses_other_things(meter):
    with pytest.raises(InvalidInput):
        meter.configure_refill("u", {"enabled": True})
    assert meter.users() == []


def test_charge_clamps_at_zero(meter):
    entry = meter.charge("u", 25000)
    assert entry.amount == -20000
    assert entry.cost == 25000
    assert meter.balance("u") == 0


def test_disabled_balances_always_allow(backend, clock):
    meter = backend.manager(BalanceConfig(), clock=clock)
    assert meter.balance("u") == 0
    assert meter.check("u", 10**9).allowed
    meter.require("u")
    assert meter.charge("u", 10, strict=True).amount == 0


def test_idempotent_repeats_return_the_original(meter):
    first = meter.charge("u", 10, request_id="call-1")
    again = meter.charge("u", 10, request_id="call-1")
    assert again == first
    assert meter.balance("u") == 20000 - 10
    with pytest.raises(IdempotencyConflict):
        meter.charge("u", 11, request_id="call-1")
    assert meter.balance("u") == 20000 - 10


def test_strict_repeat_of_an_applied_request_returns_it_even_when_now_broke(meter):
    first = meter.charge("u", 20000, strict=True, request_id="all")
    assert meter.balance("u") == 0
    assert meter.charge("u", 20000, strict=True, request_id="all") == first


def test_ledger_sum_equals_balance_and_chains(meter, clock):
    meter.grant("u", 5, reason="welcome")
    meter.charge("u", Decimal("0.25"))
    clock.advance(timedelta(hours=1))
    meter.set_balance("u", 42)
    meter.charge("u", 100)
    entries = meter.ledger("u")
    assert sum(e.amount for e in entries) == meter.balance("u") == 0
    running = Decimal(0)
    for entry in entries:
        running += entry.amount
        assert entry.balance_after == running
    assert entries[1].metadata == {"reason": "welcome"}
    assert kinds(meter.ledger("u", limit=2)) == [EntryKind.ADJUST, EntryKind.CHARGE]


def test_a_second_manager_sees_the_first_ones_writes(backend, clock):
    first = backend.manager(clock=clock)
    second = backend.manager(clock=clock)
    first.charge("u", 1)  # `first` now remembers version 2
    second.charge("u", 1)
    second.grant("u", 10)
    first.charge("u", 1)  # starts from a stale account: must conflict and retry
    assert first.balance("u") == second.balance("u") == 20000 - 3 + 10
    assert len(first.ledger("u")) == 5


def test_strict_charge_from_a_stale_account_rechecks_the_store(backend, clock):
    first = backend.manager(clock=clock)
    second = backend.manager(clock=clock)
    first.set_balance("u", 0)  # `first` remembers a zero balance
    second.grant("u", 100)
    assert first.charge("u", 60, strict=True).balance_after == 40


def test_large_balances_with_many_decimals_stay_exact(meter):
    meter.set_balance("u", 10**15)
    entry = meter.charge("u", Decimal("0.0000000000001"))
    assert entry.balance_after == Decimal("999999999999999.9999999999999")
    assert meter.balance("u") == Decimal("999999999999999.9999999999999")
    assert sum(e.amount for e in meter.ledger("u")) == meter.balance("u")


def test_more_than_thirty_decimal_places_is_invalid(meter):
    meter.grant("u", Decimal("1e-30"))
    with pytest.raises(InvalidInput, match="30 decimal places"):
        meter.grant("u", Decimal("1e-31"))
    meter.grant("u", Decimal("2." + "0" * 40))  # trailing zeros are not places
    assert meter.balance("u") == Decimal("20002." + "0" * 29 + "1")
