"""Idempotency race: 16 threads, or 8 processes, send one request id at the same moment.

Threads (a ``threading.Barrier``), each with its own ``BalanceManager`` over
one shared store (so the managers' per-user locks do not queue them), on
MemoryStore, SQLite, Redis and PostgreSQL (``THREAD_KINDS``); and processes
(``worker.py race``, released together when the parent closes the write end
of a pipe they all block on), each opening the store by URL: one SQLite file,
or one namespace on the Redis or PostgreSQL server (``PROCESS_KINDS``).
Threads, for grant, charge and set_balance, on an account that exists and
on one the race itself opens:

- the same parameters: one ledger entry, 16 identical results (same entry
  id), the balance moved once; afterwards the same request id with another
  amount is ``IdempotencyConflict`` and writes nothing;
- 8 workers with one amount and 8 with another (existing account): one
  amount wins; those that sent it get its entry, the others
  ``IdempotencyConflict``;
- 16 threads settling one hold: one CHARGE entry, 16 identical results.

Processes, charging, in two races by the same processes: all with one
amount on an account the race opens (identical results: same entry id,
amount, balance after), then half with each of two amounts on the account
that now exists; after each, another amount under the same
request id is ``IdempotencyConflict`` and writes nothing.

By default 8 processes race (4 + 4 with two amounts), each a Python start-up;
``CREDITMETER_LONG=1`` races 16, as the threads always do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from creditmeter import BalanceManager, EntryKind, IdempotencyConflict

WORKERS = 16
PROCESSES = 16 if os.environ.get("CREDITMETER_LONG") == "1" else 8
USER = "racer"
REQUEST_ID = "same-request"
AMOUNT = Decimal(7)
OTHER = Decimal(8)
# Kinds of conftest.STORE_KINDS.
THREAD_KINDS = ["memory", "sqlite-full", "redis", "postgres"]
PROCESS_KINDS = ["sqlite-full", "redis", "postgres"]
WORKER = Path(__file__).parents[1] / "worker.py"

SEND: dict[str, Callable[[BalanceManager, Decimal], Any]] = {
    "grant": lambda m, amount: m.grant(USER, amount, request_id=REQUEST_ID),
    "charge": lambda m, amount: m.charge(USER, amount, request_id=REQUEST_ID),
    "set_balance": lambda m, amount: m.set_balance(USER, amount, request_id=REQUEST_ID),
}


def balance_after(op: str, start: Decimal, amount: Decimal) -> Decimal:
    return {"grant": start + amount, "charge": start - amount, "set_balance": amount}[op]


def race_threads(store: Any, config: Any, send: Callable[[BalanceManager, int], Any]) -> list[Any]:
    """Run ``send(manager, number)`` on 16 threads released by one barrier; return the outcomes."""
    barrier = threading.Barrier(WORKERS)
    outcomes: list[Any] = [None] * WORKERS

    def run(number: int) -> None:
        manager = BalanceManager(store, config)
        try:
            barrier.wait()
            outcomes[number] = send(manager, number)
        except Exception as exc:
            outcomes[number] = exc

    threads = [threading.Thread(target=run, args=(n,)) for n in range(WORKERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def recorded(store: Any) -> list[Any]:
    return [e for e in store.ledger(USER) if e.request_id == REQUEST_ID]


@pytest.mark.parametrize("account", ["existing", "new"])
@pytest.mark.parametrize("op", list(SEND))
@pytest.mark.parametrize("kind", THREAD_KINDS)
def test_threads_send_one_request_id_at_once(store_of_kind, worker, report, kind, op, account):
    store = store_of_kind(kind)
    config = worker.RACE_CONFIG
    if account == "existing":
        BalanceManager(store, config).account(USER)
    results = race_threads(store, config, lambda manager, _: SEND[op](manager, AMOUNT))
    assert [r for r in results if isinstance(r, Exception)] == []
    assert all(r == results[0] for r in results), "the 16 results differ"
    assert len({r.id for r in results}) == 1
    assert recorded(store) == [results[0]], "not exactly one ledger entry"
    assert store.load(USER).balance == balance_after(op, config.start_balance, AMOUNT)
    worker.check_invariants(store)
    before = worker.snapshot(store)
    with pytest.raises(IdempotencyConflict):
        SEND[op](BalanceManager(store, config), OTHER)
    assert worker.snapshot(store) == before
    report(f"race threads {kind} {op} {account}", workers=WORKERS, entries=1, doubled=0)


@pytest.mark.parametrize("op", list(SEND))
@pytest.mark.parametrize("kind", THREAD_KINDS)
def test_threads_race_one_request_id_with_two_amounts(store_of_kind, worker, kind, op):
    store = store_of_kind(kind)
    config = worker.RACE_CONFIG
    BalanceManager(store, config).account(USER)
    results = race_threads(
        store, config, lambda manager, n: SEND[op](manager, AMOUNT if n % 2 else OTHER)
    )
    (entry,) = recorded(store)
    try:  # which amount won? Sending it again replays; sending the other conflicts.
        replayed = SEND[op](BalanceManager(store, config), AMOUNT)
    except IdempotencyConflict:
        winner = OTHER
    else:
        assert replayed == entry
        winner = AMOUNT
    for number, result in enumerate(results):
        if (AMOUNT if number % 2 else OTHER) == winner:
            assert result == entry
        else:
            assert isinstance(result, IdempotencyConflict), result
    assert store.load(USER).balance == balance_after(op, config.start_balance, winner)
    worker.check_invariants(store)


@pytest.mark.parametrize("kind", THREAD_KINDS)
def test_threads_settle_one_hold_at_once(store_of_kind, worker, kind):
    store = store_of_kind(kind)
    config = worker.RACE_CONFIG
    held = BalanceManager(store, config).hold(USER, 50)
    results = race_threads(store, config, lambda manager, _: manager.settle(held, 30))
    assert [r for r in results if isinstance(r, Exception)] == []
    assert all(r == results[0] for r in results)
    settles = [e for e in store.ledger(USER) if e.kind is EntryKind.CHARGE]
    assert settles == [results[0]]
    account = store.load(USER)
    assert account.holds == ()
    assert account.balance == config.start_balance - 30
    worker.check_invariants(store)


class Racers:
    """``tests/worker.py race`` processes: each round, all charge one request id at once."""

    def __init__(self, url: str, rounds: list[tuple[str, list[Decimal]]]) -> None:
        """Start one process per amount of each round's list (every list is as long)."""
        self.starts = [os.pipe() for _ in rounds]
        self.procs = []
        count = len(rounds[0][1])
        for number in range(count):
            command = [sys.executable, str(WORKER), "race", url, USER]
            for (read, _), (request_id, amounts) in zip(self.starts, rounds, strict=True):
                command += [str(read), request_id, str(amounts[number])]
            self.procs.append(
                subprocess.Popen(
                    command,
                    stdout=subprocess.PIPE,
                    text=True,
                    pass_fds=[read for read, _ in self.starts],
                )
            )
        for read, _ in self.starts:
            os.close(read)
        for proc in self.procs:
            assert proc.stdout.readline().strip() == "ready"

    def go(self) -> list[dict[str, str]]:
        """Let every process run its next round at once; return their outcomes in order."""
        _, write = self.starts.pop(0)
        os.close(write)  # every worker's read returns at once: go
        return [json.loads(proc.stdout.readline()) for proc in self.procs]

    def __enter__(self) -> Racers:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for _, write in self.starts:
            os.close(write)
        for proc in self.procs:
            try:
                assert proc.wait(timeout=60) == 0
            finally:
                proc.kill()
                proc.wait()
                proc.stdout.close()


