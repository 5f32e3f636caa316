"""What the sync and async managers share: validation, and turning a call into a planned write.

A public method of either manager validates its arguments here and gets an
``Op``: the user, a plan (a pure function from the last account seen and
``now`` to a ``rules.Change``) and its request id. The managers differ only
in how they run an ``Op`` against their store: with threads and blocking
calls, or with tasks and awaits. No business rule lives here either; the
plans call ``rules``.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from functools import partial
from typing import Any, NamedTuple

from creditmeter import _validate, rules
from creditmeter._ids import new_id
from creditmeter.config import BalanceConfig, RefillSettings, RetryPolicy
from creditmeter.events import ConflictRetried, Denied, Event
from creditmeter.exceptions import InsufficientBalance, InvalidInput, VersionConflict
from creditmeter.models import Account, BalanceCheck, EntryKind, Hold, LedgerEntry
from creditmeter.pricing import Pricing, Rates
from creditmeter.usage import MAX_TOKENS, TokenUsage

logger = logging.getLogger("creditmeter")

Clock = Callable[[], datetime]
Plan = Callable[[Account | None, datetime], rules.Change]
Outbox = list[Event] | None
"""The events of one call, told once the user's lock is let go (``None``: nobody listens)."""

_ZERO = Decimal(0)
_MAX_AMOUNT = _validate.MAX_AMOUNT
_MODELS = _validate.MODELS
_new_tuple = tuple.__new__
_NO_TIME = timedelta(0)
DEFAULT_HOLD_TTL = timedelta(minutes=10)
"""How long a hold counts against the balance if nobody resolves it."""
SEEN_LIMIT = 10_000
HOT_SECONDS = 0.5
LOCK_STRIPES = 256


def _too_costly(total: Decimal) -> InvalidInput:
    return InvalidInput(f"the priced cost {total} is above 10**15 credits")


def utc_now() -> datetime:
    """The default clock: the current time in UTC."""
    return datetime.now(timezone.utc)


class Op(NamedTuple):
    """One write, ready to run: whose, what (the plan), and under which request id.

    ``lenient`` plans the same request without refusing; it tells whether a
    refused request repeats one already applied under its request id.
    ``delta`` tells that what ``plan`` returns may go as a ``rules.Delta``
    (see ``rules.as_delta``) to a store with ``commit_delta``: a charge
    that is not strict.
    """

    user_id: str
    plan: Plan
    request_id: str | None = None
    lenient: Plan | None = None
    started: float = 0.0  # time.perf_counter() when the call began, for event durations
    delta: bool = False


def unchanged(account: Account) -> rules.Change:
    """What a plan returns when it finds nothing to write: the account as it is."""
    return rules.Change(account, (), account.version)


class Replayed(Exception):
    """Raised when a commit finds its request id already applied with the same parameters."""

    def __init__(self, entry: LedgerEntry) -> None:
        self.entry = entry


HoldAsk = tuple[str, Decimal, timedelta, "str | None", float]
"""A validated ``hold()`` call, before its hold id is known: user id, cost, ttl, request
id and start time. A plain tuple: it is unpacked at once, and a NamedTuple costs a hold
85 ns more to build."""


class HoldSearch:
    """Finds the id a hold asked for under a request id takes, from how earlier ones ended.

    The holds of one request take ids of successive generations
    (``rules.request_hold_id``), a new one only after the one before was
    released; so the resolved generations are 0 to n - 1, and the lookups
    gallop (0, 1, 3, 7, ...) then bisect to find n: one lookup for a request
    never held, about 2 log2(n) after n releases. Sync and async managers
    run the lookups; ``rules.hold_generation`` decides.
    """

    __slots__ = ("high", "last", "low", "request_id", "trying")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.low = -1  # the highest generation known resolved
        self.last: LedgerEntry | None = None  # the entry that resolved it
        self.high: int | None = None  # the lowest generation known unresolved
        self.trying = 0

    def probe(self) -> str | None:
        """The request id to look up next (a resolution's ``hold:<id>``), or ``None``: done."""
        low, high = self.low, self.high
        if high is None:
            self.trying = 2 * low + 1 if low >= 0 else 0
        elif high - low > 1:
            self.trying = (low + high) // 2
        else:
            return None
        return rules.HOLD_PREFIX + rules.request_hold_id(self.request_id, self.trying)

    def found(self, entry: LedgerEntry | None) -> None:
        """Record what the last probe found."""
        if entry is None:
            self.high = self.trying
        else:
            self.low, self.last = self.trying, entry

    def hold_id(self) -> str:
        """The hold id the request takes now."""
        generation = rules.hold_generation(self.low + 1, self.last)
        return rules.request_hold_id(self.request_id, generation)


