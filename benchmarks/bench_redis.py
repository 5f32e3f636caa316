"""RedisStore speed and contention benchmark (issue 6, "Benchmark").

Measures, in one run against one Redis server:

1. One process: ``BalanceManager(RedisStore(url)).charge(user, 1)`` against its
   raw floor, the same commit script called by hand with redis-py (``EVALSHA``
   with the store's keys and arguments of the same shape and length), batches
   interleaved. A PING round trip is shown for scale.
2. Four processes charging one user, started together behind a barrier:
   - the store, as a gateway runs it (manager, default ``RetryPolicy``: after
     a lost compare-and-set, writers take the user's lock in turn);
   - the store with ``exclusive`` hidden (the retry policy alone);
   - raw floor "CAS loop": the commit script by hand, retried at once from the
     account the conflict reports, without limit (no fairness, no give-up);
   - raw floor "in turn": by hand, every charge takes the user's lock (the
     acquire script, BLPOP when queued) and commits with the commit script.

Every run checks the final balance and ledger against the acknowledged
charges (lost updates) and counts charges that failed.

Usage::

    python benchmarks/bench_redis.py [--quick] [--url redis://127.0.0.1:6379/15]
                                     [--output benchmarks/RESULTS-redis.md]

A full run writes ``benchmarks/RESULTS-redis.md`` unless ``--output`` says
otherwise; ``--quick`` writes only when ``--output`` is given. Keys live under
a fresh prefix (``cmbench:<random>:``) and are deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import redis
from common import cpu_model, percentile, source_state

import creditmeter
from creditmeter import BalanceConfig, BalanceManager, StoreError, VersionConflict
from creditmeter.stores.redis import ACQUIRE_SCRIPT, COMMIT_SCRIPT, RECHECK_SCRIPT, RedisStore

now_ns = time.perf_counter_ns
USER = "user-1"
START = 10**9
# Balances never clamp: every charge moves exactly one credit.
CONFIG = BalanceConfig(enabled=True, start_balance=START, allow_negative_balance=True)
STAMP = "2026-01-01T00:00:00.000000+00:00"
ACCOUNT_TEXT = (
    '{{"user_id":"{user}","balance":"{balance}","version":{version},'
    f'"created_at":"{STAMP}","updated_at":"{STAMP}","last_refill":"{STAMP}","schema":1}}}}'
)
ENTRY_TEXT = (
    '{{"id":"0123456789abcdef-{seq:x}","user_id":"{user}","kind":"charge","amount":"-1",'
    f'"balance_after":"{{balance}}","at":"{STAMP}","cost":"1","schema":1}}}}'
)
LEASE_MS = b"2000"


@dataclass(frozen=True)
class Sizes:
    one_ops: int
    one_repeats: int
    procs: int
    proc_ops: int
    proc_runs: int
    deadline_s: float


QUICK = Sizes(one_ops=300, one_repeats=3, procs=4, proc_ops=250, proc_runs=1, deadline_s=30)
FULL = Sizes(one_ops=2_000, one_repeats=7, procs=4, proc_ops=1_000, proc_runs=3, deadline_s=60)


def fmt(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


def drop_keys(url: str, prefix: str) -> None:
    with redis.Redis.from_url(url) as client:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])


def user_keys(prefix: str, user: str = USER) -> list[bytes]:
    """The store's keys of a user, in the commit script's KEYS order."""
    base = f"{prefix}{{u{user.encode().hex()}}}:".encode()
    return [
        base + part for part in (b"account", b"ledger", b"requests", b"lock", b"lock-queue")
    ] + [base + b"wake:"]


class RawCharger:
    """Charges of 1 by hand with the store's own scripts, shaped like the store's arguments."""

    def __init__(self, client: redis.Redis, prefix: str, tag: str) -> None:
        self.client = client
        self.keys = user_keys(prefix)
        self.tag = tag
        self.seq = 0
        self.commit_sha = client.script_load(COMMIT_SCRIPT)
        self.acquire_sha = client.script_load(ACQUIRE_SCRIPT)
        self.recheck_sha = client.script_load(RECHECK_SCRIPT)
        self.version, self.balance = self.read()

    def read(self) -> tuple[int, int]:
        data = json.loads(self.client.hget(self.keys[0], "d"))
        return data["version"], int(data["balance"])

    def commit(self, lock_token: bytes = b"") -> object:
        self.seq += 1
        version, balance = self.version + 1, self.balance - 1
        return self.client.evalsha(
            self.commit_sha,
            6,
            *self.keys,
            str(self.version),
            str(version),
            ACCOUNT_TEXT.format(user=USER, balance=balance, version=version),
            f"{self.tag}-{self.seq:x}",
            USER,
            lock_token,
            LEASE_MS,
            "",
            ENTRY_TEXT.format(seq=self.seq, user=USER, balance=balance),
        )

    def charge_cas(self) -> int:
        """Commit from the version last seen; on a conflict retry at once from the reported one."""
        conflicts = 0
        while True:
            reply = self.commit()
            if reply == 0:
                self.version += 1
                self.balance -= 1
                return conflicts
            conflicts += 1
            data = json.loads(reply[1])
            self.version, self.balance = data["version"], int(data["balance"])

    def charge_in_turn(self) -> int:
        """Take the user's lock (queueing if held), then commit; the commit passes it on."""
        self.seq += 1
        token = f"{self.tag}-lock-{self.seq:x}".encode()
        lock, queue, account = self.keys[3], self.keys[4], self.keys[0]
        reply = self.client.evalsha(self.acquire_sha, 3, lock, queue, account, token, LEASE_MS)
        waited = 0
        while reply[0] != 1:
            waited = 1
            popped = self.client.blpop([self.keys[5] + token], timeout=0.25)
            if popped is not None:
                reply = [1, popped[1]]
                break
            reply = self.client.evalsha(
                self.recheck_sha, 4, lock, queue, account, self.keys[5] + token, token, LEASE_MS
            )
        data = json.loads(reply[1])
        self.version, self.balance = data["version"], int(data["balance"])
        if self.commit(token) != 0:
            raise AssertionError("a commit under the lock lost")
        self.version += 1
        self.balance -= 1
        return waited


