"""The eight backends (``conftest.MANAGER_BACKENDS`` picks), and the bridge that drives both.

A backend is a store kind (memory, SQLite, Redis, PostgreSQL) with the sync
manager or the async one: ``BACKENDS`` names all eight, and the ``backend``
fixture of ``conftest.py`` is parametrised over them (as PyrateLimiter's and
limits' suites run every backend). Redis and PostgreSQL need the servers of
``services.py``: without them those tests skip, or fail under
``CREDITMETER_REQUIRE_SERVICES=1``.

Each test gets empty places of its own (``Backend.place``): a temporary SQLite
file (durability "normal": these tests are about logic, the crash tests
about power cuts), a Redis key prefix in db 15, a PostgreSQL table prefix;
every store opened on one place sees the same data, so two managers on one
place contend as two processes would. Everything is closed and dropped when
the test ends.

The bridge: a test calls ``meter.charge(...)`` and gets a ``LedgerEntry``
from either manager. An async manager lives on a ``Portal``, an event loop
on a thread of its own; each call runs there as a task and the test's
thread waits for it (at most ``WAIT`` seconds: a hang fails, it never stalls
the suite). Threads of the test calling at once are tasks running at once
on that loop. ``reserve`` is a plain ``with`` block on both, ``metered``
decorates a plain function on both (the bridge makes the ``async def`` an
async manager needs), and an ``on_event`` callback that calls the manager
back returns that call (``return meter.manager.grant(...)``): the async
manager awaits what its callback returns.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import itertools
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from services import (
    POSTGRES_DSN,
    REDIS_URL,
    drop_postgres_tables,
    drop_redis_keys,
    need,
    reach_postgres,
    reach_redis,
    unique,
    wait_for_postgres_horizon,
)

from creditmeter import (
    AsyncBalanceManager,
    AsyncMemoryStore,
    AsyncSQLiteStore,
    BalanceConfig,
    BalanceManager,
    MemoryStore,
    SQLiteStore,
)

KINDS = ("memory", "sqlite", "redis", "postgres")
BACKENDS = (*KINDS, *(f"async-{kind}" for kind in KINDS))
WAIT = 60.0  # seconds one bridged call may take before it counts as hung
CONFIG = BalanceConfig(enabled=True)


class Portal:
    """An event loop running on a thread of its own; ``call`` runs a coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="portal", daemon=True)
        self.thread.start()

    def call(self, awaitable: Any, timeout: float = WAIT) -> Any:
        """Run ``awaitable`` as a task on the loop, in the caller's context; return its result."""
        self.check_thread()
        context = contextvars.copy_context()  # so acting_as() reaches the task
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        started: list[asyncio.Task[Any]] = []

        def finish(task: asyncio.Task[Any]) -> None:
            if task.cancelled():
                done.cancel()
            elif task.exception() is not None:
                done.set_exception(task.exception())  # type: ignore[arg-type]
            else:
                done.set_result(task.result())

        def start() -> None:
            task = context.run(self.loop.create_task, _awaited(awaitable))
            started.append(task)
            task.add_done_callback(finish)

        self.loop.call_soon_threadsafe(start)
        # Not done.result(timeout): the call's own TimeoutError would read as the wait's.
        if not concurrent.futures.wait([done], timeout).done:
            self.loop.call_soon_threadsafe(lambda: [task.cancel() for task in started])
            raise AssertionError(f"an async call did not finish within {timeout} s")
        return done.result()

    def check_thread(self) -> None:
        """Refuse a blocking call from the loop's own thread: it would wait forever."""
        if threading.get_ident() == self.thread.ident:
            raise RuntimeError("a blocking call from the portal's loop: call the async manager")

    def close(self) -> None:
        """Stop the loop and its thread."""
        self.call(self.loop.shutdown_asyncgens())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)
        self.loop.close()


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


async def _built(make: Callable[[], Any]) -> Any:
    """Build an object on the portal's loop (async stores may bind the loop they start on)."""
    built = make()
    return await built if inspect.isawaitable(built) else built


class Synced:
    """A blocking view of an async object (a store, a reservation) through a portal."""

    def __init__(self, target: Any, portal: Portal) -> None:
        self.target = target
        self.portal = portal

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.target, name)
        if not callable(attribute):
            return attribute

        @functools.wraps(attribute)
        def call(*args: Any, **kwargs: Any) -> Any:
            self.portal.check_thread()
            result = attribute(*args, **kwargs)
            return self.portal.call(result) if inspect.isawaitable(result) else result

        return call


