"""Credit blocks in the pure rules: grants that expire or rank, the draw-down order, expiry.

Inputs tried for a block grant: ``expires_at`` now, in the past and in the
future; each priority bound (0 and 100); the 1,001st open block. The same
rules through the manager on every backend: manager/test_credit_blocks.py.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from creditmeter import BalanceConfig, EntryKind, Hold, InvalidInput, rules

UTC = timezone.utc
T0 = datetime(2026, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)
ON = BalanceConfig(enabled=True, start_balance=Decimal(100))


def ids():
    counter = iter(range(1, 10**6))
    return lambda: f"e{next(counter)}"


class Book:
    """One account moved through the rules, its entries kept, as a store would."""

    def __init__(self, config: BalanceConfig = ON) -> None:
        self.config, self.new_id = config, ids()
        change = rules.open_account("u", config=config, now=T0, new_id=self.new_id)
        self.account, self.entries = change.account, list(change.entries)

    def apply(self, change: rules.Change) -> rules.Change:
        self.account = change.account
        self.entries += change.entries
        return change

    def grant(self, amount, at=T0, **block):
        return self.apply(
            rules.grant(
                self.account,
                "u",
                Decimal(amount),
                config=self.config,
                now=at,
                new_id=self.new_id,
                **block,
            )
        ).entry

    def charge(self, amount, at=T0):
        return self.apply(
            rules.charge(
                self.account,
                "u",
                Decimal(amount),
                config=self.config,
                now=at,
                new_id=self.new_id,
            )
        ).entry

    def check_sums(self):
        assert sum(e.amount for e in self.entries) == self.account.balance
        unrestricted = self.account.balance - sum(b.amount for b in self.account.blocks)
        assert self.account.unrestricted == unrestricted


def test_a_plain_grant_makes_no_block_and_a_charge_draws_nothing():
    book = Book()
    book.grant(10)
    entry = book.charge(5)
    assert book.account.blocks == ()
    assert entry.drawn == ()
    book.check_sums()


def test_charges_draw_by_priority_then_earliest_expiry_then_oldest_grant():
    book = Book()
    late = book.grant(10, expires_at=T0 + 9 * DAY)  # priority 50
    soon = book.grant(10, expires_at=T0 + 2 * DAY)  # priority 50, expires first
    never = book.grant(10, priority=50)  # same priority, never expires: after the dated ones
    first = book.grant(10, T0 + timedelta(hours=1), priority=0)
    entry = book.charge(35, T0 + timedelta(hours=2))
    assert entry.drawn == (
        (first.id, Decimal(10)),
        (soon.id, Decimal(10)),
        (late.id, Decimal(10)),
        (never.id, Decimal(5)),
    )
    assert [(b.id, b.amount) for b in book.account.blocks] == [(never.id, Decimal(5))]
    assert book.account.unrestricted == 100
    book.check_sums()


def test_the_plain_balance_pays_after_the_blocks_and_clamping_applies_to_it():
    book = Book()
    block = book.grant(20, expires_at=T0 + DAY)
    entry = book.charge(500)
    assert entry.amount == -120  # clamped at zero: 20 from the block, 100 from the balance
    assert entry.cost == 500
    assert entry.drawn == ((block.id, Decimal(20)),)
    assert book.account.balance == 0
    assert book.account.blocks == ()
    book.check_sums()


def test_a_negative_balance_goes_below_zero_outside_the_blocks():
    book = Book(BalanceConfig(enabled=True, start_balance=Decimal(0), allow_negative_balance=True))
    block = book.grant(5, priority=7)
    entry = book.charge(12)
    assert entry.drawn == ((block.id, Decimal(5)),)
    assert (book.account.balance, book.account.unrestricted) == (-7, -7)
    book.check_sums()


def test_expiry_writes_off_what_is_left_once_and_exactly_then():
    book = Book()
    block = book.grant(30, expires_at=T0 + DAY)
    book.charge(10)
    before = rules.expire(
        book.account, config=ON, now=T0 + DAY - timedelta(microseconds=1), new_id=book.new_id
    )
    assert before.entries == ()
    change = book.apply(rules.expire(book.account, config=ON, now=T0 + DAY, new_id=book.new_id))
    (entry,) = change.entries
    assert (entry.kind, entry.amount, entry.drawn) == (
        EntryKind.EXPIRE,
        Decimal(-20),
        ((block.id, Decimal(20)),),
    )
    assert book.account.blocks == ()
    assert book.account.balance == 100 + 30 - 10 - 20
    again = rules.expire(book.account, config=ON, now=T0 + 9 * DAY, new_id=book.new_id)
    assert again.entries == ()
    book.check_sums()


def test_any_operation_at_or_after_the_expiry_writes_it_first():
    book = Book()
    block = book.grant(30, expires_at=T0 + DAY)
    change = book.apply(
        rules.charge(book.account, "u", Decimal(5), config=ON, now=T0 + DAY, new_id=book.new_id)
    )
    assert [e.kind for e in change.entries] == [EntryKind.EXPIRE, EntryKind.CHARGE]
    assert change.entries[0].drawn == ((block.id, Decimal(30)),)
    assert change.entry.drawn == ()  # the block was gone: the plain balance paid
    book.check_sums()


def test_an_empty_block_is_dropped_without_an_expiry_entry():
    book = Book()
    book.grant(10, expires_at=T0 + DAY)
    book.charge(10)
    assert book.account.blocks == ()
    change = rules.expire(book.account, config=ON, now=T0 + 2 * DAY, new_id=book.new_id)
    assert change.entries == ()


def test_the_view_as_of_now_leaves_expired_blocks_out_before_anything_is_written():
    book = Book()
    book.grant(30, expires_at=T0 + DAY)
    view = rules.open_holds(book.account, T0 + DAY)
    assert (view.balance, view.blocks) == (100, ())
    assert rules.check(view, Decimal(101), config=ON).allowed is False
    assert rules.open_holds(book.account, T0).balance == 130


def test_a_hold_counted_against_expired_credits_settles_from_what_remains():
    book = Book(BalanceConfig(enabled=True, start_balance=Decimal(0)))
    book.grant(50, expires_at=T0 + DAY)
    hold = book.apply(
        rules.hold(
            book.account,
            "u",
            Decimal(40),
            hold_id="h",
            ttl=3 * DAY,
            config=book.config,
            now=T0,
            new_id=book.new_id,
        )
    ).account.holds[0]
    assert isinstance(hold, Hold)
    change = book.apply(
        rules.settle(
            book.account,
            "u",
            hold,
            Decimal(40),
            config=book.config,
            now=T0 + 2 * DAY,
            new_id=book.new_id,
        )
    )
    assert [e.kind for e in change.entries] == [EntryKind.EXPIRE, EntryKind.CHARGE]
    assert change.entry.amount == 0  # clamped: nothing remained
    assert change.entry.cost == 40
    book.check_sums()


def test_refill_expires_makes_each_refill_a_block_until_the_next_refill():
    config = BalanceConfig(
        enabled=True,
        start_balance=Decimal(0),
        auto_refill_enabled=True,
        refill_interval_value=30,
        refill_interval_unit="days",
        refill_amount=Decimal(100),
        refill_mode="on_interval",
        refill_expires=True,
    )
    book = Book(config)
    first = book.apply(
        rules.refill(book.account, "u", config=config, now=T0 + 30 * DAY, new_id=book.new_id)
    ).entry
    (block,) = book.account.blocks
    assert (block.id, block.amount, block.expires_at) == (first.id, 100, T0 + 60 * DAY)
    book.charge(30, T0 + 31 * DAY)
    second = book.apply(
        rules.refill(book.account, "u", config=config, now=T0 + 60 * DAY, new_id=book.new_id)
    )
    assert [e.kind for e in second.entries] == [EntryKind.EXPIRE, EntryKind.REFILL]
    assert second.entries[0].amount == -70  # what was left of the first month's allowance
    assert book.account.balance == 100  # no pile-up
    book.check_sums()


def test_a_refill_without_refill_expires_makes_no_block():
    config = BalanceConfig(
        enabled=True,
        start_balance=Decimal(0),
        auto_refill_enabled=True,
        refill_amount=Decimal(100),
        refill_mode="on_interval",
    )
    book = Book(config)
    book.apply(
        rules.refill(book.account, "u", config=config, now=T0 + 30 * DAY, new_id=book.new_id)
    )
    assert book.account.blocks == ()


@pytest.mark.parametrize("when", [T0, T0 - DAY])
def test_an_expiry_not_after_now_is_refused(when):
    book = Book()
    with pytest.raises(InvalidInput, match="expires_at must be in the future"):
        book.grant(10, T0, expires_at=when)


def test_the_thousand_and_first_open_block_is_refused():
    book = Book()
    for n in range(rules.MAX_BLOCKS):
        book.grant(1, T0 + timedelta(seconds=n), priority=n % 101)
    with pytest.raises(InvalidInput, match="1,000 open credit blocks"):
        book.grant(1, T0 + DAY, priority=3)
    assert len(book.account.blocks) == rules.MAX_BLOCKS


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["grant", "block", "charge", "advance"]),
            st.integers(min_value=1, max_value=60),
            st.integers(min_value=0, max_value=100),
        ),
        max_size=40,
    )
)
def test_random_books_balance_and_draw_in_order(steps):
    book = Book(BalanceConfig(enabled=True, start_balance=Decimal(20)))
    now = T0
    for action, amount, rank in steps:
        if action == "grant":
            book.grant(amount, now)
        elif action == "block":
            expires = None if rank % 3 == 0 else now + timedelta(hours=rank + 1)
            book.grant(amount, now, expires_at=expires, priority=rank if rank % 2 else None)
        elif action == "charge":
            before = book.account.blocks
            entry = book.charge(amount, now)
            order = [b.id for b in before if b.expires_at is None or b.expires_at > now]
            drawn_ids = [block_id for block_id, _ in entry.drawn]
            assert drawn_ids == order[: len(drawn_ids)]  # a prefix of the draw order
        else:
            now += timedelta(hours=amount)
        book.check_sums()
        assert book.account.balance >= 0
        assert all(b.amount > 0 for b in book.account.blocks)
