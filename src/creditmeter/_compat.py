"""The few things sync and async code really do differently, each named once as a pair.

Async sources use the ``Async``/``async_`` name of a pair; ``tools/unasync.py``
turns it into the sync name when it writes the sync twin.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import ParamSpec, TypeVar

__all__ = ["AsyncLock", "Lock", "async_shielded", "async_sleep", "shielded", "sleep"]

Lock = threading.Lock
AsyncLock = asyncio.Lock

sleep = time.sleep
async_sleep = asyncio.sleep

_P = ParamSpec("_P")
_T = TypeVar("_T")


def shielded(call: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
    """Run ``call(*args, **kwargs)``: a sync call has no await at which a cancel could stop it."""
    return call(*args, **kwargs)


async def async_shielded(
    call: Callable[_P, Awaitable[_T]], /, *args: _P.args, **kwargs: _P.kwargs
) -> _T:
    """Run ``call(*args, **kwargs)`` to its end even if the awaiting task is cancelled.

    ``asyncio.shield``: the cancelled caller gets its ``CancelledError`` at
    once, while the call goes on in a task of its own.
    """
    return await asyncio.shield(call(*args, **kwargs))
