"""Fault injection: the store fails at its k-th call, for k = 1..30.

A fixed sequence of operations (grant that opens an account, charge, hold,
settle, set_balance, a due refill under a FakeClock, a charge that opens a
second account, hold and release) runs on a ``FaultySQLiteStore``: the real
``SQLiteStore`` whose connections are wrapped so that the k-th ``execute``
(counted over every statement of the sequence, reads included: SELECT,
BEGIN IMMEDIATE, INSERT, UPDATE, COMMIT) raises
``sqlite3.OperationalError("disk I/O error")``. Two kinds of fault:

``refused``
    the statement does not run and the transaction stays as it was (as
    after ``SQLITE_BUSY``, or any error the store must clean up after);
``rolled-back``
    SQLite rolled the whole transaction back, then raised (as after
    ``SQLITE_IOERR`` or ``SQLITE_FULL``).

For every k: the operation that meets the fault raises ``StoreError``; the
stored state (every account and every ledger, read through a fresh
``SQLiteStore`` on the same file) equals the state before that operation;
the operation, sent again, succeeds, and so does the rest of the sequence,
whose final state equals that of a run without faults. No operation may
swallow a fault.

The writer lock (an ``flock`` of a lock file beside the database) is the
other I/O on the write path; an ``OSError`` from it is tried too.

MemoryStore has no I/O that can fail: its test is skipped on purpose. The
Redis and PostgreSQL stores join with an injector in ``FAULT_INJECTORS`` (a
dropped connection at the k-th command). ``CREDITMETER_LONG`` changes nothing
here: the sweep is the same either way.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import attrs
import pytest

from creditmeter import BalanceConfig, BalanceManager, EntryKind, SQLiteStore, StoreError
from creditmeter.rules import HOLD_PREFIX
from creditmeter.stores import sqlite as sqlite_module
from creditmeter.testing import FakeClock

T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
CONFIG = BalanceConfig(
    enabled=True,
    start_balance=1000,
    auto_refill_enabled=True,
    refill_interval_value=1,
    refill_interval_unit="hours",
    refill_amount=250,
    refill_mode="on_interval",
)
KS = range(1, 31)
MODES = ("refused", "rolled-back")


class FaultPlan:
    """Which call fails, and how; counts and names every statement while armed."""

    def __init__(self) -> None:
        self.armed = False
        self.fail_at = 0
        self.mode = "refused"
        self.calls = 0
        self.trace: list[str] = []
        self.fired = 0  # faults raised so far

    def arm(self, fail_at: int, mode: str) -> None:
        self.armed, self.fail_at, self.mode = True, fail_at, mode

    def before(self, real: sqlite3.Connection, sql: str) -> None:
        if not self.armed:
            return
        self.calls += 1
        self.trace.append(sql.split(None, 1)[0].upper())
        if self.calls != self.fail_at:
            return
        self.fired += 1
        if self.mode == "rolled-back" and real.in_transaction:
            real.execute("ROLLBACK")  # what SQLite itself does on an I/O error
        raise sqlite3.OperationalError("disk I/O error")


class FaultyConnection:
    """An ``sqlite3.Connection`` whose ``execute`` may fail first; everything else passes."""

    __slots__ = ("_plan", "_real")

    def __init__(self, real: sqlite3.Connection, plan: FaultPlan) -> None:
        self._real = real
        self._plan = plan

    def execute(self, sql: str, parameters: Any = ()) -> sqlite3.Cursor:
        self._plan.before(self._real, sql)
        return self._real.execute(sql, parameters)

    @property
    def in_transaction(self) -> bool:
        return self._real.in_transaction

    def close(self) -> None:
        self._real.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class FaultySQLiteStore(SQLiteStore):
    """The real SQLiteStore, but each thread's connection goes through a ``FaultPlan``."""

    def __init__(self, path: Path, plan: FaultPlan, **options: Any) -> None:
        self.plan = plan  # before __init__: it connects
        super().__init__(path, **options)

    def _connect(self) -> Any:
        handle = super()._connect()
        handle.conn = FaultyConnection(handle.conn, self.plan)
        return handle


@contextlib.contextmanager
def faulty_sqlite(where: Path, plan: FaultPlan) -> Iterator[tuple[BalanceManager, Callable]]:
    """A manager over a faulty store, and a reader of what the file holds (a fresh store)."""
    path = where / "credits.db"

    def stored() -> Any:
        # A short busy timeout: a store that left a transaction open shows as "locked".
        with SQLiteStore(path, busy_timeout=0.5) as fresh:
            return normalized(fresh)

    with FaultySQLiteStore(path, plan, busy_timeout=0.5) as store:
        yield BalanceManager(store, CONFIG, clock=FakeClock(T0)), stored


# kind -> context manager(location, plan) giving (manager, read the stored state)
FAULT_INJECTORS: dict[str, Callable[[Path, FaultPlan], Any]] = {"sqlite": faulty_sqlite}


