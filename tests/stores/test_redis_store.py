"""RedisStore and AsyncRedisStore on a real Redis server.

Without a server these tests skip saying how to start one; with
CREDITMETER_REQUIRE_SERVICES=1 they fail instead (see services.py). Every test
works under its own key prefix and deletes its keys afterwards.

Covered here, what is Redis's own: hostile user ids and the key layout (one
non-empty hash tag per user); clients that decode replies or speak RESP3; one
round trip per uncontended commit; writers served in turn under the user's
lock (``exclusive()``: others kept out, FIFO handover with the account, a
vanished holder, a wait that runs out, a cancelled async waiter); the scripts
flushed between commits; a connection cut in the middle of a run, a reply
lost after the script ran (with and without redis-py re-sending it), an idle
connection killed by the server, a closed port, corrupt data, a key of the
wrong type; and what the store closes.

Elsewhere, on every store: the contract suite (test_contract.py), the state
machine with two stores on one prefix and the manager's behaviour, threads
and tasks (tests/manager/), processes on one prefix (manager/test_processes.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import selectors
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import attrs
import pytest

if os.environ.get("CREDITMETER_REQUIRE_SERVICES") != "1":
    pytest.importorskip("redis", reason="the redis package is not installed: pip install redis")

import redis
import redis.asyncio
from redis.crc import key_slot
from services import REDIS_URL, need, unique

from creditmeter import (
    AsyncBalanceManager,
    BalanceConfig,
    BalanceManager,
    ConfigError,
    DuplicateRequest,
    EntryKind,
    InvalidInput,
    StoreError,
    VersionConflict,
    open_async_store,
    open_store,
)
from creditmeter.stores.redis import COMMIT_SCRIPT, DEFAULT_PREFIX, AsyncRedisStore, RedisStore
from creditmeter.testing import make_account, make_entry

START = 10**9
CONFIG = BalanceConfig(enabled=True, start_balance=START)


# --- reaching the server, and cleaning up after ourselves -----------------------


def _ping() -> None:
    with redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2) as client:
        client.ping()


@pytest.fixture(autouse=True)
def _redis_server() -> None:
    need("redis", _ping)


def raw() -> redis.Redis:
    """A plain client on the test server, for looking behind the store's back."""
    return redis.Redis.from_url(REDIS_URL)


def drop_keys(prefix: str) -> None:
    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"
    with raw() as client:
        keys = list(client.scan_iter(match=pattern, count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start : start + 1000])


@pytest.fixture
def prefix():
    chosen = unique("cmtest:")
    yield chosen
    drop_keys(chosen)


@pytest.fixture
def store(prefix):
    with RedisStore(REDIS_URL, prefix=prefix) as opened:
        yield opened


def assert_consistent(store, user, *, balance=None):
    """The ledger chains and sums to the stored balance; request ids are unique."""
    account = store.load(user)
    entries = store.ledger(user)
    running = Decimal(0)
    for entry in entries:
        running += entry.amount
        assert entry.balance_after == running
    assert running == account.balance
    request_ids = [e.request_id for e in entries if e.request_id]
    assert len(request_ids) == len(set(request_ids))
    if balance is not None:
        assert account.balance == balance
    return entries


# --- keys and user ids -----------------------------------------------------------

HOSTILE = [
    "",
    "a:b",
    "a",
    "b",
    "{x}",
    "a}b",
    "{",
    "}",
    "{}",
    "'; DROP TABLE x; --",
    "*",
    "users",
    "u",
    "u613a62",
    "{u613a62}:account",
    "a\r\nFLUSHALL\r\n",
    "x" * 256,
    "\U0001f600" * 256,
    "é",
    "e\u0301",
]


def test_hostile_user_ids_are_distinct_users_at_the_store(store, prefix):
    for number, user in enumerate(HOSTILE):
        account = make_account(user, balance=Decimal(number))
        store.commit(
            account,
            [make_entry(user, balance_after=account.balance, request_id="same")],
            expected_version=None,
        )
    assert store.users() == sorted(HOSTILE)
    for number, user in enumerate(HOSTILE):
        assert store.load(user).balance == number
        (entry,) = store.ledger(user)
        assert entry.user_id == user
        assert store.find_request(user, "same") == entry
    with raw() as client:
        keys = set(client.scan_iter(match=f"{prefix}*", count=1000))
    # three per user; the users set, its sorted twin, the log and the log's clock skew
    assert len(keys) == 3 * len(HOSTILE) + 4


