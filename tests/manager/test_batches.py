"""charge_many and grant_many on every backend: the same outcomes as one-by-one calls.

Each comparison runs the same items one by one on one place and as a batch
on another (same config, same clock moves), and compares what came back
(entries' users, kinds, amounts, balances, request ids, costs; error types),
the ledgers, and the events told, in order.

Inputs tried: several users interleaved; strict charges that cannot pay;
repeats of applied requests (in an earlier call and in the same batch), a
request id reused with other parameters (in an earlier call and in the same
batch); priced usage with a model; clamping at zero; a refill falling due
during a batch; a manager whose last-seen account is stale, and one that
never saw a user another manager opened; a store without ``commit_many``.
Bad batches (each must raise ``InvalidInput`` naming the item and write
nothing): a non-item object, a ``GrantItem`` in ``charge_many``, ``None``
as the batch, an empty user id, a user id with a control character, a
negative amount, NaN, an infinite amount, a bool amount, no amount and no
usage, a usage that is not a ``TokenUsage``, ``incomplete=True`` with an
amount, ``strict`` not a bool, a reserved ``hold:`` request id, a zero
grant, and 10,001 items. (Pricing never refuses a usage without a model: it
then uses unit rates, as ``charge()`` does.)
"""

from __future__ import annotations

import math
from datetime import timedelta
from decimal import Decimal
from typing import Any

import attrs
import pytest

from creditmeter import (
    BalanceConfig,
    BatchResult,
    ChargeItem,
    ConflictRetried,
    CreditMeterError,
    EntryKind,
    GrantItem,
    IdempotencyConflict,
    InsufficientBalance,
    InvalidInput,
    TokenUsage,
)

LOUD = BalanceConfig(
    enabled=True,
    start_balance=1000,
    auto_refill_enabled=True,
    refill_interval_value=1,
    refill_interval_unit="days",
    refill_amount=500,
)

FIRST = [
    ChargeItem("a", 100, request_id="a1"),
    ChargeItem("b", 50),
    ChargeItem("a", 950, strict=True, request_id="a2"),  # 900 left: refused
    ChargeItem("a", 100, request_id="a1"),  # a repeat in the same batch
    ChargeItem("a", 101, request_id="a1"),  # the same request id, another cost
    ChargeItem("c", usage=TokenUsage(input=1000, output=10), model="gpt-4o", request_id="c1"),
    ChargeItem("b", 2000),  # clamped at zero
    ChargeItem("b", 10, strict=True),  # nothing left, no refill due yet
    ChargeItem("a", 850, metadata={"k": "v"}),  # through the low-balance threshold
]
# A day later: refills are due for the depleted users.
SECOND = [
    ChargeItem("b", 300, strict=True, request_id="b-late"),  # a refill pays for it
    ChargeItem("a", 100, request_id="a1"),  # a repeat of the first batch
    ChargeItem("a", 7, request_id="a2"),  # refused before, so free to use now
    ChargeItem("d", 5),
]
GRANTS = [
    GrantItem("a", 10, request_id="g1", reason="promo"),
    GrantItem("e", 3),
    GrantItem("a", 10, request_id="g1"),
    GrantItem("a", 11, request_id="g1"),
]


def _shape(entry: Any) -> tuple[Any, ...]:
    return (
        entry.user_id,
        entry.kind,
        entry.amount,
        entry.balance_after,
        entry.request_id,
        entry.cost,
        entry.model,
        entry.usage,
        entry.metadata,
    )


def _event(event: Any) -> tuple[Any, ...]:
    fields = attrs.asdict(event, recurse=False)
    fields.pop("duration", None)
    if "entry" in fields:
        fields["entry"] = _shape(fields["entry"])
    return (type(event).__name__, tuple(sorted(fields.items())))


def _one_by_one(meter: Any, items: list[Any]) -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    for item in items:
        try:
            if isinstance(item, GrantItem):
                entry = meter.grant(
                    item.user_id,
                    item.amount,
                    request_id=item.request_id,
                    reason=item.reason,
                    metadata=item.metadata,
                )
            else:
                entry = meter.charge(
                    item.user_id,
                    item.amount,
                    model=item.model,
                    usage=item.usage,
                    incomplete=item.incomplete,
                    strict=item.strict,
                    request_id=item.request_id,
                    metadata=item.metadata,
                )
        except CreditMeterError as exc:  # noqa: PERF203 - each call on its own, as a caller makes it
            found.append(("error", type(exc).__name__))
        else:
            found.append(("ok", _shape(entry)))
    return found


