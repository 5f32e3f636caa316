"""Peers: creditmeter beside LiteLLM's BudgetManager and PyrateLimiter, same run, same workload.

One user (``user-1``), one model call of ``gpt-4o-mini`` with 100 prompt and
50 completion tokens (45 credits = 0.000045 USD at both libraries' rates):

- LiteLLM ``BudgetManager(client_type="local")``:
  ``update_cost(user, completion_obj=ModelResponse)``, which prices the
  response with LiteLLM's cost map, adds it to a dict in memory and starts a
  thread that rewrites ``user_cost.json`` in the current directory.
- PyrateLimiter ``Limiter(bucket).try_acquire(user, 1)`` over an
  ``InMemoryBucket``, a ``MultiprocessBucket`` (a list in a
  ``multiprocessing.Manager`` process) and a ``SQLiteBucket`` (default, and
  with ``use_file_lock=True``), with a rate that never limits.
- creditmeter ``BalanceManager.charge(user, 1)`` and
  ``charge(user, model=..., usage=TokenUsage(...))`` on ``MemoryStore`` and on
  ``SQLiteStore`` (durability ``full`` and ``normal``).

Then four processes on one shared user for every peer that can be shared
across processes, and the lost updates of each: the persisted total against
the operations acknowledged.

Run ``benchmarks/.venv/bin/python benchmarks/bench_peers.py --quick``, or
without ``--quick`` for the full sizes; ``--output PATH`` writes the report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from importlib import metadata
from multiprocessing import forkserver
from pathlib import Path
from typing import Any

import common

from creditmeter import (
    BalanceConfig,
    BalanceManager,
    EntryKind,
    MemoryStore,
    SQLiteStore,
    TokenUsage,
)

USER = "user-1"
MODEL = "gpt-4o-mini"
INPUT_TOKENS = 100
OUTPUT_TOKENS = 50
USAGE = TokenUsage(input=INPUT_TOKENS, output=OUTPUT_TOKENS)
START_BALANCE = 10**12
# Balances never clamp: every charge moves exactly its cost.
CONFIG = BalanceConfig(enabled=True, start_balance=START_BALANCE, allow_negative_balance=True)
PYRATE_LIMIT = 10**9  # items per window: never reached, so try_acquire never refuses
PYRATE_TABLE = "bench_bucket"
PROCESSES = 4
PEER_PACKAGES = ["litellm", "pyrate-limiter", "filelock", "openai", "pydantic"]


@dataclass(frozen=True)
class Sizes:
    """How much work each part does."""

    mem_ops: int
    mem_repeats: int
    file_ops: int
    file_repeats: int
    proc_ops: int
    proc_rounds: int
    deadline_s: float


QUICK = Sizes(
    mem_ops=2_000,
    mem_repeats=5,
    file_ops=40,
    file_repeats=5,
    proc_ops=200,
    proc_rounds=1,
    deadline_s=2.0,
)
FULL = Sizes(
    mem_ops=20_000,
    mem_repeats=7,
    file_ops=400,
    file_repeats=7,
    proc_ops=700,
    proc_rounds=3,
    deadline_s=15.0,
)


# --- the peers, imported on first use ----------------------------------------------


def _import_litellm() -> Any:
    """Import litellm with its bundled cost map (no network at import)."""
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    import litellm  # noqa: PLC0415

    return litellm


def _missing_peers() -> list[str]:
    missing = []
    for name in ("litellm", "pyrate-limiter", "filelock"):
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def _response() -> Any:
    """A LiteLLM ``ModelResponse`` as a completion of the workload returns it."""
    from litellm import ModelResponse  # noqa: PLC0415

    return ModelResponse(
        model=MODEL,
        choices=[
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": "Hello there, how are you?"},
            }
        ],
        usage={
            "prompt_tokens": INPUT_TOKENS,
            "completion_tokens": OUTPUT_TOKENS,
            "total_tokens": INPUT_TOKENS + OUTPUT_TOKENS,
        },
    )


def _join_saves() -> None:
    """Wait for every BudgetManager save thread of this process (named "Thread-N (save_data)")."""
    for thread in threading.enumerate():
        if thread.name.endswith("(save_data)"):
            thread.join()


class _ThreadErrors:
    """Counts exceptions raised in threads (LiteLLM's save threads) while installed."""

    def __init__(self) -> None:
        self.count = 0
        self.sample = ""
        self._previous = threading.excepthook

    def __call__(self, args: Any) -> None:
        self.count += 1
        if not self.sample:
            self.sample = f"{args.exc_type.__name__}: {args.exc_value}"

    @contextlib.contextmanager
    def installed(self) -> Iterator[_ThreadErrors]:
        threading.excepthook = self
        try:
            yield self
        finally:
            threading.excepthook = self._previous


def _pyrate_rate() -> Any:
    from pyrate_limiter import Duration, Rate  # noqa: PLC0415

    # A day-long window: nothing leaks out of the bucket during a run, so its
    # items can be counted afterwards.
    return Rate(PYRATE_LIMIT, Duration.DAY)


def _sqlite_bucket(path: Path, *, file_lock: bool) -> Any:
    from pyrate_limiter import SQLiteBucket  # noqa: PLC0415

    return SQLiteBucket.init_from_file(
        [_pyrate_rate()],
        table=PYRATE_TABLE,
        db_path=str(path),
        create_new_table=True,
        use_file_lock=file_lock,
    )


def _bucket_rows(path: Path) -> int:
    """The items PyrateLimiter's SQLite bucket holds for the user (one row per unit of weight)."""
    conn = sqlite3.connect(path, timeout=30)
    try:
        query = f"SELECT COUNT(*) FROM {PYRATE_TABLE} WHERE name = ?"
        return int(conn.execute(query, (USER,)).fetchone()[0])
    finally:
        conn.close()


def _sqlite_modes(path: Path) -> str:
    conn = sqlite3.connect(path, timeout=30)
    try:
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    finally:
        conn.close()
    return str(mode)


@contextlib.contextmanager
def _chdir(path: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _charge_cost() -> Decimal:
    """Credits one priced charge of the workload costs (creditmeter's LibreChat rates)."""
    manager = BalanceManager(MemoryStore(), CONFIG)
    entry = manager.charge(USER, model=MODEL, usage=USAGE)
    manager.close()
    return Decimal(entry.cost)


# --- several processes ----------------------------------------------------------------


def _context() -> Any:
    """A forkserver context that has imported the peers once, so every worker starts fast.

    Spawning a process re-imports litellm (about 3 s of CPU each); a forkserver
    imports it once and forks each worker from that state.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["creditmeter", "pyrate_limiter", "filelock", "litellm"])
    return context


def _timed_loop(op: Callable[[], object], ops: int, deadline_s: float) -> dict[str, Any]:
    """Call ``op`` up to ``ops`` times (until ``deadline_s``); count acks, refusals, errors."""
    acked = refused = errors = 0
    sample = ""
    start = time.monotonic()
    stop_at = start + deadline_s
    for _ in range(ops):
        try:
            result = op()
        except Exception as exc:  # a peer's failure is a figure, not a crash
            errors += 1
            if not sample:
                sample = f"{type(exc).__name__}: {exc}"
        else:
            if result is False:
                refused += 1
            else:
                acked += 1
        if time.monotonic() > stop_at:
            break
    return {
        "start": start,
        "returned": time.monotonic(),
        "acked": acked,
        "refused": refused,
        "errors": errors,
        "error_sample": sample,
    }


def _litellm_body(barrier: Any, directory: str, ops: int, deadline_s: float) -> dict[str, Any]:
    litellm = _import_litellm()
    os.chdir(directory)
    manager = litellm.BudgetManager(project_name="bench-peers", client_type="local")
    response = _response()
    litellm.completion_cost(completion_response=response)  # warm its caches; writes nothing
    before = manager.get_current_cost(USER)
    with _ThreadErrors().installed() as thread_errors:
        barrier.wait(timeout=120)
        report = _timed_loop(
            lambda: manager.update_cost(USER, completion_obj=response), ops, deadline_s
        )
        _join_saves()
    report["end"] = time.monotonic()
    report["thread_errors"] = thread_errors.count
    report["thread_error_sample"] = thread_errors.sample
    report["seen_cost"] = manager.get_current_cost(USER) - before
    return report


def _pyrate_sqlite_body(
    barrier: Any, path: str, file_lock: bool, ops: int, deadline_s: float
) -> dict[str, Any]:
    from pyrate_limiter import Limiter  # noqa: PLC0415

    bucket = _sqlite_bucket(Path(path), file_lock=file_lock)
    limiter = Limiter(bucket)
    barrier.wait(timeout=120)
    report = _timed_loop(lambda: limiter.try_acquire(USER, 1), ops, deadline_s)
    report["end"] = report["returned"]
    return report


def _pyrate_mp_body(
    barrier: Any, items: Any, lock: Any, ops: int, deadline_s: float
) -> dict[str, Any]:
    from pyrate_limiter import Limiter, MultiprocessBucket  # noqa: PLC0415

    limiter = Limiter(MultiprocessBucket([_pyrate_rate()], items, lock))
    barrier.wait(timeout=120)
    report = _timed_loop(lambda: limiter.try_acquire(USER, 1), ops, deadline_s)
    report["end"] = report["returned"]
    return report


def _creditmeter_body(
    barrier: Any, path: str, durability: str, ops: int, deadline_s: float
) -> dict[str, Any]:
    manager = BalanceManager(SQLiteStore(path, durability=durability), CONFIG)  # type: ignore[arg-type]
    manager.account(USER)  # opens the connection; the account exists
    barrier.wait(timeout=120)
    report = _timed_loop(lambda: manager.charge(USER, model=MODEL, usage=USAGE), ops, deadline_s)
    report["end"] = report["returned"]
    manager.close()
    return report


BODIES: dict[str, Callable[..., dict[str, Any]]] = {
    "litellm": _litellm_body,
    "pyrate-sqlite": _pyrate_sqlite_body,
    "pyrate-mp": _pyrate_mp_body,
    "creditmeter": _creditmeter_body,
}


def _worker(index: int, barrier: Any, queue: Any, kind: str, *args: Any) -> None:
    """One process of a 4-process run: set up, wait at the barrier, run, report one dict."""
    try:
        report = BODIES[kind](barrier, *args)
    except BaseException as exc:
        barrier.abort()  # the others stop waiting instead of hanging
        queue.put({"index": index, "fatal": f"{type(exc).__name__}: {exc}"})
        raise
    report["index"] = index
    queue.put(report)


# --- one process -----------------------------------------------------------------------

CM_MEM = "creditmeter MemoryStore: charge(user, 1)"
CM_MEM_PRICED = "creditmeter MemoryStore: charge(user, model, usage)"
PY_MEM = "PyrateLimiter InMemoryBucket: try_acquire(user, 1)"
LL_UPDATE = "LiteLLM BudgetManager (local file): update_cost(user, completion_obj), save joined"
LL_PRICE = "LiteLLM completion_cost(response) alone (the pricing inside update_cost)"
PY_SQL = (
    "PyrateLimiter SQLiteBucket (default: rollback journal, synchronous FULL): try_acquire(user, 1)"
)
PY_SQL_LOCK = (
    "PyrateLimiter SQLiteBucket use_file_lock=True (WAL, synchronous NORMAL): try_acquire(user, 1)"
)
PY_MP = "PyrateLimiter MultiprocessBucket (Manager list + RLock): try_acquire(user, 1)"
CM_FULL = "creditmeter SQLiteStore durability=full: charge(user, 1)"
CM_FULL_PRICED = "creditmeter SQLiteStore durability=full: charge(user, model, usage)"
CM_NORMAL = "creditmeter SQLiteStore durability=normal: charge(user, 1)"
CM_NORMAL_PRICED = "creditmeter SQLiteStore durability=normal: charge(user, model, usage)"


def _calls(ops: int, repeats: int) -> int:
    """How many times ``common.interleaved`` (one warm-up round) calls each series."""
    return max(1, ops // 10) + ops * repeats


def _litellm_manager() -> Any:
    """A local BudgetManager in the current directory, with the user's budget saved."""
    litellm = _import_litellm()
    manager = litellm.BudgetManager(project_name="bench-peers", client_type="local")
    manager.create_budget(total_budget=1e9, user=USER)  # without a duration it does not save
    manager.save_data()
    return manager


def _persisted_cost(path: Path) -> float | None:
    """LiteLLM's persisted ``current_cost`` of the user, or None if the file does not parse."""
    try:
        return float(json.loads(path.read_text())[USER].get("current_cost", 0.0))
    except (OSError, ValueError, KeyError):
        return None


def bench_memory(sizes: Sizes) -> dict[str, Any]:
    from pyrate_limiter import InMemoryBucket, Limiter  # noqa: PLC0415

    plain = BalanceManager(MemoryStore(), CONFIG)
    priced = BalanceManager(MemoryStore(), CONFIG)
    plain.account(USER)
    priced.account(USER)
    bucket = InMemoryBucket([_pyrate_rate()])
    limiter = Limiter(bucket)
    series = common.interleaved(
        {
            CM_MEM: lambda: plain.charge(USER, 1),
            CM_MEM_PRICED: lambda: priced.charge(USER, model=MODEL, usage=USAGE),
            PY_MEM: lambda: limiter.try_acquire(USER, 1),
        },
        ops=sizes.mem_ops,
        repeats=sizes.mem_repeats,
    )
    calls = _calls(sizes.mem_ops, sizes.mem_repeats)
    cost = _charge_cost()
    checks = {
        CM_MEM: plain.balance(USER) == START_BALANCE - calls,
        CM_MEM_PRICED: priced.balance(USER) == START_BALANCE - calls * cost,
        PY_MEM: bucket.count() == calls,
    }
    limiter.dispose(bucket)
    plain.close()
    priced.close()
    return {"series": series, "calls": calls, "checks": checks}


def bench_files(sizes: Sizes, workdir: Path, context: Any) -> dict[str, Any]:
    litellm = _import_litellm()
    from pyrate_limiter import Limiter, MultiprocessBucket  # noqa: PLC0415

    response = _response()
    completion_cost = litellm.completion_cost
    usd = completion_cost(completion_response=response)
    litellm_dir = workdir / "litellm-single"
    litellm_dir.mkdir()
    bucket_paths = {
        PY_SQL: workdir / "pyrate-single.sqlite",
        PY_SQL_LOCK: workdir / "pyrate-single-lock.sqlite",
    }
    buckets = {
        name: _sqlite_bucket(path, file_lock=name == PY_SQL_LOCK)
        for name, path in bucket_paths.items()
    }
    limiters = {name: Limiter(bucket) for name, bucket in buckets.items()}
    mp_manager = context.Manager()
    mp_items = mp_manager.list()
    mp_limiter = Limiter(MultiprocessBucket([_pyrate_rate()], mp_items, context.RLock()))
    stores = {
        CM_FULL: ("full", False),
        CM_FULL_PRICED: ("full", True),
        CM_NORMAL: ("normal", False),
        CM_NORMAL_PRICED: ("normal", True),
    }
    managers = {}
    for name, (durability, _) in stores.items():
        path = workdir / f"creditmeter-single-{len(managers)}.db"
        managers[name] = BalanceManager(SQLiteStore(path, durability=durability), CONFIG)  # type: ignore[arg-type]
        managers[name].account(USER)

    def store_op(name: str) -> Callable[[], object]:
        manager = managers[name]
        if stores[name][1]:
            return lambda: manager.charge(USER, model=MODEL, usage=USAGE)
        return lambda: manager.charge(USER, 1)

    def acquire(limiter: Any) -> Callable[[], object]:
        return lambda: limiter.try_acquire(USER, 1)

    with _chdir(litellm_dir), _ThreadErrors().installed() as thread_errors:
        budget = _litellm_manager()

        def update_joined() -> None:
            budget.update_cost(USER, completion_obj=response)
            _join_saves()

        ops = {
            LL_UPDATE: update_joined,
            LL_PRICE: lambda: completion_cost(completion_response=response),
            PY_SQL: acquire(limiters[PY_SQL]),
            PY_SQL_LOCK: acquire(limiters[PY_SQL_LOCK]),
            PY_MP: acquire(mp_limiter),
            **{name: store_op(name) for name in stores},
        }
        series = common.interleaved(ops, ops=sizes.file_ops, repeats=sizes.file_repeats)
        _join_saves()
        free = _litellm_free_running(sizes, workdir, response, usd)
        _join_saves()
    calls = _calls(sizes.file_ops, sizes.file_repeats)
    cost = _charge_cost()
    persisted = _persisted_cost(litellm_dir / "user_cost.json")
    checks: dict[str, bool] = {
        LL_UPDATE: persisted is not None
        and round(persisted / usd) == calls
        and persisted == budget.get_current_cost(USER),
        PY_MP: len(mp_items) == calls,
    }
    for name, bucket in buckets.items():
        checks[name] = bucket.count() == calls
        limiters[name].dispose(bucket)
    for name, manager in managers.items():
        each = cost if stores[name][1] else 1
        checks[name] = manager.balance(USER) == START_BALANCE - calls * each
        manager.close()
    mp_limiter.dispose(mp_limiter.buckets()[0])
    mp_manager.shutdown()
    return {
        "series": series,
        "calls": calls,
        "checks": checks,
        "free": free,
        "usd": usd,
        "thread_errors": thread_errors.count,
        "journal": {name: _sqlite_modes(path) for name, path in bucket_paths.items()},
    }


def _litellm_free_running(sizes: Sizes, workdir: Path, response: Any, usd: float) -> dict[str, Any]:
    """update_cost in a loop as a gateway calls it: saves left running, all joined per batch."""
    directory = workdir / "litellm-free"
    directory.mkdir()
    with _chdir(directory):
        budget = _litellm_manager()
        returned: list[float] = []
        drained: list[float] = []
        stale = 0
        for _ in range(sizes.file_repeats):
            start = common.now_ns()
            for _ in range(sizes.file_ops):
                budget.update_cost(USER, completion_obj=response)
            middle = common.now_ns()
            _join_saves()
            end = common.now_ns()
            returned.append((middle - start) / sizes.file_ops / 1000)
            drained.append((end - start) / sizes.file_ops / 1000)
            if _persisted_cost(directory / "user_cost.json") != budget.get_current_cost(USER):
                stale += 1
        ops_done = sizes.file_ops * sizes.file_repeats
        persisted = _persisted_cost(directory / "user_cost.json")
    return {
        "returned": common.Series("returned", returned),
        "drained": common.Series("drained", drained),
        "stale_batches": stale,
        "batches": sizes.file_repeats,
        "ops": ops_done,
        "persisted_ok": persisted is not None and round(persisted / usd) == ops_done,
    }


# --- four processes on one user ----------------------------------------------------------


class _FileWatcher:
    """Reads LiteLLM's user_cost.json in a loop while the workers run, as a restart would."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reads = self.empty = self.invalid = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-peers watcher", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                text = self.path.read_text()
            except OSError:
                text = ""
            self.reads += 1
            if not text:
                self.empty += 1
            else:
                try:
                    json.loads(text)
                except ValueError:
                    self.invalid += 1
            self._stop.wait(0.001)

    def __enter__(self) -> _FileWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _summary(name: str, reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals and throughput of one 4-process run (clocks: time.monotonic, system-wide)."""
    acked = sum(r["acked"] for r in reports)
    wall = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    return {
        "name": name,
        "reports": reports,
        "acked": acked,
        "refused": sum(r["refused"] for r in reports),
        "errors": sum(r["errors"] for r in reports),
        "error_sample": next((r["error_sample"] for r in reports if r["error_sample"]), ""),
        "wall_s": wall,
        "ops_per_s": acked / wall if wall > 0 else 0.0,
    }


MP_LITELLM = "LiteLLM BudgetManager, one user_cost.json"
MP_PY_SQL = "PyrateLimiter SQLiteBucket (default), one file"
MP_PY_SQL_LOCK = "PyrateLimiter SQLiteBucket use_file_lock=True, one file"
MP_PY_MP = "PyrateLimiter MultiprocessBucket (one Manager process)"
MP_CM_FULL = "creditmeter SQLiteStore durability=full, one file"
MP_CM_NORMAL = "creditmeter SQLiteStore durability=normal, one file"


def _one_run(
    name: str, sizes: Sizes, workdir: Path, context: Any, usd: float, cost: Decimal
) -> dict[str, Any]:
    """One 4-process run of one variant on a fresh file; its totals and lost updates."""
    ops, deadline = sizes.proc_ops, sizes.deadline_s

    def run(kind: str, *args: Any) -> dict[str, Any]:
        reports = common.run_processes(
            _worker,
            PROCESSES,
            (kind, *args, ops, deadline),
            timeout=deadline + 120,
            context=context,
        )
        return _summary(name, reports)

    workdir.mkdir()
    if name == MP_LITELLM:
        # Each process its own BudgetManager on the same file.
        with _chdir(workdir):
            _litellm_manager()
        path = workdir / "user_cost.json"
        with _FileWatcher(path) as watcher:
            summary = run("litellm", str(workdir))
        persisted = _persisted_cost(path)
        reports = summary["reports"]
        summary["thread_errors"] = sum(r["thread_errors"] for r in reports)
        summary["thread_error_sample"] = next(
            (r["thread_error_sample"] for r in reports if r["thread_error_sample"]), ""
        )
        summary["watcher"] = (watcher.reads, watcher.empty, watcher.invalid)
        summary["persisted"] = None if persisted is None else round(persisted / usd)
        summary["detail"] = (
            "does not parse" if persisted is None else f"current_cost {persisted!r} USD"
        )
        summary["views"] = [round(r["seen_cost"] / usd) for r in reports]
    elif name in (MP_PY_SQL, MP_PY_SQL_LOCK):
        # Every process opens the same file; the table holds one row per unit of weight.
        lock = name == MP_PY_SQL_LOCK
        path = workdir / "bucket.sqlite"
        bucket = _sqlite_bucket(path, file_lock=lock)  # the table exists before the race
        bucket.conn.close()
        summary = run("pyrate-sqlite", str(path), lock)
        summary["persisted"] = _bucket_rows(path)
    elif name == MP_PY_MP:
        # A list in a Manager process, handed to each worker with a multiprocessing RLock.
        manager = context.Manager()
        try:
            items = manager.list()
            summary = run("pyrate-mp", items, context.RLock())
            summary["persisted"] = len(items)
        finally:
            manager.shutdown()
    else:
        # Each process its own SQLiteStore on the same file.
        durability = "full" if name == MP_CM_FULL else "normal"
        path = workdir / "credits.db"
        setup = BalanceManager(SQLiteStore(path, durability=durability), CONFIG)  # type: ignore[arg-type]
        setup.account(USER)
        setup.close()
        summary = run("creditmeter", str(path), durability)
        check = BalanceManager(SQLiteStore(path, durability=durability), CONFIG)  # type: ignore[arg-type]
        spent = START_BALANCE - check.balance(USER)
        charges = sum(1 for entry in check.ledger(USER) if entry.kind is EntryKind.CHARGE)
        check.close()
        summary["persisted"] = int(spent / cost)
        summary["ledger_ok"] = charges == summary["acked"] and spent == summary["acked"] * cost
    summary["lost"] = summary["acked"] - (summary["persisted"] or 0)
    return summary


MP_VARIANTS = [MP_LITELLM, MP_PY_SQL, MP_PY_SQL_LOCK, MP_PY_MP, MP_CM_FULL, MP_CM_NORMAL]
PERSISTED_UNIT = {
    MP_LITELLM: "calls in the file",
    MP_PY_SQL: "rows",
    MP_PY_SQL_LOCK: "rows",
    MP_PY_MP: "items (memory only)",
    MP_CM_FULL: "charges (balance and ledger)",
    MP_CM_NORMAL: "charges (balance and ledger)",
}


def bench_processes(sizes: Sizes, workdir: Path, context: Any, usd: float) -> list[dict[str, Any]]:
    """Every variant ``proc_rounds`` times, the order rotated each round, each run on a fresh file.

    Rounds and rotation spread a passing burst of load over all the variants.
    """
    cost = _charge_cost()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in MP_VARIANTS}
    for round_number in range(sizes.proc_rounds):
        shift = round_number % len(MP_VARIANTS)
        for index, name in enumerate(MP_VARIANTS[shift:] + MP_VARIANTS[:shift]):
            folder = workdir / f"procs-{round_number}-{index}"
            runs[name].append(_one_run(name, sizes, folder, context, usd, cost))
    return [_combine(name, runs[name]) for name in MP_VARIANTS]


def _combine(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs of one variant: sums of counts, median of throughputs."""
    rates = [r["ops_per_s"] for r in runs]
    combined: dict[str, Any] = {
        "name": name,
        "runs": runs,
        "acked": sum(r["acked"] for r in runs),
        "refused": sum(r["refused"] for r in runs),
        "errors": sum(r["errors"] for r in runs),
        "error_sample": next((r["error_sample"] for r in runs if r["error_sample"]), ""),
        "lost": sum(r["lost"] for r in runs),
        "ops_per_s": statistics.median(rates),
        "ops_range": (min(rates), max(rates)),
        "wall_s": [r["wall_s"] for r in runs],
        "persisted": [r["persisted"] for r in runs],
    }
    if name == MP_LITELLM:
        combined["thread_errors"] = sum(r["thread_errors"] for r in runs)
        combined["thread_error_sample"] = next(
            (r["thread_error_sample"] for r in runs if r["thread_error_sample"]), ""
        )
        combined["watcher"] = tuple(sum(r["watcher"][i] for r in runs) for i in range(3))
        combined["views"] = [r["views"] for r in runs]
        combined["detail"] = [r["detail"] for r in runs]
    if name in (MP_CM_FULL, MP_CM_NORMAL):
        combined["ledger_ok"] = all(r["ledger_ok"] for r in runs)
    return combined


# --- the report --------------------------------------------------------------------------

TITLE = "Peers: LiteLLM BudgetManager and PyrateLimiter"


def _faster(ours: float, theirs: float) -> str:
    return f"{common.fmt(ours, 0)} vs {common.fmt(theirs, 0)} ops/s ({ours / theirs:.2f}x)"


def _series_rows(series: dict[str, common.Series], checks: dict[str, bool]) -> list[list[str]]:
    rows = []
    for name, s in series.items():
        rows.append(
            [
                name,
                common.fmt(s.median, 2 if s.median < 100 else 1),
                common.fmt(min(s.per_op_us), 2 if s.median < 100 else 1),
                common.fmt(max(s.per_op_us), 2 if s.median < 100 else 1),
                common.fmt(s.ops_per_s, 0),
                {True: "yes", False: "**no**"}.get(checks.get(name), "-"),  # type: ignore[arg-type]
            ]
        )
    return rows


def _section(
    sizes: Sizes,
    mem: dict[str, Any],
    files: dict[str, Any],
    procs: list[dict[str, Any]],
    elapsed_s: float,
    quick: bool,
) -> common.Section:
    ms, fs, free = mem["series"], files["series"], files["free"]
    by_name = {p["name"]: p for p in procs}
    litellm_best = max(fs[LL_UPDATE].ops_per_s, free["drained"].ops_per_s)
    lines: list[str] = []
    add = lines.append
    add(
        f"Peers: {common.versions(PEER_PACKAGES)}. Same run, same machine, same workload: "
        f"user `{USER}`, one `{MODEL}` call of {INPUT_TOKENS} prompt + {OUTPUT_TOKENS} "
        f"completion tokens, which both LiteLLM's cost map and creditmeter's LibreChat table "
        f"price at {files['usd']:.6f} USD = {_charge_cost()} credits. Mode: "
        f"{'quick' if quick else 'full'} ({elapsed_s:.1f} s for this section)."
    )
    add("")
    add(
        '- **LiteLLM** `BudgetManager(project_name, client_type="local")`: per request '
        "`update_cost(user, completion_obj=ModelResponse)`. It prices the response with "
        "`litellm.completion_cost`, adds the float to a dict in memory and calls "
        "`_save_data_thread()`, which starts a new `threading.Thread` per call that truncates "
        "and rewrites `user_cost.json` (in the current directory) with `json.dump` — no lock, "
        "no fsync, no re-read of the file. The file is read once, in `__init__`."
    )
    add(
        "- **PyrateLimiter** `Limiter(bucket).try_acquire(user, 1)` with "
        f"`Rate({PYRATE_LIMIT:,}, Duration.DAY)` (never limits; a day-long window so nothing "
        "leaks out during the run and the items can be counted). `InMemoryBucket` is a Python "
        "list in the process; `SQLiteBucket.init_from_file(...)` runs `SELECT COUNT(*)` over the "
        "window, then `INSERT`s one row per unit of weight and commits (default: the file's "
        "rollback journal and `synchronous=FULL`, no busy_timeout beyond sqlite3's 5 s); "
        "`use_file_lock=True` adds a `filelock.FileLock` around each acquire and switches the "
        "file to WAL with `synchronous=NORMAL`; `MultiprocessBucket` keeps the list in a "
        "`multiprocessing.Manager` process behind a `multiprocessing.RLock`."
    )
    add(
        "- **creditmeter** `BalanceManager(store, BalanceConfig(enabled=True, "
        "allow_negative_balance=True))`: `charge(user, 1)` and the priced "
        f'`charge(user, model="{MODEL}", usage=TokenUsage(input={INPUT_TOKENS}, '
        f"output={OUTPUT_TOKENS}))`, on `MemoryStore` and on `SQLiteStore` (WAL; durability "
        "`full` fsyncs every commit, `normal` does not). Every charge writes the account "
        "and a ledger entry in one transaction."
    )
    add("")
    add("### One process")
    add("")
    add(
        f"`common.interleaved`: one batch of each series per round, the order rotated, GC on; "
        f"in memory {sizes.mem_repeats} rounds x {sizes.mem_ops:,} ops, on files "
        f"{sizes.file_repeats} rounds x {sizes.file_ops:,} ops (plus one warm-up batch of a "
        "tenth). µs/op is the median over the batches. *Recorded*: after the run, the peer "
        "holds exactly the operations made (creditmeter balance, bucket items/rows, LiteLLM's "
        "file total)."
    )
    add("")
    header = ["what", "median µs/op", "min", "max", "ops/s", "recorded"]
    add("In memory:")
    add("")
    add(common.table(header, _series_rows(ms, mem["checks"])))
    add("")
    add("On a file (and PyrateLimiter's Manager process):")
    add("")
    add(common.table(header, _series_rows(fs, files["checks"])))
    add("")
    add(
        f"The *save joined* row waits for the save thread of each `update_cost` before the "
        f"next call. Called as a gateway calls it (the save threads left running, all joined "
        f"at the end of each batch; {free['batches']} batches x {sizes.file_ops:,}), "
        f"`update_cost` returns in {common.fmt(free['returned'].median, 1)} µs/op (median) "
        f"and the batch is on disk after {common.fmt(free['drained'].median, 1)} µs/op "
        f"({common.fmt(free['drained'].ops_per_s, 0)} ops/s); the file matched the in-memory "
        f"total after {free['batches'] - free['stale_batches']} of {free['batches']} batches "
        f"(every save drained), and at the end it held all {free['ops']:,} calls: "
        f"{'yes' if free['persisted_ok'] else '**no**'}. LiteLLM's throughput in the targets "
        "is the better of the two "
        f"({common.fmt(litellm_best, 0)} ops/s). Save threads that raised: "
        f"{files['thread_errors']}. Journal mode of PyrateLimiter's files: "
        f"{files['journal'][PY_SQL]} (default), {files['journal'][PY_SQL_LOCK]} "
        "(use_file_lock=True)."
    )
    add("")
    add("### Four processes, one user")
    add("")
    rounds = sizes.proc_rounds
    add(
        f"{PROCESSES} processes (multiprocessing, forkserver with the peers preloaded), "
        f"started together behind a barrier, each making {sizes.proc_ops:,} operations on "
        f"`{USER}` (stopping early past {sizes.deadline_s:g} s); "
        + (
            "one run per variant"
            if rounds == 1
            else f"{rounds} rounds of every variant, the order rotated each round"
        )
        + ", each run on a fresh file. creditmeter runs the priced charge; PyrateLimiter "
        "`try_acquire(user, 1)`; LiteLLM `update_cost`, its save threads joined at the end. "
        "*Acked*: calls that returned (PyrateLimiter: returned True). *Persisted*: what the "
        "peer holds afterwards, per run (LiteLLM: the file's `current_cost` / the cost of one "
        "call; PyrateLimiter: rows or list items for the user; creditmeter: balance spent / "
        "cost of one charge, and the charge entries of its ledger). *Lost*: acked minus "
        "persisted, over all runs. ops/s: acked over the wall time from the first start to the "
        f"last finish of a run{'' if rounds == 1 else ', median of the runs (min-max)'}."
    )
    add("")
    rows = []
    for p in procs:
        low, high = p["ops_range"]
        spread = "" if rounds == 1 else f" ({common.fmt(low, 0)}-{common.fmt(high, 0)})"
        kept = ", ".join("unreadable" if n is None else f"{n:,}" for n in p["persisted"])
        rows.append(
            [
                p["name"],
                f"{p['acked']:,} / {rounds * PROCESSES * sizes.proc_ops:,}",
                f"{p['refused']:,}",
                f"{p['errors']:,}",
                ", ".join(f"{w:.2f}" for w in p["wall_s"]),
                common.fmt(p["ops_per_s"], 0) + spread,
                f"{kept} {PERSISTED_UNIT[p['name']]}",
                f"**{p['lost']:,}**" if p["lost"] else "0",
            ]
        )
    add(
        common.table(
            [
                "variant",
                "acked / asked",
                "refused",
                "errors",
                "wall s",
                "ops/s",
                "persisted",
                "lost",
            ],
            rows,
        )
    )
    add("")
    add(
        "Per process: acked / errors / ops/s over its own part of a run"
        + ("" if rounds == 1 else " (acked and errors summed over the runs, ops/s their median)")
        + ":"
    )
    add("")
    per_rows = []
    for p in procs:
        cells = []
        for index in range(PROCESSES):
            mine = [run["reports"][index] for run in p["runs"]]
            rates = [
                r["acked"] / (r["end"] - r["start"]) if r["end"] > r["start"] else 0.0 for r in mine
            ]
            acked = sum(r["acked"] for r in mine)
            errors = sum(r["errors"] for r in mine)
            cells.append(f"{acked:,} / {errors:,} / {common.fmt(statistics.median(rates), 0)}")
        per_rows.append([p["name"], *cells])
    add(common.table(["variant", *(f"process {i}" for i in range(PROCESSES))], per_rows))
    add("")
    failures = [f"{p['name']}: {p['error_sample']}" for p in procs if p["error_sample"]]
    if failures:
        add(
            "First error of each variant that had errors: "
            + "; ".join(f"`{e}`" for e in failures)
            + "."
        )
        add("")
    ll = by_name[MP_LITELLM]
    reads, empty, invalid = ll["watcher"]
    views = "; ".join(", ".join(f"{v:,}" for v in run) for run in ll["views"])
    add(
        f"LiteLLM: the processes acknowledged {ll['acked']:,} `update_cost` calls; each "
        f"process's own `BudgetManager` ended believing the user had spent {views} calls' "
        "worth (per run; its own calls only: it never re-reads the file), and the file kept "
        f"{'; '.join(ll['detail'])} = "
        f"{', '.join('nothing readable' if n is None else f'{n:,}' for n in ll['persisted'])} "
        f"calls: **{ll['lost']:,} lost**. A reader polling the file during the runs "
        f"({reads:,} reads) found it empty {empty:,} times and not valid JSON {invalid:,} "
        "times — a `BudgetManager` created at such a moment raises in `__init__` "
        f"(`json.load`). Save threads that raised: {ll['thread_errors']}"
        + (f" (`{ll['thread_error_sample']}`)" if ll["thread_error_sample"] else "")
        + "."
    )
    add("")
    add("Cannot be shared across processes at all, so there is no 4-process figure for them:")
    add("")
    add(
        "- PyrateLimiter `InMemoryBucket`: a list in one process; four processes are four "
        "separate limits. Its multiprocess answer is `MultiprocessBucket` (measured above): "
        "the list lives in a `multiprocessing.Manager` server process and each worker gets a "
        "proxy and a `multiprocessing.RLock` from the parent that created them (as "
        "`limiter_factory.init_global_limiter` does for a `ProcessPoolExecutor`), so it only "
        "spans the children of one parent, and nothing outlives the Manager."
    )
    add(
        "- creditmeter `MemoryStore`: per process by design; processes share a `SQLiteStore` "
        "file (or Redis/PostgreSQL)."
    )
    add(
        '- LiteLLM has no in-memory mode: `client_type="local"` always rewrites the file, '
        '`"hosted"` posts the whole dict to a server. Its single-process numbers sit with '
        "the file-backed rows."
    )
    add("")
    add("### Caveats")
    add("")
    add(
        "- PyrateLimiter is a rate limiter, not a ledger: an acquire records a timestamped "
        "item per unit of weight (a token quota of 150 tokens per call is 150 list items or "
        "150 SQLite rows per call) and its leaker deletes items older than the window. It keeps "
        "no balance, no amounts, no history. Its SQLite acquire counts the window with "
        "`SELECT COUNT(*)` before each insert, so its cost grows with the items in the window "
        f"(here every item of the run, since the window is a day: {files['calls']:,} rows "
        "by the end of the one-process run). Without `use_file_lock` the count and the insert "
        "are separate transactions (sqlite3's implicit `BEGIN` comes only before the "
        "`INSERT`) behind a `threading.RLock`, so processes can all pass the same count and "
        "overshoot a limit; no update is lost (each `INSERT` commits), which is what the "
        "4-process table counts."
    )
    add(
        "- LiteLLM's `BudgetManager` keeps float USD per user in a dict (a 4-process file "
        f"above: {ll['detail'][0]}, a binary-float sum of 0.000045s); the saved file holds "
        "whatever dict the last save thread to finish wrote, of whichever process. Its "
        "`update_cost` return time excludes the file write, which happens in the background "
        "thread (and a crash mid-write leaves a truncated file). The file rewrite is the whole "
        "dict, so it grows with the number of users (here one)."
    )
    add(
        "- creditmeter's priced charge and LiteLLM's `update_cost` do the same job per call "
        "(price the usage, add it to the user's total, persist). The like-for-like target for "
        "LiteLLM is SQLiteStore `normal` (neither fsyncs each write); `full` is shown beside it."
    )
    add(
        "- Numbers move with the machine's load (2 shared cores here); the LiteLLM and "
        "PyrateLimiter figures come from the same run as creditmeter's."
    )
    markdown = "\n".join(lines)

    full = by_name[MP_CM_FULL]
    normal = by_name[MP_CM_NORMAL]
    targets = [
        common.Target(
            "1 process, memory: creditmeter MemoryStore charge(user, 1) ahead of PyrateLimiter "
            "InMemoryBucket try_acquire(user, 1)",
            _faster(ms[CM_MEM].ops_per_s, ms[PY_MEM].ops_per_s),
            ms[CM_MEM].ops_per_s > ms[PY_MEM].ops_per_s,
        ),
        common.Target(
            "1 process, file, synchronous FULL: SQLiteStore full charge(user, 1) ahead of "
            "PyrateLimiter SQLiteBucket (default)",
            _faster(fs[CM_FULL].ops_per_s, fs[PY_SQL].ops_per_s),
            fs[CM_FULL].ops_per_s > fs[PY_SQL].ops_per_s,
        ),
        common.Target(
            "1 process, file, synchronous NORMAL: SQLiteStore normal charge(user, 1) ahead of "
            "PyrateLimiter SQLiteBucket use_file_lock=True",
            _faster(fs[CM_NORMAL].ops_per_s, fs[PY_SQL_LOCK].ops_per_s),
            fs[CM_NORMAL].ops_per_s > fs[PY_SQL_LOCK].ops_per_s,
        ),
        common.Target(
            "1 process, file, no fsync: SQLiteStore normal priced charge ahead of LiteLLM "
            "update_cost (its better figure)",
            _faster(fs[CM_NORMAL_PRICED].ops_per_s, litellm_best),
            fs[CM_NORMAL_PRICED].ops_per_s > litellm_best,
        ),
        common.Target(
            "1 process: SQLiteStore full priced charge vs LiteLLM update_cost (figure: full "
            "fsyncs, LiteLLM does not)",
            _faster(fs[CM_FULL_PRICED].ops_per_s, litellm_best),
            None,
        ),
        common.Target(
            "4 processes, one file: SQLiteStore normal ahead of LiteLLM BudgetManager",
            _faster(normal["ops_per_s"], ll["ops_per_s"]),
            normal["ops_per_s"] > ll["ops_per_s"],
        ),
        common.Target(
            "4 processes, one file: SQLiteStore full ahead of PyrateLimiter SQLiteBucket (default)",
            _faster(full["ops_per_s"], by_name[MP_PY_SQL]["ops_per_s"]),
            full["ops_per_s"] > by_name[MP_PY_SQL]["ops_per_s"],
        ),
        common.Target(
            "4 processes, one file: SQLiteStore normal ahead of PyrateLimiter SQLiteBucket "
            "use_file_lock=True",
            _faster(normal["ops_per_s"], by_name[MP_PY_SQL_LOCK]["ops_per_s"]),
            normal["ops_per_s"] > by_name[MP_PY_SQL_LOCK]["ops_per_s"],
        ),
        common.Target(
            "4 processes: PyrateLimiter MultiprocessBucket (figure: shared memory, no "
            "creditmeter equivalent; SQLiteStore normal beside it)",
            _faster(normal["ops_per_s"], by_name[MP_PY_MP]["ops_per_s"]),
            None,
        ),
    ]
    for p in (full, normal):
        targets.append(
            common.Target(
                f"4 processes: 0 lost updates, {p['name']}",
                f"{p['lost']:,} lost of {p['acked']:,} acked; ledger = balance = acked: "
                f"{'yes' if p['ledger_ok'] else 'no'}; {p['errors']:,} errors",
                p["lost"] == 0 and p["ledger_ok"] and p["errors"] == 0,
            )
        )
    for name in (MP_LITELLM, MP_PY_SQL, MP_PY_SQL_LOCK, MP_PY_MP):
        p = by_name[name]
        targets.append(
            common.Target(
                f"4 processes: lost updates, {name} (figure)",
                f"{p['lost']:,} lost of {p['acked']:,} acked "
                f"({100 * p['lost'] / max(1, p['acked']):.1f}%); "
                f"{p['errors']:,} errors",
                None,
            )
        )
    checks = {**mem["checks"], **files["checks"]}
    bad = [name for name, ok in checks.items() if not ok and not name.startswith("LiteLLM")]
    targets.append(
        common.Target(
            "1 process: every creditmeter and PyrateLimiter operation recorded exactly once",
            "all recorded" if not bad else "not recorded: " + "; ".join(bad),
            not bad,
        )
    )
    data = {
        "single": {name: s.per_op_us for name, s in {**ms, **fs}.items()},
        "litellm_free": {
            "returned_us": free["returned"].per_op_us,
            "drained_us": free["drained"].per_op_us,
        },
        "processes": {
            p["name"]: {
                "ops_per_s": p["ops_per_s"],
                "acked": p["acked"],
                "lost": p["lost"],
                "errors": p["errors"],
            }
            for p in procs
        },
        "elapsed_s": elapsed_s,
    }
    return common.Section(TITLE, markdown, targets, data)


def run(*, quick: bool, workdir: Path) -> common.Section:
    """Measure the peers beside creditmeter; files go in a fresh folder under ``workdir``."""
    started = time.monotonic()
    sizes = QUICK if quick else FULL
    missing = _missing_peers()
    if missing:
        return common.Section(
            TITLE,
            f"Not measured: {', '.join(missing)} not installed "
            "(`benchmarks/.venv/bin/pip install -r benchmarks/requirements.txt`).",
            [common.Target("peers installed", f"missing: {', '.join(missing)}", False)],
        )
    Path(workdir).mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="peers-", dir=workdir)).resolve()
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # the forkserver inherits it
    context = _context()
    forkserver.ensure_running()  # imports the peers in the background, beside the import below
    litellm = _import_litellm()
    usd = litellm.completion_cost(completion_response=_response())
    try:
        mem = bench_memory(sizes)
        files = bench_files(sizes, base, context)
        procs = bench_processes(sizes, base, context, usd)
    finally:
        with contextlib.suppress(AttributeError):  # private: stop the idle forkserver
            forkserver._forkserver._stop()  # type: ignore[attr-defined]
    return _section(sizes, mem, files, procs, time.monotonic() - started, quick)


def render(section: common.Section, command: str, machine: list[str]) -> str:
    """The standalone report: the machine (taken before the run), the section, its targets."""
    lines = [f"# {section.title}", "", *machine, f"- Command: `{command}`"]
    lines += ["", section.markdown, "", "### Targets", ""]
    lines.append(
        common.table(
            ["target", "measured", "verdict"],
            [[t.name, t.measured, common.verdict(t.met)] for t in section.targets],
        )
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (about 10 s)")
    parser.add_argument("--output", type=Path, default=None, help="write the report here")
    parser.add_argument(
        "--dir", type=Path, default=None, help="put the files here (default: a temporary folder)"
    )
    args = parser.parse_args(argv)
    command = "python benchmarks/bench_peers.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    started = time.monotonic()
    machine = common.machine_lines(PEER_PACKAGES)
    if args.dir is not None:
        section = run(quick=args.quick, workdir=args.dir)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="creditmeter-peers-"))
        try:
            section = run(quick=args.quick, workdir=workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    report = render(section, command, machine)
    print(report)
    print(f"wall time: {time.monotonic() - started:.1f} s")
    if args.output is not None:
        args.output.write_text(report, encoding="utf-8")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