def test_each_users_keys_share_one_nonempty_hash_tag(store, prefix):
    for user in HOSTILE:
        entry = make_entry(user, balance_after=Decimal(100), request_id="r")
        store.commit(make_account(user), [entry], expected_version=None)
        tag = b"u" + user.encode().hex().encode()
        names = [
            f"{prefix}{{{tag.decode()}}}:{part}".encode()
            for part in ("account", "ledger", "requests")
        ]
        with raw() as client:
            assert all(client.exists(name) for name in names)
        assert {key_slot(name) for name in names} == {key_slot(tag)}


def test_user_ids_through_the_manager(store):
    manager = BalanceManager(store, CONFIG)
    with pytest.raises(InvalidInput):
        manager.charge("", 1)
    users = [user for user in HOSTILE if user and "\r" not in user]
    for number, user in enumerate(users):
        manager.grant(user, number + 1)
    for number, user in enumerate(users):
        assert manager.balance(user) == START + number + 1
        assert_consistent(store, user)
    assert manager.users() == sorted(users)
    assert store.load("e\u0301").balance != store.load("é").balance  # NFD and NFC: two users


def test_key_layout(store, prefix):
    entry = make_entry(balance_after=Decimal(100), request_id="r")
    store.commit(make_account("alice"), [entry], expected_version=None)
    base = f"{prefix}{{u616c696365}}:"
    with raw() as client:
        assert set(client.scan_iter(match=f"{prefix}*")) == {
            f"{prefix}users".encode(),
            f"{prefix}users-sorted".encode(),
            f"{prefix}log".encode(),
            f"{prefix}log-skew".encode(),
            f"{base}account".encode(),
            f"{base}ledger".encode(),
            f"{base}requests".encode(),
        }
        assert client.smembers(f"{prefix}users") == {b"alice"}
        stored = client.hgetall(f"{base}account")
        assert stored[b"v"] == b"1"
        assert json.loads(stored[b"d"])["user_id"] == "alice"
        assert stored[b"t"]
        assert client.hkeys(f"{base}requests") == [b"r"]
        assert client.lrange(f"{base}ledger", 0, -1) == [client.hget(f"{base}requests", "r")]


@pytest.mark.parametrize("bad", ["", "a{b", "a}b", "{tag}", 5, b"bytes:"])
def test_prefix_must_be_text_without_braces(bad):
    with pytest.raises(ConfigError):
        RedisStore(REDIS_URL, prefix=bad)
    with pytest.raises(ConfigError):
        AsyncRedisStore(REDIS_URL, prefix=bad)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        with pytest.raises(ConfigError):
            RedisStore(client=client, prefix=bad)
    finally:
        client.close()


def test_default_prefix_and_prefix_in_the_url():
    with RedisStore(REDIS_URL) as store:
        assert store.prefix == DEFAULT_PREFIX == "creditmeter:"
    with RedisStore(f"{REDIS_URL}?prefix=from-url:") as store:
        assert store.prefix == "from-url:"
    with RedisStore(f"{REDIS_URL}?prefix=same:", prefix="same:") as store:
        assert store.prefix == "same:"
    with pytest.raises(ConfigError, match="twice"):
        RedisStore(f"{REDIS_URL}?prefix=a:", prefix="b:")
    with pytest.raises(ConfigError, match="braces"):
        RedisStore(f"{REDIS_URL}?prefix=a%7Bb")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis://[bad", "not a valid Redis URL"),  # urlsplit's ValueError, before the fix
        ("redis://user:secret@[::1/0", "not a valid Redis URL"),
        ("redis://127.0.0.1:6379/abc", "is a number"),  # silently database 0, before the fix
        ("redis://127.0.0.1:6379/1x", "is a number"),
        ("redis://127.0.0.1:6379/%31%32", "is a number"),
        ("rediss://127.0.0.1:6379/-1", "is a number"),
    ],
)
def test_a_bad_url_is_a_config_error_that_hides_the_password(url, says):
    for opener in (open_store, open_async_store):
        with pytest.raises(ConfigError, match=says) as caught:
            opener(url)
        assert "secret" not in str(caught.value)


def test_constructor_arguments():
    with pytest.raises(ConfigError):
        RedisStore()
    client = redis.Redis.from_url(REDIS_URL)
    try:
        with pytest.raises(ConfigError):
            RedisStore(REDIS_URL, client=client)
        with pytest.raises(ConfigError, match="options"):
            RedisStore(client=client, socket_timeout=1)
    finally:
        client.close()
    with pytest.raises(ConfigError):
        RedisStore("nonsense://x")
    with pytest.raises(ConfigError):
        AsyncRedisStore()


