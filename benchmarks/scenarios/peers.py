"""Peers: creditmeter beside LiteLLM's BudgetManager and PyrateLimiter, same run, same workload.

One user, one ``gpt-4o-mini`` call of 100 prompt and 50 completion tokens (45
credits = 0.000045 USD at both libraries' rates). One process: LiteLLM
``update_cost``, PyrateLimiter ``try_acquire`` over its in-memory, SQLite and
multiprocess buckets, and creditmeter's charges on MemoryStore and SQLiteStore,
in one interleaved run. Then four processes on one user for every peer that
processes can share, counting each one's lost updates.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import sqlite3
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from harness import Rounds, Section, interleave, procs
from harness.report import fmt, version, versions

from creditmeter import BalanceConfig, BalanceManager, MemoryStore, SQLiteStore, TokenUsage

TITLE = "Peers: LiteLLM BudgetManager and PyrateLimiter"
USER = "user-1"
MODEL = "gpt-4o-mini"
USAGE = TokenUsage(input=100, output=50)
START = 10**12
CONFIG = BalanceConfig(enabled=True, start_balance=START, allow_negative_balance=True)
LIMIT = 10**9  # items per day-long window: never reached, and nothing leaks out during a run
PROCESSES = 4
PEERS = ["litellm", "pyrate-limiter", "filelock", "openai", "pydantic"]
PRELOAD = ("creditmeter", "pyrate_limiter", "filelock", "litellm")
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
CM_SQL = {  # (durability, priced) -> series
    (
        d,
        priced,
    ): f"creditmeter SQLiteStore durability={d}: charge(user, {'model, usage' if priced else '1'})"
    for d in ("full", "normal")
    for priced in (False, True)
}
MP_LITELLM = "LiteLLM BudgetManager, one user_cost.json"
MP_PY_SQL = "PyrateLimiter SQLiteBucket (default), one file"
MP_PY_SQL_LOCK = "PyrateLimiter SQLiteBucket use_file_lock=True, one file"
MP_PY_MP = "PyrateLimiter MultiprocessBucket (one Manager process)"
MP_CM_FULL = "creditmeter SQLiteStore durability=full, one file"
MP_CM_NORMAL = "creditmeter SQLiteStore durability=normal, one file"
VARIANTS = {  # 4-process variant -> (kind, what "persisted" counts)
    MP_LITELLM: ("litellm", "calls in the file"),
    MP_PY_SQL: ("pyrate-sqlite", "rows"),
    MP_PY_SQL_LOCK: ("pyrate-sqlite-lock", "rows"),
    MP_PY_MP: ("pyrate-mp", "items (memory only)"),
    MP_CM_FULL: ("full", "charges (balance and ledger)"),
    MP_CM_NORMAL: ("normal", "charges (balance and ledger)"),
}


@dataclass(frozen=True)
class Sizes:
    """Ops per batch (in memory, on a file) and rounds; the 4-process runs."""

    mem_ops: int
    file_ops: int
    repeats: int
    proc_ops: int
    proc_rounds: int
    deadline_s: float


QUICK = Sizes(mem_ops=500, file_ops=10, repeats=3, proc_ops=40, proc_rounds=1, deadline_s=2.0)
FULL = Sizes(mem_ops=20_000, file_ops=400, repeats=7, proc_ops=700, proc_rounds=3, deadline_s=15)


def _litellm() -> Any:
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # its bundled cost map: no network
    import litellm  # noqa: PLC0415

    return litellm


def _response() -> Any:
    """A LiteLLM ``ModelResponse`` as a completion of the workload returns it."""
    message = {"role": "assistant", "content": "Hello there, how are you?"}
    return _litellm().ModelResponse(
        model=MODEL,
        choices=[{"index": 0, "finish_reason": "stop", "message": message}],
        usage={"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150},
    )


def _join_saves() -> None:
    """Wait for every BudgetManager save thread of this process ("Thread-N (save_data)")."""
    for thread in threading.enumerate():
        if thread.name.endswith("(save_data)"):
            thread.join()


def _bucket(path: Path, *, lock: bool) -> Any:
    from pyrate_limiter import Duration, Rate, SQLiteBucket  # noqa: PLC0415

    rates = [Rate(LIMIT, Duration.DAY)]
    return SQLiteBucket.init_from_file(
        rates, table="bench_bucket", db_path=str(path), create_new_table=True, use_file_lock=lock
    )


def _sql(path: Path, query: str) -> Any:
    conn = sqlite3.connect(path, timeout=30)
    try:
        return conn.execute(query).fetchone()[0]
    finally:
        conn.close()


@contextlib.contextmanager
def _chdir(path: Path) -> Iterator[None]:
    before = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _budget() -> Any:
    """A local BudgetManager in the current directory, the user's budget saved."""
    manager = _litellm().BudgetManager(project_name="bench-peers", client_type="local")
    manager.create_budget(total_budget=1e9, user=USER)  # without a duration it does not save
    manager.save_data()
    return manager


