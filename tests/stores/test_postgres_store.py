"""PostgresStore and AsyncPostgresStore on a real PostgreSQL server.

Without a server these tests skip saying how to start one; with
CREDITMETER_REQUIRE_SERVICES=1 they fail instead (see services.py). Every test
works under its own table prefix (or schema) and drops its tables afterwards.

Covered here, what is PostgreSQL's own: hostile user ids; the tables, typed
columns and the shipped DDL file; bad prefixes and arguments; create_schema
run twice and concurrently; one round trip per uncontended commit; a lost
compare-and-set that reports the stored account, also when the winner commits
while the loser waits; serialization failures as conflicts; ``exclusive`` (it
excludes, pins the connection, gives it back, survives a killed connection);
server faults (a statement cut mid-commit, backends terminated mid-run, idle
connections killed, an unreachable server); corrupt data; and what the store
closes (a pool it was given stays open).

Elsewhere, on every store: the contract suite (test_contract.py), the state
machine with two stores on one prefix and the manager's behaviour, threads
and tasks (tests/manager/), processes on one prefix (manager/test_processes.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest

if os.environ.get("CREDITMETER_REQUIRE_SERVICES") != "1":
    pytest.importorskip("psycopg", reason="the [postgres] extra (psycopg) is not installed")

import psycopg
from psycopg import pq, sql
from psycopg_pool import AsyncConnectionPool, ConnectionPool
from services import POSTGRES_DSN, need, unique

from creditmeter import (
    AsyncBalanceManager,
    BalanceConfig,
    BalanceManager,
    ChargeItem,
    ConfigError,
    DuplicateRequest,
    EntryKind,
    StoreError,
    TokenUsage,
    VersionConflict,
)
from creditmeter.serde import account_to_json
from creditmeter.stores import postgres
from creditmeter.stores.postgres import (
    DEFAULT_PREFIX,
    AsyncPostgresStore,
    PostgresStore,
    schema_sql,
)
from creditmeter.testing import make_account, make_entry

SQL_FILE = Path(__file__).parents[2] / "src" / "creditmeter" / "stores" / "postgres.sql"
START = 10**9
CONFIG = BalanceConfig(enabled=True, start_balance=START)
TABLES = ("accounts", "ledger", "meta")


# --- reaching the server, and cleaning up after ourselves -----------------------


def _connect() -> None:
    psycopg.connect(POSTGRES_DSN, connect_timeout=3).close()


@pytest.fixture(autouse=True)
def _postgres_server() -> None:
    need("postgres", _connect)


def raw() -> psycopg.Connection:
    """A plain connection to the test server, for looking behind the store's back."""
    return psycopg.connect(POSTGRES_DSN, autocommit=True)


def table(prefix, name):
    return sql.Identifier(prefix + name)


def drop_tables(prefix, schema=None):
    with raw() as conn:
        if schema is not None:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
        else:
            names = sql.SQL(", ").join(table(prefix, name) for name in TABLES)
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(names))


@pytest.fixture
def prefix():
    chosen = unique("cm_") + "_"
    yield chosen
    drop_tables(chosen)


@pytest.fixture
def app_name():
    return unique("cmtest-")


@pytest.fixture
def store(prefix, app_name):
    with PostgresStore(POSTGRES_DSN, prefix=prefix, application_name=app_name) as opened:
        yield opened


def backends(app_name):
    with raw() as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (app_name,)
        ).fetchall()
    return [row[0] for row in rows]


def terminate(app_name, *, wait=True):
    """Terminate every backend of the store's connections; wait until those are gone."""
    with raw() as conn:
        killed = [
            row[0]
            for row in conn.execute(
                # In the select list, so only the rows the WHERE kept are terminated.
                "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s",
                (app_name,),
            )
        ]
    if wait:
        wait_until(lambda: not set(killed) & set(backends(app_name)))
    return len(killed)


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.005)


def waiting_on_a_lock(app_name):
    with raw() as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE application_name = %s AND wait_event_type = 'Lock'",
            (app_name,),
        ).fetchone()[0]


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


# --- user ids ----------------------------------------------------------------------

HOSTILE = [
    "a:b",
    "a",
    "b",
    "{x}",
    "a}b",
    "{",
    "}",
    "'; DROP TABLE x; --",
    '"; DROP TABLE x; --',
    "%s",
    "%(x)s",
    "$1",
    "\\",
    "users",
    "x" * 256,
    "\U0001f600" * 256,
    "é",
    "e\u0301",
    "É",
    "z",
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
        [entry] = store.ledger(user)
        assert entry.user_id == user
        assert store.find_request(user, "same") == entry
    with raw() as conn:  # and every table is still there
        for name in TABLES:
            conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table(prefix, name)))


