"""Stores by URL: a fresh place for each store kind, whether its server answers, the clean-up.

Kinds: ``memory``, ``sqlite-full``, ``sqlite-normal``, ``redis`` and
``postgres``. Every URL ``Places`` hands out has a file, key prefix or table
prefix of its own, and ``Places.close`` deletes them all (Redis: SCAN + UNLINK
of that prefix only; PostgreSQL: DROP TABLE of that prefix's tables).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from creditmeter import EntryKind, open_store
from creditmeter.stores.base import BalanceStore

REDIS_URL = os.environ.get("CREDITMETER_BENCH_REDIS", "redis://127.0.0.1:6379/15")
POSTGRES_URL = os.environ.get(
    "CREDITMETER_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
KINDS = ("memory", "sqlite-full", "sqlite-normal", "redis", "postgres")
SHARED = ("sqlite-full", "sqlite-normal", "redis", "postgres")  # processes can share these


def kind_of(url: str) -> str:
    """The kind of store a URL opens."""
    scheme = url.partition(":")[0]
    if scheme == "sqlite":
        return "sqlite-" + (option(url, "durability") or "full")
    return {"postgresql": "postgres"}.get(scheme, scheme)


def option(url: str, name: str) -> str:
    """One query option of a URL, or ``""``."""
    return parse_qs(urlsplit(url).query).get(name, [""])[0]


def base_url(url: str) -> str:
    """The URL without its ``prefix`` option: what a driver connects to."""
    head, _, query = url.partition("?")
    kept = [part for part in query.split("&") if part and not part.startswith("prefix=")]
    return head + ("?" + "&".join(kept) if kept else "")


def sqlite_path(url: str) -> str:
    """The file of an SQLite URL."""
    return unquote(url.removeprefix("sqlite:///").partition("?")[0])


def with_options(url: str, **options: str) -> str:
    """The URL with these query options added."""
    joined = "&".join(f"{name}={quote(value)}" for name, value in options.items())
    return f"{url}{'&' if '?' in url else '?'}{joined}"


class Places:
    """Fresh store URLs for one scenario; ``close`` removes what they hold."""

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.urls = workdir, []

    def url(self, kind: str, tag: str = "") -> str:
        """A URL of ``kind`` that no other URL shares (``tag`` names the SQLite file)."""
        token = uuid.uuid4().hex[:10]
        if kind.startswith("sqlite"):
            path = self.workdir / f"{tag or 'store'}-{token}.db"
            url = f"sqlite:///{quote(str(path))}?durability={kind.removeprefix('sqlite-')}"
        elif kind == "redis":
            url = with_options(REDIS_URL, prefix=f"cmbench:{token}:")
        elif kind == "postgres":
            url = with_options(POSTGRES_URL, prefix=f"cmbench_{token}_")
        else:
            url = "memory://"
        self.urls.append(url)
        return url

    def open(self, kind: str, tag: str = "") -> tuple[str, BalanceStore]:
        """A fresh URL of ``kind`` and a store opened on it."""
        url = self.url(kind, tag)
        return url, open_store(url)

    def close(self) -> list[str]:
        """Delete every place handed out; a note per place that held something."""
        notes = []
        for url in reversed(self.urls):
            with contextlib.suppress(Exception):
                if dropped := drop(url):
                    notes.append(f"{kind_of(url)} `{option(url, 'prefix')}`: {dropped:,} removed")
        self.urls.clear()
        return notes

    def __enter__(self) -> Places:
        self.workdir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def drop(url: str) -> int:
    """Delete what a URL's store holds: files, keys or tables; how many were removed."""
    kind = kind_of(url)
    if kind.startswith("sqlite"):
        for suffix in ("", "-wal", "-shm", ".lock"):
            Path(sqlite_path(url) + suffix).unlink(missing_ok=True)
        return 0
    prefix = option(url, "prefix")
    if kind == "redis":
        import redis  # noqa: PLC0415 - only where Redis is measured

        dropped = 0
        with redis.Redis.from_url(base_url(url)) as client:
            keys = list(client.scan_iter(match=prefix + "*", count=10_000))
            for start in range(0, len(keys), 10_000):
                dropped += client.unlink(*keys[start : start + 10_000])
        return dropped
    if kind == "postgres":
        pg(url, "DROP TABLE IF EXISTS {}, {}, {}", "accounts", "ledger", "meta")
    return 0


def pg(url: str, template: str, *tables: str, params: tuple[object, ...] = ()) -> list[Any]:
    """Run one statement on a PostgreSQL URL's server, ``{}`` standing for the URL's tables."""
    import psycopg  # noqa: PLC0415 - only where PostgreSQL is measured
    from psycopg import sql  # noqa: PLC0415

    names = [sql.Identifier(option(url, "prefix") + table) for table in tables]
    with psycopg.connect(base_url(url), autocommit=True) as conn:
        cursor = conn.execute(sql.SQL(template).format(*names), params or None)
        return cursor.fetchall() if cursor.description else []


def describe(kind: str) -> str:
    """The server a kind of store talks to, with the settings that decide its speed.

    Raises if the server does not answer; ``""`` for a store with no server.
    """
    if kind == "redis":
        import redis  # noqa: PLC0415

        with redis.Redis.from_url(REDIS_URL, socket_timeout=5) as client:
            version = client.info("server")["redis_version"]
            aof = client.config_get("appendonly").get("appendonly", "?")
            sync = client.config_get("appendfsync").get("appendfsync", "?")
        return f"Redis {version} at {REDIS_URL} (appendonly {aof}, appendfsync {sync})"
    if kind == "postgres":
        (version,), (sync,) = (
            pg(POSTGRES_URL, f"SHOW {name}")[0] for name in ("server_version", "synchronous_commit")
        )
        return f"PostgreSQL {version} at {POSTGRES_URL} (synchronous_commit {sync})"
    return ""


def available(kinds: Iterable[str]) -> tuple[list[str], dict[str, str], list[str]]:
    """The kinds whose server answers, why the others were skipped, and a line per server."""
    found, skipped, servers = [], {}, []
    for kind in kinds:
        try:
            line = describe(kind)
        except Exception as exc:  # an import, a refused connection: each says why
            first = (str(exc).strip().splitlines() or [""])[0]
            skipped[kind] = f"{type(exc).__name__}: {first}"
            continue
        found.append(kind)
        servers += [f"- {line}"] if line else []
    return found, skipped, servers


def audit(store: Any, users: Iterable[str], start: Decimal | int) -> tuple[int, int, bool]:
    """Read users back: (credits they lost since ``start``, CHARGE entries, every ledger sums).

    A user the store does not hold counts at ``start``.
    """
    spent, charges, sums = 0, 0, True
    for user in sorted(set(users)):
        account, ledger = store.load(user), store.ledger(user)
        balance = start if account is None else account.balance
        spent += int(start - balance)
        charges += sum(1 for entry in ledger if entry.kind is EntryKind.CHARGE)
        sums = sums and (not ledger or sum(entry.amount for entry in ledger) == balance)
    return spent, charges, sums
