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

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar, cast

from creditmeter._base import ManagerBase
from creditmeter.metering import _async, _sync
from creditmeter.metering._async import _PENDING as _PENDING  # tests look inside
from creditmeter.metering._async import AsyncMeteredStream
from creditmeter.metering._core import (
    OnMissingUsage,
    OnStoreError,
    _make_meter,
    acting_as,
    check_store_policy,
    report_unmetered,
)
from creditmeter.metering._core import _Meter as _Meter  # tests look inside
from creditmeter.metering._finalizer import FINALIZER_WAIT, MAX_ABANDONED
from creditmeter.metering._finalizer import _flush_finalizers as _flush_finalizers
from creditmeter.metering._sync import MeteredStream

if TYPE_CHECKING:
    from creditmeter.aio import AsyncBalanceManager
    from creditmeter.manager import BalanceManager
    from creditmeter.usage import TokenUsage

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
    # The manager's kind, from its methods: the managers import this module, not the reverse.
    is_async = inspect.iscoroutinefunction(getattr(type(manager), "charge", None))

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
            if not is_async:
                raise TypeError(
                    f"{meter.name} is async: meter it with an AsyncBalanceManager, "
                    f"not {type(manager).__name__}"
                )
            if inspect.isasyncgenfunction(func):
                wrapped = _async.wrap_generator(func, meter, cast("AsyncBalanceManager", manager))
            else:
                wrapped = _async.wrap(func, meter, cast("AsyncBalanceManager", manager))
            return cast("Callable[P, T]", wrapped)
        if is_async:
            raise TypeError(
                f"{meter.name} is not async: meter it with a BalanceManager, "
                "or make it a coroutine function"
            )
        if not isinstance(manager, ManagerBase):
            raise TypeError(f"metered() needs a BalanceManager, got {type(manager).__name__}")
        return cast("Callable[P, T]", _sync.wrap(func, meter, cast("BalanceManager", manager)))

    return decorate
