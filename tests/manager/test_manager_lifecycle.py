"""Managers and memory stores across os.fork(), under cancellation, and without unbounded growth.

Fork: a thread holds a lock when the main thread forks (the manager's lock
stripe, while the thread's charge waits in the store; MemoryStore's
``exclusive()``; MemoryStore's own lock, taken by commits running in a loop;
an async manager's stripe and an AsyncMemoryStore ``exclusive()`` held by
tasks of a loop in another thread). The child must finish a charge within
WAIT seconds and find every ledger summing to its balance. Before the fix
the child inherited the lock locked and hung until killed.

Cancellation: every await of AsyncBalanceManager over AsyncMemoryStore,
AsyncSQLiteStore, AsyncRedisStore and AsyncPostgresStore. A wrapper gives each
store call three points (before it, while it is in flight, after it
returned) and ``exclusive()`` its entry and exit; each operation (open,
grant, charge with and without request id, set_balance, check with a refill
due, configure_refill, hold with and without request id, settle, release;
each also on a user whose last write lost, so the retry and ``exclusive()``
paths run) is cancelled at point 1, then 2, ... until it completes. After
every cancellation the account's ledger sums to its balance, no hold is open
that a caller did not get, the manager's lock stripes and the store's
``exclusive()`` are free, and the next charge finishes within WAIT. A task
cancelled while waiting for the user's lock leaves it to the next one.
Before the fix a hold cancelled after its commit stayed open, unknown to the
caller.

Growth: MemoryStore and AsyncMemoryStore keep no ``exclusive()`` lock for a
user nobody holds (before: one per user ever seen, forever); the manager's
caches of the last account seen and of hot users stay under their limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from backends import open_async_store, open_store

from creditmeter import (
    AsyncBalanceManager,
    AsyncMemoryStore,
    BalanceConfig,
    BalanceManager,
    MemoryStore,
    RefillSettings,
)
from creditmeter.testing import FakeClock

WAIT = 10.0  # seconds any step may take before it counts as a hang
FORK_ROUNDS = int(os.environ.get("CREDITMETER_FORK_ROUNDS", "12"))
CONFIG = BalanceConfig(enabled=True, start_balance=10**6)
U = "alice"

fork_warning = pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")


# --- fork --------------------------------------------------------------------------


def in_child(body: Callable[[], None], before_waiting: Callable[[], None] | None = None) -> None:
    """Fork; run ``body`` in the child (exit 0 if it returns); fail unless it does within WAIT."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            body()
            code = 0
        except BaseException:
            import traceback  # noqa: PLC0415

            traceback.print_exc()
        finally:
            os._exit(code)
    if before_waiting is not None:
        before_waiting()
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0, "the child failed"
            return
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the child hung: it inherited a lock held by a thread of the parent")


def whole(store: Any, users: list[str]) -> None:
    """Every user's ledger sums to the balance and chains."""
    for user in users:
        account = store.load(user)
        ledger = store.ledger(user)
        assert sum(e.amount for e in ledger) == account.balance
        assert ledger[-1].balance_after == account.balance


