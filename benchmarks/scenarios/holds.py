"""Holds against plain charges, per store; then more hold + settle attempts than credits.

Per store (MemoryStore, SQLiteStore at durability full and normal),
``charge(user, 1)`` beside ``settle(hold(user, 1), 1)`` in one interleaved run
(target: within 2.2x a charge); then the oversubscription run of the holds
issue: threads making hold + settle attempts of 1 credit on a user holding
fewer credits than attempts, of which exactly as many as credits must succeed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from harness import Section, interleave, procs
from harness.report import fmt
from harness.stores import Places

from creditmeter import BalanceConfig, BalanceManager, InsufficientBalance

TITLE = "Holds: hold + settle against a charge, and oversubscription"
CONFIG = BalanceConfig(enabled=True, start_balance=10**12, allow_negative_balance=True)
RATIO = 2.2
THREADS = 16


def _attempts(index: int, barrier: Any, manager: BalanceManager, count: int) -> dict[str, int]:
    """One thread's hold + settle attempts of 1 credit on user ``o``."""
    del index
    barrier.wait(timeout=60)
    ok = 0
    for _ in range(count):
        try:
            held = manager.hold("o", 1)
        except InsufficientBalance:
            continue
        manager.settle(held, 1)
        ok += 1
    return {"ok": ok}


def run(*, quick: bool, workdir: Path) -> Section:
    """Both parts for every store; the section and its targets."""
    ops, repeats, attempts, balance = (100, 3, 800, 500) if quick else (1_500, 7, 8_000, 5_000)
    section, speed, oversold = Section(TITLE), [], []
    with Places(workdir) as places:
        for kind in ("memory", "sqlite-full", "sqlite-normal"):
            with places.open(kind, "holds")[1] as store:
                manager = BalanceManager(store, CONFIG)
                manager.account("u")
                calls = {
                    "charge": lambda m=manager: m.charge("u", 1),
                    "hold + settle": lambda m=manager: m.settle(m.hold("u", 1), 1),
                }
                rounds = interleave(calls, ops=ops, repeats=repeats)
            ratio = f"{rounds.ratio('hold + settle', 'charge'):.2f}x"
            speed.append([kind, *(fmt(s.median) for s in rounds.series.values()), ratio])
            name = f"{kind}: hold + settle within {RATIO}x a charge"
            section.ratio(name, rounds, "hold + settle", "charge", at_most=RATIO)
            with places.open(kind, "oversold")[1] as store:
                manager = BalanceManager(store, BalanceConfig(enabled=True, start_balance=balance))
                manager.account("o")
                started = time.perf_counter()
                args = (manager, attempts // THREADS)
                ok = sum(r["ok"] for r in procs.run(_attempts, THREADS, args, threads=True))
                seconds = time.perf_counter() - started
                final, total = manager.balance("o"), sum(e.amount for e in manager.ledger("o"))
            rate = fmt(attempts / seconds, 0)
            oversold.append([kind, str(ok), str(attempts - ok), rate, str(final), str(total)])
            section.check(
                f"{kind}: {attempts:,} hold + settle attempts on {balance:,} credits from "
                f"{THREADS} threads: exactly {balance:,} succeed",
                ok == balance and final == 0 and total == 0,
                f"{ok:,} succeeded; final balance {final}, ledger sum {total}",
            )
    section.text(
        f"""`charge(user, 1)` and `settle(hold(user, 1), 1)`, one manager per store,
        {repeats} interleaved rounds of {ops:,} ops; µs/op is the median over the batches,
        the ratio the median over the rounds of hold + settle over charge."""
    )
    section.table(["store", "charge µs/op", "hold + settle µs/op", "ratio"], speed)
    section.lines += ["### Oversubscription", ""]
    section.text(f"A user with {balance:,} credits; {THREADS} threads, {attempts:,} attempts.")
    header = ["store", "succeeded", "refused", "attempts/s", "final balance", "ledger sum"]
    section.table(header, oversold)
    return section
