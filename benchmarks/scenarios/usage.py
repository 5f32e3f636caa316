"""Usage reports at scale: ``usage()``, ``entries()`` and ``iter_users()`` (issue 15).

Per store, one ledger of a month of priced charges (1,000,000 rows over
10,000 users in the full run) is written through the public API
(``charge_many``, with a clock that walks through November 2026), then read:

- ``usage(since, until, by=("user", "model"))`` over the month, timed
  (median of the repeats), its rows checked against what was written (calls,
  tokens and charged credits in total);
- ``entries()`` paged through every row, 10,000 a page (the most allowed);
- ``iter_users()`` over 1,000,000 accounts (bulk-filled by ``harness.fill``),
  with the peak of Python memory it allocates (``tracemalloc``) against
  ``users()``, which loads them all.

Targets: SQLite and PostgreSQL ``usage()`` within 2 s, MemoryStore within
5 s; Redis is a figure.
"""

from __future__ import annotations

import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

from harness import Section
from harness.fill import fill
from harness.report import fmt
from harness.stores import Places, available

from creditmeter import BalanceConfig, BalanceManager, ChargeItem, EntryKind, TokenUsage

TITLE = "Usage reports: usage(), entries() and iter_users() at a million rows"
KINDS = ("memory", "sqlite-normal", "redis", "postgres")
TARGETS = {"memory": 5.0, "sqlite-normal": 2.0, "postgres": 2.0}  # seconds; redis: a figure
MONTH = (datetime(2026, 11, 1, tzinfo=timezone.utc), datetime(2026, 12, 1, tzinfo=timezone.utc))
MODELS = ("gpt-4o", "gpt-4o-mini", "claude-sonnet-4", "gemini-2.5-flash", "o3")
BATCH = 1_000
CONFIG = BalanceConfig(enabled=True, start_balance=10**15)


@dataclass(frozen=True)
class Sizes:
    """How much each store holds."""

    rows: int  # charges written
    users: int  # over this many users
    accounts: int  # accounts for iter_users
    repeats: int  # timed usage() calls


QUICK = Sizes(rows=20_000, users=200, accounts=20_000, repeats=3)
FULL = Sizes(rows=1_000_000, users=10_000, accounts=1_000_000, repeats=3)


class MonthClock:
    """A clock that moves through the month by an equal step each time it is read."""

    def __init__(self, reads: int) -> None:
        self.now = MONTH[0]
        self.step = (MONTH[1] - MONTH[0]) / max(reads, 1)
        self.last = MONTH[1] - timedelta(microseconds=1)

    def __call__(self) -> datetime:
        now = self.now
        self.now = min(now + self.step, self.last)
        return now