class PausedLoads:
    """A store whose ``load`` waits at a gate while ``armed`` (the rest goes straight through)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.armed = False
        self.waiting = threading.Event()
        self.gate = threading.Event()

    def load(self, user_id: str) -> Any:
        if self.armed:
            self.waiting.set()
            self.gate.wait(WAIT)
        return self.inner.load(user_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@fork_warning
@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_fork_while_a_thread_holds_the_managers_lock(kind, tmp_path):
    with open_store(kind, tmp_path) as real:
        store = PausedLoads(real)
        BalanceManager(real, CONFIG).grant(U, 1)
        meter = BalanceManager(store, CONFIG)  # remembers nothing: its charge loads first
        store.armed = True
        thread = threading.Thread(target=meter.charge, args=(U, 1))
        thread.start()
        assert store.waiting.wait(WAIT)  # the thread holds U's lock stripe, in load()

        def child() -> None:
            store.armed = False
            meter.charge(U, 1)
            whole(real, [U])

        try:
            in_child(child)
        finally:
            store.gate.set()
            thread.join(WAIT)
        # The parent's grant and charge; the child's charge too where the data is shared.
        assert meter.balance(U) == 10**6 - (kind == "sqlite")
        whole(real, [U])


@fork_warning
def test_fork_while_a_thread_holds_exclusive():
    with MemoryStore() as store:
        meter = BalanceManager(store, CONFIG)
        meter.charge(U, 1)
        inside, leave = threading.Event(), threading.Event()

        def hold() -> None:
            with store.exclusive(U):
                inside.set()
                leave.wait(WAIT)

        thread = threading.Thread(target=hold)
        thread.start()
        assert inside.wait(WAIT)

        def child() -> None:
            with store.exclusive(U):
                meter.charge(U, 1)
            whole(store, [U])

        try:
            in_child(child)
        finally:
            leave.set()
            thread.join(WAIT)


@fork_warning
def test_fork_while_commits_run_in_another_thread():
    """Forks taken at random moments of a thread's charges: the child's store is whole."""
    users = [f"u{n}" for n in range(4)]
    with MemoryStore() as store:
        meter = BalanceManager(store, CONFIG)
        for user in users:
            meter.grant(user, 1)
        stop, go = threading.Event(), threading.Event()

        def churn() -> None:
            while not stop.is_set():
                go.wait(WAIT)
                for user in users:
                    meter.charge(user, 1, metadata={"n": 1})

        thread = threading.Thread(target=churn)
        thread.start()
        try:
            for _ in range(FORK_ROUNDS):
                go.set()
                time.sleep(0.002)

                def child() -> None:
                    whole(store, users)
                    for user in users:
                        meter.charge(user, 1)
                    whole(store, users)

                in_child(child, before_waiting=go.clear)
        finally:
            stop.set()
            go.set()
            thread.join(WAIT)
        whole(store, users)


@fork_warning
def test_fork_while_tasks_hold_async_locks():
    """A loop in another thread: one task holds U's exclusive(), another U's lock stripe."""
    store = AsyncMemoryStore()
    meter = AsyncBalanceManager(store, CONFIG)
    ready = threading.Event()
    loop = asyncio.new_event_loop()
    release: list[asyncio.Event] = []

    async def parent() -> None:
        await meter.charge(U, 1)
        leave = asyncio.Event()
        release.append(leave)

        async def hold_exclusive() -> None:
            async with store.exclusive(U):
                ready.set()
                await leave.wait()

        holder = asyncio.ensure_future(hold_exclusive())
        await asyncio.sleep(0)
        meter._hot[U] = time.monotonic() + 60  # its next write waits for exclusive()
        waiter = asyncio.ensure_future(meter.charge(U, 1))  # holds U's stripe meanwhile
        await asyncio.wait([holder, waiter], timeout=WAIT)

    thread = threading.Thread(target=loop.run_until_complete, args=(parent(),))
    thread.start()
    try:
        assert ready.wait(WAIT)
        time.sleep(0.05)  # the waiter is in: it holds the stripe and waits for exclusive()

        def child() -> None:
            async def main() -> None:
                meter._hot.clear()
                async with store.exclusive(U):
                    pass
                await meter.charge(U, 1)

            asyncio.run(asyncio.wait_for(main(), WAIT))
            whole(store.sync, [U])

        in_child(child)
    finally:
        loop.call_soon_threadsafe(lambda: release and release[0].set())
        thread.join(WAIT)
        loop.close()
    assert store.sync.load(U).balance == 10**6 - 2


# --- growth --------------------------------------------------------------------------


def test_exclusive_keeps_no_lock_per_idle_user():
    with MemoryStore() as store:
        for n in range(500):
            with store.exclusive(f"u{n}"), store.exclusive(f"u{n}"):  # re-entrant
                pass
        assert len(store._writers) == 0
        # Contended: two threads on one user; nothing left once both are out.
        inside, leave = threading.Event(), threading.Event()

        def hold() -> None:
            with store.exclusive(U):
                inside.set()
                leave.wait(WAIT)

        thread = threading.Thread(target=hold)
        thread.start()
        assert inside.wait(WAIT)
        waiter_done = threading.Event()

        def wait_turn() -> None:
            with store.exclusive(U):
                waiter_done.set()

        other = threading.Thread(target=wait_turn)
        other.start()
        leave.set()
        thread.join(WAIT)
        other.join(WAIT)
        assert waiter_done.is_set()
        assert len(store._writers) == 0


def test_async_exclusive_keeps_no_lock_per_idle_user():
    async def main() -> None:
        store = AsyncMemoryStore()
        for n in range(500):
            async with store.exclusive(f"u{n}"), store.exclusive(f"u{n}"):
                pass
        assert len(store._writers) == 0
        order = []
        leave = asyncio.Event()

        async def turn(name: str) -> None:
            async with store.exclusive(U):
                order.append(name)
                if name == "first":
                    await leave.wait()

        first = asyncio.ensure_future(turn("first"))
        await asyncio.sleep(0)
        cancelled = asyncio.ensure_future(turn("cancelled"))
        last = asyncio.ensure_future(turn("last"))
        await asyncio.sleep(0)  # both wait for the first to leave
        cancelled.cancel()
        leave.set()
        await asyncio.wait_for(asyncio.gather(first, last), WAIT)
        assert cancelled.cancelled()
        assert order == ["first", "last"]
        assert len(store._writers) == 0

    asyncio.run(asyncio.wait_for(main(), WAIT))


def test_the_managers_caches_stay_bounded(monkeypatch):
    import creditmeter._base as base  # noqa: PLC0415
    import creditmeter.aio as aio  # noqa: PLC0415
    import creditmeter.manager as manager  # noqa: PLC0415

    for module in (base, aio, manager):  # each reads it where the hot path inlines it
        monkeypatch.setattr(module, "SEEN_LIMIT", 50)
    store = MemoryStore()
    first, second = BalanceManager(store, CONFIG), BalanceManager(store, CONFIG)
    for n in range(300):
        first.charge(f"u{n}", 1)
        second.charge(f"u{n}", 1)
        first.charge(f"u{n}", 1)  # from a stale account: lost once, so hot
        assert len(first._seen) <= 50
        assert len(first._hot) <= 50


# --- cancellation ----------------------------------------------------------------------


class Pointed:
    """An async store whose every await is a numbered point where the caller may be cancelled.

    Each call has three: before it, while it is in flight (the caller is
    cancelled at the call's first suspension, as a timeout would) and after it
    returned; ``exclusive()`` has before and in flight on entry, one as the
    block starts, and in flight and after on exit.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.count = 0
        self.cancel_at: int | None = None
        self.gate: asyncio.Event | None = None  # while set, loads wait for it to open
        self.paused = asyncio.Event()

    def _due(self) -> bool:
        self.count += 1
        return self.count == self.cancel_at

    async def _point(self) -> None:
        if self._due():
            current = asyncio.current_task()
            assert current is not None
            current.cancel()
        await asyncio.sleep(0)

    async def _call(
        self, make: Callable[[], Awaitable[Any]], *, before: bool = True, after: bool = True
    ) -> Any:
        if before:
            await self._point()
        current = asyncio.current_task()
        assert current is not None
        if self._due():  # in flight: cancelled at the call's first suspension, or just after
            asyncio.get_running_loop().call_soon(current.cancel)
            return await make()
        result = await make()
        if after:
            await self._point()
        return result

    async def load(self, user_id: str) -> Any:
        gate = self.gate
        if gate is not None and not gate.is_set():
            self.paused.set()
            await gate.wait()
        return await self._call(lambda: self.inner.load(user_id))

    async def commit(self, account: Any, entries: Any, *, expected_version: Any) -> None:
        await self._call(
            lambda: self.inner.commit(account, entries, expected_version=expected_version)
        )

    async def find_request(self, user_id: str, request_id: str) -> Any:
        return await self._call(lambda: self.inner.find_request(user_id, request_id))

    async def ledger(self, user_id: str, *, limit: int | None = None) -> Any:
        return await self._call(lambda: self.inner.ledger(user_id, limit=limit))

    async def users(self) -> Any:
        return await self._call(self.inner.users)

    async def aclose(self) -> None:
        await self.inner.aclose()

    @contextlib.asynccontextmanager
    async def exclusive(self, user_id: str) -> AsyncIterator[None]:
        # ``async with`` runs its body right after __aenter__ returns: the point after
        # entering is the block's first await, inside it.
        held = self.inner.exclusive(user_id)
        await self._call(held.__aenter__, after=False)
        try:
            await self._point()
            yield
        except BaseException as exc:
            failure = exc
            await self._call(
                lambda: held.__aexit__(type(failure), failure, failure.__traceback__),
                before=False,
            )
            raise
        await self._call(lambda: held.__aexit__(None, None, None), before=False)


REFILLING = BalanceConfig(
    enabled=True,
    start_balance=10**6,
    auto_refill_enabled=True,
    refill_interval_value=1,
    refill_interval_unit="days",
    refill_amount=10,
    refill_mode="on_interval",
)


class Scene:
    """One store, a manager over the pointed store, and what callers were handed."""

    def __init__(self, real: Any, kind: str, folder: Path) -> None:
        self.real = real
        self.kind = kind
        self.folder = folder
        self.store = Pointed(real)
        self.clock = FakeClock()
        self.meter = AsyncBalanceManager(self.store, REFILLING, clock=self.clock)
        self.other = AsyncBalanceManager(real, REFILLING, clock=self.clock)
        self.got: set[str] = set()  # ids of the holds handed to a caller
        self.counter = 0
        self.user = U  # each operation's own, so that ledgers stay short

    def unique(self, stem: str) -> str:
        self.counter += 1
        return f"{stem}-{self.counter}"

    async def settle_target(self) -> Any:
        held = await self.other.hold(self.user, 3)
        self.got.add(held.id)
        return held

    async def check(self) -> None:
        """Whole, nothing held that no caller got, nothing locked, and the next charge runs."""
        account = await self.real.load(self.user)
        ledger = await self.real.ledger(self.user)
        assert sum(e.amount for e in ledger) == account.balance
        for before, after in itertools.pairwise(ledger):
            assert before.balance_after + after.amount == after.balance_after
        orphans = {h.id for h in account.holds} - self.got
        assert not orphans, f"holds no caller got: {orphans}"
        assert not any(lock.locked() for lock in self.meter._locks)
        await self.exclusive_is_free()
        self.store.cancel_at = None
        await asyncio.wait_for(self.meter.charge(self.user, 1), WAIT)

    async def exclusive_is_free(self) -> None:
        if self.kind == "sqlite":
            # The writer lock is an flock of this file: try it from a descriptor of our own.
            fd = os.open(str(self.folder / "credits.db.lock"), os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if held
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        elif self.kind == "memory":

            async def enter() -> None:
                async with self.real.exclusive(self.user):
                    pass

            await asyncio.wait_for(asyncio.ensure_future(enter()), WAIT)


Op = Callable[[Scene], Awaitable[Any]]


async def _hold(scene: Scene, **options: Any) -> None:
    held = await scene.meter.hold(scene.user, 5, **options)
    scene.got.add(held.id)


OPS: dict[str, Callable[[Scene], Awaitable[Op]]] = {}


def op(name: str) -> Callable[[Callable[[Scene], Awaitable[Op]]], Any]:
    def register(prepare: Callable[[Scene], Awaitable[Op]]) -> Any:
        OPS[name] = prepare
        return prepare

    return register


@op("open")
async def _open(scene: Scene) -> Op:
    user = scene.unique("new")
    return lambda s: s.meter.account(user)


@op("grant")
async def _grant(scene: Scene) -> Op:
    return lambda s: s.meter.grant(s.user, 2)


@op("charge")
async def _charge(scene: Scene) -> Op:
    return lambda s: s.meter.charge(s.user, 1)


@op("charge-request-id")
async def _charge_request(scene: Scene) -> Op:
    request = scene.unique("c")
    return lambda s: s.meter.charge(s.user, 1, request_id=request)


@op("set_balance")
async def _set_balance(scene: Scene) -> Op:
    return lambda s: s.meter.set_balance(s.user, 10**6)


@op("check-refill")
async def _check(scene: Scene) -> Op:
    scene.clock.advance(timedelta(days=2))
    return lambda s: s.meter.check(s.user, 1)


@op("configure_refill")
async def _configure(scene: Scene) -> Op:
    settings = RefillSettings(enabled=True, interval_value=1, interval_unit="days", amount=5)
    return lambda s: s.meter.configure_refill(s.user, settings)


@op("hold")
async def _hold_op(scene: Scene) -> Op:
    return _hold


@op("hold-request-id")
async def _hold_request(scene: Scene) -> Op:
    request = scene.unique("h")
    return lambda s: _hold(s, request_id=request)


@op("settle")
async def _settle(scene: Scene) -> Op:
    held = await scene.settle_target()
    return lambda s: s.meter.settle(held, 2)


@op("release")
async def _release(scene: Scene) -> Op:
    held = await scene.settle_target()
    return lambda s: s.meter.release(held)


async def cancel_everywhere(scene: Scene, name: str, *, stale: bool) -> int:
    """Cancel ``name`` at each point in turn until it completes; return the points it had."""
    scene.user = f"{name}{'-stale' if stale else ''}"
    await scene.meter.charge(scene.user, 1)
    for point in range(1, 200):
        run = await OPS[name](scene)
        if stale:
            await scene.other.charge(scene.user, 1)  # the meter's remembered account is stale now
        scene.store.cancel_at = scene.store.count + point
        task = asyncio.ensure_future(run(scene))
        await asyncio.wait([task], timeout=WAIT)
        assert task.done(), f"{name} hung after a cancellation at point {point}"
        if not task.cancelled():
            task.result()  # no error but the cancellation
        reached = scene.store.count >= scene.store.cancel_at
        try:
            await scene.check()
        except Exception as exc:
            where = f"{name}{' (stale)' if stale else ''} cancelled at point {point}"
            raise AssertionError(f"{where}: {exc!r}") from exc
        if not reached:
            return point - 1
    raise AssertionError(f"{name} never completed")


# Every write runs through one retry path: these also run from a stale account.
STALE = {"charge", "charge-request-id", "hold", "hold-request-id", "settle"}
# On the network stores, by default, the writes whose cancellation matters most.
EVERY_OP = os.environ.get("CREDITMETER_CANCEL_EVERY_OP") == "1"
NETWORK_OPS = {"charge-request-id", "hold", "hold-request-id", "settle"}


@pytest.mark.parametrize("kind", ["memory", "sqlite", "redis", "postgres"])
def test_cancel_at_every_await(kind, tmp_path):
    names = list(OPS)
    if kind in ("redis", "postgres") and not EVERY_OP:
        names = [name for name in names if name in NETWORK_OPS]

    async def main() -> dict[str, int]:
        async with open_async_store(kind, tmp_path) as real:
            scene = Scene(real, kind, tmp_path)
            points = {}
            for name in names:
                points[name] = await cancel_everywhere(scene, name, stale=False)
                if name in STALE:
                    points[f"{name}-stale"] = await cancel_everywhere(scene, name, stale=True)
            return points

    points = asyncio.run(asyncio.wait_for(main(), 120))
    assert all(count >= 3 for count in points.values()), points


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_cancelled_while_waiting_for_the_users_lock(kind, tmp_path):
    async def main() -> None:
        async with open_async_store(kind, tmp_path) as real:
            scene = Scene(real, kind, tmp_path)
            user = "waits"
            gate = scene.store.gate = asyncio.Event()
            blocker = asyncio.ensure_future(scene.meter.charge(user, 1))  # loads: paused
            await asyncio.wait_for(scene.store.paused.wait(), WAIT)
            victims = [asyncio.ensure_future(scene.meter.charge(user, 1)) for _ in range(3)]
            await asyncio.sleep(0)
            victims[1].cancel()
            gate.set()
            await asyncio.wait_for(asyncio.gather(blocker, victims[0], victims[2]), WAIT)
            assert victims[1].cancelled()
            assert not any(lock.locked() for lock in scene.meter._locks)
            assert await scene.meter.balance(user) == Decimal(10**6 - 3)

    asyncio.run(asyncio.wait_for(main(), 60))
