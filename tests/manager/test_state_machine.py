"""Random operation sequences on all eight backends, checked against a plain-Python model.

Two managers share one place (for SQLite: two connections to one file; for
Redis and PostgreSQL: two clients on one prefix), so steps alternate between
a manager whose remembered account is fresh and one whose account is stale,
and the compare-and-set retry path runs all the time. Each example gets an
empty place of its own.

The rules are the same on every backend, so MemoryStore carries the bulk of
the examples and all three refill configurations; the other backends run
enough examples to prove their store keeps what the model says (and the
stores with a negative-balance configuration, the top-up one).
``CREDITMETER_LONG=1`` runs ten times the examples.
"""

from __future__ import annotations

import os
from datetime import timedelta
from decimal import Decimal

import pytest
from backends import BACKENDS, Backend
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from creditmeter import BalanceConfig, IdempotencyConflict, InsufficientBalance, InvalidInput
from creditmeter.rules import open_holds
from creditmeter.testing import FakeClock

USERS = st.sampled_from(["alice", "bob"])
REQUEST_IDS = st.sampled_from([None, None, "r1", "r2", "r3"])
AMOUNTS = st.one_of(
    st.integers(min_value=0, max_value=80),
    st.decimals(min_value=0, max_value=80, places=3, allow_nan=False, allow_infinity=False),
)
INTERVAL = timedelta(hours=1)
HOLDS = Bundle("holds")


class Model:
    """What the balances should be, computed the obvious way."""

    def __init__(self, config: BalanceConfig) -> None:
        self.config = config
        self.balance: dict[str, Decimal] = {}
        self.last_refill: dict[str, object] = {}
        self.requests: dict[tuple[str, str], tuple[object, ...]] = {}
        self.holds: dict[str, dict[str, tuple[Decimal, object]]] = {}
        self.resolved: dict[str, tuple[str, object]] = {}  # hold id -> (how, entry)
        # Users an admin set below what their holds set aside: available may be
        # negative until those holds resolve (calls in flight were authorized).
        self.set_below: set[str] = set()

    def touch(self, user, now):
        if user not in self.balance:
            self.balance[user] = self.config.start_balance
            self.last_refill[user] = now
            self.holds[user] = {}

    def snapshot(self):
        return (
            dict(self.balance),
            dict(self.last_refill),
            {user: dict(holds) for user, holds in self.holds.items()},
        )

    def restore(self, saved):
        self.balance, self.last_refill, self.holds = saved

    def wrote(self, user, now):
        """A write to the account drops the holds that expired."""
        self.holds[user] = {k: v for k, v in self.holds[user].items() if v[1] > now}

    def available(self, user, now):
        live = sum((a for a, expires in self.holds[user].values() if expires > now), Decimal(0))
        return self.balance[user] - live

    def refill(self, user, now, cost):
        c = self.config
        if now < self.last_refill[user] + INTERVAL:
            return False
        if c.refill_mode == "when_depleted" and self.available(user, now) - cost > 0:
            return False
        if c.refill_mode == "top_up":
            if self.balance[user] >= c.refill_amount:
                return False
            self.balance[user] = c.refill_amount
        else:
            self.balance[user] += c.refill_amount
        self.last_refill[user] = max(self.last_refill[user], now)
        return True

    def spend(self, user, cost, now):
        if self.config.allow_negative_balance:
            self.balance[user] -= cost
        else:
            self.balance[user] -= min(cost, max(self.available(user, now), Decimal(0)))


