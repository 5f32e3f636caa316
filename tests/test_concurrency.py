"""Many writers on one user: threads of one process, and processes on one SQLite file.

Every charge must land exactly once with the default RetryPolicy; none may fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from decimal import Decimal
from pathlib import Path

from creditmeter import BalanceConfig, BalanceManager, EntryKind, SQLiteStore

WORKERS = Path(__file__).with_name("workers.py")
START = 10**9


def assert_exact(store, user, charges):
    entries = store.ledger(user)
    assert [e.kind for e in entries].count(EntryKind.CHARGE) == charges
    assert store.load(user).balance == START - charges
    assert sum(e.amount for e in entries) == START - charges


def test_threads_charging_one_user(store):
    manager = BalanceManager(store, BalanceConfig(enabled=True, start_balance=START))
    manager.account("hot")
    errors = []
    barrier = threading.Barrier(16)

    def work(number):
        try:
            barrier.wait()
            for i in range(250):
                manager.charge("hot", 1, request_id=f"{number}-{i}")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert_exact(store, "hot", 16 * 250)


def test_threads_of_two_managers_on_one_sqlite_file(tmp_path):
    path = tmp_path / "credits.db"
    config = BalanceConfig(enabled=True, start_balance=START)
    with SQLiteStore(path) as one, SQLiteStore(path) as two:
        managers = [BalanceManager(one, config), BalanceManager(two, config)]
        managers[0].account("hot")
        errors = []

        def work(manager, number):
            try:
                for i in range(100):
                    manager.charge("hot", Decimal("0.5"), request_id=f"{number}-{i}")
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(managers[n % 2], n)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert one.load("hot").balance == START - 400
        assert len(one.ledger("hot")) == 801


def test_processes_charging_one_user_of_one_file(tmp_path):
    path = tmp_path / "credits.db"
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKERS), "charge", str(path), "hot", "250", str(go), f"p{n}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    try:
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        go.touch()
        summaries = [json.loads(proc.stdout.readline()) for proc in procs]
        for proc in procs:
            assert proc.wait(timeout=120) == 0
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            proc.stdout.close()
    assert [s["done"] for s in summaries] == [250] * 4
    with SQLiteStore(path) as store:
        assert_exact(store, "hot", 1000)
        request_ids = {e.request_id for e in store.ledger("hot") if e.request_id}
        assert len(request_ids) == 1000


def test_processes_opening_one_new_file_at_once(tmp_path):
    """Regression: a process switching a new file to WAL while another was still
    creating the schema failed at once with "database is locked" (SQLite's
    deadlock rule skips the busy timeout); 8 of 100 rounds failed before the fix."""
    rounds, workers = 60, 4
    go = tmp_path / "go"
    arguments = [str(tmp_path), str(rounds), str(workers), str(go)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKERS), "open_new", *arguments, f"p{n}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(workers)
    ]
    try:
        go.touch()
        errors = [json.loads(proc.stdout.readline()) for proc in procs]
        for proc in procs:
            assert proc.wait(timeout=120) == 0
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            proc.stdout.close()
    assert errors == [[]] * workers
    for number in range(rounds):
        with SQLiteStore(tmp_path / f"{number}.db") as store:
            assert_exact(store, "u", workers)
