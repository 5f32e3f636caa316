"""The pure rules: opening, charging, refills, checks, replays and hold sizes, without a store.

The same rules through the manager, on every backend: manager/test_operations.py.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import attrs
import pytest

from creditmeter import (
    Account,
    BalanceConfig,
    EntryKind,
    IdempotencyConflict,
    InsufficientBalance,
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


def test_admits_answers_from_a_read_only_when_the_full_check_would_allow_without_a_write():
    """Tried: balances off; a positive, zero and negative balance; holds covering it; a
    refill due; an expired credit block holding all that is left."""
    now = datetime(2025, 1, 10, tzinfo=UTC)
    on, off = BalanceConfig(enabled=True), BalanceConfig(enabled=False)
    refilling = BalanceConfig(**REFILL)
    interval = BalanceConfig(enabled=True, refill_mode="on_interval")

    def own(last_refill: datetime) -> Account:
        settings = RefillSettings(
            enabled=True, amount=Decimal(500), interval_value=1, interval_unit="days"
        )
        made = make_account(balance=Decimal(5), last_refill=last_refill)
        return attrs.evolve(made, refill=settings)

    held = rules.hold(
        make_account(balance=Decimal(5)),
        "alice",
        Decimal(5),
        hold_id="h",
        ttl=timedelta(minutes=5),
        config=on,
        now=now,
        new_id=ids(),
    ).account
    expiring = rules.grant(
        make_account(balance=Decimal(0)),
        "alice",
        Decimal(7),
        config=on,
        now=now - timedelta(days=2),
        new_id=ids(),
        expires_at=now - timedelta(days=1),
    ).account
    cases = [
        (make_account(balance=Decimal("0.5")), on, True),
        (make_account(balance=Decimal(0)), on, False),
        (make_account(balance=Decimal(-3)), on, False),
        (make_account(balance=Decimal(-3)), off, True),
        (held, on, False),  # all of it held
        (expiring, on, False),  # what is left expired
        (make_account(balance=Decimal(5), last_refill=now - timedelta(days=2)), refilling, True),
        (make_account(balance=Decimal(0), last_refill=now - timedelta(days=2)), refilling, False),
        # Refills off in the config but on for this account: a due refill is written first.
        (own(now - timedelta(days=2)), interval, False),
        (own(now - timedelta(hours=2)), interval, True),
        (make_account(balance=Decimal(5), last_refill=now - timedelta(days=2)), interval, True),
    ]
    for account, config, expected in cases:
        read: list[datetime] = []

        def clock(at: datetime = now, read: list[datetime] = read) -> datetime:
            read.append(at)
            return at

        assert rules.admits(account, clock, config=config) is expected
        timeless = not (account.holds or account.blocks or account.refill)
        if timeless and not config.auto_refill_enabled:
            assert read == []  # the answer cannot depend on the time: no clock read
        assert rules.admits(account, lambda: now, config=config) is expected
        view = rules.open_holds(account, now)
        if expected:  # what admits allows, the full check allows, with nothing to write
            assert rules.check(view, None, config=config).allowed
            assert not rules.refill_due(view, config=config, now=now)


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
