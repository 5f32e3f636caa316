"""Redis Cluster: charges per second with users on one master or three, and min_replicas=1.

Eight writer processes (forked, each with a store of its own) charge for a
fixed time, users chosen among 64 in turn. "1 master": every user's shard has
its slot on the master of 127.0.0.1:7000; "3 masters": users of every shard,
so of all three masters; "3 masters, min_replicas=1": the same, each commit
followed by WAIT 1. Needs the local cluster of ``tools/redis-cluster``.
"""

from __future__ import annotations

import multiprocessing
import time
import uuid
from pathlib import Path

from harness import Section
from harness.report import fmt

from creditmeter import BalanceConfig, BalanceManager
from creditmeter.stores.redis import RedisStore
from creditmeter.stores.redis.cluster import key_slot, shard_of, shard_tags

TITLE = "Redis Cluster: one master or three, and the cost of min_replicas=1"
URL = "redis+cluster://127.0.0.1:7000"
WRITERS = 8
USERS = 64
CONFIG = BalanceConfig(enabled=True, start_balance=10**12)


def _writer(url: str, prefix: str, users: list[str], seconds: float, out: object) -> None:
    store = RedisStore(url, prefix=prefix)
    meter = BalanceManager(store, CONFIG)
    count, latencies = 0, []
    end = time.monotonic() + seconds
    while (now := time.monotonic()) < end:
        meter.charge(users[count % len(users)], 1)
        latencies.append(time.monotonic() - now)
        count += 1
    store.close()
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
    out.put((count, p50, p99))  # type: ignore[attr-defined]


def _users(on_first_master: bool) -> list[str]:
    tags = shard_tags()
    first = {n for n, tag in enumerate(tags) if key_slot(tag) <= 5460}  # 7000's slots
    found, n = [], 0
    while len(found) < USERS:
        user = f"user-{n}"
        if not on_first_master or shard_of(user) in first:
            found.append(user)
        n += 1
    return found


def _measure(
    users: list[str], min_replicas: int, seconds: float, writers: int = WRITERS
) -> tuple[float, float, float]:
    prefix = f"bench-{uuid.uuid4().hex[:8]}:"
    url = f"{URL}?min_replicas={min_replicas}"
    with RedisStore(url, prefix=prefix) as store:  # open the accounts first
        meter = BalanceManager(store, CONFIG)
        for user in users:
            meter.balance(user)
    context = multiprocessing.get_context("fork")
    out = context.Queue()
    workers = [
        context.Process(target=_writer, args=(url, prefix, users, seconds, out))
        for _ in range(writers)
    ]
    for worker in workers:
        worker.start()
    found = [out.get(timeout=seconds + 60) for _ in workers]
    for worker in workers:
        worker.join()
    _drop(prefix)
    total = sum(count for count, _, _ in found)
    median = sorted(p50 for _, p50, _ in found)[len(found) // 2]
    worst = max(p99 for _, _, p99 in found)
    return total / seconds, median * 1000, worst * 1000


def _drop(prefix: str) -> None:
    import redis.cluster  # noqa: PLC0415

    with redis.cluster.RedisCluster(host="127.0.0.1", port=7000) as client:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000, target_nodes="primaries"))
        for key in keys:
            client.unlink(key)


def run(*, quick: bool, workdir: Path) -> Section:
    """The three runs; a table of charges/s and latencies."""
    del workdir
    seconds = 2.0 if quick else 5.0
    section = Section(TITLE)
    spread = _users(on_first_master=False)
    cases = [
        ("1 master", _users(on_first_master=True), 0, WRITERS),
        ("3 masters", spread, 0, WRITERS),
        ("3 masters, min_replicas=1", spread, 1, WRITERS),
        ("3 masters, 1 writer", spread, 0, 1),
        ("3 masters, 1 writer, min_replicas=1", spread, 1, 1),
    ]
    rows = []
    for name, users, min_replicas, writers in cases:
        rate, p50, p99 = _measure(users, min_replicas, seconds, writers)
        rows.append([name, fmt(rate, 0), fmt(p50, 2), fmt(p99, 2)])
    section.text(
        f"""{WRITERS} writer processes (or one, to see the cost of a WAIT alone), each a
        `BalanceManager` on a `RedisStore` of its own, charge 1 credit for {seconds:g} s,
        going round {USERS} users, on the local cluster of `tools/redis-cluster` (three
        masters and three replicas on this
        machine). Latency: the median over the writers of each one's median, and the
        worst p99."""
    )
    section.table(["users on", "charges/s", "p50 ms", "p99 ms"], rows)
    return section