def test_user_ids_through_the_manager(store):
    manager = BalanceManager(store, CONFIG)
    for user in HOSTILE:
        manager.charge(user, 1, request_id=user)
    for user in HOSTILE:
        assert manager.balance(user) == START - 1
        assert_consistent(store, user)
    assert manager.users() == sorted(HOSTILE)


# --- the tables ----------------------------------------------------------------------


def test_tables_have_typed_columns_and_a_unique_request_index(store, prefix):
    with raw() as conn:
        columns = dict(
            conn.execute(
                "SELECT table_name || '.' || column_name, data_type "
                "FROM information_schema.columns WHERE table_name = ANY(%s)",
                ([prefix + name for name in TABLES],),
            ).fetchall()
        )
        indexes = conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s",
            (prefix + "ledger",),
        ).fetchall()
    accounts, ledger = prefix + "accounts.", prefix + "ledger."
    assert columns[accounts + "balance"] == "numeric"
    assert columns[accounts + "version"] == "bigint"
    assert columns[accounts + "updated_at"] == "timestamp with time zone"
    assert columns[ledger + "seq"] == "bigint"
    assert columns[ledger + "amount"] == "numeric"
    assert columns[ledger + "balance_after"] == "numeric"
    assert columns[ledger + "cost"] == "numeric"
    assert columns[ledger + "at"] == "timestamp with time zone"
    definitions = dict(indexes)
    unique_index = definitions[prefix + "ledger_request"]
    assert "UNIQUE" in unique_index
    assert "(user_id, request_id)" in unique_index


def test_typed_columns_hold_what_was_committed(store, prefix):
    manager = BalanceManager(store, CONFIG)
    entry = manager.charge(
        "u",
        model="gpt-4o",
        usage=TokenUsage(input=1000, output=200),
        request_id="r-1",
        metadata={"route": "chat"},
    )
    account = store.load("u")
    with raw() as conn:
        row = conn.execute(
            sql.SQL(
                "SELECT id, user_id, kind, amount, balance_after, cost, at, request_id, model "
                "FROM {} WHERE request_id = %s"
            ).format(table(prefix, "ledger")),
            ("r-1",),
        ).fetchone()
        stored = conn.execute(
            sql.SQL("SELECT version, balance, created_at, updated_at, last_refill FROM {}").format(
                table(prefix, "accounts")
            ),
        ).fetchone()
    assert row == (
        entry.id,
        "u",
        "charge",
        entry.amount,
        entry.balance_after,
        entry.cost,
        entry.at,
        "r-1",
        "gpt-4o",
    )
    assert stored == (
        account.version,
        account.balance,
        account.created_at,
        account.updated_at,
        account.last_refill,
    )


def test_amounts_and_times_round_trip_exactly(store):
    tiny = Decimal("0.000000000000000000000000000001")
    account = make_account(balance=Decimal("999999999999999.999999999999999999999999999999"))
    entries = [
        make_entry(balance_after=account.balance, amount=tiny, cost=Decimal("1E+3")),
        make_entry(balance_after=account.balance, amount=Decimal("-0.10"), metadata={"f": 1e300}),
    ]
    store.commit(account, entries, expected_version=None)
    assert store.load("alice") == account
    loaded = store.ledger("alice")
    assert loaded == entries
    assert [str(e.amount) for e in loaded] == [str(e.amount) for e in entries]
    assert loaded[1].metadata == {"f": 1e300}


def test_the_shipped_sql_file_is_what_create_schema_runs(prefix):
    text = SQL_FILE.read_text(encoding="utf-8")
    assert "CREATE TABLE IF NOT EXISTS creditmeter_accounts" in text
    rendered = schema_sql()
    assert '"creditmeter_accounts"' in rendered
    assert "--" not in rendered
    # A migration run by hand: the file, with the prefix put in, through a plain connection.
    code = "\n".join(line for line in text.splitlines() if not line.startswith("--"))
    with raw() as conn, conn.transaction():
        for statement in code.replace("creditmeter_", prefix).split(";"):
            if statement.strip():
                conn.execute(statement)
    with PostgresStore(POSTGRES_DSN, prefix=prefix, create_schema=False) as store:
        BalanceManager(store, CONFIG).charge("u", 1)
        store.create_schema()  # on top of the hand-made tables: nothing to do
        assert_consistent(store, "u", balance=START - 1)


def test_schema_sql_runs_as_a_migration(prefix):
    with raw() as conn, conn.transaction():
        for statement in schema_sql(prefix).split(";\n"):
            if statement.strip():
                conn.execute(statement)
    with PostgresStore(POSTGRES_DSN, prefix=prefix, create_schema=False) as store:
        BalanceManager(store, CONFIG).charge("u", 1)
        assert_consistent(store, "u", balance=START - 1)


