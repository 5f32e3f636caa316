"""The public store contract suite, run against every built-in store, sync and async.

``creditmeter.testing.StoreContract`` on all eight: MemoryStore, SQLiteStore,
RedisStore and PostgresStore, and their async twins driven through
``creditmeter.testing.Blocking`` (as a third-party store's tests would).
Each test gets an empty place of its own (``backends.Place``).
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from backends import BACKENDS, Place

from creditmeter.testing import Blocking, StoreContract


async def _built(make):
    built = make()
    return await built if asyncio.iscoroutine(built) else built


class TestStoreContract(StoreContract):
    """Runs ``StoreContract`` on each backend's store."""

    @pytest.fixture(params=BACKENDS)
    def store(self, request, tmp_path):
        is_async = request.param.startswith("async-")
        place = Place(request.param.removeprefix("async-"), is_async, tmp_path)
        with contextlib.ExitStack() as cleanup:
            cleanup.callback(place.drop)
            if not is_async:
                store = place.kept(place.maker()())
                cleanup.callback(store.close)
                yield store
                return
            loop = asyncio.new_event_loop()
            cleanup.callback(loop.close)
            blocking = Blocking(loop.run_until_complete(_built(place.maker())), loop=loop)
            cleanup.callback(blocking.close)
            yield blocking