# --- 1. one process ------------------------------------------------------------------


def bench_one(url: str, sizes: Sizes) -> dict[str, object]:
    prefix_store = f"cmbench:{uuid.uuid4().hex[:10]}:"
    prefix_raw = f"cmbench:{uuid.uuid4().hex[:10]}:"
    store = RedisStore(url, prefix=prefix_store)
    manager = BalanceManager(store, CONFIG)
    client = redis.Redis.from_url(url)
    try:
        manager.account(USER)
        with RedisStore(url, prefix=prefix_raw) as seeding:
            BalanceManager(seeding, CONFIG).account(USER)
        raw = RawCharger(client, prefix_raw, "raw")

        def charge_one() -> None:
            manager.charge(USER, 1)

        for _ in range(50):  # warm both paths
            manager.charge(USER, 1)
            raw.charge_cas()
            client.ping()
        series: dict[str, list[float]] = {"store": [], "floor": [], "ping": []}
        cpu: dict[str, list[float]] = {"store": [], "floor": [], "ping": []}
        for _ in range(sizes.one_repeats):
            # Store and floor alternate op by op, so both see the same machine load.
            spent = {"store": [0, 0], "floor": [0, 0]}
            for _ in range(sizes.one_ops):
                for name, call in (("store", charge_one), ("floor", raw.charge_cas)):
                    wall, thread = now_ns(), time.thread_time_ns()
                    call()
                    spent[name][0] += now_ns() - wall
                    spent[name][1] += time.thread_time_ns() - thread
            for name, (wall, thread) in spent.items():
                series[name].append(wall / sizes.one_ops / 1000)
                cpu[name].append(thread / sizes.one_ops / 1000)
            wall, thread = now_ns(), time.thread_time_ns()
            for _ in range(sizes.one_ops):
                client.ping()
            series["ping"].append((now_ns() - wall) / sizes.one_ops / 1000)
            cpu["ping"].append((time.thread_time_ns() - thread) / sizes.one_ops / 1000)
        charges = sizes.one_ops * sizes.one_repeats + 50
        account = store.load(USER)
        ledger = store.ledger(USER)
        lost = (START - charges) - int(account.balance)
        entries_ok = len(ledger) == charges + 1 and sum(e.amount for e in ledger) == account.balance
        raw_version, raw_balance = raw.read()
        lost_raw = (START - charges) - raw_balance
    finally:
        store.close()
        client.close()
        drop_keys(url, prefix_store)
        drop_keys(url, prefix_raw)
    ratios = [s / f for s, f in zip(series["store"], series["floor"], strict=True)]
    return {
        "series": series,
        "cpu": cpu,
        "ratios": ratios,
        "lost": lost,
        "lost_raw": lost_raw,
        "entries_ok": entries_ok,
        "raw_version": raw_version,
    }


