"""The records creditmeter stores and returns: accounts, holds, ledger entries, checks.

All are frozen attrs classes. Amounts are ``Decimal`` credits (1,000,000
credits = 1 USD); times are aware UTC datetimes. These records are built by
the rules in ``rules.py`` from validated input, so they carry no validators of
their own: building them is on the hot path of every charge.
"""

from __future__ import annotations

import enum
from datetime import datetime
from decimal import Decimal
from typing import Any

import attrs

from creditmeter._exact import EXACT
from creditmeter._settable import check_builder, settable
from creditmeter.config import RefillSettings
from creditmeter.pricing import Rates
from creditmeter.usage import TokenUsage

__all__ = [
    "Account",
    "BalanceCheck",
    "CreditBlock",
    "EntryKind",
    "Hold",
    "LedgerEntry",
    "build_account",
    "build_entry",
    "build_hold",
]

_ZERO = Decimal(0)


class EntryKind(str, enum.Enum):
    """What a ledger entry records."""

    OPEN = "open"
    """The account was created with the configured start balance."""
    GRANT = "grant"
    """Credits added by an admin or a program."""
    CHARGE = "charge"
    """A model call or other spend; ``cost`` holds the full priced cost."""
    REFILL = "refill"
    """An automatic refill under the account's refill settings."""
    ADJUST = "adjust"
    """The balance set to a given value, or account settings changed."""
    RELEASE = "release"
    """A hold released without a charge (amount 0)."""
    EXPIRE = "expire"
    """What was left of a credit block when it expired (minus that amount)."""


@attrs.frozen(kw_only=True)
class Hold:
    """Credits set aside for a call in flight; they count against ``Account.available``."""

    id: str
    user_id: str
    amount: Decimal
    created_at: datetime
    expires_at: datetime
    request_id: str | None = None


@attrs.frozen(kw_only=True)
class CreditBlock:
    """Credits granted apart from the plain balance: drawn first, in order, and maybe expiring.

    ``amount`` is what remains of the ``granted`` credits. Charges draw from
    blocks by ``priority`` (lower first), then the earliest ``expires_at``
    (a block that never expires after any that do), then the oldest grant;
    the plain balance pays last. ``id`` is the id of the ``GRANT`` (or
    ``REFILL``) entry that made the block.
    """

    id: str
    amount: Decimal
    granted: Decimal
    priority: int
    expires_at: datetime | None
    granted_at: datetime
    request_id: str | None = None


@attrs.frozen(kw_only=True)
class Account:
    """One user's balance and refill state, at one version.

    ``version`` grows by one with every committed change; stores use it for
    compare-and-set. ``refill`` is ``None`` when the account follows the
    current config's refill settings. ``holds`` are kept in order of expiry,
    and ``held`` is their total (worked out when not given). ``blocks`` are
    the open credit blocks, in the order they are drawn; ``balance`` counts
    them (``unrestricted`` is the balance without them).
    """

    user_id: str
    balance: Decimal
    version: int
    created_at: datetime
    updated_at: datetime
    last_refill: datetime
    refill: RefillSettings | None = None
    holds: tuple[Hold, ...] = ()
    held: Decimal = attrs.field(
        default=attrs.Factory(lambda self: total_held(self.holds), takes_self=True)
    )
    """Credits set aside by the account's holds: the sum of their amounts."""
    blocks: tuple[CreditBlock, ...] = ()

    @property
    def unrestricted(self) -> Decimal:
        """The balance outside credit blocks: what is left when every block is used up."""
        if not self.blocks:
            return self.balance
        total = self.balance
        for block in self.blocks:
            total = EXACT.subtract(total, block.amount)
        return total

    @property
    def available(self) -> Decimal:
        """The balance less the credits held for calls in flight."""
        if not self.holds:
            return self.balance
        return EXACT.subtract(self.balance, self.held)


def total_held(holds: tuple[Hold, ...]) -> Decimal:
    """The sum of the holds' amounts, exactly."""
    total = _ZERO
    for hold in holds:
        total = EXACT.add(total, hold.amount)
    return total


