"""``exclusive()`` and deltas on Redis Cluster while the contended user's slot migrates.

The lock scripts name keys that never exist on both sides of a migration
(a writer's heartbeat is new), so while a slot is MIGRATING/IMPORTING they
meet ASK and then TRYAGAIN for the whole window. redis-py gives up after
about 0.4 s; the store sends them again (for at most ``retry_timeout``). Each
test holds a migration open (``cluster.begin_move``, with some of the user's
keys moved and the others not) for ``WINDOW`` seconds, or until what it
checks has happened, and puts the cluster back afterwards
(``cluster.restore``). The writers of one user go through ``exclusive()``
with the store's ``commit_delta`` turned off, and as deltas with it on (the
delta script meets the same ASK and TRYAGAIN).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time

import pytest
from cluster import (
    CLUSTER_URL,
    FIRST_MASTERS,
    begin_move,
    end_move,
    fresh_prefix,
    master_of_slot,
)

from creditmeter import AsyncBalanceManager, BalanceConfig, BalanceManager, StoreError
from creditmeter.stores.redis import AsyncRedisStore, RedisStore
from creditmeter.stores.redis.cluster import key_slot, shard_of, shard_tags

CONFIG = BalanceConfig(enabled=True, start_balance=0, allow_negative_balance=True)
USER = "contended"
WRITERS = 4
EACH = 5  # charges each writer makes before the migration, and again after it
WINDOW = 1.0  # seconds a migration is held open: well over redis-py's 0.4 s of TRYAGAIN


@pytest.fixture
def prefix():
    yield from fresh_prefix(restored=True)


def _slot_and_target(user):
    """The user's slot and a master other than the one serving it."""
    slot = key_slot(shard_tags()[shard_of(user)])
    serving = master_of_slot(slot)["port"]
    return slot, next(port for port in FIRST_MASTERS if port != serving)


class _Ending:
    """Ends a migration ``begin_move`` started, in a thread, after ``WINDOW`` seconds."""

    def __init__(self, slot, target, started):
        self.ending = threading.Event()  # set once the window is over and the end begins
        self._args = (slot, target, started)
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

    def _run(self):
        time.sleep(WINDOW)  # holds the migration open; asserts nothing
        self.ending.set()
        end_move(*self._args)

    def join(self):
        self._thread.join(30)


class _CountingStore(RedisStore):
    """A RedisStore that counts ``exclusive()`` blocks and deltas: begun, and not yet done."""

    entered = inside = deltas = sending = 0

    def commit_delta(self, *args, **kwargs):
        self.deltas += 1
        self.sending += 1
        try:
            return super().commit_delta(*args, **kwargs)
        finally:
            self.sending -= 1

    @contextlib.contextmanager
    def exclusive(self, user_id):
        self.entered += 1  # threads: the GIL keeps these counts exact enough for "> 0"
        self.inside += 1
        try:
            with super().exclusive(user_id):
                yield
        finally:
            self.inside -= 1


class _AsyncCountingStore(AsyncRedisStore):
    entered = inside = deltas = sending = 0

    async def commit_delta(self, *args, **kwargs):
        self.deltas += 1
        self.sending += 1
        try:
            return await super().commit_delta(*args, **kwargs)
        finally:
            self.sending -= 1

    @contextlib.asynccontextmanager
    async def exclusive(self, user_id):
        self.entered += 1
        self.inside += 1
        try:
            async with super().exclusive(user_id):
                yield
        finally:
            self.inside -= 1


def _check_ledger(ledger, balance, acked):
    """Every acknowledged charge once, nothing else, and the ledger sums to the balance."""
    recorded = collections.Counter(entry.request_id for entry in ledger if entry.request_id)
    assert max(recorded.values()) == 1, "a charge was applied twice"
    assert set(recorded) == set(acked), "a charge was lost, or one not acknowledged was kept"
    assert sum(entry.amount for entry in ledger) == balance == -len(acked)


def _wait_for(done, least, failures):
    end = time.monotonic() + 30
    while min(done) < least:
        if failures:
            raise failures[0]
        if time.monotonic() > end:
            raise AssertionError(f"writers stalled: {done}")
        time.sleep(0.005)