def _batched(results: list[BatchResult], items: list[Any]) -> list[tuple[str, Any]]:
    assert [result.index for result in results] == list(range(len(items)))
    assert [result.item for result in results] == items
    found: list[tuple[str, Any]] = []
    for result in results:
        assert result.ok == (result.error is None) == (result.entry is not None)
        if result.ok:
            found.append(("ok", _shape(result.entry)))
        else:
            found.append(("error", type(result.error).__name__))
    return found


def _ledgers(meter: Any, users: str) -> dict[str, list[tuple[Any, ...]]]:
    return {user: [_shape(entry) for entry in meter.ledger(user)] for user in users}


def _check_invariant(meter: Any, users: str) -> None:
    for user in users:
        ledger = meter.ledger(user)
        assert sum(entry.amount for entry in ledger) == meter.balance(user)
        running = Decimal(0)
        for entry in ledger:
            running += entry.amount
            assert entry.balance_after == running


def test_batches_match_one_by_one_calls(backend, clock):
    start = clock()
    heard_single: list[Any] = []
    single = backend.manager(
        LOUD, clock=clock, on_event=heard_single.append, low_balance_threshold=100
    )
    expected = _one_by_one(single, FIRST)
    clock.advance(timedelta(days=1))
    expected_late = _one_by_one(single, SECOND)
    expected_grants = _one_by_one(single, GRANTS)

    clock.set(start)
    heard_batch: list[Any] = []
    batch = backend.manager(
        LOUD,
        clock=clock,
        place=backend.new_place(),
        on_event=heard_batch.append,
        low_balance_threshold=100,
    )
    assert _batched(batch.charge_many(FIRST), FIRST) == expected
    clock.advance(timedelta(days=1))
    assert _batched(batch.charge_many(SECOND), SECOND) == expected_late
    assert _batched(batch.grant_many(GRANTS), GRANTS) == expected_grants

    assert _ledgers(batch, "abcde") == _ledgers(single, "abcde")
    assert [_event(event) for event in heard_batch] == [_event(event) for event in heard_single]
    kinds = {type(event).__name__ for event in heard_batch}
    assert {"Charged", "Denied", "LowBalance", "Refilled", "Granted"} <= kinds
    _check_invariant(batch, "abcde")


def test_strict_item_that_cannot_pay_is_reported_and_the_others_apply(meter):
    results = meter.charge_many(
        [
            ChargeItem("u", 5),
            ChargeItem("u", 10**6, strict=True),
            ChargeItem("v", 7),
            ChargeItem("u", 3),
        ]
    )
    assert [result.ok for result in results] == [True, False, True, True]
    refused = results[1].error
    assert isinstance(refused, InsufficientBalance)
    assert refused.available == Decimal(20000 - 5)
    assert results[3].entry.balance_after == Decimal(20000 - 8)
    assert meter.balance("u") == Decimal(20000 - 8)
    assert meter.balance("v") == Decimal(20000 - 7)
    assert [entry.kind for entry in meter.ledger("u")] == [
        EntryKind.OPEN,
        EntryKind.CHARGE,
        EntryKind.CHARGE,
    ]


def test_repeat_of_an_applied_request_returns_the_original_entry(meter):
    first = meter.charge("u", 40, request_id="r1")
    granted = meter.grant("u", 9, request_id="g1")
    results = meter.charge_many(
        [ChargeItem("u", 40, request_id="r1"), ChargeItem("u", 1, request_id="r2")]
    )
    assert results[0].entry == first
    assert results[1].entry.balance_after == Decimal(20000 - 40 + 9 - 1)
    again = meter.grant_many([GrantItem("u", 9, request_id="g1")])
    assert again[0].entry == granted
    assert meter.balance("u") == Decimal(20000 - 40 + 9 - 1)
    assert len(meter.ledger("u")) == 4  # open, charge, grant, charge


