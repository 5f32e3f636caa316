# Generated from src/creditmeter/aio.py by tools/unasync.py.
# Do not edit: change the source, then run `python tools/unasync.py`.
"""``BalanceManager``: validate, load, apply a rule, commit; retry a lost compare-and-set.

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

from collections.abc import Callable
from contextlib import AbstractContextManager
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
    request_id_of,
    utc_now,
)
from creditmeter._compat import Lock
from creditmeter._ids import new_id
from creditmeter._retry import retrying
from creditmeter.batches import BatchMixin
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
from creditmeter.reports import ReportMixin
from creditmeter.reservations import DEFAULT_TTL, Reservation
from creditmeter.stores.base import BalanceStore
from creditmeter.usage import TokenUsage

__all__ = ["BalanceManager", "Clock", "utc_now"]

_ZERO = Decimal(0)
_new_tuple = tuple.__new__
_USER_IDS = _validate.USER_IDS
P = ParamSpec("P")
T = TypeVar("T")


class BalanceManager(BatchMixin, ReportMixin, ManagerBase):
    """Check, charge, grant and refill token credits over a store.

    ``store`` follows the ``BalanceStore`` protocol. ``config`` decides how balances
    behave (LibreChat's ``balance`` keys); ``pricing`` prices token usage
    (LibreChat's table by default); ``clock`` is any zero-argument callable
    returning an aware datetime; ``retry`` bounds the retries of a lost
    compare-and-set. Close the manager (and its store) with ``close()``, or
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
        store: BalanceStore,
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
        self._locks = tuple(Lock() for _ in range(LOCK_STRIPES))

    def _after_fork(self) -> None:
        self._locks = tuple(Lock() for _ in range(LOCK_STRIPES))

    # --- reads ----------------------------------------------------------------

    def account(self, user_id: str) -> Account:
        """Return the user's account, opening it on first sight."""
        op = self._open_op(_validate.user_id(user_id))
        out = self._outbox()
        try:
            with self._lock(op.user_id):
                account = self.store.load(op.user_id)
                if account is None or (account.blocks and rules.expiry_due(account, self._now())):
                    account = (self._write(op, account, fresh=True, out=out)).account
                self._remember(account)
        except BaseException as failed:
            self._tell_after(out, failed)
            raise
        if out:
            self._emit(out)
        return rules.open_holds(account, self._now())

    def balance(self, user_id: str) -> Decimal:
        """Return the user's balance, opening the account on first sight."""
        return (self.account(user_id)).balance

    def ledger(self, user_id: str, *, limit: int | None = None) -> list[LedgerEntry]:
        """Return the user's ledger entries oldest first; with ``limit``, the newest ``limit``."""
        user_id = _validate.user_id(user_id)
        limit = self._ledger_limit(limit)
        return [] if limit == 0 else self.store.ledger(user_id, limit=limit)

    def users(self) -> list[str]:
        """Return the ids of every user with an account, sorted."""
        return self.store.users()

    # --- writes ---------------------------------------------------------------

    def grant(
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
            return self._apply(
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
            first = self._granted_before(user_id, amount, request_id)
            if first is None:
                raise refused from None
            return first

    def _granted_before(
        self, user_id: object, amount: object, request_id: object
    ) -> LedgerEntry | None:
        """The grant applied under ``request_id``, if it was one of ``amount``; else ``None``."""
        try:
            user, value = _validate.user_id(user_id), _validate.amount(amount, positive=True)
            request = request_id_of(request_id)
        except InvalidInput:
            return None
        found = self.store.find_request(user, request) if request is not None else None
        if found is None or found.kind is not EntryKind.GRANT or found.amount != value:
            return None
        return found

    def expire(self, user_id: str) -> list[LedgerEntry]:
        """Write off the credit blocks whose time came; return their ``EXPIRE`` entries.

        Any other operation on the user does the same first; this is for a
        job that keeps balances current without waiting for the next call.
        """
        # From the stored account: a remembered one may predate a block another writer made.
        change = self._fresh(self._expire_op(_validate.user_id(user_id)))
        return [entry for entry in change.entries if entry.kind is EntryKind.EXPIRE]

    def charge(
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
        return self._apply(
            # Positional, as every hot call here: a call's keywords cost it a search per name.
            self._charge_op(user_id, amount, model, usage, incomplete, strict, request_id, metadata)
        )

    def set_balance(
        self,
        user_id: str,
        amount: Decimal | float,
        *,
        request_id: str | None = None,
        reason: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> LedgerEntry:
        """Set the user's balance to ``amount``; return the ``ADJUST`` entry of the difference."""
        return self._apply(
            self._set_balance_op(
                user_id, amount, request_id=request_id, reason=reason, metadata=metadata
            )
        )

    def maybe_refill(
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
        return self._refill_entry(self._fresh(op))

    def check(
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
        quick = self._check_without_refill(self.store.load(user_id), price)
        if quick is not None:
            return quick
        change = self._fresh(self._refill_op(user_id, price if price is not None else _ZERO))
        return self._check_result(change, price)

    def require(
        self,
        user_id: str,
        cost: Decimal | float | None = None,
        *,
        model: str | None = None,
        input_tokens: int | None = None,
    ) -> BalanceCheck:
        """Like ``check``, but raise ``InsufficientBalance`` when the user cannot pay."""
        started = self._clock_start()
        result = self.check(user_id, cost, model=model, input_tokens=input_tokens)
        try:
            self._refusal(user_id, result, input_tokens)
        except InsufficientBalance as refused:
            out = self._outbox()
            self._denied(refused, started, out)
            if out:
                self._emit(out)
            raise
        return result

    def _admit(self, user_id: str) -> None:
        """``require(user_id)`` without building its answer: the check before a metered call.

        Most calls are answered by ``rules.admits`` from one read; the rest
        (a refill due, a refusal) go through ``require``.
        """
        if type(user_id) is not str or user_id not in _USER_IDS:  # checked before: a lookup
            _validate.user_id(user_id)
        account = self.store.load(user_id)
        if account is not None and rules.admits(account, self._now, config=self.config):
            return
        self.require(user_id)

    def hold(
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
        hold_id = ""  # set under the lock, before the plan runs
        try:
            with self._locks[hash(user_id) % LOCK_STRIPES]:
                hold_id = new_id() if request is None else self._hold_id(user_id, request)
                plan = partial(
                    rules.hold_of, user_id, cost, hold_id, lifetime, self.config, request, new_id
                )
                op = _new_tuple(Op, (user_id, plan, None, None, started, False))  # Op(...)
                account = self._seen.get(user_id)  # as _from_seen, frames fewer on the hot path
                fresh = account is None
                if fresh:
                    account = self.store.load(user_id)
                change = self._write(op, account, fresh, out)
        except InsufficientBalance as refused:
            self._denied(refused, started, out)
            self._tell_after(out, refused)
            raise
        except BaseException as failed:
            self._tell_after(out, failed)
            raise
        if out:
            self._emit(out)
        holds = change.account.holds
        held = holds[-1]  # where a new hold usually goes
        if held.id != hold_id:
            held = self._found_hold(change, hold_id)
        issued = self._issued  # remembered for _checked_hold
        if len(issued) >= SEEN_LIMIT:
            issued.clear()
        issued[id(held)] = held
        return held

    def settle(
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
        entry = self._apply(op)
        # As _tidy, frames fewer on the hot path: a settled hold is gone from the account.
        seen = self._seen.get(op.user_id)
        if seen is None or seen.holds:
            self._tidy(hold)
        return entry

    def release(self, hold: Hold) -> LedgerEntry:
        """Resolve a hold without a charge; return its ``RELEASE`` entry (or the one before it)."""
        entry = self._apply(self._release_op(hold))
        self._tidy(hold)
        return entry

    def configure_refill(
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
        return (self._locked(op)).account

    def reserve(
        self,
        user_id: str,
        amount: Decimal | float | None = None,
        *,
        model: str | None = None,
        usage: TokenUsage | None = None,
        ttl: timedelta = DEFAULT_TTL,
        request_id: str | None = None,
    ) -> Reservation:
        """``with meter.reserve(user, amount) as held:``: hold, and release unless settled.

        Inside the block settle the hold with the real cost
        (``held.settle(...)``); on an exception, or if the block settles
        nothing, the hold is released.
        """
        return Reservation(
            self,
            user_id,
            amount,
            model=model,
            usage=usage,
            ttl=ttl,
            request_id=request_id,
        )

    def _tidy(self, hold: Hold) -> None:
        """After resolving a hold that a retry took again, drop the copy left in the account."""
        if self._leftover(hold):
            self._locked(self._drop_op(hold))

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

    def close(self) -> None:
        """Close the store."""
        self.store.close()

    def __enter__(self) -> BalanceManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"BalanceManager({self.store!r}, {self.config!r})"

    # --- running operations -----------------------------------------------------

    def _lock(self, user_id: str) -> Lock:
        return self._locks[hash(user_id) % LOCK_STRIPES]

    def _tell_after(self, out: Outbox, failed: BaseException) -> None:  # noqa: ARG002
        """Tell the events of a call that raised (a cancelled async call does not wait for them)."""
        if not out:
            return
        self._emit(out)

    def _locked(self, op: Op) -> rules.Change:
        """Run a write from the last account seen under the user's lock; then tell its events."""
        out = self._outbox()
        try:
            with self._lock(op.user_id):
                change = self._from_seen(op, out)
        except BaseException as failed:
            self._tell_after(out, failed)
            raise
        if out:
            self._emit(out)
        return change

    def _hold_id(self, user_id: str, request_id: str | None) -> str:
        """The id of the hold asked for: new, or the request's (see ``HoldSearch``)."""
        if request_id is None:
            return new_id()
        search = HoldSearch(request_id)
        probe = search.probe()
        while probe is not None:
            search.found(self.store.find_request(user_id, probe))
            probe = search.probe()
        return search.hold_id()

    def _fresh(self, op: Op) -> rules.Change:
        """Run ``op`` from the stored account (for operations that decide on what they read)."""
        out = self._outbox()
        try:
            with self._lock(op.user_id):
                account = self.store.load(op.user_id)
                change = self._write(op, account, fresh=True, out=out)
                self._remember(change.account)
        except BaseException as failed:
            self._tell_after(out, failed)
            raise
        if out:
            self._emit(out)
        return change

    def _from_seen(self, op: Op, out: Outbox) -> rules.Change:
        """Run a write from the last account seen; the caller holds the user's lock."""
        account = self._seen.get(op.user_id)
        fresh = account is None
        if fresh:
            account = self.store.load(op.user_id)
        return self._write(op, account, fresh, out)

    def _apply(self, op: Op) -> LedgerEntry:
        """Run a write and return the operation's entry (the first one, for a repeat)."""
        out: Outbox = [] if self.on_event is not None else None
        user_id = op.user_id
        try:
            with self._locks[hash(user_id) % LOCK_STRIPES]:
                account = self._seen.get(user_id)  # as _from_seen, frames fewer on the hot path
                try:
                    fresh = account is None
                    if fresh:
                        account = self.store.load(user_id)
                    if self._hot and self._is_hot(user_id):
                        change = self._contended(op, account, fresh=fresh, first=None, out=out)
                    else:  # _write's common case, a frame fewer: one attempt
                        try:
                            change = self._attempt(op, account, fresh, out)
                        except VersionConflict as conflict:
                            change = self._contended(
                                op, account, fresh=fresh, first=conflict, out=out
                            )
                    entry = change.entries[-1]
                except Replayed as replayed:
                    entry = replayed.entry
                except InsufficientBalance as refused:
                    entry = self._refused(op, refused, out)
        except BaseException as failed:
            self._tell_after(out, failed)
            raise
        if out:
            self._emit(out)
        return entry

    def _refused(self, op: Op, refused: InsufficientBalance, out: Outbox) -> LedgerEntry:
        """Answer a refused request: raise, unless it repeats one applied before."""
        user_id = op.user_id
        if op.request_id is None or op.lenient is None:
            self._denied(refused, op.started, out)
            raise refused
        found = self.store.find_request(user_id, op.request_id)
        if found is None:
            self._denied(refused, op.started, out)
            raise refused
        # An applied request is answered with its entry, even if it could not pay now.
        attempted = op.lenient(self.store.load(user_id), self._now())
        return rules.replay(found, attempted.entry)

    def _write(self, op: Op, account: Account | None, fresh: bool, out: Outbox) -> rules.Change:
        """Plan and commit, retrying lost compare-and-sets; the caller holds the user's lock."""
        if not self._hot or not self._is_hot(op.user_id):  # the common case: one attempt
            try:
                return self._attempt(op, account, fresh, out)
            except VersionConflict as conflict:
                return self._contended(op, account, fresh=fresh, first=conflict, out=out)
        return self._contended(op, account, fresh=fresh, first=None, out=out)

    def _contended(
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
            done, first = self._delta(op, account, first, out)
            if done is not None:
                return done
        return self._queued(op, account, fresh=fresh, first=first, out=out)

    def _queued(
        self,
        op: Op,
        account: Account | None,
        *,
        fresh: bool,
        first: VersionConflict | None,
        out: Outbox,
    ) -> rules.Change:
        """Retry at once, then in turn under ``exclusive()``, then by the retry policy."""
        exclusive: Callable[[str], AbstractContextManager[None]] | None = getattr(
            self.store, "exclusive", None
        )
        at_once = self._retries_at_once(self.store)
        if first is None and exclusive is not None and not at_once:
            with exclusive(op.user_id):
                try:
                    return self._attempt(op, None, fresh=False, out=out)
                except VersionConflict as conflict:  # a writer that ignores the lock
                    seen: Account | None = conflict.current
        else:
            done, seen = self._optimistic(
                op, account, fresh=fresh, at_once=at_once, first=first, out=out
            )
            if done is not None:
                return done
        if exclusive is not None:
            # Under the store's writer lock a fresh load cannot be overtaken.
            with exclusive(op.user_id):
                try:
                    return self._attempt(op, None, fresh=False, out=out)
                except VersionConflict as conflict:  # a writer that ignores the lock
                    seen = conflict.current
        for attempt in retrying(self.retry):
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    seen = None  # it slept: what the last conflict reported is stale now
                try:
                    return self._attempt(op, seen, seen is not None, out)
                except VersionConflict as conflict:
                    seen = conflict.current
                    raise
        raise AssertionError("unreachable: tenacity re-raises")  # pragma: no cover

    def _delta(
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
            reached: tuple[Decimal, int, datetime] = commit_delta(
                change.account, change.entry, floor=planned.floor
            )
        except DuplicateRequest as duplicate:
            raise Replayed(rules.replay(duplicate.entry, change.entry)) from None
        except VersionConflict as conflict:
            self._lost(conflict)
            return None, conflict
        change = rules.rebase(planned, *reached)
        self._remember(change.account)
        if out is not None:
            self._committed(op, change, out)
        return change, None

    def _optimistic(
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
                return self._attempt(op, account, fresh, out), account
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
                return self._attempt(op, seen, fresh=True, out=out), seen
            except VersionConflict as conflict:
                seen = conflict.current
        return None, seen

    def _attempt(self, op: Op, account: Account | None, fresh: bool, out: Outbox) -> rules.Change:
        if account is None and not fresh:
            account = self.store.load(op.user_id)
        clock = self.clock  # self._now(), inline: every write asks for the time
        now = datetime.now(timezone.utc) if clock is utc_now else _validate.aware(clock())
        try:
            change = op.plan(account, now)
        except InsufficientBalance:
            if fresh:
                raise
            # Refused on a remembered account: decide again on the stored one.
            change = op.plan(self.store.load(op.user_id), now)
        if change.account.version == change.expected_version:  # nothing to write
            return change
        try:
            self.store.commit(
                change.account, change.entries, expected_version=change.expected_version
            )
        except DuplicateRequest as duplicate:
            raise Replayed(rules.replay(duplicate.entry, change.entry)) from None
        except VersionConflict as conflict:
            self._lost(conflict)
            raise
        seen = self._seen  # as _remember, inline
        if len(seen) >= SEEN_LIMIT:
            seen.clear()
        seen[op.user_id] = change.account
        if out is not None:
            self._committed(op, change, out)
        return change