def _saved(path: Path) -> float | None:
    """LiteLLM's saved ``current_cost`` of the user, or None if the file does not parse."""
    try:
        return float(json.loads(path.read_text())[USER].get("current_cost", 0.0))
    except (OSError, ValueError, KeyError):
        return None


def _cost() -> Decimal:
    """Credits one priced charge of the workload costs (creditmeter's LibreChat rates)."""
    with BalanceManager(MemoryStore(), CONFIG) as manager:
        return Decimal(manager.charge(USER, model=MODEL, usage=USAGE).cost)  # type: ignore[arg-type]


# --- four processes ---------------------------------------------------------------------


def _writer(
    index: int, barrier: Any, kind: str, path: str, shared: Any, ops: int, deadline_s: float
) -> dict[str, Any]:
    """One process of a 4-process run: set up, wait at the barrier, call, report."""
    del index
    done: Callable[[], dict[str, Any]] = dict
    if kind == "litellm":
        os.chdir(path)
        budget = _litellm().BudgetManager(project_name="bench-peers", client_type="local")
        response = _response()
        _litellm().completion_cost(completion_response=response)  # warm its caches
        before = budget.get_current_cost(USER)
        op: Callable[[], object] = lambda: budget.update_cost(USER, completion_obj=response)  # noqa: E731

        def done() -> dict[str, Any]:
            _join_saves()
            return {"seen": budget.get_current_cost(USER) - before}

    elif kind.startswith("pyrate"):
        from pyrate_limiter import Duration, Limiter, MultiprocessBucket, Rate  # noqa: PLC0415

        if shared is not None:
            limiter = Limiter(MultiprocessBucket([Rate(LIMIT, Duration.DAY)], *shared))
        else:
            limiter = Limiter(_bucket(Path(path), lock=kind.endswith("lock")))
        op = lambda: limiter.try_acquire(USER, 1)  # noqa: E731
    else:
        manager = BalanceManager(SQLiteStore(path, durability=kind), CONFIG)  # type: ignore[arg-type]
        manager.account(USER)  # opens the connection
        op = lambda: manager.charge(USER, model=MODEL, usage=USAGE)  # noqa: E731
    barrier.wait(timeout=120)
    acked = refused = failed = 0
    sample = ""
    start = time.monotonic()
    for _ in range(ops):
        try:
            result = op()
        except Exception as exc:  # a peer's failure is a figure, not a crash
            failed += 1
            sample = sample or f"{type(exc).__name__}: {exc}"
        else:
            refused += result is False
            acked += result is not False
        if time.monotonic() > start + deadline_s:
            break
    report = {"acked": acked, "refused": refused, "errors": failed, "error_sample": sample}
    return {**report, **done(), "start": start, "end": time.monotonic()}


