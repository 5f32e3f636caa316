"""What both reservations share: their arguments, and the hold once the block is entered."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

from creditmeter._base import DEFAULT_HOLD_TTL
from creditmeter.exceptions import InvalidInput
from creditmeter.models import Hold, LedgerEntry
from creditmeter.usage import TokenUsage

__all__ = ["DEFAULT_TTL", "Held"]

DEFAULT_TTL = DEFAULT_HOLD_TTL
"""How long a hold counts against the balance if nobody resolves it (10 minutes)."""


class Held:
    """What both reservations keep: the hold's arguments, then the hold and its outcome."""

    def __init__(
        self,
        user_id: str,
        amount: Decimal | float | None,
        *,
        model: str | None,
        usage: TokenUsage | None,
        ttl: timedelta,
        request_id: str | None,
    ) -> None:
        self._arguments: dict[str, Any] = {
            "user_id": user_id,
            "amount": amount,
            "model": model,
            "usage": usage,
            "ttl": ttl,
            "request_id": request_id,
        }
        self._hold: Hold | None = None
        self.entry: LedgerEntry | None = None
        """The entry that resolved the hold, once it is resolved."""

    @property
    def hold(self) -> Hold:
        """The hold taken when the block was entered."""
        if self._hold is None:
            raise InvalidInput("the reservation holds nothing until its block is entered")
        return self._hold