def normalized(store: Any) -> Any:
    """Every account and ledger, with the random ids (entries, holds) masked."""

    def mask(request_id: str | None) -> str | None:
        if request_id is not None and request_id.startswith(HOLD_PREFIX):
            return HOLD_PREFIX + "*"
        return request_id

    users = store.users()
    accounts = {}
    ledgers = {}
    for user in users:
        account = store.load(user)
        accounts[user] = attrs.evolve(
            account, holds=tuple(attrs.evolve(h, id="*") for h in account.holds)
        )
        ledgers[user] = [
            attrs.evolve(e, id="*", request_id=mask(e.request_id)) for e in store.ledger(user)
        ]
    return users, accounts, ledgers


def _refill(manager: BalanceManager, held: list[Any]) -> None:
    manager.clock.set(T0 + timedelta(hours=2))  # the refill is due (setting twice is harmless)
    entry = manager.maybe_refill("alice")
    assert entry is not None
    assert entry.kind is EntryKind.REFILL


OPERATIONS: list[tuple[str, Callable[[BalanceManager, list[Any]], Any]]] = [
    ("grant (opens alice)", lambda m, held: m.grant("alice", 100, request_id="grant-1")),
    ("charge", lambda m, held: m.charge("alice", Decimal("12.5"), request_id="charge-1")),
    ("hold", lambda m, held: held.append(m.hold("alice", 40))),
    ("settle", lambda m, held: m.settle(held[-1], 25)),
    ("set_balance", lambda m, held: m.set_balance("alice", 500, request_id="set-1")),
    ("refill (due)", _refill),
    ("charge (opens bob)", lambda m, held: m.charge("bob", 5, request_id="charge-2")),
    ("hold bob", lambda m, held: held.append(m.hold("bob", 3))),
    ("release", lambda m, held: m.release(held[-1])),
]

# The statements the sequence issues, in order (checked by the first test below).
TRACE = [
    *["SELECT", "BEGIN", "INSERT", "INSERT", "INSERT", "COMMIT"],  # grant, opening alice
    *["BEGIN", "UPDATE", "INSERT", "COMMIT"],  # charge
    *["BEGIN", "UPDATE", "COMMIT"],  # hold (no entry)
    *["BEGIN", "UPDATE", "INSERT", "COMMIT"],  # settle
    *["BEGIN", "UPDATE", "INSERT", "COMMIT"],  # set_balance
    *["SELECT", "BEGIN", "UPDATE", "INSERT", "COMMIT"],  # refill: read fresh, then write
    *["SELECT", "BEGIN", "INSERT", "INSERT", "INSERT", "COMMIT"],  # charge, opening bob
    *["BEGIN", "UPDATE", "COMMIT"],  # hold bob
    *["BEGIN", "UPDATE", "INSERT", "COMMIT"],  # release
]


def run_sequence(manager: BalanceManager, stored: Callable[[], Any], plan: FaultPlan) -> str:
    """Run every operation; check the one that meets the fault; return its name."""
    failed = ""
    held: list[Any] = []
    for name, operation in OPERATIONS:
        before = stored()
        fired = plan.fired
        error: StoreError | None = None
        try:
            operation(manager, held)
        except StoreError as caught:
            error = caught
        if error is None:
            assert plan.fired == fired, f"{name}: the fault was swallowed"
            continue
        assert plan.fired == fired + 1, f"{name}: a StoreError without the fault: {error}"
        assert not failed, "a second operation failed"
        failed = name
        assert "disk I/O error" in str(error)
        assert stored() == before, f"{name}: the failed operation wrote something"
        operation(manager, held)  # the next call, the same operation again, succeeds
    return failed


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The final state of the sequence run without faults."""
    plan = FaultPlan()
    with faulty_sqlite(tmp_path_factory.mktemp("reference"), plan) as (manager, stored):
        plan.arm(0, "refused")  # count, never fail
        assert run_sequence(manager, stored, plan) == ""
        return stored(), list(plan.trace)


def test_the_sequence_issues_the_statements_expected(reference: Any) -> None:
    """TRACE marks which k is a COMMIT; if the store's statements change, update it."""
    _, trace = reference
    assert trace == TRACE
    assert len(trace) >= max(KS)


def sweep() -> list[Any]:
    return [pytest.param(mode, k, id=f"{mode}-k{k}-{TRACE[k - 1]}") for mode in MODES for k in KS]


@pytest.mark.parametrize("kind", list(FAULT_INJECTORS))
@pytest.mark.parametrize(("mode", "k"), sweep())
def test_fault_at_kth_call(
    tmp_path: Path, reference: Any, worker: Any, kind: str, mode: str, k: int
) -> None:
    plan = FaultPlan()
    with FAULT_INJECTORS[kind](tmp_path, plan) as (manager, stored):
        plan.arm(k, mode)
        failed = run_sequence(manager, stored, plan)
        assert failed, f"the sequence never made call {k}"
        assert plan.fired == 1
        final = stored()
    expected, _ = reference
    assert final == expected  # as if the fault had never happened
    with SQLiteStore(tmp_path / "credits.db") as store:
        worker.check_invariants(store, now=T0 + timedelta(hours=2))


