"""Reaching the real Redis and PostgreSQL servers the store tests run against.

On a machine without them (a new contributor's laptop) those tests skip with
a message saying how to enable them; with CREDITMETER_REQUIRE_SERVICES=1 (as
.ci/run sets) a server that cannot be reached fails the test instead.
"""

from __future__ import annotations

import os
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