def test_schema_sql_names_the_prefix_and_schema():
    rendered = schema_sql("billing_", "money")
    assert 'CREATE SCHEMA IF NOT EXISTS "money"' in rendered
    assert '"money"."billing_ledger"' in rendered
    assert 'INDEX IF NOT EXISTS "billing_ledger_request"' in rendered
    assert "creditmeter_" not in rendered
    assert DEFAULT_PREFIX == "creditmeter_"


def test_create_schema_twice_and_concurrently(prefix):
    errors = []

    def build():
        try:
            with PostgresStore(POSTGRES_DSN, prefix=prefix) as opened:
                opened.create_schema()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with PostgresStore(POSTGRES_DSN, prefix=prefix) as store:
        BalanceManager(store, CONFIG).charge("u", 1)
        store.create_schema()
        store.create_schema()
    with PostgresStore(POSTGRES_DSN, prefix=prefix) as store:
        assert_consistent(store, "u", balance=START - 1)


def test_tables_in_a_schema_of_their_own():
    schema = unique("cm_schema_")
    try:
        with PostgresStore(POSTGRES_DSN, schema=schema) as store:
            assert store.schema == schema
            assert store.prefix == DEFAULT_PREFIX
            BalanceManager(store, CONFIG).charge("u", 1)
            assert_consistent(store, "u", balance=START - 1)
        with raw() as conn:
            found = conn.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = %s", (schema,)
            ).fetchone()[0]
        assert found == 3
    finally:
        drop_tables(DEFAULT_PREFIX, schema)


def test_missing_tables_without_create_schema_are_a_store_error(prefix):
    with PostgresStore(POSTGRES_DSN, prefix=prefix, create_schema=False) as store:
        with pytest.raises(StoreError, match="does not exist") as caught:
            store.load("u")
        assert isinstance(caught.value.__cause__, psycopg.errors.UndefinedTable)
        with pytest.raises(StoreError):
            store.commit(make_account(), [], expected_version=None)


def test_an_unknown_schema_version_is_a_store_error(store, prefix):
    with raw() as conn:
        conn.execute(sql.SQL("UPDATE {} SET value = '99'").format(table(prefix, "meta")))
    with pytest.raises(StoreError, match="schema '99'"):
        PostgresStore(POSTGRES_DSN, prefix=prefix)


@pytest.mark.parametrize(
    "bad", ["x; drop", "A-B", "", "1abc", "a" * 42, "é", "cm\n", "a b", "a.b", None, 5]
)
def test_bad_prefixes_are_config_errors(bad):
    with pytest.raises(ConfigError, match="prefix"):
        PostgresStore(POSTGRES_DSN, prefix=bad)
    with pytest.raises(ConfigError, match="prefix"):
        AsyncPostgresStore(POSTGRES_DSN, prefix=bad)
    with pytest.raises(ConfigError, match="prefix"):
        schema_sql(bad)


@pytest.mark.parametrize("bad", ["x; drop", "A", "", "pg catalog", 3])
def test_bad_schemas_are_config_errors(bad):
    with pytest.raises(ConfigError, match="schema"):
        PostgresStore(POSTGRES_DSN, schema=bad)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"dsn_or_pool": 5}, "DSN"),
        ({"dsn_or_pool": None}, "DSN"),
        ({"dsn_or_pool": "not a dsn"}, "DSN"),
        ({"min_size": 3, "max_size": 2}, "min_size"),
        ({"min_size": -1}, "min_size"),
        ({"max_size": 0, "min_size": 0}, "max_size"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": True}, "timeout"),
        ({"create_schema": "yes"}, "create_schema"),
        ({"application_name": 7}, "application_name"),
    ],
)
def test_bad_constructor_arguments_are_config_errors(arguments, message):
    arguments = {"dsn_or_pool": POSTGRES_DSN, **arguments}
    target = arguments.pop("dsn_or_pool")
    for cls in (PostgresStore, AsyncPostgresStore):
        with pytest.raises(ConfigError, match=message):
            cls(target, **arguments)


def test_connections_carry_the_application_name(prefix, app_name):
    with PostgresStore(POSTGRES_DSN, prefix=prefix, application_name=app_name) as store:
        store.users()
        assert backends(app_name)
    with PostgresStore(POSTGRES_DSN, prefix=prefix) as store:
        with store._pool.connection() as conn:
            assert conn.execute("SHOW application_name").fetchone() == ("creditmeter",)
        assert repr(store).startswith("PostgresStore('127.0.0.1/")
    with (
        PostgresStore(POSTGRES_DSN + "?application_name=mine", prefix=prefix) as store,
        store._pool.connection() as conn,
    ):
        assert conn.execute("SHOW application_name").fetchone() == ("mine",)


# --- commits -----------------------------------------------------------------------


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