def check_race(store, worker, request_id, amounts, outcomes, *, paid):
    """Check one race; return the amount that won.

    One entry under ``request_id``; a process that sent the winning amount got
    it, the others IdempotencyConflict; the balance moved once (``paid`` is
    what earlier races took); another amount conflicts and writes nothing.
    """
    config = worker.RACE_CONFIG
    (entry,) = [e for e in store.ledger(USER) if e.request_id == request_id]
    winner = -entry.amount
    for amount, outcome in zip(amounts, outcomes, strict=True):
        if amount == winner:
            assert outcome["id"] == entry.id
            assert outcome["amount"] == str(entry.amount)
            assert outcome["balance_after"] == str(entry.balance_after)
        else:
            assert outcome == {"error": "IdempotencyConflict"}
    if len(set(amounts)) == 1:
        assert all(outcome == outcomes[0] for outcome in outcomes), "the results differ"
    assert store.load(USER).balance == config.start_balance - paid - winner
    worker.check_invariants(store)
    before = worker.snapshot(store)
    with pytest.raises(IdempotencyConflict):
        BalanceManager(store, config).charge(USER, winner + 1, request_id=request_id)
    assert worker.snapshot(store) == before
    return winner


@pytest.mark.parametrize("kind", PROCESS_KINDS)
def test_processes_send_one_request_id_at_once(store_url, store_of_kind, worker, report, kind):
    """Two races by the same processes: all with one amount, on an account (and a store)
    the race opens; then half with each of two amounts, on the account that now exists."""
    same = [AMOUNT] * PROCESSES
    mixed = [AMOUNT if n % 2 else OTHER for n in range(PROCESSES)]
    with Racers(store_url(kind), [(REQUEST_ID, same), ("other-request", mixed)]) as racers:
        outcomes = racers.go()
        store = store_of_kind(kind)  # opened after the race: the workers made the tables
        paid = check_race(store, worker, REQUEST_ID, same, outcomes, paid=0)
        report(f"race processes {kind} new", workers=PROCESSES, entries=1, doubled=0)
        outcomes = racers.go()
        check_race(store, worker, "other-request", mixed, outcomes, paid=paid)
        report(f"race processes {kind} existing two amounts", workers=PROCESSES, doubled=0)
