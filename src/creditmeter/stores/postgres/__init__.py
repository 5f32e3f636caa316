"""PostgreSQL: the store for gateways on many hosts, with a ledger SQL can audit.

Two tables (and a one-row ``meta``), laid out in ``postgres.sql`` beside this
package, which ``create_schema()`` runs: accounts keyed by user id with a
``version`` for compare-and-set, and an append-only ledger ordered by a
``bigserial``, with a unique index on (user_id, request_id). Each row keeps the
record's JSON text exactly as ``serde`` wrote it (what the store reads back)
beside typed columns for SQL: ``numeric`` amounts, ``timestamptz`` times,
token counts, and ``tx``, the id of the transaction that wrote the row.

Reports are answered in SQL (schema version 2; a version-1 database is
upgraded in place when the store is built with ``create_schema=True``):
``sum_usage`` is one ``GROUP BY`` with exact ``numeric`` sums and
``date_trunc`` in UTC; ``scan_entries`` pages every user's entries in
``(tx, seq)`` order, reading only rows below the oldest transaction still
running (``pg_snapshot_xmin``), since a ``bigserial`` is taken before its
transaction commits and a page that passed a later one would skip it for
ever. A long transaction anywhere on the server holds such scans back until
it ends; a scan of one user is not held. ``users_page`` reads the accounts'
primary key in ``COLLATE "C"`` order. PostgreSQL 13 or later.

A commit is ONE statement, so one round trip and one transaction (the
connections run in autocommit mode): a data-modifying CTE does the
compare-and-set ``UPDATE … WHERE user_id = $u AND version = $expected`` (or
``INSERT … ON CONFLICT DO NOTHING`` for a new account), inserts the ledger rows
only if that touched a row, and returns the stored account if it did not. Zero
rows is ``VersionConflict`` carrying that account (read again in a second
trip only when the winner committed while this statement waited for the row,
so its snapshot still showed the expected version); a unique violation on the
request id is ``DuplicateRequest`` carrying the entry applied first (read in a
second trip, on that rare path); serialization failures and deadlocks are
``VersionConflict`` too, so managers retry them; anything else psycopg raises
is ``StoreError``, with the driver's error as its cause. On a local server the
one statement was measured faster than the same UPDATE and INSERT as an
explicit transaction (four round trips) and than both in psycopg's pipeline
mode (one round trip, more client work).

``exclusive(user_id)`` takes a pooled connection, waits for a session-level
``pg_advisory_lock`` on a 64-bit hash of the schema, table prefix and user
id, and pins that connection to the calling thread (a context variable for
the async store) until the block ends, so the manager's load and commit
inside it run on it, each in its own transaction. Every commit statement
takes the same key as a shared transaction-level lock before it writes the
account row, so while one session holds ``exclusive`` no other writer of that
user commits, from any process or host: managers use it after a lost
compare-and-set and for users contended lately, and writers of one hot user
then take turns instead of the last winner winning again. (A shared lock
costs an uncontended commit one lock-table entry, not a round trip.) A commit
inside the block that applies also releases the session lock in its own
statement (its shared lock keeps the next holder out until it has
committed), so a hot write is three round trips: lock, load, commit.
Session locks need session pooling: behind PgBouncer, use ``pool_mode =
session``, not ``transaction``. A nested ``exclusive`` on a user the block
holds already is counted in the process, not taken again on the server.

No wait is unbounded by default. Each connection of the store's own pool
gets ``lock_timeout`` (30 s unless given; the DSN's ``options`` win), so a
commit or ``exclusive()`` behind a session that holds the user's row or key
and never lets go ends in a ``StoreError`` naming the user; a free pooled
connection is awaited ``timeout`` seconds, a new one ``connect_timeout`` (10 s
unless the DSN says). ``statement_timeout`` is the server's unless the DSN's
``options`` set it.

A store made before ``os.fork()`` follows the fork: the child drops the
connections it inherited without a word to the server (their sockets are
pointed at /dev/null before libpq says goodbye, so the parent's sessions
live on) and opens a pool of its own on first use. The async store is
cancellation-safe at every await: a cancelled call gives its connection
back, and leaves no advisory lock held and no transaction open.

Idle pooled connections are checked before use without a round trip (a
readable socket on an idle connection means the server closed it, e.g. after
a restart or ``pg_terminate_backend``) and replaced, so a store recovers from
a server restart on its own. A read that finds its connection cut anyway is
run again on another; a commit cut in flight is a ``StoreError`` (it may or
may not have applied: the caller's request id settles that).

Every value is a bound parameter; table names come from a prefix (and an
optional schema) checked against ``[a-z_][a-z0-9_]*`` and quoted with
``psycopg.sql.Identifier``.

The package keeps what does no I/O apart from the two transports:
``options`` checks what a store is given, ``sql`` builds every statement,
``failures`` turns driver errors into creditmeter's. ``_shared`` holds what
both stores do alike at run time (the fork, the idle check, the pinned
connection); ``_async`` holds ``AsyncPostgresStore``, written by hand, and
``_sync`` holds ``PostgresStore``, generated from it by ``tools/unasync.py``.
"""

from creditmeter.stores.postgres._async import AsyncPostgresStore
from creditmeter.stores.postgres._sync import PostgresStore
from creditmeter.stores.postgres.options import DEFAULT_LOCK_TIMEOUT, DEFAULT_PREFIX
from creditmeter.stores.postgres.sql import SCHEMA_VERSION, Statements, schema_sql

__all__ = [
    "DEFAULT_LOCK_TIMEOUT",
    "DEFAULT_PREFIX",
    "SCHEMA_VERSION",
    "AsyncPostgresStore",
    "PostgresStore",
    "schema_sql",
]

# A private name the benchmarks reach for here.
_Statements = Statements
