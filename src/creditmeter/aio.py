# unasync-target: manager.py
# unasync-rename: _tell -> _emit
# unasync-rename: AsyncReportMixin -> ReportMixin
"""``AsyncBalanceManager``: validate, load, apply a rule, commit; retry a lost compare-and-set.

The manager holds no business rule (those are in ``rules.py``). Each write
runs under a per-user lock, so writes to one user from the threads or tasks of
one process queue instead of colliding; compare-and-set retries only absorb
contention from other processes and hosts. A write starts from the last
account this manager saw for the user, so an uncontended write is one store
round trip; if another writer got there first, the conflict reports the
current account and the retry starts from that. After a first loss, a store
that offers ``exclusive()`` (every bundled store) is asked to hold other
writers off while the manager loads and commits again.

Events are told to ``on_event`` once the user's lock is let go, in order, so a
callback may call the manager (a top-up on ``LowBalance``). A manager made
before ``os.fork()`` works in the child too, with new locks of its own.

This is the source of both managers: ``manager.py`` (``BalanceManager``) is
generated from it by ``tools/unasync.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AbstractContextManager
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from functools import partial
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from creditmeter import _validate, rules
from creditmeter._base import (
    LOCK_STRIPES,
    SEEN_LIMIT,
    Clock,
    HoldSearch,
    ManagerBase,
    Op,
    Outbox,
    Replayed,
    _with_reason,
    hold_plan,
    request_id_of,
    utc_now,
)
from creditmeter._compat import AsyncLock
from creditmeter._ids import new_id
from creditmeter._retry import async_retrying
from creditmeter.batches import AsyncBatchMixin
from creditmeter.config import BalanceConfig, RefillSettings, RetryPolicy
from creditmeter.events import Event
from creditmeter.exceptions import (
    DuplicateRequest,
    InsufficientBalance,
    InvalidInput,
    VersionConflict,
)
from creditmeter.metering import OnMissingUsage, OnStoreError, acting_as, metered
from creditmeter.models import Account, BalanceCheck, EntryKind, Hold, LedgerEntry
from creditmeter.pricing import Pricing
from creditmeter.reports import AsyncReportMixin
from creditmeter.reservations import DEFAULT_TTL, AsyncReservation
from creditmeter.stores.base import AsyncBalanceStore
from creditmeter.usage import TokenUsage

__all__ = ["AsyncBalanceManager"]  # async-only
# sync-only: __all__ = ["BalanceManager", "Clock", "utc_now"]

_ZERO = Decimal(0)
_new_tuple = tuple.__new__
_USER_IDS = _validate.USER_IDS
P = ParamSpec("P")
T = TypeVar("T")
logger = logging.getLogger("creditmeter")  # async-only

# async-only: begin
# Work a cancelled call leaves running (its events' callbacks, dropping a hold it wrote
# but never handed out): kept here so that nothing collects it half done.
_DETACHED: set[asyncio.Future[object]] = set()


def _detach(work: Awaitable[object]) -> asyncio.Future[object]:
    task = asyncio.ensure_future(work)
    _DETACHED.add(task)
    task.add_done_callback(_finished)
    return task


def _finished(task: asyncio.Future[object]) -> None:
    _DETACHED.discard(task)
    if not task.cancelled() and task.exception() is not None:  # pragma: no cover - all caught
        logger.error("work left by a cancelled call failed", exc_info=task.exception())


# async-only: end


class AsyncBalanceManager(AsyncBatchMixin, AsyncReportMixin, ManagerBase):
    """Check, charge, grant and refill token credits over a store.

    ``store`` follows the ``AsyncBalanceStore`` protocol. ``config`` decides how balances
    behave (LibreChat's ``balance`` keys); ``pricing`` prices token usage
    (LibreChat's table by default); ``clock`` is any zero-argument callable
    returning an aware datetime; ``retry`` bounds the retries of a lost
    compare-and-set. Close the manager (and its store) with ``aclose()``, or
    use it as a context manager.

    The async manager's methods that reach the store are coroutines, and its
    ``on_event`` may also be a coroutine function (awaited after the write,
    once the user's lock is let go). A call cancelled at any suspension point
    holds nothing afterwards (the user's lock and the store's ``exclusive()``
    are let go) and writes nothing by halves: a commit the store took is
    whole, and a hold written for a caller that was cancelled before it got
    it is dropped again.
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
        self._locks = tuple(AsyncLock() for _ in range(LOCK_STRIPES))

    def _after_fork(self) -> None:
        self._locks = tuple(AsyncLock() for _ in range(LOCK_STRIPES))

    # --- reads ----------------------------------------------------------------

    async def account(self, user_id: str) -> Account:
        """Return the user's account, opening it on first sight."""
        op = self._open_op(_validate.user_id(user_id))
        out = self._outbox()
        try:
            async with self._lock(op.user_id):
                account = await self.store.load(op.user_id)
                if account is None or (account.blocks and rules.expiry_due(account, self._now())):
                    account = (await self._write(op, account, fresh=True, out=out)).account
                self._remember(account)
        except BaseException as failed:
            await self._tell_after(out, failed)
            raise
        if out:
            await self._tell(out)
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
        expires_at: datetime | None = None,
        priority: int | None = None,
    ) -> LedgerEntry:
        """Add credits to the user's balance; return the ``GRANT`` entry.

        With ``expires_at`` (an aware time in the future) or ``priority``
        (0..100, lower drawn first; 50 for an expiring grant given none) the
        credits form a ``CreditBlock`` (``Account.blocks``, its id the
        entry's): charges draw from blocks before the plain balance, and what
        is left of a block when it expires is written off with an ``EXPIRE``
        entry.
        """
        try:
            return await self._apply(
                self._grant_op(
                    user_id,
                    amount,
                    request_id=request_id,
                    reason=reason,
                    metadata=metadata,
                    expires_at=expires_at,
                    priority=priority,
                )
            )
        except InvalidInput as refused:
            if request_id is None or expires_at is None:
                raise
            # An expiry that has passed since the first try: a retry is answered as one.
            first = await self._granted_before(user_id, amount, request_id)
            if first is None:
                raise refused from None
            return first

    async def _granted_before(
        self, user_id: object, amount: object, request_id: object
    ) -> LedgerEntry | None:
        """The grant applied under ``request_id``, if it was one of ``amount``; else ``None``."""
        try:
            user, value = _validate.user_id(user_id), _validate.amount(amount, positive=True)
            request = request_id_of(request_id)
        except InvalidInput:
            return None
        found = await self.store.find_request(user, request) if request is not None else None
        if found is None or found.kind is not EntryKind.GRANT or found.amount != value:
            return None
        return found

    async def expire(self, user_id: str) -> list[LedgerEntry]:
        """Write off the credit blocks whose time came; return their ``EXPIRE`` entries.

        Any other operation on the user does the same first; this is for a
        job that keeps balances current without waiting for the next call.
        """
        # From the stored account: a remembered one may predate a block another writer made.
        change = await self._fresh(self._expire_op(_validate.user_id(user_id)))
        return [entry for entry in change.entries if entry.kind is EntryKind.EXPIRE]

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
        """Spend credits: ``amount``, or the priced ``usage`` of ``model``; return the entry.

        The balance is clamped at zero unless the config allows a negative
        balance; the entry keeps the full cost. ``strict=True`` refuses with
        ``InsufficientBalance`` (writing nothing) when the available balance,
        after a due refill, cannot pay. ``incomplete=True`` prices a
        completion cut short at LibreChat's cancel rate.
        """
        return await self._apply(
            # Positional, as every hot call here: a call's keywords cost it a search per name.
            self._charge_op(user_id, amount, model, usage, incomplete, strict, request_id, metadata)
        )

    async def set_balance(
        self,
        user_id: str,
        amount: Decimal | float,
        *,
        request_id: str | None = None,
        reason: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> LedgerEntry:
        """Set the user's balance to ``amount``; return the ``ADJUST`` entry of the difference."""
        return await self._apply(
            self._set_balance_op(
                user_id, amount, request_id=request_id, reason=reason, metadata=metadata
            )
        )

    async def maybe_refill(
        self,
        user_id: str,
        *,
        cost: Decimal | float = 0,
        reason: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> LedgerEntry | None:
        """Apply a refill if one is due (see ``rules.refill_due``); return its entry or ``None``.

        ``reason`` and ``metadata`` go on the ``REFILL`` entry, if one is written.
        """
        user_id = _validate.user_id(user_id)
        cost_value = _validate.amount(cost, name="cost")
        meta = _with_reason(metadata, reason)
        op = self._refill_op(user_id, cost_value, metadata=meta)
        return self._refill_entry(await self._fresh(op))

    async def check(
        self,
        user_id: str,
        cost: Decimal | float | None = None,
        *,
        model: str | None = None,
        input_tokens: int | None = None,
    ) -> BalanceCheck:
        """Can the user pay ``cost`` now? A due refill is applied first.

        Give the cost in credits, or a ``model`` and ``input_tokens`` to price
        the prompt as LibreChat's balance check does. Without either, the
        answer is whether the available balance is above zero. Equal to the
        cost is enough.
        """
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
            out = self._outbox()
            self._denied(refused, started, out)
            if out:
                await self._tell(out)
            raise
        return result

    async def _admit(self, user_id: str) -> None:
        """``require(user_id)`` without building its answer: the check before a metered call.

        Most calls are answered by ``rules.admits`` from one read; the rest
        (a refill due, a refusal) go through ``require``.
        """
        if type(user_id) is not str or user_id not in _USER_IDS:  # checked before: a lookup
            _validate.user_id(user_id)
        account = await self.store.load(user_id)
        if account is not None and rules.admits(account, self._now, config=self.config):
            return
        await self.require(user_id)

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

        With a ``request_id``, a retried call gets the request's open hold
        again; after that hold was released, a new hold (its own id), whose
        settle charges once; after it was settled, the settled hold's id, so
        that settling again returns the first charge.
        """
        user_id, cost, lifetime, request, started = self._hold_ask(
            user_id, amount, model, usage, ttl, request_id
        )
        out: Outbox = [] if self.on_event is not None else None
        # What the plans wrote, for a cancelled hold's clean-up.  # async-only
        made: list[rules.Change] = []  # async-only
        hold_id = ""  # set under the lock, before the plan runs
        try:
            async with self._locks[hash(user_id) % LOCK_STRIPES]:
                hold_id = new_id() if request is None else await self._hold_id(user_id, request)
                # async-only: begin
                plan = partial(
                    hold_plan, made, user_id, cost, hold_id, lifetime, self.config, request
                )
                # async-only: end
                # sync-only: plan = partial(
                # sync-only:     rules.hold_of, user_id, cost, hold_id, lifetime, self.config,
                # sync-only:     request, new_id
                # sync-only: )
                op = _new_tuple(Op, (user_id, plan, None, None, started, False))  # Op(...)
                account = self._seen.get(user_id)  # as _from_seen, frames fewer on the hot path
                fresh = account is None
                if fresh:
                    account = await self.store.load(user_id)
                change = await self._write(op, account, fresh, out)
        except InsufficientBalance as refused:
            self._denied(refused, started, out)
            await self._tell_after(out, refused)
            raise
        # async-only: begin
        except asyncio.CancelledError as cancelled:
            # Its commit may have gone through: nobody would resolve the hold.
            written = self._made_hold(made[-1], hold_id) if made else None
            if written is not None:
                await self._unmake(written)
            await self._tell_after(out, cancelled)
            raise
        # async-only: end
        except BaseException as failed:
            await self._tell_after(out, failed)
            raise
        if out:
            await self._tell(out)
        holds = change.account.holds
        held = holds[-1]  # where a new hold usually goes
        if held.id != hold_id:
            held = self._found_hold(change, hold_id)
        issued = self._issued  # remembered for _checked_hold
        if len(issued) >= SEEN_LIMIT:
            issued.clear()
        issued[id(held)] = held
        return held

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
        op = self._settle_op(hold, amount, model, usage, incomplete, metadata)
        entry = await self._apply(op)
        # As _tidy, frames fewer on the hot path: a settled hold is gone from the account.
        seen = self._seen.get(op.user_id)
        if seen is None or seen.holds:
            await self._tidy(hold)
        return entry

    async def release(self, hold: Hold) -> LedgerEntry:
        """Resolve a hold without a charge; return its ``RELEASE`` entry (or the one before it)."""
        entry = await self._apply(self._release_op(hold))
        await self._tidy(hold)
        return entry

    async def configure_refill(
        self,
        user_id: str,
        settings: RefillSettings | None,
        *,
        reason: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Account:
        """Give one user their own refill settings (``None``: follow the config again).

        Written like any change, with an ``ADJUST`` entry of amount 0 that
        records what the settings became (under ``"refill"`` in its metadata,
        beside ``reason`` and ``metadata``); returns the account.
        """
        op = self._configure_refill_op(user_id, settings, reason=reason, metadata=metadata)
        return (await self._locked(op)).account

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

        Inside the block settle the hold with the real cost
        (``held.settle(...)``); on an exception, or if the block settles
        nothing, the hold is released.
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
            await self._locked(self._drop_op(hold))

    def metered(
        self,
        *,
        user: str | Callable[..., str] | None = None,
        model: str | Callable[..., str | None] | None = None,
        estimate: Callable[..., int | TokenUsage | None] | None = None,
        usage: Callable[[Any], TokenUsage | None] | None = None,
        request_id: str | Callable[..., str | None] | None = None,
        on_missing_usage: OnMissingUsage = "warn",
        on_store_error: OnStoreError = "closed",
    ) -> Callable[[Callable[P, T]], Callable[P, T]]:
        """Wrap a function that calls a model: check before, charge after (see ``metering``).

        The async manager meters coroutine and async generator functions; the
        sync one, plain functions (a returned stream is metered as it is read).
        """
        return metered(
            self,
            user=user,
            model=model,
            estimate=estimate,
            usage=usage,
            request_id=request_id,
            on_missing_usage=on_missing_usage,
            on_store_error=on_store_error,
        )

    def acting_as(self, user_id: str) -> AbstractContextManager[None]:
        """Within the block, ``metered`` functions without a ``user=`` charge ``user_id``."""
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

    # --- running operations -----------------------------------------------------

    def _lock(self, user_id: str) -> AsyncLock:
        return self._locks[hash(user_id) % LOCK_STRIPES]

    # async-only: begin
    async def _tell(self, events: list[Event]) -> None:
        """Tell ``on_event``, awaiting an async callback; a failure is logged, never raised."""
        callback = self.on_event
        if callback is None:
            return
        for event in events:
            try:
                told = callback(event)
                if inspect.isawaitable(told):
                    await told
            except Exception:  # noqa: PERF203 - each event gets its own chance
                logger.exception("the on_event callback failed on %s", type(event).__name__)

    # async-only: end
    async def _tell_after(self, out: Outbox, failed: BaseException) -> None:  # sync-noqa: ARG002
        """Tell the events of a call that raised (a cancelled async call does not wait for them)."""
        if not out:
            return
        # async-only: begin
        if not isinstance(failed, Exception):
            # Cancelled (or the coroutine closed): the callbacks run as a task of their own.
            with contextlib.suppress(RuntimeError):  # no loop left to run them
                _detach(self._tell(out))
            return
        # async-only: end
        await self._tell(out)

    # async-only: begin
    async def _unmake(self, hold: Hold) -> None:
        """Drop a hold this call wrote for a caller that was cancelled before it got it.

        Shielded: cancelled again, the drop still runs to its end.
        """
        self._seen.pop(hold.user_id, None)  # the cancelled commit may have gone through
        drop = _detach(self._drop_quietly(hold))
        with contextlib.suppress(asyncio.CancelledError):  # cancelled again: it goes on alone
            await asyncio.shield(drop)

    async def _drop_quietly(self, hold: Hold) -> None:
        try:
            await self._locked(self._drop_op(hold))
        except Exception:
            logger.warning(
                "a hold of %r written for a cancelled call could not be dropped; it expires at %s",
                hold.user_id,
                hold.expires_at,
                exc_info=True,
            )

    # async-only: end
    async def _locked(self, op: Op) -> rules.Change:
        """Run a write from the last account seen under the user's lock; then tell its events."""
        out = self._outbox()
        try:
            async with self._lock(op.user_id):
                change = await self._from_seen(op, out)
        except BaseException as failed:
            await self._tell_after(out, failed)
            raise
        if out:
            await self._tell(out)
        return change

    async def _hold_id(self, user_id: str, request_id: str | None) -> str:
        """The id of the hold asked for: new, or the request's (see ``HoldSearch``)."""
        if request_id is None:
            return new_id()
        search = HoldSearch(request_id)
        probe = search.probe()
        while probe is not None:
            search.found(await self.store.find_request(user_id, probe))
            probe = search.probe()
        return search.hold_id()

    async def _fresh(self, op: Op) -> rules.Change:
        """Run ``op`` from the stored account (for operations that decide on what they read)."""
        out = self._outbox()
        try:
            async with self._lock(op.user_id):
                account = await self.store.load(op.user_id)
                change = await self._write(op, account, fresh=True, out=out)
                self._remember(change.account)
        except BaseException as failed:
            await self._tell_after(out, failed)
            raise
        if out:
            await self._tell(out)
        return change

    async def _from_seen(self, op: Op, out: Outbox) -> rules.Change:
        """Run a write from the last account seen; the caller holds the user's lock."""
        account = self._seen.get(op.user_id)
        fresh = account is None
        if fresh:
            account = await self.store.load(op.user_id)
        return await self._write(op, account, fresh, out)

    async def _apply(self, op: Op) -> LedgerEntry:
        """Run a write and return the operation's entry (the first one, for a repeat)."""
        out: Outbox = [] if self.on_event is not None else None
        user_id = op.user_id
        try:
            async with self._locks[hash(user_id) % LOCK_STRIPES]:
                account = self._seen.get(user_id)  # as _from_seen, frames fewer on the hot path
                try:
                    fresh = account is None
                    if fresh:
                        account = await self.store.load(user_id)
                    if self._hot and self._is_hot(user_id):
                        change = await self._contended(
                            op, account, fresh=fresh, first=None, out=out
                        )
                    else:  # _write's common case, a frame fewer: one attempt
                        try:
                            change = await self._attempt(op, account, fresh, out)
                        except VersionConflict as conflict:
                            change = await self._contended(
                                op, account, fresh=fresh, first=conflict, out=out
                            )
                    entry = change.entries[-1]
                except Replayed as replayed:
                    entry = replayed.entry
                except InsufficientBalance as refused:
                    entry = await self._refused(op, refused, out)
        except BaseException as failed:
            await self._tell_after(out, failed)
            raise
        if out:
            await self._tell(out)
        return entry

    async def _refused(self, op: Op, refused: InsufficientBalance, out: Outbox) -> LedgerEntry:
        """Answer a refused request: raise, unless it repeats one applied before."""
        user_id = op.user_id
        if op.request_id is None or op.lenient is None:
            self._denied(refused, op.started, out)
            raise refused
        found = await self.store.find_request(user_id, op.request_id)
        if found is None:
            self._denied(refused, op.started, out)
            raise refused
        # An applied request is answered with its entry, even if it could not pay now.
        attempted = op.lenient(await self.store.load(user_id), self._now())
        return rules.replay(found, attempted.entry)

    async def _write(
        self, op: Op, account: Account | None, fresh: bool, out: Outbox
    ) -> rules.Change:
        """Plan and commit, retrying lost compare-and-sets; the caller holds the user's lock."""
        if not self._hot or not self._is_hot(op.user_id):  # the common case: one attempt
            try:
                return await self._attempt(op, account, fresh, out)
            except VersionConflict as conflict:
                return await self._contended(op, account, fresh=fresh, first=conflict, out=out)
        return await self._contended(op, account, fresh=fresh, first=None, out=out)

    async def _contended(
        self,
        op: Op,
        account: Account | None,
        *,
        fresh: bool,
        first: VersionConflict | None,
        out: Outbox,
    ) -> rules.Change:
        """Write for a user that is hot (``first`` is ``None``) or whose first try lost.

        A write the store can take as a delta goes first as one; the rest, and
        a delta the store's guard refused, go through ``_queued``.
        """
        if op.delta:
            done, first = await self._delta(op, account, first, out)
            if done is not None:
                return done
        return await self._queued(op, account, fresh=fresh, first=first, out=out)

    async def _queued(
        self,
        op: Op,
        account: Account | None,
        *,
        fresh: bool,
        first: VersionConflict | None,
        out: Outbox,
    ) -> rules.Change:
        """Retry at once, then in turn under ``exclusive()``, then by the retry policy."""
        exclusive: Callable[[str], AbstractAsyncContextManager[None]] | None = getattr(
            self.store, "exclusive", None
        )
        at_once = self._retries_at_once(self.store)
        if first is None and exclusive is not None and not at_once:
            async with exclusive(op.user_id):
                try:
                    return await self._attempt(op, None, fresh=False, out=out)
                except VersionConflict as conflict:  # a writer that ignores the lock
                    seen: Account | None = conflict.current
        else:
            done, seen = await self._optimistic(
                op, account, fresh=fresh, at_once=at_once, first=first, out=out
            )
            if done is not None:
                return done
        if exclusive is not None:
            # Under the store's writer lock a fresh load cannot be overtaken.
            async with exclusive(op.user_id):
                try:
                    return await self._attempt(op, None, fresh=False, out=out)
                except VersionConflict as conflict:  # a writer that ignores the lock
                    seen = conflict.current
        async for attempt in async_retrying(self.retry):
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    seen = None  # it slept: what the last conflict reported is stale now
                try:
                    return await self._attempt(op, seen, seen is not None, out)
                except VersionConflict as conflict:
                    seen = conflict.current
                    raise
        raise AssertionError("unreachable: tenacity re-raises")  # pragma: no cover

    async def _delta(
        self, op: Op, account: Account | None, first: VersionConflict | None, out: Outbox
    ) -> tuple[rules.Change | None, VersionConflict | None]:
        """Commit ``op`` as a ``rules.Delta`` if the store and rules allow: (change, last loss).

        It is planned on the account the last loss reported, or else on
        ``account``. ``(None, first)`` when the store has no
        ``commit_delta``, no account is known, or the rules cannot plan the
        write as one (see ``rules.as_delta``); ``(None, loss)`` when the
        store's guard refused it. The caller then writes it as usual.
        """
        commit_delta: Callable[..., Any] | None = getattr(self.store, "commit_delta", None)
        start = account if first is None else first.current
        if commit_delta is None or start is None:
            return None, first
        planned = rules.as_delta(start, op.plan(start, self._now()), config=self.config)
        if planned is None:
            return None, first
        if first is not None:
            self._retried(first, out)  # the delta is the lost write's retry
        change = planned.change
        try:
            reached: tuple[Decimal, int, datetime] = await commit_delta(
                change.account, change.entry, floor=planned.floor
            )
        except DuplicateRequest as duplicate:
            raise Replayed(rules.replay(duplicate.entry, change.entry)) from None
        except VersionConflict as conflict:
            self._lost(conflict)
            return None, conflict
        # async-only: begin
        except asyncio.CancelledError:
            self._seen.pop(op.user_id, None)  # the store may have taken the charge
            raise
        # async-only: end
        change = rules.rebase(planned, *reached)
        self._remember(change.account)
        if out is not None:
            self._committed(op, change, out)
        return change, None

    async def _optimistic(
        self,
        op: Op,
        account: Account | None,
        *,
        fresh: bool,
        at_once: int,
        first: VersionConflict | None,
        out: Outbox,
    ) -> tuple[rules.Change | None, Account | None]:
        """Try from ``account``; after a loss, again at once ``at_once`` times: (change, last seen).

        Each retry starts from the account the last loss reported. Stores ask
        for such retries (``_retries_at_once``) when they hold a commit off
        while another writer holds ``exclusive()``; the caller queues for it
        after them.
        """
        if first is None:
            try:
                return await self._attempt(op, account, fresh, out), account
            except VersionConflict as conflict:
                first = conflict
        if self.retry.attempts <= 1:
            raise first
        seen = first.current
        self._retried(first, out)
        for _ in range(min(at_once, self.retry.attempts - 1)):
            if seen is None:
                break
            try:
                return await self._attempt(op, seen, fresh=True, out=out), seen
            except VersionConflict as conflict:
                seen = conflict.current
        return None, seen

    async def _attempt(
        self, op: Op, account: Account | None, fresh: bool, out: Outbox
    ) -> rules.Change:
        if account is None and not fresh:
            account = await self.store.load(op.user_id)
        clock = self.clock  # self._now(), inline: every write asks for the time
        now = datetime.now(timezone.utc) if clock is utc_now else _validate.aware(clock())
        try:
            change = op.plan(account, now)
        except InsufficientBalance:
            if fresh:
                raise
            # Refused on a remembered account: decide again on the stored one.
            change = op.plan(await self.store.load(op.user_id), now)
        if change.account.version == change.expected_version:  # nothing to write
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
        # async-only: begin
        except asyncio.CancelledError:
            # The store may have taken the commit: what this manager saw last is stale.
            self._seen.pop(op.user_id, None)
            raise
        # async-only: end
        seen = self._seen  # as _remember, inline
        if len(seen) >= SEEN_LIMIT:
            seen.clear()
        seen[op.user_id] = change.account
        if out is not None:
            self._committed(op, change, out)
        return change
