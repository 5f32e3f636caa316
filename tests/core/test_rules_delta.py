"""``rules.charge_delta``: a charge planned on an old view that any store version may take.

The promise a store's ``commit_delta`` relies on: for every stored account
that equals the seen one but for balance, version and ``updated_at``, and
holds at least the floor, the charge that the rules would plan on it is the
delta rebased to what the store computes (balance plus the entry's amount,
version plus one, the later ``updated_at``). Hypothesis draws the seen and
stored balances (-1,000 to 1,000,000, up to 3 places, and 30 places near
10**15), versions, times, costs and configs (enabled or not, negative
allowed or not); the fixed cases are those where no delta may be planned.
"""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from creditmeter import BalanceConfig, RefillSettings, rules
from creditmeter._exact import EXACT
from creditmeter.models import Account, CreditBlock, EntryKind, Hold
from creditmeter.usage import TokenUsage

NOW = datetime(2026, 12, 3, 8, 0, tzinfo=timezone.utc)
balances = st.one_of(
    st.decimals(min_value=-1000, max_value=10**6, places=3, allow_nan=False),
    st.decimals(min_value=10**15 - 10, max_value=10**15, places=30, allow_nan=False),
)
costs = st.one_of(
    st.decimals(min_value=0, max_value=10**6, places=3, allow_nan=False),
    st.decimals(min_value=0, max_value=1, places=30, allow_nan=False),
)
configs = st.builds(BalanceConfig, enabled=st.booleans(), allow_negative_balance=st.booleans())
offsets = st.integers(-3600, 3600).map(lambda s: timedelta(seconds=s))


def ids() -> rules.IdFactory:
    counter = itertools.count()
    return lambda: f"id-{next(counter)}"


def account(balance: Decimal = Decimal(100), **fields: object) -> Account:
    values: dict[str, object] = {
        "user_id": "u",
        "balance": balance,
        "version": 3,
        "created_at": NOW - timedelta(days=1),
        "updated_at": NOW - timedelta(hours=1),
        "last_refill": NOW - timedelta(hours=1),
    }
    values.update(fields)
    return Account(**values)  # type: ignore[arg-type]


def delta(seen: Account, cost: Decimal, config: BalanceConfig, **kw: object) -> rules.Delta | None:
    return rules.charge_delta(seen, "u", cost, config=config, now=NOW, new_id=ids(), **kw)  # type: ignore[arg-type]


@given(
    seen_balance=balances,
    stored_balance=balances,
    stored_version=st.integers(1, 10**6),
    stored_moved=offsets,
    cost=costs,
    config=configs,
)
def test_a_delta_rebased_on_any_stored_version_is_the_charge_planned_on_it(
    seen_balance: Decimal,
    stored_balance: Decimal,
    stored_version: int,
    stored_moved: timedelta,
    cost: Decimal,
    config: BalanceConfig,
) -> None:
    seen = account(seen_balance)
    planned = delta(seen, cost, config, request_id="r", model="m", usage=TokenUsage(input=3))
    if planned is None:
        # Only a charge the seen balance would clamp is refused here.
        assert config.enabled
        assert not config.allow_negative_balance
        assert seen_balance < cost
        return
    stored = attrs.evolve(
        seen,
        balance=stored_balance,
        version=stored_version,
        updated_at=seen.updated_at + stored_moved,
    )
    if planned.floor is not None and stored_balance < planned.floor:
        return  # the store's guard refuses: nothing to compare
    direct = rules.charge(
        stored,
        "u",
        cost,
        config=config,
        now=NOW,
        new_id=ids(),
        request_id="r",
        model="m",
        usage=TokenUsage(input=3),
    )
    entry = planned.change.entry
    reached = EXACT.add(stored_balance, entry.amount)
    rebased = rules.rebase(
        planned,
        reached,
        stored_version + 1,
        max(stored.updated_at, planned.change.account.updated_at),
    )
    assert rebased == direct
    assert rebased.entry.balance_after == direct.account.balance


def test_the_floor_is_the_cost_only_where_the_balance_could_clamp() -> None:
    seen = account(Decimal(100))
    clamping = delta(seen, Decimal(40), BalanceConfig(enabled=True))
    negative = delta(seen, Decimal(40), BalanceConfig(enabled=True, allow_negative_balance=True))
    disabled = delta(seen, Decimal(40), BalanceConfig(enabled=False))
    assert clamping is not None
    assert clamping.floor == 40
    assert negative is not None
    assert negative.floor is None
    assert disabled is not None
    assert disabled.floor is None
    assert disabled.change.entry.amount == 0  # metered, no credits moved
    assert clamping.change.entry.kind is EntryKind.CHARGE
    assert clamping.change.expected_version == 3


@pytest.mark.parametrize(
    ("why", "seen", "kw", "config"),
    [
        ("no account yet", None, {}, BalanceConfig(enabled=True)),
        (
            "a hold is open",
            account(
                holds=(
                    Hold(
                        id="h",
                        user_id="u",
                        amount=Decimal(1),
                        created_at=NOW,
                        expires_at=NOW + timedelta(minutes=5),
                    ),
                )
            ),
            {},
            BalanceConfig(enabled=True),
        ),
        (
            "credit blocks",
            account(
                blocks=(
                    CreditBlock(
                        id="b",
                        amount=Decimal(5),
                        granted=Decimal(5),
                        priority=50,
                        expires_at=None,
                        granted_at=NOW,
                    ),
                )
            ),
            {},
            BalanceConfig(enabled=True),
        ),
        ("strict: may refill or refuse", account(), {"strict": True}, BalanceConfig(enabled=True)),
        ("the seen balance would clamp", account(Decimal(5)), {}, BalanceConfig(enabled=True)),
    ],
)
def test_no_delta_where_the_outcome_depends_on_more_than_the_balance(
    why: str, seen: Account | None, kw: dict[str, object], config: BalanceConfig
) -> None:
    assert delta(seen, Decimal(10), config, **kw) is None, why  # type: ignore[arg-type]


def test_a_strict_charge_with_balances_disabled_is_a_delta() -> None:
    """Disabled balances never refill or refuse, so strictness decides nothing."""
    planned = delta(account(), Decimal(10), BalanceConfig(enabled=False), strict=True)
    assert planned is not None
    assert planned.floor is None


def test_refill_settings_travel_with_the_planned_account() -> None:
    """Fields a delta may not move are the seen ones: the store compares them."""
    refill = RefillSettings(enabled=True, interval_value=1, interval_unit="days", amount=5)
    planned = delta(account(refill=refill), Decimal(1), BalanceConfig(enabled=True))
    assert planned is not None
    assert planned.change.account.refill == refill
    assert planned.change.account.last_refill == NOW - timedelta(hours=1)