def _paths(store, deltas):
    """The writes of a hot user: as deltas, or (``commit_delta`` hidden) through ``exclusive()``.

    Returns how many have begun, and how many have not ended yet.
    """
    if not deltas:
        store.commit_delta = None  # the managers look it up on the store
        return lambda: (store.entered, store.inside)
    return lambda: (store.deltas, store.sending)


@pytest.mark.parametrize("deltas", [False, True], ids=["exclusive", "delta"])
def test_threads_charging_one_user_while_its_slot_migrates(prefix, deltas):
    """4 threads charge one user through ``exclusive()``, or as deltas, across a slot migration.

    Each thread has a manager of its own (a manager serializes its own
    writers of a user). With ``contention_retries = 0`` the manager sends every write of a user
    that lost a compare-and-set recently as a delta, or else through ``exclusive()``, so the
    writers send deltas, or queue for the lock, while the slot migrates. None raises; every
    charge is in the ledger once.
    """
    with _CountingStore(CLUSTER_URL, prefix=prefix) as store:
        store.contention_retries = 0
        went = _paths(store, deltas)
        meter = BalanceManager(store, CONFIG)
        meter.charge(USER, 1, request_id="first")
        slot, target = _slot_and_target(USER)
        keys = store._layout.keys(USER)
        done, acked, failures = [0] * WRITERS, [["first"]], []
        stop = threading.Event()

        def writer(number):
            mine = []
            acked.append(mine)
            own = BalanceManager(store, CONFIG)  # one manager would queue its writers itself
            try:
                while not stop.is_set():
                    request_id = f"w{number}-{len(mine)}"
                    own.charge(USER, 1, request_id=request_id)
                    mine.append(request_id)
                    done[number] = len(mine)
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(WRITERS)]
        for thread in threads:
            thread.start()
        try:
            _wait_for(done, EACH, failures)
            started = begin_move(slot, target, [keys.account, keys.ledger])
            before, inside = went()
            ending = _Ending(slot, target, started)
            ending.join()
            in_window = inside + went()[0] - before
            _wait_for(done, max(done) + EACH, failures)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        assert not failures, failures
        assert in_window > 0, "no writer went that way while the slot migrated"
        _check_ledger(meter.ledger(USER), meter.balance(USER), [r for mine in acked for r in mine])


@pytest.mark.parametrize("deltas", [False, True], ids=["exclusive", "delta"])
def test_tasks_charging_one_user_while_its_slot_migrates(prefix, deltas):
    """The async store: 4 tasks charge one user (``exclusive()`` or deltas) across a migration."""

    async def scenario():
        async with _AsyncCountingStore(CLUSTER_URL, prefix=prefix) as store:
            store.contention_retries = 0
            went = _paths(store, deltas)
            meter = AsyncBalanceManager(store, CONFIG)
            await meter.charge(USER, 1, request_id="first")
            slot, target = _slot_and_target(USER)
            keys = store._layout.keys(USER)
            done, acked, failures = [0] * WRITERS, [["first"]], []
            stop = asyncio.Event()

            async def writer(number):
                mine = []
                acked.append(mine)
                own = AsyncBalanceManager(store, CONFIG)  # one would queue its writers itself
                while not stop.is_set():
                    request_id = f"w{number}-{len(mine)}"
                    await own.charge(USER, 1, request_id=request_id)
                    mine.append(request_id)
                    done[number] = len(mine)

            async def until(least):
                end = time.monotonic() + 30
                while min(done) < least:
                    for task in tasks:
                        if task.done():
                            task.result()  # raises what the writer met
                    assert time.monotonic() < end, f"writers stalled: {done}"
                    await asyncio.sleep(0.005)

            tasks = [asyncio.create_task(writer(n)) for n in range(WRITERS)]
            try:
                await until(EACH)
                started = await asyncio.to_thread(
                    begin_move, slot, target, [keys.account, keys.ledger]
                )
                before, inside = went()
                await asyncio.to_thread(_Ending(slot, target, started).join)
                in_window = inside + went()[0] - before
                await until(max(done) + EACH)
            finally:
                stop.set()
                results = await asyncio.gather(*tasks, return_exceptions=True)
            failures = [result for result in results if isinstance(result, BaseException)]
            assert not failures, failures
            assert in_window > 0, "no writer went that way while the slot migrated"
            every = [r for mine in acked for r in mine]
            _check_ledger(await meter.ledger(USER), await meter.balance(USER), every)

    asyncio.run(scenario())


