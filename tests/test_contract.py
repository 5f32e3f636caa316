"""The public store contract suite, run against every built-in store, sync and async."""

from __future__ import annotations

import pytest

from creditmeter import AsyncMemoryStore, AsyncSQLiteStore
from creditmeter.testing import Blocking, StoreContract


class TestStoreContract(StoreContract):
    """Runs ``creditmeter.testing.StoreContract`` with the ``store`` fixture of conftest."""


class TestAsyncMemoryStoreContract(StoreContract):
    @pytest.fixture
    def store(self):
        store = Blocking(AsyncMemoryStore())
        yield store
        store.close()


class TestAsyncSQLiteStoreContract(StoreContract):
    @pytest.fixture
    def store(self, tmp_path):
        store = Blocking(AsyncSQLiteStore(tmp_path / "credits.db"))
        yield store
        store.close()
