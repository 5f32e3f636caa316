"""Every balance rule, as pure functions: an account, an operation and ``now`` in; a change out.

Nothing here reads a clock, touches a store or draws randomness: ``now`` and
``new_id`` (which names ledger entries) are passed in. The managers call these
functions between loading an account and committing the change they return,
so sync and async managers behave the same by construction.

Each operation function takes the account as last seen (``None`` when the
user has none yet, in which case the account is opened first) and returns a
``Change``: the account's next version, the ledger entries that lead to it,
and the version the store must still hold for the change to apply.
"""

from __future__ import annotations

import bisect
import calendar
import hashlib
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, NamedTuple

import attrs

from creditmeter._exact import EXACT
from creditmeter.config import BalanceConfig, RefillSettings
from creditmeter.events import Charged, Event, Expired, Granted, LowBalance, Refilled
from creditmeter.exceptions import IdempotencyConflict, InsufficientBalance, InvalidInput
from creditmeter.models import (
    Account,
    BalanceCheck,
    CreditBlock,
    EntryKind,
    Hold,
    LedgerEntry,
    build_account,
    build_entry,
    build_hold,
    total_held,
)
from creditmeter.pricing import Pricing, Rates
from creditmeter.queries import PERIODS, Period, UsageQuery, UsageRow
from creditmeter.usage import TokenUsage, counted_usage

__all__ = [
    "HOLD_PREFIX",
    "Change",
    "Delta",
    "Tally",
    "add_interval",
    "admits",
    "as_delta",
    "charge",
    "charge_delta",
    "charge_of",
    "check",
    "configure_refill",
    "counts_as_usage",
    "drop_hold",
    "effective_refill",
    "events_for",
    "grant",
    "hold",
    "hold_generation",
    "hold_of",
    "in_range",
    "open_account",
    "open_holds",
    "period_start",
    "rebase",
    "refill",
    "refill_due",
    "release",
    "replay",
    "request_hold_id",
    "set_balance",
    "settle",
    "settle_of",
    "sort_usage",
    "usage_sum",
]

IdFactory = Callable[[], str]
_ZERO = Decimal(0)
_CHARGE = EntryKind.CHARGE
DEFAULT_PRIORITY = 50
"""The priority of an expiring grant given none (Stripe's default): the middle of 0..100."""
MAX_PRIORITY = 100
MAX_BLOCKS = 1000
"""The most open credit blocks one account may hold."""
_DRAWING = frozenset({EntryKind.CHARGE, EntryKind.ADJUST})
HOLD_PREFIX = "hold:"
"""Request ids of the entries that resolve holds: ``hold:<hold id>``."""
MAX_HOLD_ID_LENGTH = 256 - len(HOLD_PREFIX)
"""The longest hold id: ``hold:<id>`` then fits the 256 characters of any request id."""


class Change(NamedTuple):
    """A new account version and the ledger entries that produce it, to commit together.

    ``expected_version`` is the version the store must hold for the commit to
    apply (``None``: the account must not exist yet). A tuple rather than an
    attrs class: one is built per write, so it must be cheap.
    """

    account: Account
    entries: tuple[LedgerEntry, ...]
    expected_version: int | None

    @property
    def entry(self) -> LedgerEntry:
        """The entry that records the operation asked for (the last one)."""
        return self.entries[-1]


_new_tuple = tuple.__new__  # Change(a, b, c) at half the cost, where every write builds one
# EXACT's methods, bound once: a lookup of the global and the method costs a write 60 ns.
_add, _subtract = EXACT.add, EXACT.subtract


# --- time ------------------------------------------------------------------

_FIXED_UNITS = {
    "seconds": timedelta(seconds=1),
    "minutes": timedelta(minutes=1),
    "hours": timedelta(hours=1),
    "days": timedelta(days=1),
    "weeks": timedelta(weeks=1),
}


def add_interval(start: datetime, value: int, unit: str) -> datetime:
    """Return ``start`` moved forward by ``value`` ``unit``s.

    Months are calendar months, clamped to the end of a shorter month:
    2024-01-31 + 1 month = 2024-02-29.
    """
    step = _FIXED_UNITS.get(unit)
    if step is not None:
        return start + step * value
    if unit != "months":
        msg = f"unknown interval unit {unit!r}"
        raise ValueError(msg)
    months = start.month - 1 + value
    year = start.year + months // 12
    month = months % 12 + 1
    day = min(start.day, calendar.monthrange(year, month)[1])
    return start.replace(year=year, month=month, day=day)


# --- opening ----------------------------------------------------------------


def open_account(
    user_id: str, *, config: BalanceConfig, now: datetime, new_id: IdFactory
) -> Change:
    """Open a new account: the start balance when balances are enabled, else 0."""
    balance = config.start_balance if config.enabled else _ZERO
    account = Account(
        user_id=user_id,
        balance=balance,
        version=1,
        created_at=now,
        updated_at=now,
        last_refill=now,
    )
    entry = LedgerEntry(
        id=new_id(),
        user_id=user_id,
        kind=EntryKind.OPEN,
        amount=balance,
        balance_after=balance,
        at=now,
    )
    return Change(account, (entry,), None)


