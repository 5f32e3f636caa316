"""A writer killed with SIGKILL at random moments never loses an acknowledged charge.

Each round starts a child that charges one SQLite file (durability "full") in
a loop and prints every request id once ``charge`` has returned, then kills it
at a random moment. After each kill the file must open, hold every printed
request id, and keep ledger sum == balance.
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from creditmeter import EntryKind, SQLiteStore

WORKERS = Path(__file__).with_name("workers.py")
ROUNDS = int(os.environ.get("CREDITMETER_CRASH_ROUNDS", "25"))
START = 10**9


def read_acknowledged(proc, seconds):
    """Collect the request ids the child prints for ``seconds``."""
    acknowledged = []
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
        *lines, buffer = buffer.split(b"\n")
        acknowledged.extend(line.decode() for line in lines)
    return acknowledged, buffer


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_never_loses_an_acknowledged_charge(tmp_path):
    path = tmp_path / "credits.db"
    rng = random.Random(20261128)
    acknowledged_total = set()
    for round_number in range(ROUNDS):
        proc = subprocess.Popen(
            [sys.executable, str(WORKERS), "crash", str(path), "victim", f"round{round_number}"],
            stdout=subprocess.PIPE,
        )
        try:
            assert proc.stdout.readline() == b"ready\n"
            lines, _partial = read_acknowledged(proc, rng.uniform(0.0, 0.15))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            # Whatever the child printed before dying was acknowledged too.
            rest = proc.stdout.read().decode().split("\n")
            proc.stdout.close()
        lines += [line for line in rest[:-1] if line]
        acknowledged_total.update(lines)
        with SQLiteStore(path) as store:
            entries = store.ledger("victim")
            recorded = {e.request_id for e in entries if e.kind is EntryKind.CHARGE}
            missing = acknowledged_total - recorded
            assert not missing, f"round {round_number}: lost {sorted(missing)[:5]}"
            account = store.load("victim")
            if account is None:
                assert entries == []
                continue
            assert sum(e.amount for e in entries) == account.balance
            charges = sum(1 for e in entries if e.kind is EntryKind.CHARGE)
            assert account.balance == START - charges
    assert len(acknowledged_total) > ROUNDS  # the children did real work
