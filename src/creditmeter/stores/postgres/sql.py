"""The PostgreSQL store's SQL: the DDL of ``postgres.sql``, and every statement it runs.

Nothing here talks to a server. Table names come from a checked prefix (and
an optional schema) and are quoted with ``psycopg.sql.Identifier``; every
value is a bound parameter.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Sequence
from decimal import Decimal
from importlib import resources
from typing import Any

from psycopg import sql

from creditmeter.exceptions import InvalidInput
from creditmeter.models import Account, LedgerEntry
from creditmeter.queries import EntryQuery, UsageQuery
from creditmeter.serde import account_split, account_to_json, entry_split, entry_to_json
from creditmeter.stores.postgres.options import DEFAULT_PREFIX, check_names

__all__ = [
    "BOUND_LOCKS",
    "LOCK",
    "MAX_BIGINT",
    "SCHEMA_VERSION",
    "UNLOCK",
    "UPGRADES_FROM",
    "Statements",
    "commit_params",
    "delta_params",
    "request_ids",
    "scan_params",
    "schema_sql",
    "sum_params",
]

SCHEMA_VERSION = "2"
"""The layout ``postgres.sql`` creates, as recorded in the ``meta`` table."""
UPGRADES_FROM = ("1",)
"""The older layouts ``postgres.sql`` upgrades in place to ``SCHEMA_VERSION``."""

_TABLES = ("meta", "accounts", "ledger")
_NAME_IN_FILE = re.compile(r"\bcreditmeter_([a-z_]+)\b")
_KEYS_KEPT = 10_000
MAX_BIGINT = 2**63 - 1
"""The largest ``bigint``: a ``LIMIT`` beyond it is this."""

LOCK = b"SELECT pg_advisory_lock(%s)"
"""Take a session-level advisory lock (the key of ``Statements.lock_key``)."""
UNLOCK = b"SELECT pg_advisory_unlock(%s)"
"""Let go of a session-level advisory lock."""
BOUND_LOCKS = (
    b"SELECT set_config('lock_timeout', %s, false) FROM pg_settings "
    b"WHERE name = 'lock_timeout' AND source <> 'client'"
)
"""Run on each new connection of a store's own pool: bound its lock waits.

Unless the connection string's options (or ``PGOPTIONS``) set ``lock_timeout``,
which then stands.
"""


# --- the DDL ------------------------------------------------------------------


@functools.cache
def _ddl_file() -> str:
    """``postgres.sql``, which sits beside the package, in ``creditmeter.stores``."""
    file = resources.files("creditmeter.stores").joinpath("postgres.sql")
    return file.read_text(encoding="utf-8")


def _names(prefix: str, schema: str | None) -> dict[str, sql.Identifier]:
    """Every name ``postgres.sql`` uses, for this prefix: tables qualified, indexes not."""
    names: dict[str, sql.Identifier] = {}
    for found in _NAME_IN_FILE.findall(_ddl_file()):
        name = prefix + found
        if schema is not None and found in _TABLES:
            names[found] = sql.Identifier(schema, name)
        else:
            names[found] = sql.Identifier(name)
    return names


def _ddl(prefix: str, schema: str | None) -> list[sql.Composed]:
    """The statements of ``postgres.sql`` with this prefix's names, comments dropped."""
    text = re.sub(r"--[^\n]*", "", _ddl_file()).replace("{", "{{").replace("}", "}}")
    template = _NAME_IN_FILE.sub(lambda found: "{" + found[1] + "}", text)
    names = _names(prefix, schema)
    statements = [
        sql.SQL(statement.strip()).format(**names)
        for statement in template.split(";")
        if statement.strip()
    ]
    if schema is not None:
        statements.insert(
            0, sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema))
        )
    return statements


def schema_sql(prefix: str = DEFAULT_PREFIX, schema: str | None = None) -> str:
    """The DDL ``create_schema()`` runs for this prefix and schema, as one SQL script.

    For migrations kept by hand: ``print(schema_sql("billing_"))``. With the
    default prefix it is ``postgres.sql`` (shipped in ``creditmeter.stores``) without
    its comments.
    """
    prefix, schema = check_names(prefix, schema)
    return "".join(statement.as_string() + ";\n" for statement in _ddl(prefix, schema))