@attrs.frozen(kw_only=True)
class LedgerEntry:
    """One change to one account, as committed.

    ``amount`` is the signed change actually applied to the balance;
    ``balance_after`` is the balance once it was applied. For charges,
    ``cost`` is the full priced cost before any clamping at zero, and a
    priced charge keeps the ``model``, ``usage`` and ``rates`` it was priced
    with, so it can be audited and re-priced later.
    """

    id: str
    user_id: str
    kind: EntryKind
    amount: Decimal
    balance_after: Decimal
    at: datetime
    request_id: str | None = None
    model: str | None = None
    usage: TokenUsage | None = None
    cost: Decimal | None = None
    rates: Rates | None = None
    metadata: dict[str, Any] | None = None
    drawn: tuple[tuple[str, Decimal], ...] = ()
    """The credit blocks the entry took from: (block id, credits, positive) each."""


@attrs.frozen(kw_only=True)
class BalanceCheck:
    """The answer to "can this user pay ``cost`` now?".

    ``cost`` is ``None`` when no cost was given: then ``allowed`` means the
    available balance is above zero.
    """

    allowed: bool
    balance: Decimal
    available: Decimal
    cost: Decimal | None


# --- building records on the hot path ------------------------------------------------
#
# The rules build an entry and an account on every charge, from values they have
# checked: these builders make the very records the attrs constructors make,
# positionally, in a sixth of the time (see ``_settable``).


def build_entry(  # noqa: PLR0917 - one argument per field, as the class has
    id: str,  # noqa: A002 - the field's name
    user_id: str,
    kind: EntryKind,
    amount: Decimal,
    balance_after: Decimal,
    at: datetime,
    request_id: str | None = None,
    model: str | None = None,
    usage: TokenUsage | None = None,
    cost: Decimal | None = None,
    rates: Rates | None = None,
    metadata: dict[str, Any] | None = None,
    drawn: tuple[tuple[str, Decimal], ...] = (),
) -> LedgerEntry:
    """``LedgerEntry(...)`` from checked values, positionally, in a sixth of the time."""
    entry = _new(_SettableEntry)
    entry.id = id
    entry.user_id = user_id
    entry.kind = kind
    entry.amount = amount
    entry.balance_after = balance_after
    entry.at = at
    entry.request_id = request_id
    entry.model = model
    entry.usage = usage
    entry.cost = cost
    entry.rates = rates
    entry.metadata = metadata
    entry.drawn = drawn
    entry.__class__ = LedgerEntry
    return entry  # type: ignore[no-any-return]


def build_account(  # noqa: PLR0917 - one argument per field, as the class has
    user_id: str,
    balance: Decimal,
    version: int,
    created_at: datetime,
    updated_at: datetime,
    last_refill: datetime,
    refill: RefillSettings | None,
    holds: tuple[Hold, ...],
    held: Decimal,
    blocks: tuple[CreditBlock, ...] = (),
) -> Account:
    """``Account(...)`` from checked values, positionally; ``held`` must be the holds' total."""
    account = _new(_SettableAccount)
    account.user_id = user_id
    account.balance = balance
    account.version = version
    account.created_at = created_at
    account.updated_at = updated_at
    account.last_refill = last_refill
    account.refill = refill
    account.holds = holds
    account.held = held
    account.blocks = blocks
    account.__class__ = Account
    return account  # type: ignore[no-any-return]


def build_hold(  # noqa: PLR0917 - one argument per field, as the class has
    id: str,  # noqa: A002 - the field's name
    user_id: str,
    amount: Decimal,
    created_at: datetime,
    expires_at: datetime,
    request_id: str | None = None,
) -> Hold:
    """``Hold(...)`` from checked values, positionally."""
    hold = _new(_SettableHold)
    hold.id = id
    hold.user_id = user_id
    hold.amount = amount
    hold.created_at = created_at
    hold.expires_at = expires_at
    hold.request_id = request_id
    hold.__class__ = Hold
    return hold  # type: ignore[no-any-return]


_new = object.__new__
_SettableEntry = settable(LedgerEntry)
_SettableAccount = settable(Account)
_SettableHold = settable(Hold)
check_builder(LedgerEntry, build_entry)
check_builder(Account, build_account)
check_builder(Hold, build_hold)
