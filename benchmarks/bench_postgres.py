"""PostgreSQL charge benchmark for creditmeter (issue 6, "Benchmark").

Measures, in one run against a live PostgreSQL server:

1. One process: ``BalanceManager(PostgresStore(dsn)).charge(user, 1)`` against
   its raw floor: one psycopg connection (autocommit) running the store's own
   commit statement (the compare-and-set ``UPDATE`` and the ledger ``INSERT``
   in one statement, one round trip) by hand, with rows shaped like the
   store's. Store and floor batches alternate. Run with the server's
   ``synchronous_commit`` (every commit waits for its WAL flush) and with
   ``synchronous_commit=off`` set on both sessions (where the client's own
   work is not hidden behind the flush).
2. Four processes charging one user: the store (default ``RetryPolicy``,
   counting commits, lost compare-and-sets and ``exclusive`` blocks) against
   two raw floors using the same statement by hand: a bare compare-and-set
   loop that retries at once from the row returned by a lost one, and the
   store's own protocol for a hot user (advisory lock, load, compare-and-set,
   unlock) written by hand. Throughput, per-process latency, lost updates.

Usage::

    python benchmarks/bench_postgres.py [--quick] [--dsn DSN] [--output PATH]

A full run writes ``benchmarks/RESULTS-postgres.md`` unless ``--output`` says
otherwise; ``--quick`` writes only when ``--output`` is given. The DSN defaults
to ``$CREDITMETER_TEST_POSTGRES`` or ``postgresql://postgres@127.0.0.1:5432/test``;
every run works in tables of its own (a fresh prefix) and drops them.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from importlib import metadata
from pathlib import Path
from urllib.parse import quote

import psycopg
from common import percentile
from psycopg import sql

import creditmeter
from creditmeter import BalanceConfig, BalanceManager, VersionConflict, rules
from creditmeter._ids import new_id
from creditmeter.stores.postgres import PostgresStore, _Statements

now_ns = time.perf_counter_ns
USER = "user-1"
START = 10**9
# Balances never clamp: every charge moves exactly one credit.
CONFIG = BalanceConfig(enabled=True, start_balance=START, allow_negative_balance=True)
DEFAULT_DSN = os.environ.get(
    "CREDITMETER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
STAMP = "2026-01-01T00:00:00.000000+00:00"
NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)
# Raw rows shaped like the documents PostgresStore writes (same fields, same lengths).
ACCOUNT_TEXT = (
    '{{"user_id":"{user}","balance":"{balance}","version":{version},'
    f'"created_at":"{STAMP}","updated_at":"{STAMP}","last_refill":"{STAMP}","schema":1}}}}'
)
ENTRY_TEXT = (
    '{{"id":"{id}","user_id":"{user}","kind":"charge","amount":"-1",'
    f'"balance_after":"{{balance}}","at":"{STAMP}","cost":"1","schema":1}}}}'
)
MINUS_ONE = Decimal(-1)
ONE = Decimal(1)


@dataclass(frozen=True)
class Sizes:
    """How much work each section does."""

    single_ops: int
    single_batches: int
    procs: int
    proc_ops: int
    proc_runs: int
    deadline_s: float


QUICK = Sizes(single_ops=100, single_batches=6, procs=4, proc_ops=250, proc_runs=1, deadline_s=30)
FULL = Sizes(
    single_ops=200, single_batches=30, procs=4, proc_ops=1_000, proc_runs=3, deadline_s=120
)


# --- helpers -------------------------------------------------------------------


def fresh_prefix() -> str:
    return f"cmbench_{uuid.uuid4().hex[:10]}_"


def drop(dsn: str, prefix: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        names = sql.SQL(", ").join(
            sql.Identifier(prefix + t) for t in ("accounts", "ledger", "meta")
        )
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(names))


def with_options(dsn: str, options: str) -> str:
    return f"{dsn}{'&' if '?' in dsn else '?'}options={quote(options)}"


def seed(dsn: str, prefix: str) -> None:
    """Create the tables and the user's account (through the store)."""
    with PostgresStore(dsn, prefix=prefix) as store:
        BalanceManager(store, CONFIG).account(USER)


