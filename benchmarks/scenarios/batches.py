"""Batches: ``charge_many`` of 1,000 items against the same charges made one by one (issue 14).

For each shared store (SQLite full and normal, Redis, PostgreSQL) and two
spreads of the items (10 users, and 1,000 users: one item each), one manager
runs both series in interleaved rounds on one store: one ``charge_many`` of
the 1,000 items, and the 1,000 ``charge()`` calls. The stores are read back
after: the ledgers sum to the balances and hold a charge per item.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from harness import Section, interleave
from harness.report import fmt, yes
from harness.stores import SHARED, Places, audit, available

from creditmeter import BalanceConfig, BalanceManager, ChargeItem

TITLE = "Batches: charge_many against the same charges one by one"
ITEMS = 1_000
SPREADS = (10, 1_000)  # users the items are spread over
START = 10**12
CONFIG = BalanceConfig(enabled=True, start_balance=START)
TARGET = 10.0  # SQLite full, 10 users: charge_many at least this many times faster


@dataclass(frozen=True)
class Sizes:
    """Timed rounds (each: one batch and 1,000 single charges)."""

    repeats: int


QUICK = Sizes(repeats=3)
FULL = Sizes(repeats=9)


def _measure(places: Places, kind: str, users: int, sizes: Sizes) -> dict[str, object]:
    """Both series on one fresh store; µs per item, the speed-up, and the read-back."""
    url, store = places.open(kind, f"batches-{users}")
    manager = BalanceManager(store, CONFIG)
    items = [ChargeItem(f"user-{n % users}", 1) for n in range(ITEMS)]
    failed = 0

    def many() -> None:
        nonlocal failed
        failed += sum(not result.ok for result in manager.charge_many(items))

    def single() -> None:
        for item in items:
            manager.charge(item.user_id, item.amount)

    rounds = interleave({"charge_many": many, "one by one": single}, ops=1, repeats=sizes.repeats)
    made = rounds["charge_many"].calls + rounds["one by one"].calls
    spent, charges, sums = audit(store, {item.user_id for item in items}, START)
    store.close()
    del url
    return {
        "batch_us": rounds["charge_many"].median / ITEMS,
        "single_us": rounds["one by one"].median / ITEMS,
        "speedup": rounds.ratio("one by one", "charge_many"),
        "spread": sorted(1 / r for r in rounds.ratios("charge_many", "one by one")),
        "failed": failed,
        "read_back": sums and spent == charges == made * ITEMS,
    }


def run(*, quick: bool, workdir: Path) -> Section:
    """Every reachable shared store, both spreads; the SQLite full target."""
    sizes = QUICK if quick else FULL
    kinds, skipped, servers = available(SHARED)
    section = Section(TITLE)
    results: dict[tuple[str, int], dict[str, object]] = {}
    with Places(workdir) as places:
        for kind in kinds:
            for users in SPREADS:
                outcome = results[kind, users] = _measure(places, kind, users, sizes)
                print(f"    {kind} {users} users: {fmt(outcome['speedup'], 1)}x", file=sys.stderr)  # type: ignore[arg-type]
    section.text(
        f"""One `BalanceManager` per store and spread; {ITEMS:,} charge items of 1 credit
        spread over 10 users, or over 1,000 users (one each). Each of {sizes.repeats}
        interleaved rounds (after a warm-up of each) times one `charge_many` of the
        {ITEMS:,} items and the same {ITEMS:,} charges made one by one with `charge()`,
        on the same store, alternately first. µs per item at the median; speed-up: the
        median over the rounds of one-by-one time over batch time (min-max over the
        rounds). Read back after: every ledger sums to its balance and holds one charge
        per item charged."""
    )
    section.lines += [*servers, ""]
    rows = []
    for (kind, users), outcome in results.items():
        spread = outcome["spread"]
        assert isinstance(spread, list)
        rows.append(
            [
                kind,
                str(users),
                fmt(outcome["batch_us"], 2),  # type: ignore[arg-type]
                fmt(outcome["single_us"], 2),  # type: ignore[arg-type]
                f"{fmt(outcome['speedup'], 1)} ({fmt(spread[0], 1)}-{fmt(spread[-1], 1)})",  # type: ignore[arg-type]
                str(outcome["failed"]),
                yes(bool(outcome["read_back"])),
            ]
        )
    header = ["store", "users", "charge_many µs/item", "one by one µs/item", "speed-up"]
    section.table([*header, "failed items", "read back ok"], rows)
    for (kind, users), outcome in results.items():
        speedup = float(outcome["speedup"])  # type: ignore[arg-type]
        name = f"{kind}, {ITEMS:,} items over {users:,} users: charge_many vs one by one"
        target = TARGET if (kind, users) == ("sqlite-full", 10) else None
        section.bound(name, speedup, at_least=target, detail="speed-up, paired rounds")
        section.check(
            f"{kind}, {users:,} users: no item failed, ledgers read back",
            not outcome["failed"] and bool(outcome["read_back"]),
            f"{outcome['failed']} failed; read back ok: {yes(bool(outcome['read_back']))}",
        )
    for kind, reason in skipped.items():
        section.check(f"{kind}: measured", False, f"skipped: {reason}")
    return section