# --- 2. four processes, one user -------------------------------------------------


class CountingStore(RedisStore):
    commits = 0
    conflicts = 0
    turns = 0

    def commit(self, account, entries, *, expected_version):
        type(self).commits += 1
        try:
            super().commit(account, entries, expected_version=expected_version)
        except VersionConflict:
            type(self).conflicts += 1
            raise

    def exclusive(self, user_id):
        type(self).turns += 1
        return super().exclusive(user_id)


class RetryOnlyStore(CountingStore):
    """The store without ``exclusive``: the manager relies on its retry policy alone."""

    exclusive = None  # the manager looks it up with getattr(store, "exclusive", None)


def _worker(variant, index, url, prefix, ops, deadline_s, barrier, queue) -> None:
    latencies: list[float] = []
    failed = conflicts = commits = turns = 0
    error = ""
    client = None
    store = None
    try:
        if variant in ("store", "store-retry-only"):
            store_class = CountingStore if variant == "store" else RetryOnlyStore
            store = store_class(url, prefix=prefix)
            manager = BalanceManager(store, CONFIG)
            manager.account(USER)

            def charge():
                manager.charge(USER, 1)
                return 0

        else:
            client = redis.Redis.from_url(url)
            raw = RawCharger(client, prefix, f"p{index}")
            charge = raw.charge_cas if variant == "raw-cas" else raw.charge_in_turn
        barrier.wait()
        started = now_ns()
        stop_at = started + int(deadline_s * 1e9)
        for _ in range(ops):
            begun = now_ns()
            try:
                conflicts += charge()
            except (VersionConflict, StoreError) as exc:
                failed += 1
                error = f"{type(exc).__name__}: {exc}"
            latencies.append((now_ns() - begun) / 1e6)
            if now_ns() > stop_at:
                break
        wall = (now_ns() - started) / 1e9
        if store is not None:
            conflicts, commits, turns = store.conflicts, store.commits, store.turns
    finally:
        if store is not None:
            store.close()
        if client is not None:
            client.close()
    queue.put(
        {
            "index": index,
            "done": len(latencies) - failed,
            "failed": failed,
            "error": error,
            "wall": wall,
            "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99),
            "max": max(latencies),
            "conflicts": conflicts,
            "commits": commits,
            "turns": turns,
        }
    )


def run_contention(url: str, variant: str, sizes: Sizes) -> dict[str, object]:
    prefix = f"cmbench:{uuid.uuid4().hex[:10]}:"
    with RedisStore(url, prefix=prefix) as seeding:
        BalanceManager(seeding, CONFIG).account(USER)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(sizes.procs)
    queue = context.Queue()
    procs = [
        context.Process(
            target=_worker,
            args=(variant, n, url, prefix, sizes.proc_ops, sizes.deadline_s, barrier, queue),
        )
        for n in range(sizes.procs)
    ]
    try:
        for proc in procs:
            proc.start()
        results = [queue.get(timeout=sizes.deadline_s + 120) for _ in procs]
        for proc in procs:
            proc.join(timeout=30)
        with RedisStore(url, prefix=prefix) as store:
            account = store.load(USER)
            ledger = store.ledger(USER)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        drop_keys(url, prefix)
    done = sum(r["done"] for r in results)
    charged = START - int(account.balance)
    charges_in_ledger = sum(1 for e in ledger if e.kind.value == "charge")
    return {
        "variant": variant,
        "results": results,
        "done": done,
        "failed": sum(r["failed"] for r in results),
        "errors": sorted({r["error"] for r in results if r["error"]}),
        "wall": max(r["wall"] for r in results),
        "ops_per_s": done / max(r["wall"] for r in results),
        "lost": done - charged,
        "ledger_ok": charges_in_ledger == charged
        and sum(e.amount for e in ledger) == account.balance,
        "conflicts": sum(r["conflicts"] for r in results),
        "commits": sum(r["commits"] for r in results),
        "turns": sum(r["turns"] for r in results),
        "p50": max(r["p50"] for r in results),
        "p99": max(r["p99"] for r in results),
        "max": max(r["max"] for r in results),
        "fewest": min(r["done"] for r in results),
    }


VARIANTS = {
    "store": "RedisStore (manager, default RetryPolicy; in turn after a lost CAS)",
    "store-retry-only": "RedisStore without exclusive() (retry policy alone)",
    "raw-cas": "raw floor: commit script by hand, CAS loop, unbounded immediate retries",
    "raw-turn": "raw floor: lock script + commit script by hand, every charge in turn",
}