def test_a_conflict_reports_the_stored_account(store):
    first = make_account(version=3)
    store.commit(first, [], expected_version=None)
    with pytest.raises(VersionConflict) as caught:
        store.commit(make_account(version=3), [], expected_version=2)
    assert caught.value.current == first
    assert caught.value.expected == 2
    with pytest.raises(VersionConflict) as caught:
        store.commit(make_account(version=1), [], expected_version=None)
    assert caught.value.current == first


def test_a_conflict_with_a_winner_committing_meanwhile_reports_the_winner(prefix, app_name):
    """The UPDATE waits for the winner's row lock: the row it read first is stale."""
    with PostgresStore(POSTGRES_DSN, prefix=prefix, application_name=app_name) as store:
        store.commit(make_account(version=1), [], expected_version=None)
        winner = make_account(version=2, balance=Decimal(7))
        outcome = []

        def lose():
            try:
                store.commit(make_account(version=2), [], expected_version=1)
            except VersionConflict as conflict:
                outcome.append(conflict)

        with raw() as conn, conn.transaction():
            # The winner's commit, by hand, held open while the loser runs.
            conn.execute(
                sql.SQL(
                    "UPDATE {} SET version = 2, balance = 7, data = %s WHERE user_id = 'alice'"
                ).format(table(prefix, "accounts")),
                (account_to_json(winner),),
            )
            loser = threading.Thread(target=lose)
            loser.start()
            wait_until(lambda: waiting_on_a_lock(app_name) == 1)
        loser.join()
    [conflict] = outcome
    assert conflict.expected == 1
    assert conflict.current == winner


def test_a_serialization_failure_is_a_version_conflict(prefix, app_name):
    options = {"autocommit": True, "application_name": app_name}
    options["options"] = "-c default_transaction_isolation=repeatable\\ read"
    with (
        ConnectionPool(POSTGRES_DSN, kwargs=options, min_size=1, open=True) as pool,
        PostgresStore(pool, prefix=prefix) as store,
    ):
        store.commit(make_account(version=1), [], expected_version=None)
        outcome = []

        def lose():
            try:
                store.commit(make_account(version=2), [], expected_version=1)
            except VersionConflict as conflict:
                outcome.append(conflict)

        with raw() as conn, conn.transaction():
            conn.execute(
                sql.SQL("UPDATE {} SET balance = 1 WHERE user_id = 'alice'").format(
                    table(prefix, "accounts")
                )
            )
            loser = threading.Thread(target=lose)
            loser.start()
            wait_until(lambda: waiting_on_a_lock(app_name) == 1)
        loser.join()
        [conflict] = outcome
        assert conflict.current is None
        assert isinstance(conflict.__cause__, psycopg.errors.SerializationFailure)


def trace_round_trips(store):
    """Trace the protocol of the store's one pooled connection; return a counter."""
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed by the counter
    conn = store._pool.getconn()
    conn.pgconn.trace(log.fileno())
    conn.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS | pq.Trace.REGRESS_MODE)
    store._pool.putconn(conn)

    def count():
        conn = store._pool.getconn()
        conn.pgconn.untrace()
        store._pool.putconn(conn)
        log.seek(0)
        lines = log.read().splitlines()
        log.close()
        return sum(1 for line in lines if line.startswith("F") and line.endswith("Sync"))

    return count


def test_an_uncontended_charge_is_one_round_trip(prefix):
    with PostgresStore(POSTGRES_DSN, prefix=prefix, min_size=1, max_size=1) as store:
        manager = BalanceManager(store, CONFIG)
        manager.charge("u", 1)  # opens the account
        count = trace_round_trips(store)
        manager.charge("u", 1, request_id="r")
        manager.charge("u", 2, model="gpt-4o", usage=TokenUsage(input=10))
        assert count() == 2
        assert_consistent(store, "u")


def test_a_lost_compare_and_set_is_retried_under_the_lock(prefix):
    with PostgresStore(POSTGRES_DSN, prefix=prefix, min_size=1, max_size=1) as store:
        manager = BalanceManager(store, CONFIG)
        manager.grant("u", 1)
        with PostgresStore(POSTGRES_DSN, prefix=prefix) as other_store:
            BalanceManager(other_store, CONFIG).charge("u", 5)
        count = trace_round_trips(store)
        manager.grant("u", 1)
        # lost; then under exclusive: lock, load, commit (which also unlocks)
        assert count() == 4
        assert_consistent(store, "u", balance=START - 3)


def test_a_charge_that_lost_its_compare_and_set_is_retried_as_one_delta(prefix):
    with PostgresStore(POSTGRES_DSN, prefix=prefix, min_size=1, max_size=1) as store:
        manager = BalanceManager(store, CONFIG)
        manager.charge("u", 1)
        with PostgresStore(POSTGRES_DSN, prefix=prefix) as other_store:
            BalanceManager(other_store, CONFIG).charge("u", 5)
        count = trace_round_trips(store)
        manager.charge("u", 1)
        # lost; then the charge applied to the balance the server holds, in one statement
        assert count() == 2
        assert_consistent(store, "u", balance=START - 7)