def _key(*parts: str) -> int:
    """A signed 64-bit advisory lock key for these strings."""
    digest = hashlib.blake2b("\x00".join(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


# --- statements -----------------------------------------------------------------

_ENTRY_ROW = (
    "({n}, %s::text, %s::text, %s::numeric, %s::numeric, %s::numeric, %s::timestamptz, "
    "%s::text, %s::text, %s::bigint, %s::bigint, %s::bigint, %s::bigint, %s::text)"
)
_PERIODS = {"hour": "hour", "day": "day", "week": "week", "month": "month"}
# A read of the whole ledger in commit order stops below this: every transaction
# under it has ended, so no row can appear there any more.
_HORIZON = "pg_snapshot_xmin(pg_current_snapshot())::text::bigint"


class Statements:
    """Every statement of one store, composed once into bytes."""

    def __init__(self, prefix: str, schema: str | None) -> None:
        names = _names(prefix, schema)
        self.accounts = names["accounts"]
        self.ledger = names["ledger"]
        self.meta = names["meta"]
        self.request_index = prefix + "ledger_request"
        self.ddl = [statement.as_bytes() for statement in _ddl(prefix, schema)]
        self.key_space = (schema or "", prefix)
        self.schema_lock = _key("creditmeter-schema", *self.key_space)
        self.load = self._bytes("SELECT data FROM {accounts} WHERE user_id = %s")
        self.find_request = self._bytes(
            "SELECT data FROM {ledger} WHERE user_id = %s AND request_id = %s"
        )
        self.find_requests = self._bytes(
            "SELECT request_id, data FROM {ledger} WHERE user_id = %s AND request_id = ANY(%s)"
        )
        self.ledger_all = self._bytes("SELECT data FROM {ledger} WHERE user_id = %s ORDER BY seq")
        self.ledger_tail = self._bytes(
            "SELECT data FROM (SELECT seq, data FROM {ledger} WHERE user_id = %s "
            "ORDER BY seq DESC LIMIT %s) AS tail ORDER BY seq"
        )
        self.users = self._bytes('SELECT user_id FROM {accounts} ORDER BY user_id COLLATE "C"')
        self.schema_version = self._bytes("SELECT value FROM {meta} WHERE key = 'schema'")
        self.users_first = self._bytes(
            'SELECT user_id FROM {accounts} ORDER BY user_id COLLATE "C" LIMIT %s'
        )
        self.users_after = self._bytes(
            'SELECT user_id FROM {accounts} WHERE user_id COLLATE "C" > %s '
            'ORDER BY user_id COLLATE "C" LIMIT %s'
        )
        self._commits: dict[tuple[bool, int, bool], bytes] = {}
        self._scans: dict[tuple[bool, bool, bool, bool], bytes] = {}
        self._deltas: dict[bool, bytes] = {}
        self._sums: dict[tuple[bool, bool, str | None, bool, bool, bool], bytes] = {}
        self._keys: dict[str, int] = {}

    def _bytes(self, template: str) -> bytes:
        query = sql.SQL(template).format(accounts=self.accounts, ledger=self.ledger, meta=self.meta)
        return query.as_bytes()

    def lock_key(self, user_id: str) -> int:
        """The advisory lock key of a user (remembered: every commit needs it)."""
        keys = self._keys
        key = keys.get(user_id)
        if key is None:
            if len(keys) >= _KEYS_KEPT:
                keys.clear()
            key = keys[user_id] = _key("creditmeter-user", *self.key_space, user_id)
        return key

    def commit(self, *, new: bool, entries: int, release: bool = False) -> bytes:
        """The one statement of a commit: compare-and-set, ledger rows, current row if lost.

        With ``release``, a commit that applies also lets go of the session's
        ``exclusive`` lock on the user (one more parameter: the key). The
        shared transaction-level lock the statement took on the same key
        still holds until the transaction has committed, so the next holder
        of ``exclusive`` cannot read the account before this commit shows.
        """
        query = self._commits.get((new, entries, release))
        if query is not None:
            return query
        # Every commit waits while another session holds exclusive() on the user: a
        # shared transaction-level advisory lock, taken before the row is written.
        held = "pg_advisory_xact_lock_shared(%s::bigint) IS NOT NULL"
        if new:
            cas = (
                "INSERT INTO {accounts} "
                "(user_id, version, balance, created_at, updated_at, last_refill, data) "
                "SELECT %s::text, %s::bigint, %s::numeric, %s::timestamptz, %s::timestamptz, "
                f"%s::timestamptz, %s::text WHERE {held} "
                "ON CONFLICT (user_id) DO NOTHING RETURNING user_id"
            )
        else:
            # Table names are sql.Identifier; every value is a parameter.
            cas = (
                "UPDATE {accounts} SET version = %s, balance = %s, updated_at = %s, "  # noqa: S608
                "last_refill = %s, data = %s WHERE user_id = %s AND version = %s "
                f"AND {held} RETURNING user_id"
            )
        text = "WITH cas AS (" + cas + ")"
        if entries:
            rows = ", ".join(_ENTRY_ROW.format(n=n) for n in range(entries))
            # tx is the column's default: the id of this transaction.
            text += (
                ", added AS (INSERT INTO {ledger} (user_id, id, kind, amount, balance_after, "  # noqa: S608
                "cost, at, request_id, model, input_tokens, output_tokens, cache_write_tokens, "
                "cache_read_tokens, data) SELECT cas.user_id, e.id, e.kind, e.amount, "
                "e.balance_after, e.cost, e.at, e.request_id, e.model, e.input, e.output, "
                "e.cache_write, e.cache_read, e.data FROM cas, "
                f"(VALUES {rows}) AS e (n, id, kind, amount, balance_after, cost, at, "
                "request_id, model, input, output, cache_write, cache_read, data) ORDER BY e.n"
                + (" RETURNING 1)" if release else ")")
            )
        text += (
            " SELECT EXISTS (SELECT FROM cas), (SELECT data FROM {accounts} "
            "WHERE user_id = %s AND NOT EXISTS (SELECT FROM cas))"
        )
        if release:
            # An advisory unlock is not undone by a rollback: it runs only once the ledger
            # rows are in (a duplicate request id fails the statement before it).
            after = " WHERE (SELECT count(*) FROM added) >= 0" if entries else ""
            text += f", (SELECT pg_advisory_unlock(%s::bigint) FROM cas{after})"  # noqa: S608
        query = self._commits[new, entries, release] = self._bytes(text)
        return query

    def delta(self, *, floor: bool) -> bytes:
        """The one statement of ``commit_delta`` (parameters: ``delta_params``).

        It adds the amount to the stored balance if the guard holds (see
        ``DeltaStore``), writing the account's JSON from the client's pieces
        around the balance and version the server computed. The row is
        compared as JSON with the planned one, minus the three fields a delta
        may find moved; ``updated_at`` becomes the later of the stored and the
        planned one. It returns one row, the new balance, version and
        ``updated_at``; or, if the guard failed, ``NULL``s and the stored
        account's JSON; or no row, if there is no account.
        """
        query = self._deltas.get(floor)
        if query is not None:
            return query
        # Braces doubled: the text goes through sql.SQL.format.
        moved = "'{{balance,version,updated_at}}'::text[]"
        # The later of the stored and the planned updated_at, as a time and as JSON text.
        later = "updated_at > %(updated)s::timestamptz"
        text = (
            "WITH d AS (UPDATE {accounts} SET version = version + 1, "  # noqa: S608
            "balance = balance + %(amount)s::numeric, "
            "updated_at = greatest(updated_at, %(updated)s::timestamptz), "
            "data = %(a)s::text || (balance + %(amount)s::numeric)::text || %(b)s::text "
            f"|| (version + 1)::text || %(c)s::text || CASE WHEN {later} "
            "THEN data::jsonb ->> 'updated_at' ELSE %(updated_text)s::text END || %(d)s::text "
            "WHERE user_id = %(user)s::text "
            + ("AND balance >= %(floor)s::numeric " if floor else "")
            + f"AND data::jsonb - {moved} = (%(a)s::text || '0' || %(b)s::text || '0' "  # noqa: S608
            f"|| %(c)s::text || %(d)s::text)::jsonb - {moved} "
            "AND pg_advisory_xact_lock_shared(%(key)s::bigint) IS NOT NULL "
            "RETURNING user_id, balance, version, updated_at), "
            "added AS (INSERT INTO {ledger} (user_id, id, kind, amount, balance_after, "
            "cost, at, request_id, model, input_tokens, output_tokens, cache_write_tokens, "
            "cache_read_tokens, data) SELECT d.user_id, %(id)s::text, %(kind)s::text, "
            "%(amount)s::numeric, d.balance, %(cost)s::numeric, %(at)s::timestamptz, "
            "%(request)s::text, %(model)s::text, %(input)s::bigint, %(output)s::bigint, "
            "%(cache_write)s::bigint, %(cache_read)s::bigint, "
            "%(ea)s::text || d.balance::text || %(eb)s::text FROM d) "
            "SELECT d.balance, d.version, d.updated_at, NULL FROM d UNION ALL "
            "SELECT NULL, NULL, NULL, data FROM {accounts} WHERE user_id = %(user)s::text "
            "AND NOT EXISTS (SELECT FROM d)"
        )
        query = self._deltas[floor] = self._bytes(text)
        return query

    def scan(self, *, user: bool, since: bool, until: bool, kinds: bool) -> bytes:
        """A page of ``scan_entries`` (parameters: ``scan_params``), for this shape of query.

        Of one user: that user's rows after a ``seq``, in ``seq`` order, which
        is commit order within one user (each commit of a user first updates
        the account row, so the next one waits for it to commit before it
        takes its ``seq``); rows ``(tx, seq, data)``. Of every user: the rows
        after a ``(tx, seq)`` in that order, below the horizon; each row is
        ``(horizon, more, tx, seq, data)``, where ``more`` tells whether any
        row lies at or above the horizon (and the page columns are ``NULL``
        in the one row of an empty page).
        """
        shape = (user, since, until, kinds)
        query = self._scans.get(shape)
        if query is not None:
            return query
        where = ""
        if since:
            where += " AND at >= %s"
        if until:
            where += " AND at < %s"
        if kinds:
            where += " AND kind = ANY(%s::text[])"
        if user:
            text = (
                "SELECT tx, seq, data FROM {ledger} WHERE user_id = %s AND seq > %s"  # noqa: S608
                f"{where} ORDER BY seq LIMIT %s"
            )
        else:
            text = (
                "SELECT h.horizon, h.more, page.tx, page.seq, page.data FROM "  # noqa: S608
                # max(tx) is one step down the (tx, seq) index; an EXISTS may be planned as a
                # sequential scan that walks the old rows first.
                "(SELECT snap.x AS horizon, "
                "coalesce((SELECT max(tx) FROM {ledger}) >= snap.x, false) AS more "
                f"FROM (SELECT {_HORIZON} AS x) AS snap) AS h "
                "LEFT JOIN LATERAL (SELECT tx, seq, data FROM {ledger} "
                f"WHERE (tx, seq) > (%s, %s) AND tx < h.horizon{where} "
                "ORDER BY tx, seq LIMIT %s) AS page ON true ORDER BY page.tx, page.seq"
            )
        query = self._scans[shape] = self._bytes(text)
        return query

    def sums(self, query: UsageQuery) -> bytes:
        """The ``sum_usage`` statement for this query (parameters: ``sum_params``).

        Rows: user id, model, period start (UTC, naive), calls, the four token
        sums, cost and charged; a key the query does not group by is ``NULL``.
        """
        by = query.by
        period = query.period if "period" in by else None
        shape = (
            "user" in by,
            "model" in by,
            period,
            query.user_id is not None,
            query.since is not None,
            query.until is not None,
        )
        found = self._sums.get(shape)
        if found is not None:
            return found
        by_user, by_model, _, user, since, until = shape
        if period is not None and period not in _PERIODS:
            raise InvalidInput(f"period must be one of {', '.join(_PERIODS)}, got {period!r}")
        start = (
            "NULL::timestamp"
            if period is None
            else f"date_trunc('{_PERIODS[period]}', at AT TIME ZONE 'UTC')"
        )
        where = ""
        if user:
            where += " AND user_id = %s"
        if since:
            where += " AND at >= %s"
        if until:
            where += " AND at < %s"
        text = (
            f"SELECT {'user_id' if by_user else 'NULL::text'}, "  # noqa: S608
            f"{'model' if by_model else 'NULL::text'}, {start}, count(*), "
            "coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0), "
            "coalesce(sum(cache_write_tokens), 0), coalesce(sum(cache_read_tokens), 0), "
            "sum(coalesce(cost, -amount)), sum(-amount) "
            f"FROM {{ledger}} WHERE kind = 'charge'{where} GROUP BY 1, 2, 3"
        )
        found = self._sums[shape] = self._bytes(text)
        return found


def commit_params(
    account: Account,
    entries: Sequence[LedgerEntry],
    expected_version: int | None,
    key: int,
    *,
    release: bool = False,
) -> list[Any]:
    """The parameters of ``Statements.commit``, in its order (``key``: the user's lock)."""
    user_id = account.user_id
    data = account_to_json(account)
    params: list[Any]
    if expected_version is None:
        params = [
            user_id,
            account.version,
            account.balance,
            account.created_at,
            account.updated_at,
            account.last_refill,
            data,
            key,
        ]
    else:
        params = [
            account.version,
            account.balance,
            account.updated_at,
            account.last_refill,
            data,
            user_id,
            expected_version,
            key,
        ]
    for entry in entries:
        usage = entry.usage
        params += (
            entry.id,
            entry.kind.value,
            entry.amount,
            entry.balance_after,
            entry.cost,
            entry.at,
            entry.request_id,
            entry.model,
        )
        if usage is None:
            params += _NO_USAGE
        else:
            params += (usage.input, usage.output, usage.cache_write, usage.cache_read)
        params.append(entry_to_json(entry))
    params.append(user_id)
    if release:
        params.append(key)
    return params


_NO_USAGE = (None, None, None, None)


def delta_params(
    account: Account, entry: LedgerEntry, floor: Decimal | None, key: int
) -> dict[str, Any]:
    """The parameters of ``Statements.delta`` (``key``: the user's lock)."""
    a, b, c, updated, d = account_split(account)
    ea, eb = entry_split(entry)
    usage = entry.usage
    tokens = (
        _NO_USAGE
        if usage is None
        else (usage.input, usage.output, usage.cache_write, usage.cache_read)
    )
    return {
        "user": account.user_id,
        "amount": entry.amount,
        "updated": account.updated_at,
        "floor": floor,
        "a": a,
        "b": b,
        "c": c,
        "d": d,
        "updated_text": updated,
        "key": key,
        "id": entry.id,
        "kind": entry.kind.value,
        "cost": entry.cost,
        "at": entry.at,
        "request": entry.request_id,
        "model": entry.model,
        "input": tokens[0],
        "output": tokens[1],
        "cache_write": tokens[2],
        "cache_read": tokens[3],
        "ea": ea,
        "eb": eb,
    }


def scan_params(query: EntryQuery, after: tuple[int, int] | None, limit: int) -> list[Any]:
    """The parameters of ``Statements.scan`` for this query, after ``(tx, seq)``.

    One row more than ``limit`` is asked for, to tell a full page from the end.
    """
    tx, seq = (0, 0) if after is None else after
    params: list[Any] = [] if query.user_id is None else [query.user_id]
    params += (seq,) if query.user_id is not None else (tx, seq)
    if query.since is not None:
        params.append(query.since)
    if query.until is not None:
        params.append(query.until)
    if query.kinds is not None:
        params.append(sorted(kind.value for kind in query.kinds))
    params.append(limit + 1)
    return params


def sum_params(query: UsageQuery) -> list[Any]:
    """The parameters of ``Statements.sums`` for this query."""
    params: list[Any] = []
    if query.user_id is not None:
        params.append(query.user_id)
    if query.since is not None:
        params.append(query.since)
    if query.until is not None:
        params.append(query.until)
    return params


def request_ids(entries: Sequence[LedgerEntry]) -> list[str]:
    """The request ids of these entries (the parameter of ``Statements.find_requests``)."""
    return [entry.request_id for entry in entries if entry.request_id is not None]
