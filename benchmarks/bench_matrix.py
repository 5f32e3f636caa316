"""Every store, four operations, beside its raw floor; then 1, 4 and 8 writers (issue 9).

Stores: MemoryStore, SQLiteStore (durability full and normal), RedisStore and
PostgresStore. Two parts, one run:

1. One process. Per store, interleaved batches of: the raw floor (a dict update
   under a ``threading.Lock``; a raw SQLite transaction with the store's schema
   and pragmas, from ``bench_core``; the store's Lua commit script by hand, from
   ``bench_redis``; the store's commit statement by hand, from
   ``bench_postgres``), ``charge(user, 1)``, ``charge(user, model=..., usage=...)``,
   ``hold(user, 10)`` + ``settle(hold, 7)`` and a ``metered`` call returning a
   real openai ``ChatCompletion``. µs/op is the median over the batches.
2. Throughput. 1, 4 and 8 writers charging 1 credit for a fixed time, on one hot
   user and on a user of their own each: spawned processes for every store that
   processes can share, threads for MemoryStore (which lives in one process).
   ops/s, p50 and p99 latency, and after each run the store's balances and
   ledgers against the acknowledged charges (lost updates).

``run(quick=..., workdir=...)`` returns a ``common.Section`` for ``run.py``;
``python benchmarks/bench_matrix.py [--quick] [--dir DIR] [--output PATH]`` runs
it alone and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import queue
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bench_core
import bench_postgres
import bench_redis
import common
import psycopg
import redis
from common import Section, Target, fmt, percentile, table

from creditmeter import (
    BalanceConfig,
    BalanceManager,
    CreditMeterError,
    EntryKind,
    MemoryStore,
    SQLiteStore,
    TokenUsage,
)
from creditmeter.stores.base import BalanceStore
from creditmeter.stores.postgres import PostgresStore
from creditmeter.stores.redis import RedisStore

START = 10**12
# Balances never clamp: every charge moves exactly what it costs.
CONFIG = BalanceConfig(enabled=True, start_balance=START, allow_negative_balance=True)
MODEL = "gpt-4o"
USAGE = TokenUsage(input=1000, output=200, cache_read=500)
PROCESSES = (1, 4, 8)
MODES = {"hot": "one hot user", "distinct": "a user per writer"}
STORES = ("memory", "sqlite-full", "sqlite-normal", "redis", "postgres")
OPERATIONS = ("floor", "charge", "charge with usage", "hold + settle", "decorated call")
CALIBRATION_CALLS = 20
FLOOR_RATIO_TARGET = 1.5


@dataclass(frozen=True)
class Sizes:
    """How long each part runs."""

    round_s: float  # one round of the single-process batches, every operation together
    repeats: int  # rounds per store
    duration_s: float  # each throughput run


QUICK = Sizes(round_s=0.08, repeats=5, duration_s=0.3)
FULL = Sizes(round_s=0.6, repeats=11, duration_s=2.0)


# --- the stores ----------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    """Where one store lives: enough to open it again, in this process or another."""

    name: str
    path: str = ""  # the SQLite file
    prefix: str = ""  # the Redis key prefix or the PostgreSQL table prefix

    @property
    def shared(self) -> bool:
        """Whether processes can share it (everything but MemoryStore)."""
        return self.name != "memory"

    def open(self, *, create: bool = False) -> BalanceStore:
        """A new store over this backend's data (``create`` makes PostgreSQL's tables)."""
        if self.name == "memory":
            return MemoryStore()
        if self.name.startswith("sqlite"):
            return SQLiteStore(self.path, durability=self.name.removeprefix("sqlite-"))
        if self.name == "redis":
            return RedisStore(common.REDIS_URL, prefix=self.prefix)
        return PostgresStore(common.POSTGRES_URL, prefix=self.prefix, create_schema=create)


def server_line(name: str) -> str:
    """The server a store talks to, with the settings that decide its speed; raises if down."""
    if name == "redis":
        with redis.Redis.from_url(common.REDIS_URL, socket_timeout=5) as client:
            info = client.info("server")
            aof = client.config_get("appendfsync").get("appendfsync", "?")
            persistence = client.config_get("appendonly").get("appendonly", "?")
        return (
            f"Redis {info['redis_version']} at {common.REDIS_URL} "
            f"(appendonly {persistence}, appendfsync {aof})"
        )
    if name == "postgres":
        with psycopg.connect(common.POSTGRES_URL, autocommit=True, connect_timeout=5) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
            sync = conn.execute("SHOW synchronous_commit").fetchone()[0]
        return f"PostgreSQL {version} at {common.POSTGRES_URL} (synchronous_commit {sync})"
    return ""


def prepare(name: str, workdir: Path, stack: contextlib.ExitStack) -> Backend:
    """A fresh backend for ``name``, whose data ``stack`` deletes at the end."""
    if name.startswith("sqlite"):
        return Backend(name, path=str(workdir / f"matrix-{name}.db"))
    if name == "redis":
        prefix = f"cmbench:{uuid.uuid4().hex[:10]}:"
        stack.callback(bench_redis.drop_keys, common.REDIS_URL, prefix)
        return Backend(name, prefix=prefix)
    if name == "postgres":
        prefix = bench_postgres.fresh_prefix()
        stack.callback(bench_postgres.drop, common.POSTGRES_URL, prefix)
        Backend(name, prefix=prefix).open(create=True).close()
        return Backend(name, prefix=prefix)
    return Backend(name)


def memory_floor() -> Callable[[], object]:
    """A dict update under a ``threading.Lock``: a MemoryStore commit with nothing else."""
    lock = threading.Lock()
    balances = {"user": 0}

    def floor() -> None:
        with lock:
            balances["user"] -= 1

    return floor


def raw_floor(name: str, workdir: Path, stack: contextlib.ExitStack) -> Callable[[], object]:
    """A charge of 1 done by hand the way the store does it, on data of its own."""
    if name.startswith("sqlite"):
        durability = name.removeprefix("sqlite-")
        conn, charge = bench_core.raw_charger(str(workdir / f"floor-{name}.db"), durability)
        stack.callback(conn.close)
        return charge
    if name == "redis":
        prefix = f"cmbench:{uuid.uuid4().hex[:10]}:"
        stack.callback(bench_redis.drop_keys, common.REDIS_URL, prefix)
        with RedisStore(common.REDIS_URL, prefix=prefix) as seeding:
            BalanceManager(seeding, bench_redis.CONFIG).account(bench_redis.USER)
        client = redis.Redis.from_url(common.REDIS_URL)
        stack.callback(client.close)
        return bench_redis.RawCharger(client, prefix, "floor").charge_cas
    if name == "postgres":
        prefix = bench_postgres.fresh_prefix()
        stack.callback(bench_postgres.drop, common.POSTGRES_URL, prefix)
        bench_postgres.seed(common.POSTGRES_URL, prefix)
        committer = bench_postgres.RawCommitter(common.POSTGRES_URL, prefix)
        stack.callback(committer.close)

        def floor() -> None:
            if not committer.attempt():
                raise RuntimeError("the raw PostgreSQL floor lost a compare-and-set alone")

        return floor
    return memory_floor()


# --- 1. one process --------------------------------------------------------------------


@dataclass
class Single:
    """One store's single-process figures."""

    name: str
    series: dict[str, common.Series]
    ops: int
    charged_once: bool

    def ratio(self, operation: str) -> float:
        """The operation's median µs/op over the floor's."""
        return self.series[operation].median / self.series["floor"].median