# --- exclusive ------------------------------------------------------------------------


def advisory_locks(app_name):
    with raw() as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_locks JOIN pg_stat_activity USING (pid) "
            "WHERE locktype = 'advisory' AND granted AND application_name = %s",
            (app_name,),
        ).fetchone()[0]


def test_exclusive_keeps_other_writers_of_the_user_out(prefix):
    with (
        PostgresStore(POSTGRES_DSN, prefix=prefix) as one,
        PostgresStore(POSTGRES_DSN, prefix=prefix, create_schema=False) as two,
    ):
        inside = threading.Event()
        leave = threading.Event()
        order = []

        def first():
            with one.exclusive("u"):
                order.append("first in")
                inside.set()
                leave.wait(10)
                order.append("first out")

        def second():
            with two.exclusive("u"):
                order.append("second in")

        threads = [threading.Thread(target=first)]
        threads[0].start()
        assert inside.wait(10)
        threads.append(threading.Thread(target=second))
        threads[1].start()
        with two.exclusive("v"):  # another user is not held up
            order.append("other user")
        time.sleep(0.2)
        assert order == ["first in", "other user"]
        leave.set()
        for thread in threads:
            thread.join()
        assert order == ["first in", "other user", "first out", "second in"]


def test_calls_inside_exclusive_run_on_the_pinned_connection_each_committed(prefix, app_name):
    with PostgresStore(POSTGRES_DSN, prefix=prefix, application_name=app_name) as store:
        store.commit(make_account(version=1), [], expected_version=None)
        with store.exclusive("alice"):
            pinned = store._local.conn
            assert advisory_locks(app_name) == 1
            account = store.load("alice")
            with store.exclusive("bob"):  # nested: a second lock on the same connection
                assert store._local.conn is pinned
                assert advisory_locks(app_name) == 2
                store.commit(make_account("bob"), [], expected_version=None)
                assert advisory_locks(app_name) == 1  # bob's commit handed bob's lock on
            assert advisory_locks(app_name) == 1
            store.commit(
                make_account(version=2, balance=Decimal(5)),
                [make_entry(balance_after=Decimal(5))],
                expected_version=account.version,
            )
            assert pinned.info.transaction_status == pq.TransactionStatus.IDLE
            # Committed already, visible to everyone while the block still runs, and the
            # lock handed on with the commit.
            with raw() as conn:
                found = conn.execute(
                    sql.SQL("SELECT version FROM {} WHERE user_id = 'alice'").format(
                        table(prefix, "accounts")
                    )
                ).fetchone()
            assert found == (2,)
            assert advisory_locks(app_name) == 0
            assert store.load("alice").version == 2  # still on the pinned connection
        assert getattr(store._local, "conn", None) is None
        assert advisory_locks(app_name) == 0


def test_a_commit_that_does_not_apply_keeps_the_lock_until_the_block_ends(store, app_name):
    first = make_entry(balance_after=Decimal(100), request_id="same")
    store.commit(make_account(), [first], expected_version=None)
    with store.exclusive("alice"):
        with pytest.raises(VersionConflict):
            store.commit(make_account(version=5), [], expected_version=4)
        assert advisory_locks(app_name) == 1
        with pytest.raises(DuplicateRequest):
            store.commit(
                make_account(version=2),
                [make_entry(balance_after=Decimal(1), request_id="same")],
                expected_version=1,
            )
        assert advisory_locks(app_name) == 1
        with store.exclusive("alice"):  # the same user, nested: held twice
            store.commit(make_account(version=2), [], expected_version=1)
            assert advisory_locks(app_name) == 1  # not handed on while held twice
        assert advisory_locks(app_name) == 1
    assert advisory_locks(app_name) == 0
    assert store.load("alice").version == 2


def test_exclusive_lets_go_when_the_block_raises(store, app_name):
    with pytest.raises(RuntimeError), store.exclusive("u"):
        raise RuntimeError
    assert advisory_locks(app_name) == 0
    with store.exclusive("u"):
        assert store.load("u") is None


def test_a_connection_killed_inside_exclusive_is_a_store_error_and_frees_the_lock(store, app_name):
    manager = BalanceManager(store, CONFIG)
    manager.charge("u", 1)

    def load_after_the_cut():
        with store.exclusive("u"):
            terminate(app_name)
            assert store.load("u") is not None  # read as the lock was taken: no round trip
            store.load("u")

    with pytest.raises(StoreError) as caught:
        load_after_the_cut()
    assert isinstance(caught.value.__cause__, psycopg.OperationalError)
    assert advisory_locks(app_name) == 0
    with store.exclusive("u"):
        manager.charge("u", 1)
    assert_consistent(store, "u", balance=START - 2)