def _items(sizes: Sizes, start: int) -> list[ChargeItem]:
    items = []
    for n in range(start, min(start + BATCH, sizes.rows)):
        usage = TokenUsage(input=200 + n % 900, output=50 + n % 400, cache_read=(n % 7) * 64)
        items.append(
            ChargeItem(
                f"user-{n % sizes.users:05d}",
                model=MODELS[(n // sizes.users) % len(MODELS)],
                usage=usage,
            )
        )
    return items


def _write(manager: BalanceManager, sizes: Sizes) -> dict[str, Any]:
    """The month's charges, a batch at a time; what they add up to."""
    calls = tokens = 0
    charged = Decimal(0)
    began = time.perf_counter()
    for start in range(0, sizes.rows, BATCH):
        for result in manager.charge_many(_items(sizes, start)):
            entry = result.entry
            assert entry is not None, result.error
            assert entry.usage is not None
            calls += 1
            tokens += entry.usage.total
            charged -= entry.amount
    seconds = time.perf_counter() - began
    return {"calls": calls, "tokens": tokens, "charged": charged, "write_s": seconds}


def _timed(call: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        began = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - began)
    return statistics.median(times), result


def _page_all(manager: BalanceManager) -> tuple[float, int, bool]:
    """Every entry, 10,000 a page: seconds, entries, and whether none repeated."""
    began = time.perf_counter()
    seen: set[str] = set()
    count, after = 0, None
    while True:
        page = manager.entries(after=after, limit=10_000)
        count += len(page.entries)
        seen.update(entry.id for entry in page.entries)
        if page.next is None:
            break
        after = page.next
    return time.perf_counter() - began, count, len(seen) == count


def _peak(call: Callable[[], int]) -> tuple[float, int, int]:
    """Seconds, what ``call`` counted, and the peak of Python memory it allocated (bytes)."""
    tracemalloc.start()
    began = time.perf_counter()
    try:
        counted = call()
        seconds = time.perf_counter() - began
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return seconds, counted, peak


def _measure(places: Places, kind: str, sizes: Sizes) -> dict[str, Any]:
    url, store = places.open(kind, "usage")
    clock = MonthClock(sizes.rows + 2 * sizes.users)
    manager = BalanceManager(store, CONFIG, clock=clock)
    written = _write(manager, sizes)
    seconds, rows = _timed(
        lambda: manager.usage(since=MONTH[0], until=MONTH[1], by=("user", "model")), sizes.repeats
    )
    agrees = (
        sum(row.calls for row in rows) == written["calls"]
        and sum(row.usage.total for row in rows) == written["tokens"]
        and sum(row.charged for row in rows) == written["charged"]
    )
    page_s, paged, unique = _page_all(manager)
    opened = len(manager.users())
    expected_entries = written["calls"] + opened  # a charge each, and each account's OPEN
    store.close()
    del url

    users_url, users_store = places.open(kind, "users")
    fill(users_url, users_store, range(sizes.accounts), Decimal(100))
    users_manager = BalanceManager(users_store, CONFIG)
    next(iter(users_manager.iter_users(page_size=1)))  # MemoryStore sorts its ids once, kept
    iter_s, iterated, iter_peak = _peak(lambda: sum(1 for _ in users_manager.iter_users()))
    all_s, listed, all_peak = _peak(lambda: len(users_manager.users()))
    users_store.close()
    print(f"    {kind}: usage {fmt(seconds, 2)} s, paging {fmt(page_s, 1)} s", file=sys.stderr)
    return {
        **written,
        "usage_s": seconds,
        "rows": len(rows),
        "agrees": agrees,
        "page_s": page_s,
        "paged": paged,
        "expected_entries": expected_entries,
        "unique": unique,
        "iter_s": iter_s,
        "iterated": iterated,
        "iter_peak": iter_peak,
        "all_s": all_s,
        "listed": listed,
        "all_peak": all_peak,
    }


def run(*, quick: bool, workdir: Path) -> Section:
    """Every reachable store: write a month, report it, page it, list its users."""
    sizes = QUICK if quick else FULL
    kinds, skipped, servers = available(KINDS)
    section = Section(TITLE)
    results = {}
    with Places(workdir) as places:
        for kind in kinds:
            results[kind] = _measure(places, kind, sizes)
    section.text(
        f"""Per store, {sizes.rows:,} priced charges (5 models, input, output and cache-read
        tokens) over {sizes.users:,} users, written with `charge_many` ({BATCH:,} items a
        batch) by a manager whose clock walks through November 2026; then
        `usage(since=2026-11-01, until=2026-12-01, by=("user", "model"))`, the median of
        {sizes.repeats} calls, its rows checked against what was written (calls, tokens,
        charged credits); `entries()` paged through every entry ({EntryKind.CHARGE.value}
        and each account's opening entry) 10,000 a page; and, on a second store bulk-filled
        with {sizes.accounts:,} accounts, `iter_users()` against `users()`, with the peak of
        Python memory each allocated (tracemalloc: the store's client buffers count, the
        server's memory does not; each after one page was read, since MemoryStore sorts its
        ids on the first page and keeps them sorted, as a database keeps an index)."""
    )
    section.lines += [*servers, ""]
    rows = []
    for kind, r in results.items():
        rows.append(
            [
                kind,
                fmt(r["write_s"], 1),
                fmt(r["usage_s"], 2),
                f"{r['rows']:,}",
                "yes" if r["agrees"] else "NO",
                fmt(r["page_s"], 1),
                f"{r['paged']:,}",
                fmt(r["iter_s"], 1),
                fmt(r["iter_peak"] / 2**20, 1),
                fmt(r["all_s"], 1),
                fmt(r["all_peak"] / 2**20, 1),
            ]
        )
    section.table(
        [
            "store",
            "write s",
            "usage() s",
            "rows",
            "sums agree",
            "entries() all s",
            "entries",
            "iter_users() s",
            "iter peak MiB",
            "users() s",
            "users() peak MiB",
        ],
        rows,
    )
    for kind, r in results.items():
        target = TARGETS.get(kind)
        suffix = "" if target is not None else " (figure)"
        section.bound(
            f"{kind}: usage() by user and model over {sizes.rows:,} rows, {sizes.users:,} users"
            + suffix,
            r["usage_s"],
            at_most=target,
            unit=" s",
            detail=f"median of {sizes.repeats}",
        )
        section.check(
            f"{kind}: usage() rows add up to what was written",
            r["agrees"],
            f"calls {r['calls']:,}; tokens {r['tokens']:,}; charged {r['charged']}",
        )
        section.check(
            f"{kind}: entries() pages every entry once",
            r["paged"] == r["expected_entries"] and r["unique"],
            f"{r['paged']:,} of {r['expected_entries']:,} in {fmt(r['page_s'], 1)} s"
            f" ({fmt(r['paged'] / r['page_s'], 0)} entries/s)",
        )
        section.check(
            f"{kind}: iter_users() lists {sizes.accounts:,} users in less memory than users()",
            r["iterated"] == r["listed"] == sizes.accounts and r["iter_peak"] < r["all_peak"],
            f"{r['iterated']:,} users in {fmt(r['iter_s'], 1)} s, peak"
            f" {fmt(r['iter_peak'] / 2**20, 1)} MiB vs users() {fmt(r['all_peak'] / 2**20, 1)} MiB",
        )
    for kind, reason in skipped.items():
        section.check(f"{kind}: measured", False, f"skipped: {reason}")
    return section