def operations(manager: BalanceManager, response: object) -> dict[str, Callable[[], object]]:
    """The four timed operations, each on a user of its own (``floor`` is added by the caller)."""
    users = {operation: f"one-{number}" for number, operation in enumerate(OPERATIONS)}
    for operation in OPERATIONS[1:]:
        manager.account(users[operation])

    @manager.metered(user="user_id", model="model")
    def call(prompt: str, *, user_id: str, model: str) -> object:
        del prompt, user_id, model  # a stand-in for the model call
        return response

    def hold_settle() -> None:
        manager.settle(manager.hold(users["hold + settle"], 10), 7)

    charge = manager.charge
    return {
        "charge": lambda: charge(users["charge"], 1),
        "charge with usage": lambda: charge(users["charge with usage"], model=MODEL, usage=USAGE),
        "hold + settle": hold_settle,
        "decorated call": lambda: call("Say hello.", user_id=users["decorated call"], model=MODEL),
    }


def charged_once(store: BalanceStore, calls: int) -> bool:
    """Whether each operation's user was charged exactly ``calls`` times, its ledger summing up."""
    for number, _ in enumerate(OPERATIONS[1:], start=1):
        account = store.load(f"one-{number}")
        ledger = store.ledger(f"one-{number}")
        charges = sum(1 for entry in ledger if entry.kind is EntryKind.CHARGE)
        if account is None or charges != calls or sum(e.amount for e in ledger) != account.balance:
            return False
    return True