def check(dsn: str, prefix: str, charges: int) -> dict[str, object]:
    """Final balance and ledger against the number of acknowledged charges."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        balance, version = conn.execute(
            sql.SQL("SELECT balance, version FROM {} WHERE user_id = %s").format(
                sql.Identifier(prefix + "accounts")
            ),
            (USER,),
        ).fetchone()
        count, total = conn.execute(
            sql.SQL("SELECT count(*), coalesce(sum(amount), 0) FROM {} WHERE user_id = %s").format(
                sql.Identifier(prefix + "ledger")
            ),
            (USER,),
        ).fetchone()
    charged = count - 1  # less the OPEN entry
    return {
        "lost": START - charges - balance,
        "entries_ok": charged == charges and total == balance,
        "charged": charged,
        "version": version,
    }


class RawCommitter:
    """The store's commit statement, by hand: one connection, rows as long as the store's."""

    def __init__(self, dsn: str, prefix: str) -> None:
        statements = _Statements(prefix, None)  # the store's own statements
        self.update = statements.commit(new=False, entries=1)
        self.update_and_unlock = statements.commit(new=False, entries=1, release=True)
        self.load_sql = statements.load
        self.key = statements.lock_key(USER)
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.tag = uuid.uuid4().hex[:16]
        self.seq = 0
        self.version, self.balance = self.load()

    def load(self) -> tuple[int, int]:
        (text,) = self.conn.execute(self.load_sql, (USER,)).fetchone()
        data = json.loads(text)
        return data["version"], int(Decimal(data["balance"]))

    def attempt(self, *, unlock: bool = False) -> bool:
        """One compare-and-set of a charge of 1 from the last account seen; False if lost.

        With ``unlock``, the statement that applies also lets go of the advisory lock.
        """
        version = self.version + 1
        balance = self.balance - 1
        self.seq += 1
        params = [
            version,
            Decimal(balance),
            NOW,
            NOW,
            ACCOUNT_TEXT.format(user=USER, balance=balance, version=version),
            USER,
            self.version,
            self.key,
            f"{self.tag}-{self.seq:x}",
            "charge",
            MINUS_ONE,
            Decimal(balance),
            ONE,
            NOW,
            None,
            None,
            ENTRY_TEXT.format(id=f"{self.tag}-{self.seq:x}", user=USER, balance=balance),
            USER,
        ]
        if unlock:
            params.append(self.key)
        row = self.conn.execute(
            self.update_and_unlock if unlock else self.update, params
        ).fetchone()
        if row[0]:
            self.version, self.balance = version, balance
            return True
        if row[1] is None:
            self.version, self.balance = self.load()
        else:
            data = json.loads(row[1])
            self.version, self.balance = data["version"], int(Decimal(data["balance"]))
        return False

    def locked_charge(self) -> int:
        """The store's hot-user path by hand: lock, load, compare-and-set (which unlocks)."""
        self.conn.execute(b"SELECT pg_advisory_lock(%s)", (self.key,))
        self.version, self.balance = self.load()
        if self.attempt(unlock=True):
            return 0
        self.conn.execute(b"SELECT pg_advisory_unlock(%s)", (self.key,))
        return 1

    def close(self) -> None:
        self.conn.close()


# --- 1. one process ------------------------------------------------------------------


SERIES = {
    "floor": "raw floor: the store's commit statement by hand",
    "commit": "PostgresStore.commit alone (the charge rule applied by hand)",
    "manager": "BalanceManager(PostgresStore).charge",
}


@dataclass
class Single:
    """Per-batch µs/op (wall and CPU) of each series, measured in rounds."""

    label: str
    wall: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in SERIES})
    cpu: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in SERIES})
    lost: int = 0
    entries_ok: bool = True

    def median(self, series: str) -> float:
        return statistics.median(self.wall[series])

    def ratios(self, series: str) -> list[float]:
        return [s / f for s, f in zip(self.wall[series], self.wall["floor"], strict=True)]


