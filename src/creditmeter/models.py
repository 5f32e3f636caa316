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
from creditmeter.config import RefillSettings
from creditmeter.pricing import Rates
from creditmeter.usage import TokenUsage

__all__ = ["Account", "BalanceCheck", "EntryKind", "Hold", "LedgerEntry"]

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
class Account:
    """One user's balance and refill state, at one version.

    ``version`` grows by one with every committed change; stores use it for
    compare-and-set. ``refill`` is ``None`` when the account follows the
    current config's refill settings. ``holds`` are kept in order of expiry,
    and ``held`` is their total (worked out when not given).
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
