"""Soak: several writers x mixed operations on 1 hot user and many others, for a while.

Each writer (``worker.soak_loop``) grants, charges, holds, settles or
releases, asks for refills (due every second, ``on_interval``) and replays
earlier requests, half of the time on the hot user and otherwise on a random
one of the others, and journals every operation acknowledged to it. SQLite
(durability "full" and "normal") runs one process per writer on one file;
MemoryStore runs one thread per writer, each with its own manager, over one
store. RedisStore and PostgresStore run one process per writer too, on the
real servers (each test under a key or table prefix of its own, dropped
afterwards). Stores are opened by URL (``STORE_KINDS`` in conftest.py), in
the workers too. Checked at the end:

- 0 lost updates: every acknowledged entry is in the ledger, and every
  balance is the start balance plus every acknowledged amount (plus the
  refills applied inside holds, which no call returns);
- a call that gives up (``VersionConflict`` once the manager's retry policy
  runs out: refused, the caller is told) is counted and reported, not
  journaled; none may have been applied;
- 0 double charges: a replayed request returns its first entry, no request
  id is recorded twice, no entry appears that no writer acknowledged, every
  hold is settled or released exactly once, and refills are at least the
  interval apart;
- the invariants of every account: ledger sum == balance, ``balance_after``
  chains, no negative balance or available balance.

The last test runs the same checks over a store that ignores the version it
is asked to expect (last writer wins) and requires them to count lost updates.

Default: 2 writers x 2 s per store, 200 other users, SQLite with durability
"full" only (durability "normal" runs every manager test of tests/manager/).
``CREDITMETER_LONG=1``: 4 writers x 60 s per store, 1,000 other users, both
SQLite durabilities.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest

from creditmeter import BalanceManager, ConflictRetried, MemoryStore, VersionConflict

LONG = os.environ.get("CREDITMETER_LONG") == "1"
WRITERS = 4 if LONG else 2
SECONDS = 60.0 if LONG else 2.0
OTHERS = 1000 if LONG else 200
WORKER = Path(__file__).parents[1] / "worker.py"
# Kinds of conftest.STORE_KINDS: memory runs writers on threads, the others on processes.
SOAK_KINDS = ["memory", "sqlite-full", *(["sqlite-normal"] if LONG else []), "redis", "postgres"]


def soak_processes(url: str, tmp_path: Path) -> tuple[list, list]:
    """One ``tests/worker.py soak`` process per writer, all on the store ``url`` names."""
    go = tmp_path / "go"
    procs = []
    journals = [tmp_path / f"journal-{n}.json" for n in range(WRITERS)]
    try:
        for number, journal in enumerate(journals):
            arguments = [url, f"w{number}", 1000 + number, SECONDS, OTHERS, go, journal]
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(WORKER), "soak", *map(str, arguments)],
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        for proc in procs:
            assert proc.stdout.readline().strip() == "ready"
        go.touch()
        summaries = [json.loads(proc.stdout.readline()) for proc in procs]
        for proc in procs:
            assert proc.wait(timeout=SECONDS + 120) == 0
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
            proc.stdout.close()
    return summaries, [json.loads(journal.read_text(encoding="utf-8")) for journal in journals]


def soak_threads(store: MemoryStore, worker, seconds=SECONDS) -> tuple[list, list]:
    """One thread per writer, each with its own manager, over one MemoryStore."""
    barrier = threading.Barrier(WRITERS)
    results: list = [None] * WRITERS
    conflicts = Counter()

    def on_event(event):
        if isinstance(event, ConflictRetried):
            conflicts["retried"] += 1

    def run(number: int) -> None:
        manager = BalanceManager(store, worker.SOAK_CONFIG, on_event=on_event)
        barrier.wait()
        started = time.monotonic()
        try:
            result = worker.soak_loop(
                manager,
                name=f"t{number}",
                users=worker.soak_users(OTHERS),
                seconds=seconds,
                seed=2000 + number,
            )
        except Exception as exc:
            results[number] = exc
            return
        result["seconds"] = time.monotonic() - started
        results[number] = result

    threads = [threading.Thread(target=run, args=(n,)) for n in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    failures = [r for r in results if isinstance(r, Exception)]
    if failures:
        raise failures[0]
    summaries = [
        {
            "name": r["name"],
            "counts": r["counts"],
            "doubled": r["doubled"],
            "seconds": r["seconds"],
            "conflicts": conflicts["retried"] if n == 0 else 0,
        }
        for n, r in enumerate(results)
    ]
    return summaries, [r["journal"] for r in results]


@pytest.mark.parametrize("kind", SOAK_KINDS)
def test_soak(tmp_path, worker, report, store_url, store_of_kind, kind):
    if kind == "memory":
        store = store_of_kind(kind)
        summaries, journals = soak_threads(store, worker)
    else:
        summaries, journals = soak_processes(store_url(kind), tmp_path)
        store = store_of_kind(kind)  # the same URL: the store the workers wrote
    figures = worker.verify_soak(store, journals)
    checked = worker.check_invariants(store, now=datetime.now(timezone.utc))
    counts = Counter()
    for summary in summaries:
        counts.update(summary["counts"])
    # refills are counted in "refill-checked"; "gave up" are refused calls, not operations
    operations = sum(n for op, n in counts.items() if op not in ("refill", "gave up"))
    doubled = sum(s["doubled"] for s in summaries)
    seconds = max(s["seconds"] for s in summaries)
    report(
        f"soak {kind}",
        writers=WRITERS,
        seconds=round(seconds, 1),
        other_users=OTHERS,
        operations=operations,
        ops_per_second=round(operations / seconds),
        cas_retries=sum(s["conflicts"] for s in summaries),
        gave_up=counts["gave up"],
        by_kind=dict(counts),
        doubled=doubled,
        users_checked=checked["users"],
        entries_checked=checked["entries"],
        **figures,
    )
    assert figures["lost"] == 0
    assert doubled == 0
    assert figures["phantom"] == 0
    assert figures["unresolved_holds"] == 0
    assert figures["open_holds"] == 0
    assert figures["double_refills"] == 0
    assert counts["charge"] > 0
    assert counts["settle"] > 0
    assert counts["replay"] > 0


class LastWriterWins(MemoryStore):
    """A broken store: commits ignore the version they expect, as a naive store would."""

    def commit(self, account, entries, *, expected_version):
        while True:
            current = self.load(account.user_id)
            stored = None if current is None else current.version
            try:
                super().commit(account, entries, expected_version=stored)
            except VersionConflict:  # another commit got in between: overwrite it anyway
                continue
            return


def test_the_soak_checks_catch_a_store_that_loses_updates(worker):
    """The checks above are not vacuous: over a store that loses updates they count them."""
    store = LastWriterWins()
    try:
        _, journals = soak_threads(store, worker, seconds=0.5)
        figures = worker.verify_soak(store, journals)
    finally:
        store.close()
    assert figures["lost"] > 0
