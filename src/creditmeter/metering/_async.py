# unasync-target: _sync.py
# unasync-rename: _is_async_iterator -> _is_iterator
# unasync-rename: _ASYNC_ITERATOR -> _ITERATOR
"""Metered calls: the wrapper around a model call, and the stream it hands back.

A call is checked and charged in one of two ways. Without an estimate: a
check before it (is anything left?) and a charge after. With one: a hold of
the estimate before it, settled with the real usage after, released if it
fails; parallel calls then cannot all pass the check and overspend together.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from creditmeter.exceptions import InsufficientBalance, StoreError
from creditmeter.metering._core import (
    _ASYNC_ITERATOR,
    _Call,
    _hold_amount,
    _is_async_iterator,
    _Meter,
    _unchecked,
    _unmetered,
    _unreleased,
    _usage_or_missing,
    _with_prompt,
    logger,
)

# sync-only: from creditmeter.metering._finalizer import _FINALIZER
from creditmeter.usage import StreamUsage, TokenUsage, _chat_completion_usage

if TYPE_CHECKING:
    from creditmeter.aio import AsyncBalanceManager
    from creditmeter.models import Hold

__all__ = ["AsyncMeteredStream"]

C = TypeVar("C")
_COMPLETE = _LENIENT = False  # a charge's incomplete= and strict=, passed in order


async def _begin(manager: AsyncBalanceManager, meter: _Meter, call: _Call) -> Hold | None:
    """Before a call: hold its estimate, or check the user can pay; a store failure per policy."""
    try:
        if call.estimate is None and call.max_tokens is None:  # nothing to hold: check only
            await manager._admit(call.user)  # noqa: SLF001 - the manager's own fast check
            return None
        amount = _hold_amount(manager, call)
        try:
            return await manager.hold(call.user, amount, request_id=call.request_id)
        except InsufficientBalance as refused:
            raise _with_prompt(refused, call) from None
    except StoreError as exc:
        _unchecked(meter, call, exc)
        return None


async def _end(
    manager: AsyncBalanceManager,
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


async def _release(manager: AsyncBalanceManager, meter: _Meter, held: Hold) -> None:
    """Release the hold of a call that raised; a store failure must not hide its error."""
    try:
        await manager.release(held)
    except StoreError as exc:
        _unreleased(meter, held, exc)


def wrap(  # noqa: C901 - the plain call is written out: it runs per call
    func: Callable[..., Any], meter: _Meter, manager: AsyncBalanceManager
) -> Callable[..., Any]:
    """Meter each call of ``func``; a stream it returns is handed back wrapped."""

    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        call = meter.call(args, kwargs)
        if call.estimate is None and call.max_tokens is None:  # _begin's check, a frame fewer
            held = None
            try:
                await manager._admit(call.user)  # noqa: SLF001 - the manager's own fast check
            except StoreError as exc:
                _unchecked(meter, call, exc)
        else:
            held = await _begin(manager, meter, call)
        try:
            result = await func(*args, **kwargs)
        except BaseException:
            if held is not None:
                # Shielded: a cancelled caller still lets go of its hold.  # async-only
                await _shielded(_release(manager, meter, held))  # async-only
                # sync-only: _release(manager, meter, held)
            raise
        stream = _ASYNC_ITERATOR.get(type(result))  # _is_async_iterator, a frame fewer
        if stream is None:
            stream = _is_async_iterator(result)
        if stream:
            return _metered_stream(manager, meter, call, held, result)
        # _usage_or_missing's common case, a frame fewer: a ChatCompletion read as it is.
        spent = _chat_completion_usage(result) if meter.usage is None else None
        if spent is None:
            spent = _usage_or_missing(meter, call, result)
        if held is not None or spent is None:
            await _end(manager, meter, call, held, spent)
            return result
        try:  # _end's charge, as charge() runs it: two frames fewer
            op = manager._charge_op(  # noqa: SLF001 - the manager's own steps
                call.user, None, call.model, spent, _COMPLETE, _LENIENT, call.request_id, None
            )
            await manager._apply(op)  # noqa: SLF001
        except StoreError as exc:
            _unmetered(manager, meter, call, held=None, spent=spent, exc=exc, incomplete=False)
        return result

    return wrapper


def _metered_stream(
    manager: AsyncBalanceManager, meter: _Meter, call: _Call, held: Hold | None, result: Any
) -> AsyncMeteredStream[Any]:
    """The stream a metered call returned, wrapped: charged (or settled) once it ends."""

    async def finish(seen: StreamUsage, complete: bool) -> None:
        spent, cut = meter.settle_stream(call, seen, complete=complete)
        await _end(manager, meter, call, held, spent, incomplete=cut)

    return AsyncMeteredStream(result, finish)


# async-only: begin
def wrap_generator(
    func: Callable[..., Any], meter: _Meter, manager: AsyncBalanceManager
) -> Callable[..., Any]:
    """Meter each run of an async generator function, as a stream."""

    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        call = meter.call(args, kwargs)
        held = await _begin(manager, meter, call)

        async def finish(seen: StreamUsage, complete: bool) -> None:
            spent, cut = meter.settle_stream(call, seen, complete=complete)
            await _end(manager, meter, call, held, spent, incomplete=cut)

        stream = AsyncMeteredStream(func(*args, **kwargs), finish)
        try:
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()

    return wrapper


# async-only: end


class AsyncMeteredStream(Generic[C]):
    """A stream handed back by a metered call: the same chunks, charged exactly once.

    The charge happens when the stream is exhausted (the reported usage),
    closed early or failed (LibreChat's cancel rate on what was produced:
    the reported usage if any chunk carried it, else the estimate's input
    plus one output token per content chunk). Attributes of the wrapped
    stream stay reachable, and ``async with`` closes it as the stream's own
    would. A stream dropped unfinished is still charged once: the async one
    by a task on the running loop, the sync one by the finaliser thread.

    A stream cut short (closed, failed, or its consumer cancelled) is charged
    to the end even if the consuming task is cancelled again meanwhile (anyio
    re-delivers a cancellation at each suspension point of a cancelled
    scope); the cancellation still reaches the consumer.
    """

    def __init__(
        self,
        inner: AsyncIterator[C],
        finish: Callable[[StreamUsage, bool], Awaitable[None]],  # async-only
        # sync-only: finish: Callable[[StreamUsage, bool], None],
    ) -> None:
        self._inner = inner
        self._finish = finish
        self._seen = StreamUsage()
        self._done = False
        # sync-only: _FINALIZER.start()  # here, not in __del__: starting a thread takes locks

    def __aiter__(self) -> AsyncMeteredStream[C]:
        return self

    async def __anext__(self) -> C:
        if self._done:
            raise StopAsyncIteration
        try:
            chunk = await anext(self._inner)
        except StopAsyncIteration:
            await self._end(complete=True)
            raise
        except BaseException:
            await self._cut()
            raise
        self._seen.add(chunk)
        return chunk

    async def _end(self, *, complete: bool) -> None:
        if not self._done:
            self._done = True
            await self._finish(self._seen, complete)

    async def _cut(self) -> None:
        """End a stream cut short (closed, failed or cancelled): charge what it produced."""
        if not self._done:
            # A task of its own, shielded from the caller's cancellation (only here: a  # async-only
            # task costs loop turns).  # async-only
            await _shielded(self._end(complete=False))  # async-only
            # sync-only: self._end(complete=False)

    async def aclose(self) -> None:
        """Close the stream; if it had not ended, charge what was produced as incomplete."""
        try:
            await self._cut()
        finally:
            close = getattr(self._inner, "aclose", None)  # async-only
            close = close or getattr(self._inner, "close", None)  # async-only
            # sync-only: close = getattr(self._inner, "close", None)
            if close is not None:
                outcome = close()  # async-only
                if inspect.isawaitable(outcome):  # async-only
                    await outcome  # async-only
                # sync-only: close()

    async def __aenter__(self) -> AsyncMeteredStream[C]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    # async-only: begin
    def __del__(self) -> None:
        # Dropped unfinished: charge once, as a task on the running loop (a finaliser
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

    # async-only: end
    # sync-only: def __del__(self) -> None:
    # sync-only:     # Dropped unfinished: charged once, by the finaliser thread. The garbage
    # sync-only:     # collector may run this in a thread holding a lock the charge takes.
    # sync-only:     if not self.__dict__.get("_done", True):
    # sync-only:         self._done = True  # the partial must not keep the stream alive
    # sync-only:         seen, complete = self._seen, False
    # sync-only:         charge = functools.partial(self._finish, seen, complete)
    # sync-only:         _FINALIZER.submit(charge)


# async-only: begin
_PENDING: set[asyncio.Task[None]] = set()  # charges still running for a cancelled caller


async def _shielded(work: Awaitable[None]) -> None:
    """Run ``work`` to its end even if the caller is cancelled meanwhile.

    The caller still sees its cancellation (anyio re-delivers one at each
    suspension point of a cancelled scope); the work goes on as a task of its own, and
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


# async-only: end