def test_a_client_of_the_wrong_kind_is_refused():
    sync_client = redis.Redis.from_url(REDIS_URL)
    async_client = redis.asyncio.Redis.from_url(REDIS_URL)
    try:
        with pytest.raises(ConfigError, match=r"redis\.Redis"):
            RedisStore(client=async_client)
        with pytest.raises(ConfigError, match=r"redis\.asyncio\.Redis"):
            AsyncRedisStore(client=sync_client)
    finally:
        sync_client.close()
        asyncio.run(async_client.aclose())


@pytest.mark.parametrize(
    "options",
    [{"decode_responses": True}, {"protocol": 3}, {"decode_responses": True, "protocol": 3}],
    ids=["decode_responses", "resp3", "both"],
)
def test_clients_that_decode_replies_or_speak_resp3(prefix, options):
    client = redis.Redis.from_url(REDIS_URL, **options)
    try:
        with RedisStore(client=client, prefix=prefix) as store:
            manager = BalanceManager(store, CONFIG)
            first = manager.charge("é", 5, request_id="r")
            assert manager.charge("é", 5, request_id="r") == first
            with RedisStore(REDIS_URL, prefix=prefix) as other:
                BalanceManager(other, CONFIG).charge("é", 1)
            manager.charge("é", 1)  # lost, then in turn
            with store.exclusive("é"):
                assert store.load("é").balance == START - 7
            assert store.users() == ["é"]
            assert store.find_request("é", "r") == first
            assert_consistent(store, "é", balance=START - 7)
    finally:
        client.close()


def test_users_reads_every_page_of_the_set(store):
    users = [f"user-{n:05d}" for n in range(2500)]
    for user in users:
        store.commit(make_account(user), [], expected_version=None)
    assert store.users() == users


def test_ledger_limits(store):
    entries = [make_entry(balance_after=Decimal(i)) for i in range(5)]
    store.commit(make_account(), entries, expected_version=None)
    assert store.ledger("alice", limit=0) == []
    assert store.ledger("alice", limit=1) == entries[-1:]
    assert store.ledger("alice", limit=10**30) == entries
    assert store.ledger("alice", limit=None) == entries


def test_a_request_id_repeated_within_one_commit_writes_nothing(store):
    account = make_account()
    store.commit(account, [], expected_version=None)
    first = make_entry(balance_after=Decimal(1), request_id="r")
    with pytest.raises(DuplicateRequest) as caught:
        store.commit(
            make_account(version=2),
            [first, make_entry(balance_after=Decimal(2), request_id="r")],
            expected_version=1,
        )
    assert caught.value.entry == first
    assert store.load("alice") == account
    assert store.ledger("alice") == []
    assert store.find_request("alice", "r") is None


# --- round trips and the script ----------------------------------------------------


def count_commands(monkeypatch, client):
    sent = []
    original = client.execute_command

    def counting(*args, **options):
        sent.append(args[0])
        return original(*args, **options)

    monkeypatch.setattr(client, "execute_command", counting)
    return sent


def test_an_uncontended_charge_is_one_round_trip(store, monkeypatch):
    manager = BalanceManager(store, CONFIG)
    manager.charge("u", 1)  # opens the account and loads the script
    sent = count_commands(monkeypatch, store.client)
    manager.charge("u", 1)
    assert sent == ["EVALSHA"]


def test_a_lost_compare_and_set_is_retried_at_once_without_a_plain_read(store, prefix, monkeypatch):
    manager = BalanceManager(store, CONFIG)
    manager.charge("u", 1)
    with RedisStore(REDIS_URL, prefix=prefix) as other_store:
        BalanceManager(other_store, CONFIG).charge("u", 5)
    sent = count_commands(monkeypatch, store.client)
    manager.charge("u", 1)
    # Lost; then again at once, from the account the loss reported (contention_retries).
    assert sent == ["EVALSHA", "EVALSHA"]
    assert_consistent(store, "u", balance=START - 7)


def test_a_conflict_reports_the_stored_account(store):
    first = make_account(version=3)
    store.commit(first, [], expected_version=None)
    with pytest.raises(VersionConflict) as caught:
        store.commit(make_account(version=3), [], expected_version=2)
    assert caught.value.current == first
    assert caught.value.expected == 2


