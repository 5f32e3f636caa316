"""The ``metered`` decorator: check a model call before it runs, charge it after it returns.

``meter.metered(user="user_id", model="model")`` wraps a function that calls
a model. Before each call a due refill is applied and a user who cannot pay
is refused with ``InsufficientBalance``; after it, the usage is read from the
result and charged at the model's rates. A call that raises is not charged.
A result that is a stream (an iterator, an async iterator, an SDK stream) is
handed back wrapped: the same chunks, charged once when the stream ends, is
closed or fails.

When the store fails (``StoreError``), ``on_store_error`` decides: ``"closed"``
(the default) refuses the call by raising the error before it runs;
``"open"`` runs it unchecked (one warning in the log) and charges it after.
Either way, a call that ran is never failed by its charge: a charge the store
cannot take is logged (one line) and reported as an ``Unmetered`` event to the
manager's ``on_event``, carrying what to charge once the store is back.

A stream dropped unfinished is charged by its finaliser. The garbage
collector may run that in a thread holding a lock the charge needs, so the
finaliser never charges itself: it hands the charge to one small daemon
thread (a bounded queue) and waits a moment for it, which is long enough
when nothing is in the way.

Sync functions need a ``BalanceManager``; coroutine functions and async
generator functions an ``AsyncBalanceManager``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import inspect
import logging
import os
import queue
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Generic, Literal, ParamSpec, TypeVar, cast

import attrs

from creditmeter import _validate, rules
from creditmeter.events import Event, Unmetered
from creditmeter.exceptions import ConfigError, InsufficientBalance, InvalidInput, StoreError
from creditmeter.usage import StreamUsage, TokenUsage

if TYPE_CHECKING:
    from decimal import Decimal

    from creditmeter.aio import AsyncBalanceManager
    from creditmeter.manager import BalanceManager
    from creditmeter.models import Hold

__all__ = [
    "FINALIZER_WAIT",
    "MAX_ABANDONED",
    "AsyncMeteredStream",
    "MeteredStream",
    "OnMissingUsage",
    "OnStoreError",
    "acting_as",
    "check_store_policy",
    "metered",
    "report_unmetered",
]

P = ParamSpec("P")
T = TypeVar("T")
C = TypeVar("C")

OnMissingUsage = Literal["warn", "error", "ignore"]
OnStoreError = Literal["closed", "open"]
"""What a metered call does when the store fails before it: refuse (``"closed"``) or run."""
Getter = Callable[[tuple[Any, ...], dict[str, Any]], Any]

logger = logging.getLogger("creditmeter")

_acting_user: ContextVar[str | None] = ContextVar("creditmeter_acting_user", default=None)


@contextlib.contextmanager
def acting_as(user_id: str) -> Iterator[None]:
    """Within the block (and tasks started in it), metered calls without ``user=`` charge it.

    Gateway middleware sets it once per request.
    """
    token = _acting_user.set(_validate.user_id(user_id))
    try:
        yield
    finally:
        _acting_user.reset(token)


# --- reading the call's arguments ---------------------------------------------------


def _getter(func: Callable[..., Any], spec: object, what: str) -> Getter | None:
    """Build a fast reader for one argument: a parameter name, or a callable over the call."""
    if spec is None:
        return None
    if callable(spec):
        call = spec
        return lambda args, kwargs: call(*args, **kwargs)
    if not isinstance(spec, str):
        raise ConfigError(f"{what}= must be a parameter name or a callable, got {spec!r}")
    parameters = inspect.signature(func).parameters
    parameter = parameters.get(spec)
    if parameter is None:
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return lambda _args, kwargs: kwargs.get(spec)
        raise ConfigError(f"{what}={spec!r} is not a parameter of {func.__qualname__}")
    default = None if parameter.default is inspect.Parameter.empty else parameter.default
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if parameter.kind in positional:
        index = list(parameters).index(spec)

        def by_position(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if index < len(args):
                return args[index]
            return kwargs.get(spec, default)

        return by_position
    return lambda _args, kwargs: kwargs.get(spec, default)


@attrs.frozen
class _Call:
    """What the checks before a call learned, for the charge after it."""

    user: str
    model: str | None
    estimate: TokenUsage | None
    request_id: str | None
    max_tokens: int | None = None


@attrs.frozen
class _Meter:
    """How one decorated function is metered; shared by its sync and async paths."""

    name: str
    user: Getter | None
    model: Getter | None
    estimate: Getter | None
    usage: Callable[[Any], TokenUsage | None] | None
    request_id: Getter | None
    on_missing_usage: OnMissingUsage
    max_tokens: Getter | None = None
    on_store_error: OnStoreError = "closed"

    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call:
        user = self.user(args, kwargs) if self.user is not None else _acting_user.get()
        if user is None:
            raise InvalidInput(
                f"no user for the metered call {self.name}: pass user= to metered() "
                "or call it inside acting_as(user_id)"
            )
        model = self.model(args, kwargs) if self.model is not None else None
        estimate = None
        if self.estimate is not None:
            found = self.estimate(args, kwargs)
            if isinstance(found, TokenUsage):
                estimate = found
            elif found is not None:
                if type(found) is not int:
                    raise InvalidInput(
                        f"estimate= must return input tokens (int) or a TokenUsage, got {found!r}"
                    )
                estimate = TokenUsage(input=found)
        request_id = self.request_id(args, kwargs) if self.request_id is not None else None
        max_tokens = self.max_tokens(args, kwargs) if self.max_tokens is not None else None
        if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 0):
            max_tokens = None  # not a token limit this library can price
        return _Call(
            user=user,
            model=model,
            estimate=estimate,
            request_id=request_id,
            max_tokens=max_tokens,
        )

    def read_usage(self, result: Any) -> TokenUsage | None:
        if self.usage is not None:
            found = self.usage(result)
            if found is not None and not isinstance(found, TokenUsage):
                raise InvalidInput(f"usage= must return a TokenUsage or None, got {found!r}")
            return found
        return TokenUsage.from_response(result)

    def missing(
        self, call: _Call, problem: str, fallback: TokenUsage | None = None
    ) -> TokenUsage | None:
        """What to charge when a result carries no usage: ``fallback``, the estimate, or nothing."""
        if self.on_missing_usage == "error":
            raise InvalidInput(f"{problem} for user {call.user!r}, model {call.model!r}")
        if self.on_missing_usage == "ignore":
            return None
        charged = fallback if fallback is not None else call.estimate
        logger.warning(
            "%s for user %r, model %r; charging %s",
            problem,
            call.user,
            call.model,
            "nothing" if charged is None else _describe(charged),
        )
        return charged

    def settle_stream(
        self, call: _Call, seen: StreamUsage, *, complete: bool
    ) -> tuple[TokenUsage | None, bool]:
        """What to charge for a stream that ended (``complete``) or was cut short.

        A stream whose closing usage report arrived counts as complete even if
        it was closed before its very end. Without a report, the estimate's
        input plus one output token per content chunk stands in for usage; a
        cut-short stream is never charged fewer output tokens than it sent.
        """
        complete = complete or seen.finished
        reported = seen.usage
        if reported is None and seen.content_chunks == 0 and call.estimate is None:
            return None, False  # nothing was produced and nothing is known
        base = call.estimate if call.estimate is not None else TokenUsage()
        guess = base + TokenUsage(output=seen.content_chunks)
        if reported is None:
            if not complete:
                return guess, True
            return self.missing(
                call, f"no usage reported by the stream of {self.name}", guess
            ), False
        if not complete and reported.output < seen.content_chunks:
            # Anthropic's message_start carries a placeholder output count.
            reported = attrs.evolve(reported, output=seen.content_chunks)
        return reported, not complete


def _describe(usage: TokenUsage) -> str:
    return (
        f"{usage.input} input, {usage.output} output, {usage.cache_write} cache-write and "
        f"{usage.cache_read} cache-read tokens"
    )


def _make_meter(
    func: Callable[..., Any],
    *,
    user: object,
    model: object,
    estimate: object,
    usage: object,
    request_id: object,
    on_missing_usage: OnMissingUsage,
    on_store_error: OnStoreError = "closed",
) -> _Meter:
    if on_missing_usage not in ("warn", "error", "ignore"):
        raise ConfigError(
            f"on_missing_usage must be 'warn', 'error' or 'ignore', got {on_missing_usage!r}"
        )
    check_store_policy(on_store_error)
    if estimate is not None and not callable(estimate):
        raise ConfigError(
            f"estimate= must be a callable over the call's arguments, got {estimate!r}"
        )
    if usage is not None and not callable(usage):
        raise ConfigError(f"usage= must be a callable over the result, got {usage!r}")
    return _Meter(
        name=getattr(func, "__qualname__", repr(func)),
        user=_getter(func, user, "user"),
        model=_getter(func, model, "model"),
        estimate=_getter(func, estimate, "estimate"),
        usage=cast("Callable[[Any], TokenUsage | None] | None", usage),
        request_id=_getter(func, request_id, "request_id"),
        on_missing_usage=on_missing_usage,
        max_tokens=_max_tokens_getter(func),
        on_store_error=on_store_error,
    )


def check_store_policy(value: object) -> OnStoreError:
    """Return ``value`` if it is an ``on_store_error`` policy, else raise ``ConfigError``."""
    if value not in ("closed", "open"):
        raise ConfigError(f"on_store_error must be 'closed' or 'open', got {value!r}")
    return value


_LIMIT_NAMES = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def _max_tokens_getter(func: Callable[..., Any]) -> Getter | None:
    """Read the completion limit (``max_tokens`` and its newer names) from a call, if it has one."""
    parameters = inspect.signature(func).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    getters = [
        _getter(func, name, "max_tokens")
        for name in _LIMIT_NAMES
        if name in parameters or takes_any
    ]
    found = [getter for getter in getters if getter is not None]
    if not found:
        return None

    def read(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        for getter in found:
            value = getter(args, kwargs)
            if value is not None:
                return value
        return None

    return read


# --- the decorator ------------------------------------------------------------------


def metered(
    manager: BalanceManager | AsyncBalanceManager,
    *,
    user: str | Callable[..., str] | None = None,
    model: str | Callable[..., str | None] | None = None,
    estimate: Callable[..., int | TokenUsage | None] | None = None,
    usage: Callable[[Any], TokenUsage | None] | None = None,
    request_id: str | Callable[..., str | None] | None = None,
    on_missing_usage: OnMissingUsage = "warn",
    on_store_error: OnStoreError = "closed",
) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """Meter every call of the decorated function against a user's balance.

    ``user``, ``model`` and ``request_id`` name a parameter of the function
    (defaults count) or are callables taking the call's arguments; without
    ``user``, the user set by ``acting_as`` is charged. ``estimate`` returns
    the prompt's input tokens (or a ``TokenUsage``) so the check prices the
    prompt as LibreChat does; without it a call is refused only when the
    available balance is zero or less. ``usage`` reads a ``TokenUsage`` from a
    custom result (default: ``TokenUsage.from_response``). ``request_id``
    makes the charge idempotent. When a result carries no usage,
    ``on_missing_usage`` logs a warning and charges the estimate (``"warn"``),
    raises ``InvalidInput`` (``"error"``) or charges nothing (``"ignore"``).
    When the store fails before the call, ``on_store_error="closed"`` raises
    its ``StoreError`` and the function never runs; ``"open"`` runs it
    unchecked and charges it after. A charge that fails after the call is
    logged and reported as an ``Unmetered`` event; the result is returned.
    """
    from creditmeter.aio import AsyncBalanceManager  # noqa: PLC0415 - a cycle otherwise
    from creditmeter.manager import BalanceManager  # noqa: PLC0415

    def decorate(func: Callable[P, T]) -> Callable[P, T]:
        meter = _make_meter(
            func,
            user=user,
            model=model,
            estimate=estimate,
            usage=usage,
            request_id=request_id,
            on_missing_usage=on_missing_usage,
            on_store_error=on_store_error,
        )
        if inspect.isasyncgenfunction(func) or inspect.iscoroutinefunction(func):
            if not isinstance(manager, AsyncBalanceManager):
                raise TypeError(
                    f"{meter.name} is async: meter it with an AsyncBalanceManager, "
                    f"not {type(manager).__name__}"
                )
            if inspect.isasyncgenfunction(func):
                return cast("Callable[P, T]", _async_generator(func, meter, manager))
            return cast("Callable[P, T]", _coroutine(func, meter, manager))
        if isinstance(manager, AsyncBalanceManager):
            raise TypeError(
                f"{meter.name} is not async: meter it with a BalanceManager, "
                "or make it a coroutine function"
            )
        if not isinstance(manager, BalanceManager):
            raise TypeError(f"metered() needs a BalanceManager, got {type(manager).__name__}")
        return _sync(func, meter, manager)

    return decorate


def _hold_amount(manager: BalanceManager | AsyncBalanceManager, call: _Call) -> Decimal | None:
    """What to hold for a call; ``None`` (neither estimate nor ``max_tokens``): check it instead."""
    if call.estimate is None and call.max_tokens is None:
        return None
    return rules.hold_size(
        manager.pricing, call.model, prompt=call.estimate, max_output=call.max_tokens
    )


# A call is checked and charged in one of two ways. Without an estimate: a check
# before it (is anything left?) and a charge after. With one: a hold of the
# estimate before it, settled with the real usage after, released if it fails;
# parallel calls then cannot all pass the check and overspend together.


def _begin(manager: BalanceManager, meter: _Meter, call: _Call) -> Hold | None:
    try:
        amount = _hold_amount(manager, call)
        if amount is None:
            manager.require(call.user)
            return None
        try:
            return manager.hold(call.user, amount, request_id=call.request_id)
        except InsufficientBalance as refused:
            raise _with_prompt(refused, call) from None
    except StoreError as exc:
        _unchecked(meter, call, exc)
        return None


def _unchecked(meter: _Meter, call: _Call, exc: StoreError) -> None:
    """The store failed before a call: raise it (``"closed"``), or say the call runs unchecked."""
    if meter.on_store_error == "closed":
        raise exc
    logger.warning(
        "the store failed before %s of user %r (%s); running it unchecked (on_store_error='open')",
        meter.name,
        call.user,
        exc,
    )


def _with_prompt(refused: InsufficientBalance, call: _Call) -> InsufficientBalance:
    """The refusal, naming the prompt's tokens as LibreChat's payload does."""
    return InsufficientBalance(
        refused.user_id,
        balance=refused.balance,
        available=refused.available,
        cost=refused.cost,
        prompt_tokens=call.estimate.prompt_total if call.estimate is not None else None,
    )


def report_unmetered(
    manager: BalanceManager | AsyncBalanceManager,
    event: Unmetered,
    *,
    what: str,
    log: logging.Logger = logger,
) -> None:
    """Log a charge the store could not take (one line) and hand ``event`` to ``on_event``.

    ``what`` names the call in the log line. Never raises: a failing
    callback is logged.
    """
    log.error(
        "the store failed to %s %s of user %r (%s): the call is unmetered",
        event.operation,
        what,
        event.user_id,
        event.error,
    )
    _tell(manager.on_event, event)


def _tell(callback: Callable[[Event], object] | None, event: Event) -> None:
    if callback is None:
        return
    try:
        callback(event)
    except Exception:
        logger.exception("the on_event callback failed on %s", type(event).__name__)


def _unmetered(
    manager: BalanceManager | AsyncBalanceManager,
    meter: _Meter,
    call: _Call,
    *,
    held: Hold | None,
    spent: TokenUsage,
    exc: StoreError,
    incomplete: bool,
) -> None:
    event = Unmetered(
        user_id=call.user,
        operation="charge" if held is None else "settle",
        error=str(exc),
        model=call.model,
        usage=spent,
        incomplete=incomplete,
        request_id=call.request_id,
    )
    report_unmetered(manager, event, what=meter.name)


def _unreleased(meter: _Meter, held: Hold, exc: StoreError) -> None:
    logger.warning(
        "the store failed to release the hold %s of %s for user %r (%s); it lapses at %s",
        held.id,
        meter.name,
        held.user_id,
        exc,
        held.expires_at.isoformat(),
    )


def _end(
    manager: BalanceManager,
    meter: _Meter,
    call: _Call,
    held: Hold | None,
    spent: TokenUsage | None,
    *,
    incomplete: bool = False,
) -> None:
    """Charge (or settle, or release) after a call; a store failure is reported, not raised."""
    try:
        if held is None:
            if spent is not None:
                manager.charge(
                    call.user,
                    model=call.model,
                    usage=spent,
                    incomplete=incomplete,
                    request_id=call.request_id,
                )
        elif spent is None:
            manager.release(held)
        else:
            manager.settle(held, model=call.model, usage=spent, incomplete=incomplete)
    except StoreError as exc:
        if spent is None:
            assert held is not None
            _unreleased(meter, held, exc)
        else:
            _unmetered(manager, meter, call, held=held, spent=spent, exc=exc, incomplete=incomplete)


def _release_after_failure(manager: BalanceManager, meter: _Meter, held: Hold | None) -> None:
    """Release the hold of a call that raised; a store failure must not hide its error."""
    if held is not None:
        try:
            manager.release(held)
        except StoreError as exc:
            _unreleased(meter, held, exc)


async def _abegin(manager: AsyncBalanceManager, meter: _Meter, call: _Call) -> Hold | None:
    try:
        amount = _hold_amount(manager, call)
        if amount is None:
            await manager.require(call.user)
            return None
        try:
            return await manager.hold(call.user, amount, request_id=call.request_id)
        except InsufficientBalance as refused:
            raise _with_prompt(refused, call) from None
    except StoreError as exc:
        _unchecked(meter, call, exc)
        return None


async def _aend(
    manager: AsyncBalanceManager,
    meter: _Meter,
    call: _Call,
    held: Hold | None,
    spent: TokenUsage | None,
    *,
    incomplete: bool = False,
) -> None:
    """``_end`` for an async manager."""
    try:
        if held is None:
            if spent is not None:
                await manager.charge(
                    call.user,
                    model=call.model,
                    usage=spent,
                    incomplete=incomplete,
                    request_id=call.request_id,
                )
        elif spent is None:
            await manager.release(held)
        else:
            await manager.settle(held, model=call.model, usage=spent, incomplete=incomplete)
    except StoreError as exc:
        if spent is None:
            assert held is not None
            _unreleased(meter, held, exc)
        else:
            _unmetered(manager, meter, call, held=held, spent=spent, exc=exc, incomplete=incomplete)


async def _arelease(manager: AsyncBalanceManager, meter: _Meter, held: Hold) -> None:
    """Release the hold of a call that raised; a store failure must not hide its error."""
    try:
        await manager.release(held)
    except StoreError as exc:
        _unreleased(meter, held, exc)


def _sync(func: Callable[P, T], meter: _Meter, manager: BalanceManager) -> Callable[P, T]:
    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        call = meter.call(args, kwargs)
        held = _begin(manager, meter, call)
        try:
            result = func(*args, **kwargs)
        except BaseException:
            _release_after_failure(manager, meter, held)
            raise
        if _is_iterator(result):

            def finish(seen: StreamUsage, complete: bool) -> None:
                spent, cut = meter.settle_stream(call, seen, complete=complete)
                _end(manager, meter, call, held, spent, incomplete=cut)

            return cast("T", MeteredStream(cast("Iterator[Any]", result), finish))
        _end(manager, meter, call, held, _usage_or_missing(meter, call, result))
        return result

    return wrapper


_ITERATOR: dict[type, bool] = {}
_ASYNC_ITERATOR: dict[type, bool] = {}


def _is_iterator(result: object) -> bool:
    """Is the result a stream? Asked once per result type (hasattr is slow on pydantic)."""
    cls = type(result)
    known = _ITERATOR.get(cls)
    if known is None:
        known = _ITERATOR[cls] = hasattr(cls, "__next__")
    return known


def _is_async_iterator(result: object) -> bool:
    """Is the result an async stream? Asked once per result type."""
    cls = type(result)
    known = _ASYNC_ITERATOR.get(cls)
    if known is None:
        known = _ASYNC_ITERATOR[cls] = hasattr(cls, "__anext__")
    return known


def _usage_or_missing(meter: _Meter, call: _Call, result: Any) -> TokenUsage | None:
    try:
        found = meter.read_usage(result)
    except InvalidInput as exc:
        if meter.on_missing_usage == "error":
            raise
        return meter.missing(call, f"unreadable usage in the result of {meter.name} ({exc})")
    if found is None:
        return meter.missing(call, f"no usage in the result of {meter.name}")
    return found


def _coroutine(
    func: Callable[..., Any], meter: _Meter, manager: AsyncBalanceManager
) -> Callable[..., Any]:
    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        call = meter.call(args, kwargs)
        held = await _abegin(manager, meter, call)
        try:
            result = await func(*args, **kwargs)
        except BaseException:
            if held is not None:  # shielded: a cancelled caller still lets go of its hold
                await _shielded(_arelease(manager, meter, held))
            raise
        if _is_async_iterator(result):

            async def finish(seen: StreamUsage, complete: bool) -> None:
                spent, cut = meter.settle_stream(call, seen, complete=complete)
                await _aend(manager, meter, call, held, spent, incomplete=cut)

            return AsyncMeteredStream(result, finish)
        await _aend(manager, meter, call, held, _usage_or_missing(meter, call, result))
        return result

    return wrapper


def _async_generator(
    func: Callable[..., Any], meter: _Meter, manager: AsyncBalanceManager
) -> Callable[..., Any]:
    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        call = meter.call(args, kwargs)
        held = await _abegin(manager, meter, call)

        async def finish(seen: StreamUsage, complete: bool) -> None:
            spent, cut = meter.settle_stream(call, seen, complete=complete)
            await _aend(manager, meter, call, held, spent, incomplete=cut)

        stream = AsyncMeteredStream(func(*args, **kwargs), finish)
        try:
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()

    return wrapper


# --- stream wrappers ----------------------------------------------------------------


class MeteredStream(Generic[C]):
    """A stream handed back by a metered call: the same chunks, charged exactly once.

    The charge happens when the stream is exhausted (the reported usage),
    closed early or failed (LibreChat's cancel rate on what was produced:
    the reported usage if any chunk carried it, else the estimate's input
    plus one output token per content chunk). Attributes of the wrapped
    stream stay reachable, and ``with`` closes it as the stream's own would.
    A stream dropped unfinished is charged by the finaliser thread.
    """

    def __init__(self, inner: Iterator[C], finish: Callable[[StreamUsage, bool], None]) -> None:
        self._inner = inner
        self._finish = finish
        self._seen = StreamUsage()
        self._done = False
        _FINALIZER.start()  # here, not in __del__: starting a thread takes locks

    def __iter__(self) -> MeteredStream[C]:
        return self

    def __next__(self) -> C:
        if self._done:
            raise StopIteration
        try:
            chunk = next(self._inner)
        except StopIteration:
            self._end(complete=True)
            raise
        except BaseException:
            self._end(complete=False)
            raise
        self._seen.add(chunk)
        return chunk

    def _end(self, *, complete: bool) -> None:
        if not self._done:
            self._done = True
            self._finish(self._seen, complete)

    def close(self) -> None:
        """Close the stream; if it had not ended, charge what was produced as incomplete."""
        try:
            self._end(complete=False)
        finally:
            close = getattr(self._inner, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> MeteredStream[C]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __del__(self) -> None:
        # Dropped unfinished: charged once, by the finaliser thread. The garbage collector
        # may run this in a thread holding a lock the charge takes: never charge here.
        if not self.__dict__.get("_done", True):
            self._done = True
            _FINALIZER.submit(functools.partial(self._finish, self._seen, False))  # noqa: FBT003


MAX_ABANDONED = 10_000
"""Charges of dropped streams that may wait for the finaliser thread; more are logged and lost."""

FINALIZER_WAIT = 1.0
"""Seconds a finaliser waits for its charge (it lands later if something holds it up)."""


class _Finalizer:
    """One daemon thread that charges dropped streams, fed by a queue that is safe in ``__del__``.

    ``queue.SimpleQueue.put`` is re-entrant (it may run inside a finaliser that
    interrupted another ``put``) and takes no lock a charge holds. A forked
    child gets a queue and a thread of its own; what the parent had queued is
    the parent's to charge.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._starting = threading.Lock()
        self._exit_hook = False
        self._behind = False  # a finaliser stopped waiting: the thread is held up

    def start(self) -> None:
        """Make sure this process's thread runs; call it from ordinary code, never a finaliser."""
        if self._pid == os.getpid():
            return
        with self._starting:
            if self._pid == os.getpid():
                return
            thread = threading.Thread(
                target=self._run, args=(self._queue,), name="creditmeter-finalizer", daemon=True
            )
            thread.start()
            self._thread = thread
            self._pid = os.getpid()
            if not self._exit_hook:
                atexit.register(self.flush, FINALIZER_WAIT * 5)
                self._exit_hook = True

    def after_fork(self) -> None:
        """In a forked child: forget the parent's queue and thread; start one if it had one."""
        had = self._pid != 0
        self._queue = queue.SimpleQueue()
        self._thread = None
        self._pid = 0
        self._starting = threading.Lock()
        self._behind = False
        if had:
            self.start()

    def submit(self, job: Callable[[], object]) -> None:
        """Queue ``job`` and wait up to ``FINALIZER_WAIT`` seconds for it; never blocks longer."""
        thread = self._thread
        if sys.is_finalizing() or thread is None or self._pid != os.getpid():
            logger.warning(
                "an unfinished metered stream was dropped with no finaliser: not charged"
            )
            return
        if self._queue.qsize() >= MAX_ABANDONED:
            logger.error("%d dropped streams wait to be charged: this one is not", MAX_ABANDONED)
            return
        done = threading.Event()
        self._queue.put(functools.partial(_run_then_set, job, done))
        # Wait unless the thread is held up already (then this job waits behind that one).
        if threading.current_thread() is not thread and not self._behind:
            self._behind = not done.wait(FINALIZER_WAIT)

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far has run; ``False`` if ``timeout`` passed first."""
        if self._thread is None or self._pid != os.getpid():
            return True
        done = threading.Event()
        self._queue.put(done.set)
        return done.wait(timeout)

    def _run(self, jobs: queue.SimpleQueue[Callable[[], object]]) -> None:
        while True:
            job = jobs.get()
            try:
                job()
            except Exception:
                logger.exception("charging a dropped metered stream failed")
            if jobs.empty():
                self._behind = False


def _run_then_set(job: Callable[[], object], done: threading.Event) -> None:
    try:
        job()
    finally:
        done.set()


_FINALIZER = _Finalizer()
if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_FINALIZER.after_fork)


def _flush_finalizers(timeout: float) -> bool:
    """Wait until the charges of streams dropped so far have landed (for tests)."""
    return _FINALIZER.flush(timeout)


class AsyncMeteredStream(Generic[C]):
    """The async twin of ``MeteredStream``; close it with ``aclose()`` or ``async with``.

    A stream cut short (closed, failed, or its consumer cancelled) is charged
    to the end even if the consuming task is cancelled again meanwhile, as
    anyio does at every await of a cancelled scope; the cancellation still
    reaches the consumer.
    """

    def __init__(
        self,
        inner: AsyncIterator[C],
        finish: Callable[[StreamUsage, bool], Awaitable[None]],
    ) -> None:
        self._inner = inner
        self._finish = finish
        self._seen = StreamUsage()
        self._done = False

    def __aiter__(self) -> AsyncMeteredStream[C]:
        return self

    async def __anext__(self) -> C:
        if self._done:
            raise StopAsyncIteration
        try:
            chunk = await self._inner.__anext__()
        except StopAsyncIteration:
            await self._end(complete=True)
            raise
        except BaseException:
            await self._end(complete=False, shielded=True)
            raise
        self._seen.add(chunk)
        return chunk

    async def _end(self, *, complete: bool, shielded: bool = False) -> None:
        # Shielded (a task of its own) only when cut short: a task costs loop turns.
        if not self._done:
            self._done = True
            work = self._finish(self._seen, complete)
            await (_shielded(work) if shielded else work)

    async def aclose(self) -> None:
        """Close the stream; if it had not ended, charge what was produced as incomplete."""
        try:
            await self._end(complete=False, shielded=True)
        finally:
            close = getattr(self._inner, "aclose", None) or getattr(self._inner, "close", None)
            if close is not None:
                outcome = close()
                if inspect.isawaitable(outcome):
                    await outcome

    async def __aenter__(self) -> AsyncMeteredStream[C]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __del__(self) -> None:
        # Dropped unfinished: charge once, as a task on the running loop (a finalizer
        # cannot await). Without a running loop nothing can be charged: say so.
        if self.__dict__.get("_done", True):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            logger.warning("an unfinished metered stream was dropped with no event loop running")
            return
        task = loop.create_task(self._end(complete=False))
        _PENDING.add(task)
        task.add_done_callback(_PENDING.discard)


_PENDING: set[asyncio.Task[None]] = set()  # charges still running for a cancelled caller


async def _shielded(work: Awaitable[None]) -> None:
    """Run ``work`` to its end even if the caller is cancelled meanwhile.

    The caller still sees its cancellation (anyio re-delivers one at every
    await of a cancelled scope); the work goes on as a task of its own, and
    a failure nobody is left to see is logged.
    """
    task = asyncio.ensure_future(work)
    _PENDING.add(task)
    task.add_done_callback(_PENDING.discard)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_orphan_failed)
        raise


def _orphan_failed(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        logger.error("a metered call's charge failed after its caller was cancelled: %r", error)
