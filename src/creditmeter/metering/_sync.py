# Generated from src/creditmeter/metering/_async.py by tools/unasync.py.
# Do not edit: change the source, then run `python tools/unasync.py`.
"""Metered calls: the wrapper around a model call, and the stream it hands back.

A call is checked and charged in one of two ways. Without an estimate: a
check before it (is anything left?) and a charge after. With one: a hold of
the estimate before it, settled with the real usage after, released if it
fails; parallel calls then cannot all pass the check and overspend together.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from creditmeter.exceptions import InsufficientBalance, StoreError
from creditmeter.metering._core import (
    _ITERATOR,
    _Call,
    _hold_amount,
    _is_iterator,
    _Meter,
    _unchecked,
    _unmetered,
    _unreleased,
    _usage_or_missing,
    _with_prompt,
)
from creditmeter.metering._finalizer import _FINALIZER
from creditmeter.usage import StreamUsage, TokenUsage, _chat_completion_usage

if TYPE_CHECKING:
    from creditmeter.manager import BalanceManager
    from creditmeter.models import Hold

__all__ = ["MeteredStream"]

C = TypeVar("C")
_COMPLETE = _LENIENT = False  # a charge's incomplete= and strict=, passed in order


def _begin(manager: BalanceManager, meter: _Meter, call: _Call) -> Hold | None:
    """Before a call: hold its estimate, or check the user can pay; a store failure per policy."""
    try:
        if call.estimate is None and call.max_tokens is None:  # nothing to hold: check only
            manager._admit(call.user)  # noqa: SLF001 - the manager's own fast check
            return None
        amount = _hold_amount(manager, call)
        try:
            return manager.hold(call.user, amount, request_id=call.request_id)
        except InsufficientBalance as refused:
            raise _with_prompt(refused, call) from None
    except StoreError as exc:
        _unchecked(meter, call, exc)
        return None


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


def _release(manager: BalanceManager, meter: _Meter, held: Hold) -> None:
    """Release the hold of a call that raised; a store failure must not hide its error."""
    try:
        manager.release(held)
    except StoreError as exc:
        _unreleased(meter, held, exc)


def wrap(  # noqa: C901 - the plain call is written out: it runs per call
    func: Callable[..., Any], meter: _Meter, manager: BalanceManager
) -> Callable[..., Any]:
    """Meter each call of ``func``; a stream it returns is handed back wrapped."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        call = meter.call(args, kwargs)
        if call.estimate is None and call.max_tokens is None:  # _begin's check, a frame fewer
            held = None
            try:
                manager._admit(call.user)  # noqa: SLF001 - the manager's own fast check
            except StoreError as exc:
                _unchecked(meter, call, exc)
        else:
            held = _begin(manager, meter, call)
        try:
            result = func(*args, **kwargs)
        except BaseException:
            if held is not None:
                _release(manager, meter, held)
            raise
        stream = _ITERATOR.get(type(result))  # _is_iterator, a frame fewer
        if stream is None:
            stream = _is_iterator(result)
        if stream:
            return _metered_stream(manager, meter, call, held, result)
        # _usage_or_missing's common case, a frame fewer: a ChatCompletion read as it is.
        spent = _chat_completion_usage(result) if meter.usage is None else None
        if spent is None:
            spent = _usage_or_missing(meter, call, result)
        if held is not None or spent is None:
            _end(manager, meter, call, held, spent)
            return result
        try:  # _end's charge, as charge() runs it: two frames fewer
            op = manager._charge_op(  # noqa: SLF001 - the manager's own steps
                call.user, None, call.model, spent, _COMPLETE, _LENIENT, call.request_id, None
            )
            manager._apply(op)  # noqa: SLF001
        except StoreError as exc:
            _unmetered(manager, meter, call, held=None, spent=spent, exc=exc, incomplete=False)
        return result

    return wrapper


def _metered_stream(
    manager: BalanceManager, meter: _Meter, call: _Call, held: Hold | None, result: Any
) -> MeteredStream[Any]:
    """The stream a metered call returned, wrapped: charged (or settled) once it ends."""

    def finish(seen: StreamUsage, complete: bool) -> None:
        spent, cut = meter.settle_stream(call, seen, complete=complete)
        _end(manager, meter, call, held, spent, incomplete=cut)

    return MeteredStream(result, finish)


class MeteredStream(Generic[C]):
    """A stream handed back by a metered call: the same chunks, charged exactly once.

    The charge happens when the stream is exhausted (the reported usage),
    closed early or failed (LibreChat's cancel rate on what was produced:
    the reported usage if any chunk carried it, else the estimate's input
    plus one output token per content chunk). Attributes of the wrapped
    stream stay reachable, and ``with`` closes it as the stream's own
    would. A stream dropped unfinished is still charged once: the async one
    by a task on the running loop, the sync one by the finaliser thread.

    A stream cut short (closed, failed, or its consumer cancelled) is charged
    to the end even if the consuming task is cancelled again meanwhile (anyio
    re-delivers a cancellation at each suspension point of a cancelled
    scope); the cancellation still reaches the consumer.
    """

    def __init__(
        self,
        inner: Iterator[C],
        finish: Callable[[StreamUsage, bool], None],
    ) -> None:
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
            self._cut()
            raise
        self._seen.add(chunk)
        return chunk

    def _end(self, *, complete: bool) -> None:
        if not self._done:
            self._done = True
            self._finish(self._seen, complete)

    def _cut(self) -> None:
        """End a stream cut short (closed, failed or cancelled): charge what it produced."""
        if not self._done:
            self._end(complete=False)

    def close(self) -> None:
        """Close the stream; if it had not ended, charge what was produced as incomplete."""
        try:
            self._cut()
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
        # Dropped unfinished: charged once, by the finaliser thread. The garbage
        # collector may run this in a thread holding a lock the charge takes.
        if not self.__dict__.get("_done", True):
            self._done = True  # the partial must not keep the stream alive
            seen, complete = self._seen, False
            charge = functools.partial(self._finish, seen, complete)
            _FINALIZER.submit(charge)