@pytest.fixture
def private_redis():
    """A Redis server of the test's own, on a Unix socket: for SCRIPT FLUSH.

    The flush empties the script cache of the whole server. On the shared
    server it would make another test's store load its scripts again midway,
    and tests that count a store's calls (tests/reliability) would see calls
    they did not make.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        need("redis", _no_redis_server)
    folder = tempfile.mkdtemp(prefix="cm-redis-")  # short: a socket's path has ~100 bytes
    sock = Path(folder) / "redis.sock"
    process = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(sock), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    url = f"unix://{sock}"
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with redis.Redis.from_url(url, socket_timeout=1) as client:
                    client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.02)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


def _no_redis_server() -> None:
    raise FileNotFoundError("redis-server is not on PATH")


def test_the_script_flushed_between_commits_is_loaded_again(private_redis):
    store = RedisStore(private_redis, prefix="flush:")
    manager = BalanceManager(store, CONFIG)
    with store, redis.Redis.from_url(private_redis) as client:
        manager.charge("u", 1)
        client.script_flush()
        manager.charge("u", 2)
        client.script_flush()
        manager.charge("u", 3)
        client.script_flush()
        with store.exclusive("u"):  # the lock's scripts are loaded again too
            account = store.load("u")
            newer = attrs.evolve(account, version=account.version + 1)
            store.commit(newer, [], expected_version=account.version)
        assert_consistent(store, "u", balance=START - 6)


def test_the_async_script_flushed_between_commits_is_loaded_again(private_redis):
    async def main():
        async with AsyncBalanceManager(
            AsyncRedisStore(private_redis, prefix="flush:"), CONFIG
        ) as m:
            await m.charge("u", 1)
            with redis.Redis.from_url(private_redis) as client:
                client.script_flush()
            await m.charge("u", 2)
            assert await m.balance("u") == START - 3

    asyncio.run(main())


def test_a_resent_commit_finds_its_own_token_and_succeeds(store):
    """What redis-py's automatic re-send after a lost reply looks like to the script."""
    layout = store._layout
    account = make_account()
    keys, args = layout.commit_call(account, [make_entry(balance_after=Decimal(100))], None)
    assert store._commit_script(keys, args) == 0
    assert store._commit_script(keys, args) == 0  # the same commit again: already applied
    assert len(store.ledger("alice")) == 1
    # Another commit at the same stale version still loses.
    keys, args = layout.commit_call(make_account(balance=Decimal(5)), [], None)
    assert store._commit_script(keys, args)[0] == 1


def test_values_never_enter_the_script_text(store):
    """Ids and JSON that look like Lua or Redis commands are stored as they are."""
    user = "x']]) redis.call('FLUSHDB') --[["
    request_id = "]]; return 0; --"
    entry = make_entry(user, balance_after=Decimal(1), request_id=request_id)
    store.commit(make_account(user, balance=Decimal(1)), [entry], expected_version=None)
    assert store.find_request(user, request_id) == entry
    assert store.users() == [user]
    assert store._commit_script.script == COMMIT_SCRIPT  # one constant text, loaded once


# --- writers in turn: exclusive() --------------------------------------------------


def lock_keys(prefix, user="alice"):
    base = f"{prefix}{{u{user.encode().hex()}}}:"
    return f"{base}lock", f"{base}lock-queue", f"{base}wake:"


def test_exclusive_keeps_other_writers_out_until_its_commit(store, prefix):
    first = make_account()
    store.commit(first, [], expected_version=None)
    lock, queue_key, _ = lock_keys(prefix)
    with RedisStore(REDIS_URL, prefix=prefix, lock_wait=0.2) as other:
        with store.exclusive("alice"):
            assert store.load("alice") == first
            with pytest.raises(StoreError, match="writer lock"):  # it waits, here in vain
                other.commit(make_account(version=2), [], expected_version=1)
            with pytest.raises(VersionConflict) as caught:  # from a stale version: lost at once
                other.commit(make_account(version=2), [], expected_version=0)
            assert caught.value.current == first
            second = make_account(version=2, balance=Decimal(7))
            store.commit(second, [], expected_version=1)
            with raw() as client:
                assert not client.exists(lock)  # the commit let go of it
            assert store.load("alice") == second
        other.commit(make_account(version=3), [], expected_version=2)
    with raw() as client:
        assert not client.exists(lock, queue_key)


def test_exclusive_without_a_commit_lets_go_on_leaving(store, prefix):
    store.commit(make_account(), [], expected_version=None)
    lock, _, _ = lock_keys(prefix)
    with store.exclusive("alice"):
        with store.exclusive("alice"):  # re-entered in one thread: already held
            pass
        with raw() as client:
            assert client.exists(lock)
    with raw() as client:
        assert not client.exists(lock)
    with pytest.raises(RuntimeError), store.exclusive("alice"):
        raise RuntimeError
    with raw() as client:
        assert not client.exists(lock)
    store.commit(make_account(version=2), [], expected_version=1)