def _one_run(name: str, sizes: Sizes, folder: Path, usd: float, cost: Decimal) -> dict[str, Any]:
    """One 4-process run of one variant on a fresh file: its totals and lost updates."""
    kind = VARIANTS[name][0]
    folder.mkdir()
    path, shared, out = folder, None, {}
    if kind == "litellm":
        with _chdir(folder):
            _budget()
    elif kind == "pyrate-mp":
        context = multiprocessing.get_context("forkserver")
        manager = context.Manager()
        shared = (manager.list(), context.RLock())
    elif kind.startswith("pyrate"):
        path = folder / "bucket.sqlite"
        _bucket(path, lock=kind.endswith("lock")).conn.close()  # the table exists before the race
    else:
        path = folder / "credits.db"
        with SQLiteStore(path, durability=kind) as store:  # type: ignore[arg-type]
            BalanceManager(store, CONFIG).account(USER)
    args = (kind, str(path), shared, sizes.proc_ops, sizes.deadline_s)
    reports = procs.run(_writer, PROCESSES, args, preload=PRELOAD, timeout=sizes.deadline_s + 120)
    acked = sum(r["acked"] for r in reports)
    if kind == "litellm":
        saved = _saved(folder / "user_cost.json")
        out = {
            "persisted": None if saved is None else round(saved / usd),
            "detail": "does not parse" if saved is None else f"current_cost {saved!r} USD",
            "views": [round(r["seen"] / usd) for r in reports],
        }
    elif shared is not None:
        out = {"persisted": len(shared[0])}
        manager.shutdown()
    elif kind.startswith("pyrate"):
        query = f"SELECT COUNT(*) FROM bench_bucket WHERE name = '{USER}'"
        out = {"persisted": _sql(path, query)}
    else:
        with SQLiteStore(path) as store:
            spent = START - BalanceManager(store, CONFIG).balance(USER)
            charges = sum(1 for e in store.ledger(USER) if e.kind.value == "charge")
        ok = charges == acked and spent == acked * cost
        out = {"persisted": int(spent / cost), "ledger_ok": ok}
    wall = max(r["end"] for r in reports) - min(r["start"] for r in reports)
    return {
        **out,
        **{key: sum(r[key] for r in reports) for key in ("acked", "refused", "errors")},
        "error_sample": next((r["error_sample"] for r in reports if r["error_sample"]), ""),
        "wall_s": wall,
        "ops_per_s": acked / wall if wall > 0 else 0.0,
        "lost": acked - (out["persisted"] or 0),
    }


def processes(sizes: Sizes, base: Path, usd: float) -> dict[str, dict[str, Any]]:
    """Every variant ``proc_rounds`` times, the order rotated each round; runs combined."""
    cost, names = _cost(), list(VARIANTS)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for number in range(sizes.proc_rounds):
        for index, name in enumerate(names[number:] + names[:number]):
            runs[name].append(_one_run(name, sizes, base / f"procs-{number}-{index}", usd, cost))
    combined = {}
    for name, done in runs.items():
        rates = [r["ops_per_s"] for r in done]
        combined[name] = {
            **{key: sum(r[key] for r in done) for key in ("acked", "refused", "errors", "lost")},
            "error_sample": next((r["error_sample"] for r in done if r["error_sample"]), ""),
            "ops_per_s": statistics.median(rates),
            "range": f"{fmt(min(rates), 0)}-{fmt(max(rates), 0)}",
            "ledger_ok": all(r.get("ledger_ok", True) for r in done),
            "runs": done,
        }
    return combined


# --- one process -------------------------------------------------------------------------


