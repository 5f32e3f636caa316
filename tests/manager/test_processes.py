"""Processes on one store (an SQLite file, a Redis prefix, a PostgreSQL table prefix).

Each process runs ``worker.py`` with the store's URL and its own manager, so
only the store keeps them apart. Charges: every one lands exactly once, and
every commit beyond those that landed was a retry after a lost
compare-and-set (a delta whose guard failed counts as one). Holds:
oversubscribed, they never spend a credit that is not there. Threads and
tasks on every backend: test_concurrency.py and test_holds.py.
"""

from __future__ import annotations

import os
from decimal import Decimal

import pytest
import worker
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

from creditmeter import BalanceConfig, BalanceManager, EntryKind, open_store

LONG = os.environ.get("CREDITMETER_LONG") == "1"
PROCESSES = 4
CHARGES = 250 if LONG else 100  # per process
BALANCE, ATTEMPTS = (5000, 8000) if LONG else (500, 800)  # holds of 1, over every process


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def url(request, tmp_path):
    """The URL of an empty store that every process can open."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'credits.db'}?durability=normal"
    elif request.param == "redis":
        need("redis", reach_redis)
        prefix = unique("cmproc:") + ":"
        yield with_option(REDIS_URL, "prefix", prefix)
        drop_redis_keys(prefix)
    else:
        need("postgres", reach_postgres)
        prefix = unique("cmproc_") + "_"
        yield with_option(POSTGRES_DSN, "prefix", prefix)
        drop_postgres_tables(prefix)


def consistent(store, user):
    """The ledger chains and sums to the stored balance; no request id twice."""
    account = store.load(user)
    entries = store.ledger(user)
    running = Decimal(0)
    for entry in entries:
        running += entry.amount
        assert entry.balance_after == running
    assert running == account.balance
    request_ids = [e.request_id for e in entries if e.request_id]
    assert len(request_ids) == len(set(request_ids))
    return account, entries


def test_processes_charging_one_user(url, tmp_path):
    with open_store(url) as store:
        BalanceManager(store, worker.MANY_CONFIG).account("hot")
    go = tmp_path / "go"
    summaries = worker.together(
        [["charge", url, "hot", str(CHARGES), str(go), f"p{n}"] for n in range(PROCESSES)], go
    )
    total = PROCESSES * CHARGES
    assert [s["done"] for s in summaries] == [CHARGES] * PROCESSES
    with open_store(url) as store:
        account, entries = consistent(store, "hot")
    assert account.balance == worker.START - total
    assert [e.kind for e in entries].count(EntryKind.CHARGE) == total
    commits = sum(s["commits"] for s in summaries)
    conflicts = sum(s["conflicts"] for s in summaries)
    assert commits - conflicts == total
    print(
        f"\n{PROCESSES} processes x {CHARGES} charges: {commits} commits, {conflicts} lost "
        f"compare-and-sets (each retried), {sum(s.get('deltas', 0) for s in summaries)} of them "
        f"deltas, {sum(s['exclusives'] for s in summaries)} exclusive "
        f"blocks, worst p99 {max(s['p99_ms'] for s in summaries):.2f} ms"
    )


def test_parallel_holds_on_processes_never_overspend(url, tmp_path):
    with open_store(url) as store:
        BalanceManager(store, BalanceConfig(enabled=True)).set_balance("u", BALANCE)
    go = tmp_path / "go"
    summaries = worker.together(
        [["hold", url, "u", str(ATTEMPTS // PROCESSES), str(go)]] * PROCESSES, go
    )
    ok = sum(s["ok"] for s in summaries)
    refused = sum(s["refused"] for s in summaries)
    assert (ok, refused) == (BALANCE, ATTEMPTS - BALANCE)
    with open_store(url) as store:
        account, entries = consistent(store, "u")
    assert account.balance == 0
    assert account.holds == ()
    assert [e.kind for e in entries].count(EntryKind.CHARGE) == BALANCE
    running = Decimal(0)
    for entry in entries:
        running += entry.amount
        assert running >= 0