class _Draft:
    """The account being changed by one operation, and the entries so far."""

    __slots__ = (
        "account",
        "balance",
        "blocks",
        "entries",
        "expected",
        "held",
        "holds",
        "last_refill",
        "user_id",
    )

    def __init__(
        self,
        account: Account | None,
        user_id: str,
        *,
        config: BalanceConfig,
        now: datetime,
        new_id: IdFactory,
        expire: bool = True,
    ) -> None:
        if account is None:
            opened = open_account(user_id, config=config, now=now, new_id=new_id)
            account = attrs.evolve(opened.account, version=0)
            self.entries: list[LedgerEntry] = list(opened.entries)
            self.expected: int | None = None
        else:
            self.entries = []
            self.expected = account.version
            if account.holds:
                account = _drop_expired_holds(account, now)
        self.account = account
        self.user_id = user_id
        self.balance = account.balance
        self.last_refill = account.last_refill
        self.holds = account.holds
        self.held = account.held
        self.blocks = account.blocks
        if expire and self.blocks:
            self.expire_blocks(now, new_id)

    def expire_blocks(self, now: datetime, new_id: IdFactory) -> None:
        """Write an ``EXPIRE`` entry for each block whose time came, and drop it."""
        kept: list[CreditBlock] = []
        for block in self.blocks:
            if block.expires_at is None or block.expires_at > now:
                kept.append(block)
            elif block.amount > _ZERO:
                self.add(
                    EntryKind.EXPIRE,
                    block.amount.copy_negate(),
                    now=now,
                    new_id=new_id,
                    drawn=((block.id, block.amount),),
                )
        if len(kept) != len(self.blocks):
            self.blocks = tuple(kept)

    def put_block(self, block: CreditBlock) -> None:
        """Add a credit block where it is drawn in turn."""
        if len(self.blocks) >= MAX_BLOCKS:
            raise InvalidInput(
                f"user {self.user_id!r} has {MAX_BLOCKS:,} open credit blocks, the most allowed"
            )
        added = list(self.blocks)
        bisect.insort_right(added, block, key=_draw_order)
        self.blocks = tuple(added)

    def draw(self, spent: Decimal) -> tuple[tuple[str, Decimal], ...]:
        """Take ``spent`` from the blocks in turn; what each gave (emptied blocks are dropped)."""
        if spent <= _ZERO or not self.blocks:
            return ()
        drawn: list[tuple[str, Decimal]] = []
        kept: list[CreditBlock] = []
        left = spent
        for block in self.blocks:
            if left <= _ZERO:
                kept.append(block)
                continue
            taken = min(left, block.amount)
            left = _subtract(left, taken)
            drawn.append((block.id, taken))
            if taken < block.amount:
                kept.append(attrs.evolve(block, amount=_subtract(block.amount, taken)))
        self.blocks = tuple(kept)
        return tuple(drawn)

    @property
    def available(self) -> Decimal:
        return _subtract(self.balance, self.held) if self.holds else self.balance

    def put_hold(self, hold: Hold) -> None:
        """Add a hold, keeping the holds in order of expiry."""
        self.holds, self.held = _with_hold(self.holds, self.held, hold)

    def take_hold(self, hold: Hold) -> Hold | None:
        """Remove a hold; return it, or ``None`` if it is not (or no longer) open."""
        holds = self.holds
        index = _hold_index(holds, hold)
        if index is None:
            return None
        found = holds[index]
        self.holds = holds[:index] + holds[index + 1 :]
        self.held = _subtract(self.held, found.amount)
        return found

    def add(
        self,
        kind: EntryKind,
        amount: Decimal,
        *,
        now: datetime,
        new_id: IdFactory,
        request_id: str | None = None,
        model: str | None = None,
        usage: TokenUsage | None = None,
        cost: Decimal | None = None,
        rates: Rates | None = None,
        metadata: dict[str, Any] | None = None,
        drawn: tuple[tuple[str, Decimal], ...] | None = None,
    ) -> None:
        if drawn is None:
            # What leaves the balance leaves the blocks first: a charge's credits, and a
            # lowering set_balance's (else the balance would go below zero when they expire).
            drawn = self.draw(amount.copy_negate()) if kind in _DRAWING else ()
        self.balance = balance = _add(self.balance, amount)
        self.entries.append(
            build_entry(
                new_id(),
                self.user_id,
                kind,
                amount,
                balance,
                now,
                request_id,
                model,
                usage,
                cost,
                rates,
                metadata,
                drawn,
            )
        )

    def finish(self, now: datetime) -> Change:
        return _new_tuple(
            Change,
            (
                _next_version(
                    self.account,
                    self.balance,
                    now,
                    self.last_refill,
                    holds=self.holds,
                    held=self.held,
                    blocks=self.blocks,
                ),
                tuple(self.entries),
                self.expected,
            ),
        )


def _expiry(hold: Hold) -> datetime:
    return hold.expires_at


def _with_hold(
    holds: tuple[Hold, ...], held: Decimal, hold: Hold
) -> tuple[tuple[Hold, ...], Decimal]:
    """``holds`` with ``hold`` added in order of expiry, and their new total."""
    if not holds:  # the total of one hold is its amount
        return (hold,), hold.amount
    if holds[-1].expires_at <= hold.expires_at:  # the usual place: last
        return (*holds, hold), _add(held, hold.amount)
    added = list(holds)
    bisect.insort_right(added, hold, key=_expiry)
    return tuple(added), _add(held, hold.amount)


def _hold_index(holds: tuple[Hold, ...], hold: Hold) -> int | None:
    """Where ``hold`` is among ``holds`` (in order of expiry), or ``None``."""
    expires_at, hold_id = hold.expires_at, hold.id
    index = bisect.bisect_left(holds, expires_at, key=_expiry)
    for found in holds[index:]:
        if found.expires_at != expires_at:
            break
        if found.id == hold_id:
            return index
        index += 1
    return None


def _next_version(
    account: Account,
    balance: Decimal,
    now: datetime,
    last_refill: datetime,
    *,
    holds: tuple[Hold, ...] | None = None,
    held: Decimal | None = None,
    blocks: tuple[CreditBlock, ...] | None = None,
) -> Account:
    updated = account.updated_at
    return build_account(
        account.user_id,
        balance,
        account.version + 1,
        account.created_at,
        now if now > updated else updated,  # noqa: FURB136 - max() costs a call here
        last_refill,
        account.refill,
        account.holds if holds is None else holds,
        account.held if held is None else held,
        account.blocks if blocks is None else blocks,
    )


