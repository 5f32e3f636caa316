"""RedisStore and AsyncRedisStore on a real Redis Cluster (``tools/redis-cluster``).

The store contract suite and the random-operations state machine on both,
writers of one user in many threads, the URL and client forms, the options
the store reads itself, and a commit that waits for a replica. Skipped
without the cluster, failed under CREDITMETER_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import uuid
from decimal import Decimal
from pathlib import Path

import pytest
from backends import Backend, contract_store, in_threads
from cluster import CLUSTER_URL, drop_cluster_keys, fresh_prefix, node
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from creditmeter import (
    AsyncBalanceManager,
    BalanceConfig,
    BalanceManager,
    ConfigError,
    TokenUsage,
    Unmetered,
)
from creditmeter.exceptions import ReplicationTimeout
from creditmeter.queries import EntryQuery
from creditmeter.stores import open_async_store, open_store
from creditmeter.stores.redis import AsyncRedisStore, RedisStore
from creditmeter.stores.redis.cluster import SHARDS, key_slot, shard_of, shard_tags
from creditmeter.testing import StoreContract

KINDS = ("redis-cluster", "async-redis-cluster")


class TestClusterStoreContract(StoreContract):
    """``StoreContract`` on the cluster stores, sync and async."""

    @pytest.fixture(params=KINDS)
    def store(self, request, tmp_path):
        yield from contract_store("redis-cluster", request.param.startswith("async-"), tmp_path)


def _machines():
    folder = str(Path(__file__).resolve().parents[1] / "manager")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module("test_state_machine").MACHINES


@pytest.mark.parametrize(("kind", "examples"), [("redis-cluster", 8), ("async-redis-cluster", 5)])
def test_random_operations_match_the_model(kind, examples, tmp_path):
    backend = Backend(kind, tmp_path)
    try:
        run_state_machine_as_test(
            lambda: _machines()["when-depleted"](backend),
            settings=settings(
                max_examples=examples,
                stateful_step_count=30,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
    finally:
        backend.close()


@pytest.fixture
def prefix():
    yield from fresh_prefix(restored=False)


def test_writers_of_one_user_in_threads_lose_nothing(prefix):
    """Eight threads, two stores, one user: every charge lands once and the ledger sums."""
    stores = [RedisStore(CLUSTER_URL, prefix=prefix) for _ in range(2)]
    config = BalanceConfig(enabled=True, start_balance=0, allow_negative_balance=True)
    meters = [BalanceManager(store, config) for store in stores]
    try:
        in_threads(8, lambda n: [meters[n % 2].charge("hot", 1) for _ in range(40)])
        ledger = meters[0].ledger("hot")
        assert meters[0].balance("hot") == -320
        assert sum(entry.amount for entry in ledger) == -320
        assert len(ledger) == 321  # the opening entry and 320 charges
    finally:
        for store in stores:
            store.close()


def test_async_writers_initialise_the_cluster_client_once(prefix):
    """Many first calls at once on a new async store all work (one initialisation)."""

    async def main():
        store = AsyncRedisStore(CLUSTER_URL, prefix=prefix)
        meter = AsyncBalanceManager(store, BalanceConfig(enabled=True))
        try:
            await asyncio.gather(*(meter.charge(f"u{n}", 1) for n in range(50)))
            assert len(await store.users()) == 50
        finally:
            await store.aclose()

    asyncio.run(main())


def test_opened_by_url_and_from_a_client(prefix):
    """``redis+cluster://`` opens the cluster store; so does a RedisCluster client given."""
    import redis.cluster  # noqa: PLC0415

    with open_store(f"{CLUSTER_URL}?prefix={prefix}") as store:
        BalanceManager(store, BalanceConfig(enabled=True)).grant("x", 5)
    client = redis.cluster.RedisCluster(host="127.0.0.1", port=7000)
    try:
        with RedisStore(client=client, prefix=prefix, min_replicas=1) as store:
            assert BalanceManager(store, BalanceConfig(enabled=True)).balance("x") == 20005
    finally:
        client.close()

    async def main():
        store = open_async_store(f"{CLUSTER_URL}?prefix={prefix}")
        try:
            assert await store.users() == ["x"]
        finally:
            await store.aclose()

    asyncio.run(main())


