"""``AsyncBalanceManager``: the same methods as ``BalanceManager``, awaited.

It runs the same operations (built by the shared ``_base.ManagerBase``, over
the same pure rules) against an ``AsyncBalanceStore``. Writes to one user
from the tasks of one process queue on an ``asyncio.Lock``; compare-and-set
retries use tenacity's async retrying.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from datetime import timedelta
from decimal import Decimal
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from creditmeter import _validate, rules
from creditmeter._base import LOCK_STRIPES, Clock, ManagerBase, Op, Replayed, is_noop, plan_once
from creditmeter._retry import async_retrying
from creditmeter.config import BalanceConfig, RefillSettings, RetryPolicy
from creditmeter.events import Event
from creditmeter.exceptions import DuplicateRequest, InsufficientBalance, VersionConflict
from creditmeter.models import Account, BalanceCheck, Hold, LedgerEntry
from creditmeter.pricing import Pricing
from creditmeter.reservations import DEFAULT_TTL, AsyncReservation
from creditmeter.stores.base import AsyncBalanceStore
from creditmeter.usage import TokenUsage

if TYPE_CHECKING:
    from contextlib import AbstractContextManager

    from creditmeter.metering import OnMissingUsage

__all__ = ["AsyncBalanceManager"]

_ZERO = Decimal(0)
P = ParamSpec("P")
T = TypeVar("T")


class AsyncBalanceManager(ManagerBase):
    """Check, charge, grant and refill token credits over an ``AsyncBalanceStore``.

    The arguments and rules are those of ``BalanceManager``; every method is
    a coroutine. Close it with ``await manager.aclose()`` or ``async with``.
    """

    def __init__(
        self,
        store: AsyncBalanceStore,
        config: BalanceConfig | None = None,
        *,
        pricing: Pricing | None = None,
        clock: Clock | None = None,
        retry: RetryPolicy | None = None,
        on_event: Callable[[Event], object] | None = None,
        low_balance_threshold: Decimal | float | None = None,
    ) -> None:
        super().__init__(
            config,
            pricing=pricing,
            clock=clock,
            retry=retry,
            on_event=on_event,
            low_balance_threshold=low_balance_threshold,
        )
        self.store = store
        self._locks = tuple(asyncio.Lock() for _ in range(LOCK_STRIPES))

    # --- reads ----------------------------------------------------------------

    async def account(self, user_id: str) -> Account:
        """Return the user's account, opening it on first sight."""
        op = self._open_op(_validate.user_id(user_id))
        async with self._lock(op.user_id):
            account = await self.store.load(op.user_id)
            if account is None:
                account = (await self._write(op, None, fresh=True)).account
            self._remember(account)
            return rules.open_holds(account, self._now())

    async def balance(self, user_id: str) -> Decimal:
        """Return the user's balance, opening the account on first sight."""
        return (await self.account(user_id)).balance

    async def ledger(self, user_id: str, *, limit: int | None = None) -> list[LedgerEntry]:
        """Return the user's ledger entries oldest first; with ``limit``, the newest ``limit``."""
        user_id = _validate.user_id(user_id)
        limit = self._ledger_limit(limit)
        return [] if limit == 0 else await self.store.ledger(user_id, limit=limit)

    async def users(self) -> list[str]:
        """Return the ids of every user with an account, sorted."""
        return await self.store.users()

    # --- writes ---------------------------------------------------------------

    async def grant(
        self,
        user_id: str,
        amount: Decimal | float,
        *,
        request_id: str | None = None,
        reason: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> LedgerEntry:
        """Add credits to the user's balance; return the ``GRANT`` entry."""
        return await self._apply(
            self._grant_op(user_id, amount, request_id=request_id, reason=reason, metadata=metadata)
        )

    async def charge(
        self,
        user_id: str,
        amount: Decimal | float | None = None,
        *,
        model: str | None = None,
        usage: TokenUsage | None = None,
        incomplete: bool = False,
        strict: bool = False,
        request_id: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> LedgerEntry:
        """Spend credits: ``amount``, or the priced ``usage`` of ``model`` (as the sync one)."""
        return await self._apply(
            self._charge_op(
                user_id,
                amount,
                model=model,
                usage=usage,
                incomplete=incomplete,
                strict=strict,
                request_id=request_id,
                metadata=metadata,
            )
        )

    async def set_balance(
        self,
        user_id: str,
        amount: Decimal | float,
        *,
        request_id: str | None = None,
        reason: str | None = None,
    ) -> LedgerEntry:
        """Set the user's balance to ``amount``; return the ``ADJUST`` entry of the difference."""
        return await self._apply(
            self._set_balance_op(user_id, amount, request_id=request_id, reason=reason)
        )

    async def maybe_refill(self, user_id: str, *, cost: Decimal | float = 0) -> LedgerEntry | None:
        """Apply a refill if one is due; return its entry or ``None``."""
        user_id = _validate.user_id(user_id)
        op = self._refill_op(user_id, _validate.amount(cost, name="cost"))
        return self._refill_entry(await self._fresh(op))

    async def check(
        self,
        user_id: str,
        cost: Decimal | float | None = None,
        *,
        model: str | None = None,
        input_tokens: int | None = None,
    ) -> BalanceCheck:
        """Can the user pay ``cost`` now? A due refill is applied first (see ``BalanceManager``)."""
        user_id = _validate.user_id(user_id)
        price = self._check_cost(cost, model=model, input_tokens=input_tokens)
        quick = self._check_without_refill(await self.store.load(user_id), price)
        if quick is not None:
            return quick
        change = await self._fresh(self._refill_op(user_id, price if price is not None else _ZERO))
        return self._check_result(change, price)

    async def require(
        self,
        user_id: str,
        cost: Decimal | float | None = None,
        *,
        model: str | None = None,
        input_tokens: int | None = None,
    ) -> BalanceCheck:
        """Like ``check``, but raise ``InsufficientBalance`` when the user cannot pay."""
        started = self._clock_start()
        result = await self.check(user_id, cost, model=model, input_tokens=input_tokens)
        try:
            self._refusal(user_id, result, input_tokens)
        except InsufficientBalance as refused:
            self._denied(refused, started)
            raise
        return result

    async def hold(
        self,
        user_id: str,
        amount: Decimal | float | None = None,
        *,
        model: str | None = None,
        usage: TokenUsage | None = None,
        ttl: timedelta = DEFAULT_TTL,
        request_id: str | None = None,
    ) -> Hold:
        """Set credits aside for a call about to run: ``amount``, or the priced ``usage``.

        A due refill is applied first; the hold is refused with
        ``InsufficientBalance`` unless the available balance (balance less
        open holds) covers it. Resolve it with ``settle`` or ``release``; one
        left alone expires after ``ttl`` and stops counting.
        """
        op, hold_id = self._hold_op(
            user_id, amount, model=model, usage=usage, ttl=ttl, request_id=request_id
        )
        try:
            async with self._lock(op.user_id):
                change = await self._from_seen(op)
        except InsufficientBalance as refused:
            self._denied(refused, op.started)
            raise
        return self._found_hold(change, hold_id)

    async def settle(
        self,
        hold: Hold,
        amount: Decimal | float | None = None,
        *,
        model: str | None = None,
        usage: TokenUsage | None = None,
        incomplete: bool = False,
        metadata: dict[str, Any] | None = None,
    ) -> LedgerEntry:
        """Resolve a hold with a charge of what the call really cost; return the ``CHARGE`` entry.

        The cost may be more or less than was held (more is clamped like any
        charge). A hold is resolved once: settling it again returns the first
        entry; settling a released hold is ``InvalidInput``; an expired hold
        is still charged, once.
        """
        op = self._settle_op(
            hold, amount, model=model, usage=usage, incomplete=incomplete, metadata=metadata
        )
        entry = await self._apply(op)
        await self._tidy(hold)
        return entry

    async def release(self, hold: Hold) -> LedgerEntry:
        """Resolve a hold without a charge; return its ``RELEASE`` entry (or the one before it)."""
        entry = await self._apply(self._release_op(hold))
        await self._tidy(hold)
        return entry

    async def configure_refill(self, user_id: str, settings: RefillSettings | None) -> Account:
        """Give one user their own refill settings (``None``: follow the config again).

        Written like any change, with an ``ADJUST`` entry of amount 0 that
        records what the settings became; returns the account.
        """
        op = self._configure_refill_op(user_id, settings)
        async with self._lock(op.user_id):
            return (await self._from_seen(op)).account

    def reserve(
        self,
        user_id: str,
        amount: Decimal | float | None = None,
        *,
        model: str | None = None,
        usage: TokenUsage | None = None,
        ttl: timedelta = DEFAULT_TTL,
        request_id: str | None = None,
    ) -> AsyncReservation:
        """``async with meter.reserve(user, amount) as held:``: hold, and release unless settled.

        Inside the block call ``await held.settle(...)`` with the real cost; on an
        exception, or if the block settles nothing, the hold is released.
        """
        return AsyncReservation(
            self,
            user_id,
            amount,
            model=model,
            usage=usage,
            ttl=ttl,
            request_id=request_id,
        )

    async def _tidy(self, hold: Hold) -> None:
        """After resolving a hold that a retry took again, drop the copy left in the account."""
        if self._leftover(hold):
            async with self._lock(hold.user_id):
                await self._from_seen(self._drop_op(hold))

    def metered(
        self,
        *,
        user: str | Callable[..., str] | None = None,
        model: str | Callable[..., str | None] | None = None,
        estimate: Callable[..., int | TokenUsage | None] | None = None,
        usage: Callable[[Any], TokenUsage | None] | None = None,
        request_id: str | Callable[..., str | None] | None = None,
        on_missing_usage: OnMissingUsage = "warn",
    ) -> Callable[[Callable[P, T]], Callable[P, T]]:
        """Wrap a coroutine or async generator function that calls a model (see ``metering``)."""
        from creditmeter.metering import metered  # noqa: PLC0415 - metering imports managers

        return metered(
            self,
            user=user,
            model=model,
            estimate=estimate,
            usage=usage,
            request_id=request_id,
            on_missing_usage=on_missing_usage,
        )

    def acting_as(self, user_id: str) -> AbstractContextManager[None]:
        """Within the block, ``metered`` functions without a ``user=`` charge ``user_id``."""
        from creditmeter.metering import acting_as  # noqa: PLC0415 - metering imports managers

        return acting_as(user_id)

    # --- lifecycle --------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the store."""
        await self.store.aclose()

    async def __aenter__(self) -> AsyncBalanceManager:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncBalanceManager({self.store!r}, {self.config!r})"

    # --- running operations (the twin of BalanceManager's) ----------------------

    def _lock(self, user_id: str) -> asyncio.Lock:
        return self._locks[hash(user_id) % LOCK_STRIPES]

    async def _fresh(self, op: Op) -> rules.Change:
        async with self._lock(op.user_id):
            change = await self._write(op, await self.store.load(op.user_id), fresh=True)
            self._remember(change.account)
            return change

    async def _from_seen(self, op: Op) -> rules.Change:
        """Run a write from the last account seen; the caller holds the user's lock."""
        account = self._seen.get(op.user_id)
        fresh = account is None
        if fresh:
            account = await self.store.load(op.user_id)
        return await self._write(op, account, fresh=fresh)

    async def _apply(self, op: Op) -> LedgerEntry:
        """Run a write and return the operation's entry (the first one, for a repeat)."""
        user_id = op.user_id
        async with self._lock(user_id):
            try:
                return (await self._from_seen(op)).entry
            except Replayed as replayed:
                return replayed.entry
            except InsufficientBalance as refused:
                if op.request_id is None or op.lenient is None:
                    self._denied(refused, op.started)
                    raise
                found = await self.store.find_request(user_id, op.request_id)
                if found is None:
                    self._denied(refused, op.started)
                    raise
                # An applied request is answered with its entry, even if it could not pay now.
                attempted = op.lenient(await self.store.load(user_id), self._now())
                return rules.replay(found, attempted.entry)

    async def _write(self, op: Op, account: Account | None, *, fresh: bool) -> rules.Change:
        exclusive: Callable[[str], AbstractAsyncContextManager[None]] | None = getattr(
            self.store, "exclusive", None
        )
        if exclusive is not None and self._is_hot(op.user_id):
            async with exclusive(op.user_id):
                try:
                    return await self._attempt(op, None, fresh=False)
                except VersionConflict as conflict:  # a writer that ignores the lock
                    seen: Account | None = conflict.current
        else:
            try:
                return await self._attempt(op, account, fresh=fresh)
            except VersionConflict as conflict:
                if self.retry.attempts <= 1:
                    raise
                seen = conflict.current
                self._retried(conflict)
        if exclusive is not None:
            async with exclusive(op.user_id):
                try:
                    return await self._attempt(op, None, fresh=False)
                except VersionConflict as conflict:  # a writer that ignores the lock
                    seen = conflict.current
        async for attempt in async_retrying(self.retry):
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    seen = None  # it slept: what the last conflict reported is stale now
                try:
                    return await self._attempt(op, seen, fresh=seen is not None)
                except VersionConflict as conflict:
                    seen = conflict.current
                    raise
        raise AssertionError("unreachable: tenacity re-raises")  # pragma: no cover

    async def _attempt(self, op: Op, account: Account | None, *, fresh: bool) -> rules.Change:
        if account is None and not fresh:
            account = await self.store.load(op.user_id)
        now = self._now()
        try:
            change = plan_once(op, account, now)
        except InsufficientBalance:
            if fresh:
                raise
            change = plan_once(op, await self.store.load(op.user_id), now)
        if is_noop(change):
            return change
        try:
            await self.store.commit(
                change.account, change.entries, expected_version=change.expected_version
            )
        except DuplicateRequest as duplicate:
            raise Replayed(rules.replay(duplicate.entry, change.entry)) from None
        except VersionConflict as conflict:
            self._lost(conflict)
            raise
        self._remember(change.account)
        self._committed(op, change)
        return change