class BalanceMachine(RuleBasedStateMachine):
    config = BalanceConfig(
        enabled=True,
        start_balance=50,
        auto_refill_enabled=True,
        refill_interval_value=1,
        refill_interval_unit="hours",
        refill_amount=100,
    )

    def __init__(self, backend: Backend) -> None:
        super().__init__()
        self.backend = backend
        self.clock = FakeClock()
        self.model = Model(self.config)
        self.place = backend.new_place()
        self.managers = [
            backend.manager(self.config, place=self.place, clock=self.clock) for _ in range(2)
        ]
        self.reader = self.managers[0].store

    def teardown(self) -> None:
        self.backend.close_place(self.place)

    def _request(self, user, request_id, key, call):
        """Run ``call``; with a request id, check the repeat semantics against the model."""
        seen = self.model.requests.get((user, request_id)) if request_id else None
        if seen is not None:
            if seen[0] == key:
                assert call() == seen[1]
            else:
                with pytest.raises(IdempotencyConflict):
                    call()
            return None
        entry = call()
        if request_id:
            self.model.requests[(user, request_id)] = (key, entry)
        return entry

    @rule(
        user=USERS,
        amount=AMOUNTS.filter(lambda a: a > 0),
        request_id=REQUEST_IDS,
        which=st.integers(0, 1),
    )
    def grant(self, user, amount, request_id, which):
        self.model.touch(user, self.clock())
        replayed = request_id and (user, request_id) in self.model.requests
        if not replayed:
            self.model.wrote(user, self.clock())
        replay = request_id and (user, request_id) in self.model.requests
        self._request(
            user,
            request_id,
            ("grant", Decimal(amount)),
            lambda: self.managers[which].grant(user, amount, request_id=request_id),
        )
        if not replay:
            self.model.balance[user] += Decimal(amount)

    @rule(
        user=USERS,
        amount=AMOUNTS,
        request_id=REQUEST_IDS,
        strict=st.booleans(),
        which=st.integers(0, 1),
    )
    def charge(self, user, amount, request_id, strict, which):
        now = self.clock()
        saved = self.model.snapshot()
        self.model.touch(user, now)
        cost = Decimal(amount)
        manager = self.managers[which]
        if request_id and (user, request_id) in self.model.requests:
            self._request(
                user,
                request_id,
                ("charge", cost),
                lambda: manager.charge(user, amount, strict=strict, request_id=request_id),
            )
            return
        if strict:
            self.model.refill(user, now, cost)
            if self.model.available(user, now) < cost:
                with pytest.raises(InsufficientBalance):
                    manager.charge(user, amount, strict=True, request_id=request_id)
                # A refused strict charge writes nothing: no opening, no refill.
                self.model.restore(saved)
                return
        self._request(
            user,
            request_id,
            ("charge", cost),
            lambda: manager.charge(user, amount, strict=strict, request_id=request_id),
        )
        self.model.wrote(user, now)
        self.model.spend(user, cost, now)

    @rule(user=USERS, amount=AMOUNTS, which=st.integers(0, 1))
    def set_balance(self, user, amount, which):
        self.model.touch(user, self.clock())
        self.model.wrote(user, self.clock())
        self.managers[which].set_balance(user, amount)
        self.model.balance[user] = Decimal(amount)
        if self.model.available(user, self.clock()) < 0:
            self.model.set_below.add(user)

    @rule(user=USERS, cost=AMOUNTS, which=st.integers(0, 1))
    def refill(self, user, cost, which):
        now = self.clock()
        self.model.touch(user, now)
        before = self.model.balance[user]
        if self.model.refill(user, now, Decimal(cost)):
            self.model.wrote(user, now)
        entry = self.managers[which].maybe_refill(user, cost=cost)
        added = self.model.balance[user] - before
        if added:
            assert entry is not None
            assert entry.amount == added
        else:
            assert entry is None

    @rule(user=USERS, cost=st.one_of(st.none(), AMOUNTS), which=st.integers(0, 1))
    def check(self, user, cost, which):
        now = self.clock()
        self.model.touch(user, now)
        if self.model.refill(user, now, Decimal(cost or 0)):
            self.model.wrote(user, now)
        result = self.managers[which].check(user, cost)
        assert result.balance == self.model.balance[user]
        available = self.model.available(user, now)
        assert result.available == available
        assert result.allowed == (available > 0 if cost is None else available >= Decimal(cost))

    @rule(
        target=HOLDS,
        user=USERS,
        amount=AMOUNTS,
        minutes=st.integers(min_value=30, max_value=180),
        which=st.integers(0, 1),
    )
    def hold(self, user, amount, minutes, which):
        now = self.clock()
        saved = self.model.snapshot()
        self.model.touch(user, now)
        cost = Decimal(amount)
        self.model.refill(user, now, cost)
        manager = self.managers[which]
        if self.model.available(user, now) < cost:
            with pytest.raises(InsufficientBalance):
                manager.hold(user, amount, ttl=timedelta(minutes=minutes))
            self.model.restore(saved)
            return multiple()
        held = manager.hold(user, amount, ttl=timedelta(minutes=minutes))
        assert held.amount == cost
        assert held.expires_at == now + timedelta(minutes=minutes)
        self.model.wrote(user, now)
        self.model.holds[user][held.id] = (cost, held.expires_at)
        return held

    @rule(held=HOLDS, amount=AMOUNTS, which=st.integers(0, 1))
    def settle(self, held, amount, which):
        now = self.clock()
        user = held.user_id
        manager = self.managers[which]
        done = self.model.resolved.get(held.id)
        if done is not None:
            how, entry = done
            if how == "released":
                with pytest.raises(InvalidInput, match="released"):
                    manager.settle(held, amount)
            else:
                assert manager.settle(held, amount) == entry
            return
        entry = manager.settle(held, amount)
        self.model.wrote(user, now)
        self.model.holds[user].pop(held.id, None)
        self.model.spend(user, Decimal(amount), now)
        assert entry.cost == Decimal(amount)
        self.model.resolved[held.id] = ("settled", entry)

    @rule(held=HOLDS, which=st.integers(0, 1))
    def release(self, held, which):
        now = self.clock()
        user = held.user_id
        manager = self.managers[which]
        done = self.model.resolved.get(held.id)
        if done is not None:
            assert manager.release(held) == done[1]
            return
        entry = manager.release(held)
        assert entry.amount == 0
        self.model.wrote(user, now)
        self.model.holds[user].pop(held.id, None)
        self.model.resolved[held.id] = ("released", entry)

    @rule(minutes=st.integers(min_value=-120, max_value=300))
    def move_clock(self, minutes):
        self.clock.advance(timedelta(minutes=minutes))

    @precondition(lambda self: self.model.balance)
    @invariant()
    def ledgers_match_the_model(self):
        now = self.clock()
        for user, balance in self.model.balance.items():
            stored = self.reader.load(user)
            assert stored is not None
            assert stored.balance == balance
            assert stored.held == sum((h.amount for h in stored.holds), Decimal(0))
            account = open_holds(stored, now)
            assert account.available == self.model.available(user, now)
            assert {h.id for h in stored.holds} == set(self.model.holds[user])
            if not self.config.allow_negative_balance:
                assert account.balance >= 0
                if not self.model.holds[user]:
                    self.model.set_below.discard(user)  # every hold it was set below is gone
                if account.available < 0:
                    assert user in self.model.set_below
            entries = self.reader.ledger(user)
            running = Decimal(0)
            request_ids = set()
            for entry in entries:
                running += entry.amount
                assert entry.balance_after == running
                if entry.request_id is not None:
                    assert entry.request_id not in request_ids
                    request_ids.add(entry.request_id)
            assert running == account.balance
            if not self.config.allow_negative_balance:
                assert account.balance >= 0