def test_async_exclusive_keeps_other_tasks_out_and_pins_per_task(prefix, app_name):
    async def main():
        one = await AsyncPostgresStore.open(POSTGRES_DSN, prefix=prefix, application_name=app_name)
        two = await AsyncPostgresStore.open(POSTGRES_DSN, prefix=prefix, create_schema=False)
        order = []
        inside = asyncio.Event()
        leave = asyncio.Event()
        try:

            async def first():
                async with one.exclusive("u"):
                    order.append("first in")
                    assert one._pinned.get() is not None
                    assert await one.load("u") is None
                    inside.set()
                    await leave.wait()
                    order.append("first out")
                assert one._pinned.get() is None

            async def second():
                async with two.exclusive("u"):
                    order.append("second in")

            async def elsewhere():
                # Another task of the same store is not pinned to the first task's connection.
                assert one._pinned.get() is None
                return await one.users()

            task = asyncio.create_task(first())
            await inside.wait()
            blocked = asyncio.create_task(second())
            assert await elsewhere() == []
            await asyncio.sleep(0.2)
            assert order == ["first in"]
            assert advisory_locks(app_name) == 1
            leave.set()
            await asyncio.gather(task, blocked)
            assert order == ["first in", "first out", "second in"]
            assert advisory_locks(app_name) == 0

            async def wait_in_vain():
                async with two.exclusive("u"):
                    raise AssertionError("the lock was held")  # pragma: no cover

            async with one.exclusive("u"):
                waiter = asyncio.create_task(wait_in_vain())
                await asyncio.sleep(0.05)
                waiter.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await waiter
            assert advisory_locks(app_name) == 0
            async with two.exclusive("u"):  # the cancelled waiter left nothing behind
                assert await two.load("u") is None
        finally:
            await one.aclose()
            await two.aclose()

    asyncio.run(main())


# --- server faults -------------------------------------------------------------------


def test_a_statement_cut_mid_commit_is_a_store_error_and_writes_nothing(store, prefix, app_name):
    manager = BalanceManager(store, CONFIG)
    manager.charge("u", 1)
    outcome = []

    def charge():
        try:
            manager.charge("u", 5, request_id="cut")
        except StoreError as exc:
            outcome.append(exc)

    with raw() as conn, conn.transaction():
        # Hold the account's row so the charge's statement is in flight when its backend dies.
        conn.execute(
            sql.SQL("SELECT 1 FROM {} WHERE user_id = 'u' FOR UPDATE").format(
                table(prefix, "accounts")
            )
        )
        charging = threading.Thread(target=charge)
        charging.start()
        wait_until(lambda: waiting_on_a_lock(app_name) == 1)
        terminate(app_name)
        charging.join()
    [error] = outcome
    assert isinstance(error.__cause__, psycopg.OperationalError)
    assert "commit" in str(error)
    assert store.find_request("u", "cut") is None
    assert_consistent(store, "u", balance=START - 1)
    # The pool reconnects; the same request applies once.
    entry = manager.charge("u", 5, request_id="cut")
    assert manager.charge("u", 5, request_id="cut") == entry
    assert_consistent(store, "u", balance=START - 6)


def test_backends_terminated_mid_run(store, app_name):
    manager = BalanceManager(store, CONFIG)
    manager.account("u")
    acknowledged = []
    failed = []
    stop = threading.Event()

    def charge_until_stopped():
        number = 0
        while not stop.is_set() or number < 50:
            request_id = f"r{number}"
            try:
                manager.charge("u", 1, request_id=request_id)
            except StoreError as exc:
                failed.append((request_id, exc))
            else:
                acknowledged.append(request_id)
            number += 1

    charging = threading.Thread(target=charge_until_stopped)
    charging.start()
    try:
        for _ in range(10):
            time.sleep(0.03)
            terminate(app_name)
    finally:
        stop.set()
        charging.join()
    for _, exc in failed:
        assert isinstance(exc.__cause__, psycopg.Error), exc
    done = len(acknowledged) + len(failed)
    # No partial write: whatever landed chains and sums to the balance.
    entries = assert_consistent(store, "u")
    landed = {e.request_id for e in entries if e.request_id}
    assert set(acknowledged) <= landed
    # The manager works again, and retrying each failed request applies it exactly once.
    for request_id, _ in failed:
        manager.charge("u", 1, request_id=request_id)
    entries = assert_consistent(store, "u", balance=START - done)
    assert [e.kind for e in entries].count(EntryKind.CHARGE) == done
    print(f"\n{done} charges, {len(failed)} cut by terminated backends, all applied once")


