"""Random operation sequences on every backend, checked against a plain-Python model.

Two managers share one place (for SQLite: two connections to one file; for
Redis and PostgreSQL: two clients on one prefix), so steps alternate between
a manager whose remembered account is fresh and one whose account is stale,
and the compare-and-set retry path runs all the time. Each example gets an
empty place of its own.

The steps: grants (plain, and credit blocks that expire or rank), charges
(strict or not, some repeating a request id), holds settled and released,
set_balance, refills, checks, account() reads, expire(), and the clock moving
back and forth past block and hold expiries. The model keeps the plain
(unrestricted) balance and the blocks apart, draws charges from the blocks
in order itself, and knows which call writes an expiry: after every step the
store must hold the same balance, plain balance, blocks (in draw order),
holds and ``EXPIRE`` entries, and its ledger must sum to the balance.

The rules are the same on every backend, so MemoryStore carries the bulk of
the examples and all four refill configurations; the other backends run
enough examples to prove their store keeps what the model says (and the
stores with a negative-balance configuration, the top-up one).
``CREDITMETER_LONG=1`` runs ten times the examples.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from decimal import Decimal
from typing import NamedTuple

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

from creditmeter import (
    BalanceConfig,
    EntryKind,
    IdempotencyConflict,
    InsufficientBalance,
    InvalidInput,
)
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
PRIORITIES = st.sampled_from([0, 10, 50, 50, 100])  # ties are frequent on purpose
# (minutes until it expires or None, priority or None): never both None (that is a plain grant).
BLOCK_SHAPES = st.one_of(
    st.tuples(st.integers(min_value=1, max_value=240), st.none() | PRIORITIES),
    st.tuples(st.none(), PRIORITIES),
)
ZERO = Decimal(0)


class Block(NamedTuple):
    """The model's credit block; ``id`` is None until the refill that made it is read."""

    id: str | None
    amount: Decimal
    granted: Decimal
    priority: int
    expires_at: datetime | None
    granted_at: datetime

    def alive(self, now: datetime) -> bool:
        return self.expires_at is None or self.expires_at > now


def draw_order(block):
    """Priority; then the earliest expiry, blocks that never expire after those that do;
    then the oldest grant; then the id (of a block or of a model block)."""
    expires = block.expires_at
    return (
        block.priority,
        expires is None,
        block.granted_at if expires is None else expires,
        block.granted_at,
        block.id or "",
    )


def fields(block):
    return (
        block.id,
        block.amount,
        block.granted,
        block.priority,
        block.expires_at,
        block.granted_at,
    )