def _charged(  # noqa: PLR0917 - positional: this is the hot path's last step
    account: Account,
    applied: Decimal,
    cost: Decimal,
    now: datetime,
    new_id: IdFactory,
    request_id: str | None,
    model: str | None,
    usage: TokenUsage | None,
    rates: Rates | None,
    metadata: dict[str, Any] | None,
    holds: tuple[Hold, ...],
    held: Decimal,
) -> Change:
    """One ``CHARGE`` entry of ``applied`` on an existing account, without a draft.

    The end of the fast paths of ``charge`` and ``settle`` (``holds`` and
    ``held``: what is left open after it): the same change as the draft's
    ``add`` and ``finish``, with ``_next_version`` written out.
    """
    after = _subtract(account.balance, applied)
    entry = build_entry(
        new_id(),
        account.user_id,
        _CHARGE,
        applied.copy_negate(),
        after,
        now,
        request_id,
        model,
        usage,
        cost,
        rates,
        metadata,
    )
    version, updated = account.version, account.updated_at
    return _new_tuple(
        Change,
        (
            build_account(
                account.user_id,
                after,
                version + 1,
                account.created_at,
                now if now > updated else updated,  # noqa: FURB136 - max() costs a call here
                account.last_refill,
                account.refill,
                holds,
                held,
                account.blocks,  # none: the fast paths run only without blocks
            ),
            (entry,),
            version,
        ),
    )


def _drop_expired_holds(account: Account, now: datetime) -> Account:
    holds = account.holds
    if holds[0].expires_at > now:  # in order of expiry: the first lives, all do
        return account
    # A hold expires when ``now`` reaches its expiry.
    cut = bisect.bisect_right(holds, now, key=_expiry)
    return attrs.evolve(
        account, holds=holds[cut:], held=_subtract(account.held, total_held(holds[:cut]))
    )


def open_holds(account: Account, now: datetime) -> Account:
    """The account as of ``now``: expired holds and credit blocks are left out (not counted).

    A block left out takes its remaining credits out of the balance, as the
    ``EXPIRE`` entry the next write makes will.
    """
    if account.holds:
        account = _drop_expired_holds(account, now)
    if account.blocks and expiry_due(account, now):
        kept = tuple(b for b in account.blocks if b.expires_at is None or b.expires_at > now)
        gone = _ZERO
        for block in account.blocks:
            if block.expires_at is not None and block.expires_at <= now:
                gone = _add(gone, block.amount)
        account = attrs.evolve(account, blocks=kept, balance=_subtract(account.balance, gone))
    return account


def expiry_due(account: Account, now: datetime) -> bool:
    """Whether a credit block of the account has reached its expiry and is still recorded."""
    return any(b.expires_at is not None and b.expires_at <= now for b in account.blocks)


def _draw_order(block: CreditBlock) -> tuple[int, bool, datetime, datetime, str]:
    """Blocks are drawn by priority, then earliest expiry (never last), then oldest grant."""
    expires = block.expires_at
    return (
        block.priority,
        expires is None,
        block.granted_at if expires is None else expires,
        block.granted_at,
        block.id,
    )


def expire(account: Account, *, config: BalanceConfig, now: datetime, new_id: IdFactory) -> Change:
    """Write the expiry of every credit block whose time came (a no-op change if none)."""
    if not expiry_due(account, now):
        return Change(account, (), account.version)
    draft = _Draft(account, account.user_id, config=config, now=now, new_id=new_id)
    return draft.finish(now)


# --- refills ----------------------------------------------------------------


def effective_refill(account: Account, config: BalanceConfig) -> RefillSettings:
    """The refill settings that apply to ``account``: its own, else the config's."""
    return account.refill if account.refill is not None else config.refill


def refill_due(  # noqa: PLR0911 - one return per reason a refill is not due
    account: Account, *, config: BalanceConfig, now: datetime, cost: Decimal = _ZERO
) -> Decimal:
    """How many credits a refill adds now; zero when none is due.

    A refill is due when balances are enabled, the account's refill settings
    are enabled with an amount above zero, and a full interval has passed
    since the last refill. Then ``"when_depleted"`` (LibreChat) refills only if
    the available balance minus ``cost`` is zero or less, ``"on_interval"``
    always, and ``"top_up"`` adds what lifts the balance to the refill amount.
    However many intervals were missed, one refill is due.
    """
    if not config.enabled:
        return _ZERO
    settings = account.refill
    if settings is None:
        enabled, amount = config.auto_refill_enabled, config.refill_amount
        value, unit = config.refill_interval_value, config.refill_interval_unit
    else:
        enabled, amount = settings.enabled, settings.amount
        value, unit = settings.interval_value, settings.interval_unit
    if not enabled or amount <= _ZERO:
        return _ZERO
    try:
        due_at = add_interval(account.last_refill, value, unit)
    except (OverflowError, ValueError):  # an interval past year 9999 never comes
        return _ZERO
    if now < due_at:
        return _ZERO
    mode = config.refill_mode
    if mode == "when_depleted":
        return amount if _subtract(account.available, cost) <= _ZERO else _ZERO
    if mode == "top_up":
        return max(_subtract(amount, account.balance), _ZERO)
    return amount


def _apply_refill(
    draft: _Draft,
    *,
    config: BalanceConfig,
    now: datetime,
    new_id: IdFactory,
    cost: Decimal,
    metadata: dict[str, Any] | None = None,
) -> None:
    current = draft.account
    if draft.balance != current.balance:
        current = attrs.evolve(current, balance=draft.balance)
    amount = refill_due(current, config=config, now=now, cost=cost)
    if amount > _ZERO:
        draft.add(EntryKind.REFILL, amount, now=now, new_id=new_id, metadata=metadata)
        draft.last_refill = max(draft.last_refill, now)
        if config.refill_expires:
            _refill_block(draft, current, amount, config=config, now=now)


