# Generated from src/creditmeter/reservations/_async.py by tools/unasync.py.
# Do not edit: change the source, then run `python tools/unasync.py`.
"""``Reservation``: a hold as a context manager, released unless the block settles it."""

from __future__ import annotations

from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING, Any

from creditmeter.models import LedgerEntry
from creditmeter.reservations._held import Held
from creditmeter.usage import TokenUsage

if TYPE_CHECKING:
    from creditmeter.manager import BalanceManager

__all__ = ["Reservation"]


class Reservation(Held):
    """``with meter.reserve(user, amount) as held:`` (see ``BalanceManager.reserve``)."""

    def __init__(self, manager: BalanceManager, user_id: str, amount: Any, **options: Any) -> None:
        super().__init__(user_id, amount, **options)
        self._manager = manager

    def settle(
        self,
        amount: Decimal | float | None = None,
        *,
        model: str | None = None,
        usage: TokenUsage | None = None,
        incomplete: bool = False,
    ) -> LedgerEntry:
        """Charge what the call really cost and resolve the hold."""
        self.entry = self._manager.settle(
            self.hold, amount, model=model, usage=usage, incomplete=incomplete
        )
        return self.entry

    def release(self) -> LedgerEntry:
        """Resolve the hold without a charge."""
        self.entry = self._manager.release(self.hold)
        return self.entry

    def __enter__(self) -> Reservation:
        self._hold = self._manager.hold(**self._arguments)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.entry is None:
            self.release()