class NegativeTopUpMachine(BalanceMachine):
    config = BalanceConfig(
        enabled=True,
        start_balance=50,
        auto_refill_enabled=True,
        refill_interval_value=1,
        refill_interval_unit="hours",
        refill_amount=100,
        refill_mode="top_up",
        allow_negative_balance=True,
    )


class OnIntervalMachine(BalanceMachine):
    config = BalanceConfig(
        enabled=True,
        start_balance=50,
        auto_refill_enabled=True,
        refill_interval_value=1,
        refill_interval_unit="hours",
        refill_amount=100,
        refill_mode="on_interval",
    )


LONG = os.environ.get("CREDITMETER_LONG") == "1"
MACHINES = {
    "when-depleted": BalanceMachine,
    "top-up": NegativeTopUpMachine,
    "on-interval": OnIntervalMachine,
}
# backend -> machine -> examples of 30 steps (ten times as many with CREDITMETER_LONG=1)
EXAMPLES = {
    "memory": {"when-depleted": 100, "top-up": 50, "on-interval": 50},
    "async-memory": {"when-depleted": 25},
    "sqlite": {"when-depleted": 20, "top-up": 10},
    "async-sqlite": {"when-depleted": 10},
    "redis": {"when-depleted": 10, "top-up": 5},
    "async-redis": {"when-depleted": 10},
    "postgres": {"when-depleted": 10, "top-up": 5},
    "async-postgres": {"when-depleted": 10},
}
assert set(EXAMPLES) == set(BACKENDS)


@pytest.mark.parametrize(
    ("backend", "machine"),
    [(backend, machine) for backend, machines in EXAMPLES.items() for machine in machines],
    indirect=["backend"],
)
def test_random_operations_match_the_model(backend: Backend, machine: str) -> None:
    examples = EXAMPLES[backend.name][machine] * (10 if LONG else 1)
    run_state_machine_as_test(
        lambda: MACHINES[machine](backend),
        settings=settings(
            max_examples=examples,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