# Every manager, so that a forked child can give each one new locks.
_MANAGERS: weakref.WeakSet[ManagerBase] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for manager in list(_MANAGERS):
        manager._after_fork()  # noqa: SLF001 - the managers' own hook


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class ManagerBase:
    """State and argument handling shared by ``BalanceManager`` and ``AsyncBalanceManager``."""

    def __init__(
        self,
        config: BalanceConfig | None = None,
        *,
        pricing: Pricing | None = None,
        clock: Clock | None = None,
        retry: RetryPolicy | None = None,
        on_event: Callable[[Event], object] | None = None,
        low_balance_threshold: Decimal | float | None = None,
    ) -> None:
        if on_event is not None and not callable(on_event):
            raise InvalidInput("on_event must be a callable taking an event")
        self.on_event = on_event
        self.low_balance_threshold = (
            None
            if low_balance_threshold is None
            else _validate.amount(low_balance_threshold, name="low_balance_threshold")
        )
        if config is not None and not isinstance(config, BalanceConfig):
            raise InvalidInput(f"config must be a BalanceConfig, got {type(config).__name__}")
        if pricing is not None and not isinstance(pricing, Pricing):
            raise InvalidInput(f"pricing must be a Pricing, got {type(pricing).__name__}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise InvalidInput(f"retry must be a RetryPolicy, got {type(retry).__name__}")
        if clock is not None and not callable(clock):
            raise InvalidInput("clock must be a callable returning an aware datetime")
        self.config = config if config is not None else BalanceConfig()
        self.pricing = pricing if pricing is not None else Pricing.librechat()
        self.clock: Clock = clock if clock is not None else utc_now
        self.retry = retry if retry is not None else RetryPolicy()
        # The last account seen per user: a write starts from it (one round trip).
        self._seen: dict[str, Account] = {}
        # Users whose compare-and-set lost lately, until when (time.monotonic()).
        self._hot: dict[str, float] = {}
        # The holds hold() handed out and not yet resolved, by identity: built from checked
        # values and frozen, so settle() and release() need not check them again.
        self._issued: dict[int, Hold] = {}
        _MANAGERS.add(self)

    def _after_fork(self) -> None:
        """In a forked child: replace the locks, which a thread of the parent may have held.

        The caches of accounts seen and hot users are kept: they are hints,
        and a stale one costs one compare-and-set retry.
        """

    # --- operations -------------------------------------------------------------

    def _open_op(self, user_id: str) -> Op:
        config = self.config

        def plan(account: Account | None, now: datetime) -> rules.Change:
            if account is not None:  # opened meanwhile, or with blocks to expire
                return rules.expire(account, config=config, now=now, new_id=new_id)
            return rules.open_account(user_id, config=config, now=now, new_id=new_id)

        return Op(user_id, plan, started=self._clock_start())

    def _expire_op(self, user_id: str) -> Op:
        config = self.config

        def plan(account: Account | None, now: datetime) -> rules.Change:
            if account is None:
                return rules.open_account(user_id, config=config, now=now, new_id=new_id)
            return rules.expire(account, config=config, now=now, new_id=new_id)

        return Op(user_id, plan, started=self._clock_start())

    def _grant_op(
        self,
        user_id: str,
        amount: object,
        *,
        request_id: object,
        reason: object,
        metadata: object,
        expires_at: object = None,
        priority: object = None,
    ) -> Op:
        user_id = _validate.user_id(user_id)
        value = _validate.amount(amount, positive=True)
        request = request_id_of(request_id)
        meta = _with_reason(metadata, reason)
        expiry = None if expires_at is None else _expiry(expires_at)
        if expiry is not None and expiry <= self._now():  # checked again when it is written
            raise InvalidInput(f"expires_at must be in the future, got {expiry}")
        rank = None if priority is None else _priority(priority)
        config = self.config

        def plan(account: Account | None, now: datetime) -> rules.Change:
            return rules.grant(
                account,
                user_id,
                value,
                config=config,
                now=now,
                new_id=new_id,
                request_id=request,
                metadata=meta,
                expires_at=expiry,
                priority=rank,
            )

        return Op(user_id, plan, request, started=self._clock_start())

    def _charge_op(  # noqa: PLR0917 - positional: called on every write of its kind
        self,
        user_id: str,
        amount: object,
        model: object,
        usage: object,
        incomplete: object,
        strict: object,
        request_id: object,
        metadata: object,
    ) -> Op:
        user_id = _validate.user_id(user_id)
        # The checks of every argument, each skipped only where the value is the default.
        model_name = (  # checked before: a lookup (see _validate.MODELS)
            model
            if model is None or (type(model) is str and model in _MODELS)
            else _validate.model(model)
        )
        if usage is None and amount is not None and incomplete is False:
            cost, rates = _validate.amount(amount), None
        elif amount is None and incomplete is False and type(usage) is TokenUsage:
            # A priced charge, as _cost prices it, without its frame.
            cost, rates = self.pricing.price(model_name, usage)
            if cost > _MAX_AMOUNT:
                raise _too_costly(cost)
        else:
            cost, rates = self._cost(amount, model=model_name, usage=usage, incomplete=incomplete)
        request = None if request_id is None else request_id_of(request_id)
        meta = None if metadata is None else _validate.metadata(metadata)
        if strict is not False and strict is not True:
            raise InvalidInput(f"strict must be True or False, got {strict!r}")
        refuse = strict
        config = self.config
        tokens: TokenUsage | None = usage  # type: ignore[assignment]  # checked by _cost
        plan = partial(
            rules.charge_of,
            user_id,
            cost,
            config,
            refuse,
            request,
            model_name,
            tokens,
            rates,
            meta,
            new_id,
        )
        started = time.perf_counter() if self.on_event is not None else 0.0
        delta = not (refuse and config.enabled)  # a strict charge may refill or refuse
        if not (refuse and request is not None):
            return _new_tuple(Op, (user_id, plan, request, None, started, delta))  # Op(...)
        # The same charge, not strict: the rare path of a strict charge under a request id.
        lenient = partial(rules.charge_of, user_id, cost, config, False, *plan.args[4:])  # noqa: FBT003
        return Op(user_id, plan, request, lenient, started, delta)

    def _set_balance_op(
        self,
        user_id: str,
        amount: object,
        *,
        request_id: object,
        reason: object,
        metadata: object = None,
    ) -> Op:
        user_id = _validate.user_id(user_id)
        target = _validate.amount(amount)
        request = request_id_of(request_id)
        meta = _with_reason(metadata, reason)
        config = self.config

        def plan(account: Account | None, now: datetime) -> rules.Change:
            return rules.set_balance(
                account,
                user_id,
                target,
                config=config,
                now=now,
                new_id=new_id,
                request_id=request,
                metadata=meta,
            )

        return Op(user_id, plan, request, started=self._clock_start())

    def _refill_op(
        self, user_id: str, cost: Decimal, *, metadata: dict[str, Any] | None = None
    ) -> Op:
        config = self.config

        def plan(account: Account | None, now: datetime) -> rules.Change:
            change = rules.refill(
                account,
                user_id,
                config=config,
                now=now,
                new_id=new_id,
                cost=cost,
                metadata=metadata,
            )
            if change is None:
                assert account is not None  # refill opens a missing account
                return unchanged(account)  # as stored: it is remembered as the last seen
            return change

        return Op(user_id, plan, started=self._clock_start())

    def _hold_ask(  # noqa: PLR0917 - positional: called on every write of its kind
        self,
        user_id: str,
        amount: object,
        model: object,
        usage: object,
        ttl: object,
        request_id: object,
    ) -> HoldAsk:
        user_id = _validate.user_id(user_id)
        model_name = (  # checked before: a lookup (see _validate.MODELS)
            model
            if model is None or (type(model) is str and model in _MODELS)
            else _validate.model(model)
        )
        if usage is None and amount is not None:
            cost = _validate.amount(amount)
        else:
            cost, _ = self._cost(amount, model=model_name, usage=usage, incomplete=False)
        if ttl is not DEFAULT_HOLD_TTL and (not isinstance(ttl, timedelta) or ttl <= _NO_TIME):
            raise InvalidInput(f"ttl must be a positive timedelta, got {ttl!r}")
        request = None if request_id is None else request_id_of(request_id)
        started = time.perf_counter() if self.on_event is not None else 0.0
        return user_id, cost, ttl, request, started

    def _settle_op(  # noqa: PLR0917 - positional: called on every write of its kind
        self,
        hold: object,
        amount: object,
        model: object,
        usage: object,
        incomplete: object,
        metadata: object,
    ) -> Op:
        issued = self._issued.pop(id(hold), None)  # as _checked_hold, a frame fewer
        held = issued if issued is not None and issued is hold else _hold(hold)
        model_name = (  # checked before: a lookup (see _validate.MODELS)
            model
            if model is None or (type(model) is str and model in _MODELS)
            else _validate.model(model)
        )
        if usage is None and amount is not None and incomplete is False:
            cost, rates = _validate.amount(amount), None
        else:
            cost, rates = self._cost(amount, model=model_name, usage=usage, incomplete=incomplete)
        meta = None if metadata is None else _validate.metadata(metadata)
        tokens: TokenUsage | None = usage  # type: ignore[assignment]  # checked by _cost
        plan = partial(
            rules.settle_of,
            held.user_id,
            held,
            cost,
            self.config,
            model_name,
            tokens,
            rates,
            meta,
            new_id,
        )
        started = time.perf_counter() if self.on_event is not None else 0.0
        return _new_tuple(
            Op, (held.user_id, plan, rules.HOLD_PREFIX + held.id, None, started, False)
        )

    def _release_op(self, hold: object) -> Op:
        held = self._checked_hold(hold)
        config = self.config

        def plan(account: Account | None, now: datetime) -> rules.Change:
            return rules.release(account, held.user_id, held, config=config, now=now, new_id=new_id)

        return Op(held.user_id, plan, rules.HOLD_PREFIX + held.id, started=self._clock_start())

    def _drop_op(self, hold: Hold) -> Op:
        config = self.config

        def plan(account: Account | None, now: datetime) -> rules.Change:
            if account is None:
                return unchanged(
                    rules.open_account(hold.user_id, config=config, now=now, new_id=new_id).account
                )
            return rules.drop_hold(account, hold, config=config, now=now)

        return Op(hold.user_id, plan, started=self._clock_start())

    def _checked_hold(self, value: object) -> Hold:
        """``value`` as a hold to resolve: one this manager handed out, or one checked now.

        ``hold()`` remembers each hold it hands out in ``_issued``, by ``id()``.
        """
        issued = self._issued.pop(id(value), None)
        if issued is not None and issued is value:
            return issued  # the very object
        return _hold(value)

    def _leftover(self, hold: Hold) -> bool:
        """Tell whether a resolved hold may still sit in the account (after a retried call)."""
        seen = self._seen.get(hold.user_id)
        if seen is None:
            return True
        return bool(seen.holds) and any(h.id == hold.id for h in seen.holds)

    @staticmethod
    def _made_hold(change: rules.Change, hold_id: str) -> Hold | None:
        """The hold ``change`` put in under ``hold_id``; ``None`` if it wrote nothing."""
        account = change.account
        if account.version == change.expected_version:
            return None
        last = account.holds[-1]  # where a new hold usually goes
        return last if last.id == hold_id else ManagerBase._found_hold(change, hold_id)

    @staticmethod
    def _found_hold(change: rules.Change, hold_id: str) -> Hold:
        for held in change.account.holds:
            if held.id == hold_id:
                return held
        raise AssertionError("a committed hold is in its account")  # pragma: no cover

    def _configure_refill_op(
        self, user_id: str, settings: object, *, reason: object = None, metadata: object = None
    ) -> Op:
        user_id = _validate.user_id(user_id)
        if settings is not None and not isinstance(settings, RefillSettings):
            raise InvalidInput(
                f"settings must be RefillSettings or None, got {type(settings).__name__}"
            )
        meta = _with_reason(metadata, reason)
        config = self.config

        def plan(account: Account | None, now: datetime) -> rules.Change:
            return rules.configure_refill(
                account, user_id, settings, config=config, now=now, new_id=new_id, metadata=meta
            )

        return Op(user_id, plan, started=self._clock_start())

    # --- events -----------------------------------------------------------------
    #
    # A call collects its events in an outbox and tells them once the user's lock is
    # let go, so a callback may call the manager again (a top-up on LowBalance, an
    # organisation billed on Charged) without waiting on a lock its own call holds.

    def _clock_start(self) -> float:
        return time.perf_counter() if self.on_event is not None else 0.0

    def _outbox(self) -> Outbox:
        return [] if self.on_event is not None else None

    def _emit(self, events: list[Event]) -> None:
        """Tell ``on_event``; a callback that fails is logged and never breaks an operation."""
        callback = self.on_event
        if callback is None:
            return
        for event in events:
            try:
                callback(event)
            except Exception:  # noqa: PERF203 - each event gets its own chance
                logger.exception("the on_event callback failed on %s", type(event).__name__)

    def _committed(self, op: Op, change: rules.Change, out: Outbox) -> None:
        if out is not None:
            duration = time.perf_counter() - op.started
            out.extend(
                rules.events_for(change, duration=duration, low_balance=self.low_balance_threshold)
            )

    def _denied(self, refused: InsufficientBalance, started: float, out: Outbox) -> None:
        if out is not None:
            duration = time.perf_counter() - started if started else 0.0
            out.append(
                Denied(
                    user_id=refused.user_id,
                    balance=refused.balance,
                    available=refused.available,
                    cost=refused.cost,
                    duration=duration,
                )
            )

    def _retried(self, conflict: VersionConflict, out: Outbox) -> None:
        if out is not None:
            out.append(ConflictRetried(user_id=conflict.user_id))

    # --- results ----------------------------------------------------------------

    @staticmethod
    def _refill_entry(change: rules.Change) -> LedgerEntry | None:
        if not change.entries or change.entry.kind is not EntryKind.REFILL:
            return None
        return change.entry

    def _check_without_refill(
        self, account: Account | None, price: Decimal | None
    ) -> BalanceCheck | None:
        """Answer a check from a read when no refill is due (no write then); else ``None``."""
        if account is None:
            return None
        now = self._now()
        view = rules.open_holds(account, now)
        if rules.refill_due(view, config=self.config, now=now, cost=price or _ZERO):
            return None
        return rules.check(view, price, config=self.config)

    def _check_result(self, change: rules.Change, price: Decimal | None) -> BalanceCheck:
        account = rules.open_holds(change.account, self._now())
        return rules.check(account, price, config=self.config)

    @staticmethod
    def _refusal(user_id: str, result: BalanceCheck, input_tokens: int | None) -> None:
        if not result.allowed:
            raise InsufficientBalance(
                user_id,
                balance=result.balance,
                available=result.available,
                cost=result.cost,
                prompt_tokens=input_tokens,
            )

    @staticmethod
    def _ledger_limit(limit: object) -> int | None:
        if limit is not None and (type(limit) is not int or limit < 0):
            raise InvalidInput(f"limit must be a whole number >= 0 or None, got {limit!r}")
        return limit

    # --- pricing ----------------------------------------------------------------

    def _cost(
        self, amount: object, *, model: str | None, usage: object, incomplete: object
    ) -> tuple[Decimal, Rates | None]:
        """The cost of a charge: the amount given, else the priced usage (with its rates)."""
        if usage is None and amount is not None and incomplete is False:
            return _validate.amount(amount), None
        if usage is not None and not isinstance(usage, TokenUsage):
            raise InvalidInput(f"usage must be a TokenUsage, got {type(usage).__name__}")
        if type(incomplete) is not bool:
            raise InvalidInput(f"incomplete must be True or False, got {incomplete!r}")
        if amount is not None:
            if incomplete:
                raise InvalidInput("incomplete=True applies to priced usage, not to an amount")
            return _validate.amount(amount), None
        if usage is None:
            raise InvalidInput("an amount is needed, or usage (with model) to price")
        total, rates = self.pricing.price(model, usage, incomplete=incomplete)
        if total > _MAX_AMOUNT:
            raise _too_costly(total)
        return total, rates

    def _check_cost(self, cost: object, *, model: object, input_tokens: object) -> Decimal | None:
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
        model_name = _validate.optional_text(model, name="model")
        return self.pricing.prompt_cost(model_name, input_tokens)

    # --- bookkeeping ------------------------------------------------------------

    def _now(self) -> datetime:
        clock = self.clock
        if clock is utc_now:  # known to give aware UTC times
            return datetime.now(timezone.utc)
        return _validate.aware(clock())

    def _remember(self, account: Account) -> None:
        seen = self._seen
        if len(seen) >= SEEN_LIMIT:
            seen.clear()
        seen[account.user_id] = account

    def _lost(self, conflict: VersionConflict) -> None:
        """Forget what a lost compare-and-set proved stale; remember what it reported."""
        self._seen.pop(conflict.user_id, None)
        if conflict.current is not None:
            self._remember(conflict.current)
        hot = self._hot
        if len(hot) >= SEEN_LIMIT:
            hot.clear()
        hot[conflict.user_id] = time.monotonic() + HOT_SECONDS

    def _is_hot(self, user_id: str) -> bool:
        """Tell whether a write to this user lost a compare-and-set in the last ``HOT_SECONDS``.

        While it is hot, a store with ``exclusive()`` is asked to hold other
        writers off for the whole load-and-commit: one trip through its
        writer queue instead of a lost try and a retry (measured with four
        SQLite processes on one user: three charges in four conflicted).
        """
        until = self._hot.get(user_id)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        self._hot.pop(user_id, None)
        return False

    @staticmethod
    def _retries_at_once(store: object) -> int:
        """How often a lost compare-and-set is retried at once before ``exclusive()``.

        A store whose commit waits while another writer holds ``exclusive()``
        (so that a retry cannot lose to a queued writer) may set
        ``contention_retries``: a loser then retries at once from the account
        its conflict reported, that many times, before it queues; and a user
        being hot does not send every write to the queue. Writers of a hot
        user then mostly commit in one round trip each (the last winner
        often wins again), and one losing that often is served next in
        turn. Without it (0): a loss, or a hot user, goes to ``exclusive()``
        at once.
        """
        value = getattr(store, "contention_retries", 0)
        return value if type(value) is int and value > 0 else 0


def is_noop(change: rules.Change) -> bool:
    """A change that writes nothing: the version was not moved on."""
    return change.account.version == change.expected_version


def hold_plan(  # noqa: PLR0917 - positional: bound with functools.partial
    made: list[rules.Change],
    user_id: str,
    amount: Decimal,
    hold_id: str,
    ttl: timedelta,
    config: BalanceConfig,
    request_id: str | None,
    account: Account | None,
    now: datetime,
) -> rules.Change:
    """``rules.hold_of``, each change it plans kept in ``made``.

    One per attempt, bounded by the retry policy: a hold cancelled after its
    commit went out looks there for what it may have written.
    """
    change = rules.hold_of(user_id, amount, hold_id, ttl, config, request_id, new_id, account, now)
    made.append(change)
    return change


def plan_once(op: Op, account: Account | None, now: datetime) -> rules.Change:
    """Run an op's plan (a plan with nothing to write gives an unchanged account)."""
    return op.plan(account, now)


def _hold(value: object) -> Hold:
    if not isinstance(value, Hold):
        raise InvalidInput(f"expected a Hold (from hold()), got {type(value).__name__}")
    _validate.user_id(value.user_id)
    if value.id is None:
        raise InvalidInput("hold id must be a str of 1 to 256 characters, got None")
    _validate.optional_text(value.id, name="hold id", remember=False)  # ids do not repeat
    expires = value.expires_at
    if not isinstance(expires, datetime) or (
        expires.tzinfo is not timezone.utc and expires.utcoffset() is None
    ):
        # take_hold() finds the hold by its expiry among the account's open holds.
        raise InvalidInput(f"hold expires_at must be an aware datetime, got {expires!r}")
    return value


def _expiry(value: object) -> datetime:
    if not isinstance(value, datetime):
        raise InvalidInput(f"expires_at must be an aware datetime or None, got {value!r}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput(f"expires_at must be an aware datetime (UTC), got naive {value!r}")
    return value.astimezone(timezone.utc)


def _priority(value: object) -> int:
    if type(value) is not int or not 0 <= value <= rules.MAX_PRIORITY:
        raise InvalidInput(f"priority must be an int in 0..{rules.MAX_PRIORITY}, got {value!r}")
    return value


def request_id_of(value: object) -> str | None:
    """Validate a caller's request id; ``hold:`` starts the ids of hold resolutions only."""
    # Not remembered: request ids seldom repeat, and would push user ids out of the cache.
    request = _validate.optional_text(value, name="request_id", remember=False)
    if request is not None and request.startswith(rules.HOLD_PREFIX):
        raise InvalidInput(
            f"request ids starting with {rules.HOLD_PREFIX!r} are reserved for holds"
        )
    return request


def _with_reason(metadata: object, reason: object) -> dict[str, Any] | None:
    meta = _validate.metadata(metadata)
    text = _validate.optional_text(reason, name="reason", max_length=1000)
    if text is None:
        return meta
    return {**(meta or {}), "reason": text}