# --- the report ------------------------------------------------------------------------


def server_info(url: str) -> str:
    with redis.Redis.from_url(url) as client:
        info = client.info("server")
    return f"Redis {info['redis_version']} ({info.get('arch_bits', '?')}-bit, {url})"


def row(target: str, measured: str, ok: bool) -> str:
    return f"| {target} | {measured} | {'yes' if ok else 'no'} |"


def render(one: dict[str, object], runs: list[dict[str, object]], args, elapsed: float) -> str:
    series = one["series"]
    store_us = statistics.median(series["store"])
    floor_us = statistics.median(series["floor"])
    ping_us = statistics.median(series["ping"])
    ratio = store_us / floor_us
    cpu = one["cpu"]
    cpu_store = statistics.median(cpu["store"])
    cpu_floor = statistics.median(cpu["floor"])
    lines = [
        "# creditmeter RedisStore benchmark",
        "",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- CPUs (nproc): {os.cpu_count()}; CPU: {cpu_model()}",
        f"- OS: {platform.system()} {platform.release()} ({platform.machine()})",
        (
            f"- Python {platform.python_version()}, redis-py {metadata.version('redis')}, "
            f"{server_info(args.url)}"
        ),
        f"- creditmeter {creditmeter.__version__}: {source_state()}",
        (
            f"- Command: `python benchmarks/bench_redis.py{' --quick' if args.quick else ''}` "
            f"({elapsed:.0f} s); 1-minute load average: {args.load:.2f} at start, "
            f"{os.getloadavg()[0]:.2f} at the end (the machine may be shared)"
        ),
        (
            "- Timer: `time.perf_counter_ns`; µs/op is the median over batches "
            "(each batch's time / its ops); ops/s = 1e6 / median µs/op; CPU µs/op is "
            "`time.thread_time_ns` of the benchmark process alone (not the server's)."
        ),
        "",
        "## 1. One process",
        "",
        (
            f"{args.sizes.one_repeats} rounds of {args.sizes.one_ops:,} ops; in each round the "
            "store and the floor alternate op by op (each op timed alone), then the PINGs run. "
            "Store: `BalanceManager(RedisStore(url), "
            "BalanceConfig(enabled=True, allow_negative_balance=True)).charge('user-1', 1)` "
            "(validate, plan, serialize, one EVALSHA). Floor: the same commit script by hand, "
            "`client.evalsha(sha, 6, *keys, *args)` with the store's keys and arguments of the "
            "same shape (account and entry JSON of the same length, a commit token), keeping "
            "the version locally."
        ),
        "",
        "| what | median µs/op | min | max | ops/s | x floor | CPU µs/op | CPU x floor |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, label in (
        ("floor", "floor: commit script by hand (EVALSHA)"),
        ("store", "RedisStore charge through BalanceManager"),
        ("ping", "PING round trip (redis-py), for scale"),
    ):
        values = series[name]
        median = statistics.median(values)
        cpu_median = statistics.median(cpu[name])
        lines.append(
            f"| {label} | {fmt(median)} | {fmt(min(values))} | {fmt(max(values))} | "
            f"{fmt(1e6 / median, 0)} | {median / floor_us:.2f} | {fmt(cpu_median)} | "
            f"{cpu_median / cpu_floor:.2f} |"
        )
    lines += [
        "",
        (
            f"Store / floor: **{ratio:.2f}x** (per round: median "
            f"{statistics.median(one['ratios']):.2f}, {min(one['ratios']):.2f}-"
            f"{max(one['ratios']):.2f}); the store adds {store_us - floor_us:.1f} µs per charge "
            f"({cpu_store - cpu_floor:.1f} µs of CPU) over the script it sends. Lost updates: "
            f"store {one['lost']}, floor {one['lost_raw']}; ledger = charges and sums to the "
            f"balance: {'yes' if one['entries_ok'] else 'NO'}."
        ),
        "",
        f"## 2. {args.sizes.procs} processes charging one user",
        "",
        (
            f"{args.sizes.procs} processes (multiprocessing, spawn) behind a barrier, each "
            f"doing {args.sizes.proc_ops:,} charges of 1; {args.sizes.proc_runs} run(s) of each "
            "variant, each on a fresh key prefix. Latency is per charge, retries and waits "
            "included. A failed charge is one that raised (the retry policy gave up). "
            "'lost CAS / waits': compare-and-sets lost (store, raw CAS loop) or charges that "
            "queued for the lock (raw in turn); 'turns': exclusive() blocks the managers opened."
        ),
        "",
        *(f"- **{name}**: {label}" for name, label in VARIANTS.items()),
        "",
        (
            "| variant | run | charges | failed | wall s | ops/s | p50 ms | worst p99 ms | "
            "worst max ms | fewest by a process | lost CAS / waits | commits | turns | "
            "lost updates | ledger = balance |"
        ),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for number, run in enumerate(runs, start=1):
        lines.append(
            f"| {run['variant']} | {number} | {run['done']:,} | {run['failed']} | "
            f"{run['wall']:.2f} | {fmt(run['ops_per_s'], 0)} | {run['p50']:.2f} | "
            f"{run['p99']:.2f} | {run['max']:.1f} | {run['fewest']} | {run['conflicts']:,} | "
            f"{run['commits'] or '-'} | {run['turns'] or '-'} | {run['lost']} | "
            f"{'yes' if run['ledger_ok'] else 'NO'} |"
        )
    by_variant: dict[str, list[dict[str, object]]] = {}
    for run in runs:
        by_variant.setdefault(run["variant"], []).append(run)
    medians = {v: statistics.median(r["ops_per_s"] for r in rs) for v, rs in by_variant.items()}
    lines += [
        "",
        "Median ops/s over runs, and the store's ratio to each floor (floor / store):",
        "",
    ]
    lines += ["| variant | ops/s | store is x slower |", "|---|---:|---:|"]
    for variant, value in medians.items():
        lines.append(f"| {variant} | {fmt(value, 0)} | {value / medians['store']:.2f} |")
    lines += [
        "",
        (
            "The raw CAS loop retries at once and without limit: it bounds throughput from "
            "above, but a manager must give up some time (the default RetryPolicy: 10 "
            "attempts, 2 s), and the retry-only store shows what that costs: writers that "
            "keep losing, and charges that fail. The raw in-turn floor does by hand what the "
            "store does under contention (lock script, BLPOP when queued, commit script that "
            "passes the lock on), without the manager: the like-for-like floor."
        ),
    ]
    errors = sorted({e for run in runs for e in run["errors"]})
    if errors:
        lines += ["", "Errors raised by failed charges (one per kind):", ""]
        lines += [f"- `{error[:200]}`" for error in errors]
    lost_all = sum(run["lost"] for run in runs) + one["lost"] + one["lost_raw"]
    turn_ratio = medians["raw-turn"] / medians["store"]
    cas_ratio = medians["raw-cas"] / medians["store"]
    store_failed = sum(run["failed"] for run in by_variant.get("store", []))
    lines += [
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        row("one process: within 1.5x of the floor", f"{ratio:.2f}x", ratio <= 1.5),
        row(
            f"{args.sizes.procs} processes: within 1.5x of the raw in-turn floor",
            f"{turn_ratio:.2f}x",
            turn_ratio <= 1.5,
        ),
        row(
            f"{args.sizes.procs} processes: within 1.5x of the raw CAS-loop floor",
            f"{cas_ratio:.2f}x",
            cas_ratio <= 1.5,
        ),
        row("no charge through the store fails", f"{store_failed} failed", store_failed == 0),
        row("0 lost updates (every run, every variant)", str(lost_all), lost_all == 0),
        "",
        f"(One PING round trip here: {ping_us:.0f} µs.)",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes; prints only")
    parser.add_argument(
        "--url",
        default=os.environ.get("CREDITMETER_BENCH_REDIS", "redis://127.0.0.1:6379/15"),
        help="the Redis server (default: db 15 on 127.0.0.1:6379)",
    )
    parser.add_argument("--output", type=Path, help="where to write the report")
    args = parser.parse_args(argv)
    args.sizes = QUICK if args.quick else FULL
    args.load = os.getloadavg()[0]
    started = time.monotonic()
    print("one process ...", file=sys.stderr)
    one = bench_one(args.url, args.sizes)
    runs = []
    for number in range(args.sizes.proc_runs):
        for variant in VARIANTS:
            print(f"{variant}, run {number + 1} ...", file=sys.stderr)
            runs.append(run_contention(args.url, variant, args.sizes))
    report = render(one, runs, args, time.monotonic() - started)
    print(report)
    output = args.output
    if output is None and not args.quick:
        output = Path(__file__).with_name("RESULTS-redis.md")
    if output is not None:
        output.write_text(report)
        print(f"wrote {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