def test_queued_writers_are_served_in_turn_and_handed_the_account(store, prefix, monkeypatch):
    store.commit(make_account(), [], expected_version=None)
    _, queue_key, _ = lock_keys(prefix)
    served = []
    others = [RedisStore(REDIS_URL, prefix=prefix) for _ in range(3)]

    def wait_until_queued(count):
        with raw() as client:
            for _ in range(1000):
                if client.llen(queue_key) == count:
                    return
                threading.Event().wait(0.005)
        pytest.fail(f"{count} writers never queued")

    def writer(number, other):
        sent = count_commands(monkeypatch, other.client)
        with other.exclusive("alice"):
            account = other.load("alice")  # handed over: no read
            served.append((number, account.version, list(sent)))
            updated = make_account(version=account.version + 1, balance=Decimal(number))
            other.commit(updated, [], expected_version=account.version)

    try:
        threads = []
        with store.exclusive("alice"):
            for number, other in enumerate(others):
                thread = threading.Thread(target=writer, args=(number, other))
                thread.start()
                threads.append(thread)
                wait_until_queued(number + 1)
            store.commit(make_account(version=2), [], expected_version=1)
        for thread in threads:
            thread.join(timeout=30)
    finally:
        for other in others:
            other.close()
    assert [(number, version) for number, version, _ in served] == [(0, 2), (1, 3), (2, 4)]
    for _, _, sent in served:
        assert sent == ["EVALSHA", "BLPOP"]  # queue, wait: the account came with the lock
    assert store.load("alice").version == 5


def test_a_vanished_holder_is_passed_after_its_lease(prefix):
    lock, queue_key, _ = lock_keys(prefix)
    with RedisStore(REDIS_URL, prefix=prefix, lock_lease=0.3) as store:
        store.commit(make_account(), [], expected_version=None)
        with raw() as client:
            client.set(lock, "a-writer-that-died", px=300)
        with store.exclusive("alice"):
            store.commit(make_account(version=2), [], expected_version=1)
        with raw() as client:
            assert not client.exists(lock, queue_key)


def test_waiting_too_long_for_the_lock_is_a_store_error(prefix):
    lock, queue_key, _ = lock_keys(prefix)
    with RedisStore(REDIS_URL, prefix=prefix, lock_wait=0.3) as store:
        with raw() as client:
            client.set(lock, "a-slow-writer", px=10_000)
        with pytest.raises(StoreError, match="waited"), store.exclusive("alice"):
            pytest.fail("the lock was not free")
        with raw() as client:
            assert not client.exists(queue_key)  # it left the queue
            assert client.get(lock) == b"a-slow-writer"


@pytest.mark.parametrize("bad", [0, -1, "1", True, float("nan"), float("inf")])
def test_lock_times_must_be_positive(bad):
    with pytest.raises(ConfigError):
        RedisStore(REDIS_URL, lock_lease=bad)
    with pytest.raises(ConfigError):
        AsyncRedisStore(REDIS_URL, lock_wait=bad)


def test_async_exclusive_in_turn_and_a_cancelled_waiter_leaves_the_queue(prefix):
    lock, queue_key, _ = lock_keys(prefix)

    async def main():
        async with (
            AsyncRedisStore(REDIS_URL, prefix=prefix) as one,
            AsyncRedisStore(REDIS_URL, prefix=prefix) as two,
        ):
            await one.commit(make_account(), [], expected_version=None)
            async with one.exclusive("alice"):
                waiter = asyncio.ensure_future(two.exclusive("alice").__aenter__())
                for _ in range(200):
                    await asyncio.sleep(0.005)
                    if await one.client.llen(queue_key) == 1:
                        break
                waiter.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await waiter
                assert await one.client.llen(queue_key) == 0
                # A commit of the other store waits for the lock, then finds the version moved.
                kept_out = asyncio.ensure_future(
                    two.commit(make_account(version=2), [], expected_version=1)
                )
                await asyncio.sleep(0.02)
                assert not kept_out.done()  # it cannot finish while the lock is held
                await one.commit(make_account(version=2), [], expected_version=1)
                with pytest.raises(VersionConflict):
                    await kept_out
            assert not await one.client.exists(lock)
            async with two.exclusive("alice"):
                assert (await two.load("alice")).version == 2
                await two.commit(make_account(version=3), [], expected_version=2)
            assert (await one.load("alice")).version == 3

    asyncio.run(main())


