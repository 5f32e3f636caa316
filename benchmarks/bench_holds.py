"""Holds against plain charges, per store, and the oversubscription run's throughput.

Run: ``python benchmarks/bench_holds.py [--quick] [--output benchmarks/RESULTS-holds.md]``.

For each store (MemoryStore, SQLiteStore with durability full and normal) it
times, alternating batches, ``charge(user, 1)`` and ``hold(user, 1)`` followed
by ``settle(hold, 1)``, and reports the median µs per operation and their
ratio (target: hold+settle within 2.2x a charge). Then the oversubscription
run of the holds issue: a user with 5,000 credits, 8,000 hold+settle attempts
of 1 credit from 16 threads; exactly 5,000 must succeed.
"""

from __future__ import annotations

import argparse
import platform
import sqlite3
import statistics
import subprocess
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from creditmeter import (
    BalanceConfig,
    BalanceManager,
    InsufficientBalance,
    MemoryStore,
    SQLiteStore,
    __version__,
)

CONFIG = BalanceConfig(enabled=True, start_balance=10**12, allow_negative_balance=True)


def timed(fn, ops: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(ops):
        fn()
    return (time.perf_counter_ns() - start) / ops / 1000


def stores(folder: Path):
    yield "memory", MemoryStore
    for durability in ("full", "normal"):

        def make(durability=durability):
            return SQLiteStore(folder / f"holds-{durability}.db", durability=durability)

        yield f"sqlite ({durability})", make


def bench_pair(make, ops: int, repeats: int) -> tuple[float, float]:
    with make() as store:
        manager = BalanceManager(store, CONFIG)
        manager.account("u")

        def charge():
            manager.charge("u", 1)

        def hold_settle():
            manager.settle(manager.hold("u", 1), 1)

        charges, holds = [], []
        for _ in range(repeats):
            charges.append(timed(charge, ops))
            holds.append(timed(hold_settle, ops))
    return statistics.median(charges), statistics.median(holds)


def oversubscription(make, attempts: int = 8000, balance: int = 5000, threads: int = 16):
    with make() as store:
        manager = BalanceManager(store, BalanceConfig(enabled=True, start_balance=balance))
        manager.account("o")
        counts = {"ok": 0, "refused": 0}
        lock = threading.Lock()

        def work():
            ok = refused = 0
            for _ in range(attempts // threads):
                try:
                    held = manager.hold("o", 1)
                except InsufficientBalance:
                    refused += 1
                    continue
                manager.settle(held, 1)
                ok += 1
            with lock:
                counts["ok"] += ok
                counts["refused"] += refused

        workers = [threading.Thread(target=work) for _ in range(threads)]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        seconds = time.perf_counter() - start
        final = manager.balance("o")
        ledger_sum = sum(e.amount for e in manager.ledger("o"))
    return counts, seconds, final, ledger_sum


def commit_id() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer, shorter batches")
    parser.add_argument("--output", type=Path, default=None, help="write the report here")
    args = parser.parse_args()
    ops, repeats = (300, 3) if args.quick else (1500, 7)
    output = args.output or (None if args.quick else Path(__file__).with_name("RESULTS-holds.md"))

    lines = [
        "# Holds benchmark",
        "",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; commit {commit_id()}",
        (
            f"- Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
            f"creditmeter {__version__}, {platform.machine()}"
        ),
        f"- Command: `python benchmarks/bench_holds.py{' --quick' if args.quick else ''}`",
        f"- {repeats} alternating batches of {ops} operations per row; medians.",
        "",
        "| store | charge µs/op | hold+settle µs/op | ratio | target ≤ 2.2x |",
        "|---|---:|---:|---:|---|",
    ]
    with tempfile.TemporaryDirectory() as folder:
        made = list(stores(Path(folder)))
        for name, make in made:
            charge, hold = bench_pair(make, ops, repeats)
            ratio = hold / charge
            verdict = "met" if ratio <= 2.2 else "not met"
            lines.append(f"| {name} | {charge:.1f} | {hold:.1f} | {ratio:.2f} | {verdict} |")
            print(lines[-1], flush=True)
        lines += [
            "",
            "## Oversubscription: 5,000 credits, 8,000 hold+settle attempts from 16 threads",
            "",
            "| store | succeeded | refused | seconds | attempts/s | final balance | ledger sum |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, make in made:
            counts, seconds, final, ledger_sum = oversubscription(make)
            lines.append(
                f"| {name} | {counts['ok']} | {counts['refused']} | {seconds:.2f} | "
                f"{8000 / seconds:,.0f} | {final} | {ledger_sum} |"
            )
            print(lines[-1], flush=True)
    report = "\n".join(lines) + "\n"
    if output is not None:
        output.write_text(report)
        print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