class Meter(Synced):
    """A manager driven by blocking calls: a sync one as it is, an async one through the portal.

    ``manager`` is the real manager, ``store`` its store (blocking too), and
    ``is_async`` says which one this is.
    """

    def __init__(self, manager: Any, portal: Portal | None) -> None:
        super().__init__(manager, portal)  # type: ignore[arg-type]
        self.manager = manager
        self.is_async = portal is not None
        self.store = manager.store if portal is None else Synced(manager.store, portal)
        self._postgres = type(manager.store).__name__ in ("PostgresStore", "AsyncPostgresStore")

    def entries(self, *args: Any, **kwargs: Any) -> Any:
        """``entries``; of every user on PostgreSQL, once the server's horizon has passed."""
        if self._postgres and kwargs.get("user") is None:
            wait_for_postgres_horizon()
        if self.portal is None:
            return self.manager.entries(*args, **kwargs)
        return self.portal.call(self.manager.entries(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        if self.portal is None:
            return getattr(self.manager, name)
        return super().__getattr__(name)

    def reserve(self, *args: Any, **kwargs: Any) -> Any:
        """``with meter.reserve(...) as held:`` on both managers."""
        reservation = self.manager.reserve(*args, **kwargs)
        return reservation if self.portal is None else self._entered(reservation)

    @contextlib.contextmanager
    def _entered(self, reservation: Any) -> Iterator[Synced]:
        portal = self.portal
        assert portal is not None
        held = portal.call(reservation.__aenter__())
        try:
            yield Synced(held, portal)
        except BaseException as exc:
            if not portal.call(reservation.__aexit__(type(exc), exc, exc.__traceback__)):
                raise
        else:
            portal.call(reservation.__aexit__(None, None, None))

    def metered(self, **options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorate a plain function; on an async manager it runs as an ``async def`` would."""
        if self.portal is None:
            return self.manager.metered(**options)
        portal = self.portal

        def decorate(function: Callable[..., Any]) -> Callable[..., Any]:
            async def body(*args: Any, **kwargs: Any) -> Any:
                return function(*args, **kwargs)

            body.__name__ = function.__name__
            body.__signature__ = inspect.signature(function)  # type: ignore[attr-defined]
            wrapped = self.manager.metered(**options)(body)

            @functools.wraps(function)
            def call(*args: Any, **kwargs: Any) -> Any:
                return portal.call(wrapped(*args, **kwargs))

            return call

        return decorate


class Place:
    """One empty location of a store kind: every store opened on it sees the same data.

    SQLite: a file in ``folder`` (``credits.db`` for the first place);
    Redis: a key prefix; PostgreSQL: a table prefix; memory: one store object.
    """

    def __init__(self, kind: str, is_async: bool, folder: Path, number: int = 0) -> None:
        self.kind = kind
        self.is_async = is_async
        self.stores: list[Any] = []
        if kind == "memory":
            self.shared = AsyncMemoryStore() if is_async else MemoryStore()
        elif kind == "sqlite":
            self.path = folder / ("credits.db" if number == 0 else f"credits-{number}.db")
        elif kind == "redis":
            need("redis", reach_redis)
            self.prefix = unique("cmtest:") + ":"
        elif kind == "redis-cluster":  # not in KINDS: tests/stores/test_redis_cluster*.py use it
            from cluster import reach_cluster  # noqa: PLC0415

            need("redis-cluster", reach_cluster)
            self.prefix = unique("cmtest:") + ":"
        else:
            need("postgres", reach_postgres)
            self.prefix = unique("cm_") + "_"

    def maker(self) -> Callable[[], Any]:
        """How to build the next store on this place (its result may need awaiting)."""
        kind, is_async, first = self.kind, self.is_async, not self.stores
        if kind == "memory":
            return lambda: self.shared
        if kind == "sqlite":
            cls = AsyncSQLiteStore if is_async else SQLiteStore
            return functools.partial(cls, self.path, durability="normal")
        if kind == "redis":
            from creditmeter.stores.redis import AsyncRedisStore, RedisStore  # noqa: PLC0415

            cls = AsyncRedisStore if is_async else RedisStore
            return functools.partial(cls, REDIS_URL, prefix=self.prefix)
        if kind == "redis-cluster":
            from cluster import CLUSTER_URL  # noqa: PLC0415

            from creditmeter.stores.redis import AsyncRedisStore, RedisStore  # noqa: PLC0415

            cls = AsyncRedisStore if is_async else RedisStore
            return functools.partial(cls, CLUSTER_URL, prefix=self.prefix)
        from creditmeter.stores.postgres import AsyncPostgresStore, PostgresStore  # noqa: PLC0415

        if is_async and first:  # opened at once, so the tables exist for the stores after it
            return functools.partial(AsyncPostgresStore.open, POSTGRES_DSN, prefix=self.prefix)
        cls = AsyncPostgresStore if is_async else PostgresStore
        return functools.partial(cls, POSTGRES_DSN, prefix=self.prefix, create_schema=first)

    def kept(self, store: Any) -> Any:
        """Remember ``store`` (once) so that it is closed with the place."""
        if all(store is not other for other in self.stores):
            self.stores.append(store)
        return store

    def drop(self) -> None:
        """Remove what a server holds under this place."""
        if self.kind == "redis":
            drop_redis_keys(self.prefix)
        elif self.kind == "redis-cluster":
            from cluster import drop_cluster_keys  # noqa: PLC0415

            drop_cluster_keys(self.prefix)
        elif self.kind == "postgres":
            drop_postgres_tables(self.prefix)


class Backend:
    """One of ``BACKENDS`` for one test: its places, its managers, and the portal."""

    def __init__(self, name: str, folder: Path) -> None:
        self.name = name
        self.is_async = name.startswith("async-")
        self.kind = name.removeprefix("async-")
        self.folder = folder
        self._numbers = itertools.count()
        self._places: list[Place] = []
        self.place = self.new_place()
        """The test's place: where ``manager()`` opens its stores unless told otherwise."""
        self.portal = Portal() if self.is_async else None

    def new_place(self) -> Place:
        """Another empty place (the state machine takes one per example)."""
        place = Place(self.kind, self.is_async, self.folder, next(self._numbers))
        self._places.append(place)
        return place

    def close_place(self, place: Place) -> None:
        """Close the stores of ``place`` and drop it."""
        self._places.remove(place)
        self._close(place)

    def store(self, place: Place | None = None) -> Any:
        """A new store (sync or async, as the backend is) on ``place`` (the test's by default)."""
        place = place or self.place
        make = place.maker()
        return place.kept(make() if self.portal is None else self.portal.call(_built(make)))

    def manager(
        self,
        config: BalanceConfig = CONFIG,
        *,
        store: Any = None,
        place: Place | None = None,
        **options: Any,
    ) -> Meter:
        """A manager of the backend's flavour over ``store`` (a new one on ``place`` if None)."""
        if store is None:
            store = self.store(place)
        if self.portal is None:
            return Meter(BalanceManager(store, config, **options), None)
        make = functools.partial(AsyncBalanceManager, store, config, **options)
        return Meter(self.portal.call(_built(make)), self.portal)

    def blocking(self, store: Any) -> Any:
        """``store`` with blocking methods (itself when sync)."""
        return store if self.portal is None else Synced(store, self.portal)

    def _close(self, place: Place) -> None:
        with contextlib.ExitStack() as closing:  # every one runs, whichever fails
            closing.callback(place.drop)
            portal = self.portal
            for store in place.stores:
                if portal is None:
                    closing.callback(store.close)
                else:
                    closing.callback(lambda store=store: portal.call(store.aclose()))
            place.stores = []

    def close(self) -> None:
        """Close every store, drop every place, stop the portal."""
        with contextlib.ExitStack() as closing:
            if self.portal is not None:
                closing.callback(self.portal.close)
            for place in self._places:
                closing.callback(self._close, place)
            self._places = []


# --- one store of a kind, for tests that drive it themselves --------------------------------


@contextlib.contextmanager
def open_store(kind: str, folder: Path) -> Iterator[Any]:
    """A fresh sync store of ``kind`` (SQLite: ``folder/credits.db``), dropped after."""
    place = Place(kind, False, folder)
    try:
        with place.kept(place.maker()()) as store:
            yield store
    finally:
        place.drop()


@contextlib.asynccontextmanager
async def open_async_store(kind: str, folder: Path) -> AsyncIterator[Any]:
    """A fresh async store of ``kind`` on the running loop (SQLite: ``folder/credits.db``)."""
    place = Place(kind, True, folder)
    try:
        async with await _built(place.maker()) as store:
            yield store
    finally:
        place.drop()


def in_threads(count: int, work: Callable[[int], object], *, timeout: float = WAIT) -> list[Any]:
    """Run ``work(0)`` ... ``work(count - 1)`` on threads at once; return the results in order.

    The first exception a thread raised is raised here; a thread still running
    after ``timeout`` seconds fails the test.
    """
    results: list[Any] = [None] * count
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def run(number: int) -> None:
        try:
            barrier.wait(timeout)
            results[number] = work(number)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), f"a thread did not finish within {timeout} s"
    if errors:
        raise errors[0]
    return results


def contract_store(kind: str, is_async: bool, tmp_path: Path) -> Iterator[Any]:
    """A fresh store of ``kind`` for ``StoreContract`` (an async one behind ``Blocking``).

    A generator for a fixture to ``yield from``; the store is closed and its
    place dropped afterwards.
    """
    from creditmeter.testing import Blocking  # noqa: PLC0415

    async def built(make: Callable[[], Any]) -> Any:
        made = make()
        return await made if inspect.isawaitable(made) else made

    place = Place(kind, is_async, tmp_path)
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(place.drop)
        if not is_async:
            store = place.kept(place.maker()())
            cleanup.callback(store.close)
            yield store
            return
        loop = asyncio.new_event_loop()
        cleanup.callback(loop.close)
        blocking = Blocking(loop.run_until_complete(built(place.maker())), loop=loop)
        cleanup.callback(blocking.close)
        yield blocking