def test_lock_taken_and_let_go_while_the_slot_migrates(prefix):
    """The lock is taken, and let go of, while its slot migrates: each waits the window out."""
    with RedisStore(CLUSTER_URL, prefix=prefix) as store:
        meter = BalanceManager(store, CONFIG)
        meter.charge(USER, 1, request_id="first")
        slot, target = _slot_and_target(USER)
        keys = store._layout.keys(USER)

        ending = _Ending(slot, target, begin_move(slot, target, [keys.account]))
        try:
            with store.exclusive(USER):
                taken_after_the_window = ending.ending.is_set()
                meter.charge(USER, 1, request_id="under the lock")
        finally:
            ending.join()
        assert taken_after_the_window  # the acquire was sent again until the slot had moved

        home = master_of_slot(slot)["port"]
        back = next(port for port in FIRST_MASTERS if port != home)
        with store.exclusive(USER):  # no commit inside: leaving it runs the release script
            ending = _Ending(slot, back, begin_move(slot, back, [keys.account]))
        let_go_after_the_window = ending.ending.is_set()
        ending.join()
        assert let_go_after_the_window
        assert store.client.exists(keys.lock) == 0  # released, not left to its lease
        _check_ledger(meter.ledger(USER), meter.balance(USER), ["first", "under the lock"])


async def _enter_and_leave(store):
    async with store.exclusive(USER):
        pass


def test_async_lock_cancelled_or_timed_out_while_the_slot_migrates(prefix):
    """A cancelled acquire leaves no lock or queue entry; one past ``retry_timeout`` raises."""

    async def scenario():
        # retry_timeout: the cancelled acquire's clean-up outlasts the migration by far.
        async with AsyncRedisStore(f"{CLUSTER_URL}?retry_timeout=60", prefix=prefix) as store:
            meter = AsyncBalanceManager(store, CONFIG)
            await meter.charge(USER, 1, request_id="first")
            slot, target = _slot_and_target(USER)
            keys = store._layout.keys(USER)

            # The migration stays open until the test ends it: no timer decides the outcome.
            started = await asyncio.to_thread(begin_move, slot, target, [keys.account])
            entered = asyncio.Event()

            async def hold():
                async with store.exclusive(USER):
                    entered.set()

            task = asyncio.create_task(hold())
            try:
                await asyncio.sleep(0.3)  # lets the acquire meet TRYAGAIN; asserts no timing
                assert not entered.is_set()
                task.cancel()  # its clean-up is sent again until the slot has moved
            finally:
                await asyncio.to_thread(end_move, slot, target, started)
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await store.client.exists(keys.lock, keys.queue) == 0
            async with store.exclusive(USER):  # nothing left behind: taken at once
                await meter.charge(USER, 1, request_id="after the cancel")

        url = f"{CLUSTER_URL}?retry_timeout=0.3"
        async with AsyncRedisStore(url, prefix=prefix) as store:
            home = master_of_slot(slot)["port"]
            back = next(port for port in FIRST_MASTERS if port != home)
            started = await asyncio.to_thread(begin_move, slot, back, [keys.account])
            try:  # the migration is open until the acquire gives up: bounded by retry_timeout
                with pytest.raises(StoreError, match=r"TTL exhausted|TRYAGAIN"):
                    await asyncio.wait_for(_enter_and_leave(store), timeout=60)
            finally:
                await asyncio.to_thread(end_move, slot, back, started)
            meter = AsyncBalanceManager(store, CONFIG)
            ledger = await meter.ledger(USER)
            _check_ledger(ledger, await meter.balance(USER), ["first", "after the cancel"])

    asyncio.run(scenario())