# --- closing ---------------------------------------------------------------------


def test_a_store_built_on_a_client_leaves_it_open(prefix):
    client = redis.Redis.from_url(REDIS_URL)
    try:
        with RedisStore(client=client, prefix=prefix) as store:
            BalanceManager(store, CONFIG).charge("u", 1)
        assert client.ping()
        with pytest.raises(StoreError, match="closed"):
            store.load("u")
        assert client.hget(f"{prefix}{{u75}}:account", "v") == b"1"
    finally:
        client.close()


def test_an_async_store_built_on_a_client_leaves_it_open(prefix):
    async def main():
        client = redis.asyncio.Redis.from_url(REDIS_URL)
        try:
            async with AsyncRedisStore(client=client, prefix=prefix) as store:
                await AsyncBalanceManager(store, CONFIG).charge("u", 1)
            assert await client.ping()
            with pytest.raises(StoreError, match="closed"):
                await store.load("u")
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_store_built_from_a_url_closes_its_client(prefix):
    store = RedisStore(REDIS_URL, prefix=prefix)
    store.load("u")
    connection_id = store.client.client_id()
    store.close()
    store.close()  # twice is fine
    with raw() as admin:
        for _ in range(100):
            if all(int(c["id"]) != connection_id for c in admin.client_list()):
                break
            threading.Event().wait(0.01)
        else:
            pytest.fail("the store's connection is still open")
    with pytest.raises(StoreError, match="closed"):
        store.commit(make_account(), [], expected_version=None)


# --- faults ----------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_server_is_a_store_error_with_the_cause():
    url = f"redis://127.0.0.1:{closed_port()}/0"
    with RedisStore(url, socket_connect_timeout=1) as store:
        for call in (
            lambda: store.load("u"),
            lambda: store.commit(make_account(), [], expected_version=None),
            lambda: store.ledger("u"),
            lambda: store.find_request("u", "r"),
            store.users,
        ):
            with pytest.raises(StoreError) as caught:
                call()
            assert isinstance(caught.value.__cause__, redis.exceptions.ConnectionError)


def test_an_unreachable_server_is_a_store_error_async():
    async def main():
        url = f"redis://127.0.0.1:{closed_port()}/0"
        async with AsyncRedisStore(url, socket_connect_timeout=1) as store:
            with pytest.raises(StoreError) as caught:
                await store.commit(make_account(), [], expected_version=None)
            assert isinstance(caught.value.__cause__, redis.exceptions.ConnectionError)
            with pytest.raises(StoreError):
                await store.users()

    asyncio.run(main())


def test_corrupt_stored_data_is_a_store_error(store, prefix):
    entry = make_entry(balance_after=Decimal(100), request_id="r")
    store.commit(make_account(), [entry], expected_version=None)
    base = f"{prefix}{{u616c696365}}:"
    with raw() as client:
        client.hset(f"{base}account", "d", "{not json")
        client.rpush(f"{base}ledger", '{"schema": 99}')
        client.hset(f"{base}requests", "r", "[]")
    with pytest.raises(StoreError, match="of user 'alice' is corrupt"):
        store.load("alice")
    with pytest.raises(StoreError, match="of user 'alice' is corrupt"):
        store.ledger("alice")
    with pytest.raises(StoreError, match="of user 'alice' is corrupt"):
        store.find_request("alice", "r")
    with pytest.raises(
        StoreError, match="of user 'alice' is corrupt"
    ):  # the conflict's account is read too
        store.commit(make_account(version=2), [], expected_version=7)


def test_a_key_of_the_wrong_type_fails_the_commit_before_any_write(store, prefix):
    store.commit(make_account(), [], expected_version=None)
    base = f"{prefix}{{u616c696365}}:"
    with raw() as client:
        client.set(f"{base}ledger", "not a list")
    with pytest.raises(StoreError) as caught:
        store.commit(
            make_account(version=2, balance=Decimal(1)),
            [make_entry(balance_after=Decimal(1))],
            expected_version=1,
        )
    assert isinstance(caught.value.__cause__, redis.exceptions.ResponseError)
    assert store.load("alice") == make_account()


