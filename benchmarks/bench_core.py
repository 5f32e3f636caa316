"""Core speed and contention benchmark for creditmeter (issue 2, "Benchmark").

Measures, in one run on this machine:

1. ``BalanceManager.charge(user, 1)`` on a ``MemoryStore`` against its floor (a
   dict update under a ``threading.Lock``), with PyrateLimiter's in-memory
   ``try_acquire`` side by side.
2. ``BalanceManager.charge(user, 1)`` on a ``SQLiteStore`` (durability "full"
   and "normal") against a raw-SQLite floor: same schema, same pragmas, one
   ``BEGIN IMMEDIATE``; ``UPDATE ... WHERE version = ?``; ledger ``INSERT``;
   ``COMMIT``, by hand on a separate file.
3. Four processes charging one user of one SQLite file: the store (flock
   writer queue), and raw SQLite relying only on ``busy_timeout``, and raw
   SQLite behind the same kind of flock queue.

Usage::

    python benchmarks/bench_core.py [--quick] [--output benchmarks/RESULTS-core.md]

A full run writes ``benchmarks/RESULTS-core.md`` unless ``--output`` says otherwise;
``--quick`` writes only when ``--output`` is given. ``--profile`` adds cProfile
listings of the two single-process charges.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import io
import json
import math
import multiprocessing
import os
import platform
import pstats
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows
    fcntl = None  # type: ignore[assignment]

import common
from common import cpu_model, percentile, source_state

from creditmeter import BalanceConfig, BalanceManager, MemoryStore, SQLiteStore, VersionConflict

try:
    from pyrate_limiter import Duration, Limiter, Rate
except ImportError:  # reported as "not installed"
    Limiter = None  # type: ignore[assignment,misc]

now_ns = time.perf_counter_ns
PACKAGES = ["creditmeter", "attrs", "cattrs", "tenacity", "pyrate-limiter"]
USER = "user-1"
# Balances never clamp: every charge moves exactly one credit.
CONFIG = BalanceConfig(enabled=True, start_balance=1_000_000, allow_negative_balance=True)
BUSY_TIMEOUT_S = 30.0  # SQLiteStore's default
UPDATE_SQL = (
    "UPDATE creditmeter_accounts SET version = ?, data = ? WHERE user_id = ? AND version = ?"
)
INSERT_SQL = "INSERT INTO creditmeter_ledger (user_id, request_id, data) VALUES (?, ?, ?)"
SELECT_SQL = "SELECT version, data FROM creditmeter_accounts WHERE user_id = ?"
ACCOUNT_SQL = "INSERT INTO creditmeter_accounts (user_id, version, data) VALUES (?, ?, ?)"
# Raw rows shaped like the JSON documents SQLiteStore writes (same fields, same lengths).
STAMP = "2026-01-01T00:00:00.000000+00:00"
ACCOUNT_TEXT = (
    '{{"user_id":"{user}","balance":"{balance}","version":{version},'
    f'"created_at":"{STAMP}","updated_at":"{STAMP}","last_refill":"{STAMP}","schema":1}}}}'
)
ENTRY_TEXT = (
    '{{"id":"0123456789abcdef-{seq:x}","user_id":"{user}","kind":"charge","amount":"-1",'
    f'"balance_after":"{{balance}}","at":"{STAMP}","cost":"1","schema":1}}}}'
)


@dataclass(frozen=True)
class Sizes:
    """How much work each section does."""

    mem_ops: int
    mem_repeats: int
    sql_full_ops: int
    sql_normal_ops: int
    sql_repeats: int
    procs: int
    proc_ops: int
    proc_runs: int
    deadline_s: float


QUICK = Sizes(
    mem_ops=20_000,
    mem_repeats=5,
    sql_full_ops=300,
    sql_normal_ops=600,
    sql_repeats=5,
    procs=4,
    proc_ops=200,
    proc_runs=1,
    deadline_s=12.0,
)
FULL = Sizes(
    mem_ops=100_000,
    mem_repeats=7,
    sql_full_ops=2_000,
    sql_normal_ops=4_000,
    sql_repeats=7,
    procs=4,
    proc_ops=2_000,
    proc_runs=3,
    deadline_s=60.0,
)


# --- helpers -------------------------------------------------------------------


@dataclass
class Series:
    """µs/op of repeated batches."""

    name: str
    per_op_us: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.per_op_us)

    @property
    def ops_per_s(self) -> float:
        return 1e6 / self.median


def timed_batch(fn, ops: int, *, gc_off: bool = False) -> float:
    """Run ``fn`` ``ops`` times; return µs per call."""
    if gc_off:
        gc.disable()
    try:
        start = now_ns()
        for _ in range(ops):
            fn()
        elapsed = now_ns() - start
    finally:
        if gc_off:
            gc.enable()
    return elapsed / ops / 1000


class Gen2Counter:
    """Counts full (generation 2) collections while installed."""

    def __init__(self) -> None:
        self.count = 0
        self.pause_ns = 0
        self.longest_ns = 0
        self._started = 0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._started = now_ns()
        else:
            self.count += 1
            pause = now_ns() - self._started
            self.pause_ns += pause
            self.longest_ns = max(self.longest_ns, pause)

    @contextlib.contextmanager
    def installed(self):
        gc.callbacks.append(self)
        try:
            yield self
        finally:
            gc.callbacks.remove(self)


def configure(conn: sqlite3.Connection, durability: str) -> None:
    """The pragmas SQLiteStore sets on each connection (WAL is a property of the file)."""
    conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
    conn.execute(f"PRAGMA synchronous = {'FULL' if durability == 'full' else 'NORMAL'}")


def make_raw_file(path: str, balance: int) -> None:
    """A file with SQLiteStore's schema and WAL mode, and one account row written by hand."""
    SQLiteStore(path).close()  # creates the schema and switches the file to WAL
    Path(path + ".lock").unlink(missing_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        if mode != "wal":
            raise RuntimeError(f"expected a WAL file, got {mode}")
        text = ACCOUNT_TEXT.format(user=USER, balance=balance, version=1)
        conn.execute(ACCOUNT_SQL, (USER, 1, text))
    finally:
        conn.close()


def raw_charger(path: str, durability: str) -> tuple[sqlite3.Connection, Callable[[], None]]:
    """The raw-SQLite floor on a new file at ``path``: its connection and a charge of 1 by hand.

    One ``BEGIN IMMEDIATE``; compare-and-set ``UPDATE``; ledger ``INSERT``; ``COMMIT``, with
    SQLiteStore's schema and pragmas and rows as long as the store's (no per-op formatting).
    """
    make_raw_file(path, CONFIG.start_balance)
    conn = sqlite3.connect(path, isolation_level=None)
    configure(conn, durability)
    execute = conn.execute
    account_text = ACCOUNT_TEXT.format(user=USER, balance=999_000, version=1000)
    entry_text = ENTRY_TEXT.format(user=USER, balance=999_000, seq=1000)
    version = [1]

    def raw_charge() -> None:
        v = version[0]
        execute("BEGIN IMMEDIATE")
        if execute(UPDATE_SQL, (v + 1, account_text, USER, v)).rowcount != 1:
            raise RuntimeError("raw compare-and-set lost with one writer")
        execute(INSERT_SQL, (USER, None, entry_text))
        execute("COMMIT")
        version[0] = v + 1

    return conn, raw_charge


# --- section 1: MemoryStore ------------------------------------------------------


def _memory_series(
    name: str, ops: int, repeats: int, *, gc_off: bool, between=None
) -> tuple[Series, int]:
    """Charge one user of one MemoryStore in ``repeats`` batches; the ledger keeps growing.

    ``between`` (if given) runs before each batch: the floor's batches, interleaved so
    that a passing disturbance of the machine hits both.
    """
    manager = BalanceManager(MemoryStore(), CONFIG)
    manager.account(USER)
    charge = manager.charge

    def one() -> None:
        charge(USER, 1)

    for _ in range(1000):
        one()
    series = Series(name)
    for _ in range(repeats):
        if between is not None:
            between()
        series.per_op_us.append(timed_batch(one, ops, gc_off=gc_off))
        if gc_off:
            gc.collect()
    ledger_len = len(manager.ledger(USER))
    if manager.balance(USER) != CONFIG.start_balance - (1000 + ops * repeats):
        raise RuntimeError("MemoryStore balance is wrong")
    manager.close()
    return series, ledger_len


def bench_memory(sizes: Sizes) -> dict[str, object]:
    ops, repeats = sizes.mem_ops, sizes.mem_repeats

    # The floor: a bare dict update under a lock (it allocates nothing the GC tracks).
    lock = threading.Lock()
    balances = {USER: 0}

    def floor() -> None:
        with lock:
            balances[USER] = balances[USER] - 1

    dict_floor = Series("floor: dict update under threading.Lock")

    def floor_batch() -> None:
        dict_floor.per_op_us.append(timed_batch(floor, ops))

    counter = Gen2Counter()
    with counter.installed():
        mem, ledger_len = _memory_series(
            "MemoryStore charge (gc on, ledger growing)",
            ops,
            repeats,
            gc_off=False,
            between=floor_batch,
        )
    gc.collect()
    mem_nogc, _ = _memory_series(
        "MemoryStore charge (gc disabled in each batch)", ops, repeats, gc_off=True
    )
    gc.collect()

    # PyrateLimiter's in-memory bucket, the nearest peer (its bucket grows too, until leaked).
    pyrate = None
    if Limiter is not None:
        limiter = Limiter(Rate(1_000_000_000, Duration.SECOND))
        acquire = limiter.try_acquire

        def acquire_one() -> None:
            acquire(USER)

        for _ in range(1000):
            acquire_one()
        pyrate = Series(
            f"PyrateLimiter {metadata.version('pyrate-limiter')} "
            "Limiter(Rate(10**9, Duration.SECOND)).try_acquire (InMemoryBucket)"
        )
        for _ in range(repeats):
            floor_batch()
            pyrate.per_op_us.append(timed_batch(acquire_one, ops))
        del limiter, acquire, acquire_one
        gc.collect()
    return {
        "mem": mem,
        "mem_nogc": mem_nogc,
        "floor": dict_floor,
        "pyrate": pyrate,
        "gen2": counter.count,
        "gen2_pause_ms": counter.pause_ns / 1e6,
        "gen2_longest_ms": counter.longest_ns / 1e6,
        "ledger_len": ledger_len,
        "ops": ops,
        "repeats": repeats,
    }


# --- section 2: SQLiteStore vs raw SQLite -------------------------------------------


def bench_sqlite(sizes: Sizes, workdir: str, durability: str) -> dict[str, object]:
    ops = sizes.sql_full_ops if durability == "full" else sizes.sql_normal_ops
    store_path = str(Path(workdir) / f"single-{durability}.db")
    raw_path = str(Path(workdir) / f"single-{durability}-raw.db")

    manager = BalanceManager(SQLiteStore(store_path, durability=durability), CONFIG)
    manager.account(USER)
    charge = manager.charge
    for _ in range(200):
        charge(USER, 1)

    conn, raw_charge = raw_charger(raw_path, durability)
    for _ in range(200):
        raw_charge()

    store = Series(f"SQLiteStore charge, durability={durability}")
    raw = Series(f"raw SQLite floor, synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
    ratios = []
    for _ in range(sizes.sql_repeats):  # interleaved, so drift hits both alike
        s = timed_batch(lambda: charge(USER, 1), ops)
        r = timed_batch(raw_charge, ops)
        store.per_op_us.append(s)
        raw.per_op_us.append(r)
        ratios.append(s / r)
    total = 200 + ops * sizes.sql_repeats
    if manager.balance(USER) != CONFIG.start_balance - total:
        raise RuntimeError("SQLiteStore balance is wrong")
    manager.close()
    conn.close()
    return {
        "store": store,
        "raw": raw,
        "ratio": store.median / raw.median,
        "ratio_per_repeat": ratios,
        "ops": ops,
        "repeats": sizes.sql_repeats,
    }


# --- section 3: four processes on one user -----------------------------------------


def _store_worker(index, path, durability, ops, deadline_s, barrier, queue) -> None:
    try:
        store = SQLiteStore(path, durability=durability)
        manager = BalanceManager(store, CONFIG)
        counts = {"commits": 0, "conflicts": 0}
        commit = store.commit

        def counting_commit(account, entries, *, expected_version):
            counts["commits"] += 1
            try:
                commit(account, entries, expected_version=expected_version)
            except VersionConflict:
                counts["conflicts"] += 1
                raise

        store.commit = counting_commit  # type: ignore[method-assign]
        manager.account(USER)  # warm the connection; the account exists
        attempts_hist: dict[int, int] = {}
        latencies: list[int] = []
        ends: list[int] = []
        errors = 0
        barrier.wait()
        start = now_ns()
        stop_at = start + int(deadline_s * 1e9)
        for _ in range(ops):
            before = counts["commits"]
            t0 = now_ns()
            try:
                manager.charge(USER, 1)
            except Exception:
                errors += 1
                continue
            t1 = now_ns()
            latencies.append(t1 - t0)
            ends.append(t1)
            used = counts["commits"] - before
            attempts_hist[used] = attempts_hist.get(used, 0) + 1
            if t1 > stop_at:
                break
        manager.close()
        queue.put(
            {
                "index": index,
                "start": start,
                "latencies": latencies,
                "ends": ends,
                "commits": counts["commits"],
                "conflicts": counts["conflicts"],
                "attempts_hist": attempts_hist,
                "errors": errors,
                "busy_errors": 0,
            }
        )
    except BaseException as exc:
        queue.put({"index": index, "fatal": repr(exc)})
        raise


def _raw_worker(index, path, durability, ops, deadline_s, barrier, queue, use_flock) -> None:
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_S)
        configure(conn, durability)
        execute = conn.execute
        lock_fd = os.open(path + ".rawlock", os.O_RDWR | os.O_CREAT, 0o600) if use_flock else None
        execute(SELECT_SQL, (USER,)).fetchone()  # warm the connection
        latencies: list[int] = []
        ends: list[int] = []
        busy_errors = 0
        commits = 0
        seq = index << 32
        barrier.wait()
        start = now_ns()
        stop_at = start + int(deadline_s * 1e9)
        for _ in range(ops):
            t0 = now_ns()
            while True:
                if lock_fd is not None:
                    fcntl.flock(lock_fd, fcntl.LOCK_EX)
                try:
                    execute("BEGIN IMMEDIATE")  # waits only through SQLite's busy handler
                    version, data = execute(SELECT_SQL, (USER,)).fetchone()
                    balance = int(json.loads(data)["balance"]) - 1
                    text = ACCOUNT_TEXT.format(user=USER, balance=balance, version=version + 1)
                    if execute(UPDATE_SQL, (version + 1, text, USER, version)).rowcount != 1:
                        raise RuntimeError("compare-and-set lost inside BEGIN IMMEDIATE")
                    seq += 1
                    entry = ENTRY_TEXT.format(user=USER, balance=balance, seq=seq)
                    execute(INSERT_SQL, (USER, None, entry))
                    execute("COMMIT")
                    commits += 1
                    break
                except sqlite3.OperationalError:  # busy_timeout ran out
                    busy_errors += 1
                    if conn.in_transaction:
                        execute("ROLLBACK")
                finally:
                    if lock_fd is not None:
                        fcntl.flock(lock_fd, fcntl.LOCK_UN)
            t1 = now_ns()
            latencies.append(t1 - t0)
            ends.append(t1)
            if t1 > stop_at:
                break
        conn.close()
        queue.put(
            {
                "index": index,
                "start": start,
                "latencies": latencies,
                "ends": ends,
                "commits": commits,
                "conflicts": 0,
                "attempts_hist": {},
                "errors": 0,
                "busy_errors": busy_errors,
            }
        )
    except BaseException as exc:
        queue.put({"index": index, "fatal": repr(exc)})
        raise


def window_p99(result: dict[str, object], first_finish: int) -> float:
    """p99 (ms) of the charges a process started while every process was still running."""
    started = [
        lat / 1e6
        for lat, end in zip(result["latencies"], result["ends"], strict=True)
        if end - lat < first_finish
    ]
    return percentile(started, 99) if started else math.nan


def _final_store_state(path: str) -> tuple[int, int, bool]:
    """(balance, number of CHARGE entries, ledger sum == balance and balance_after chains)."""
    with SQLiteStore(path) as store:
        manager = BalanceManager(store, CONFIG)
        balance = manager.balance(USER)
        ledger = manager.ledger(USER)
    charges = sum(1 for entry in ledger if entry.kind.value == "charge")
    running = 0
    chained = True
    for entry in ledger:
        running += entry.amount
        chained = chained and entry.balance_after == running
    return int(balance), charges, chained and running == balance


def _final_raw_state(path: str) -> tuple[int, int, bool]:
    conn = sqlite3.connect(path)
    try:
        data = conn.execute(SELECT_SQL, (USER,)).fetchone()[1]
        entries = conn.execute(
            "SELECT count(*) FROM creditmeter_ledger WHERE user_id = ?", (USER,)
        ).fetchone()[0]
    finally:
        conn.close()
    return int(json.loads(data)["balance"]), entries, True


def bench_contention(
    sizes: Sizes, workdir: str, kind: str, durability: str, run: int
) -> dict[str, object]:
    """kind: "store" (SQLiteStore), "raw-busy" (busy_timeout only) or "raw-flock"."""
    path = str(Path(workdir) / f"contend-{kind}-{durability}-{run}.db")
    start_balance = CONFIG.start_balance
    if kind == "store":
        with SQLiteStore(path, durability=durability) as store:
            BalanceManager(store, CONFIG).account(USER)
    else:
        make_raw_file(path, start_balance)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(sizes.procs + 1)
    queue = ctx.Queue()
    procs = []
    for index in range(sizes.procs):
        if kind == "store":
            target, args = _store_worker, ()
        else:
            target, args = _raw_worker, (kind == "raw-flock",)
        proc = ctx.Process(
            target=target,
            args=(index, path, durability, sizes.proc_ops, sizes.deadline_s, barrier, queue, *args),
        )
        proc.start()
        procs.append(proc)
    barrier.wait(timeout=120)
    t_start = now_ns()
    results = [queue.get(timeout=sizes.deadline_s + 180) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    fatal = [r["fatal"] for r in results if "fatal" in r]
    if fatal:
        raise RuntimeError(f"a worker failed: {fatal}")
    results.sort(key=lambda r: r["index"])
    t_end = max(r["ends"][-1] for r in results if r["ends"])
    first_finish = min(r["ends"][-1] if r["ends"] else t_start for r in results)
    done = [len(r["latencies"]) for r in results]
    total = sum(done)
    if kind == "store":
        balance, entries, consistent = _final_store_state(path)
    else:
        balance, entries, consistent = _final_raw_state(path)  # no OPEN entry there
    per_proc = []
    for r in results:
        lat_ms = [x / 1e6 for x in r["latencies"]] or [math.nan]
        per_proc.append(
            {
                "done": len(r["latencies"]),
                "at_first_finish": sum(1 for end in r["ends"] if end <= first_finish),
                "window_p99": window_p99(r, first_finish),
                "p50": percentile(lat_ms, 50),
                "p99": percentile(lat_ms, 99),
                "max": max(lat_ms),
                "commits": r["commits"],
                "conflicts": r["conflicts"],
                "busy_errors": r["busy_errors"],
                "attempts_hist": r["attempts_hist"],
                "errors": r["errors"],
            }
        )
    all_ms = [x / 1e6 for r in results for x in r["latencies"]]
    hist: dict[int, int] = {}
    for p in per_proc:
        for k, v in p["attempts_hist"].items():
            hist[int(k)] = hist.get(int(k), 0) + v
    return {
        "kind": kind,
        "durability": durability,
        "run": run,
        "procs": sizes.procs,
        "ops_per_proc": sizes.proc_ops,
        "total": total,
        "wall_s": (t_end - t_start) / 1e9,
        "ops_per_s": total / ((t_end - t_start) / 1e9),
        "p50": percentile(all_ms, 50),
        "p99": percentile(all_ms, 99),
        "max": max(all_ms),
        "per_proc": per_proc,
        "commits": sum(p["commits"] for p in per_proc),
        "conflicts": sum(p["conflicts"] for p in per_proc),
        "busy_errors": sum(p["busy_errors"] for p in per_proc),
        "errors": sum(p["errors"] for p in per_proc),
        "attempts_hist": dict(sorted(hist.items())),
        "lost": (start_balance - total) - balance,
        "entries": entries,
        "consistent": consistent,
        "min_done": min(done),
        "min_at_first_finish": min(p["at_first_finish"] for p in per_proc),
    }


# --- profiling (optional) ---------------------------------------------------------


def profile_text(workdir: str, ops: int) -> str:
    out = io.StringIO()
    manager = BalanceManager(MemoryStore(), CONFIG)
    manager.account(USER)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(ops):
        manager.charge(USER, 1)
    profiler.disable()
    out.write(f"### cProfile: MemoryStore charge x {ops}\n\n```\n")
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(18)
    out.write("```\n\n")
    manager = BalanceManager(
        SQLiteStore(str(Path(workdir) / "profile.db"), durability="normal"), CONFIG
    )
    manager.account(USER)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(ops // 10):
        manager.charge(USER, 1)
    profiler.disable()
    manager.close()
    out.write(f"### cProfile: SQLiteStore(durability='normal') charge x {ops // 10}\n\n```\n")
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(22)
    out.write("```\n")
    return out.getvalue()


# --- report ---------------------------------------------------------------------------


def machine_lines(workdir: str) -> list[str]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return [
        f"- CPUs (nproc): {affinity}; CPU: {cpu_model()}",
        f"- OS: {platform.system()} {platform.release()} ({platform.machine()})",
        (
            f"- Python {platform.python_version()} ({platform.python_implementation()}), "
            f"SQLite {sqlite3.sqlite_version}"
        ),
        f"- Packages: {common.versions(PACKAGES)}",
        f"- creditmeter source: {source_state()}",
        f"- SQLite files in: {workdir}",
    ]


def cpu_times() -> tuple[int, int] | None:
    """(steal, total) jiffies from /proc/stat, or None where there is none."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    values = [int(x) for x in fields]
    steal = values[7] if len(values) > 7 else 0
    return steal, sum(values[:8])


def met(ok: bool) -> str:
    return "met" if ok else "not met"


def fmt(x: float, digits: int = 2) -> str:
    return f"{x:,.{digits}f}"


def render(results: dict[str, object], args: argparse.Namespace, command: str) -> str:
    sizes: Sizes = results["sizes"]
    mem = results["memory"]
    lines = [
        "# creditmeter core benchmark",
        "",
        f"- Date: {results['date']}",
        *machine_lines(results["workdir"]),
        (
            f"- Command: `{command}` ({'quick' if args.quick else 'full'} run, "
            f"{results['elapsed_s']:.0f} s)"
        ),
        (
            f"- 1-minute load average at start: {fmt(results['load'])}; CPU steal during the "
            f"run (from /proc/stat): {fmt(results['steal_pct'], 1)}%"
        ),
        (
            "- Timer: `time.perf_counter_ns`; µs/op is the median over repeated batches "
            "(each batch's total time / its op count); ops/s = 1e6 / median µs/op."
        ),
        "",
        "## 1. In-memory charge",
        "",
        (
            f"{mem['repeats']} batches of {mem['ops']:,} ops (floor batches interleaved with the "
            "GC-on MemoryStore and the PyrateLimiter batches). `BalanceManager(MemoryStore(), "
            "BalanceConfig(enabled=True, allow_negative_balance=True)).charge('user-1', 1)`; "
            "one manager for all batches, so the ledger grows "
            f"(to {mem['ledger_len']:,} entries); GC on."
        ),
        "",
        "| what | median µs/op | min | max | ops/s | x floor |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    floor = mem["floor"].median
    rows = [mem["floor"], mem["mem"], mem["mem_nogc"]]
    if mem["pyrate"] is not None:
        rows.append(mem["pyrate"])
    for s in rows:
        lines.append(
            f"| {s.name} | {fmt(s.median)} | {fmt(min(s.per_op_us))} | "
            f"{fmt(max(s.per_op_us))} | {fmt(s.ops_per_s, 0)} | {fmt(s.median / floor, 1)} |"
        )
    lines += [
        "",
        (
            f"Full (generation 2) collections during the GC-on MemoryStore batches: {mem['gen2']} "
            f"({fmt(mem['gen2_pause_ms'], 1)} ms in total, longest "
            f"{fmt(mem['gen2_longest_ms'], 1)} ms). The 'gc disabled in each batch' row "
            "turns GC off during each timed batch only (a collection runs between batches); "
            "it is not a production configuration."
        ),
        "",
        "## 2. SQLite charge, one process",
        "",
        (
            "Store: `BalanceManager(SQLiteStore(path, durability=...)).charge('user-1', 1)` "
            "(flock writer queue + `BEGIN IMMEDIATE` + CAS `UPDATE` + ledger `INSERT` + `COMMIT`). "
            "Floor: by hand with `sqlite3` on a separate file with the same schema (created by "
            "SQLiteStore), WAL, the same `synchronous` and `busy_timeout`: `BEGIN IMMEDIATE`; "
            "`UPDATE creditmeter_accounts SET version=?, data=? WHERE user_id=? AND version=?`; "
            "ledger `INSERT`; `COMMIT`, rows as long as the store's. Store and floor batches "
            "alternate."
        ),
        "",
        (
            "| durability | batches x ops | store µs/op | store ops/s | floor µs/op | floor ops/s "
            "| ratio (of medians) | ratio per batch (min-max) |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in ("full", "normal"):
        s = results["sqlite"][key]
        lines.append(
            f"| {key} | {s['repeats']} x {s['ops']:,} | {fmt(s['store'].median, 1)} | "
            f"{fmt(s['store'].ops_per_s, 0)} | {fmt(s['raw'].median, 1)} | "
            f"{fmt(s['raw'].ops_per_s, 0)} | {fmt(s['ratio'])} | "
            f"{fmt(min(s['ratio_per_repeat']))}-{fmt(max(s['ratio_per_repeat']))} |"
        )
    lines += [
        "",
        f"## 3. {sizes.procs} processes charging one user of one SQLite file",
        "",
        (
            f"{sizes.procs} processes (multiprocessing, spawn), started together behind a barrier, "
            f"each doing {sizes.proc_ops:,} charges of 1 (stopping early only past a "
            f"{sizes.deadline_s:.0f} s deadline); {sizes.proc_runs} run(s) of each variant, each "
            "on a fresh file. Latency is per charge, retries included."
        ),
        "",
        (
            "- **store**: each process runs `BalanceManager(SQLiteStore(path, durability))`; "
            "commits are counted by wrapping `store.commit`, conflicts = `VersionConflict` raised "
            "by it."
        ),
        (
            "- **raw, busy_timeout only**: `BEGIN IMMEDIATE` (waiting only in SQLite's busy "
            f"handler, busy_timeout {BUSY_TIMEOUT_S:.0f} s); `SELECT version, data`; CAS "
            "`UPDATE`; ledger `INSERT`; `COMMIT`."
        ),
        "- **raw + flock**: the same, behind a blocking `fcntl.flock` on a lock file.",
        "",
        (
            "Summary over runs (p99: the highest per-process p99, over each whole run or over the "
            "charges started while all processes ran):"
        ),
        "",
        (
            "| variant | durability | runs | ops/s median (min-max) | worst p99 ms | worst max ms "
            "| fewest ops by a process while all ran | lost updates |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {
        "store": "SQLiteStore",
        "raw-busy": "raw, busy_timeout only",
        "raw-flock": "raw + flock",
    }
    for (kind, durability), runs in grouped(results["contention"]).items():
        rates = [c["ops_per_s"] for c in runs]
        lines.append(
            f"| {labels[kind]} | {durability} | {len(runs)} | {fmt(statistics.median(rates), 0)} "
            f"({fmt(min(rates), 0)}-{fmt(max(rates), 0)}) | {fmt(worst_p99(runs))} | "
            f"{fmt(max(c['max'] for c in runs), 1)} | "
            f"{min(c['min_at_first_finish'] for c in runs)} | {sum(c['lost'] for c in runs)} |"
        )
    lines += [
        "",
        "Each run:",
        "",
        (
            "| variant | durability | run | total ops | wall s | ops/s | p50 ms | p99 ms | max ms "
            "| commits | conflicts | busy errors | lost updates | ledger entries = charges |"
        ),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in results["contention"]:
        lines.append(
            f"| {labels[c['kind']]} | {c['durability']} | {c['run']} | {c['total']:,} | "
            f"{fmt(c['wall_s'])} | "
            f"{fmt(c['ops_per_s'], 0)} | {fmt(c['p50'])} | {fmt(c['p99'])} | "
            f"{fmt(c['max'], 1)} | {c['commits']:,} | "
            f"{c['conflicts']:,} | {c['busy_errors']:,} | {c['lost']} | "
            f"{c['entries']:,} = {c['total']:,}: {'yes' if c['entries'] == c['total'] else 'NO'} |"
        )
    lines += [
        "",
        (
            "Per process: ops done / ops done by the time the first process finished / "
            "p50 ms / p99 ms / max ms / p99 ms of the charges started before the first process "
            "finished (while all contended):"
        ),
        "",
        "| variant | durability | run | "
        + " | ".join(f"process {i}" for i in range(sizes.procs))
        + " |",
        "|---|---|---:|" + "---|" * sizes.procs,
    ]
    for c in results["contention"]:
        cells = [
            f"{p['done']} / {p['at_first_finish']} / {fmt(p['p50'])} / {fmt(p['p99'])} / "
            f"{fmt(p['max'], 1)} / {fmt(p['window_p99'])}"
            for p in c["per_proc"]
        ]
        lines.append(
            f"| {labels[c['kind']]} | {c['durability']} | {c['run']} | " + " | ".join(cells) + " |"
        )
    lines += ["", "Commits per store charge (1 = no conflict):", ""]
    for c in results["contention"]:
        if c["kind"] == "store":
            hist = ", ".join(f"{k}: {v:,}" for k, v in c["attempts_hist"].items())
            lines.append(
                f"- {c['durability']}, run {c['run']}: {hist} (conflicts per charge "
                f"{c['conflicts'] / max(c['total'], 1):.2f}; ledger sum = balance and "
                f"balance_after chains: {'yes' if c['consistent'] else 'NO'})"
            )
    lines += ["", "## Targets (issue 2)", "", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in targets(results)]
    if results.get("profile"):
        lines += ["", "## Profiles (cProfile adds its own overhead)", "", results["profile"]]
    return "\n".join(lines) + "\n"


def grouped(runs: list[dict[str, object]]) -> dict[tuple[str, str], list[dict[str, object]]]:
    out: dict[tuple[str, str], list[dict[str, object]]] = {}
    for c in runs:
        out.setdefault((c["kind"], c["durability"]), []).append(c)
    return out


def worst_p99(runs: list[dict[str, object]]) -> float:
    """The highest per-process p99, over the whole run or the charges started while all ran."""
    return max(
        max(p["p99"], p["window_p99"]) if not math.isnan(p["window_p99"]) else p["p99"]
        for c in runs
        for p in c["per_proc"]
    )


def targets(results: dict[str, object]) -> list[tuple[str, str, str]]:
    mem = results["memory"]["mem"].median
    out = [("MemoryStore charge ≤ 5 µs median", f"{fmt(mem)} µs (GC on)", met(mem <= 5.0))]
    for key in ("full", "normal"):
        ratio = results["sqlite"][key]["ratio"]
        out.append(
            (
                f"SQLiteStore charge within 1.5x of raw floor (durability={key})",
                f"{fmt(ratio)}x",
                met(ratio <= 1.5),
            )
        )
    for (kind, durability), runs in grouped(results["contention"]).items():
        if kind != "store":
            continue
        worst = worst_p99(runs)
        fewest = min(c["min_at_first_finish"] for c in runs)
        finished = all(c["min_done"] == c["ops_per_proc"] for c in runs)
        procs = runs[0]["procs"]
        out.append(
            (
                (
                    f"p99 ≤ 50 ms under {procs}-process contention, every process progressing "
                    f"(durability={durability})"
                ),
                (
                    f"worst per-process p99 over {len(runs)} run(s) (whole run or while all ran) "
                    f"{fmt(worst)} ms; fewest ops by a process while all ran {fewest}; every "
                    f"process finished all {runs[0]['ops_per_proc']:,}: "
                    f"{'yes' if finished else 'no'}"
                ),
                met(worst <= 50.0 and fewest > 0 and finished),
            )
        )
        lost = sum(c["lost"] for c in runs)
        mismatched = sum(1 for c in runs if c["entries"] != c["total"] or not c["consistent"])
        out.append(
            (
                f"0 lost updates (durability={durability})",
                (
                    f"{lost} lost over {len(runs)} run(s); runs whose ledger count or sum "
                    f"disagreed: {mismatched}"
                ),
                met(lost == 0 and mismatched == 0),
            )
        )
    return out


# --- main ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (under a minute)")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="write the report here (default for a full run: benchmarks/RESULTS-core.md)",
    )
    parser.add_argument("--dir", default=None, help="folder for the SQLite files (default: temp)")
    parser.add_argument("--profile", action="store_true", help="append cProfile listings")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    output = args.output
    if output is None and not args.quick:
        output = Path(__file__).resolve().parent / "RESULTS-core.md"
    command = "python benchmarks/bench_core.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    started = time.monotonic()
    cpu_before = cpu_times()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    workdir = tempfile.mkdtemp(prefix="creditmeter-bench-", dir=args.dir)
    results: dict[str, object] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "sizes": sizes,
        "workdir": str(Path(workdir).parent),
    }
    try:
        print("1/3 MemoryStore ...", flush=True)
        results["memory"] = bench_memory(sizes)
        print("2/3 SQLite single process ...", flush=True)
        results["sqlite"] = {d: bench_sqlite(sizes, workdir, d) for d in ("full", "normal")}
        print("3/3 4-process contention ...", flush=True)
        contention = []
        for durability in ("full", "normal"):
            for kind in ("store", "raw-busy", "raw-flock"):
                for run in range(1, sizes.proc_runs + 1):
                    print(f"    {kind} {durability} run {run}", flush=True)
                    contention.append(bench_contention(sizes, workdir, kind, durability, run))
        results["contention"] = contention
        if args.profile:
            results["profile"] = profile_text(workdir, 20_000 if args.quick else 100_000)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["elapsed_s"] = time.monotonic() - started
    cpu_after = cpu_times()
    results["load"] = load_before
    results["steal_pct"] = math.nan
    if cpu_before is not None and cpu_after is not None and cpu_after[1] > cpu_before[1]:
        steal = cpu_after[0] - cpu_before[0]
        results["steal_pct"] = 100 * steal / (cpu_after[1] - cpu_before[1])
    report = render(results, args, command)
    print()
    print(report)
    if output is not None:
        output.write_text(report, encoding="utf-8")
        print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
