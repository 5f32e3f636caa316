"""The cluster store while the cluster reshards and fails over, with 4 processes charging.

Each process charges users of every shard with a request id per charge and,
when a charge raises ``StoreError`` (outcome unknown, or not confirmed by
enough replicas), repeats it with the same request id until it is
acknowledged. Afterwards: an acknowledged charge is in its user's ledger
exactly once unless a failover lost it, and every ledger sums to its balance.
Each test puts the cluster back as it found it (``cluster.restore``).
"""

from __future__ import annotations

import collections
import multiprocessing
import time

import pytest
from cluster import (
    CLUSTER_URL,
    failover,
    fresh_prefix,
    move_slot,
    replica_of,
    wait_replicated,
)

from creditmeter import BalanceConfig, BalanceManager, StoreError
from creditmeter.stores.redis import RedisStore
from creditmeter.stores.redis.cluster import SHARDS, key_slot, shard_of, shard_tags

CONFIG = BalanceConfig(enabled=True, start_balance=0, allow_negative_balance=True)
WRITERS = 4
USERS = [f"user-{n}" for n in range(24)]


def _charge(url, prefix, number, users, stop, done, results):
    """One writer process: charge until ``stop``; count in ``done[number]``; put what it saw."""
    store = RedisStore(url, prefix=prefix, retry_timeout=20)
    meter = BalanceManager(store, CONFIG)
    acked, errors, count = [], collections.Counter(), 0
    try:
        while not stop.is_set():
            request_id = f"w{number}-{count}"
            user = users[(count * WRITERS + number) % len(users)]
            deadline = time.monotonic() + 30
            while True:
                try:
                    meter.charge(user, 1, request_id=request_id)
                    break
                except StoreError as exc:
                    errors[type(exc).__name__] += 1
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
            acked.append((user, request_id))
            count += 1
            done[number] = count
    finally:
        store.close()
        results.put((acked, dict(errors)))


def _wait_for(done, least, what):
    """Wait until every writer has acknowledged ``least`` charges (60 s at most)."""
    end = time.monotonic() + 60
    while min(done) < least:
        if time.monotonic() > end:
            raise AssertionError(f"writers stalled {what}: acknowledged {list(done)}")
        time.sleep(0.01)


def _under_load(prefix, disturb, url=CLUSTER_URL, *, each=20):
    """Run the writers; ``disturb()`` once each has charged ``each`` times; their charges.

    The writers stop once each has charged ``each`` times more after the
    disturbance, so every run has charges before, during and after it,
    however slow the machine.
    """
    context = multiprocessing.get_context("fork")
    stop, results = context.Event(), context.Queue()
    done = context.Array("i", WRITERS)
    workers = [
        context.Process(target=_charge, args=(url, prefix, n, USERS, stop, done, results))
        for n in range(WRITERS)
    ]
    for worker in workers:
        worker.start()
    try:
        _wait_for(done, each, "before the disturbance")
        disturb()
        _wait_for(done, max(done) + each, "after the disturbance")
    finally:
        stop.set()
        found = [results.get(timeout=60) for _ in workers]
        for worker in workers:
            worker.join(30)
    acked = [charge for charges, _ in found for charge in charges]
    errors = collections.Counter()
    for _, met in found:
        errors.update(met)
    return acked, errors


def _check(prefix, acked):
    """Lost acknowledged charges (in no ledger); asserts none is twice and ledgers sum."""
    with RedisStore(CLUSTER_URL, prefix=prefix) as store:
        meter = BalanceManager(store, CONFIG)
        recorded = collections.Counter()
        for user in USERS:
            ledger = meter.ledger(user)
            assert sum(entry.amount for entry in ledger) == meter.balance(user)
            recorded.update(entry.request_id for entry in ledger if entry.request_id)
        assert max(recorded.values()) == 1, "a charge was applied twice"
        return sum(1 for _, request_id in acked if recorded[request_id] == 0)


@pytest.fixture
def prefix():
    yield from fresh_prefix(restored=True)


def _slots_of(port_of_master):
    tags = shard_tags()
    from cluster import master_of_slot  # noqa: PLC0415

    return [
        key_slot(tag) for tag in tags if master_of_slot(key_slot(tag))["port"] == port_of_master
    ]


def test_resharding_under_load_loses_and_repeats_nothing(prefix):
    """The shards' slots of one master move to another and back while 4 processes charge."""
    assert {shard_of(user) for user in USERS} == set(range(SHARDS)) or len(USERS) < SHARDS
    moved = _slots_of(7000)

    def reshard():
        for slot in moved:
            move_slot(slot, 7001)
        time.sleep(0.3)
        for slot in moved:
            move_slot(slot, 7000)

    acked, errors = _under_load(prefix, reshard)
    assert acked
    assert _check(prefix, acked) == 0
    print(
        f"\nresharding: {len(acked)} charges acknowledged, {len(moved)} slots moved twice, "
        f"errors retried: {dict(errors)}"
    )


@pytest.mark.parametrize("min_replicas", [0, 1])
def test_failover_under_load(prefix, min_replicas):
    """A forced failover of 7000 while 4 processes charge: lost acknowledged charges.

    With ``min_replicas=1`` none is lost (a charge the old master took after
    its replica left is not confirmed, so it is repeated on the new master);
    with 0 some may be. Every operation after the failover succeeds.
    """
    replica = replica_of(7000)["port"]
    url = f"{CLUSTER_URL}?min_replicas={min_replicas}&replica_timeout=0.5"
    acked, errors = _under_load(prefix, lambda: failover(replica, force=True), url)
    lost = _check(prefix, acked)
    print(
        f"\nfailover, min_replicas={min_replicas}: {len(acked)} charges acknowledged, "
        f"{lost} lost; errors retried: {dict(errors)}"
    )
    if min_replicas:
        assert lost == 0
    wait_replicated(replica)  # the old master, now its replica, has caught up
    with RedisStore(url, prefix=prefix) as store:  # after it: every operation succeeds
        meter = BalanceManager(store, CONFIG)
        for user in USERS:
            meter.charge(user, 1)