def test_idle_connections_killed_by_the_server_are_replaced(prefix, app_name):
    with PostgresStore(
        POSTGRES_DSN, prefix=prefix, application_name=app_name, min_size=3, max_size=3
    ) as store:
        manager = BalanceManager(store, CONFIG)
        manager.charge("u", 1)
        wait_until(lambda: len(backends(app_name)) == 3)
        assert terminate(app_name) == 3
        manager.charge("u", 1)  # the dead connections are noticed, not used
        with store.exclusive("u"):
            manager.charge("u", 1)
        assert_consistent(store, "u", balance=START - 3)


def test_a_connection_dropped_after_the_idle_check_is_retried_by_reads_only(
    store, app_name, monkeypatch
):
    """The server's goodbye can arrive after the idle check: reads and the lock try again."""
    manager = BalanceManager(store, CONFIG)
    manager.charge("u", 1)
    monkeypatch.setattr(postgres._shared, "stale", lambda conn: False)
    terminate(app_name)
    assert store.load("u").balance == START - 1  # on a second connection
    terminate(app_name)
    with store.exclusive("u"):  # likewise
        assert store.ledger("u", limit=1)[0].amount == -1
    terminate(app_name)
    with pytest.raises(StoreError, match="commit") as caught:
        manager.charge("u", 1)  # a write is never repeated: it may have applied
    assert isinstance(caught.value.__cause__, psycopg.OperationalError)
    monkeypatch.undo()  # the idle check finds the connections left dead
    manager.charge("u", 1)
    assert_consistent(store, "u", balance=START - 2)


def test_async_idle_connections_killed_by_the_server_are_replaced(prefix, app_name):
    async def main():
        store = await AsyncPostgresStore.open(
            POSTGRES_DSN, prefix=prefix, application_name=app_name, min_size=2, max_size=2
        )
        async with store, AsyncBalanceManager(store, CONFIG) as manager:
            await manager.charge("u", 1)
            terminate(app_name)
            await manager.charge("u", 1)
            async with store.exclusive("u"):
                await manager.charge("u", 1)
            assert await manager.balance("u") == START - 3

    asyncio.run(main())


def test_an_async_statement_cut_mid_commit_is_a_store_error(prefix, app_name):
    async def main():
        store = await AsyncPostgresStore.open(
            POSTGRES_DSN, prefix=prefix, application_name=app_name
        )
        async with store, AsyncBalanceManager(store, CONFIG) as manager:
            await manager.charge("u", 1)
            with raw() as conn, conn.transaction():
                conn.execute(
                    sql.SQL("SELECT 1 FROM {} WHERE user_id = 'u' FOR UPDATE").format(
                        table(prefix, "accounts")
                    )
                )
                charging = asyncio.create_task(manager.charge("u", 5, request_id="cut"))
                await asyncio.to_thread(wait_until, lambda: waiting_on_a_lock(app_name) == 1)
                terminate(app_name)
                with pytest.raises(StoreError) as caught:
                    await charging
            assert isinstance(caught.value.__cause__, psycopg.OperationalError)
            assert await store.find_request("u", "cut") is None
            await manager.charge("u", 5, request_id="cut")
            entries = await store.ledger("u")
            assert sum(e.amount for e in entries) == await manager.balance("u") == START - 6

    asyncio.run(main())


def test_an_unreachable_server_is_a_store_error_with_the_cause(prefix):
    dsn = "postgresql://postgres@127.0.0.1:1/test"
    with pytest.raises(StoreError, match="create_schema") as caught:
        PostgresStore(dsn, prefix=prefix)
    assert isinstance(caught.value.__cause__, psycopg.OperationalError)

    async def main():
        with pytest.raises(StoreError) as caught:
            await AsyncPostgresStore.open(dsn, prefix=prefix)
        assert isinstance(caught.value.__cause__, psycopg.OperationalError)
        lazy = AsyncPostgresStore(dsn, prefix=prefix)
        with pytest.raises(StoreError):
            await lazy.load("u")
        await lazy.aclose()

    asyncio.run(main())


def test_corrupt_stored_data_is_a_store_error(store, prefix):
    BalanceManager(store, CONFIG).charge("u", 1, request_id="r")
    with raw() as conn:
        conn.execute(sql.SQL("UPDATE {} SET data = 'not json'").format(table(prefix, "accounts")))
        conn.execute(sql.SQL("UPDATE {} SET data = '[]'").format(table(prefix, "ledger")))
    with pytest.raises(StoreError, match="of user 'u' is corrupt"):
        store.load("u")
    with pytest.raises(StoreError, match="of user 'u' is corrupt"):
        store.ledger("u")
    with pytest.raises(StoreError, match="of user 'u' is corrupt"):
        store.find_request("u", "r")


# --- what the store owns ---------------------------------------------------------------