def test_fault_injection_figures(report: Any) -> None:
    """What the sweep above injects, for benchmarks/RELIABILITY.md."""
    injected = len(MODES) * len(KS) * len(FAULT_INJECTORS)
    commits = sum(1 for k in KS for _ in MODES if TRACE[k - 1] == "COMMIT")
    report(
        "faults",
        stores=list(FAULT_INJECTORS),
        modes=list(MODES),
        operations=len(OPERATIONS),
        statements=len(TRACE),
        faults_injected=injected,
        faults_on_commit=commits,
    )


def test_a_failed_commit_statement_leaves_no_transaction_open(tmp_path: Path) -> None:
    """The COMMIT of a charge fails once: other writers and the next write must go on.

    Regression (fixed in d4b706d): commit() issued ROLLBACK only when _apply()
    failed. When the COMMIT statement itself raised (SQLITE_BUSY, or any error
    after which SQLite keeps the transaction), the transaction stayed open on the
    thread's connection, which kept SQLite's RESERVED lock: every other connection
    and process waited busy_timeout (30 s by default) and failed with "database is
    locked" (even opening a new SQLiteStore on the file did), and every later
    write on that thread failed with "cannot start a transaction within a
    transaction" until the store was closed.
    """
    plan = FaultPlan()
    with faulty_sqlite(tmp_path, plan) as (manager, _):
        manager.grant("alice", 100)
        plan.arm(4, "refused")  # BEGIN, UPDATE, INSERT, COMMIT: the COMMIT fails
        with pytest.raises(StoreError):
            manager.charge("alice", 1)
        try:
            # another writer of the file gets in within its busy timeout
            with SQLiteStore(tmp_path / "credits.db", busy_timeout=0.5) as other:
                BalanceManager(other, CONFIG, clock=FakeClock(T0)).charge("bob", 1)
        finally:
            manager.charge("alice", 1)  # and this thread writes again


@pytest.mark.skip(reason="MemoryStore does no I/O: there is no call that can fail")
def test_memory_store_faults() -> None:
    """Kept so the report lists MemoryStore as considered, and skipped on purpose."""


# --- the writer lock ---------------------------------------------------------------------


class FailingFlock:
    """Stands in for the fcntl module: taking the lock fails with ENOLCK while armed."""

    LOCK_EX = fcntl.LOCK_EX
    LOCK_UN = fcntl.LOCK_UN
    armed = False

    @classmethod
    def flock(cls, fd: int, operation: int) -> None:
        if cls.armed and operation == fcntl.LOCK_EX:
            raise OSError(errno.ENOLCK, "No locks available")
        fcntl.flock(fd, operation)


def test_writer_lock_failure_is_a_store_error(tmp_path: Path, monkeypatch: Any) -> None:
    """fcntl.flock() failing (ENOLCK, as on some network file systems) is a StoreError.

    Regression (fixed in d4b706d): _Handle.acquire() runs before the try of
    commit(), exclusive() and _writing(), and the OSError escaped raw. Nothing is
    written and the next write succeeds.
    """
    with SQLiteStore(tmp_path / "credits.db") as store:
        manager = BalanceManager(store, CONFIG, clock=FakeClock(T0))
        manager.grant("alice", 1)
        monkeypatch.setattr(sqlite_module, "fcntl", FailingFlock)
        FailingFlock.armed = True
        before = normalized(store)
        try:
            with pytest.raises(StoreError):
                manager.charge("alice", 1)
        finally:
            FailingFlock.armed = False
        assert normalized(store) == before
        manager.charge("alice", 1)


def test_lock_file_that_cannot_be_opened_is_a_store_error(tmp_path: Path, monkeypatch: Any) -> None:
    """A new thread that cannot open the .lock file (EMFILE) gets a StoreError.

    Regression (fixed in d4b706d): _connect() opened the sqlite3 connection, then
    os.open()ed the lock file outside any try: the OSError escaped raw and the
    connection just opened was leaked (neither closed nor listed for close()).
    """
    real_open = sqlite_module.os.open

    def no_more_files(path: Any, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith(".lock"):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, *args, **kwargs)

    real_connect = sqlite3.connect
    connections: list[sqlite3.Connection] = []

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        connections.append(real_connect(*args, **kwargs))
        return connections[-1]

    monkeypatch.setattr(sqlite_module.sqlite3, "connect", connect)
    with SQLiteStore(tmp_path / "credits.db") as store:
        manager = BalanceManager(store, CONFIG, clock=FakeClock(T0))
        manager.grant("alice", 1)
        errors: list[BaseException] = []

        def in_a_new_thread() -> None:  # a new thread opens its own connection
            try:
                manager.charge("alice", 1)
            except BaseException as exc:
                errors.append(exc)

        monkeypatch.setattr(sqlite_module.os, "open", no_more_files)
        thread = threading.Thread(target=in_a_new_thread)
        thread.start()
        thread.join()
        monkeypatch.undo()
    for connection in connections:  # the one the failed thread leaked, too
        connection.close()
    assert len(errors) == 1
    assert isinstance(errors[0], StoreError), repr(errors[0])
