"""What a batch is made of: the items of ``charge_many`` and ``grant_many``, and their results.

An item holds the arguments of one ``charge()`` or ``grant()`` call, unchecked:
``charge_many`` and ``grant_many`` check every item before writing anything,
and name the index of the first bad one.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

import attrs

from creditmeter.exceptions import CreditMeterError
from creditmeter.models import LedgerEntry
from creditmeter.usage import TokenUsage

__all__ = ["BatchResult", "ChargeItem", "GrantItem"]


@attrs.frozen
class ChargeItem:
    """One charge of a batch: the arguments of ``charge()``, meaning what they mean there.

    ``amount`` is the cost in credits, or ``None`` to price ``usage`` of
    ``model``; ``incomplete`` prices a completion cut short; ``strict`` refuses
    a charge the available balance cannot pay; ``request_id`` makes the charge
    apply at most once.
    """

    user_id: str
    amount: Decimal | float | None = None
    model: str | None = attrs.field(default=None, kw_only=True)
    usage: TokenUsage | None = attrs.field(default=None, kw_only=True)
    incomplete: bool = attrs.field(default=False, kw_only=True)
    strict: bool = attrs.field(default=False, kw_only=True)
    request_id: str | None = attrs.field(default=None, kw_only=True)
    metadata: dict[str, Any] | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class GrantItem:
    """One grant of a batch: the arguments of ``grant()``, meaning what they mean there."""

    user_id: str
    amount: Decimal | float
    request_id: str | None = attrs.field(default=None, kw_only=True)
    reason: str | None = attrs.field(default=None, kw_only=True)
    metadata: dict[str, Any] | None = attrs.field(default=None, kw_only=True)
    expires_at: datetime | None = attrs.field(default=None, kw_only=True)
    priority: int | None = attrs.field(default=None, kw_only=True)


@attrs.frozen
class BatchResult:
    """What became of one item: its ledger entry, or the error it met (as a single call raises).

    ``index`` is the item's position in the batch; results come back in item
    order. ``error`` is ``InsufficientBalance`` (a strict charge that cannot
    pay), ``IdempotencyConflict`` (a request id used before with other
    parameters) or ``VersionConflict`` (the retry policy ran out); a repeated
    request gets the entry that applied it first.
    """

    index: int
    item: ChargeItem | GrantItem
    entry: LedgerEntry | None = None
    error: CreditMeterError | None = None

    @property
    def ok(self) -> bool:
        """True when the item applied (or repeated one applied before): ``entry`` is set."""
        return self.error is None
