"""``metered`` on every backend: the decorator's calls reach every store alike.

The decorator's own logic (parameters, generators, streams, misuse) is in
test_metering.py, on a MemoryStore; here each backend runs a plain call
charged its priced usage, a call refused before it runs, a call that raises
(its hold released, nothing charged), a call with an estimate whose hold is
settled, and a request id sent twice. On an async backend the bridge makes
the ``async def`` the async manager needs (see backends.py).
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from creditmeter import BalanceConfig, EntryKind, InsufficientBalance, Pricing, TokenUsage

START = 10**6
USAGE = TokenUsage(input=100, output=20)
COST = Pricing.librechat().cost("gpt-4o", USAGE).total


def response():
    return {"usage": {"prompt_tokens": 100, "completion_tokens": 20}}


@pytest.fixture
def meter(backend):
    return backend.manager(BalanceConfig(enabled=True, start_balance=START))


def charges(meter, user="alice"):
    return [e for e in meter.ledger(user) if e.kind is EntryKind.CHARGE]


def test_a_call_is_charged_its_priced_usage(meter):
    @meter.metered(user="user_id", model="model")
    def ask(prompt, *, user_id, model="gpt-4o"):
        return response()

    assert ask("hi", user_id="alice") == response()
    (entry,) = charges(meter)
    assert entry.cost == COST
    assert entry.usage == USAGE
    assert entry.model == "gpt-4o"
    assert meter.balance("alice") == START - COST


def test_a_user_who_cannot_pay_is_refused_before_the_call(meter):
    meter.set_balance("alice", 0)
    calls = []

    @meter.metered(user="user_id")
    def ask(user_id):
        calls.append(user_id)
        return response()

    with pytest.raises(InsufficientBalance):
        ask("alice")
    assert calls == []
    assert charges(meter) == []


def test_a_spent_user_due_a_refill_is_refilled_before_the_call_and_one_with_something_left_is_not(
    backend, clock
):
    """The check before a call answers most calls from a read; a due refill is still written."""
    config = BalanceConfig(
        enabled=True,
        start_balance=0,
        auto_refill_enabled=True,
        refill_interval_value=1,
        refill_interval_unit="days",
        refill_amount=START,
    )
    meter = backend.manager(config, clock=clock)
    meter.account("alice")
    meter.grant("bob", 1)

    @meter.metered(user="user_id", model="model")
    def ask(*, user_id, model="gpt-4o"):
        return response()

    with pytest.raises(InsufficientBalance):
        ask(user_id="alice")  # spent, and no refill due yet
    ask(user_id="bob")  # 1 credit left is enough to start (the charge clamps at zero)
    clock.advance(timedelta(days=1))
    ask(user_id="alice")
    assert [e.kind for e in meter.ledger("alice")] == [
        EntryKind.OPEN,
        EntryKind.REFILL,
        EntryKind.CHARGE,
    ]
    assert meter.balance("alice") == START - COST


def test_a_raising_call_releases_its_hold_and_charges_nothing(meter):
    @meter.metered(user="user_id", model="model", estimate=lambda **_: 1000)
    def ask(*, user_id, model="gpt-4o"):
        raise TimeoutError("provider down")

    with pytest.raises(TimeoutError, match="provider down"):
        ask(user_id="alice")
    assert [e.kind for e in meter.ledger("alice")] == [EntryKind.OPEN, EntryKind.RELEASE]
    assert meter.account("alice").holds == ()
    assert meter.balance("alice") == START


def test_an_estimated_call_is_held_then_settled_once_per_request_id(meter):
    @meter.metered(
        user="user_id", model="model", estimate=lambda **_: 1000, request_id="request_id"
    )
    def ask(*, user_id, request_id, model="gpt-4o"):
        return response()

    ask(user_id="alice", request_id="r-1")
    ask(user_id="alice", request_id="r-1")  # a retry after success: no new charge
    (entry,) = charges(meter)
    assert entry.cost == COST
    assert meter.account("alice").holds == ()
    assert meter.balance("alice") == START - COST
