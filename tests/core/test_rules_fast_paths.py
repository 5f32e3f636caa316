"""The rules' fast paths (charge, hold, settle without a draft) equal the general path.

Each case is worked out twice: by the public rule, which takes its fast path
when nothing opens, expires or refills, and by the same steps on a ``_Draft``,
the general path every other case takes. Accounts, holds, costs and configs are
drawn by Hypothesis (balances from -1,000 to 1,000,000 with up to 3 places,
0-4 holds, enabled or not, clamped or allowed negative).
"""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from creditmeter import BalanceConfig, rules
from creditmeter.exceptions import InsufficientBalance
from creditmeter.models import Account, EntryKind, Hold

NOW = datetime(2026, 12, 3, 8, 0, tzinfo=timezone.utc)
amounts = st.decimals(min_value=0, max_value=10**6, places=3, allow_nan=False)
configs = st.builds(
    BalanceConfig,
    enabled=st.booleans(),
    allow_negative_balance=st.booleans(),
)


def ids() -> rules.IdFactory:
    counter = itertools.count()
    return lambda: f"id-{next(counter)}"


@st.composite
def accounts(draw: st.DrawFn) -> Account:
    minutes = draw(st.lists(st.integers(1, 60), max_size=4))
    holds = tuple(
        Hold(
            id=f"h{n}",
            user_id="u",
            amount=draw(amounts),
            created_at=NOW - timedelta(minutes=1),
            expires_at=NOW + timedelta(minutes=m),
        )
        for n, m in enumerate(sorted(minutes))
    )
    return Account(
        user_id="u",
        balance=draw(st.decimals(min_value=-1000, max_value=10**6, places=3, allow_nan=False)),
        version=draw(st.integers(1, 10)),
        created_at=NOW - timedelta(days=1),
        updated_at=NOW - timedelta(hours=1),
        last_refill=NOW - timedelta(hours=1),
        holds=holds,
    )


def _outcome(call):  # type: ignore[no-untyped-def]
    try:
        return call()
    except InsufficientBalance as refused:
        return ("refused", refused.balance, refused.available, refused.cost)


@settings(max_examples=300, deadline=None)
@given(accounts(), amounts, configs)
def test_charge_fast_path_equals_the_draft(account: Account, cost: Decimal, config) -> None:  # type: ignore[no-untyped-def]
    fast = rules.charge(account, "u", cost, config=config, now=NOW, new_id=ids())
    draft = rules._Draft(account, "u", config=config, now=NOW, new_id=ids())
    draft.add(
        EntryKind.CHARGE,
        rules._applied(cost, draft.available, config).copy_negate(),
        now=NOW,
        new_id=ids(),
        cost=cost,
    )
    assert fast == draft.finish(NOW)


@settings(max_examples=300, deadline=None)
@given(accounts(), amounts, configs, st.integers(0, 3))
def test_settle_fast_path_equals_the_draft(account, cost, config, which) -> None:  # type: ignore[no-untyped-def]
    if not account.holds:
        return
    hold = account.holds[min(which, len(account.holds) - 1)]
    fast = rules.settle(account, "u", hold, cost, config=config, now=NOW, new_id=ids())
    draft = rules._Draft(account, "u", config=config, now=NOW, new_id=ids())
    assert draft.take_hold(hold) == hold
    draft.add(
        EntryKind.CHARGE,
        rules._applied(cost, draft.available, config).copy_negate(),
        now=NOW,
        new_id=ids(),
        request_id=rules.HOLD_PREFIX + hold.id,
        cost=cost,
    )
    assert fast == draft.finish(NOW)
    assert sum(h.amount for h in fast.account.holds) == fast.account.held


@settings(max_examples=300, deadline=None)
@given(accounts(), amounts, configs, st.integers(1, 90))
def test_hold_fast_path_equals_the_draft(account, amount, config, minutes) -> None:  # type: ignore[no-untyped-def]
    ttl = timedelta(minutes=minutes)

    def fast() -> rules.Change:
        return rules.hold(
            account, "u", amount, hold_id="new", ttl=ttl, config=config, now=NOW, new_id=ids()
        )

    def general() -> rules.Change:
        draft = rules._Draft(account, "u", config=config, now=NOW, new_id=ids())
        if config.enabled and draft.available < amount:
            raise InsufficientBalance(
                "u", balance=draft.balance, available=draft.available, cost=amount
            )
        draft.put_hold(
            Hold(id="new", user_id="u", amount=amount, created_at=NOW, expires_at=NOW + ttl)
        )
        return draft.finish(NOW)

    assert _outcome(fast) == _outcome(general)
    made = _outcome(fast)
    if isinstance(made, rules.Change):
        expiries = [h.expires_at for h in made.account.holds]
        assert expiries == sorted(expiries)
        assert made.account == attrs.evolve(made.account)  # a well-formed record


refill_configs = st.builds(
    BalanceConfig,
    enabled=st.booleans(),
    auto_refill_enabled=st.booleans(),
    refill_amount=st.sampled_from([0, 5, 1000]),
    refill_interval_value=st.integers(1, 3),
    refill_interval_unit=st.sampled_from(["minutes", "hours", "days"]),
)


@settings(max_examples=300, deadline=None)
@given(accounts(), amounts, refill_configs, st.integers(0, 60 * 24 * 5))
def test_hold_skips_refill_due_only_where_none_can_be_due(account, amount, config, minutes) -> None:  # type: ignore[no-untyped-def]
    """``hold``'s fast path asks ``refill_due`` only when refill settings are on somewhere."""
    account = attrs.evolve(account, last_refill=NOW - timedelta(minutes=minutes))
    if account.refill is None and not config.auto_refill_enabled:
        assert rules.refill_due(account, config=config, now=NOW, cost=amount) == 0
    fast = _outcome(
        lambda: rules.hold(
            account,
            "u",
            amount,
            hold_id="new",
            ttl=timedelta(minutes=5),
            config=config,
            now=NOW,
            new_id=ids(),
        )
    )
    draft = rules._Draft(account, "u", config=config, now=NOW, new_id=ids())

    def general() -> rules.Change:
        if config.enabled:
            rules._apply_refill(draft, config=config, now=NOW, new_id=ids(), cost=amount)
            if draft.available < amount:
                raise InsufficientBalance(
                    "u", balance=draft.balance, available=draft.available, cost=amount
                )
        draft.put_hold(
            Hold(
                id="new",
                user_id="u",
                amount=amount,
                created_at=NOW,
                expires_at=NOW + timedelta(minutes=5),
            )
        )
        return draft.finish(NOW)

    expected = _outcome(general)
    if isinstance(fast, rules.Change) and isinstance(expected, rules.Change):
        assert fast.account == expected.account
        assert [(e.kind, e.amount) for e in fast.entries] == [
            (e.kind, e.amount) for e in expected.entries
        ]
    else:
        assert fast == expected
