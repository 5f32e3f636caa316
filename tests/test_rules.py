"""The pure rules, and LibreChat parity through the manager on every store."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from creditmeter import (
    BalanceConfig,
    BalanceManager,
    EntryKind,
    IdempotencyConflict,
    InsufficientBalance,
    InvalidInput,
    Pricing,
    RefillSettings,
    TokenUsage,
    rules,
)
from creditmeter.testing import make_account

UTC = timezone.utc


def ids():
    counter = iter(range(1, 10**6))
    return lambda: f"e{next(counter)}"


@pytest.mark.parametrize(
    ("start", "value", "unit", "expected"),
    [
        (datetime(2024, 1, 31, tzinfo=UTC), 1, "months", datetime(2024, 2, 29, tzinfo=UTC)),
        (datetime(2023, 1, 31, tzinfo=UTC), 1, "months", datetime(2023, 2, 28, tzinfo=UTC)),
        (datetime(2024, 3, 31, tzinfo=UTC), 1, "months", datetime(2024, 4, 30, tzinfo=UTC)),
        (datetime(2024, 11, 30, tzinfo=UTC), 3, "months", datetime(2025, 2, 28, tzinfo=UTC)),
        (datetime(2024, 12, 15, tzinfo=UTC), 1, "months", datetime(2025, 1, 15, tzinfo=UTC)),
        (datetime(2024, 1, 15, tzinfo=UTC), 24, "months", datetime(2026, 1, 15, tzinfo=UTC)),
        (
            datetime(2024, 1, 1, tzinfo=UTC),
            90,
            "seconds",
            datetime(2024, 1, 1, 0, 1, 30, tzinfo=UTC),
        ),
        (datetime(2024, 1, 1, tzinfo=UTC), 5, "minutes", datetime(2024, 1, 1, 0, 5, tzinfo=UTC)),
        (datetime(2024, 1, 1, tzinfo=UTC), 12, "hours", datetime(2024, 1, 1, 12, tzinfo=UTC)),
        (datetime(2024, 1, 1, tzinfo=UTC), 30, "days", datetime(2024, 1, 31, tzinfo=UTC)),
        (datetime(2024, 1, 1, tzinfo=UTC), 2, "weeks", datetime(2024, 1, 15, tzinfo=UTC)),
    ],
)
def test_add_interval(start, value, unit, expected):
    assert rules.add_interval(start, value, unit) == expected


def test_opening_gives_start_balance_only_when_enabled():
    now = datetime(2025, 1, 1, tzinfo=UTC)
    on = rules.open_account("u", config=BalanceConfig(enabled=True), now=now, new_id=ids())
    off = rules.open_account("u", config=BalanceConfig(), now=now, new_id=ids())
    assert on.account.balance == 20000
    assert on.entry.kind is EntryKind.OPEN
    assert on.entry.amount == 20000
    assert on.account.last_refill == now
    assert on.expected_version is None
    assert off.account.balance == 0


def test_charge_clamps_at_zero_and_keeps_full_cost():
    account = make_account(balance=Decimal(30))
    change = rules.charge(
        account,
        "alice",
        Decimal(100),
        config=BalanceConfig(enabled=True),
        now=account.updated_at,
        new_id=ids(),
    )
    assert change.account.balance == 0
    assert change.entry.amount == -30
    assert change.entry.cost == 100
    assert change.account.version == account.version + 1
    assert change.expected_version == account.version


def test_charge_may_go_negative_when_allowed():
    account = make_account(balance=Decimal(30))
    config = BalanceConfig(enabled=True, allow_negative_balance=True)
    change = rules.charge(
        account, "alice", Decimal(100), config=config, now=account.updated_at, new_id=ids()
    )
    assert change.account.balance == -70
    assert change.entry.amount == -100


def test_charge_when_disabled_records_usage_and_moves_nothing():
    account = make_account(balance=Decimal(30))
    change = rules.charge(
        account, "alice", Decimal(100), config=BalanceConfig(), now=account.updated_at, new_id=ids()
    )
    assert change.account.balance == 30
    assert change.entry.amount == 0
    assert change.entry.cost == 100


def test_strict_charge_refuses_and_equal_is_enough():
    account = make_account(balance=Decimal(30))
    config = BalanceConfig(enabled=True)
    with pytest.raises(InsufficientBalance) as caught:
        rules.charge(
            account,
            "alice",
            Decimal("30.01"),
            config=config,
            now=account.updated_at,
            new_id=ids(),
            strict=True,
        )
    assert caught.value.available == 30
    assert caught.value.cost == Decimal("30.01")
    change = rules.charge(
        account,
        "alice",
        Decimal(30),
        config=config,
        now=account.updated_at,
        new_id=ids(),
        strict=True,
    )
    assert change.account.balance == 0


def test_check_without_cost_needs_a_positive_balance():
    config = BalanceConfig(enabled=True)
    assert not rules.check(make_account(balance=Decimal(0)), None, config=config).allowed
    assert rules.check(make_account(balance=Decimal("0.5")), None, config=config).allowed
    assert rules.check(make_account(balance=Decimal(0)), Decimal(0), config=config).allowed
    assert rules.check(make_account(balance=Decimal(0)), Decimal(1), config=BalanceConfig()).allowed


REFILL = {
    "enabled": True,
    "auto_refill_enabled": True,
    "refill_interval_value": 1,
    "refill_interval_unit": "days",
    "refill_amount": 500,
}


@pytest.mark.parametrize(
    ("mode", "balance", "cost", "expected"),
    [
        ("when_depleted", 0, 0, 500),
        ("when_depleted", 10, 0, 0),
        ("when_depleted", 10, 10, 500),  # balance - cost <= 0
        ("when_depleted", 10, 9, 0),
        ("on_interval", 10, 0, 500),
        ("top_up", 10, 0, 490),
        ("top_up", 800, 0, 0),
    ],
)
def test_refill_modes(mode, balance, cost, expected):
    start = datetime(2025, 1, 1, tzinfo=UTC)
    config = BalanceConfig(**REFILL, refill_mode=mode)
    account = make_account(balance=Decimal(balance), last_refill=start)
    due = start + timedelta(days=1)
    assert rules.refill_due(account, config=config, now=due, cost=Decimal(cost)) == expected
    not_yet = due - timedelta(microseconds=1)
    assert rules.refill_due(account, config=config, now=not_yet, cost=Decimal(cost)) == 0


def test_refill_needs_enabled_balances_and_positive_amount():
    start = datetime(2025, 1, 1, tzinfo=UTC)
    account = make_account(balance=Decimal(0), last_refill=start)
    later = start + timedelta(days=400)
    assert (
        rules.refill_due(account, config=BalanceConfig(**{**REFILL, "enabled": False}), now=later)
        == 0
    )
    assert (
        rules.refill_due(
            account, config=BalanceConfig(**{**REFILL, "auto_refill_enabled": False}), now=later
        )
        == 0
    )
    assert (
        rules.refill_due(account, config=BalanceConfig(**{**REFILL, "refill_amount": 0}), now=later)
        == 0
    )


def test_account_refill_settings_override_the_config():
    start = datetime(2025, 1, 1, tzinfo=UTC)
    own = RefillSettings(enabled=True, interval_value=1, interval_unit="hours", amount=Decimal(7))
    account = make_account(balance=Decimal(0), last_refill=start, refill=own)
    config = BalanceConfig(enabled=True)  # auto refill off in the config
    assert rules.effective_refill(account, config) == own
    assert rules.refill_due(account, config=config, now=start + timedelta(hours=1)) == 7


def test_replay_compares_the_request_not_the_outcome():
    account = make_account(balance=Decimal(100))
    config = BalanceConfig(enabled=True)
    first = rules.charge(
        account,
        "alice",
        Decimal(10),
        config=config,
        now=account.updated_at,
        new_id=ids(),
        request_id="r",
    ).entry
    same = rules.charge(
        make_account(balance=Decimal(5)),
        "alice",
        Decimal(10),
        config=config,
        now=account.updated_at,
        new_id=ids(),
        request_id="r",
    ).entry
    other = rules.charge(
        account,
        "alice",
        Decimal(11),
        config=config,
        now=account.updated_at,
        new_id=ids(),
        request_id="r",
    ).entry
    assert rules.replay(first, same) is first
    with pytest.raises(IdempotencyConflict, match="cost"):
        rules.replay(first, other)
    granted = rules.grant(
        account,
        "alice",
        Decimal(10),
        config=config,
        now=account.updated_at,
        new_id=ids(),
        request_id="r",
    ).entry
    with pytest.raises(IdempotencyConflict, match="charge"):
        rules.replay(first, granted)


# --- LibreChat parity, through the manager on every store --------------------


@pytest.fixture
def refilling(store, clock):
    return BalanceManager(store, BalanceConfig(**REFILL), clock=clock)


def test_start_balance_on_first_sight(manager):
    assert manager.balance("new-user") == 20000
    assert [entry.kind for entry in manager.ledger("new-user")] == [EntryKind.OPEN]
    assert manager.balance("new-user") == 20000  # opened once only
    assert len(manager.ledger("new-user")) == 1


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


def test_strict_charge_refills_first(refilling, clock):
    refilling.set_balance("u", 0)
    clock.advance(timedelta(days=1))
    entry = refilling.charge("u", 300, strict=True)
    assert entry.balance_after == 200
    kinds = [e.kind for e in refilling.ledger("u")]
    assert kinds[-2:] == [EntryKind.REFILL, EntryKind.CHARGE]


def test_plain_charge_does_not_refill(refilling, clock):
    refilling.set_balance("u", 0)
    clock.advance(timedelta(days=1))
    entry = refilling.charge("u", 300)
    assert entry.amount == 0
    assert entry.cost == 300
    assert refilling.balance("u") == 0


def test_charge_clamps_at_zero_through_the_manager(manager):
    entry = manager.charge("u", 25000)
    assert entry.amount == -20000
    assert entry.cost == 25000
    assert manager.balance("u") == 0


def test_disabled_balances_always_allow(store, clock):
    manager = BalanceManager(store, BalanceConfig(), clock=clock)
    assert manager.balance("u") == 0
    assert manager.check("u", 10**9).allowed
    manager.require("u")
    assert manager.charge("u", 10, strict=True).amount == 0


def test_idempotent_repeats_return_the_original(manager):
    first = manager.charge("u", 10, request_id="call-1")
    again = manager.charge("u", 10, request_id="call-1")
    assert again == first
    assert manager.balance("u") == 20000 - 10
    with pytest.raises(IdempotencyConflict):
        manager.charge("u", 11, request_id="call-1")
    assert manager.balance("u") == 20000 - 10


def test_strict_repeat_of_an_applied_request_returns_it_even_when_now_broke(manager):
    first = manager.charge("u", 20000, strict=True, request_id="all")
    assert manager.balance("u") == 0
    assert manager.charge("u", 20000, strict=True, request_id="all") == first


def test_ledger_sum_equals_balance_and_chains(manager, clock):
    manager.grant("u", 5, reason="welcome")
    manager.charge("u", Decimal("0.25"))
    clock.advance(timedelta(hours=1))
    manager.set_balance("u", 42)
    manager.charge("u", 100)
    entries = manager.ledger("u")
    assert sum(e.amount for e in entries) == manager.balance("u") == 0
    running = Decimal(0)
    for entry in entries:
        running += entry.amount
        assert entry.balance_after == running
    assert entries[1].metadata == {"reason": "welcome"}
    assert [e.kind for e in manager.ledger("u", limit=2)] == [EntryKind.ADJUST, EntryKind.CHARGE]


def test_a_second_manager_sees_the_first_ones_writes(store_factory, clock, config):
    first = BalanceManager(store_factory(), config, clock=clock)
    second = BalanceManager(store_factory(), config, clock=clock)
    first.charge("u", 1)  # `first` now remembers version 2
    second.charge("u", 1)
    second.grant("u", 10)
    first.charge("u", 1)  # starts from a stale account: must conflict and retry
    assert first.balance("u") == second.balance("u") == 20000 - 3 + 10
    assert len(first.ledger("u")) == 5


def test_strict_charge_from_a_stale_account_rechecks_the_store(store_factory, clock, config):
    first = BalanceManager(store_factory(), config, clock=clock)
    second = BalanceManager(store_factory(), config, clock=clock)
    first.set_balance("u", 0)  # `first` remembers a zero balance
    second.grant("u", 100)
    assert first.charge("u", 60, strict=True).balance_after == 40


def test_large_balances_with_many_decimals_stay_exact(manager):
    manager.set_balance("u", 10**15)
    entry = manager.charge("u", Decimal("0.0000000000001"))
    assert entry.balance_after == Decimal("999999999999999.9999999999999")
    assert sum(e.amount for e in manager.ledger("u")) == manager.balance("u")


def test_more_than_thirty_decimal_places_is_invalid(manager):
    manager.grant("u", Decimal("1e-30"))
    with pytest.raises(InvalidInput, match="30 decimal places"):
        manager.grant("u", Decimal("1e-31"))
    manager.grant("u", Decimal("2." + "0" * 40))  # trailing zeros are not places


# --- hold_size: what the decorator and the ASGI middleware hold before a call ---------


@pytest.mark.parametrize(
    ("prompt", "max_output", "expected"),
    [
        (TokenUsage(input=1000), 500, Decimal(7500)),  # 1000 x 2.5 + 500 x 10
        (TokenUsage(input=1000), None, Decimal(2500)),  # no limit given: the prompt only
        (None, 500, Decimal(5000)),  # no estimate: the most completion only
        (TokenUsage(input=10, cache_read=100), 0, Decimal(150)),  # 10 x 2.5 + 100 x 1.25
    ],
)
def test_hold_size_prices_the_prompt_and_the_most_completion(prompt, max_output, expected):
    pricing = Pricing.librechat()
    assert pricing.rate("gpt-4o", "completion") == 10  # the rates these figures assume
    assert rules.hold_size(pricing, "gpt-4o", prompt=prompt, max_output=max_output) == expected
