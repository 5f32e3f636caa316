"""The public store contract suite, run against every built-in store, sync and async.

``creditmeter.testing.StoreContract`` on all eight: MemoryStore, SQLiteStore,
RedisStore and PostgresStore, and their async twins driven through
``creditmeter.testing.Blocking`` (as a third-party store's tests would).
Each test gets an empty place of its own (``backends.Place``).
"""

from __future__ import annotations

import pytest
from backends import BACKENDS, contract_store

from creditmeter.testing import StoreContract


class TestStoreContract(StoreContract):
    """Runs ``StoreContract`` on each backend's store."""

    @pytest.fixture(params=BACKENDS)
    def store(self, request, tmp_path):
        is_async = request.param.startswith("async-")
        yield from contract_store(request.param.removeprefix("async-"), is_async, tmp_path)
