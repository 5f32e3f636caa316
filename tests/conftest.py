"""Fixtures shared by the whole suite: stores, the eight backends, a fake clock, managers.

The folders say what is tested: ``core`` (the pure rules, pricing, usage,
stored text), ``api`` (the public door, errors, bad input, config, the
README), ``stores`` (the contract and each store's own quirks), ``manager``
(manager-level behaviour on every backend), ``metering``, ``integrations``,
``cli`` and ``reliability``. Helpers every folder imports live beside this
file (``services``, ``backends``, ``worker``, ``broken``, ``fake_provider``):
pytest puts this folder on ``sys.path`` when it loads this file (the default
"prepend" import mode; no folder has an ``__init__.py``, so test file names
are unique across the tree).

``CREDITMETER_LONG=1`` selects the long variants: bigger counts, and the
"creditmeter-long" Hypothesis profile (500 examples, against 25), and the async manager
on Redis and PostgreSQL too (see ``MANAGER_BACKENDS``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from backends import BACKENDS, Backend, Meter
from hypothesis import HealthCheck, settings

from creditmeter import BalanceConfig, BalanceManager, MemoryStore, SQLiteStore
from creditmeter.stores.base import BalanceStore
from creditmeter.testing import FakeClock

LONG = os.environ.get("CREDITMETER_LONG") == "1"

# No deadline: the machine running the suite may be busy; a slow example is not a wrong one.
settings.register_profile(
    "creditmeter", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "creditmeter-long",
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("creditmeter-long" if LONG else "creditmeter")

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


# The default run takes the async manager on memory and SQLite only: the async Redis and
# PostgreSQL stores are the source their sync twins are generated from (those run here),
# and tests/stores runs their contract, cancellation and fork tests. The long run takes all
# eight (this matrix had been a tenth of the suite's time, on slow machines over a minute).
MANAGER_BACKENDS = (
    BACKENDS if LONG else tuple(b for b in BACKENDS if b not in ("async-redis", "async-postgres"))
)


@pytest.fixture(params=MANAGER_BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each backend (memory, SQLite, Redis, PostgreSQL; sync and async), empty."""
    opened = Backend(request.param, tmp_path)
    yield opened
    opened.close()


@pytest.fixture
def meter(backend: Backend, config: BalanceConfig, clock: FakeClock) -> Meter:
    """A manager on each backend, balances on, the fake clock; called alike sync or async."""
    return backend.manager(config, clock=clock)


@pytest.fixture(scope="session")
def long_run() -> bool:
    """True when ``CREDITMETER_LONG=1`` asks for the long variants."""
    return LONG
