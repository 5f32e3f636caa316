"""What sync and async metered calls share.

Reading a call's arguments and results, the user set by ``acting_as``, and
how a store failure around a call is reported.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, cast

import attrs

from creditmeter import _validate, rules
from creditmeter.events import Event, Unmetered
from creditmeter.exceptions import (
    ConfigError,
    InsufficientBalance,
    InvalidInput,
    ReplicationTimeout,
    StoreError,
)
from creditmeter.usage import (
    StreamUsage,
    TokenUsage,
    _chat_completion_usage,
    _read_any,
    _read_response,
)

if TYPE_CHECKING:
    from decimal import Decimal

    from creditmeter._base import ManagerBase
    from creditmeter.models import Hold


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


_NEVER_POSITIONAL = sys.maxsize  # the index of an argument that only a keyword can give


_ArgAt = tuple[int, str, Any]
"""Where a named argument is: its index (if it can be positional), its name and default.

A plain tuple, not a NamedTuple: unpacking a tuple's subclass iterates it.
"""


def _reader(func: Callable[..., Any], spec: object, what: str) -> Getter | _ArgAt | None:
    """How to read one argument: a callable over the call, or where the named parameter is."""
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
            return (_NEVER_POSITIONAL, spec, None)
        raise ConfigError(f"{what}={spec!r} is not a parameter of {func.__qualname__}")
    default = None if parameter.default is inspect.Parameter.empty else parameter.default
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    index = list(parameters).index(spec) if parameter.kind in positional else _NEVER_POSITIONAL
    return (index, spec, default)


def _getter(func: Callable[..., Any], spec: object, what: str) -> Getter | None:
    """Build a fast reader for one argument: a parameter name, or a callable over the call."""
    found = _reader(func, spec, what)
    if not isinstance(found, tuple):
        return found
    index, name, default = found

    def read(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return args[index] if index < len(args) else kwargs.get(name, default)

    return read


_new_tuple = tuple.__new__  # a NamedTuple without its generated __new__: made per call


class _Call(NamedTuple):
    """What the checks before a call learned, for the charge after it (a tuple: made per call)."""

    user: str
    model: str | None
    estimate: TokenUsage | None
    request_id: str | None
    max_tokens: int | None = None


@attrs.frozen
class _Meter:
    """How one decorated function is metered; shared by its sync and async paths."""

    name: str
    user: Getter | _ArgAt | None  # a named argument's place is read inline, without a call
    model: Getter | _ArgAt | None
    estimate: Getter | None
    usage: Callable[[Any], TokenUsage | None] | None
    request_id: Getter | None
    on_missing_usage: OnMissingUsage
    max_tokens: Getter | None = None
    on_store_error: OnStoreError = "closed"

    def call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Call:
        where = self.user
        if isinstance(where, tuple):
            index, name, default = where
            user = args[index] if index < len(args) else kwargs.get(name, default)
        else:
            user = where(args, kwargs) if where is not None else _acting_user.get()
        if user is None:
            raise InvalidInput(
                f"no user for the metered call {self.name}: pass user= to metered() "
                "or call it inside acting_as(user_id)"
            )
        where = self.model
        if isinstance(where, tuple):
            index, name, default = where
            model = args[index] if index < len(args) else kwargs.get(name, default)
        else:
            model = where(args, kwargs) if where is not None else None
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
        return _new_tuple(_Call, (user, model, estimate, request_id, max_tokens))  # _Call(...)

    def read_usage(self, result: Any) -> TokenUsage | None:
        if self.usage is not None:
            found = self.usage(result)
            if found is not None and not isinstance(found, TokenUsage):
                raise InvalidInput(f"usage= must return a TokenUsage or None, got {found!r}")
            return found
        return _read_response(result)

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
        user=_reader(func, user, "user"),
        model=_reader(func, model, "model"),
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


def _hold_amount(manager: ManagerBase, call: _Call) -> Decimal:
    """What to hold for a call with an estimate or ``max_tokens`` (one with neither holds none)."""
    return rules.hold_size(
        manager.pricing, call.model, prompt=call.estimate, max_output=call.max_tokens
    )


# A call is checked and charged in one of two ways. Without an estimate: a check
# before it (is anything left?) and a charge after. With one: a hold of the
# estimate before it, settled with the real usage after, released if it fails;
# parallel calls then cannot all pass the check and overspend together.


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
    manager: ManagerBase,
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
    manager: ManagerBase,
    meter: _Meter,
    call: _Call,
    *,
    held: Hold | None,
    spent: TokenUsage,
    exc: StoreError,
    incomplete: bool,
) -> None:
    if isinstance(exc, ReplicationTimeout):  # written: reporting it unmetered invites a repeat
        logger.warning(
            "the %s of %s for user %r was written but not confirmed by enough replicas (%s)",
            "charge" if held is None else "settle",
            meter.name,
            call.user,
            exc,
        )
        return
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
    if isinstance(exc, ReplicationTimeout):
        logger.warning("the release of hold %s was written; %s", held.id, exc)
        return
    logger.warning(
        "the store failed to release the hold %s of %s for user %r (%s); it lapses at %s",
        held.id,
        meter.name,
        held.user_id,
        exc,
        held.expires_at.isoformat(),
    )


_ASYNC_ITERATOR: dict[type, bool] = {}


_ITERATOR: dict[type, bool] = {}


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
        if meter.usage is None:  # meter.read_usage, two frames fewer
            found = _chat_completion_usage(result)
            if found is None:
                found = _read_any(result)
        else:
            found = meter.read_usage(result)
    except InvalidInput as exc:
        if meter.on_missing_usage == "error":
            raise
        return meter.missing(call, f"unreadable usage in the result of {meter.name} ({exc})")
    if found is None:
        return meter.missing(call, f"no usage in the result of {meter.name}")
    return found
