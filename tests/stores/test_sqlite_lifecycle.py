"""SQLiteStore and AsyncSQLiteStore over a process's life (issue 12).

Fork, cancellation, thread churn, read-only files, and the URLs that name them.
Scenarios that fork, lock the file from another process or drop privileges
run in subprocesses; this file is also their script
(``python tests/stores/test_sqlite_lifecycle.py COMMAND ...``), so a hang there is a
timeout here, never a hung suite.

``CREDITMETER_CHURN_THREADS`` (default 1000) sets how many short-lived threads
the churn test starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from creditmeter import (
    AsyncBalanceManager,
    AsyncSQLiteStore,
    BalanceConfig,
    BalanceManager,
    ConfigError,
    EntryKind,
    SQLiteStore,
    StoreError,
    open_async_store,
    open_store,
)

HERE = Path(__file__).resolve()
START = 10**6
CONFIG = BalanceConfig(enabled=True, start_balance=START)
NOBODY = 65534


# --- helpers -----------------------------------------------------------------------------


def run_script(*args: str, timeout: float) -> Any:
    """Run this file as a script in its own session; its last stdout line is JSON.

    On timeout the whole process group is killed (a forked child too), and the
    test fails naming the command.
    """
    proc = subprocess.Popen(
        [sys.executable, str(HERE), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(args[:2])} hung (killed after {timeout} s): {err[-3000:]}")
    assert proc.returncode == 0, err[-5000:]
    return json.loads(out.strip().splitlines()[-1])


def open_fds() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


def fds_on(path: Path | str) -> list[str]:
    """This process's descriptors open on the store's files (database, -wal, -shm, .lock)."""
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = str(fd.readlink())
            if target.startswith(str(path)):
                found.append(target)
    return found


def flock_entries(lock_path: Path | str) -> list[tuple[bool, int]]:
    """(waiting, pid) for each flock on ``lock_path``, from /proc/locks."""
    inode = Path(lock_path).stat().st_ino
    entries = []
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "FLOCK" in fields and fields[-3].endswith(f":{inode}"):
            entries.append(("->" in fields, int(fields[-4])))
    return entries


def snapshot(store: SQLiteStore) -> dict[str, Any]:
    """Every user's balance and ledger, as plain JSON."""
    users = store.users()
    return {
        "users": users,
        "balances": {user: str(store.load(user).balance) for user in users},
        "ledgers": {
            user: [[e.kind.value, str(e.amount), e.request_id] for e in store.ledger(user)]
            for user in users
        },
    }


def check_charges(store: SQLiteStore, expected: dict[str, int]) -> dict[str, Any]:
    """Users whose stored charges differ from ``expected`` (user -> number of 1-credit charges)."""
    wrong = {}
    for user, charges in sorted(expected.items()):
        account = store.load(user)
        entries = store.ledger(user)
        found = {
            "balance": None if account is None else str(account.balance),
            "charges": [e.kind for e in entries].count(EntryKind.CHARGE),
            "ledger sum": str(sum(e.amount for e in entries)),
        }
        want = {
            "balance": str(START - charges),
            "charges": charges,
            "ledger sum": str(START - charges),
        }
        if found != want:
            wrong[user] = {"expected": want, "found": found}
    return wrong


# --- 1. fork -------------------------------------------------------------------------------

USERS, PHASE_ONE, PHASE_TWO = 8, 160, 80


def charge_round(
    manager: BalanceManager, store: SQLiteStore, side: str, tag: str, count: int
) -> list[str]:
    """``count`` charges of 1 over this side's users; each load must return its own user."""
    errors = []
    for number in range(count):
        user = f"{side}{number % USERS}"
        manager.charge(user, 1, request_id=f"{tag}-{number}")
        account = store.load(user)
        if account is None or account.user_id != user:
            errors.append(f"load({user!r}) returned {account and account.user_id!r}")
    return errors


async def async_charge_round(store: AsyncSQLiteStore, side: str, tag: str, count: int) -> list[str]:
    manager = AsyncBalanceManager(store, CONFIG)  # its asyncio locks belong to this loop
    errors = []
    for number in range(count):
        user = f"{side}{number % USERS}"
        await manager.charge(user, 1, request_id=f"{tag}-{number}")
        account = await store.load(user)
        if account is None or account.user_id != user:
            errors.append(f"load({user!r}) returned {account and account.user_id!r}")
    return errors