def one_process(sizes: Sizes, base: Path, usd: float) -> tuple[Rounds, dict[str, bool], dict]:
    """Every single-process series in one interleaved run; whether each recorded every call."""
    from pyrate_limiter import Duration, InMemoryBucket, Limiter, Rate  # noqa: PLC0415

    response, rate = _response(), Rate(LIMIT, Duration.DAY)
    plain, priced = BalanceManager(MemoryStore(), CONFIG), BalanceManager(MemoryStore(), CONFIG)
    paths = {PY_SQL: base / "pyrate.sqlite", PY_SQL_LOCK: base / "pyrate-lock.sqlite"}
    buckets = {name: _bucket(path, lock=name == PY_SQL_LOCK) for name, path in paths.items()}
    buckets[PY_MEM] = InMemoryBucket([rate])
    limiters = {name: Limiter(bucket) for name, bucket in buckets.items()}
    stores = {}
    for number, ((durability, _), name) in enumerate(CM_SQL.items()):
        store = SQLiteStore(base / f"cm-{number}.db", durability=durability)  # type: ignore[arg-type]
        stores[name] = BalanceManager(store, CONFIG)
        stores[name].account(USER)
    calls: dict[str, Callable[[], object]] = {
        CM_MEM: lambda: plain.charge(USER, 1),
        CM_MEM_PRICED: lambda: priced.charge(USER, model=MODEL, usage=USAGE),
        **{name: (lambda lim=lim: lim.try_acquire(USER, 1)) for name, lim in limiters.items()},
    }
    for (_, with_usage), name in CM_SQL.items():
        m = stores[name]
        calls[name] = (
            (lambda m=m: m.charge(USER, model=MODEL, usage=USAGE))
            if with_usage
            else (lambda m=m: m.charge(USER, 1))
        )
    (base / "litellm").mkdir()
    with _chdir(base / "litellm"):
        budget = _budget()
        calls[LL_UPDATE] = lambda: (
            budget.update_cost(USER, completion_obj=response),
            _join_saves(),
        )
        calls[LL_PRICE] = lambda: _litellm().completion_cost(completion_response=response)
        ops = {
            n: sizes.mem_ops if n in (CM_MEM, CM_MEM_PRICED, PY_MEM) else sizes.file_ops
            for n in calls
        }
        rounds = interleave(calls, ops=ops, repeats=sizes.repeats)
        _join_saves()
    free = free_running(sizes, base, response, usd)
    cost, saved = _cost(), _saved(base / "litellm" / "user_cost.json")
    checks = {name: bucket.count() == rounds[name].calls for name, bucket in buckets.items()}
    checks[CM_MEM] = plain.balance(USER) == START - rounds[CM_MEM].calls
    checks[CM_MEM_PRICED] = priced.balance(USER) == START - rounds[CM_MEM_PRICED].calls * cost
    checks[LL_UPDATE] = (
        saved == budget.get_current_cost(USER) and round(saved / usd) == rounds[LL_UPDATE].calls
    )
    for (_, with_usage), name in CM_SQL.items():
        checks[name] = stores[name].balance(USER) == START - rounds[name].calls * (
            cost if with_usage else 1
        )
        stores[name].close()
    for limiter in limiters.values():
        limiter.dispose(limiter.buckets()[0])
    journals = [_sql(path, "PRAGMA journal_mode") for path in paths.values()]
    return rounds, checks, {**free, "journals": journals}


def free_running(sizes: Sizes, base: Path, response: Any, usd: float) -> dict[str, Any]:
    """update_cost in a loop as a gateway calls it: saves left running, joined per batch."""
    folder = base / "litellm-free"
    folder.mkdir()
    returned, drained = [], []
    with _chdir(folder):
        budget = _budget()
        for _ in range(sizes.repeats):
            start = time.perf_counter_ns()
            for _ in range(sizes.file_ops):
                budget.update_cost(USER, completion_obj=response)
            returned.append((time.perf_counter_ns() - start) / sizes.file_ops / 1000)
            _join_saves()
            drained.append((time.perf_counter_ns() - start) / sizes.file_ops / 1000)
    saved, done = _saved(folder / "user_cost.json"), sizes.file_ops * sizes.repeats
    ok = saved is not None and round(saved / usd) == done
    return {
        "returned": statistics.median(returned),
        "drained": statistics.median(drained),
        "ok": ok,
    }


# --- the section ----------------------------------------------------------------------------


