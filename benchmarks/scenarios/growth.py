"""Growth: does a charge cost more as a store fills with accounts and ledger rows? (issue 9)

Every store is filled step by step (``harness.fill``) and, at each size, times
``charge(user, 1)`` on one user, on a random user whose account the manager
has just forgotten (a load and a commit) and on a new user. At the largest
size a store of the same kind holding one account runs the same series in the
same rounds, and the verdict compares the two round by round. A second SQLite
part holds 1,000 accounts and a ledger of up to 1,000,000 rows.
"""

from __future__ import annotations

import itertools
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from harness import Section, Series, interleave, now_ns, percentile
from harness.fill import count, fill, fill_ledger, ledger_plan, uid
from harness.report import fmt, table
from harness.stores import Places, available

from creditmeter import BalanceConfig, BalanceManager, EntryKind, open_store

TITLE = "Growth: charge latency as accounts and the ledger grow"
RATIO, SLACK_US = 1.25, 5.0
START = Decimal(1_000_000_000)
CONFIG = BalanceConfig(enabled=True, start_balance=START)
ACCOUNTS = 1_000  # in the ledger part
LIGHT = "light-user"
SERIES = {
    "one": "one user",
    "random": "random user, load + commit",
    "new": "new user",
    "ledger": f"ledger read ({LIGHT}, 5 entries)",
}
JUDGED = ("one", "random", "new")
STORES = {
    "memory": "MemoryStore",
    "sqlite-normal": "SQLiteStore (normal)",
    "redis": "RedisStore",
    "postgres": "PostgresStore",
}


@dataclass(frozen=True)
class Plan:
    """Sizes, ledger rows, rounds, and ops per batch per store."""

    levels: tuple[int, ...]
    ledger_rows: int
    repeats: int
    ops: dict[str, int]


QUICK = Plan(
    (1, 2_000, 10_000), 10_000, 3, {"memory": 100, "sqlite": 20, "redis": 10, "postgres": 10}
)
FULL = Plan(
    (1, 10_000, 1_000_000),
    1_000_000,
    15,
    {"memory": 2_000, "sqlite": 300, "redis": 200, "postgres": 150},
)
_fresh = itertools.count(2**40)  # indices of new users: never a filled one


@dataclass
class Stat:
    """One series at one size: its batches, and p50 / p99 over every op (µs)."""

    series: Series
    p50: float
    p99: float


class Subject:
    """One store holding accounts ``uid(0..filled-1)``, and the one manager that charges it."""

    def __init__(self, label: str, url: str, series: tuple[str, ...], twin: Subject | None = None):
        self.label, self.url, self.series, self.store = label, url, series, open_store(url)
        self.manager = BalanceManager(self.store, CONFIG)
        self.tally = twin.tally if twin else {"created": 0, "user0": 0, "base": 0}
        self.filled = twin.filled if twin else 0
        self.lat: dict[str, list[int]] = {name: [] for name in SERIES}

    def fill_to(self, level: int) -> tuple[float, str]:
        """Add accounts up to ``level`` and check some; the seconds it took, what was checked."""
        added = range(self.filled, level)
        started = time.perf_counter()
        fill(self.url, self.store, added, START)
        seconds, self.filled = time.perf_counter() - started, level
        sample = {
            added.start,
            added.stop - 1,
            *random.Random(level).sample(added, min(3, len(added))),
        }
        for user in map(uid, sample):
            entries = [(e.kind, e.amount) for e in self.store.ledger(user)]
            balance = BalanceManager(self.store, CONFIG).balance(user)
            if balance != START or entries != [(EntryKind.OPEN, START)]:
                raise RuntimeError(f"{self.label}: filled account {user} reads back wrong")
        counted = count(self.url, self.store)
        if counted != self.filled + self.tally["created"]:
            raise RuntimeError(f"{self.label}: {counted:,} accounts stored, {self.filled:,} filled")
        return seconds, f"{counted:,} counted; {len(sample)} sampled: load, balance, ledger ok"

    def calls(self, picks: list[str]) -> dict[str, Callable[[], None]]:
        """The timed callables of its series (one manager, as in one process)."""
        charge, seen, tally, user0 = self.manager.charge, self.manager._seen, self.tally, uid(0)
        cold = itertools.cycle(picks)

        def one(user: str, forget: bool) -> None:
            if forget:
                seen.pop(user, None)  # this charge loads the account, then commits
            charge(user, 1)
            tally["user0"] += user == user0

        def new() -> None:
            user = uid(next(_fresh))
            charge(user, 1)
            seen.pop(user, None)  # leave the remembered accounts as the other series left them
            tally["created"] += 1

        every: dict[str, Callable[[], object]] = {
            "one": lambda: one(user0, False),
            "random": lambda: one(next(cold), True),
            "ledger": lambda: self.store.ledger(LIGHT),
            "new": new,
        }
        return {name: _recorded(every[name], self.lat[name]) for name in self.series}

    def check_user0(self) -> str:
        """Every charge of uid(0) must show in its balance, exactly."""
        balance = BalanceManager(self.store, CONFIG).balance(uid(0))
        if balance != START - self.tally["base"] - self.tally["user0"]:
            raise RuntimeError(f"{self.label}: {uid(0)} holds {balance}: a charge was lost")
        lost = len(self.manager._hot)
        charges = f"{self.tally['user0']:,} charges of {uid(0)}"
        return f"{self.label}: {charges}, balance exact; lost compare-and-sets: {lost}"