def test_request_id_reused_with_other_parameters_is_an_error_per_item(meter):
    meter.charge("u", 40, request_id="r1")
    results = meter.charge_many(
        [
            ChargeItem("u", 41, request_id="r1"),
            ChargeItem("u", 40, model="gpt-4o", request_id="r1"),
            ChargeItem("u", 2, request_id="r3"),
        ]
    )
    assert isinstance(results[0].error, IdempotencyConflict)
    assert isinstance(results[1].error, IdempotencyConflict)
    assert results[2].ok
    assert meter.balance("u") == Decimal(20000 - 42)
    grants = meter.grant_many([GrantItem("u", 5, request_id="r1")])  # a charge's id
    assert isinstance(grants[0].error, IdempotencyConflict)
    assert meter.balance("u") == Decimal(20000 - 42)


def test_duplicates_within_one_batch_behave_as_successive_calls(meter):
    results = meter.charge_many(
        [
            ChargeItem("u", 10, request_id="same"),
            ChargeItem("v", 10, request_id="same"),  # another user: its own request
            ChargeItem("u", 10, request_id="same"),
            ChargeItem("u", 11, request_id="same"),
            ChargeItem("u", 10**6, strict=True, request_id="refused"),
            ChargeItem("u", 1, request_id="refused"),  # nothing applied under it yet
        ]
    )
    assert results[2].entry == results[0].entry
    assert results[1].entry.user_id == "v"
    assert isinstance(results[3].error, IdempotencyConflict)
    assert isinstance(results[4].error, InsufficientBalance)
    assert results[5].ok
    assert meter.balance("u") == Decimal(20000 - 11)
    assert meter.store.find_request("u", "same") == results[0].entry


def test_a_refill_due_during_a_batch_is_applied_as_one_call_would(backend, clock):
    meter = backend.manager(LOUD, clock=clock)
    meter.charge("u", 1000)  # depleted
    clock.advance(timedelta(days=1))
    results = meter.charge_many(
        [ChargeItem("u", 300, strict=True), ChargeItem("u", 300, strict=True)]
    )
    assert results[0].ok
    assert isinstance(results[1].error, InsufficientBalance)
    kinds = [entry.kind for entry in meter.ledger("u")]
    assert kinds == [EntryKind.OPEN, EntryKind.CHARGE, EntryKind.REFILL, EntryKind.CHARGE]
    assert meter.balance("u") == Decimal(200)


BAD_BATCHES = {
    "not an item": [ChargeItem("u", 1), {"user_id": "u", "amount": 1}],
    "a grant item": [ChargeItem("u", 1), GrantItem("u", 1)],
    "empty user id": [ChargeItem("u", 1), ChargeItem("", 1)],
    "control character in user id": [ChargeItem("u", 1), ChargeItem("u\x00", 1)],
    "negative amount": [ChargeItem("u", 1), ChargeItem("u", -1)],
    "NaN amount": [ChargeItem("u", 1), ChargeItem("u", math.nan)],
    "infinite amount": [ChargeItem("u", 1), ChargeItem("u", Decimal("Infinity"))],
    "bool amount": [ChargeItem("u", 1), ChargeItem("u", True)],
    "neither amount nor usage": [ChargeItem("u", 1), ChargeItem("u", model="gpt-4o")],
    "usage of the wrong type": [ChargeItem("u", 1), ChargeItem("u", usage={"input": 3})],
    "incomplete with an amount": [ChargeItem("u", 1), ChargeItem("u", 5, incomplete=True)],
    "strict not a bool": [ChargeItem("u", 1), ChargeItem("u", 5, strict="yes")],
    "reserved request id": [ChargeItem("u", 1), ChargeItem("u", 5, request_id="hold:x")],
}


@pytest.mark.parametrize("case", sorted(BAD_BATCHES))
def test_a_bad_item_raises_naming_it_and_writes_nothing(meter, case):
    with pytest.raises(InvalidInput, match="item 1"):
        meter.charge_many(BAD_BATCHES[case])
    assert meter.users() == []