def test_a_store_built_from_a_dsn_closes_its_pool(prefix, app_name):
    store = PostgresStore(POSTGRES_DSN, prefix=prefix, application_name=app_name)
    BalanceManager(store, CONFIG).charge("u", 1)
    assert backends(app_name)
    store.close()
    store.close()  # twice is fine
    assert store._pool.closed
    wait_until(lambda: not backends(app_name))
    with pytest.raises(StoreError, match="closed"):
        store.load("u")
    with pytest.raises(StoreError, match="closed"), store.exclusive("u"):
        pass


@pytest.mark.parametrize("autocommit", [True, False])
def test_a_store_built_on_a_pool_leaves_it_open(prefix, autocommit):
    with ConnectionPool(
        POSTGRES_DSN, kwargs={"autocommit": autocommit}, min_size=1, max_size=2, open=True
    ) as pool:
        with PostgresStore(pool, prefix=prefix) as store:
            manager = BalanceManager(store, CONFIG)
            manager.charge("u", 1, request_id="r")
            with store.exclusive("u"):
                manager.charge("u", 1)
            assert repr(store).startswith("PostgresStore(pool, ")
        assert not pool.closed
        with pool.connection() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        with PostgresStore(pool, prefix=prefix, create_schema=False) as store:
            assert_consistent(store, "u", balance=START - 2)


@pytest.mark.parametrize("autocommit", [True, False])
def test_an_async_store_built_on_a_pool_leaves_it_open(prefix, autocommit):
    async def main():
        async with AsyncConnectionPool(
            POSTGRES_DSN, kwargs={"autocommit": autocommit}, min_size=1, open=False
        ) as pool:
            async with AsyncPostgresStore(pool, prefix=prefix) as store:
                manager = AsyncBalanceManager(store, CONFIG)
                await manager.charge("u", 1, request_id="r")
                async with store.exclusive("u"):
                    await manager.charge("u", 1)
                assert await manager.balance("u") == START - 2
            assert not pool.closed
            async with pool.connection() as conn:
                cursor = await conn.execute("SELECT 1")
                assert await cursor.fetchone() == (1,)

    asyncio.run(main())


def test_an_async_store_opens_lazily_and_closes(prefix, app_name):
    async def main():
        store = AsyncPostgresStore(POSTGRES_DSN, prefix=prefix, application_name=app_name)
        assert not backends(app_name)  # nothing opened outside a running loop
        assert await store.users() == []
        await store.create_schema()
        assert repr(store).startswith("AsyncPostgresStore('127.0.0.1/")
        await store.aclose()
        await store.aclose()
        with pytest.raises(StoreError, match="closed"):
            await store.load("u")

    asyncio.run(main())
    wait_until(lambda: not backends(app_name))


@pytest.mark.parametrize("pinned", [False, True], ids=["pooled", "pinned"])
@pytest.mark.parametrize("good_batches", range(8))
def test_a_batch_that_fails_in_its_pipeline_leaves_the_connection_fit_to_use(
    prefix, app_name, good_batches, pinned
):
    """A batch whose pipeline fails (a lock timeout), then more batches, on one connection.

    psycopg prepares a statement on its fifth use. When a failing statement
    made the server skip the rest of the pipeline, a ``COMMIT`` psycopg was
    preparing there kept its name, never prepared, and every later batch on
    that connection failed with "prepared statement does not exist" (seen
    first under load in the cancelled-batch test). Tried after 0 to 7 good
    batches, so that one run puts the fifth ``COMMIT`` in the failing pipeline.
    A pooled connection is closed after such a failure; one pinned inside
    ``exclusive()`` (of another user, kept for the whole test) is reset.
    """
    with (
        PostgresStore(
            POSTGRES_DSN,
            prefix=prefix,
            application_name=app_name,
            min_size=1,
            max_size=1,
            lock_timeout=0.2,
        ) as store,
        PostgresStore(POSTGRES_DSN, prefix=prefix) as other,
    ):
        meter = BalanceManager(store, CONFIG)
        meter.account("a")
        meter.account("u")

        def batch(tag: str) -> list[bool]:
            items = [ChargeItem(user, 1, request_id=f"{tag}-{user}") for user in ("a", "u")]
            return [result.ok for result in meter.charge_many(items)]

        def blocked(tag: str) -> None:
            # The statement for "u" waits for other's lock, then times out: nothing applies.
            with other.exclusive("u"), pytest.raises(StoreError):
                batch(tag)

        with store.exclusive("z") if pinned else contextlib.nullcontext():
            # psycopg forgets its names when it first meets a ROLLBACK (and then only
            # when rollback() is called): the first failure starts the count afresh.
            blocked("first")
            for n in range(good_batches):
                assert batch(f"good-{n}") == [True, True]
            blocked("second")
            for n in range(3):
                assert batch(f"after-{n}") == [True, True]
        assert meter.balance("a") == meter.balance("u") == START - good_batches - 3
