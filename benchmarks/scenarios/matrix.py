"""Every store, four operations beside its raw floor; then 1, 4 and 8 writers (issue 9).

Per store (MemoryStore, SQLiteStore at durability full and normal, RedisStore,
PostgresStore), one process times in interleaved rounds the raw floor
(``harness.floors``), ``charge(user, 1)``, a priced charge, ``hold`` +
``settle`` and a ``metered`` call returning an openai ``ChatCompletion``;
MemoryStore adds a floor that builds a charge's records and
``AsyncBalanceManager`` charges on ``AsyncMemoryStore`` (issue 14's targets).
Then 1, 4 and 8 writers charge for a fixed time, on one hot user and on a
user each: processes for every store processes can share, threads for
MemoryStore; after each run the balances and ledgers are read back against
the acknowledged charges. The plot is drawn from these runs.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import Rounds, Section, Series, interleave, now_ns, percentile, procs
from harness.floors import raw, seed
from harness.report import fmt, yes
from harness.responses import RESPONSE
from harness.stores import KINDS, Places, audit, available, kind_of

from creditmeter import (
    AsyncBalanceManager,
    AsyncMemoryStore,
    BalanceConfig,
    BalanceManager,
    CreditMeterError,
    EntryKind,
    TokenUsage,
    open_store,
)

TITLE = "Stores: operations against their floors, and throughput with 1, 4 and 8 writers"
START = 10**12
# Balances never clamp: every charge moves exactly what it costs.
CONFIG = BalanceConfig(enabled=True, start_balance=START, allow_negative_balance=True)
MODEL = "gpt-4o"
USAGE = TokenUsage(input=1000, output=200, cache_read=500)
WRITERS = (1, 4, 8)
MODES = {"hot": "one hot user", "distinct": "a user per writer"}
OPERATIONS = ("floor", "charge", "charge with usage", "hold + settle", "decorated call")
FLOOR_RATIO = 1.5
MEMORY_TARGETS = (  # issue 14, on MemoryStore: (row, over row, at most x)
    ("charge", "records floor", 3.0),
    ("charge with usage", "charge", 1.2),
    ("hold + settle", "charge", 2.0),
    ("decorated call", "charge with usage", 1.5),
    ("async charge", "charge", 1.3),
)
PRELOAD = ("creditmeter", "redis", "psycopg")


@dataclass(frozen=True)
class Sizes:
    """How long each part runs."""

    round_s: float  # one round of the single-process batches, every operation together
    memory_ops: int  # MemoryStore's batches instead (its async batch is one call)
    repeats: int  # rounds per store
    duration_s: float  # each throughput run


QUICK = Sizes(round_s=0.02, memory_ops=300, repeats=3, duration_s=0.1)
FULL = Sizes(round_s=0.6, memory_ops=6_000, repeats=11, duration_s=2.0)


def operations(manager: BalanceManager) -> dict[str, Callable[[], object]]:
    """The four timed operations, each on a user of its own, ``one-1`` to ``one-4``."""
    users = {operation: f"one-{number}" for number, operation in enumerate(OPERATIONS)}
    for user in list(users.values())[1:]:
        manager.account(user)

    @manager.metered(user="user_id", model="model")
    def call(prompt: str, *, user_id: str, model: str) -> object:
        del prompt, user_id, model  # a stand-in for the model call
        return RESPONSE

    def hold_settle() -> None:
        manager.settle(manager.hold(users["hold + settle"], 10), 7)

    charge = manager.charge
    return {
        "charge": lambda: charge(users["charge"], 1),
        "charge with usage": lambda: charge(users["charge with usage"], model=MODEL, usage=USAGE),
        "hold + settle": hold_settle,
        "decorated call": lambda: call("Say hello.", user_id=users["decorated call"], model=MODEL),
    }


class AsyncCharges:
    """``AsyncBalanceManager.charge(user, 1)`` on AsyncMemoryStore, ``per_call`` a call.

    Each call awaits them all in one ``run_until_complete``, so that starting
    the loop is spread over the batch; ``finish`` turns the figures per charge.
    """

    def __init__(self, per_call: int) -> None:
        self.per_call, self.loop = per_call, asyncio.new_event_loop()
        self.manager = AsyncBalanceManager(AsyncMemoryStore(), CONFIG)
        self.loop.run_until_complete(self.manager.account("one-async"))

    async def charges(self) -> None:
        charge = self.manager.charge
        for _ in range(self.per_call):
            await charge("one-async", 1)

    def __call__(self) -> None:
        self.loop.run_until_complete(self.charges())

    def finish(self, series: Series) -> bool:
        """Per-charge figures in ``series``; whether each charge was recorded once."""
        series.wall = [wall / self.per_call for wall in series.wall]
        series.cpu = [cpu / self.per_call for cpu in series.cpu]
        ledger = self.loop.run_until_complete(self.manager.ledger("one-async"))
        balance = self.loop.run_until_complete(self.manager.balance("one-async"))
        charged = sum(1 for entry in ledger if entry.kind is EntryKind.CHARGE)
        sums = sum(entry.amount for entry in ledger) == balance == START - charged
        return sums and charged == series.calls * self.per_call

    def close(self) -> None:
        """Close the loop."""
        self.loop.close()


def single(url: str, floor_url: str, sizes: Sizes) -> tuple[Rounds, bool]:
    """The floor and the four operations of one store, interleaved; each charged once a call.

    MemoryStore also times its records floor and async charges, in batches of
    ``sizes.memory_ops`` (the async series: one call of that many charges).
    """
    floor = raw(floor_url)
    charges = AsyncCharges(sizes.memory_ops) if kind_of(url) == "memory" else None
    try:
        with open_store(url) as store:
            calls = {"floor": floor.charge, **operations(BalanceManager(store, CONFIG))}
            ops = None
            if charges is not None:
                records = raw(floor_url, "records").charge
                calls = {"floor": floor.charge, "records floor": records, **calls}
                calls["async charge"] = charges
                ops = {name: 1 if name == "async charge" else sizes.memory_ops for name in calls}
            rounds = interleave(calls, ops=ops, round_s=sizes.round_s, repeats=sizes.repeats)
            once = all(
                audit(store, [f"one-{n}"], START)[1:] == (rounds[op].calls, True)
                for n, op in enumerate(OPERATIONS[1:], start=1)
            )
            if charges is not None:
                once = charges.finish(rounds["async charge"]) and once
    finally:
        floor.close()
        if charges is not None:
            charges.close()
    return rounds, once


def paired(rounds: Rounds, a: str, b: str) -> str:
    """Row ``a`` over row ``b``, paired round by round, or ``-`` if either was not timed."""
    return f"{rounds.ratio(a, b):.2f}x" if {a, b} <= rounds.series.keys() else "-"


def _writer(
    index: int, barrier: Any, url: str, users: list[str], seconds: float, shared: Any
) -> dict[str, Any]:
    """Charge 1 credit again and again for ``seconds``; count and time each charge."""
    store = None if shared is not None else open_store(url)
    manager = shared or BalanceManager(store, CONFIG)  # type: ignore[arg-type]
    manager.account(users[index])  # connect and load before the start
    barrier.wait(timeout=120)
    latencies: list[int] = []
    failed, error = 0, ""
    started = before = now_ns()
    stop = started + int(seconds * 1e9)
    while before < stop:
        try:
            manager.charge(users[index], 1)
        except CreditMeterError as exc:
            failed += 1
            error = f"{type(exc).__name__}: {exc}"
        after = now_ns()
        latencies.append(after - before)
        before = after
    if store is not None:
        store.close()
    done = len(latencies) - failed
    return {
        "done": done,
        "failed": failed,
        "error": error,
        "lat": latencies,
        "ns": before - started,
    }


def throughput(url: str, sizes: Sizes) -> list[dict[str, Any]]:
    """Every mode and writer count on one store: threads for memory, processes otherwise."""
    kind = kind_of(url)
    runs = []
    with open_store(url) as store:
        manager = BalanceManager(store, CONFIG)
        for mode in MODES:
            for count in WRITERS:
                users = [
                    f"{mode}-{count}" + ("" if mode == "hot" else f"-{i}") for i in range(count)
                ]
                shared = manager if kind == "memory" else None
                args = (url, users, sizes.duration_s, shared)
                reports = procs.run(
                    _writer, count, args, threads=shared is not None, preload=PRELOAD
                )
                spent, entries, sums = audit(store, users, START)
                done = sum(r["done"] for r in reports)
                latencies = [value for r in reports for value in r["lat"]]
                runs.append(
                    {
                        "store": kind,
                        "mode": mode,
                        "writers": count,
                        "done": done,
                        "failed": sum(r["failed"] for r in reports),
                        "ops_per_s": done / (max(r["ns"] for r in reports) / 1e9),
                        "p50": percentile(latencies, 50) / 1000,
                        "p99": percentile(latencies, 99) / 1000,
                        "lost": done - spent,  # negative: charged twice
                        "ledger_ok": sums and entries == done,
                        "errors": {r["error"] for r in reports if r["error"]},
                    }
                )
                rate, lost = fmt(runs[-1]["ops_per_s"], 0), runs[-1]["lost"]
                print(f"    {kind} {mode} x{count}: {rate} ops/s, lost {lost}", file=sys.stderr)
    return runs


def run(*, quick: bool, workdir: Path) -> Section:
    """Measure every reachable store; the section, its targets and the plot's data."""
    sizes = QUICK if quick else FULL
    kinds, skipped, servers = available(KINDS)
    section = Section(TITLE)
    singles: dict[str, tuple[Rounds, bool]] = {}
    runs: list[dict[str, Any]] = []
    with Places(workdir) as places:
        urls = {kind: places.url(kind, "matrix") for kind in kinds}
        for kind, url in urls.items():
            print(f"  one process: {kind}", file=sys.stderr, flush=True)
            floor_url = places.url(kind, "floor")
            seed(floor_url, CONFIG)
            singles[kind] = single(url, floor_url, sizes)
        for url in urls.values():
            runs += throughput(url, sizes)
    section.text(
        f"""Stores: {", ".join(kinds)}{f" (skipped: {', '.join(skipped)})" if skipped else ""}.
        Start balance {START:,} with negative balances allowed, so every charge moves its
        full cost."""
    )
    section.lines += [*servers, ""]
    section.lines += ["### One process: each operation beside the store's raw floor", ""]
    batches = ", ".join(f"{kind} {rounds.ops['floor']:,}" for kind, (rounds, _) in singles.items())
    section.text(
        f"""Per store, {sizes.repeats} interleaved rounds, a round lasting about
        {sizes.round_s:g} s (MemoryStore: a fixed batch size; ops per batch: {batches}); µs/op
        is the median over the batches, *x floor* the median over the rounds of the row's
        batch over the floor's."""
    )
    section.bullets(
        """**floor**: a charge of 1 by hand (`harness.floors`): memory, a dict update under a
        `threading.Lock` (no validation, no ledger: its ratio is the manager's whole cost);
        SQLite, `BEGIN IMMEDIATE`, compare-and-set `UPDATE`, ledger `INSERT`, `COMMIT` with the
        store's schema and pragmas; Redis, the store's Lua commit script; PostgreSQL, the
        store's commit statement on one autocommit connection; rows as long as the store's.""",
        """**records floor** (memory): under a `threading.Lock`, the records a charge writes,
        built with their attrs constructors (keyword arguments): a `LedgerEntry` (a
        `new_id()`, `datetime.now(timezone.utc)`, the balance in `Decimal`) appended to a list
        and a new `Account` replacing the old one in a dict.""",
        f"""**charge** `charge(user, 1)`; **charge with usage** `charge(user, model={MODEL!r},
        usage={USAGE!r})`; **hold + settle** `settle(hold(user, 10), 7)`; **decorated call**
        `@manager.metered(user="user_id", model="model")` around a function returning an
        openai `ChatCompletion`.""",
        f"""**async charge** (memory): `await AsyncBalanceManager.charge(user, 1)` on
        `AsyncMemoryStore`, a batch of {sizes.memory_ops:,} awaited in one
        `loop.run_until_complete` (starting the loop spread over the batch), µs per charge.""",
    )
    rows = []
    for kind, (rounds, _) in singles.items():
        for op in rounds.series:
            s = rounds[op]
            ratio = "-" if op == "floor" else f"{rounds.ratio(op, 'floor'):.2f}x"
            span = f"{fmt(min(s.wall), 2)}-{fmt(max(s.wall), 2)}"
            rows.append([kind, op, fmt(s.median, 2), span, fmt(s.ops_per_s, 0), ratio])
    section.table(["store", "operation", "µs/op", "min-max", "ops/s", "x floor"], rows)
    section.text("Each operation against another of the same rounds (the targets: memory's):")
    section.table(
        ["store", *(f"{a} / {b} (≤ {limit:g}x)" for a, b, limit in MEMORY_TARGETS)],
        [
            [kind, *(paired(rounds, a, b) for a, b, _ in MEMORY_TARGETS)]
            for kind, (rounds, _) in singles.items()
        ],
    )
    once = all(ok for _, ok in singles.values())
    section.text(
        f"""Afterwards every operation's user was charged exactly once per call and its ledger
        sums to its balance: {yes(once)}."""
    )
    section.lines += ["### Throughput with 1, 4 and 8 writers", ""]
    section.text(
        f"""Each writer charges 1 credit in a loop for {sizes.duration_s:g} s, all started
        together behind a barrier, on one hot user or each on its own. Writers are processes,
        each with its own store, but for MemoryStore (one process): threads sharing one
        manager. ops/s: acknowledged charges over the slowest writer's time; p50 and p99 over
        every charge, retries and waits included. Each run is read back: lost = acknowledged
        charges - credits the balances lost; ledger ok = one `CHARGE` entry per acknowledged
        charge and every ledger summing to its balance."""
    )
    header = ["store", "users", "writers", "n", "charges", "ops/s", "p50 µs", "p99 µs"]
    section.table(
        [*header, "failed", "lost", "ledger ok"],
        [
            [
                r["store"],
                MODES[r["mode"]],
                "threads" if r["store"] == "memory" else "processes",
                str(r["writers"]),
                f"{r['done']:,}",
                fmt(r["ops_per_s"], 0),
                fmt(r["p50"], 0),
                fmt(r["p99"], 0),
                str(r["failed"]),
                str(r["lost"]),
                yes(r["ledger_ok"]),
            ]
            for r in runs
        ],
    )
    errors = sorted({f"{r['store']}: {e}"[:200] for r in runs for e in r["errors"]})
    if errors:
        section.text("Errors of failed charges (one per kind):")
        section.bullets(*(f"`{error}`" for error in errors))
    for kind, reason in skipped.items():
        section.text(f"{kind} was not measured: {reason}")
    for kind, (rounds, _) in singles.items():
        if kind == "memory":  # a dict update checks and records nothing: the records floor is
            name = "memory: charge over a dict update under a lock (figure)"  # its target
            section.ratio(name, rounds, "charge", "floor")
            continue
        name = f"{kind}: charge within {FLOOR_RATIO}x of its floor"
        section.ratio(name, rounds, "charge", "floor", at_most=FLOOR_RATIO)
    for a, b, limit in MEMORY_TARGETS if "memory" in singles else ():
        name = f"memory: {a} within {limit:g}x of the {b}"
        section.ratio(name, singles["memory"][0], a, b, at_most=limit)
    for kind, reason in skipped.items():
        section.check(f"{kind}: measured", False, f"skipped: {reason}")
    lost = sum(abs(r["lost"]) for r in runs)
    bad = sum(1 for r in runs if not r["ledger_ok"])
    per_store = ", ".join(
        f"{kind} {sum(abs(r['lost']) for r in runs if r['store'] == kind)}" for kind in kinds
    )
    section.check(
        "0 lost updates (every throughput run)",
        lost == 0 and bad == 0 and once,
        f"{lost} over {len(runs)} runs ({per_store}); runs whose ledger disagreed: {bad}",
    )
    rates = {mode: {kind: [] for kind in kinds} for mode in MODES}
    for r in runs:
        rates[r["mode"]][r["store"]].append(r["ops_per_s"])
    section.data = {
        "processes": WRITERS,
        "throughput": rates,
        "modes": MODES,
        "threads": ["memory"],
    }
    return section
