"""``reserve()``: a hold as a context manager, released unless the block settles it."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING, Any

from creditmeter.exceptions import InvalidInput
from creditmeter.models import Hold, LedgerEntry
from creditmeter.usage import TokenUsage

if TYPE_CHECKING:
    from creditmeter.aio import AsyncBalanceManager
    from creditmeter.manager import BalanceManager

__all__ = ["DEFAULT_TTL", "AsyncReservation", "Reservation"]

DEFAULT_TTL = timedelta(minutes=10)
"""How long a hold counts against the balance if nobody resolves it."""


class _Held:
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


class Reservation(_Held):
    """``with meter.reserve(user, amount) as held:`` — see ``BalanceManager.reserve``."""

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


class AsyncReservation(_Held):
    """``async with meter.reserve(user, amount) as held:`` — see ``AsyncBalanceManager.reserve``."""

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
