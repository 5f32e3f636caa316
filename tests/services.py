"""Reaching the real Redis and PostgreSQL servers the store tests run against.

On a machine without them (a new contributor's laptop) those tests skip with
a message saying how to enable them; with CREDITMETER_REQUIRE_SERVICES=1 (as
.ci/run sets) a server that cannot be reached fails the test instead.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Callable

import pytest

REDIS_URL = os.environ.get("CREDITMETER_TEST_REDIS", "redis://127.0.0.1:6379/15")
POSTGRES_DSN = os.environ.get(
    "CREDITMETER_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)

HOW = {
    "redis": (
        "start one with: redis-server --daemonize yes --bind 127.0.0.1 --port 6379 "
        '--save "" --appendonly no (or set CREDITMETER_TEST_REDIS)'
    ),
    "redis-cluster": (
        "start one with: tools/redis-cluster (six nodes on 127.0.0.1:7000-7005; or set "
        "CREDITMETER_TEST_CLUSTER)"
    ),
    "postgres": (
        "start one with: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start "
        "(or set CREDITMETER_TEST_POSTGRES to a DSN)"
    ),
}


def need(service: str, probe: Callable[[], object]) -> None:
    """Skip (or fail, with CREDITMETER_REQUIRE_SERVICES=1) unless ``probe()`` reaches it."""
    try:
        probe()
    except Exception as exc:  # any failure to reach it means "not here"
        message = f"{service} is not reachable ({exc}); {HOW[service]}"
        if os.environ.get("CREDITMETER_REQUIRE_SERVICES") == "1":
            pytest.fail(message)
        pytest.skip(message)


def unique(prefix: str) -> str:
    """A key prefix / schema name of its own, so runs never see each other's data."""
    return f"{prefix}{uuid.uuid4().hex[:12]}"


# --- namespaces on the servers, for suites that open stores by URL --------------------


def with_option(url: str, name: str, value: str) -> str:
    """``url`` with one more query option (``?`` or ``&`` as the URL needs)."""
    return f"{url}{'&' if '?' in url else '?'}{name}={value}"


def reach_redis() -> None:
    """Raise unless the test Redis server answers (a probe for ``need``)."""
    import redis  # noqa: PLC0415 - the [redis] extra

    with redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2) as client:
        client.ping()


def reach_postgres() -> None:
    """Raise unless the test PostgreSQL server answers (a probe for ``need``)."""
    import psycopg  # noqa: PLC0415 - the [postgres] extra

    psycopg.connect(POSTGRES_DSN, connect_timeout=3).close()


def drop_redis_keys(prefix: str) -> int:
    """Unlink every key under ``prefix`` (SCAN + UNLINK: never FLUSHDB, the server is shared)."""
    import redis  # noqa: PLC0415 - the [redis] extra

    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"
    dropped = 0
    with redis.Redis.from_url(REDIS_URL) as client:
        keys = list(client.scan_iter(match=pattern, count=1000))
        for start in range(0, len(keys), 1000):
            dropped += client.unlink(*keys[start : start + 1000])
    return dropped


def drop_postgres_tables(prefix: str) -> list[str]:
    """Drop every table of the connection's schema whose name starts with ``prefix``."""
    import psycopg  # noqa: PLC0415 - the [postgres] extra
    from psycopg import sql  # noqa: PLC0415

    with psycopg.connect(POSTGRES_DSN, autocommit=True, connect_timeout=3) as conn:
        conn.execute("SET lock_timeout = '10s'")
        names = [
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = current_schema() "
                "AND left(tablename, length(%s)) = %s",
                (prefix, prefix),
            )
        ]
        if names:
            tables = sql.SQL(", ").join(sql.Identifier(name) for name in names)
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(tables))
    return names


def wait_for_postgres_horizon(timeout: float = 30.0) -> None:
    """Wait until every transaction on the server older than this call has ended.

    A PostgreSQL scan of every user's entries shows only rows below the
    server-wide horizon (the oldest transaction still open, from any
    session: an autovacuum ``ANALYZE`` on a busy machine, say). A test that
    wants all it wrote in one scan waits for that first; a wait of more
    than ``timeout`` seconds fails.
    """
    import psycopg  # noqa: PLC0415 - the [postgres] extra

    with psycopg.connect(POSTGRES_DSN, autocommit=True, connect_timeout=3) as conn:
        row = conn.execute("SELECT pg_current_xact_id()").fetchone()  # newer than every row
        assert row is not None
        passed = "SELECT pg_snapshot_xmin(pg_current_snapshot()) > %s"
        deadline = time.monotonic() + timeout
        while not conn.execute(passed, (row[0],)).fetchone()[0]:  # type: ignore[index]
            if time.monotonic() > deadline:
                raise AssertionError(f"a transaction held the horizon back over {timeout} s")
            time.sleep(0.01)