class DirectCommitter:
    """The store alone: the manager's charge rule applied by hand, then ``store.commit``."""

    def __init__(self, store: PostgresStore) -> None:
        self.store = store
        account = store.load(USER)
        assert account is not None
        self.account = account

    def charge(self) -> None:
        change = rules.charge(
            self.account,
            USER,
            ONE,
            config=CONFIG,
            now=datetime.now(timezone.utc),
            new_id=new_id,
        )
        self.store.commit(change.account, change.entries, expected_version=change.expected_version)
        self.account = change.account


def single_process(dsn: str, label: str, sizes: Sizes) -> Single:
    prefixes = {series: fresh_prefix() for series in SERIES}
    result = Single(label)
    try:
        for prefix in prefixes.values():
            seed(dsn, prefix)
        with (
            PostgresStore(dsn, prefix=prefixes["commit"], create_schema=False) as direct_store,
            PostgresStore(dsn, prefix=prefixes["manager"], create_schema=False) as store,
        ):
            manager = BalanceManager(store, CONFIG)
            direct = DirectCommitter(direct_store)
            raw = RawCommitter(dsn, prefixes["floor"])

            def floor() -> None:
                if not raw.attempt():
                    raise AssertionError("the raw floor lost a compare-and-set")

            calls = {
                "floor": floor,
                "commit": direct.charge,
                "manager": lambda: manager.charge(USER, 1),
            }
            try:
                for call in calls.values():  # warm: connections, prepared statements
                    for _ in range(50):
                        call()
                order = list(SERIES)
                for batch in range(sizes.single_batches):
                    for series in order[batch % 3 :] + order[: batch % 3]:
                        call = calls[series]
                        started, cpu_started = now_ns(), time.process_time_ns()
                        for _ in range(sizes.single_ops):
                            call()
                        result.wall[series].append((now_ns() - started) / sizes.single_ops / 1e3)
                        spent = time.process_time_ns() - cpu_started
                        result.cpu[series].append(spent / sizes.single_ops / 1e3)
            finally:
                raw.close()
        charges = 50 + sizes.single_ops * sizes.single_batches
        for prefix in prefixes.values():
            outcome = check(dsn, prefix, charges)
            result.lost += int(outcome["lost"])  # type: ignore[call-overload]
            result.entries_ok = result.entries_ok and bool(outcome["entries_ok"])
    finally:
        for prefix in prefixes.values():
            drop(dsn, prefix)
    return result


# --- 2. four processes ------------------------------------------------------------------


class CountingStore(PostgresStore):
    """A PostgresStore that counts commits, lost compare-and-sets and exclusive blocks."""

    commits = 0
    conflicts = 0
    exclusives = 0

    def commit(self, account, entries, *, expected_version):
        type(self).commits += 1
        try:
            super().commit(account, entries, expected_version=expected_version)
        except VersionConflict:
            type(self).conflicts += 1
            raise

    def exclusive(self, user_id):
        type(self).exclusives += 1
        return super().exclusive(user_id)


def proc_worker(kind, dsn, prefix, ops, deadline_s, barrier, results) -> None:
    latencies: list[float] = []
    commits = conflicts = exclusives = 0
    done = 0
    if kind == "store":
        store = CountingStore(dsn, prefix=prefix, create_schema=False)
        manager = BalanceManager(store, CONFIG)
        manager.account(USER)
    else:
        raw = RawCommitter(dsn, prefix)
    barrier.wait()
    started = now_ns()
    deadline = started + int(deadline_s * 1e9)
    try:
        while done < ops and now_ns() < deadline:
            begun = now_ns()
            if kind == "store":
                manager.charge(USER, 1)
            elif kind == "raw-cas":
                while True:
                    commits += 1
                    if raw.attempt():
                        break
                    conflicts += 1
            else:  # raw-lock
                commits += 1
                exclusives += 1
                conflicts += raw.locked_charge()
            latencies.append((now_ns() - begun) / 1e6)
            done += 1
        wall = (now_ns() - started) / 1e9
    finally:
        if kind == "store":
            commits, conflicts = CountingStore.commits, CountingStore.conflicts
            exclusives = CountingStore.exclusives
            store.close()
        else:
            raw.close()
    results.put(
        {
            "done": done,
            "wall": wall,
            "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99),
            "max": max(latencies),
            "commits": commits,
            "conflicts": conflicts,
            "exclusives": exclusives,
        }
    )


