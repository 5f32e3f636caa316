"""Callbacks that call the manager back: events are told after the user's lock is let go.

An ``on_event`` callback may write through the manager that told it: a
``LowBalance`` auto top-up grants the same user, a ``Charged`` event bills an
organisation (a user on the same lock stripe, found with
``hash(id) % LOCK_STRIPES``), a ``Denied`` event of a strict charge grants the
user, a ``ConflictRetried`` event reads the balance, two threads bill each
other. On every backend: the callback returns its call to the manager,
which a sync manager has already made and an async one awaits (as it awaits
an ``async def`` callback). Each scenario must finish within WAIT seconds.
Events of one call keep their order.

Before the fix the sync callbacks deadlocked on the manager's lock stripe
(the thread never finished) and the async callbacks were never awaited.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from decimal import Decimal

import pytest
from backends import in_threads

from creditmeter import (
    BalanceConfig,
    Charged,
    ConflictRetried,
    Denied,
    Granted,
    InsufficientBalance,
    LowBalance,
)
from creditmeter._base import LOCK_STRIPES

WAIT = 10.0  # seconds a scenario may take before it counts as a deadlock
CONFIG = BalanceConfig(enabled=True, start_balance=1000)
ROUNDS = 200 if os.environ.get("CREDITMETER_LONG") == "1" else 50


def same_stripe(user: str) -> str:
    """Another id on ``user``'s lock stripe in this process (str hashes vary per process)."""
    stripe = hash(user) % LOCK_STRIPES
    for number in itertools.count():
        other = f"org-{number}"
        if hash(other) % LOCK_STRIPES == stripe:
            return other
    raise AssertionError("unreachable")  # pragma: no cover


def finishes(scenario: Callable[[], object]) -> object:
    """Run ``scenario`` in a thread; fail (not hang) if it has not finished within WAIT."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["result"] = scenario()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive(), "deadlocked: the call never returned"
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome.get("result")


def test_low_balance_top_up_from_the_callback(backend):
    heard: list[object] = []

    def top_up(event: object) -> object:
        heard.append(event)
        if isinstance(event, LowBalance):
            return meter.manager.grant(event.user_id, 500, reason="auto top-up")
        return None

    meter = backend.manager(CONFIG, on_event=top_up, low_balance_threshold=100)
    entry = finishes(lambda: meter.charge("alice", 950))
    assert meter.balance("alice") == 1000 - 950 + 500
    # One call's events in order: the charge, then the crossing; the grant's own after.
    assert [type(event) for event in heard] == [Charged, LowBalance, Granted]
    assert heard[0].entry == entry
    ledger = meter.ledger("alice")
    assert sum(e.amount for e in ledger) == ledger[-1].balance_after == 550


def test_billing_an_org_on_the_same_lock_stripe(backend):
    user = "alice"
    org = same_stripe(user)
    assert org != user
    assert hash(org) % LOCK_STRIPES == hash(user) % LOCK_STRIPES

    def bill_org(event: object) -> object:
        if isinstance(event, Charged) and event.user_id == user:
            return meter.manager.charge(
                org, -event.entry.amount, request_id=f"org:{event.entry.id}"
            )
        return None

    meter = backend.manager(CONFIG, on_event=bill_org)
    finishes(lambda: [meter.charge(user, 10) for _ in range(3)])
    assert meter.balance(user) == 970
    assert meter.balance(org) == 970


def test_denied_strict_charge_grants_from_the_callback(backend):
    def on_denied(event: object) -> object:
        if isinstance(event, Denied):
            return meter.manager.grant(event.user_id, event.cost)
        return None

    meter = backend.manager(CONFIG, on_event=on_denied)

    def refused_then_paid() -> Decimal:
        with pytest.raises(InsufficientBalance):
            meter.charge("alice", 5000, strict=True)
        return meter.charge("alice", 5000, strict=True).balance_after

    assert finishes(refused_then_paid) == 1000


def test_conflict_retried_callback_reads_the_manager(backend):
    heard: list[object] = []

    def on_conflict(event: object) -> object:
        if not isinstance(event, ConflictRetried):
            heard.append(type(event))
            return None
        if first.is_async:

            async def read() -> None:
                heard.append(("balance", await first.manager.balance(event.user_id)))

            return read()
        heard.append(("balance", first.manager.balance(event.user_id)))
        return None

    first = backend.manager(CONFIG, on_event=on_conflict)
    second = backend.manager(CONFIG)
    first.charge("alice", 1)
    second.charge("alice", 1)  # first's remembered account is stale now
    finishes(lambda: first.charge("alice", 1))
    # The retry's event is told after the call, before its charge's, in order.
    assert heard == [Charged, ("balance", 997), Charged]
    assert first.balance("alice") == 997


def test_two_threads_billing_each_other_never_deadlock(backend):
    """Thread one charges A, whose callback bills B; thread two the reverse (lock order A-B, B-A).

    With callbacks told under the lock, each thread held its user's stripe
    while waiting for the other's: a deadlock within a few rounds.
    """
    partner = {"a": "b", "b": "a"}

    def bill(event: object) -> object:
        if isinstance(event, Charged) and not (event.entry.metadata or {}).get("billed"):
            return meter.manager.charge(partner[event.user_id], 1, metadata={"billed": True})
        return None

    meter = backend.manager(BalanceConfig(enabled=True, start_balance=10**6), on_event=bill)
    users = ("a", "b")
    finishes(lambda: in_threads(2, lambda n: [meter.charge(users[n], 1) for _ in range(ROUNDS)]))
    assert meter.balance("a") == meter.balance("b") == 10**6 - 2 * ROUNDS


def test_plain_callbacks_hear_every_event_in_order(backend):
    heard: list[object] = []
    meter = backend.manager(CONFIG, on_event=heard.append, low_balance_threshold=100)
    meter.grant("alice", 1)
    meter.charge("alice", 950)
    with pytest.raises(InsufficientBalance):
        meter.charge("alice", 5000, strict=True)
    assert [type(event) for event in heard] == [Granted, Charged, LowBalance, Denied]


def test_a_batch_callback_tops_up_and_bills_users_of_the_same_batch(backend):
    """charge_many tells its events after every lock stripe of the batch is let go."""
    from creditmeter import ChargeItem  # noqa: PLC0415

    org = same_stripe("alice")

    def on_event(event: object) -> object:
        if isinstance(event, LowBalance):
            return meter.manager.grant(event.user_id, 500, reason="auto top-up")
        if isinstance(event, Charged) and event.user_id != org:
            return meter.manager.charge(org, 1)  # a user of the same batch and stripe
        return None

    meter = backend.manager(CONFIG, on_event=on_event, low_balance_threshold=100)
    results = finishes(lambda: meter.charge_many([ChargeItem("alice", 950), ChargeItem(org, 10)]))
    assert [result.ok for result in results] == [True, True]
    assert meter.balance("alice") == 1000 - 950 + 500
    assert meter.balance(org) == 1000 - 10 - 1  # billed once, for alice's charge
