"""SIGKILL a writer at random points: no acknowledged charge is lost, none is doubled.

Each round starts ``tests/worker.py crash``: a child charging one SQLite file
(durability "full") 1 credit at a time and, every other step, holding 5
credits and settling 3 after a pause (the model call). It prints each step
once the call has returned; the parent kills it with SIGKILL at a random
moment. Every other round pauses 20 ms between hold and settle, so many kills
land between the two. After each kill:

- the file opens (a fresh ``SQLiteStore``);
- every acknowledged charge and settle is in the ledger; every acknowledged
  hold is settled or still open (an orphan); no request id is recorded twice;
- the balance is the start less 1 per charge and 3 per settle in the ledger
  (nothing doubled), the ledger sums to it and its ``balance_after`` chains;
- the charge in flight when the child died is sent again, with its request
  id, by the next round's child (as a client retries): it is in the ledger
  exactly once, and the retry returns that entry;
- an orphan hold (held, never settled) counts against the available balance
  until it expires, and not after: at its expiry a check of the whole
  balance passes.

Default: 12 rounds (six of them with the pause). ``CREDITMETER_LONG=1``: 200 rounds.
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from creditmeter import BalanceManager, EntryKind, SQLiteStore
from creditmeter.rules import HOLD_PREFIX, open_holds
from creditmeter.testing import FakeClock

LONG = os.environ.get("CREDITMETER_LONG") == "1"
ROUNDS = 200 if LONG else 12
WORKER = Path(__file__).parents[1] / "worker.py"
USER = "victim"


def read_lines(proc, seconds):
    """The complete lines the child prints within ``seconds``."""
    lines = []
    deadline = time.monotonic() + seconds
    fd = proc.stdout.fileno()
    buffer = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        lines.extend(line.decode() for line in complete)
    return lines, buffer


def run_round(path, tag, retry, pause_ms, rng):
    """Start a child, kill it at a random moment; return every line it completed."""
    url = f"sqlite:///{path}?durability=full"
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), "crash", url, USER, tag, retry or "-", str(pause_ms)],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout.readline() == b"ready\n"
        lines, buffer = read_lines(proc, rng.uniform(0.0, 0.15))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # Whatever the child printed in full before dying was acknowledged too.
        rest = (buffer + proc.stdout.read()).decode().split("\n")
        proc.stdout.close()
    return lines + [line for line in rest[:-1] if line]


def in_flight(lines, tag):
    """The step the child was in when killed: ("charge", request id) or ("settle", hold id)."""
    steps = [line.split() for line in lines if line[0] in "chs"]
    if not steps:
        return "charge", f"{tag}-0"
    kind, number, key = steps[-1]
    if kind == "h":
        return "settle", key
    following = int(number) + 1
    return ("charge", f"{tag}-{following}") if following % 2 == 0 else ("hold", None)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_at_random_points_loses_and_doubles_nothing(tmp_path, worker, report):
    path = tmp_path / "credits.db"
    rng = random.Random(20260517)
    charges, holds, settles = set(), set(), set()
    orphans = {}  # hold id -> expiry, of holds whose child died before settling them
    retry = None
    figures = Counter()
    started = time.monotonic()
    for number in range(ROUNDS):
        tag = f"round{number}"
        lines = run_round(path, tag, retry, 20 if number % 2 else 0, rng)
        retried = None
        for line in lines:
            kind, *rest = line.split()
            if kind == "c":
                charges.add(rest[1])
            elif kind == "h":
                holds.add(rest[1])
            elif kind == "s":
                settles.add(rest[1])
            elif kind == "r":
                retried = rest
        figures["acknowledged steps"] += len(lines)
        if retried is not None:
            figures["retried in-flight charges"] += 1
            figures[f"retries {retried[2]}"] += 1  # applied, or replayed (the dead child had)
            charges.add(retried[0])
        with SQLiteStore(path) as store:  # the file always opens
            entries = store.ledger(USER)
            account = store.load(USER)
            if account is None:
                assert entries == []
                assert not charges
                assert not holds
                continue
            worker.check_invariants(store)
        requests = Counter(e.request_id for e in entries if e.request_id is not None)
        assert max(requests.values(), default=1) == 1, "a request id recorded twice"
        charged = {
            e.request_id
            for e in entries
            if e.kind is EntryKind.CHARGE and not e.request_id.startswith(HOLD_PREFIX)
        }
        settled = {
            e.request_id[len(HOLD_PREFIX) :]
            for e in entries
            if e.kind is EntryKind.CHARGE and e.request_id.startswith(HOLD_PREFIX)
        }
        assert charges <= charged, f"round {number}: lost {sorted(charges - charged)[:5]}"
        assert settles <= settled, f"round {number}: lost settles {sorted(settles - settled)[:5]}"
        assert all(e.kind is not EntryKind.CHARGE or e.request_id for e in entries)
        open_ids = {h.id for h in account.holds}
        assert not open_ids & settled, "a settled hold is still open"
        assert holds <= settled | open_ids, "an acknowledged hold vanished"
        now = datetime.now(timezone.utc)
        for hold_id, expires_at in orphans.items():  # gone only once expired (a later write)
            assert hold_id in open_ids or expires_at <= now, "an orphan hold vanished early"
        expected = worker.START - len(charged) - worker.CRASH_SETTLE * len(settled)
        assert account.balance == expected, f"round {number}: something was doubled"
        if retried is not None:
            (entry,) = [e for e in entries if e.request_id == retried[0]]
            assert entry.id == retried[1], "the retry did not return the first entry"
        # The child died holding credits: that hold counts until it expires, then not.
        new_orphans = [h for h in account.holds if h.id not in orphans]
        holds.clear()
        if new_orphans:
            figures["rounds killed between hold and settle"] += 1
            orphans.update((h.id, h.expires_at) for h in new_orphans)
            last = max(h.expires_at for h in account.holds)
            assert open_holds(account, last - timedelta(microseconds=1)).holds
            assert open_holds(account, last).holds == ()
            with SQLiteStore(path) as store:
                early = FakeClock(last - timedelta(microseconds=1))
                before = BalanceManager(store, worker.CRASH_CONFIG, clock=early)
                assert not before.check(USER, account.balance).allowed
                later = BalanceManager(store, worker.CRASH_CONFIG, clock=FakeClock(last))
                after = later.check(USER, account.balance)
                assert after.allowed
                assert after.available == account.balance
        # The charge the child was making when it died: the next child sends it again.
        pending = None if retried is None and retry is not None else in_flight(lines, tag)
        if pending is None:
            continue  # the retry itself was never acknowledged: send it again
        retry = pending[1] if pending[0] == "charge" else None
    assert len(charges) > ROUNDS  # the children did real work
    assert figures["rounds killed between hold and settle"] >= 1
    report(
        "crash",
        rounds=ROUNDS,
        acknowledged_charges=len(charges),
        acknowledged_settles=len(settles),
        orphan_holds=len(orphans),
        lost=0,
        doubled=0,
        seconds=round(time.monotonic() - started, 1),
        **dict(figures),
    )