@dataclass
class Run:
    kind: str
    total: int
    wall: float
    p50: float
    p99: float
    worst_max: float
    fewest: int
    commits: int
    conflicts: int
    exclusives: int
    lost: int
    entries_ok: bool

    @property
    def ops_per_s(self) -> float:
        return self.total / self.wall


def many_processes(dsn: str, kind: str, sizes: Sizes) -> Run:
    prefix = fresh_prefix()
    context = multiprocessing.get_context("spawn")
    try:
        seed(dsn, prefix)
        barrier = context.Barrier(sizes.procs)
        results = context.Queue()
        procs = [
            context.Process(
                target=proc_worker,
                args=(kind, dsn, prefix, sizes.proc_ops, sizes.deadline_s, barrier, results),
            )
            for _ in range(sizes.procs)
        ]
        for proc in procs:
            proc.start()
        summaries = [results.get(timeout=sizes.deadline_s + 60) for _ in procs]
        for proc in procs:
            proc.join(timeout=60)
        total = sum(s["done"] for s in summaries)
        result = check(dsn, prefix, total)
    finally:
        drop(dsn, prefix)
    return Run(
        kind=kind,
        total=total,
        wall=max(s["wall"] for s in summaries),
        p50=statistics.median(s["p50"] for s in summaries),
        p99=max(s["p99"] for s in summaries),
        worst_max=max(s["max"] for s in summaries),
        fewest=min(s["done"] for s in summaries),
        commits=sum(s["commits"] for s in summaries),
        conflicts=sum(s["conflicts"] for s in summaries),
        exclusives=sum(s["exclusives"] for s in summaries),
        lost=int(result["lost"]),  # type: ignore[call-overload]
        entries_ok=bool(result["entries_ok"]),
    )


# --- the report ------------------------------------------------------------------


KINDS = {
    "store": "PostgresStore (manager, default RetryPolicy)",
    "raw-cas": "raw: compare-and-set, retry from the returned row",
    "raw-lock": "raw: advisory lock, load, compare-and-set that also unlocks (the store's "
    "protocol for a hot user, by hand)",
}


def environment(dsn: str) -> dict[str, str]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        settings = {
            name: conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()[0]
            for name in ("server_version", "synchronous_commit", "fsync", "wal_sync_method")
        }
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except OSError:
        commit = "?"
    settings["commit"] = commit or "?"
    return settings