def _recorded(call: Callable[[], object], latencies: list[int]) -> Callable[[], None]:
    def timed() -> None:
        start = now_ns()
        call()
        latencies.append(now_ns() - start)

    return timed


def measure(subjects: list[Subject], plan: Plan, kind: str) -> dict[str, dict[str, Stat]]:
    """Every subject's series in the same rounds (new users last): label -> series -> Stat."""
    ops = plan.ops[kind]
    picker = random.Random(sum(s.filled for s in subjects))
    groups: list[dict[str, Callable[[], None]]] = [{}, {}]
    for s in subjects:
        picks = [uid(picker.randrange(s.filled)) for _ in range(ops * (plan.repeats + 1))]
        for name, call in s.calls(picks).items():
            groups[name == "new"][f"{s.label}|{name}"] = call
    out: dict[str, dict[str, Stat]] = {}
    for group in filter(None, groups):
        for call in group.values():
            for _ in range(max(1, ops // 5)):
                call()
        for s in subjects:
            for latencies in s.lat.values():
                latencies.clear()
        for key, series in interleave(
            group, ops=ops, repeats=plan.repeats, warmup=0
        ).series.items():
            label, name = key.split("|")
            lat = next(s for s in subjects if s.label == label).lat[name]
            out.setdefault(label, {})[name] = Stat(
                series, percentile(lat, 50) / 1e3, percentile(lat, 99) / 1e3
            )
    return out


@dataclass
class Growth:
    """What one store's run measured."""

    name: str
    rows: dict[str, dict[str, Stat]] = field(default_factory=dict)  # row -> series -> Stat
    fills: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (big row, its control row)
    error: str = ""
    seconds: float = 0.0


def grow(places: Places, kind: str, plan: Plan) -> Growth:
    """Fill one store level by level and time the series at each level."""
    result, started, opened = Growth(STORES[kind]), time.perf_counter(), []
    try:
        opened.append(big := Subject("big", places.url(kind, "big"), JUDGED))
        for level in plan.levels:
            added = level - big.filled
            seconds, checked = big.fill_to(level)
            rate = f"{added / seconds:,.0f}" if added >= 1_000 else "-"
            result.fills.append(
                [result.name, f"{level:,}", f"{added:,}", fmt(seconds, 2), rate, checked]
            )
            print(f"  [growth] {result.name}: {level:,} accounts; timing", file=sys.stderr)
            labels = {"big": f"{level:,}", "control": "1 (control, same rounds)"}
            if level < plan.levels[-1]:
                result.rows[labels["big"]] = measure([big], plan, kind.removesuffix("-normal"))[
                    "big"
                ]
                continue
            opened.append(control := Subject("control", places.url(kind, "control"), JUDGED))
            control.fill_to(1)
            measured = measure([big, control], plan, kind.removesuffix("-normal"))
            if kind.startswith("sqlite"):  # the same files at durability full, after the others
                full = [
                    Subject(f"{s.label}-full", s.url.replace("=normal", "=full"), JUDGED, s)
                    for s in (big, control)
                ]
                opened += full
                measured |= measure(full, plan, "sqlite")
                labels |= {
                    f"{label}-full": f"{text}, durability full" for label, text in labels.items()
                }
            result.rows |= {labels[label]: stats for label, stats in measured.items()}
            result.pairs += [
                (labels[b], labels[b.replace("big", "control")])
                for b in ("big", "big-full")
                if b in measured
            ]
        if kind == "postgres":
            result.notes.append(f"ledger read plan: `{ledger_plan(big.url, big.store, uid(1))}`")
        result.notes += [s.check_user0() for s in opened]
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        for s in opened:
            s.store.close()
        result.notes += places.close()
        result.seconds = time.perf_counter() - started
    return result


def grow_ledger(places: Places, plan: Plan) -> Growth:
    """SQLite with 1,000 accounts: 1,000 ledger rows against ``plan.ledger_rows``, same rounds."""
    result, started, subjects = Growth("SQLiteStore (normal), ledger"), time.perf_counter(), []
    per_user = plan.ledger_rows // ACCOUNTS
    try:
        for label in ("heavy", "control"):
            subjects.append(
                s := Subject(label, places.url("sqlite-normal", label), (*JUDGED, "ledger"))
            )
            s.manager.grant(LIGHT, 100)
            for _ in range(3):
                s.manager.charge(LIGHT, 1)  # 5 entries: open, grant, 3 charges
            s.tally["created"] += 1
            seconds = time.perf_counter()
            s.fill_to(ACCOUNTS)
            users = [uid(i) for i in range(ACCOUNTS)]
            if label == "heavy":
                fill_ledger(s.store, users, per_user, START)
                s.tally["base"] = per_user - 1
            seconds = time.perf_counter() - seconds
            for user in (users[0], users[-1], users[ACCOUNTS // 2]):
                entries = s.store.ledger(user)
                balance = BalanceManager(s.store, CONFIG).balance(user)
                if len(entries) != 1 + s.tally["base"] or sum(e.amount for e in entries) != balance:
                    raise RuntimeError(f"ledger fill of {user} reads back wrong")
            rows = count(s.url, s.store, "ledger")
            result.fills.append(
                [
                    f"SQLiteStore, ledger ({label})",
                    f"{rows:,} ledger rows",
                    f"{rows - 5:,} rows",
                    fmt(seconds, 2),
                    f"{(rows - 5) / seconds:,.0f} rows",
                    "3 accounts: entries and sum = balance",
                ]
            )
        result.notes.append(f"ledger read plan: `{ledger_plan(s.url, s.store, LIGHT)}`")
        measured = measure(subjects, plan, "sqlite")
        result.rows = {
            f"{plan.ledger_rows:,} ledger rows": measured["heavy"],
            f"{ACCOUNTS:,} ledger rows (control, same rounds)": measured["control"],
        }
        result.pairs.append(tuple(result.rows))  # type: ignore[arg-type]
        result.notes += [s.check_user0() for s in subjects]
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        for s in subjects:
            s.store.close()
        places.close()
        result.seconds = time.perf_counter() - started
    return result


# --- the section -----------------------------------------------------------------------------


def versus(big: Stat, control: Stat) -> tuple[str, bool]:
    """The paired ratio and difference, round by round, and whether that is flat.

    Flat: the median of the per-round ratios within RATIO, or of the differences
    within SLACK_US (whichever is looser; the µs allowance matters only where a
    charge takes a few µs).
    """
    rounds = list(zip(big.series.wall, control.series.wall, strict=True))
    ratio = statistics.median(b / c for b, c in rounds)
    difference = statistics.median(b - c for b, c in rounds)
    return f"{ratio:.2f}x ({difference:+.1f} µs)", ratio <= RATIO or difference <= SLACK_US


def tables(growth: Growth, series: tuple[str, ...], first: str) -> str:
    """Medians per row with the ÷ control rows, then p50 / p99."""
    medians = [
        [row, *(fmt(s[n].series.median) if n in s else "-" for n in series)]
        for row, s in growth.rows.items()
    ]
    for big_row, control_row in growth.pairs:
        big, control = growth.rows[big_row], growth.rows[control_row]
        cells = []
        for n in series:
            text, flat = versus(big[n], control[n]) if n in big else ("-", True)
            cells.append(text + ("" if flat or n not in JUDGED else " over"))
        medians.append([f"{big_row} ÷ control", *cells])
    spread = [
        [row, *(f"{fmt(s[n].p50)} / {fmt(s[n].p99)}" if n in s else "-" for n in series)]
        for row, s in growth.rows.items()
    ]
    header = [f"{SERIES[n]} µs/op" for n in series]
    return (
        table([first, *header], medians)
        + "\n\n"
        + table([first, *(h.replace("µs/op", "p50 / p99") for h in header)], spread)
    )


def judge(
    section: Section, name: str, growth: Growth, series: tuple[str, ...], extra: str = ""
) -> None:
    """A target line: each series of the big row flat against its control."""
    big, control = (growth.rows[row] for row in growth.pairs[0 if "(full)" not in name else 1])
    found = [versus(big[s], control[s]) for s in series]
    measured = "; ".join(f"{SERIES[s]} {text}" for s, (text, _) in zip(series, found, strict=True))
    section.check(name, all(flat for _, flat in found), measured + extra)


def run(*, quick: bool, workdir: Path) -> Section:
    """Fill and time every reachable store; the section and its targets."""
    plan, started, section = QUICK if quick else FULL, time.perf_counter(), Section(TITLE)
    kinds, skipped, _ = available(STORES)
    with Places(workdir) as places:
        results = [grow(places, kind, plan) for kind in kinds]
        ledger = grow_ledger(places, plan)
    results += [
        Growth(STORES[kind], error=f"server not reachable: {why}") for kind, why in skipped.items()
    ]
    largest, rows = f"{plan.levels[-1]:,}", f"{plan.ledger_rows:,}"
    criterion = f"within {RATIO}x or +{SLACK_US:g} µs"
    sizes = ", ".join(f"{n:,}" for n in plan.levels)
    section.text(
        f"""**Quick run: {sizes} accounts and {rows} ledger rows** (the full run goes to
        1,000,000 of each; quick figures are few and noisy)."""
        if quick
        else f"Accounts: {sizes}; ledger rows: {rows}.",
        """Each store is filled step by step with accounts as a first `balance()` writes them
        (`harness.fill`: the account and its opening entry, serialised by `creditmeter.serde`,
        in the store's own tables or keys; SQLite's WAL checkpointed, PostgreSQL's tables
        VACUUM ANALYZEd), and each fill is checked. At each size, one manager per store times
        `charge(user, 1)` on:""",
    )
    section.bullets(
        "**one user**: the same user every time, remembered by the manager: one commit;",
        """**random user, load + commit**: a user drawn from every account, forgotten by the
        manager just before: a load and a commit on a random row, page or key;""",
        "**new user**: a user the store has never seen (opened, then charged), timed last.",
    )
    section.text(
        f"""At the largest size ({largest}) a store of the same kind holding 1 account runs
        the same series in the same rounds. **Flat:** for one user, random user (load +
        commit) and new user, the median over the rounds of the full store's batch over the
        control's is at most {RATIO}, or the median difference at most +{SLACK_US:g} µs.
        Tables: median µs/op over {plan.repeats} batches, p50 / p99 over every op. SQLite runs
        at durability `normal` (an fsync would hide the growth), the largest size at `full`
        too."""
    )
    section.lines += ["### Fills", ""]
    section.table(
        ["store", "filled to", "added", "fill s", "per s", "checked"],
        [row for g in [*results, ledger] for row in g.fills],
    )
    for growth in results:
        section.lines += [f"### {growth.name}", ""]
        if growth.error:
            section.text(f"**Not measured:** {growth.error}")
        if growth.rows:
            section.lines += [tables(growth, JUDGED, "accounts"), ""]
        name = f"Growth, {growth.name}: charge at {largest} accounts {criterion} of 1 account"
        if not growth.pairs:
            section.check(name, None, f"not measured: {growth.error}")
        for big, _ in growth.pairs:
            judge(
                section,
                name.replace("(normal)", "(full)") if "full" in big else name,
                growth,
                JUDGED,
            )
        section.bullets(*growth.notes, f"wall time: {fmt(growth.seconds)} s")
    section.lines += [f"### {ledger.name}", ""]
    section.text(
        f"""Two SQLite files (durability `normal`) with the same {ACCOUNTS:,} accounts: one
        with {rows} ledger rows ({plan.ledger_rows // ACCOUNTS:,} entries per account,
        interleaved across the accounts as charges arrive), one with {ACCOUNTS:,}. Both hold
        `{LIGHT}` (5 entries): the ledger read is `store.ledger('{LIGHT}')`."""
    )
    if ledger.pairs:
        section.lines += [tables(ledger, (*JUDGED, "ledger"), "ledger"), ""]
        base = f"{criterion} of {ACCOUNTS:,} rows"
        judge(
            section,
            f"Growth, SQLiteStore (normal): charge with {rows} ledger rows {base}",
            ledger,
            JUDGED,
        )
        plan_text = ledger.notes[0].split(": ", 1)[1]
        judge(
            section,
            f"Growth, SQLiteStore: ledger(user) of a 5-entry user with {rows} ledger rows {base}",
            ledger,
            ("ledger",),
            f"; plan: {plan_text}",
        )
    else:
        section.text(f"**Not measured:** {ledger.error}")
        section.check(
            f"Growth, SQLiteStore: charge and ledger read with {rows} ledger rows",
            None,
            f"not measured: {ledger.error}",
        )
    section.bullets(
        *ledger.notes,
        f"wall time: {fmt(ledger.seconds)} s",
        f"the whole section: {fmt(time.perf_counter() - started)} s",
    )
    return section
