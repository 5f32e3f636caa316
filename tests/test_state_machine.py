"""Random operation sequences against each store, checked against a plain-Python model.

Two managers share one store (for SQLite: two connections to one file), so
steps alternate between a manager whose remembered account is fresh and one
whose account is stale, and the compare-and-set retry path runs all the time.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from creditmeter import (
    AsyncBalanceManager,
    AsyncMemoryStore,
    AsyncSQLiteStore,
    BalanceConfig,
    BalanceManager,
    IdempotencyConflict,
    InsufficientBalance,
    MemoryStore,
    SQLiteStore,
)
from creditmeter.testing import Blocking, FakeClock

USERS = st.sampled_from(["alice", "bob"])
REQUEST_IDS = st.sampled_from([None, None, "r1", "r2", "r3"])
AMOUNTS = st.one_of(
    st.integers(min_value=0, max_value=80),
    st.decimals(min_value=0, max_value=80, places=3, allow_nan=False, allow_infinity=False),
)
INTERVAL = timedelta(hours=1)


class Model:
    """What the balances should be, computed the obvious way."""

    def __init__(self, config: BalanceConfig) -> None:
        self.config = config
        self.balance: dict[str, Decimal] = {}
        self.last_refill: dict[str, object] = {}
        self.requests: dict[tuple[str, str], tuple[object, ...]] = {}

    def touch(self, user, now):
        if user not in self.balance:
            self.balance[user] = self.config.start_balance
            self.last_refill[user] = now

    def refill(self, user, now, cost):
        c = self.config
        if now < self.last_refill[user] + INTERVAL:
            return
        if c.refill_mode == "when_depleted" and self.balance[user] - cost > 0:
            return
        if c.refill_mode == "top_up":
            if self.balance[user] >= c.refill_amount:
                return
            self.balance[user] = c.refill_amount
        else:
            self.balance[user] += c.refill_amount
        self.last_refill[user] = max(self.last_refill[user], now)

    def spend(self, user, cost):
        if self.config.allow_negative_balance:
            self.balance[user] -= cost
        else:
            self.balance[user] -= min(cost, max(self.balance[user], Decimal(0)))


class BalanceMachine(RuleBasedStateMachine):
    config = BalanceConfig(
        enabled=True,
        start_balance=50,
        auto_refill_enabled=True,
        refill_interval_value=1,
        refill_interval_unit="hours",
        refill_amount=100,
    )
    kind = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.model = Model(self.config)
        self.folder = tempfile.mkdtemp(prefix="creditmeter-sm-")
        path = Path(self.folder) / "credits.db"
        self.closers = []
        if self.kind == "memory":
            store = MemoryStore()
            pair = (store, store)
        elif self.kind == "sqlite":
            pair = (SQLiteStore(path, durability="normal"), SQLiteStore(path, durability="normal"))
        if self.kind in ("memory", "sqlite"):
            self.closers = list({id(s): s for s in pair}.values())
            self.managers = [BalanceManager(s, self.config, clock=self.clock) for s in pair]
            self.reader = pair[0]
            return
        # Async stores and managers, driven through Blocking on one private loop.
        self.loop = asyncio.new_event_loop()
        if self.kind == "async-memory":
            shared = AsyncMemoryStore()
            stores = [shared, shared]
        else:
            stores = [
                AsyncSQLiteStore(path, durability="normal"),
                AsyncSQLiteStore(path, durability="normal"),
            ]
        self.managers = [
            Blocking(AsyncBalanceManager(s, self.config, clock=self.clock), loop=self.loop)
            for s in stores
        ]
        self.closers = [Blocking(s, loop=self.loop) for s in {id(s): s for s in stores}.values()]
        self.reader = Blocking(stores[0], loop=self.loop)

    def teardown(self) -> None:
        for closer in self.closers:
            closer.close()
        if self.kind.startswith("async"):
            self.loop.close()
        shutil.rmtree(self.folder, ignore_errors=True)

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
        saved = (dict(self.model.balance), dict(self.model.last_refill))
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
            if self.model.balance[user] < cost:
                with pytest.raises(InsufficientBalance):
                    manager.charge(user, amount, strict=True, request_id=request_id)
                # A refused strict charge writes nothing: no opening, no refill.
                self.model.balance, self.model.last_refill = saved
                return
        self._request(
            user,
            request_id,
            ("charge", cost),
            lambda: manager.charge(user, amount, strict=strict, request_id=request_id),
        )
        self.model.spend(user, cost)

    @rule(user=USERS, amount=AMOUNTS, which=st.integers(0, 1))
    def set_balance(self, user, amount, which):
        self.model.touch(user, self.clock())
        self.managers[which].set_balance(user, amount)
        self.model.balance[user] = Decimal(amount)

    @rule(user=USERS, cost=AMOUNTS, which=st.integers(0, 1))
    def refill(self, user, cost, which):
        now = self.clock()
        self.model.touch(user, now)
        before = self.model.balance[user]
        self.model.refill(user, now, Decimal(cost))
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
        self.model.refill(user, now, Decimal(cost or 0))
        result = self.managers[which].check(user, cost)
        balance = self.model.balance[user]
        assert result.balance == balance
        assert result.allowed == (balance > 0 if cost is None else balance >= Decimal(cost))

    @rule(minutes=st.integers(min_value=-120, max_value=300))
    def move_clock(self, minutes):
        self.clock.advance(timedelta(minutes=minutes))

    @precondition(lambda self: self.model.balance)
    @invariant()
    def ledgers_match_the_model(self):
        for user, balance in self.model.balance.items():
            account = self.reader.load(user)
            assert account is not None
            assert account.balance == balance
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


class SQLiteMachine(BalanceMachine):
    kind = "sqlite"


class AsyncMemoryMachine(BalanceMachine):
    kind = "async-memory"


class AsyncSQLiteMachine(BalanceMachine):
    kind = "async-sqlite"


class SQLiteTopUpMachine(NegativeTopUpMachine):
    kind = "sqlite"


FAST = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
SLOWER = settings(
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

TestMemoryMachine = BalanceMachine.TestCase
TestMemoryMachine.settings = FAST
TestMemoryTopUpMachine = NegativeTopUpMachine.TestCase
TestMemoryTopUpMachine.settings = FAST
TestMemoryOnIntervalMachine = OnIntervalMachine.TestCase
TestMemoryOnIntervalMachine.settings = FAST
TestSQLiteMachine = SQLiteMachine.TestCase
TestSQLiteMachine.settings = SLOWER
TestSQLiteTopUpMachine = SQLiteTopUpMachine.TestCase
TestSQLiteTopUpMachine.settings = SLOWER
TestAsyncMemoryMachine = AsyncMemoryMachine.TestCase
TestAsyncMemoryMachine.settings = FAST
TestAsyncSQLiteMachine = AsyncSQLiteMachine.TestCase
TestAsyncSQLiteMachine.settings = SLOWER