class Steal:
    """CPU steal time over the run, from /proc/stat (Linux guests)."""

    def __init__(self) -> None:
        self.start = self.read()

    @staticmethod
    def read() -> list[int]:
        try:
            with Path("/proc/stat").open() as stat:
                return [int(v) for v in stat.readline().split()[1:]]
        except OSError:
            return []

    def percent(self) -> float:
        end = self.read()
        if not end or not self.start:
            return 0.0
        delta = [b - a for a, b in zip(self.start, end, strict=False)]
        return 100.0 * delta[7] / max(sum(delta), 1) if len(delta) > 7 else 0.0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def render(
    singles: list[Single],
    runs: list[Run],
    sizes: Sizes,
    env: dict[str, str],
    command: str,
    seconds: float,
    load: float,
) -> str:
    lines = [
        "# creditmeter PostgreSQL benchmark",
        "",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- CPUs (nproc): {os.cpu_count()}; CPU: {cpu_name()}",
        f"- OS: {platform.system()} {platform.release()} ({platform.machine()})",
        (
            f"- Python {platform.python_version()}; PostgreSQL {env['server_version']} on the same "
            f"host (127.0.0.1), fsync={env['fsync']}, wal_sync_method={env['wal_sync_method']}, "
            f"synchronous_commit={env['synchronous_commit']} (server default)"
        ),
        (
            f"- Packages: creditmeter {creditmeter.__version__}, "
            f"psycopg {metadata.version('psycopg')}, "
            f"psycopg-binary {metadata.version('psycopg-binary')}, "
            f"psycopg-pool {metadata.version('psycopg-pool')}"
        ),
        f"- creditmeter source at commit {env['commit']} (plus the working tree)",
        (
            f"- Command: `{command}` ({seconds:.0f} s); 1-minute load average at start {load:.2f}, "
            f"at the end {env['load_end']}; CPU steal during the run (from /proc/stat): "
            f"{env['steal']}"
        ),
        (
            "- Timer: `time.perf_counter_ns`; µs/op is the median over batches "
            "(each batch's time / its ops); ops/s = 1e6 / median µs/op."
        ),
        "",
        "## 1. One process: charge against the raw floor",
        "",
        (
            "- **floor**: one psycopg connection (autocommit) executing the store's own commit "
            "statement (compare-and-set `UPDATE` + ledger `INSERT` + the current row if lost, "
            "one round trip) by hand, with pre-formatted rows as long as the store's.\n"
            "- **commit**: `PostgresStore.commit` alone: the charge rule (`rules.charge`) applied "
            "by hand to the last account, then `store.commit(...)` (serialization, a pooled "
            "connection, the same statement).\n"
            "- **manager**: `BalanceManager(PostgresStore(dsn)).charge('user-1', 1)`, the whole "
            "public call (validation, the per-user lock, the rule, the commit).\n\n"
            f"Each series on tables of its own; {sizes.single_batches} rounds, each running one "
            f"batch of {sizes.single_ops:,} charges of every series (the order rotated each "
            "round). µs/op: median over the batches; CPU: this process's CPU time per op "
            "(`time.process_time_ns`), median over the batches; x floor: the median of the "
            "per-round ratios (min-max)."
        ),
        "",
        (
            "| synchronous_commit | series | µs/op | charges/s | CPU µs/op | x floor "
            "| x floor per round (min-max) |"
        ),
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for single in singles:
        for series in SERIES:
            wall = single.median(series)
            cpu = statistics.median(single.cpu[series])
            ratios = single.ratios(series)
            lines.append(
                f"| {single.label} | {series} | {wall:.1f} | {1e6 / wall:,.0f} | {cpu:.1f} | "
                f"{statistics.median(ratios):.2f} | {min(ratios):.2f}-{max(ratios):.2f} |"
            )
    lost = sum(single.lost for single in singles)
    ok = all(single.entries_ok for single in singles)
    lines += [
        "",
        f"Lost updates: {lost}; every ledger holds one entry per charge: {'yes' if ok else 'NO'}.",
    ]
    lines += [
        "",
        f"## 2. {sizes.procs} processes charging one user",
        "",
        (
            f"{sizes.procs} processes (multiprocessing, spawn) behind a barrier, each doing "
            f"{sizes.proc_ops:,} charges of 1 (stopping early only past "
            f"{sizes.deadline_s:.0f} s); {sizes.proc_runs} run(s) of each variant, each on fresh "
            "tables; synchronous_commit as the server has it. Latency is per charge, retries "
            "included; ops/s = all charges / the slowest process's wall time."
        ),
        "",
    ]
    for kind, text in KINDS.items():
        lines.append(f"- **{kind}**: {text}.")
    lines += [
        "",
        (
            "| variant | run | charges | wall s | charges/s | p50 ms (median of processes) "
            "| worst p99 ms | worst max ms | fewest by a process | commits | lost CAS | "
            "exclusive / locked | lost updates | ledger = charges |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for number, run in enumerate(runs):
        lines.append(
            f"| {run.kind} | {number // len(KINDS) + 1} | {run.total:,} | {run.wall:.2f} | "
            f"{run.ops_per_s:,.0f} | {run.p50:.2f} | {run.p99:.2f} | {run.worst_max:.1f} | "
            f"{run.fewest:,} | {run.commits:,} | {run.conflicts:,} | {run.exclusives:,} | "
            f"{run.lost} | {'yes' if run.entries_ok else 'NO'} |"
        )
    by_kind = {kind: [r for r in runs if r.kind == kind] for kind in KINDS}
    median_rate = {
        kind: statistics.median(r.ops_per_s for r in chosen) for kind, chosen in by_kind.items()
    }
    lines += [
        "",
        "Median charges/s over runs: "
        + "; ".join(f"{kind} {rate:,.0f}" for kind, rate in median_rate.items())
        + ".",
        "",
        "## Targets",
        "",
    ]
    for single in singles:
        for series in ("manager", "commit"):
            ratio = statistics.median(single.ratios(series))
            verdict = "met" if ratio <= 1.5 else "NOT met"
            lines.append(
                f"- One process, synchronous_commit {single.label}, {series}: {ratio:.2f}x the "
                f"floor (target <= 1.5x): {verdict}."
            )
    for kind in ("raw-lock", "raw-cas"):
        ratio = median_rate[kind] / median_rate["store"]
        verdict = "met" if ratio <= 1.5 else "NOT met"
        lines.append(
            f"- {sizes.procs} processes, against {kind}: the floor's throughput is {ratio:.2f}x "
            f"the store's (target <= 1.5x): {verdict}."
        )
    lost = sum(p.lost for p in singles) + sum(r.lost for r in runs)
    entries = all(p.entries_ok for p in singles) and all(r.entries_ok for r in runs)
    lines.append(
        f"- Lost updates: {lost} (target 0); every ledger holds one entry per acknowledged "
        f"charge: {'yes' if entries else 'NO'}."
    )
    lines += ["", "## Reading the numbers", ""]
    for single in singles:
        cpu = {series: statistics.median(single.cpu[series]) for series in SERIES}
        lines.append(
            f"- synchronous_commit {single.label}: per charge, `PostgresStore.commit` (with the "
            f"rule) used {cpu['commit'] - cpu['floor']:.0f} µs more CPU than the raw statement "
            f"(pool check-out and check-in, the idle-connection check, serialization, the "
            f"rule), and the manager {cpu['manager'] - cpu['commit']:.0f} µs more on top."
        )
    lines.append(
        "- 4 processes: **raw-lock** is the store's own protocol for a hot user without the "
        "manager; **raw-cas** takes no lock and retries at once: its throughput is of the same "
        "order, but a charge may lose many times in a row (see its p99, max and lost CAS)."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (under a minute)")
    parser.add_argument("--dsn", default=DEFAULT_DSN, help="the PostgreSQL server to measure")
    parser.add_argument("--output", default=None, help="where to write the report")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    output = args.output or (None if args.quick else "benchmarks/RESULTS-postgres.md")
    command = "python benchmarks/bench_postgres.py" + (" --quick" if args.quick else "")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    began = time.monotonic()
    env = environment(args.dsn)
    steal = Steal()
    singles = [
        single_process(args.dsn, "on", sizes),
        single_process(with_options(args.dsn, "-c synchronous_commit=off"), "off", sizes),
    ]
    for single in singles:
        medians = ", ".join(f"{series} {single.median(series):.1f}" for series in SERIES)
        print(f"one process, synchronous_commit {single.label}: {medians} µs/op", flush=True)
    runs = []
    for _ in range(sizes.proc_runs):
        for kind in KINDS:
            run = many_processes(args.dsn, kind, sizes)
            print(f"{kind}: {run.ops_per_s:,.0f} charges/s, lost {run.lost}", flush=True)
            runs.append(run)
    env["steal"] = f"{steal.percent():.1f}%"
    env["load_end"] = f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "?"
    report = render(singles, runs, sizes, env, command, time.monotonic() - began, load)
    print(report)
    if output:
        Path(output).write_text(report, encoding="utf-8")
        print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