class Proxy:
    """A TCP proxy in front of the test server that a test can cut, restore, or make lose a reply.

    One thread runs a selector loop; every socket is opened, used and closed
    on it. ``cut()`` closes every connection and stops listening (new
    connections are refused); ``restore()`` listens again on the same port;
    ``lose_reply_to(b"EVALSHA")`` forwards the next command containing those
    bytes to the server and closes the connection when the reply comes back,
    so the command ran but the client never hears of it.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = socket.socketpair()
        self._selector.register(self._wake_read, selectors.EVENT_READ)
        self._listener = None
        self._peers = {}
        self._clients = set()
        self._doomed = set()  # upstream sockets whose next reply is lost
        self._lose = None
        self._calls = queue.Queue()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._call(self._listen)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/{urlsplit(REDIS_URL).path.strip('/') or 0}"

    def cut(self) -> None:
        self._call(self._cut)

    def restore(self) -> None:
        self._call(self._listen)

    def lose_reply_to(self, marker: bytes) -> None:
        self._call(lambda: setattr(self, "_lose", marker))

    def close(self) -> None:
        self._call(self._cut)
        self._calls.put(None)
        self._wake_write.send(b"x")
        self._thread.join(timeout=10)
        self._selector.close()
        self._wake_read.close()
        self._wake_write.close()

    def _call(self, function) -> None:
        done = threading.Event()
        self._calls.put((function, done))
        self._wake_write.send(b"x")
        assert done.wait(timeout=10)

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._selector.register(listener, selectors.EVENT_READ)

    def _cut(self) -> None:
        if self._listener is not None:
            self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None
        for sock in list(self._peers):
            self._drop(sock)

    def _drop(self, sock) -> None:
        peer = self._peers.pop(sock, None)
        for one in (sock, peer):
            if one is None:
                continue
            self._peers.pop(one, None)
            self._clients.discard(one)
            self._doomed.discard(one)
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(one)
            one.close()

    def _run(self) -> None:
        while True:
            for key, _ in self._selector.select():
                sock = key.fileobj
                if sock is self._wake_read:
                    self._wake_read.recv(4096)
                    while not self._calls.empty():
                        call = self._calls.get()
                        if call is None:
                            return
                        function, done = call
                        function()
                        done.set()
                elif sock is self._listener:
                    self._accept()
                elif sock in self._peers:
                    self._forward(sock)

    def _accept(self) -> None:
        client, _ = self._listener.accept()
        upstream = socket.create_connection(self.upstream)
        self._peers[client] = upstream
        self._peers[upstream] = client
        self._clients.add(client)
        self._selector.register(client, selectors.EVENT_READ)
        self._selector.register(upstream, selectors.EVENT_READ)

    def _forward(self, sock) -> None:
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data or sock in self._doomed:
            self._drop(sock)  # the reply of a doomed command is lost with its connection
            return
        peer = self._peers[sock]
        if sock in self._clients and self._lose is not None and self._lose in data:
            self._lose = None
            self._doomed.add(peer)
        try:
            peer.sendall(data)
        except OSError:
            self._drop(sock)


@pytest.fixture
def proxy():
    parts = urlsplit(REDIS_URL)
    opened = Proxy((parts.hostname or "127.0.0.1", parts.port or 6379))
    yield opened
    opened.close()


def test_a_connection_cut_mid_run(proxy, prefix):
    """Cut the connection while a manager charges: StoreError, no partial write, then recovery."""
    with (
        RedisStore(proxy.url, prefix=prefix, socket_timeout=5) as store,
        RedisStore(REDIS_URL, prefix=prefix) as direct,
    ):
        manager = BalanceManager(store, CONFIG)
        manager.account("u")
        acked, failed, errors = [], [], []
        stop = threading.Event()

        def charge_forever():
            number = 0
            while not stop.is_set():
                request_id = f"r{number}"
                number += 1
                try:
                    manager.charge("u", 1, request_id=request_id)
                except StoreError as exc:
                    failed.append(request_id)
                    errors.append(exc)
                    stop.wait(0.01)
                else:
                    acked.append(request_id)

        worker = threading.Thread(target=charge_forever)
        worker.start()
        try:
            while len(acked) < 200:
                stop.wait(0.001)
            proxy.cut()
            while len(errors) < 3:
                stop.wait(0.001)
            cut_at = len(acked)
            stop.wait(0.05)
            assert len(acked) == cut_at  # nothing gets through while it is cut
            # Behind the proxy the server holds a whole number of commits.
            entries = assert_consistent(direct, "u")
            applied = {e.request_id for e in entries if e.kind is EntryKind.CHARGE}
            assert set(acked) <= applied <= set(acked) | set(failed)
            assert len(applied) - len(acked) <= 1  # at most the commit in flight at the cut
            proxy.restore()
            while len(acked) < cut_at + 100:
                stop.wait(0.001)
        finally:
            stop.set()
            worker.join()
        for error in errors:
            assert isinstance(
                error.__cause__, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
            )
        # The manager works again; the failed requests, repeated, apply at most once each.
        for request_id in failed:
            manager.charge("u", 1, request_id=request_id)
        entries = assert_consistent(direct, "u")
        charged = [e.request_id for e in entries if e.kind is EntryKind.CHARGE]
        assert sorted(charged) == sorted(acked + failed)
        assert direct.load("u").balance == START - len(acked) - len(failed)


def test_a_lost_reply_is_a_store_error_and_the_request_id_applies_once(proxy, prefix):
    with RedisStore(proxy.url, prefix=prefix) as store:
        manager = BalanceManager(store, CONFIG)
        manager.account("u")
        proxy.lose_reply_to(b"EVALSHA")
        with pytest.raises(StoreError) as caught:
            manager.charge("u", 7, request_id="call-1")
        assert isinstance(caught.value.__cause__, redis.exceptions.ConnectionError)
        # The script ran; only its reply was lost. Repeating the request finds it.
        entry = manager.charge("u", 7, request_id="call-1")
        assert entry.request_id == "call-1"
        assert manager.ledger("u")[-1] == entry
        assert_consistent(store, "u", balance=START - 7)


def test_a_client_that_resends_after_a_lost_reply_applies_the_commit_once(proxy, prefix):
    """redis-py re-sends a command whose reply was lost: the commit still applies once.

    Without the commit token the re-sent script would lose its compare-and-set
    to itself and the manager would charge again (measured: twice).
    """
    db = int(urlsplit(REDIS_URL).path.strip("/") or 0)
    client = redis.Redis(host="127.0.0.1", port=proxy.port, db=db)  # retries 10 times by default
    assert client.get_retry().get_retries() > 0
    try:
        with RedisStore(client=client, prefix=prefix) as store:
            manager = BalanceManager(store, CONFIG)
            manager.account("u")
            proxy.lose_reply_to(b"EVALSHA")
            manager.charge("u", 7)  # no request id: only the commit token tells
            entries = assert_consistent(store, "u", balance=START - 7)
            assert [e.kind for e in entries] == [EntryKind.OPEN, EntryKind.CHARGE]
    finally:
        client.close()


def test_a_lock_holder_cut_off_keeps_its_error_and_the_lease_frees_the_lock(proxy, prefix):
    with RedisStore(proxy.url, prefix=prefix, lock_lease=0.3) as store:
        store.commit(make_account(), [], expected_version=None)

        def commit_cut_off():
            with store.exclusive("alice"):
                proxy.cut()
                store.commit(make_account(version=2), [], expected_version=1)

        with pytest.raises(StoreError, match="commit") as caught:
            commit_cut_off()
        assert isinstance(caught.value.__cause__, redis.exceptions.ConnectionError)
        proxy.restore()
        with RedisStore(REDIS_URL, prefix=prefix) as direct, direct.exclusive("alice"):
            direct.commit(make_account(version=2), [], expected_version=1)
        assert store.load("alice").version == 2


def test_an_idle_connection_killed_by_the_server_is_replaced(store):
    manager = BalanceManager(store, CONFIG)
    manager.charge("u", 1)
    connection_id = store.client.client_id()  # the one pooled connection
    with raw() as admin:
        assert admin.client_kill_filter(_id=connection_id) == 1
    manager.charge("u", 1)  # the pool notices the dead connection and opens another
    assert_consistent(store, "u", balance=START - 2)


def test_an_async_idle_connection_killed_by_the_server_is_replaced(prefix):
    """Regression: redis-py 8.1.0's async pool handed out a connection the server had closed.

    With RESP3 (redis-py's default) its checkout check is skipped
    (redis/redis-py#4252), so the next command failed with "Connection closed
    by server"; the store's pool connects such a connection again first.
    """

    async def main():
        async with AsyncRedisStore(REDIS_URL, prefix=prefix) as store:
            manager = AsyncBalanceManager(store, CONFIG)
            await manager.charge("u", 1)
            connection_id = await store.client.client_id()  # the one pooled connection
            with raw() as admin:
                assert admin.client_kill_filter(_id=connection_id) == 1
            await asyncio.sleep(0.05)  # the event loop reads the server's end of file
            await manager.charge("u", 1)
            assert await manager.balance("u") == START - 2

    asyncio.run(main())
