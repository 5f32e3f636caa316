"""Fixtures shared by the test suite: every store, a fake clock, managers over them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from creditmeter import BalanceConfig, BalanceManager, MemoryStore, SQLiteStore
from creditmeter.stores.base import BalanceStore
from creditmeter.testing import FakeClock

StoreFactory = Callable[[], BalanceStore]

STORE_KINDS = ["memory", "sqlite"]


@pytest.fixture(params=STORE_KINDS)
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens stores of one kind on one shared location; every store opened is closed after."""
    opened: list[BalanceStore] = []
    path = tmp_path / "credits.db"
    memory = MemoryStore()

    def factory() -> BalanceStore:
        # Memory stores cannot be reopened: every "reopening" hands out the same one.
        store: BalanceStore = memory if request.param == "memory" else SQLiteStore(path)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


@pytest.fixture
def store(store_factory: StoreFactory) -> BalanceStore:
    """A fresh, empty store of each kind."""
    return store_factory()


@pytest.fixture
def clock() -> FakeClock:
    """A clock at 2025-01-01T00:00:00Z that moves only when told."""
    return FakeClock()


@pytest.fixture
def config() -> BalanceConfig:
    """Balances on, LibreChat's defaults otherwise."""
    return BalanceConfig(enabled=True)


@pytest.fixture
def manager(store: BalanceStore, config: BalanceConfig, clock: FakeClock) -> BalanceManager:
    """A manager over each store with balances on and the fake clock."""
    return BalanceManager(store, config, clock=clock)