def test_bad_batches_as_a_whole_write_nothing(meter):
    with pytest.raises(InvalidInput, match="at most 10000"):
        meter.charge_many([ChargeItem("u", 1)] * 10_001)
    with pytest.raises(InvalidInput, match="list of ChargeItem"):
        meter.charge_many(None)
    with pytest.raises(InvalidInput, match="item 1"):
        meter.grant_many([GrantItem("u", 1), GrantItem("u", 0)])
    with pytest.raises(InvalidInput, match="item 0"):
        meter.grant_many([ChargeItem("u", 1)])
    assert meter.users() == []
    assert meter.charge_many([]) == []
    assert meter.grant_many(iter([])) == []
    assert meter.users() == []


def test_a_stale_last_seen_account_is_retried(backend, clock):
    heard: list[Any] = []
    first = backend.manager(clock=clock, on_event=heard.append)
    other = backend.manager(clock=clock)
    first.charge("u", 1)  # first has seen u at version 2
    other.charge("u", 5)  # now at version 3
    other.charge("w", 2)  # an account first never saw
    results = first.charge_many(
        [ChargeItem("u", 10), ChargeItem("w", 3), ChargeItem("u", 4), ChargeItem("n", 1)]
    )
    assert all(result.ok for result in results)
    assert results[0].entry.balance_after == Decimal(20000 - 16)
    assert results[2].entry.balance_after == Decimal(20000 - 20)
    assert results[1].entry.balance_after == Decimal(20000 - 5)
    assert any(isinstance(event, ConflictRetried) for event in heard)
    for user in "uwn":
        assert first.manager._seen[user] == first.store.load(user)
    _check_invariant(first, "uwn")


class _WithoutBatches:
    """A store that hides ``commit_many``, as a third party's store without it would."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        if name == "commit_many":
            raise AttributeError(name)
        return getattr(self.inner, name)


def test_a_store_without_commit_many_gives_the_same_results(backend, clock):
    start = clock()
    with_batches = backend.manager(LOUD, clock=clock)
    expected = _batched(with_batches.charge_many(FIRST), FIRST)
    clock.advance(timedelta(days=1))
    expected_late = _batched(with_batches.charge_many(SECOND), SECOND)

    clock.set(start)
    plain = _WithoutBatches(backend.store(backend.new_place()))
    without = backend.manager(LOUD, clock=clock, store=plain)
    assert not hasattr(without.manager.store, "commit_many")
    assert _batched(without.charge_many(FIRST), FIRST) == expected
    clock.advance(timedelta(days=1))
    assert _batched(without.charge_many(SECOND), SECOND) == expected_late
    assert _ledgers(without, "abcd") == _ledgers(with_batches, "abcd")


def test_grant_many_makes_credit_blocks_as_grant_does(backend, clock):
    """Block grants in a batch: the same blocks and draws as grant(); a past expiry is refused.

    Inputs tried: an expiring grant, a ranked grant, a plain grant, an expiry
    already past (refused for the whole batch, naming the item, nothing
    written).
    """
    later = clock() + timedelta(days=3)
    items = [
        GrantItem("blk", 30, expires_at=later),
        GrantItem("blk", 20, priority=5),
        GrantItem("blk", 10),
    ]
    single = backend.manager(LOUD, clock=clock)
    for item in items:
        single.grant("one", item.amount, expires_at=item.expires_at, priority=item.priority)
    batch = backend.manager(LOUD, clock=clock)
    assert all(result.ok for result in batch.grant_many(items))
    made = batch.account("blk").blocks
    expected = single.account("one").blocks
    assert [(b.amount, b.priority, b.expires_at) for b in made] == [
        (b.amount, b.priority, b.expires_at) for b in expected
    ]
    assert [b.priority for b in made] == [5, 50]  # ranked first, then the expiring one
    assert batch.charge("blk", 25).drawn == ((made[0].id, Decimal(20)), (made[1].id, Decimal(5)))
    with pytest.raises(InvalidInput, match="item 1: expires_at must be in the future"):
        batch.grant_many([GrantItem("new", 1), GrantItem("new", 1, expires_at=clock())])
    assert "new" not in batch.users()
    _check_invariant(batch, ["blk"])