def _refill_block(
    draft: _Draft, account: Account, amount: Decimal, *, config: BalanceConfig, now: datetime
) -> None:
    """Make a refill's credits a block that expires at the next refill (use it or lose it)."""
    settings = effective_refill(account, config)
    try:
        next_refill: datetime | None = add_interval(
            draft.last_refill, settings.interval_value, settings.interval_unit
        )
    except (OverflowError, ValueError):  # an interval past year 9999: the credits stay
        next_refill = None
    draft.put_block(
        CreditBlock(
            id=draft.entries[-1].id,
            amount=amount,
            granted=amount,
            priority=DEFAULT_PRIORITY,
            expires_at=next_refill,
            granted_at=now,
        )
    )


def refill(
    account: Account | None,
    user_id: str,
    *,
    config: BalanceConfig,
    now: datetime,
    new_id: IdFactory,
    cost: Decimal = _ZERO,
    metadata: dict[str, Any] | None = None,
) -> Change | None:
    """Apply a due refill; ``None`` when the account exists and no refill is due.

    A missing account is opened (and, if a refill is then due, refilled).
    ``last_refill`` becomes ``now`` and never moves backwards. ``metadata``
    goes on the ``REFILL`` entry.
    """
    draft = _Draft(account, user_id, config=config, now=now, new_id=new_id)
    _apply_refill(draft, config=config, now=now, new_id=new_id, cost=cost, metadata=metadata)
    if not draft.entries:
        return None
    return draft.finish(now)


# --- operations -------------------------------------------------------------


def grant(
    account: Account | None,
    user_id: str,
    amount: Decimal,
    *,
    config: BalanceConfig,
    now: datetime,
    new_id: IdFactory,
    request_id: str | None = None,
    metadata: dict[str, Any] | None = None,
    expires_at: datetime | None = None,
    priority: int | None = None,
) -> Change:
    """Add ``amount`` credits. Grants move credits even when balances are disabled.

    With ``expires_at`` or ``priority`` the credits form a ``CreditBlock``
    (its id: the grant entry's), drawn before the plain balance and, if it
    expires, written off when its time comes; an expiring grant given no
    priority gets ``DEFAULT_PRIORITY``. ``expires_at`` must be after ``now``.
    """
    if expires_at is not None and expires_at <= now:
        raise InvalidInput(f"expires_at must be in the future, got {expires_at} (now {now})")
    draft = _Draft(account, user_id, config=config, now=now, new_id=new_id)
    draft.add(
        EntryKind.GRANT, amount, now=now, new_id=new_id, request_id=request_id, metadata=metadata
    )
    if expires_at is not None or priority is not None:
        draft.put_block(
            CreditBlock(
                id=draft.entries[-1].id,
                amount=amount,
                granted=amount,
                priority=DEFAULT_PRIORITY if priority is None else priority,
                expires_at=expires_at,
                granted_at=now,
                request_id=request_id,
            )
        )
    return draft.finish(now)