class Model:
    """What the balances should be, computed the obvious way.

    ``plain`` is the balance outside credit blocks; ``blocks`` are the blocks
    the account record holds (expired ones stay until a write), kept in draw
    order; ``expired`` lists the (block id, credits) each ``EXPIRE`` entry
    must write off, in ledger order. The balance is ``plain`` plus the blocks.
    """

    def __init__(self, config: BalanceConfig) -> None:
        self.config = config
        self.plain: dict[str, Decimal] = {}
        self.blocks: dict[str, list[Block]] = {}
        self.expired: dict[str, list[tuple[str, Decimal]]] = {}
        self.last_refill: dict[str, object] = {}
        self.requests: dict[tuple[str, str], tuple[object, ...]] = {}
        self.holds: dict[str, dict[str, tuple[Decimal, object]]] = {}
        self.resolved: dict[str, tuple[str, object]] = {}  # hold id -> (how, entry)
        # Users an admin set below what their holds set aside, or whose holds were
        # counted against credits that then expired: available may be negative until
        # those holds resolve (calls in flight were authorized).
        self.set_below: set[str] = set()
        # Users an admin set below their blocks: the plain balance is negative, and
        # the balance too once the blocks are gone (see test_credit_blocks.py).
        self.below_blocks: set[str] = set()

    def touch(self, user, now):
        if user not in self.plain:
            self.plain[user] = self.config.start_balance
            self.blocks[user] = []
            self.expired[user] = []
            self.last_refill[user] = now
            self.holds[user] = {}

    def snapshot(self):
        return (
            dict(self.plain),
            {user: list(blocks) for user, blocks in self.blocks.items()},
            {user: list(gone) for user, gone in self.expired.items()},
            dict(self.last_refill),
            {user: dict(holds) for user, holds in self.holds.items()},
        )

    def restore(self, saved):
        self.plain, self.blocks, self.expired, self.last_refill, self.holds = saved

    def balance(self, user):
        """The balance the record holds: expired blocks count until a write drops them."""
        return self.plain[user] + sum((b.amount for b in self.blocks[user]), ZERO)

    def seen_balance(self, user, now):
        """The balance as of ``now``: expired blocks left out."""
        alive = (b.amount for b in self.blocks[user] if b.alive(now))
        return self.plain[user] + sum(alive, ZERO)

    def expiry_due(self, user, now):
        return any(not b.alive(now) for b in self.blocks[user])

    def wrote(self, user, now):
        """A write drops the holds that expired and writes off the blocks that did."""
        self.holds[user] = {k: v for k, v in self.holds[user].items() if v[1] > now}
        kept = []
        for block in self.blocks[user]:
            if block.alive(now):
                kept.append(block)
            else:
                self.expired[user].append((block.id, block.amount))
        self.blocks[user] = kept

    def put_block(self, user, block):
        self.blocks[user] = sorted([*self.blocks[user], block], key=draw_order)

    def available(self, user, now):
        live = sum((a for a, expires in self.holds[user].values() if expires > now), ZERO)
        return self.seen_balance(user, now) - live

    def refill_due(self, user, now, cost):
        """What a refill adds now (0: none is due), on the account as of ``now``."""
        c = self.config
        if now < self.last_refill[user] + INTERVAL:
            return ZERO
        if c.refill_mode == "when_depleted" and self.available(user, now) - cost > 0:
            return ZERO
        if c.refill_mode == "top_up":
            return max(c.refill_amount - self.seen_balance(user, now), ZERO)
        return c.refill_amount

    def refill(self, user, now, amount):
        """Apply a refill of ``amount`` (its write is done: call ``wrote`` first)."""
        if not amount:
            return
        if self.config.refill_expires:
            block = Block(None, amount, amount, 50, now + INTERVAL, now)
            self.put_block(user, block)
        else:
            self.plain[user] += amount
        self.last_refill[user] = max(self.last_refill[user], now)

    def spend(self, user, cost, now):
        """Take a charge of ``cost``: from the blocks in order, then the plain balance.

        Returns what it should draw from each block; call ``wrote`` first.
        """
        if self.config.allow_negative_balance:
            applied = cost
        else:
            applied = min(cost, max(self.available(user, now), ZERO))
        return self.take(user, applied)

    def take(self, user, applied):
        """Take ``applied`` (unclamped): from the blocks in order, then the plain balance."""
        left, drawn, kept = applied, [], []
        for block in self.blocks[user]:
            if left <= 0:
                kept.append(block)
                continue
            taken = min(left, block.amount)
            left -= taken
            drawn.append((block.id, taken))
            if taken < block.amount:
                kept.append(block._replace(amount=block.amount - taken))
        self.blocks[user] = kept
        self.plain[user] -= left
        return drawn

    def name_refill_block(self, user, block_id):
        """Give the refill block made last the id of its ``REFILL`` entry."""
        for number, block in enumerate(self.blocks[user]):
            if block.id is None:
                self.blocks[user][number] = block._replace(id=block_id)
        self.blocks[user].sort(key=draw_order)
        self.expired[user] = [(block_id if i is None else i, a) for i, a in self.expired[user]]


