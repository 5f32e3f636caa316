# unasync-target: _sync.py
"""``AsyncReservation``: a hold as a context manager, released unless the block settles it."""

from __future__ import annotations

from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING, Any

from creditmeter.models import LedgerEntry
from creditmeter.reservations._held import Held
from creditmeter.usage import TokenUsage

if TYPE_CHECKING:
    from creditmeter.aio import AsyncBalanceManager

__all__ = ["AsyncReservation"]


class AsyncReservation(Held):
    """``async with meter.reserve(user, amount) as held:`` (see ``AsyncBalanceManager.reserve``)."""

    def __init__(
        self, manager: AsyncBalanceManager, user_id: str, amount: Any, **options: Any
    ) -> None:
        super().__init__(user_id, amount, **options)
        self._manager = manager

    async def settle(
        self,
        amount: Decimal | float | None = None,
        *,
        model: str | None = None,
        usage: TokenUsage | None = None,
        incomplete: bool = False,
    ) -> LedgerEntry:
        """Charge what the call really cost and resolve the hold."""
        self.entry = await self._manager.settle(
            self.hold, amount, model=model, usage=usage, incomplete=incomplete
        )
        return self.entry

    async def release(self) -> LedgerEntry:
        """Resolve the hold without a charge."""
        self.entry = await self._manager.release(self.hold)
        return self.entry

    async def __aenter__(self) -> AsyncReservation:
        self._hold = await self._manager.hold(**self._arguments)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.entry is None:
            await self.release()
