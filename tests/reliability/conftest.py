"""Fixtures of the reliability suite: the long-run flag, the stores under test, the checks.

The suite (``tests/reliability/``) kills writers, injects faults, soaks
stores with several processes, races request ids and fuzzes every public
input. Each test has a short default variant (the whole directory runs in
about a minute on two cores) and a long one:

``CREDITMETER_LONG=1``
    selects the long variants (200 crash rounds, 4 processes x 60 s of soak
    per store over 1,000 users, ten times the fuzz examples).

``CREDITMETER_RELIABILITY_REPORT=path``
    appends one JSON line per test with the figures it measured (rounds,
    faults injected, operations, lost, double, seconds); benchmarks/RELIABILITY.md
    was written from such a file.

Shared code (the workers and the ledger checks) lives in ``worker.py``, which
also runs as the worker script of the multi-process tests; tests get it
through the ``worker`` fixture (``tests/`` has no packages to import it from).

Stores are named by kind (``STORE_KINDS``: memory, sqlite-full, sqlite-normal)
and opened by URL, so worker processes open them with ``open_store`` too. The
Redis and PostgreSQL stores join the soak and race tests by adding their URLs
there and their kinds to ``SOAK_KINDS`` / ``THREAD_KINDS`` / ``PROCESS_KINDS``
in the test modules, and fault injection by an injector in
``test_faults.FAULT_INJECTORS`` (a dropped connection at the k-th command).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from creditmeter import MemoryStore, open_store
from creditmeter.stores.base import BalanceStore

LONG = os.environ.get("CREDITMETER_LONG") == "1"
WORKER_PATH = Path(__file__).with_name("worker.py")

# kind -> the URL of a store of that kind at a location (a directory of its own), for
# open_store(): every process that opens the URL shares the store. None: the store lives in
# one process (its threads share the object). The Redis and PostgreSQL stores join by
# adding their URLs here, and their kinds to the lists at the top of the test modules.
STORE_KINDS: dict[str, Callable[[Path], str] | None] = {
    "memory": None,
    "sqlite-full": lambda where: f"sqlite:///{where / 'credits.db'}?durability=full",
    "sqlite-normal": lambda where: f"sqlite:///{where / 'credits.db'}?durability=normal",
}


def _load_worker() -> ModuleType:
    name = "creditmeter_reliability_worker"
    loaded = sys.modules.get(name)
    if loaded is not None:
        return loaded
    spec = importlib.util.spec_from_file_location(name, WORKER_PATH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def worker() -> ModuleType:
    """``worker.py``: the workers, ``check_invariants``, ``snapshot`` and the configs."""
    return _load_worker()


@pytest.fixture(scope="session")
def long_run() -> bool:
    """True when ``CREDITMETER_LONG=1`` asks for the long variants."""
    return LONG


@pytest.fixture
def store_url(tmp_path: Path) -> Callable[[str], str]:
    """``store_url(kind)``: the URL of a fresh store of that kind (the same URL per test)."""

    def url(kind: str) -> str:
        make = STORE_KINDS[kind]
        if make is None:
            raise ValueError(f"a {kind} store cannot be shared by URL")
        where = tmp_path / kind
        where.mkdir(exist_ok=True)
        return make(where)

    return url


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
