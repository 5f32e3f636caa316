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

The default run spreads over up to 4 workers (pytest-xdist, ``-n auto`` in
``pyproject.toml``; ``-n 0`` runs in one process); ``server_group`` keeps
the tests that share a server's state on one worker.

``CREDITMETER_LONG=1`` selects the long variants: bigger counts, and the
"creditmeter-long" Hypothesis profile (500 examples, against 25), and the async manager
on Redis and PostgreSQL too (see ``MANAGER_BACKENDS``).
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


def server_group(nodeid: str) -> str | None:
    """The group of tests that share a server's global state, if ``nodeid`` is in one.

    The Redis Cluster tests fail masters over and move slots, then put them
    back: run beside each other, one would see a cluster another is
    rearranging. The PostgreSQL tests share the server's transaction horizon:
    a scan of every user's entries shows nothing newer than the oldest open
    transaction, and some tests hold one open on purpose.
    """
    if "/test_redis_cluster" in nodeid.split("::", 1)[0]:
        return "redis-cluster"
    if "postgres" in nodeid.lower():
        return "postgres"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Refuse a run whose tests share a node id: pytest-xdist would run only the first."""
    counted = collections.Counter(item.nodeid for item in items)
    repeated = sorted(nodeid for nodeid, count in counted.items() if count > 1)
    if repeated:
        raise pytest.UsageError(f"tests share a node id, so xdist would skip some: {repeated[:5]}")


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's: unknown to pytest without it
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """pytest-xdist (``-n``): test files spread over the workers; each server group on one.

    A group runs on one worker in file order, beside other files. Grouped
    by node id rather than by ``xdist_group`` marks, so a test parametrized
    over the backends joins its server's group by its id alone.
    """
    if config.getvalue("dist") != "load":  # another --dist asked for by name: xdist's own
        return None
    from xdist.scheduler import LoadScopeScheduling  # noqa: PLC0415 - only under xdist

    if not callable(getattr(LoadScopeScheduling, "_split_scope", None)):  # a private method
        raise pytest.UsageError("pytest-xdist changed: the server groups cannot be kept")

    class SharedServers(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return server_group(nodeid) or nodeid.split("::", 1)[0]

    return SharedServers(config, log)