def single_process(backend: Backend, workdir: Path, sizes: Sizes, response: object) -> Single:
    """Time the floor and the four operations of one store, in interleaved rounds."""
    with contextlib.ExitStack() as stack:
        floor = raw_floor(backend.name, workdir, stack)
        store = stack.enter_context(backend.open())
        manager = BalanceManager(store, CONFIG)
        series = {"floor": floor, **operations(manager, response)}
        estimate = 0.0
        for call in series.values():
            estimate += common.timed_batch(call, CALIBRATION_CALLS)
        ops = max(10, int(sizes.round_s * 1e6 / estimate))
        timed = common.interleaved(series, ops=ops, repeats=sizes.repeats)
        calls = CALIBRATION_CALLS + max(1, ops // 10) + ops * sizes.repeats
        return Single(backend.name, timed, ops, charged_once(store, calls))


# --- 2. throughput ------------------------------------------------------------------------


def charge_loop(manager: BalanceManager, user: str, duration_s: float) -> dict[str, Any]:
    """Charge ``user`` 1 credit again and again for ``duration_s``; count and time each charge."""
    latencies: list[int] = []
    failed = 0
    error = ""
    charge = manager.charge
    now = common.now_ns
    started = now()
    stop = started + int(duration_s * 1e9)
    before = started
    while before < stop:
        try:
            charge(user, 1)
        except CreditMeterError as exc:
            failed += 1
            error = f"{type(exc).__name__}: {exc}"
        after = now()
        latencies.append(after - before)
        before = after
    return {
        "done": len(latencies) - failed,
        "failed": failed,
        "error": error,
        "latencies": latencies,
        "wall_ns": before - started,
    }


def _serve(index: int, tasks: Any, results: Any, barriers: dict[int, Any]) -> None:
    """A worker process: run each charge task it is handed, until it is handed ``None``."""
    results.put({"index": index, "ready": True})
    while (task := tasks.get()) is not None:
        backend, users, duration_s = task
        barrier = barriers[len(users)]
        try:
            with backend.open() as store:
                manager = BalanceManager(store, CONFIG)
                manager.account(users[index])  # connect and load before the start
                barrier.wait(timeout=120)
                report = charge_loop(manager, users[index], duration_s)
        except BaseException as exc:
            barrier.abort()
            report = {"fatal": f"{type(exc).__name__}: {exc}"}
        results.put({"index": index, **report})


class Workers:
    """Spawned processes kept for the whole section; each run hands a task to the first n.

    Spawning eight interpreters costs seconds on a small machine: it is paid once,
    not once per run.
    """

    def __init__(self, count: int) -> None:
        context = multiprocessing.get_context("spawn")
        # Kept for the processes' lifetime: a semaphore the parent drops is gone for a child.
        self.barriers = {n: context.Barrier(n) for n in PROCESSES}
        self.tasks = [context.Queue() for _ in range(count)]
        self.results = context.Queue()
        self.procs = [
            context.Process(target=_serve, args=(i, self.tasks[i], self.results, self.barriers))
            for i in range(count)
        ]
        for proc in self.procs:
            proc.start()
        for _ in self.procs:  # every interpreter up, so none is starting while others run
            self.report(120)

    def run(self, backend: Backend, users: list[str], duration_s: float) -> list[dict[str, Any]]:
        """Run ``charge_loop`` in the first ``len(users)`` processes, worker i on ``users[i]``."""
        for tasks in self.tasks[: len(users)]:
            tasks.put((backend, users, duration_s))
        reports = [self.report(duration_s + 180) for _ in users]
        fatal = [report["fatal"] for report in reports if "fatal" in report]
        if fatal:
            raise RuntimeError(f"a benchmark process failed: {fatal[0]}")
        return reports

    def report(self, timeout_s: float) -> dict[str, Any]:
        """The next report of a worker; raises if a worker died or none came in time."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                return self.results.get(timeout=1.0)
            dead = [proc.exitcode for proc in self.procs if not proc.is_alive()]
            if dead:
                raise RuntimeError(f"a benchmark process died (exit codes {dead})")
        raise RuntimeError(f"no benchmark process reported within {timeout_s:.0f} s")

    def close(self) -> None:
        """Stop every process: ask first, then kill what has not stopped."""
        for tasks in self.tasks:
            tasks.put(None)
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()


def run_threads(manager: BalanceManager, users: list[str], duration_s: float) -> list[dict]:
    """Run ``charge_loop`` in ``len(users)`` threads of this process, thread i on ``users[i]``."""
    barrier = threading.Barrier(len(users))
    reports: list[dict[str, Any]] = [{} for _ in users]

    def work(index: int) -> None:
        barrier.wait()
        reports[index] = charge_loop(manager, users[index], duration_s)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(users))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return reports


@dataclass
class Run:
    """One throughput run, checked against the store afterwards."""

    store: str
    mode: str
    writers: int
    done: int
    failed: int
    ops_per_s: float
    p50_us: float
    p99_us: float
    lost: int  # acknowledged charges the balances do not show (negative: charged twice)
    ledger_ok: bool  # one CHARGE entry per acknowledged charge, every ledger summing up
    errors: list[str] = field(default_factory=list)


def check_run(
    store: BalanceStore, users: list[str], reports: list[dict[str, Any]], name: str, mode: str
) -> Run:
    """Sum the reports and hold the store's balances and ledgers against them."""
    done = sum(report["done"] for report in reports)
    applied = 0
    entries = 0
    sums_ok = True
    for user in sorted(set(users)):
        account = store.load(user)
        ledger = store.ledger(user)
        balance = account.balance if account is not None else START
        applied += int(START - balance)
        entries += sum(1 for entry in ledger if entry.kind is EntryKind.CHARGE)
        sums_ok = sums_ok and sum(entry.amount for entry in ledger) == balance
    latencies = [value for report in reports for value in report["latencies"]]
    wall_s = max(report["wall_ns"] for report in reports) / 1e9
    return Run(
        store=name,
        mode=mode,
        writers=len(reports),
        done=done,
        failed=sum(report["failed"] for report in reports),
        ops_per_s=done / wall_s,
        p50_us=percentile(latencies, 50) / 1000,
        p99_us=percentile(latencies, 99) / 1000,
        lost=done - applied,
        ledger_ok=sums_ok and entries == done,
        errors=sorted({report["error"] for report in reports if report["error"]}),
    )


def throughput(backend: Backend, workers: Workers | None, sizes: Sizes) -> list[Run]:
    """Every mode and writer count on one backend: threads for memory, processes otherwise."""
    runs = []
    for mode in MODES:
        for count in PROCESSES:
            tag = f"{mode}-{count}"
            users = [tag if mode == "hot" else f"{tag}-{i}" for i in range(count)]
            with backend.open() as store:
                manager = BalanceManager(store, CONFIG)
                for user in set(users):
                    manager.account(user)
                if workers is None:
                    reports = run_threads(manager, users, sizes.duration_s)
                else:
                    reports = workers.run(backend, users, sizes.duration_s)
                runs.append(check_run(store, users, reports, backend.name, mode))
            print(
                f"    {backend.name} {mode} x{count}: {fmt(runs[-1].ops_per_s, 0)} ops/s, "
                f"lost {runs[-1].lost}",
                file=sys.stderr,
                flush=True,
            )
    return runs


# --- the section ----------------------------------------------------------------------------


def single_markdown(singles: list[Single], sizes: Sizes) -> list[str]:
    """The single-process table and what its rows are."""
    rows = []
    for single in singles:
        floor = single.series["floor"].median
        for operation in OPERATIONS:
            timed = single.series[operation]
            rows.append(
                [
                    single.name,
                    operation,
                    fmt(timed.median, 2),
                    f"{fmt(min(timed.per_op_us), 2)}-{fmt(max(timed.per_op_us), 2)}",
                    fmt(timed.ops_per_s, 0),
                    "-" if operation == "floor" else f"{timed.median / floor:.2f}x",
                ]
            )
    calls_ok = all(single.charged_once for single in singles)
    return [
        "### One process: each operation beside the store's raw floor",
        "",
        (
            f"Per store, {sizes.repeats} rounds; each round runs one batch of every row (the "
            "order rotated each round), the batch size chosen so that a round takes about "
            f"{sizes.round_s:g} s (ops per batch: "
            + ", ".join(f"{single.name} {single.ops:,}" for single in singles)
            + "). µs/op is the median over the batches; ops/s = 1e6 / median."
        ),
        "",
        (
            "- **floor**: memory, a dict update under a `threading.Lock`; SQLite, by hand with "
            "`sqlite3` on a file of the store's schema, WAL and the same `synchronous` and "
            "`busy_timeout`: `BEGIN IMMEDIATE`, compare-and-set `UPDATE`, ledger `INSERT`, "
            "`COMMIT`; Redis, the store's Lua commit script by hand (`EVALSHA` with the store's "
            "keys and arguments of the same shape); PostgreSQL, the store's commit statement by "
            "hand on one autocommit connection. Each floor charges 1 credit with rows as long "
            "as the store's. MemoryStore's floor validates nothing, does no `Decimal` "
            "arithmetic and writes no ledger entry: its ratio is the manager's whole cost of a "
            "charge over a lock and a dict write."
        ),
        "- **charge**: `manager.charge(user, 1)`.",
        f"- **charge with usage**: `manager.charge(user, model={MODEL!r}, usage={USAGE!r})`.",
        "- **hold + settle**: `h = manager.hold(user, 10); manager.settle(h, 7)`.",
        (
            '- **decorated call**: `@manager.metered(user="user_id", model="model")` around a '
            "function returning a real openai `ChatCompletion` with usage, built once "
            f"(`bench_metering.RESPONSE`), called with `model={MODEL!r}`."
        ),
        "",
        table(["store", "operation", "µs/op", "min-max", "ops/s", "x floor"], rows),
        "",
        (
            "Afterwards every operation's user was charged exactly once per call and its ledger "
            f"sums to its balance: {'yes' if calls_ok else 'NO'}."
        ),
    ]


def throughput_markdown(runs: list[Run], sizes: Sizes) -> list[str]:
    """The throughput table and what its rows are."""
    rows = [
        [
            run.store,
            MODES[run.mode],
            "threads" if run.store == "memory" else "processes",
            str(run.writers),
            f"{run.done:,}",
            fmt(run.ops_per_s, 0),
            fmt(run.p50_us, 0),
            fmt(run.p99_us, 0),
            str(run.failed),
            str(run.lost),
            "yes" if run.ledger_ok else "NO",
        ]
        for run in runs
    ]
    lines = [
        "### Throughput with 1, 4 and 8 writers",
        "",
        (
            f"Each writer charges 1 credit in a loop for {sizes.duration_s:g} s, all started "
            "together behind a barrier, either all on one hot user or each on a user of its "
            "own. Writers are spawned processes (started once for the whole section, each "
            "opening its own store per run) for every store but MemoryStore: a MemoryStore "
            "lives in one process and cannot be shared, so its writers are threads of one "
            "process sharing one manager, and the GIL runs one at a time. ops/s = acknowledged "
            "charges / the slowest writer's time; p50 and p99 over every charge of the run "
            "(retries and waits included), in µs. After each run the store is read back: "
            "lost = acknowledged charges - credits the balances lost (0 means none lost or "
            "doubled); ledger = one `CHARGE` entry per acknowledged charge and every ledger "
            "summing to its balance. A failed charge raised (a `CreditMeterError`) and was not "
            "acknowledged."
        ),
        "",
        table(
            [
                "store",
                "users",
                "writers",
                "n",
                "charges",
                "ops/s",
                "p50 µs",
                "p99 µs",
                "failed",
                "lost",
                "ledger ok",
            ],
            rows,
        ),
    ]
    errors = sorted({f"{run.store}: {error}" for run in runs for error in run.errors})
    if errors:
        lines += ["", "Errors of failed charges (one per kind):", ""]
        lines += [f"- `{error[:200]}`" for error in errors]
    return lines


def targets(singles: list[Single], runs: list[Run], skipped: dict[str, str]) -> list[Target]:
    """Each store's charge against its floor, then lost updates over every run."""
    found = []
    for single in singles:
        ratio = single.ratio("charge")
        found.append(
            Target(
                f"{single.name}: charge within {FLOOR_RATIO_TARGET}x of its floor",
                (
                    f"{ratio:.2f}x ({fmt(single.series['charge'].median, 2)} µs vs "
                    f"{fmt(single.series['floor'].median, 2)} µs)"
                ),
                ratio <= FLOOR_RATIO_TARGET,
            )
        )
    for name, reason in skipped.items():
        found.append(Target(f"{name}: measured", f"skipped: {reason}", met=False))
    lost = sum(abs(run.lost) for run in runs)
    bad = sum(1 for run in runs if not run.ledger_ok)
    per_store = ", ".join(
        f"{name} {sum(abs(r.lost) for r in runs if r.store == name)}"
        for name in dict.fromkeys(run.store for run in runs)
    )
    found.append(
        Target(
            "0 lost updates (every throughput run)",
            f"{lost} over {len(runs)} runs ({per_store}); runs whose ledger disagreed: {bad}",
            lost == 0 and bad == 0 and all(single.charged_once for single in singles),
        )
    )
    return found


def run(*, quick: bool, workdir: Path) -> Section:
    """Measure every reachable store; return the section, its targets and the plot's data."""
    import bench_metering  # noqa: PLC0415 - openai is slow to import; the workers never need it

    sizes = QUICK if quick else FULL
    workdir.mkdir(parents=True, exist_ok=True)
    servers: list[str] = []
    skipped: dict[str, str] = {}
    names = []
    for name in STORES:
        try:
            line = server_line(name)
        except (redis.RedisError, psycopg.Error, OSError) as exc:
            skipped[name] = f"{type(exc).__name__}: {exc}".strip()
            continue
        names.append(name)
        if line:
            servers.append(f"- {line}")
    singles: list[Single] = []
    runs: list[Run] = []
    with contextlib.ExitStack() as stack:
        backends = {name: prepare(name, workdir, stack) for name in names}
        for name, backend in backends.items():
            print(f"  one process: {name}", file=sys.stderr, flush=True)
            singles.append(single_process(backend, workdir, sizes, bench_metering.RESPONSE))
        for backend in backends.values():
            if not backend.shared:
                runs += throughput(backend, None, sizes)
        if any(backend.shared for backend in backends.values()):
            workers = Workers(max(PROCESSES))
            stack.callback(workers.close)
            for backend in backends.values():
                if backend.shared:
                    runs += throughput(backend, workers, sizes)
    data = {
        "processes": list(PROCESSES),
        "throughput": {
            mode: {
                name: [r.ops_per_s for r in runs if r.store == name and r.mode == mode]
                for name in names
            }
            for mode in MODES
        },
        "modes": dict(MODES),
        "threads": ["memory"],
    }
    lines = [
        (
            f"Stores: {', '.join(names)}"
            + (f" (skipped: {', '.join(skipped)})" if skipped else "")
            + f". SQLite files in `{workdir}`; start balance {START:,} with negative balances "
            "allowed, so every charge moves its full cost."
        ),
        *servers,
        "",
        *single_markdown(singles, sizes),
        "",
        *throughput_markdown(runs, sizes),
    ]
    for name, reason in skipped.items():
        lines += ["", f"{name} was not measured: {reason}"]
    return Section(
        title="Stores: operations against their floors, and throughput with 1, 4 and 8 writers",
        markdown="\n".join(lines) + "\n",
        targets=targets(singles, runs, skipped),
        data=data,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the section alone, print it and (with ``--output``) write it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short runs (under 30 s)")
    parser.add_argument("--dir", default=None, help="folder for the SQLite files (default: temp)")
    parser.add_argument("--output", type=Path, default=None, help="write the Markdown here")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="creditmeter-matrix-", dir=args.dir))
    started = time.monotonic()
    try:
        section = run(quick=args.quick, workdir=workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = [[t.name, t.measured, common.verdict(t.met)] for t in section.targets]
    report = "\n".join(
        [
            f"# {section.title}",
            "",
            *common.machine_lines(["redis", "psycopg", "openai"]),
            f"- {'Quick' if args.quick else 'Full'} run: {time.monotonic() - started:.0f} s",
            "",
            section.markdown,
            "### Targets",
            "",
            table(["target", "measured", "verdict"], rows),
            "",
        ]
    )
    print(report)
    if args.output is not None:
        args.output.write_text(report, encoding="utf-8")
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
