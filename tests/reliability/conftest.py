"""Fixtures of the reliability suite: the long-run flag, the stores under test, the checks.

The suite (``tests/reliability/``) kills writers, injects faults, soaks
stores with several processes, races request ids and fuzzes every public
input. Each test has a short default variant (the whole directory runs in
about 80 seconds on two cores) and a long one:

``CREDITMETER_LONG=1``
    selects the long variants (200 crash rounds, 4 processes x 60 s of soak
    per store over 1,000 users, ten times the fuzz examples).

``CREDITMETER_RELIABILITY_REPORT=path``
    appends one JSON line per test with the figures it measured (rounds,
    faults injected, operations, lost, double, seconds); benchmarks/RELIABILITY.md
    was written from such a file.

Shared code (the workers and the ledger checks) lives in ``tests/worker.py``,
the worker script of every multi-process test; tests get it through the
``worker`` fixture.

Stores are named by kind (``STORE_KINDS``: memory, sqlite-full, sqlite-normal,
redis, postgres) and opened by URL, so worker processes open them with
``open_store`` too; the test modules list the kinds they run on
(``SOAK_KINDS``, ``THREAD_KINDS``, ``PROCESS_KINDS``). Fault injection has
its own injectors (``test_faults.FAULT_INJECTORS``).

The redis and postgres kinds run on the real servers of ``tests/services.py``
(``CREDITMETER_TEST_REDIS``, ``CREDITMETER_TEST_POSTGRES``): each test gets a
namespace of its own, a key prefix (``redis://...?prefix=cmrel:<hex>:``) or a
table prefix (``postgresql://...?prefix=cmrel_<hex>_``), and the namespace is
dropped after the test (Redis: SCAN + UNLINK of that prefix only, never
FLUSHDB, since other suites share the server; PostgreSQL: the tables with
that prefix). A server that cannot be reached skips those tests, or fails
them under ``CREDITMETER_REQUIRE_SERVICES=1`` (as ``.ci/run`` sets).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import attrs
import pytest
import worker as _worker
from services import (
    POSTGRES_DSN,
    REDIS_URL,
    drop_postgres_tables,
    drop_redis_keys,
    need,
    reach_postgres,
    reach_redis,
    unique,
    with_option,
)

from creditmeter import MemoryStore, open_store
from creditmeter.stores.base import BalanceStore

LONG = os.environ.get("CREDITMETER_LONG") == "1"


@attrs.frozen
class Server:
    """A store kind on a real server: a URL per namespace, and how to reach and empty it."""

    service: str  # the name ``services.need`` knows
    reach: Callable[[], object]
    namespace: Callable[[], str]  # a fresh namespace (key or table prefix)
    url: Callable[[str], str]  # namespace -> the store's URL
    drop: Callable[[str], object]  # namespace -> remove everything under it


SERVERS = {
    "redis": Server(
        "redis",
        reach_redis,
        lambda: unique("cmrel:") + ":",
        lambda prefix: with_option(REDIS_URL, "prefix", prefix),
        drop_redis_keys,
    ),
    "postgres": Server(
        "postgres",
        reach_postgres,
        lambda: unique("cmrel_") + "_",
        lambda prefix: with_option(POSTGRES_DSN, "prefix", prefix),
        drop_postgres_tables,
    ),
}

# kind -> the URL of a store of that kind at a location (a directory of its own), for
# open_store(): every process that opens the URL shares the store. None: the store lives in
# one process (its threads share the object). A Server: the store is on a real server,
# under a namespace of the test's own.
STORE_KINDS: dict[str, Callable[[Path], str] | Server | None] = {
    "memory": None,
    "sqlite-full": lambda where: f"sqlite:///{where / 'credits.db'}?durability=full",
    "sqlite-normal": lambda where: f"sqlite:///{where / 'credits.db'}?durability=normal",
    **SERVERS,
}


@pytest.fixture(scope="session")
def worker() -> ModuleType:
    """``tests/worker.py``: the workers, ``check_invariants``, ``snapshot`` and the configs."""
    return _worker


@pytest.fixture
def store_url(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """``store_url(kind)``: the URL of a fresh store of that kind (the same URL per test).

    On a server, the first call checks that it answers (``services.need``) and
    picks the test's namespace, which is dropped when the test ends (after
    ``store_of_kind`` has closed its stores).
    """
    namespaces: dict[str, str] = {}

    def url(kind: str) -> str:
        make = STORE_KINDS[kind]
        if make is None:
            raise ValueError(f"a {kind} store cannot be shared by URL")
        if isinstance(make, Server):
            if kind not in namespaces:
                need(make.service, make.reach)
                namespaces[kind] = make.namespace()
            return make.url(namespaces[kind])
        where = tmp_path / kind
        where.mkdir(exist_ok=True)
        return make(where)

    yield url
    for kind, namespace in namespaces.items():
        server = STORE_KINDS[kind]
        assert isinstance(server, Server)
        server.drop(namespace)


@pytest.fixture
def store_of_kind(store_url: Callable[[str], str]) -> Iterator[Callable[[str], BalanceStore]]:
    """``store_of_kind(kind)``: open a store of that kind; every one is closed after the test."""
    opened: list[BalanceStore] = []

    def open_kind(kind: str) -> BalanceStore:
        store = MemoryStore() if STORE_KINDS[kind] is None else open_store(store_url(kind))
        opened.append(store)
        return store

    yield open_kind
    for store in opened:
        store.close()


@pytest.fixture(scope="session")
def report() -> Callable[..., None]:
    """``report(test, **figures)``: print the figures, and append them to the report file."""
    target = os.environ.get("CREDITMETER_RELIABILITY_REPORT")

    def write(test: str, **figures: Any) -> None:
        line = json.dumps({"test": test, "long": LONG, **figures}, default=str)
        print(line)
        if target:
            with Path(target).open("a", encoding="utf-8") as handle:
                handle.write(line + "\n")

    return write