def set_balance(
    account: Account | None,
    user_id: str,
    target: Decimal,
    *,
    config: BalanceConfig,
    now: datetime,
    new_id: IdFactory,
    request_id: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> Change:
    """Set the balance to ``target`` with one ``ADJUST`` entry of the difference.

    Lowering it takes from the credit blocks first, as a charge does (so the
    balance cannot fall below ``target`` when they expire); raising it adds to
    the plain balance.
    """
    draft = _Draft(account, user_id, config=config, now=now, new_id=new_id)
    draft.add(
        EntryKind.ADJUST,
        _subtract(target, draft.balance),
        now=now,
        new_id=new_id,
        request_id=request_id,
        metadata=metadata,
    )
    return draft.finish(now)


def charge(
    account: Account | None,
    user_id: str,
    cost: Decimal,
    *,
    config: BalanceConfig,
    now: datetime,
    new_id: IdFactory,
    strict: bool = False,
    request_id: str | None = None,
    model: str | None = None,
    usage: TokenUsage | None = None,
    rates: Rates | None = None,
    metadata: dict[str, Any] | None = None,
) -> Change:
    """Spend ``cost`` credits.

    The balance drops by ``cost``, clamped so that the available balance
    (balance less open holds) stays at zero or above, unless the config allows
    a negative balance; the entry keeps the full cost. With balances disabled
    the charge is recorded but moves nothing. ``strict=True`` first applies a
    due refill, then raises ``InsufficientBalance`` (nothing to commit) when
    the available balance cannot pay.
    """
    return charge_of(
        user_id,
        cost,
        config,
        strict,
        request_id,
        model,
        usage,
        rates,
        metadata,
        new_id,
        account,
        now,
    )


def charge_of(  # noqa: PLR0917 - positional: a manager binds all but the last two once
    user_id: str,
    cost: Decimal,
    config: BalanceConfig,
    strict: bool,
    request_id: str | None,
    model: str | None,
    usage: TokenUsage | None,
    rates: Rates | None,
    metadata: dict[str, Any] | None,
    new_id: IdFactory,
    account: Account | None,
    now: datetime,
) -> Change:
    """``charge``, its arguments in an order to bind with ``functools.partial``.

    A manager binds what the call decided (all but ``account`` and ``now``)
    and runs the result on each try: a plan without a closure's cells and
    keyword arguments, which a charge would pay for on every call.
    """
    if (
        account is not None
        and not account.holds
        and not account.blocks
        and not (strict and config.enabled)
    ):
        # The common case, without a draft: one entry on an existing account.
        if config.allow_negative_balance and config.enabled:  # _applied's answer, inline
            applied = cost
        else:
            applied = _applied(cost, account.balance, config)
        return _charged(
            account,
            applied,
            cost,
            now,
            new_id,
            request_id,
            model,
            usage,
            rates,
            metadata,
            (),
            account.held,
        )
    draft = _Draft(account, user_id, config=config, now=now, new_id=new_id)
    if strict and config.enabled:
        _apply_refill(draft, config=config, now=now, new_id=new_id, cost=cost)
        available = draft.available
        if available < cost:
            raise InsufficientBalance(
                user_id, balance=draft.balance, available=available, cost=cost
            )
    draft.add(
        EntryKind.CHARGE,
        _applied(cost, draft.available, config).copy_negate(),
        now=now,
        new_id=new_id,
        request_id=request_id,
        model=model,
        usage=usage,
        cost=cost,
        rates=rates,
        metadata=metadata,
    )
    return draft.finish(now)


class Delta(NamedTuple):
    """A charge planned on an account seen earlier, that holds for any balance above a floor.

    ``change`` is the charge as planned on the seen account. It stays right
    for any stored account that equals the seen one in every field but
    ``balance``, ``version`` and ``updated_at``, as long as the stored
    balance is at least ``floor`` (``None``: any balance): the charge then
    moves the balance by the entry's ``amount``, ``updated_at`` becomes the
    later of the two, and nothing else is decided by what is stored. A store that offers
    ``commit_delta`` applies it to the version it holds, in one step, so
    writers of one hot user stop losing compare-and-sets to each other.
    """

    change: Change
    floor: Decimal | None


def charge_delta(
    account: Account | None,
    user_id: str,
    cost: Decimal,
    *,
    config: BalanceConfig,
    now: datetime,
    new_id: IdFactory,
    strict: bool = False,
    request_id: str | None = None,
    model: str | None = None,
    usage: TokenUsage | None = None,
    rates: Rates | None = None,
    metadata: dict[str, Any] | None = None,
) -> Delta | None:
    """``charge`` as a ``Delta``, or ``None`` where its outcome depends on more than the balance.

    ``None`` for a user without an account, a strict charge while balances
    are enabled (it may refill or refuse), and what ``as_delta`` refuses.
    """
    if account is None or (strict and config.enabled):
        return None
    change = charge(
        account,
        user_id,
        cost,
        config=config,
        now=now,
        new_id=new_id,
        request_id=request_id,
        model=model,
        usage=usage,
        rates=rates,
        metadata=metadata,
    )
    return as_delta(account, change, config=config)


def as_delta(seen: Account, change: Change, *, config: BalanceConfig) -> Delta | None:
    """The change of a charge planned on ``seen`` (not strict), as a ``Delta``; or ``None``.

    ``None`` when ``seen`` has holds or credit blocks (a charge draws on
    them), or when the seen balance clamped the charge. Otherwise the floor
    is the cost where clamping could happen (balances enabled, no negative
    balance allowed): at or above it the whole cost is taken.
    """
    if seen.holds or seen.blocks or len(change.entries) != 1:
        return None
    entry = change.entries[0]
    cost = entry.cost
    if entry.kind is not _CHARGE or cost is None:
        return None
    if not config.enabled or config.allow_negative_balance:
        return Delta(change, None)
    if entry.amount != cost.copy_negate():  # clamped on the seen balance
        return None
    return Delta(change, cost)


def rebase(delta: Delta, balance: Decimal, version: int, updated_at: datetime) -> Change:
    """What a store made of ``delta``: its account and entry, as the store wrote them.

    ``balance``, ``version`` and ``updated_at`` are the account's after the
    charge (see ``commit_delta`` in ``stores.base``).
    """
    account, entries, _ = delta.change
    entry = attrs.evolve(entries[-1], balance_after=balance)
    after = attrs.evolve(account, balance=balance, version=version, updated_at=updated_at)
    return Change(after, (entry,), version - 1)


def request_hold_id(request_id: str, generation: int = 0) -> str:
    """The id of a hold asked for under ``request_id``: the same for every retry of one hold.

    Each hold of a request that was released before gets the next
    ``generation`` (see ``hold_generation``): ``req:<id>``, then ``req1:<id>``,
    ``req2:<id>``... An id too long for ``MAX_HOLD_ID_LENGTH`` is replaced by
    its SHA-256 (``rqh:<hex>``, ``rqh1:<hex>``...). The tag before the colon
    tells the forms apart, and ids from ``new_id`` have no colon.
    """
    tag = "" if generation == 0 else str(generation)
    plain = f"req{tag}:{request_id}"
    if len(plain) <= MAX_HOLD_ID_LENGTH:
        return plain
    digest = hashlib.sha256(request_id.encode("utf-8")).hexdigest()
    return f"rqh{tag}:{digest}"


def hold_generation(resolved: int, last: LedgerEntry | None) -> int:
    """Which generation a hold asked for under a request id takes (see ``request_hold_id``).

    ``resolved`` generations of the request's holds were resolved already,
    the last one by the entry ``last`` (``None`` when none was). A request
    whose last hold was released holds anew, under the next generation, so
    that its settle charges; one whose last hold was settled takes that
    hold's id again, so that settling it again replays the first charge.
    """
    if last is None or last.kind is EntryKind.RELEASE:
        return resolved
    return resolved - 1


def hold(
    account: Account | None,
    user_id: str,
    amount: Decimal,
    *,
    hold_id: str,
    ttl: timedelta,
    config: BalanceConfig,
    now: datetime,
    new_id: IdFactory,
    request_id: str | None = None,
) -> Change:
    """Set ``amount`` credits aside for a call in flight, until settled, released or expired.

    A due refill is applied first; then, with balances enabled, the hold is
    refused (``InsufficientBalance``) unless the available balance covers it.
    A hold writes no ledger entry: the entry that resolves it does. Asking
    again with the ``request_id`` of a hold still open changes nothing (an
    open hold of the request under another id is one resolved since this
    account was read: the commit will find it stale).
    """
    return hold_of(user_id, amount, hold_id, ttl, config, request_id, new_id, account, now)


def hold_of(  # noqa: C901, PLR0917 - positional: a manager binds all but the last two once
    user_id: str,
    amount: Decimal,
    hold_id: str,
    ttl: timedelta,
    config: BalanceConfig,
    request_id: str | None,
    new_id: IdFactory,
    account: Account | None,
    now: datetime,
) -> Change:
    """``hold``, its arguments in an order to bind with ``functools.partial``."""
    if (
        account is not None
        and request_id is None
        and not account.blocks
        and (not account.holds or account.holds[0].expires_at > now)
        # No refill can be due without refill settings; else ask refill_due.
        and (
            (account.refill is None and not config.auto_refill_enabled)
            or not refill_due(account, config=config, now=now, cost=amount)
        )
    ):
        # The common case, without a draft: nothing opens, expires or refills.
        balance, holds, total = account.balance, account.holds, account.held
        if config.enabled and (_subtract(balance, total) if holds else balance) < amount:
            raise InsufficientBalance(
                user_id, balance=balance, available=account.available, cost=amount
            )
        try:
            expires_at = now + ttl
        except OverflowError:
            raise InvalidInput(f"ttl {ttl} runs past the year 9999") from None
        made = build_hold(hold_id, user_id, amount, now, expires_at)
        if not holds:  # the total of one hold is its amount
            holds, total = (made,), amount
        else:
            holds, total = _with_hold(holds, total, made)
        version, updated = account.version, account.updated_at
        after = build_account(  # _next_version, written out
            account.user_id,
            balance,
            version + 1,
            account.created_at,
            now if now > updated else updated,  # noqa: FURB136 - max() costs a call here
            account.last_refill,
            account.refill,
            holds,
            total,
            account.blocks,
        )
        return _new_tuple(Change, (after, (), version))
    draft = _Draft(account, user_id, config=config, now=now, new_id=new_id)
    if request_id is not None:
        for held in draft.holds:
            if held.id == hold_id and held.request_id == request_id:
                if held.amount != amount:
                    raise IdempotencyConflict(
                        user_id, request_id, detail=f"hold amount was {held.amount}, now {amount}"
                    )
                return Change(draft.account, (), draft.account.version)
    if config.enabled:
        _apply_refill(draft, config=config, now=now, new_id=new_id, cost=amount)
        available = draft.available
        if available < amount:
            raise InsufficientBalance(
                user_id, balance=draft.balance, available=available, cost=amount
            )
    draft.put_hold(
        Hold(
            id=hold_id,
            user_id=user_id,
            amount=amount,
            created_at=now,
            expires_at=_hold_expiry(now, ttl),
            request_id=request_id,
        )
    )
    return draft.finish(now)


def _hold_expiry(now: datetime, ttl: timedelta) -> datetime:
    # As the fast path of ``hold``, which writes it out.
    try:
        return now + ttl
    except OverflowError:
        raise InvalidInput(f"ttl {ttl} runs past the year 9999") from None


def hold_size(
    pricing: Pricing,
    model: str | None,
    *,
    prompt: TokenUsage | None,
    max_output: int | None,
) -> Decimal:
    """What to hold before a call: its prompt plus its most completion tokens, priced.

    The completion is priced at the model's completion rate, so the hold
    covers the dearest answer the request allows (no limit given: none).
    """
    planned = (prompt or TokenUsage()) + TokenUsage(output=max_output or 0)
    return pricing.price(model, planned)[0]


def settle(
    account: Account | None,
    user_id: str,
    hold: Hold,
    cost: Decimal,
    *,
    config: BalanceConfig,
    now: datetime,
    new_id: IdFactory,
    model: str | None = None,
    usage: TokenUsage | None = None,
    rates: Rates | None = None,
    metadata: dict[str, Any] | None = None,
) -> Change:
    """Resolve a hold with a charge of the actual ``cost`` (more or less than was held).

    The hold is removed if it is still open; an expired hold is charged all
    the same (the work was done). The charge is clamped like any charge. Its
    entry's request id, ``hold:<id>``, makes a hold resolvable only once.
    """
    return settle_of(
        user_id, hold, cost, config, model, usage, rates, metadata, new_id, account, now
    )


def settle_of(  # noqa: PLR0917 - positional: a manager binds all but the last two once
    user_id: str,
    hold: Hold,
    cost: Decimal,
    config: BalanceConfig,
    model: str | None,
    usage: TokenUsage | None,
    rates: Rates | None,
    metadata: dict[str, Any] | None,
    new_id: IdFactory,
    account: Account | None,
    now: datetime,
) -> Change:
    """``settle``, its arguments in an order to bind with ``functools.partial``."""
    if (
        account is not None
        and account.holds
        and account.holds[0].expires_at > now
        and not account.blocks
    ):
        # The common case, without a draft: the hold is open and none has expired.
        holds = account.holds
        # Holds are in order of expiry: the one settled is most often the first.
        first = holds[0]
        if first is hold or (first.id == hold.id and first.expires_at == hold.expires_at):
            index: int | None = 0
        else:
            index = _hold_index(holds, hold)
        if index is not None:
            if len(holds) == 1:  # the last open hold: none is left to total
                held, holds = _ZERO, ()
            else:
                held = _subtract(account.held, holds[index].amount)
                holds = holds[1:] if index == 0 else holds[:index] + holds[index + 1 :]
            if config.allow_negative_balance and config.enabled:  # _applied's answer, inline
                applied = cost
            else:
                balance = account.balance
                applied = _applied(cost, _subtract(balance, held) if holds else balance, config)
            request = HOLD_PREFIX + hold.id
            return _charged(
                account,
                applied,
                cost,
                now,
                new_id,
                request,
                model,
                usage,
                rates,
                metadata,
                holds,
                held,
            )
    draft = _Draft(account, user_id, config=config, now=now, new_id=new_id)
    draft.take_hold(hold)
    draft.add(
        EntryKind.CHARGE,
        _applied(cost, draft.available, config).copy_negate(),
        now=now,
        new_id=new_id,
        request_id=HOLD_PREFIX + hold.id,
        model=model,
        usage=usage,
        cost=cost,
        rates=rates,
        metadata=metadata,
    )
    return draft.finish(now)


def release(
    account: Account | None,
    user_id: str,
    hold: Hold,
    *,
    config: BalanceConfig,
    now: datetime,
    new_id: IdFactory,
) -> Change:
    """Resolve a hold without a charge: remove it and record a zero ``RELEASE`` entry."""
    draft = _Draft(account, user_id, config=config, now=now, new_id=new_id)
    draft.take_hold(hold)
    draft.add(EntryKind.RELEASE, _ZERO, now=now, new_id=new_id, request_id=HOLD_PREFIX + hold.id)
    return draft.finish(now)


def drop_hold(account: Account, hold: Hold, *, config: BalanceConfig, now: datetime) -> Change:
    """Remove a hold without an entry (it was resolved already); a no-op change if absent."""
    draft = _Draft(account, account.user_id, config=config, now=now, new_id=_no_ids, expire=False)
    if draft.take_hold(hold) is None:
        return Change(account, (), account.version)
    return draft.finish(now)


def configure_refill(
    account: Account | None,
    user_id: str,
    settings: RefillSettings | None,
    *,
    config: BalanceConfig,
    now: datetime,
    new_id: IdFactory,
    metadata: dict[str, Any] | None = None,
) -> Change:
    """Give the account its own refill settings (``None``: follow the config again).

    The change is audited with an ``ADJUST`` entry of amount 0 whose metadata
    (``metadata``, and ``"refill"``) says what the settings became.
    """
    draft = _Draft(account, user_id, config=config, now=now, new_id=new_id)
    if settings is None:
        described = "follow the config"
    else:
        described = (
            f"{'enabled' if settings.enabled else 'disabled'}, {settings.amount} every "
            f"{settings.interval_value} {settings.interval_unit}"
        )
    audit = {**(metadata or {}), "refill": described}
    draft.add(EntryKind.ADJUST, _ZERO, now=now, new_id=new_id, metadata=audit)
    change = draft.finish(now)
    return Change(
        attrs.evolve(change.account, refill=settings), change.entries, change.expected_version
    )


def events_for(change: Change, *, duration: float, low_balance: Decimal | None) -> list[Event]:
    """The events a committed change reports, in order.

    One per charge, grant or refill entry, and ``LowBalance`` when the balance
    went from at or above ``low_balance`` to below it in this change.
    """
    found: list[Event] = []
    user_id = change.account.user_id
    for entry in change.entries:
        kind = entry.kind
        if kind is EntryKind.CHARGE:
            found.append(Charged(user_id=user_id, entry=entry, duration=duration))
        elif kind is EntryKind.GRANT:
            found.append(Granted(user_id=user_id, entry=entry, duration=duration))
        elif kind is EntryKind.REFILL:
            found.append(Refilled(user_id=user_id, entry=entry, duration=duration))
        elif kind is EntryKind.EXPIRE:
            found.append(Expired(user_id=user_id, entry=entry, duration=duration))
    if low_balance is not None and change.entries:
        first = change.entries[0]
        before = (
            first.balance_after
            if first.kind is EntryKind.OPEN
            else _subtract(first.balance_after, first.amount)
        )
        after = change.account.balance
        if before >= low_balance > after:
            found.append(LowBalance(user_id=user_id, balance=after, threshold=low_balance))
    return found


def _no_ids() -> str:  # pragma: no cover - drop_hold writes no entry
    raise AssertionError("drop_hold writes no ledger entry")


def _applied(cost: Decimal, balance: Decimal, config: BalanceConfig) -> Decimal:
    """How much of ``cost`` leaves the balance: all, or none when disabled, or clamped.

    Clamping keeps what is left of ``balance`` (the available balance: held
    credits are set aside for other calls) at zero or above.
    """
    if not config.enabled:
        return _ZERO
    if config.allow_negative_balance:
        return cost
    return min(cost, max(balance, _ZERO))


def admits(account: Account, clock: Callable[[], datetime], *, config: BalanceConfig) -> bool:
    """Whether a call given no cost may start now, answered from a read alone.

    ``True`` when balances are disabled, or no refill is due and something is
    available (``check`` with no cost would allow it). ``False`` otherwise:
    the caller then runs the full check, which writes a due refill, or
    refuses with the details. ``clock`` is read only where the answer
    depends on the time: for an account with holds or credit blocks, or
    with refill settings on the account or in the config.
    """
    may_refill = account.refill is not None or config.auto_refill_enabled
    if account.holds or account.blocks or may_refill:
        now = clock()
        view = open_holds(account, now)
        if may_refill and refill_due(view, config=config, now=now):
            return False
    else:
        view = account
    if not config.enabled:
        return True
    balance = view.balance  # view.available, inline: this runs before every metered call
    return (_subtract(balance, view.held) if view.holds else balance) > _ZERO


def check(account: Account, cost: Decimal | None, *, config: BalanceConfig) -> BalanceCheck:
    """Can ``account`` pay ``cost``? Equal is enough; no cost means "is anything left?".

    With balances disabled every call is allowed. Run ``refill`` with the
    same cost first: a check counts a due refill.
    """
    available = account.available
    if not config.enabled:
        allowed = True
    elif cost is None:
        allowed = available > _ZERO
    else:
        allowed = available >= cost
    return BalanceCheck(allowed=allowed, balance=account.balance, available=available, cost=cost)


# --- idempotency ------------------------------------------------------------


_REQUEST_FIELDS: dict[EntryKind, tuple[str, ...]] = {
    EntryKind.GRANT: ("amount",),
    EntryKind.ADJUST: ("balance_after",),
}


def replay(existing: LedgerEntry, attempted: LedgerEntry) -> LedgerEntry:
    """Return ``existing`` if ``attempted`` repeats the same request, else raise.

    Entries that resolve a hold (request id ``hold:<id>``) follow the hold
    rules: a hold is resolved once; a second settle gets the first settle's
    entry, a release after anything is a no-op, a settle after a release is
    ``InvalidInput``.

    Two requests with one request id are the same when they are of the same
    kind and ask for the same thing: a grant the same amount, a charge the
    same cost for the same model and usage, a set the same target balance.
    Metadata is not compared.
    """
    request_id = attempted.request_id or ""
    if request_id.startswith(HOLD_PREFIX):
        if attempted.kind is EntryKind.CHARGE and existing.kind is EntryKind.RELEASE:
            raise InvalidInput(
                f"hold {request_id[len(HOLD_PREFIX) :]!r} of user {attempted.user_id!r} "
                "was released; it cannot be settled"
            )
        return existing
    if existing.kind is not attempted.kind:
        raise IdempotencyConflict(
            attempted.user_id,
            request_id,
            detail=f"first a {existing.kind.value}, now a {attempted.kind.value}",
        )
    for name in _REQUEST_FIELDS.get(existing.kind, ("cost", "model", "usage")):
        before, now = getattr(existing, name), getattr(attempted, name)
        if before != now:
            raise IdempotencyConflict(
                attempted.user_id, request_id, detail=f"{name} was {before}, now {now}"
            )
    return existing


# --- usage reports -----------------------------------------------------------------
#
# A report counts CHARGE entries only (a settled hold is one; a release and a
# hold's own write are not usage). Stores that sum in SQL translate these rules;
# the contract suite holds every store to the sums ``tally`` makes.


def period_start(at: datetime, period: Period) -> datetime:
    """The start of the UTC ``period`` holding ``at``: its hour, day, week (Monday) or month."""
    at = at.astimezone(timezone.utc)
    if period == "hour":
        return at.replace(minute=0, second=0, microsecond=0)
    day = at.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day
    if period == "week":
        return day - timedelta(days=day.weekday())
    if period == "month":
        return day.replace(day=1)
    raise InvalidInput(f"period must be one of {', '.join(PERIODS)}, got {period!r}")


def counts_as_usage(entry: LedgerEntry) -> bool:
    """Whether an entry is a call's charge, for usage reports: a ``CHARGE``."""
    return entry.kind is _CHARGE


def in_range(at: datetime, since: datetime | None, until: datetime | None) -> bool:
    """Whether ``at`` falls in ``[since, until)`` (an open end where ``None``)."""
    return (since is None or at >= since) and (until is None or at < until)


class Tally:
    """Sums charges into ``UsageRow``s grouped as a ``UsageQuery`` asks.

    ``add`` each entry (entries that are not usage, or are out of the
    query's range or user, are skipped); ``rows`` gives the sums, sorted
    by their keys. Exact: counts are ints, amounts Decimals.
    """

    def __init__(self, query: UsageQuery) -> None:
        self.query = query
        self._by_user = "user" in query.by
        self._by_model = "model" in query.by
        self._period: Period | None = query.period if "period" in query.by else None
        # key -> [calls, input, output, cache_write, cache_read, cost, charged]
        self._sums: dict[tuple[str | None, str | None, datetime | None], list[Any]] = {}

    def add(self, entry: LedgerEntry) -> None:
        """Count ``entry`` if it is a charge the query covers."""
        usage = entry.usage
        self.add_values(
            entry.user_id,
            entry.kind,
            entry.at,
            entry.amount,
            entry.cost,
            entry.model,
            None
            if usage is None
            else (usage.input, usage.output, usage.cache_write, usage.cache_read),
        )

    def add_values(  # noqa: PLR0917 - an entry's fields, for stores that keep them apart
        self,
        user_id: str,
        kind: EntryKind | str,
        at: datetime,
        amount: Decimal,
        cost: Decimal | None,
        model: str | None,
        tokens: tuple[int, int, int, int] | None,
    ) -> None:
        """``add`` for an entry kept as its values (``kind`` may be its text)."""
        query = self.query
        if kind != _CHARGE or not in_range(at, query.since, query.until):
            return
        if query.user_id is not None and user_id != query.user_id:
            return
        period = self._period
        key = (
            user_id if self._by_user else None,
            model if self._by_model else None,
            None if period is None else period_start(at, period),
        )
        sums = self._sums.get(key)
        if sums is None:
            sums = self._sums[key] = [0, 0, 0, 0, 0, _ZERO, _ZERO]
        charged = amount.copy_negate()
        sums[0] += 1
        if tokens is not None:
            sums[1] += tokens[0]
            sums[2] += tokens[1]
            sums[3] += tokens[2]
            sums[4] += tokens[3]
        sums[5] = _add(sums[5], charged if cost is None else cost)
        sums[6] = _add(sums[6], charged)

    def rows(self) -> list[UsageRow]:
        """The sums so far, one row per group, sorted by their keys."""
        return sort_usage(
            UsageRow(
                user_id=user_id,
                model=model,
                period_start=start,
                calls=sums[0],
                usage=usage_sum(sums[1], sums[2], sums[3], sums[4]),
                cost=sums[5],
                charged=sums[6],
            )
            for (user_id, model, start), sums in self._sums.items()
        )


def usage_sum(input: int, output: int, cache_write: int, cache_read: int) -> TokenUsage:  # noqa: A002
    """A ``TokenUsage`` of summed counts, which may exceed the limit of one call's."""
    return counted_usage(input, output, cache_write, cache_read)


def _row_key(row: UsageRow) -> tuple[str, bool, str, datetime]:
    return (
        row.user_id or "",
        row.model is not None,  # charges without a model first
        row.model or "",
        row.period_start or _EPOCH,
    )


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def sort_usage(rows: Iterable[UsageRow]) -> list[UsageRow]:
    """Rows in the order a report gives them: by user, then model (none first), then period."""
    return sorted(rows, key=_row_key)