def test_a_user_and_its_shard_share_one_slot(prefix):
    """Every key a commit writes is in one slot; the shards spread over the slots."""
    tags = shard_tags()
    assert len(tags) == SHARDS == len({key_slot(tag) for tag in tags})
    assert [key_slot(tag) * SHARDS // 16384 for tag in tags] == list(range(SHARDS))
    with RedisStore(CLUSTER_URL, prefix=prefix) as store:
        BalanceManager(store, BalanceConfig(enabled=True)).charge("someone", 1)
        shard = shard_of("someone")
        with node(7000) as client:
            slots = {client.cluster("keyslot", key) for key in store._layout.keys("someone")}
            slots |= {client.cluster("keyslot", key) for key in store._layout.shards[shard]}
        assert len(slots) == 1


def test_min_replicas_waits_for_a_replica(prefix):
    """With one replica a master, min_replicas=1 commits; asking for two raises, written."""
    with RedisStore(CLUSTER_URL, prefix=prefix, min_replicas=1) as store:
        meter = BalanceManager(store, BalanceConfig(enabled=True))
        meter.charge("u", 1, request_id="r1")
    url = f"{CLUSTER_URL}?min_replicas=2&replica_timeout=0.05"
    with RedisStore(url, prefix=prefix) as store:
        meter = BalanceManager(store, BalanceConfig(enabled=True))
        with pytest.raises(ReplicationTimeout) as raised:
            meter.charge("u", 2, request_id="r2")
        assert (raised.value.wanted, raised.value.confirmed) == (2, 1)
        # applied all the same, and a repeat with the same request id applies nothing more
        assert meter.balance("u") == 20000 - 3
        assert meter.charge("u", 2, request_id="r2").amount == -2
        assert meter.balance("u") == 20000 - 3


def test_min_replicas_waits_for_a_replica_after_a_delta(prefix):
    """A hot user's charge goes as a delta; min_replicas waits on it as on a commit."""
    config = BalanceConfig(enabled=True)
    with RedisStore(CLUSTER_URL, prefix=prefix) as other:
        BalanceManager(other, config).charge("u", 1)
        url = f"{CLUSTER_URL}?min_replicas=2&replica_timeout=0.05"
        with RedisStore(url, prefix=prefix) as store:
            meter = BalanceManager(store, config)
            account = store.load("u")
            BalanceManager(other, config).charge("u", 1)  # what the meter saw is stale now
            meter._remember(account)
            sent = []
            commit_delta = store.commit_delta

            def counting(*args, **kwargs):
                sent.append("delta")
                return commit_delta(*args, **kwargs)

            store.commit_delta = counting
            with pytest.raises(ReplicationTimeout) as raised:
                meter.charge("u", 2, request_id="r1")
            assert sent == ["delta"]  # the commit lost; its retry went as a delta
            assert (raised.value.wanted, raised.value.confirmed) == (2, 1)
            assert other.load("u").balance == 20000 - 4  # applied all the same
            assert meter.charge("u", 2, request_id="r1").amount == -2
            assert other.load("u").balance == 20000 - 4


def test_bad_min_replicas_is_a_config_error_and_writes_nothing(prefix):
    """Tried: -1, 1.5, "x", "", True, None-like "none", 10**6, and two values that disagree,
    in the URL and as a keyword; also bad replica_timeout / retry_timeout (0, -1, "x")."""
    bad_urls = [
        f"{CLUSTER_URL}?min_replicas=-1",
        f"{CLUSTER_URL}?min_replicas=1.5",
        f"{CLUSTER_URL}?min_replicas=x",
        f"{CLUSTER_URL}?min_replicas=",
        f"{CLUSTER_URL}?min_replicas=none",
        f"{CLUSTER_URL}?min_replicas=1000000",
        f"{CLUSTER_URL}?replica_timeout=0",
        f"{CLUSTER_URL}?retry_timeout=x",
    ]
    for url in bad_urls:
        with pytest.raises(ConfigError):
            RedisStore(url, prefix=prefix)
        with pytest.raises(ConfigError):
            open_async_store(f"{url}&prefix={prefix}")
    for value in (-1, 1.5, "x", True, 10**6, Decimal(1)):
        with pytest.raises(ConfigError):
            RedisStore(CLUSTER_URL, prefix=prefix, min_replicas=value)
    with pytest.raises(ConfigError):
        RedisStore(f"{CLUSTER_URL}?min_replicas=1", prefix=prefix, min_replicas=2)
    with pytest.raises(ConfigError):
        RedisStore(CLUSTER_URL, prefix=prefix, replica_timeout=-1)
    with RedisStore(CLUSTER_URL, prefix=prefix) as store:
        assert store.users() == []


def test_scan_while_writing_misses_nothing(prefix):
    """Paging every user's entries while two threads commit sees each entry once, in id order."""
    with RedisStore(CLUSTER_URL, prefix=prefix) as store:
        meter = BalanceManager(store, BalanceConfig(enabled=True))
        users = [f"user-{n}" for n in range(20)]
        for user in users:
            meter.charge(user, 1)
        stop = []

        def write(number):
            count = 0
            while not stop:
                meter.charge(users[(count * 2 + number) % len(users)], 1)
                count += 1
            return count

        def read(_):
            seen, position = [], None
            for _ in range(200):
                scan = store.scan_entries(
                    EntryQuery(None, None, None, None), after=position, limit=7
                )
                seen += [entry.id for entry in scan.entries]
                position = scan.position or position
            stop.append(True)
            return seen

        results = in_threads(3, lambda n: read(n) if n == 2 else write(n))
        seen = results[2]
        assert len(seen) == len(set(seen))
        rest = store.scan_entries(EntryQuery(None, None, None, None), after=None, limit=100_000)
        every = [entry.id for entry in rest.entries]
        assert every[: len(seen)] == seen  # a prefix of the whole log, nothing skipped
        assert len(every) == sum(len(meter.ledger(user)) for user in users)


def test_prefix_namespaces_are_apart(prefix):
    """Two prefixes on one cluster see only their own users."""
    other = f"{prefix}other-{uuid.uuid4().hex[:6]}:"
    try:
        with (
            RedisStore(CLUSTER_URL, prefix=prefix) as one,
            RedisStore(CLUSTER_URL, prefix=other) as two,
        ):
            BalanceManager(one, BalanceConfig(enabled=True)).grant("a", 1)
            assert two.users() == []
    finally:
        drop_cluster_keys(other)


def test_a_metered_call_whose_charge_is_not_replicated_is_charged_once_not_unmetered(
    prefix, caplog
):
    """The charge was written: a warning says so, and no Unmetered event invites a repeat."""
    events = []
    with RedisStore(CLUSTER_URL, prefix=prefix) as store:
        BalanceManager(store, BalanceConfig(enabled=True)).account("alice")  # opened, replicated
    url = f"{CLUSTER_URL}?min_replicas=2&replica_timeout=0.05"  # one replica per master
    with RedisStore(url, prefix=prefix) as store:
        meter = BalanceManager(store, BalanceConfig(enabled=True), on_event=events.append)

        @meter.metered(user="user_id")
        def call(*, user_id):
            return TokenUsage(input=10, output=5)

        with caplog.at_level("WARNING", logger="creditmeter"):
            assert call(user_id="alice") == TokenUsage(input=10, output=5)
        charges = [e for e in meter.ledger("alice") if e.kind.value == "charge"]
        assert len(charges) == 1
        assert charges[0].amount == -15
        assert not [e for e in events if isinstance(e, Unmetered)]
        assert "not confirmed by enough replicas" in caplog.text


def test_a_metered_call_whose_hold_is_not_replicated_is_refused_and_its_hold_lapses(prefix):
    """Before the call the outcome is unknown to the caller: refused (on_store_error closed);
    the hold that was written lapses at its ttl and charges nothing."""
    with RedisStore(CLUSTER_URL, prefix=prefix) as store:
        BalanceManager(store, BalanceConfig(enabled=True)).account("alice")
    url = f"{CLUSTER_URL}?min_replicas=2&replica_timeout=0.05"
    calls = []
    with RedisStore(url, prefix=prefix) as store:
        meter = BalanceManager(store, BalanceConfig(enabled=True))

        @meter.metered(user="user_id", model="model", estimate=lambda **_: 100)
        def call(*, user_id, model="gpt-4o"):
            calls.append(user_id)
            return TokenUsage(input=10, output=5)

        with pytest.raises(ReplicationTimeout):
            call(user_id="alice")
    assert calls == []
    with RedisStore(CLUSTER_URL, prefix=prefix) as store:
        account = BalanceManager(store, BalanceConfig(enabled=True)).account("alice")
        assert len(account.holds) == 1  # written, unconfirmed: it lapses at its ttl
        assert [e.kind.value for e in store.ledger("alice")] == ["open"]