def fork_scenario(kind: str, directory: str) -> dict[str, Any]:
    """A store made and used before a fork, then used by the parent and the child at once.

    The parent also keeps two threads writing while it forks (so a lock of the
    store may be held by another thread at that moment). The parent closes its
    store first; the child then writes again: with a connection inherited from
    the parent, SQLite's lock state in the child is the parent's, the parent's
    last close deletes the WAL, and the child's later commits are lost.
    """
    path = str(Path(directory) / "credits.db")
    context = multiprocessing.get_context("fork")
    parent_closed = context.Event()
    receive, send = context.Pipe(duplex=False)
    stop = threading.Event()
    background_counts = [0, 0]
    errors: list[str] = []

    if kind == "sync":
        store = SQLiteStore(path, durability="normal")
        manager = BalanceManager(store, CONFIG)
        manager.grant("seed", 1)

        def background(number: int) -> None:
            user = f"bg{number}"
            while not stop.is_set():
                manager.charge(user, 1)
                background_counts[number] += 1
                account = store.load(user)
                if account is None or account.user_id != user:
                    errors.append(f"background load({user!r}) returned another user")

        def child() -> None:
            found = charge_round(manager, store, "c", "c1", PHASE_ONE)
            if not parent_closed.wait(30):
                found.append("the parent never closed its store")
            found += charge_round(manager, store, "c", "c2", PHASE_TWO)
            store.close()
            send.send(found)

        def parent() -> list[str]:
            found = charge_round(manager, store, "p", "p1", PHASE_ONE)
            stop.set()
            return found

        def close_parent() -> None:
            store.close()

    else:
        astore = AsyncSQLiteStore(path, durability="normal")

        async def seed() -> None:
            await AsyncBalanceManager(astore, CONFIG).grant("seed", 1)

        asyncio.run(seed())  # the worker thread exists, and has a connection

        async def hammer(number: int) -> None:
            manager = AsyncBalanceManager(astore, CONFIG)
            user = f"bg{number}"
            while not stop.is_set():
                await manager.charge(user, 1)
                background_counts[number] += 1
                account = await astore.load(user)
                if account is None or account.user_id != user:
                    errors.append(f"background load({user!r}) returned another user")

        def background(number: int) -> None:
            asyncio.run(hammer(number))

        async def child_run() -> list[str]:
            found = await async_charge_round(astore, "c", "c1", PHASE_ONE)
            if not parent_closed.wait(30):
                found.append("the parent never closed its store")
            found += await async_charge_round(astore, "c", "c2", PHASE_TWO)
            await astore.aclose()
            return found

        def child() -> None:
            try:
                found = asyncio.run(asyncio.wait_for(child_run(), 20))
            except asyncio.TimeoutError:
                found = ["the child's calls never finished"]
            send.send(found)

        def parent() -> list[str]:
            found = asyncio.run(
                asyncio.wait_for(async_charge_round(astore, "p", "p1", PHASE_ONE), 60)
            )
            stop.set()
            return found

        def close_parent() -> None:
            asyncio.run(astore.aclose())

    threads = [threading.Thread(target=background, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 20
    while min(background_counts) == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    process = context.Process(target=child)
    process.start()
    errors += parent()
    for thread in threads:
        thread.join(30)
    hung = [f"background thread {n}" for n, t in enumerate(threads) if t.is_alive()]
    close_parent()
    parent_closed.set()
    if receive.poll(40):
        errors += receive.recv()
    else:
        hung.append("child")
    process.join(10)
    if process.is_alive():
        process.kill()
        process.join(10)
    elif process.exitcode != 0:
        errors.append(f"child exit code {process.exitcode}")
    expected = {f"p{n}": PHASE_ONE // USERS for n in range(USERS)}
    expected.update({f"c{n}": (PHASE_ONE + PHASE_TWO) // USERS for n in range(USERS)})
    expected.update({f"bg{n}": count for n, count in enumerate(background_counts)})
    with SQLiteStore(path) as fresh:
        wrong = check_charges(fresh, expected)
        seed = fresh.load("seed")
        if seed is None or seed.balance != START + 1:
            wrong["seed"] = str(seed and seed.balance)
    return {"errors": errors, "hung": hung, "wrong": wrong}


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_store_made_before_fork_works_in_parent_and_child(kind, tmp_path):
    """Each side opens its own connections and lock descriptors and loses nothing.

    Before the fix: sync, the child's second round was lost (its 80 charges
    missing: the parent's close deleted the WAL the child was writing to);
    async, the child hung on its first call (the executor believed the
    parent's worker thread, absent in the child, was idle).
    """
    result = run_script("fork", kind, str(tmp_path), timeout=120)
    assert result == {"errors": [], "hung": [], "wrong": {}}


# --- 2. cancellation -----------------------------------------------------------------------


class Locker:
    """Another process that holds, releases and probes a file's writer lock on command."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE), "locker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def ask(self, command: str, timeout: float = 15) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return "no answer"

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


@pytest.fixture(scope="module")
def locker() -> Iterator[Locker]:
    other = Locker()  # one for the module: starting a process costs about a second
    try:
        assert other.ask("ping") == "pong"
        yield other
    finally:
        other.close()


async def until(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.005)


def waiting_here(lock_path: Path) -> bool:
    return (True, os.getpid()) in flock_entries(lock_path)


def held_here(lock_path: Path) -> bool:
    return (False, os.getpid()) in flock_entries(lock_path)


CANCEL_POINTS = [
    "load",
    "find_request",
    "ledger",
    "users",
    "commit",
    "exclusive enter",
    "inside exclusive",
    "aclose",
]


async def cancel_at(point: str, path: Path, locker: Locker) -> None:
    lock_path = Path(f"{path}.lock")
    store = AsyncSQLiteStore(path, durability="normal")
    manager = AsyncBalanceManager(store, CONFIG)
    await manager.grant("alice", 5, request_id="g1")
    await manager.grant("bob", 5)
    alice = await store.load("alice")
    assert alice is not None
    queued_behind: asyncio.Task[Any] | None = None

    if point != "inside exclusive":
        assert await asyncio.to_thread(locker.ask, f"hold {path}") == "held"

    if point in ("load", "find_request", "ledger", "users", "aclose"):
        # The worker thread is busy with another task's charge, waiting for the lock:
        # the call under test is queued behind it when it is cancelled.
        queued_behind = asyncio.create_task(manager.charge("bob", 1, request_id="behind"))
        await until(lambda: waiting_here(lock_path), "the charge waits for the lock")
        call = {
            "load": lambda: store.load("alice"),
            "find_request": lambda: store.find_request("alice", "g1"),
            "ledger": lambda: store.ledger("alice"),
            "users": store.users,
            "aclose": store.aclose,
        }[point]
        task = asyncio.create_task(call())
    elif point == "commit":
        change = attrs.evolve(alice, balance=alice.balance - 1, version=alice.version + 1)
        entry = (await store.ledger("alice"))[-1]
        cancelled_entry = attrs.evolve(entry, id="cancelled", request_id="cancelled", amount=-1)
        task = asyncio.create_task(
            store.commit(change, [cancelled_entry], expected_version=alice.version)
        )
        await until(lambda: waiting_here(lock_path), "the commit waits for the lock")
    elif point == "exclusive enter":

        async def enter() -> None:
            async with store.exclusive("alice"):
                raise AssertionError("entered although cancelled")

        task = asyncio.create_task(enter())
        await until(lambda: waiting_here(lock_path), "exclusive() waits for the lock")
    else:  # inside exclusive: we hold the lock and await the store in a loop
        entered = asyncio.Event()

        async def inside() -> None:
            async with store.exclusive("alice"):
                entered.set()
                while True:
                    await store.ledger("alice")

        task = asyncio.create_task(inside())
        await asyncio.wait_for(entered.wait(), 10)
        assert held_here(lock_path)
        for _ in range(5):
            await asyncio.sleep(0)

    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 10)

    if point != "inside exclusive":
        assert await asyncio.to_thread(locker.ask, "release") == "released"
    if queued_behind is not None:
        await asyncio.wait_for(queued_behind, 10)  # not cancelled: it is applied
    # Another process takes the lock, and writes.
    assert await asyncio.to_thread(locker.ask, f"probe {path}") == "took"
    assert await asyncio.to_thread(locker.ask, f"charge {path} carol") == "charged"
    await until(lambda: not held_here(lock_path), "this process holds no lock")

    if point == "aclose":
        await until(lambda: not fds_on(path), "the closed store's files are closed")
        with pytest.raises(StoreError):
            await store.load("alice")
        store = AsyncSQLiteStore(path, durability="normal")
        manager = AsyncBalanceManager(store, CONFIG)
    try:
        # The next call works, and nothing cancelled was written.
        await asyncio.wait_for(manager.charge("alice", 1, request_id="next"), 10)
        assert await store.find_request("alice", "cancelled") is None
        entries = await store.ledger("alice")
        assert [e.request_id for e in entries] == [None, "g1", "next"]
        account = await store.load("alice")
        assert account is not None
        assert account.balance == sum(e.amount for e in entries) == START + 4
        bob = await store.ledger("bob")
        behind = 1 if queued_behind is not None else 0
        assert [e.request_id for e in bob].count("behind") == behind
        assert await store.users() == ["alice", "bob", "carol"]
    finally:
        await store.aclose()


@pytest.mark.parametrize("point", CANCEL_POINTS)
def test_cancelling_an_async_call_holds_nothing(point, tmp_path, locker):
    """A call cancelled at each await, while another process holds the writer lock,
    leaves no lock held, writes nothing, and the next call works from here and
    from the other process.

    Before the fix: "exclusive enter" left the lock to the worker thread, which
    took it once released and kept it (the other process's probe timed out);
    "commit" was applied after its caller was cancelled; "aclose" never closed
    the connections (its job was cancelled in the queue).
    """
    asyncio.run(asyncio.wait_for(cancel_at(point, tmp_path / "credits.db", locker), 60))


# --- 3. thread churn -----------------------------------------------------------------------


def test_short_lived_threads_do_not_keep_connections(tmp_path):
    """One call per thread, 1000 threads: no error, and the descriptors stay few.

    Before the fix every thread kept 3 descriptors until close(): 3000 here,
    and with a 1024-descriptor limit every call failed after 338 threads.
    """
    count = int(os.environ.get("CREDITMETER_CHURN_THREADS", "1000"))
    path = tmp_path / "credits.db"
    errors: list[BaseException] = []
    with SQLiteStore(path, durability="normal") as store:
        manager = BalanceManager(store, CONFIG)
        manager.balance("u0")  # this thread has its connection
        before = open_fds()
        peak = before

        def one_call(number: int) -> None:
            try:
                manager.charge(f"u{number % 10}", 1)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        for number in range(count):
            thread = threading.Thread(target=one_call, args=(number,))
            thread.start()
            thread.join(30)
            assert not thread.is_alive()
            if number % 25 == 0:
                peak = max(peak, open_fds())
        after = open_fds()
        assert errors == []
        assert peak - before <= 6, (before, peak)
        assert after - before <= 6, (before, after)
        assert check_charges(store, {f"u{n}": count // 10 for n in range(10)}) == {}
    assert fds_on(path) == []


def test_close_closes_the_connections_of_threads_still_running(tmp_path):
    """close() from one thread closes what live threads opened; their next call is a StoreError."""
    path = tmp_path / "credits.db"
    store = SQLiteStore(path)
    used = threading.Barrier(5, timeout=10)
    closed = threading.Event()
    outcomes: list[str] = []

    def parked() -> None:
        store.load("x")
        used.wait()
        closed.wait(10)
        try:
            store.load("x")
            outcomes.append("read a closed store")
        except StoreError:
            outcomes.append("StoreError")

    threads = [threading.Thread(target=parked) for _ in range(4)]
    for thread in threads:
        thread.start()
    used.wait()
    assert len(fds_on(path)) >= 4 * 2
    store.close()
    assert fds_on(path) == []
    closed.set()
    for thread in threads:
        thread.join(10)
    assert outcomes == ["StoreError"] * 4


# --- 4. read-only files --------------------------------------------------------------------


def seed_store(path: Path) -> None:
    with SQLiteStore(path) as store:
        manager = BalanceManager(store, CONFIG)
        manager.grant("alice", 5, request_id="g1")
        manager.charge("alice", 2, request_id="c1")
        manager.grant("bob", 7)


@pytest.mark.parametrize("case", ["directory", "file", "live"])
def test_a_read_only_file_is_read_and_refuses_writes(case):
    """An operator who may read the file but not write it can list it; writes are StoreErrors.

    The reader runs as ``nobody`` (tests run as root, which ignores permission
    bits): "directory" — the file and its directory are readable, not writable
    (no -wal or -shm can be made: the file is read as immutable); "file" — a
    0444 file in a writable directory; "live" — as "directory", while a writer
    keeps the file open with commits still in its WAL. Before the fix the reader
    could not even open the store (StoreError: Permission denied).
    """
    root = os.geteuid() == 0
    if case == "live" and not root:
        pytest.skip("needs root: a writer and a reader that are different users")
    base = Path(tempfile.mkdtemp(prefix="creditmeter-ro-", dir="/tmp"))
    data = base / "data"
    path = data / "credits.db"
    writer = None
    try:
        base.chmod(0o755)
        data.mkdir()
        seed_store(path)
        if case == "file":
            path.chmod(0o444)
            data.chmod(0o777 if root else 0o755)
        else:
            path.chmod(0o644 if root else 0o444)
            data.chmod(0o755 if root else 0o555)
        if case == "live":  # opened after chmod: SQLite gives -wal and -shm the file's mode
            writer = SQLiteStore(path)
            BalanceManager(writer, CONFIG).charge("carol", 3, request_id="live")
        with SQLiteStore(path) as reference:
            expected = snapshot(reference)
        before = sorted(p.name for p in data.iterdir())
        result = run_script("readonly", str(path), timeout=60)
        assert result["read_only"] is True
        for way in ("sync", "async", "url"):
            assert result[way] == expected, way
        assert result["found"] == ["c1", "g1"]
        writes = ["charge", "grant", "open a new user", "commit", "async charge"]
        assert result["refused"] == [[name, "StoreError naming the file"] for name in writes]
        assert result["after"] == expected
        if case == "directory":
            assert sorted(p.name for p in data.iterdir()) == before  # nothing created
        with SQLiteStore(path) as reference:
            assert snapshot(reference) == expected
    finally:
        if writer is not None:
            writer.close()
        data.chmod(0o755)
        shutil.rmtree(base)


def readonly_scenario(path: str) -> dict[str, Any]:
    """As ``nobody`` (when run by root): read the store every way, then try to write."""
    if os.geteuid() == 0:
        # nobody cannot read root's Python: import everything first, by one run as root.
        with tempfile.TemporaryDirectory() as warm:
            seed_store(Path(warm) / "credits.db")
            read_every_way(str(Path(warm) / "credits.db"))
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    return read_every_way(path)


def read_every_way(path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def refused(name: str, write: Callable[[], object]) -> list[str]:
        try:
            write()
        except StoreError as exc:
            return [name, "StoreError naming the file" if path in str(exc) else str(exc)]
        except Exception as exc:
            return [name, repr(exc)]
        return [name, "written"]

    with SQLiteStore(path) as store:
        out["read_only"] = getattr(store, "read_only", None)
        out["sync"] = snapshot(store)
        found = [store.find_request("alice", rid) for rid in ("c1", "g1")]
        out["found"] = [entry.request_id for entry in found if entry is not None]
        manager = BalanceManager(store, CONFIG)
        account = store.load("alice")
        entry = store.ledger("alice")[-1]
        out["refused"] = [
            refused("charge", lambda: manager.charge("alice", 1)),
            refused("grant", lambda: manager.grant("bob", 1, request_id="g9")),
            refused("open a new user", lambda: manager.balance("zed")),
            refused(
                "commit",
                lambda: store.commit(account, [entry], expected_version=account.version),
            ),
        ]

    async def async_reads() -> dict[str, Any]:
        async with AsyncSQLiteStore(path) as astore:
            users = await astore.users()
            got = {
                "users": users,
                "balances": {u: str((await astore.load(u)).balance) for u in users},
                "ledgers": {
                    u: [[e.kind.value, str(e.amount), e.request_id] for e in await astore.ledger(u)]
                    for u in users
                },
            }
            try:
                await AsyncBalanceManager(astore, CONFIG).charge("alice", 1)
                out["refused"].append(["async charge", "written"])
            except StoreError as exc:
                named = "StoreError naming the file" if path in str(exc) else str(exc)
                out["refused"].append(["async charge", named])
            return got

    out["async"] = asyncio.run(async_reads())
    with open_store(f"sqlite:///{path}") as store:
        out["url"] = snapshot(store)
    with SQLiteStore(path) as store:
        out["after"] = snapshot(store)
    return out


# --- 5. URLs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "literal"),
    [
        ("credits%232.db", "credits#2.db"),
        ("credits%3F.db", "credits?.db"),
        ("100%25.db", "100%.db"),
        ("a+b c.db", "a+b c.db"),
        ("caf%C3%A9.db", "café.db"),
    ],
)
def test_an_sqlite_url_opens_the_literal_percent_decoded_path(tmp_path, name, literal):
    with open_store(f"sqlite:///{tmp_path}/{name}") as store:
        assert isinstance(store, SQLiteStore)
        assert store.path == f"{tmp_path}/{literal}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [literal, f"{literal}.lock"]


@pytest.mark.parametrize(
    ("query", "durability"),
    [
        ("", "full"),
        ("?durability=full", "full"),
        ("?durability=normal", "normal"),
        ("?durability=NORMAL", "normal"),
        ("?durability=norm%61l", "normal"),
    ],
)
def test_an_sqlite_url_option(tmp_path, query, durability):
    with open_store(f"sqlite:///{tmp_path}/credits.db{query}") as store:
        assert isinstance(store, SQLiteStore)
        assert store.durability == durability
        assert store.path == f"{tmp_path}/credits.db"


BAD_URLS = [
    "credits#2.db",  # a fragment: before the fix this opened "credits"
    "credits?.db",  # a query ".db": before the fix this opened "credits"
    "credits.db?normal",  # an option without a value: before the fix ignored
    "credits.db?durability=",  # empty value
    "credits.db?durability=normal&durability=full",  # repeated
    "credits.db?",  # an empty query
    "credits.db#",  # an empty fragment
    "credits.db?durability=normal#x",  # a fragment after the options
    "credits.db?durability=normal&",  # an empty option
    "credits.db?Durability=normal",  # option names are case-sensitive
    "credits.db?mode=ro",  # unknown option
    "credits.db?durability=off",  # unknown value
    "cred\nits.db",  # a raw control character (urlsplit used to drop it)
    "cred\tits.db",
    "credits%00.db",  # NUL cannot be in a path
    "credits%ff.db",  # not UTF-8
]


@pytest.mark.parametrize("tail", BAD_URLS)
def test_a_bad_sqlite_url_is_a_config_error_and_creates_nothing(tmp_path, tail):
    url = f"sqlite:///{tmp_path}/{tail}"
    with pytest.raises(ConfigError):
        open_store(url).close()
    with pytest.raises(ConfigError):
        open_async_store(url)
    assert list(tmp_path.iterdir()) == []


def test_an_sqlite_url_scheme_is_case_insensitive(tmp_path):
    with open_store(f"SQLite:///{tmp_path}/credits.db") as store:
        assert isinstance(store, SQLiteStore)


# --- 6. bounded waits for the writer lock ---------------------------------------------------


def guarded(call: Callable[[], Any], timeout: float) -> tuple[str, Any, threading.Thread]:
    """Run ``call`` on a daemon thread: ("returned", value), ("raised", error) or ("hung", None)."""
    outcome: list[tuple[str, Any]] = []

    def run() -> None:
        try:
            outcome.append(("returned", call()))
        except BaseException as exc:
            outcome.append(("raised", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    kind, value = outcome[0] if outcome else ("hung", None)
    return kind, value, thread


@contextlib.contextmanager
def stopped_holder(locker: Locker, path: Path) -> Iterator[None]:
    """The Locker takes the writer lock through a store's exclusive(), then is SIGSTOPped.

    On the way out it is continued and lets go, whatever happened inside.
    """
    assert locker.ask(f"hold {path}") == "held"
    os.kill(locker.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(locker.proc.pid, signal.SIGCONT)
        assert locker.ask("release") == "released"


def gave_up(error: object, lock_path: Path, wait: str) -> bool:
    return isinstance(error, StoreError) and str(lock_path) in str(error) and wait in str(error)


def lock_users(lock_path: Path) -> tuple[int, int]:
    """(this process's threads, its descriptors on the lock file)."""
    return threading.active_count(), len(fds_on(lock_path))


def test_a_charge_gives_up_waiting_for_a_stopped_lock_holder(tmp_path, locker):
    """Another process holds the writer lock and is stopped (SIGSTOP) inside exclusive().

    A charge with lock_wait=0.5 raises StoreError naming the lock file and the
    wait, and writes nothing; 20 more timed-out calls add no thread and no
    descriptor; once the holder goes on and lets go, no wait of ours takes the
    lock (the other process can), and the next charge works. Before the fix
    the charge hung (there was no lock_wait: run with it dropped, the guard
    reported "hung" after 10 s).
    """
    path = tmp_path / "credits.db"
    lock_path = Path(f"{path}.lock")
    with (
        SQLiteStore(path, durability="normal", lock_wait=0.5) as store,
        SQLiteStore(path, durability="normal", lock_wait=0.02) as quick,
    ):
        manager = BalanceManager(store, CONFIG)
        manager.grant("alice", 5, request_id="g1")
        quick.load("alice")
        before = snapshot(store)
        with stopped_holder(locker, path):
            kind, error, thread = guarded(
                lambda: manager.charge("alice", 1, request_id="late"), timeout=10
            )
            if kind == "raised":
                used = lock_users(lock_path)
                for number in range(20):
                    with pytest.raises(StoreError):
                        BalanceManager(quick, CONFIG).charge("bob", 1, request_id=f"q{number}")
                grown = [a - b for a, b in zip(lock_users(lock_path), used, strict=True)]
                assert snapshot(store) == before
        thread.join(10)  # hung before the fix: it goes on once the holder lets go
        assert kind == "raised", (kind, error)
        assert gave_up(error, lock_path, "0.5 s"), error
        assert grown[0] <= 1, grown  # threads
        assert grown[1] <= 1, grown  # descriptors
        assert snapshot(store) == before
        # The other process takes the lock; none of our timed-out waits kept it.
        assert locker.ask(f"probe {path}") == "took"
        assert asyncio.run(until(lambda: not flock_entries(lock_path), "no flock left", 10)) is None
        manager.charge("alice", 1, request_id="next")
        BalanceManager(quick, CONFIG).charge("bob", 1, request_id="q-next")
        assert [e.request_id for e in store.ledger("alice")] == [None, "g1", "next"]
        assert [e.request_id for e in store.ledger("bob")] == [None, "q-next"]


async def async_gives_up(path: Path, locker: Locker) -> None:
    lock_path = Path(f"{path}.lock")
    store = AsyncSQLiteStore(path, durability="normal", lock_wait=0.5)
    patient = AsyncSQLiteStore(path, durability="normal")  # the default wait, 30 s
    try:
        manager = AsyncBalanceManager(store, CONFIG)
        await manager.grant("alice", 5, request_id="g1")
        alice = await patient.load("alice")
        assert alice is not None
        with stopped_holder(locker, path):
            try:
                await asyncio.wait_for(manager.charge("alice", 1, request_id="late"), 10)
                outcome: object = "charged"
            except (StoreError, asyncio.TimeoutError) as exc:
                outcome = exc
            assert gave_up(outcome, lock_path, "0.5 s"), repr(outcome)
            # A cancelled commit stops waiting at once: the worker serves the next call.
            change = attrs.evolve(alice, balance=alice.balance - 1, version=alice.version + 2)
            task = asyncio.create_task(patient.commit(change, [], expected_version=alice.version))
            await until(lambda: (True, os.getpid()) in flock_entries(lock_path), "a wait")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 10)
            assert await asyncio.wait_for(patient.users(), 5) == ["alice"]
        assert await asyncio.to_thread(locker.ask, f"probe {path}") == "took"
        await until(lambda: not flock_entries(lock_path), "no flock left")
        await asyncio.wait_for(manager.charge("alice", 1, request_id="next"), 10)
        entries = await patient.ledger("alice")
        assert [e.request_id for e in entries] == [None, "g1", "next"]
        assert (await patient.load("alice")).balance == sum(e.amount for e in entries)
    finally:
        await store.aclose()
        await patient.aclose()


def test_an_async_charge_gives_up_waiting_for_a_stopped_lock_holder(tmp_path, locker):
    """The async store: StoreError after lock_wait, nothing written, the next call works;
    a cancelled commit waiting with the default 30 s lets the worker go on at once.

    Before the fix (no lock_wait) wait_for timed out after 10 s instead.
    """
    asyncio.run(asyncio.wait_for(async_gives_up(tmp_path / "credits.db", locker), 60))


def test_a_wait_for_a_thread_of_this_process_is_bounded_too(tmp_path):
    """One thread holds exclusive(); another thread's charge gives up (lock_wait 0.2, and
    0: no wait at all), writes nothing, and goes through once the first lets go."""
    path = tmp_path / "credits.db"
    lock_path = Path(f"{path}.lock")
    entered, leave = threading.Event(), threading.Event()
    with (
        SQLiteStore(path, durability="normal", lock_wait=0.2) as store,
        SQLiteStore(path, durability="normal", lock_wait=0) as no_wait,
    ):
        manager = BalanceManager(store, CONFIG)
        manager.grant("alice", 5)
        before = snapshot(store)

        def hold() -> None:
            with store.exclusive("alice"):
                entered.set()
                leave.wait(20)

        holder = threading.Thread(target=hold)
        holder.start()
        try:
            assert entered.wait(10)
            kind, error, thread = guarded(lambda: manager.charge("alice", 1), timeout=10)
            no_wait_kind, no_wait_error, no_wait_thread = guarded(
                lambda: BalanceManager(no_wait, CONFIG).charge("alice", 1), timeout=10
            )
        finally:
            leave.set()
            holder.join(10)
        thread.join(10)
        no_wait_thread.join(10)
        assert kind == "raised", (kind, error)
        assert gave_up(error, lock_path, "0.2 s"), error
        assert no_wait_kind == "raised", (no_wait_kind, no_wait_error)
        assert gave_up(no_wait_error, lock_path, "0 s"), no_wait_error
        assert snapshot(store) == before
        manager.charge("alice", 1)
        BalanceManager(no_wait, CONFIG).charge("alice", 1)
        assert [e.kind for e in store.ledger("alice")][-2:] == [EntryKind.CHARGE] * 2


# Huge finite waits are valid (waited in slices); these are not.
BAD_LOCK_WAITS = [-1, -0.001, float("nan"), float("inf"), float("-inf"), True, "1", None]


@pytest.mark.parametrize("lock_wait", BAD_LOCK_WAITS, ids=repr)
def test_a_bad_lock_wait_is_a_config_error_and_creates_nothing(tmp_path, lock_wait):
    for opener in (SQLiteStore, AsyncSQLiteStore):
        with pytest.raises(ConfigError, match="lock_wait"):
            opener(tmp_path / "credits.db", lock_wait=lock_wait)
    assert list(tmp_path.iterdir()) == []


def test_a_store_forked_while_a_wait_of_it_is_queued_works_in_both(tmp_path):
    """A fork while an abandoned wait of the parent is still queued on the lock, and an
    idle waiter thread exists: the child's own waits work, it keeps no descriptor of
    the parent's wait, and parent and child both write once the lock is free."""
    result = run_script("fork-wait", str(tmp_path), timeout=60)
    assert result == {"parent": [], "child": [], "hung": []}


def fork_wait_scenario(directory: str) -> dict[str, Any]:
    """Fork with an idle waiter thread and an abandoned wait still queued on the lock.

    A child that inherited the parent's wait descriptor, or believed the
    parent's idle waiter thread existed, would keep a descriptor of the
    parent's queue or wait forever for a thread that is not there.
    """
    import fcntl  # noqa: PLC0415 - POSIX only, like the tests that use it
    import select  # noqa: PLC0415

    path = Path(directory) / "credits.db"
    lock_path = Path(f"{path}.lock")
    store = SQLiteStore(path, durability="normal", lock_wait=0.2)
    patient = SQLiteStore(path, durability="normal", lock_wait=10)
    manager, patient_manager = BalanceManager(store, CONFIG), BalanceManager(patient, CONFIG)
    manager.grant("p", 1)
    patient_manager.grant("c", 1)
    errors: list[str] = []
    hung: list[str] = []
    holder = os.open(lock_path, os.O_RDWR)

    def waiting(pid: int, count: int = 1) -> bool:
        deadline = time.monotonic() + 10
        while flock_entries(lock_path).count((True, pid)) < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.002)
        return True

    # Two waits at once, served: two waiter threads, idle afterwards.
    def enter_and_leave() -> None:
        with patient.exclusive("c"):
            pass

    fcntl.flock(holder, fcntl.LOCK_EX)
    threads = [threading.Thread(target=enter_and_leave) for _ in range(2)]
    for thread in threads:
        thread.start()
    if not waiting(os.getpid(), 2):
        errors.append("the two waits were not seen")
    fcntl.flock(holder, fcntl.LOCK_UN)
    for thread in threads:
        thread.join(10)
    # A wait that gives up: one waiter thread stays queued, the other is idle.
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        manager.charge("p", 1, request_id="timed-out")
        errors.append("charged while the lock was held")
    except StoreError:
        pass
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read)
        found: list[str] = []
        try:
            inherited = len(fds_on(lock_path))
            if inherited != 1:  # only its copy of `holder`
                found.append(f"{inherited} descriptors on the lock file, expected 1")
            patient_manager.charge("c", 1, request_id="child")  # waits: the parent holds
            manager.charge("p", 1, request_id="child-p")
            store.close()
            patient.close()
        except BaseException as exc:
            found.append(repr(exc))
        os.write(write, json.dumps(found).encode())
        os._exit(0)
    os.close(write)
    if not waiting(pid):
        errors.append("the child's wait was never queued")
    fcntl.flock(holder, fcntl.LOCK_UN)
    child: list[str] = []
    if select.select([read], [], [], 30)[0]:
        child = json.loads(os.read(read, 65536) or b'["no report"]')
    else:
        hung.append("child")
        os.kill(pid, signal.SIGKILL)
    os.close(read)
    deadline = time.monotonic() + 10
    while os.waitpid(pid, os.WNOHANG) == (0, 0) and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        manager.charge("p", 1, request_id="after")
        patient_manager.charge("c", 1, request_id="after")
        ledgers = {user: [e.request_id for e in store.ledger(user)] for user in ("p", "c")}
        if ledgers != {"p": [None, None, "child-p", "after"], "c": [None, None, "child", "after"]}:
            errors.append(f"ledgers: {ledgers}")
    except Exception as exc:
        errors.append(repr(exc))
    store.close()
    patient.close()
    deadline = time.monotonic() + 10
    while len(fds_on(lock_path)) > 1 and time.monotonic() < deadline:  # `holder` itself
        time.sleep(0.01)
    if len(fds_on(lock_path)) != 1:
        errors.append(f"descriptors left on the lock file: {fds_on(lock_path)}")
    os.close(holder)
    return {"parent": errors, "child": child, "hung": hung}


# --- the script's commands -----------------------------------------------------------------


def locker_process() -> None:
    """Serve the Locker: on stdin lines, hold / release / probe a writer lock, or charge."""
    import fcntl  # noqa: PLC0415 - POSIX only, like the tests that use it

    held: Any = None

    def reply(text: str) -> None:
        print(text, flush=True)

    for line in sys.stdin:
        command, *arguments = line.split()
        if command == "ping":
            reply("pong")
        elif command == "hold":
            store = SQLiteStore(arguments[0], durability="normal")
            held = store.exclusive("x")
            held.__enter__()
            reply("held")
        elif command == "release":
            held.__exit__(None, None, None)
            store.close()
            reply("released")
        elif command == "probe":  # take the lock with a fresh descriptor, within 5 s
            fd = os.open(f"{arguments[0]}.lock", os.O_RDWR)
            deadline = time.monotonic() + 5
            took = False
            while not took and time.monotonic() < deadline:
                with contextlib.suppress(BlockingIOError):
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    took = True
                if not took:
                    time.sleep(0.01)
            os.close(fd)
            reply("took" if took else "timeout")
        elif command == "charge":
            with SQLiteStore(arguments[0], durability="normal") as other:
                BalanceManager(other, CONFIG).charge(arguments[1], 1)
            reply("charged")


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    if command == "fork":
        print(json.dumps(fork_scenario(*arguments)), flush=True)
    elif command == "locker":
        locker_process(*arguments)
    elif command == "readonly":
        print(json.dumps(readonly_scenario(*arguments)), flush=True)
    elif command == "fork-wait":
        print(json.dumps(fork_wait_scenario(*arguments)), flush=True)
    else:
        raise SystemExit(f"unknown command {command!r}")
