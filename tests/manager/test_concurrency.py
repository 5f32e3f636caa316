"""Many writers on one user, on every backend: every charge lands exactly once.

Threads share two managers on one place (two stores, except for memory, which
has one), so a manager's own lock and the store's compare-and-set are both
under load; on an async backend the threads' calls are tasks of one event
loop. None may fail with the default RetryPolicy. Processes on one store are
in test_processes.py; callbacks that write back, in test_reentrancy.py.
"""

from __future__ import annotations

import os
from decimal import Decimal

from backends import in_threads

from creditmeter import BalanceConfig, EntryKind

START = 10**9
LONG = os.environ.get("CREDITMETER_LONG") == "1"
THREADS, CHARGES = (16, 250) if LONG else (8, 40)


def test_writers_charging_one_user_all_land(backend):
    config = BalanceConfig(enabled=True, start_balance=START)
    managers = [backend.manager(config), backend.manager(config)]
    managers[0].account("hot")

    def work(number):
        meter = managers[number % 2]
        for i in range(CHARGES):
            meter.charge("hot", Decimal("0.5"), request_id=f"{number}-{i}")

    in_threads(THREADS, work)
    total = THREADS * CHARGES
    store = managers[1].store
    entries = store.ledger("hot")
    assert [e.kind for e in entries].count(EntryKind.CHARGE) == total
    assert len({e.request_id for e in entries if e.request_id}) == total
    assert store.load("hot").balance == START - Decimal("0.5") * total
    assert sum(e.amount for e in entries) == START - Decimal("0.5") * total
    assert managers[0].balance("hot") == START - Decimal("0.5") * total