def run(*, quick: bool, workdir: Path) -> Section:
    """Measure the peers beside creditmeter; files go in ``workdir``."""
    started, sizes, section = time.monotonic(), QUICK if quick else FULL, Section(TITLE)
    missing = [name for name in PEERS[:3] if not version(name)]
    if missing:
        section.check("peers installed", False, f"missing: {', '.join(missing)}")
        return section
    base = workdir.resolve()
    base.mkdir(parents=True, exist_ok=True)
    usd = _litellm().completion_cost(completion_response=_response())
    procs.context([*PRELOAD, __name__])  # the forkserver imports the peers meanwhile
    rounds, checks, free = one_process(sizes, base, usd)
    mp = processes(sizes, base, usd)
    litellm_best = max(rounds[LL_UPDATE].ops_per_s, 1e6 / free["drained"])
    section.text(
        f"""Peers: {versions(PEERS)}. User `{USER}`, one `{MODEL}` call of 100 prompt + 50
        completion tokens, which LiteLLM's cost map and creditmeter's LibreChat table both
        price at {usd:.6f} USD = {_cost()} credits ({time.monotonic() - started:.1f} s)."""
    )
    section.bullets(
        """**LiteLLM** `BudgetManager(client_type="local").update_cost(user, completion_obj)`:
        prices the response, adds the float to a dict and starts a thread that rewrites
        `user_cost.json` (no lock, no fsync, never re-read).""",
        f"""**PyrateLimiter** `Limiter(bucket).try_acquire(user, 1)`, `Rate({LIMIT:,},
        Duration.DAY)`, over `InMemoryBucket`, `SQLiteBucket` (rollback journal, `FULL`; with
        `use_file_lock=True` a `filelock`, WAL, `NORMAL`) and `MultiprocessBucket`.""",
        """**creditmeter** `charge(user, 1)` and the priced charge on `MemoryStore` and
        `SQLiteStore` (`full` fsyncs every commit, `normal` does not).""",
    )
    section.lines += ["### One process", ""]
    section.text(
        f"""One interleaved run, {sizes.repeats} rounds, {sizes.mem_ops:,} ops per batch in
        memory and {sizes.file_ops:,} on files. *Recorded*: afterwards the peer holds exactly
        the operations made (balance, bucket items or rows, LiteLLM's file total)."""
    )
    recorded = {name: "yes" if ok else "**no**" for name, ok in checks.items()}
    memory = [CM_MEM, CM_MEM_PRICED, PY_MEM]
    section.series_table(rounds, memory, recorded=recorded)
    section.series_table(rounds, [n for n in rounds.series if n not in memory], recorded=recorded)
    section.text(
        f"""*Save joined* waits for each `update_cost`'s save thread. Called as a gateway calls
        it (saves left running, joined after each batch) `update_cost` returns in
        {fmt(free["returned"])} µs/op and the batch is on disk after {fmt(free["drained"])}
        µs/op; the file held every call at the end: {"yes" if free["ok"] else "**no**"}.
        LiteLLM's figure in the targets is the better of the two ({fmt(litellm_best, 0)}
        ops/s). PyrateLimiter's journal modes: {", ".join(free["journals"])}."""
    )
    section.lines += ["### Four processes, one user", ""]
    section.text(
        f"""{PROCESSES} processes started together behind a barrier, each making
        {sizes.proc_ops:,} operations on `{USER}` (creditmeter: the priced charge), stopping
        early past {sizes.deadline_s:g} s; {sizes.proc_rounds} round(s) of every variant, the
        order rotated, each run on a fresh file. *Persisted*: what the peer holds afterwards,
        per run; *lost*: acknowledged minus persisted. ops/s: acknowledged over the time from
        the first start to the last finish, median of the runs (min-max)."""
    )
    rows = []
    for name, p in mp.items():
        kept = ", ".join(
            "unreadable" if r["persisted"] is None else f"{r['persisted']:,}" for r in p["runs"]
        )
        asked = sizes.proc_rounds * PROCESSES * sizes.proc_ops
        cells = [f"{p['acked']:,} / {asked:,}", f"{p['refused']:,}", f"{p['errors']:,}"]
        cells += [f"{fmt(p['ops_per_s'], 0)} ({p['range']})", f"{kept} {VARIANTS[name][1]}"]
        rows.append([name, *cells, f"**{p['lost']:,}**" if p["lost"] else "0"])
    section.table(
        ["variant", "acked / asked", "refused", "errors", "ops/s", "persisted", "lost"], rows
    )
    failures = [f"`{n}: {p['error_sample']}`" for n, p in mp.items() if p["error_sample"]]
    if failures:
        section.text("First error of each variant that had errors: " + "; ".join(failures) + ".")
    ll, runs = mp[MP_LITELLM], mp[MP_LITELLM]["runs"]
    views = "; ".join(", ".join(f"{v:,}" for v in r["views"]) for r in runs)
    section.text(
        f"""LiteLLM: each process's `BudgetManager` ended believing the user had spent {views}
        calls' worth (its own calls: it never re-reads the file), and the file kept
        {"; ".join(r["detail"] for r in runs)}: **{ll["lost"]:,} of {ll["acked"]:,} lost**."""
    )
    section.text(
        """Caveats: PyrateLimiter is a rate limiter, not a ledger (an item per unit of weight,
        no balance, no history); `InMemoryBucket` and `MemoryStore` are per process, and
        LiteLLM has no in-memory mode. The like-for-like of LiteLLM is SQLiteStore `normal`
        (neither fsyncs each write)."""
    )
    section.faster(
        "1 process, memory: creditmeter MemoryStore charge(user, 1) ahead of PyrateLimiter "
        "InMemoryBucket try_acquire(user, 1)",
        *(rounds, CM_MEM, PY_MEM),
    )
    section.faster(
        "1 process, file, synchronous FULL: SQLiteStore full charge(user, 1) ahead of "
        "PyrateLimiter SQLiteBucket (default)",
        *(rounds, CM_SQL["full", False], PY_SQL),
    )
    section.faster(
        "1 process, file, synchronous NORMAL: SQLiteStore normal charge(user, 1) ahead of "
        "PyrateLimiter SQLiteBucket use_file_lock=True",
        *(rounds, CM_SQL["normal", False], PY_SQL_LOCK),
    )

    def ahead(name: str, ours: float, theirs: float, *, judged: bool = True) -> None:
        measured = f"{fmt(ours, 0)} vs {fmt(theirs, 0)} ops/s ({ours / theirs:.2f}x)"
        section.check(name, ours > theirs if judged else None, measured)

    priced = {d: rounds[CM_SQL[d, True]].ops_per_s for d in ("full", "normal")}
    ahead(
        "1 process, file, no fsync: SQLiteStore normal priced charge ahead of LiteLLM "
        "update_cost (its better figure)",
        *(priced["normal"], litellm_best),
    )
    ahead(
        "1 process: SQLiteStore full priced charge vs LiteLLM update_cost (figure: full "
        "fsyncs, LiteLLM does not)",
        *(priced["full"], litellm_best),
        judged=False,
    )
    rate = {name: p["ops_per_s"] for name, p in mp.items()}
    where = "4 processes, one file: SQLiteStore"
    ahead(f"{where} normal ahead of LiteLLM BudgetManager", rate[MP_CM_NORMAL], rate[MP_LITELLM])
    ahead(
        f"{where} full ahead of PyrateLimiter SQLiteBucket (default)",
        *(rate[MP_CM_FULL], rate[MP_PY_SQL]),
    )
    ahead(
        f"{where} normal ahead of PyrateLimiter SQLiteBucket use_file_lock=True",
        *(rate[MP_CM_NORMAL], rate[MP_PY_SQL_LOCK]),
    )
    ahead(
        "4 processes: PyrateLimiter MultiprocessBucket (figure: shared memory, no creditmeter "
        "equivalent; SQLiteStore normal beside it)",
        *(rate[MP_CM_NORMAL], rate[MP_PY_MP]),
        judged=False,
    )
    for name, p in mp.items():
        lost = f"{p['lost']:,} lost of {p['acked']:,} acked"
        if name in (MP_CM_FULL, MP_CM_NORMAL):
            ledger = "yes" if p["ledger_ok"] else "no"
            detail = f"ledger = balance = acked: {ledger}; {p['errors']:,} errors"
            ok = p["lost"] == 0 and p["ledger_ok"] and p["errors"] == 0
            section.check(f"4 processes: 0 lost updates, {name}", ok, f"{lost}; {detail}")
    for name, p in mp.items():
        if name not in (MP_CM_FULL, MP_CM_NORMAL):
            share = f"{100 * p['lost'] / max(1, p['acked']):.1f}%"
            measured = (
                f"{p['lost']:,} lost of {p['acked']:,} acked ({share}); {p['errors']:,} errors"
            )
            section.check(f"4 processes: lost updates, {name} (figure)", None, measured)
    bad = [name for name, ok in checks.items() if not ok and not name.startswith("LiteLLM")]
    section.check(
        "1 process: every creditmeter and PyrateLimiter operation recorded exactly once",
        not bad,
        "all recorded" if not bad else "not recorded: " + "; ".join(bad),
    )
    section.data = {"single": {n: s.wall for n, s in rounds.series.items()}}
    return section
