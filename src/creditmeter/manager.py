"""``BalanceManager``: validate, load, apply a rule, commit; retry a lost compare-and-set.

The manager holds no business rule (those are in ``rules.py``). Each write
runs under a per-user lock, so writes to one user from the threads of one
process queue instead of colliding; compare-and-set retries only absorb
contention from other processes and hosts. A write starts from the last
account this manager saw for the user, so an uncontended write is one store
round trip; if another writer got there first, the conflict reports the
current account and the retry starts from that.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime, timezone
from decimal import Decimal
from types import TracebackType
from typing import Any

from creditmeter import _validate, rules
from creditmeter._ids import new_id
from creditmeter._retry import retrying
from creditmeter.config import BalanceConfig, RetryPolicy
from creditmeter.exceptions import (
    DuplicateRequest,
    InsufficientBalance,
    InvalidInput,
    VersionConflict,
)
from creditmeter.models import Account, BalanceCheck, EntryKind, LedgerEntry
from creditmeter.pricing import Pricing, Rates
from creditmeter.stores.base import BalanceStore
from creditmeter.usage import MAX_TOKENS, TokenUsage

__all__ = ["BalanceManager", "Clock"]

Clock = Callable[[], datetime]
Plan = Callable[[Account | None, datetime], rules.Change]

_ZERO = Decimal(0)
_LOCK_STRIPES = 256
_SEEN_LIMIT = 10_000


def utc_now() -> datetime:
    """The default clock: the current time in UTC."""
    return datetime.now(timezone.utc)


class BalanceManager:
    """Check, charge, grant and refill token credits over a ``BalanceStore``.

    ``config`` decides how balances behave (LibreChat's ``balance`` keys);
    ``clock`` is any zero-argument callable returning an aware datetime;
    ``retry`` bounds the retries of a lost compare-and-set.
    """

    def __init__(
        self,
        store: BalanceStore,
        config: BalanceConfig | None = None,
        *,
        pricing: Pricing | None = None,
        clock: Clock | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.store = store
        self.config = config if config is not None else BalanceConfig()
        self.pricing = pricing if pricing is not None else Pricing.librechat()
        self.clock: Clock = clock if clock is not None else utc_now
        self.retry = retry if retry is not None else RetryPolicy()
        self._locks = tuple(threading.Lock() for _ in range(_LOCK_STRIPES))
        self._seen: dict[str, Account] = {}

    # --- reads ----------------------------------------------------------------

    def account(self, user_id: str) -> Account:
        """Return the user's account, opening it on first sight."""
        user_id = _validate.user_id(user_id)
        config = self.config

        def plan(account: Account | None, now: datetime) -> rules.Change:
            if account is not None:  # opened by another writer meanwhile
                raise _Settled(rules.Change(account, (), account.version))
            return rules.open_account(user_id, config=config, now=now, new_id=new_id)

        with self._lock(user_id):
            account = self.store.load(user_id)
            if account is None:
                account = self._write(user_id, plan, fresh=True, account=None).account
            self._remember(account)
            return account

    def balance(self, user_id: str) -> Decimal:
        """Return the user's balance, opening the account on first sight."""
        return self.account(user_id).balance

    def ledger(self, user_id: str, *, limit: int | None = None) -> list[LedgerEntry]:
        """Return the user's ledger entries oldest first; with ``limit``, the newest ``limit``."""
        user_id = _validate.user_id(user_id)
        if limit is not None and (type(limit) is not int or limit < 0):
            raise InvalidInput(f"limit must be a whole number >= 0 or None, got {limit!r}")
        if limit == 0:
            return []
        return self.store.ledger(user_id, limit=limit)

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
    ) -> LedgerEntry:
        """Add credits to the user's balance; returns the ``GRANT`` entry."""
        user_id = _validate.user_id(user_id)
        value = _validate.amount(amount, positive=True)
        request_id = _validate.optional_text(request_id, name="request_id")
        meta = _with_reason(metadata, reason)
        config = self.config

        def plan(account: Account | None, now: datetime) -> rules.Change:
            return rules.grant(
                account,
                user_id,
                value,
                config=config,
                now=now,
                new_id=new_id,
                request_id=request_id,
                metadata=meta,
            )

        return self._apply(user_id, plan, request_id=request_id)

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
        """Spend credits: ``amount``, or the priced ``usage`` of ``model``; returns the entry.

        The balance is clamped at zero unless the config allows a negative
        balance; the entry keeps the full cost. ``strict=True`` refuses with
        ``InsufficientBalance`` (writing nothing) when the available balance,
        after a due refill, cannot pay.
        """
        user_id = _validate.user_id(user_id)
        model = _validate.optional_text(model, name="model")
        cost, rates = self._cost(amount, model=model, usage=usage, incomplete=incomplete)
        request_id = _validate.optional_text(request_id, name="request_id")
        meta = _validate.metadata(metadata)
        if type(strict) is not bool:
            raise InvalidInput(f"strict must be True or False, got {strict!r}")
        config = self.config

        def plan(account: Account | None, now: datetime, *, strict: bool = strict) -> rules.Change:
            return rules.charge(
                account,
                user_id,
                cost,
                config=config,
                now=now,
                new_id=new_id,
                strict=strict,
                request_id=request_id,
                model=model,
                usage=usage,
                rates=rates,
                metadata=meta,
            )

        def lenient(account: Account | None, now: datetime) -> rules.Change:
            return plan(account, now, strict=False)

        return self._apply(user_id, plan, request_id=request_id, lenient=lenient)

    def set_balance(
        self,
        user_id: str,
        amount: Decimal | float,
        *,
        request_id: str | None = None,
        reason: str | None = None,
    ) -> LedgerEntry:
        """Set the user's balance to ``amount``; returns the ``ADJUST`` entry of the difference."""
        user_id = _validate.user_id(user_id)
        target = _validate.amount(amount)
        request_id = _validate.optional_text(request_id, name="request_id")
        meta = _with_reason(None, reason)
        config = self.config

        def plan(account: Account | None, now: datetime) -> rules.Change:
            return rules.set_balance(
                account,
                user_id,
                target,
                config=config,
                now=now,
                new_id=new_id,
                request_id=request_id,
                metadata=meta,
            )

        return self._apply(user_id, plan, request_id=request_id)

    def maybe_refill(self, user_id: str, *, cost: Decimal | float = 0) -> LedgerEntry | None:
        """Apply a refill if one is due (see ``rules.refill_due``); return its entry or ``None``."""
        user_id = _validate.user_id(user_id)
        change = self._refill(user_id, _validate.amount(cost, name="cost"))
        if not change.entries or change.entry.kind is not EntryKind.REFILL:
            return None
        return change.entry

    def check(
        self,
        user_id: str,
        cost: Decimal | float | None = None,
        *,
        model: str | None = None,
        input_tokens: int | None = None,
    ) -> BalanceCheck:
        """Can the user pay ``cost`` now? A due refill is applied first.

        Without a cost, the answer is whether the available balance is above
        zero. Equal to the cost is enough.
        """
        user_id = _validate.user_id(user_id)
        price = self._check_cost(cost, model=model, input_tokens=input_tokens)
        change = self._refill(user_id, price if price is not None else _ZERO)
        return rules.check(change.account, price, config=self.config)

    def require(
        self,
        user_id: str,
        cost: Decimal | float | None = None,
        *,
        model: str | None = None,
        input_tokens: int | None = None,
    ) -> BalanceCheck:
        """Like ``check``, but raise ``InsufficientBalance`` when the user cannot pay."""
        result = self.check(user_id, cost, model=model, input_tokens=input_tokens)
        if not result.allowed:
            raise InsufficientBalance(
                user_id,
                balance=result.balance,
                available=result.available,
                cost=result.cost,
                prompt_tokens=input_tokens,
            )
        return result

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

    # --- internals --------------------------------------------------------------

    def _cost(
        self,
        amount: Decimal | float | None,
        *,
        model: str | None,
        usage: TokenUsage | None,
        incomplete: bool,
    ) -> tuple[Decimal, Rates | None]:
        """The cost of a charge: the amount given, else the priced usage (with its rates)."""
        if usage is not None and not isinstance(usage, TokenUsage):
            raise InvalidInput(f"usage must be a TokenUsage, got {type(usage).__name__}")
        if type(incomplete) is not bool:
            raise InvalidInput(f"incomplete must be True or False, got {incomplete!r}")
        if amount is not None:
            if incomplete:
                raise InvalidInput("incomplete=True applies to priced usage, not to an amount")
            return _validate.amount(amount), None
        if usage is None:
            raise InvalidInput("charge needs an amount, or usage (with model) to price")
        priced = self.pricing.cost(model, usage, incomplete=incomplete)
        return _validate.amount(priced.total, name="priced cost"), priced.rates

    def _check_cost(
        self,
        cost: Decimal | float | None,
        *,
        model: str | None,
        input_tokens: int | None,
    ) -> Decimal | None:
        """The cost a check is about: given, or the prompt priced as LibreChat's check does."""
        if cost is not None:
            if model is not None or input_tokens is not None:
                raise InvalidInput("give cost, or model and input_tokens, not both")
            return _validate.amount(cost, name="cost")
        if input_tokens is None:
            if model is not None:
                raise InvalidInput("a check by model needs input_tokens to price")
            return None
        if type(input_tokens) is not int or not 0 <= input_tokens <= MAX_TOKENS:
            raise InvalidInput(f"input_tokens must be an int in 0..10**10, got {input_tokens!r}")
        model = _validate.optional_text(model, name="model")
        return self.pricing.prompt_cost(model, input_tokens)

    def _now(self) -> datetime:
        return _validate.aware(self.clock())

    def _lock(self, user_id: str) -> threading.Lock:
        return self._locks[hash(user_id) % _LOCK_STRIPES]

    def _remember(self, account: Account) -> None:
        seen = self._seen
        if len(seen) >= _SEEN_LIMIT:
            seen.clear()
        seen[account.user_id] = account

    def _refill(self, user_id: str, cost: Decimal) -> rules.Change:
        """Apply a due refill; the change has no entries when none was due."""
        config = self.config

        def plan(account: Account | None, now: datetime) -> rules.Change:
            change = rules.refill(
                account, user_id, config=config, now=now, new_id=new_id, cost=cost
            )
            if change is None:
                assert account is not None  # refill opens a missing account
                raise _Settled(rules.Change(account, (), account.version))
            return change

        with self._lock(user_id):
            return self._write(user_id, plan, fresh=True, account=self.store.load(user_id))

    def _apply(
        self,
        user_id: str,
        plan: Plan,
        *,
        request_id: str | None,
        lenient: Plan | None = None,
    ) -> LedgerEntry:
        """Run one write from the last account seen and return the operation's entry.

        ``lenient`` plans the same request without refusing; it tells whether a
        refused request repeats one already applied under its request id.
        """
        with self._lock(user_id):
            account = self._seen.get(user_id)
            fresh = account is None
            if fresh:
                account = self.store.load(user_id)
            try:
                return self._write(user_id, plan, fresh=fresh, account=account).entry
            except _Replayed as replayed:
                return replayed.entry
            except InsufficientBalance:
                if request_id is None or lenient is None:
                    raise
                found = self.store.find_request(user_id, request_id)
                if found is None:
                    raise
                # An applied request is answered with its entry, even if it could not pay now.
                return rules.replay(found, lenient(self.store.load(user_id), self._now()).entry)

    def _write(
        self, user_id: str, plan: Plan, *, fresh: bool, account: Account | None
    ) -> rules.Change:
        """Plan and commit, retrying lost compare-and-sets; caller holds the user's lock."""
        try:
            return self._attempt(user_id, plan, account, fresh=fresh)
        except VersionConflict as conflict:
            if self.retry.attempts <= 1:
                raise
            seen: list[Account | None] = [conflict.current]
        exclusive = getattr(self.store, "exclusive", None)
        if exclusive is not None:
            # Under the store's writer lock a fresh load cannot be overtaken.
            with exclusive(user_id):
                try:
                    return self._attempt(user_id, plan, None, fresh=False)
                except VersionConflict as conflict:  # a writer that ignores the lock
                    seen[0] = conflict.current
        for attempt in retrying(self.retry):
            with attempt:
                try:
                    return self._attempt(user_id, plan, seen[0], fresh=seen[0] is not None)
                except VersionConflict as conflict:
                    seen[0] = conflict.current
                    raise
        raise AssertionError("unreachable: tenacity re-raises")  # pragma: no cover

    def _attempt(
        self, user_id: str, plan: Plan, account: Account | None, *, fresh: bool
    ) -> rules.Change:
        if account is None and not fresh:
            account = self.store.load(user_id)
        now = self._now()
        try:
            change = plan(account, now)
        except _Settled as settled:
            return settled.change
        except InsufficientBalance:
            if fresh:
                raise
            # The refusal was decided on a remembered account; decide again on the stored one.
            account = self.store.load(user_id)
            try:
                change = plan(account, now)
            except _Settled as settled:
                return settled.change
        try:
            self.store.commit(
                change.account, change.entries, expected_version=change.expected_version
            )
        except DuplicateRequest as duplicate:
            raise _Replayed(rules.replay(duplicate.entry, change.entry)) from None
        except VersionConflict as conflict:
            self._seen.pop(user_id, None)
            if conflict.current is not None:
                self._remember(conflict.current)
            raise
        self._remember(change.account)
        return change


class _Settled(Exception):
    """Raised by a plan that finds nothing to write."""

    def __init__(self, change: rules.Change) -> None:
        self.change = change


class _Replayed(Exception):
    """Raised when a commit finds its request id already applied with the same parameters."""

    def __init__(self, entry: LedgerEntry) -> None:
        self.entry = entry


def _with_reason(metadata: dict[str, Any] | None, reason: str | None) -> dict[str, Any] | None:
    meta = _validate.metadata(metadata)
    reason = _validate.optional_text(reason, name="reason", max_length=1000)
    if reason is None:
        return meta
    return {**(meta or {}), "reason": reason}