class BalanceMachine(RuleBasedStateMachine):
    config = BalanceConfig(
        enabled=True,
        start_balance=50,
        auto_refill_enabled=True,
        refill_interval_value=1,
        refill_interval_unit="hours",
        refill_amount=100,
    )
    # Added to the expiry of granted blocks: off the minute, so that none ever ties
    # with a refill block in draw order (the model learns a refill block's id late).
    grant_offset = timedelta(0)

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

    def _named(self, user, drawn=()):
        """After a step that may have refilled into a block: learn the block's id.

        Returns ``drawn`` with that id in place of None.
        """
        named = all(b.id is not None for b in self.model.blocks[user])
        if named and all(block_id is not None for block_id, _ in drawn):
            return drawn
        refills = [e for e in self.reader.ledger(user) if e.kind is EntryKind.REFILL]
        block_id = refills[-1].id
        self.model.name_refill_block(user, block_id)
        return [(block_id if i is None else i, a) for i, a in drawn]

    @rule(
        user=USERS,
        amount=AMOUNTS.filter(lambda a: a > 0),
        request_id=REQUEST_IDS,
        which=st.integers(0, 1),
    )
    def grant(self, user, amount, request_id, which):
        self.model.touch(user, self.clock())
        replay = request_id and (user, request_id) in self.model.requests
        if not replay:
            self.model.wrote(user, self.clock())
        self._request(
            user,
            request_id,
            ("grant", Decimal(amount)),
            lambda: self.managers[which].grant(user, amount, request_id=request_id),
        )
        if not replay:
            self.model.plain[user] += Decimal(amount)

    @rule(
        user=USERS,
        amount=AMOUNTS.filter(lambda a: a > 0),
        shape=BLOCK_SHAPES,
        which=st.integers(0, 1),
    )
    def grant_block(self, user, amount, shape, which):
        # Without request ids: their repeats are test_credit_blocks.py's.
        now = self.clock()
        minutes, priority = shape
        expires = None if minutes is None else now + timedelta(minutes=minutes) + self.grant_offset
        self.model.touch(user, now)
        self.model.wrote(user, now)
        entry = self.managers[which].grant(user, amount, expires_at=expires, priority=priority)
        assert (entry.kind, entry.amount, entry.drawn) == (EntryKind.GRANT, Decimal(amount), ())
        rank = 50 if priority is None else priority
        self.model.put_block(user, Block(entry.id, entry.amount, entry.amount, rank, expires, now))

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
        self.model.wrote(user, now)
        if strict:
            self.model.refill(user, now, self.model.refill_due(user, now, cost))
            if self.model.available(user, now) < cost:
                with pytest.raises(InsufficientBalance):
                    manager.charge(user, amount, strict=True, request_id=request_id)
                # A refused strict charge writes nothing: no opening, refill or expiry.
                self.model.restore(saved)
                return
        drawn = self.model.spend(user, cost, now)
        entry = self._request(
            user,
            request_id,
            ("charge", cost),
            lambda: manager.charge(user, amount, strict=strict, request_id=request_id),
        )
        assert list(entry.drawn) == self._named(user, drawn)

    @rule(user=USERS, amount=AMOUNTS, which=st.integers(0, 1))
    def set_balance(self, user, amount, which):
        now = self.clock()
        self.model.touch(user, now)
        self.model.wrote(user, now)
        entry = self.managers[which].set_balance(user, amount)
        change = Decimal(amount) - self.model.balance(user)
        if change < 0:  # lowering takes from the blocks first, as a charge does
            drawn = self.model.take(user, -change)
        else:
            self.model.plain[user] += change
            drawn = []
        assert list(entry.drawn) == self._named(user, drawn)
        if self.model.plain[user] < 0:
            self.model.below_blocks.add(user)
        if self.model.available(user, now) < 0:
            self.model.set_below.add(user)

    @rule(user=USERS, cost=AMOUNTS, which=st.integers(0, 1))
    def refill(self, user, cost, which):
        now = self.clock()
        self.model.touch(user, now)
        due = self.model.refill_due(user, now, Decimal(cost))
        if due or self.model.expiry_due(user, now):  # else rules.refill writes nothing
            self.model.wrote(user, now)
        self.model.refill(user, now, due)
        entry = self.managers[which].maybe_refill(user, cost=cost)
        if due:
            assert entry is not None
            assert (entry.kind, entry.amount) == (EntryKind.REFILL, due)
            self._named(user)
        else:
            assert entry is None

    @rule(user=USERS, cost=st.one_of(st.none(), AMOUNTS), which=st.integers(0, 1))
    def check(self, user, cost, which):
        now = self.clock()
        self.model.touch(user, now)
        due = self.model.refill_due(user, now, Decimal(cost or 0))
        if due:  # a check writes only a due refill (and what expired with it)
            self.model.wrote(user, now)
            self.model.refill(user, now, due)
        result = self.managers[which].check(user, cost)
        if due:
            self._named(user)
        assert result.balance == self.model.seen_balance(user, now)
        available = self.model.available(user, now)
        assert result.available == available
        assert result.allowed == (available > 0 if cost is None else available >= Decimal(cost))

    @rule(user=USERS, which=st.integers(0, 1))
    def read(self, user, which):
        now = self.clock()
        self.model.touch(user, now)
        if self.model.expiry_due(user, now):  # account() writes a due expiry, nothing else
            self.model.wrote(user, now)
        account = self.managers[which].account(user)
        assert account.balance == self.model.seen_balance(user, now)
        assert account.unrestricted == self.model.plain[user]
        assert account.available == self.model.available(user, now)
        assert [fields(b) for b in account.blocks] == [fields(b) for b in self.model.blocks[user]]

    @rule(user=USERS, which=st.integers(0, 1))
    def expire(self, user, which):
        now = self.clock()
        self.model.touch(user, now)
        before = len(self.model.expired[user])
        if self.model.expiry_due(user, now):
            self.model.wrote(user, now)
        written = self.managers[which].expire(user)
        expected = self.model.expired[user][before:]
        assert [(e.kind, e.drawn, e.amount) for e in written] == [
            (EntryKind.EXPIRE, ((block_id, amount),), -amount) for block_id, amount in expected
        ]

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
        self.model.wrote(user, now)
        self.model.refill(user, now, self.model.refill_due(user, now, cost))
        manager = self.managers[which]
        if self.model.available(user, now) < cost:
            with pytest.raises(InsufficientBalance):
                manager.hold(user, amount, ttl=timedelta(minutes=minutes))
            self.model.restore(saved)
            return multiple()
        held = manager.hold(user, amount, ttl=timedelta(minutes=minutes))
        self._named(user)
        assert held.amount == cost
        assert held.expires_at == now + timedelta(minutes=minutes)
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
        drawn = self.model.spend(user, Decimal(amount), now)
        assert entry.cost == Decimal(amount)
        assert list(entry.drawn) == drawn
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
        before = self.clock()
        now = self.clock.advance(timedelta(minutes=minutes))
        for user, blocks in self.model.blocks.items():
            passed = any(b.expires_at is not None and before < b.expires_at <= now for b in blocks)
            if passed and any(expires > now for _, expires in self.model.holds[user].values()):
                self.model.set_below.add(user)  # held credits expired under an open hold

    @precondition(lambda self: self.model.plain)
    @invariant()
    def ledgers_match_the_model(self):
        now = self.clock()
        model = self.model
        for user in model.plain:
            stored = self.reader.load(user)
            assert stored is not None
            assert stored.balance == model.balance(user)
            assert stored.unrestricted == model.plain[user]
            blocks = stored.blocks
            assert stored.balance == stored.unrestricted + sum((b.amount for b in blocks), ZERO)
            assert [fields(b) for b in blocks] == [fields(b) for b in model.blocks[user]]
            assert list(blocks) == sorted(blocks, key=draw_order)
            assert all(0 < b.amount <= b.granted for b in blocks)
            assert stored.held == sum((h.amount for h in stored.holds), ZERO)
            account = open_holds(stored, now)
            assert all(b.expires_at is None or b.expires_at > now for b in account.blocks)
            assert account.balance == model.seen_balance(user, now)
            assert account.available == model.available(user, now)
            assert {h.id for h in stored.holds} == set(model.holds[user])
            if not self.config.allow_negative_balance:
                if model.plain[user] >= 0:
                    model.below_blocks.discard(user)
                    assert account.balance >= 0
                    assert stored.balance >= 0
                else:  # only set_balance takes the plain balance below zero
                    assert user in model.below_blocks
                if not model.holds[user]:
                    model.set_below.discard(user)  # every hold it was set below is gone
                if account.available < 0:
                    assert user in model.set_below or user in model.below_blocks
            entries = self.reader.ledger(user)
            running = ZERO
            request_ids = set()
            for entry in entries:
                running += entry.amount
                assert entry.balance_after == running
                if entry.request_id is not None:
                    assert entry.request_id not in request_ids
                    request_ids.add(entry.request_id)
            assert running == stored.balance
            assert [(e.drawn, e.amount) for e in entries if e.kind is EntryKind.EXPIRE] == [
                (((block_id, amount),), -amount) for block_id, amount in model.expired[user]
            ]


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


class RefillExpiresMachine(BalanceMachine):
    config = BalanceConfig(
        enabled=True,
        start_balance=50,
        auto_refill_enabled=True,
        refill_interval_value=1,
        refill_interval_unit="hours",
        refill_amount=100,
        refill_expires=True,
    )
    grant_offset = timedelta(seconds=7)


LONG = os.environ.get("CREDITMETER_LONG") == "1"
MACHINES = {
    "when-depleted": BalanceMachine,
    "top-up": NegativeTopUpMachine,
    "on-interval": OnIntervalMachine,
    "refill-expires": RefillExpiresMachine,
}
# backend -> machine -> examples of 30 steps (ten times as many with CREDITMETER_LONG=1)
EXAMPLES = {
    "memory": {"when-depleted": 100, "top-up": 50, "on-interval": 50, "refill-expires": 50},
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
