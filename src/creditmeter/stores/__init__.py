"""Storage backends, and ``open_store(url)`` to pick one by URL.

``memory://``, ``sqlite:///relative.db`` / ``sqlite:////absolute.db``
(SQLAlchemy's convention), ``redis://host:6379/0[?prefix=...]`` and
``postgresql://user@host/db[?prefix=...&schema=...]``. An unknown scheme is a
``ConfigError`` naming the known ones. The Redis and PostgreSQL classes are
imported only when used: their drivers are the ``[redis]`` and ``[postgres]``
extras.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

from creditmeter.exceptions import ConfigError
from creditmeter.stores.base import AsyncBalanceStore, BalanceStore
from creditmeter.stores.memory import AsyncMemoryStore, MemoryStore
from creditmeter.stores.sqlite import AsyncSQLiteStore, Durability, SQLiteStore

__all__ = [
    "AsyncBalanceStore",
    "AsyncMemoryStore",
    "AsyncPostgresStore",
    "AsyncRedisStore",
    "AsyncSQLiteStore",
    "BalanceStore",
    "MemoryStore",
    "PostgresStore",
    "RedisStore",
    "SQLiteStore",
    "open_async_store",
    "open_store",
]


def _memory(url: str) -> None:
    if url not in ("memory://", "memory:"):
        raise ConfigError(f"a memory store URL takes nothing after 'memory://', got {url!r}")


def _sqlite(url: str) -> tuple[str, Durability]:
    if not url.startswith("sqlite:///"):
        raise ConfigError(
            "an SQLite URL is sqlite:///relative/path.db or sqlite:////absolute/path.db, "
            f"got {url!r}"
        )
    parts = urlsplit(url)
    path = unquote(parts.path[1:])  # the third slash only separates the (empty) host
    if not path:
        raise ConfigError(f"an SQLite URL needs a file path, got {url!r}")
    options = parse_qs(parts.query)
    durability = options.pop("durability", ["full"])[-1]
    if options:
        raise ConfigError(f"unknown SQLite URL option(s): {', '.join(sorted(options))}")
    if durability not in ("full", "normal"):
        raise ConfigError(f"durability must be 'full' or 'normal', got {durability!r}")
    return path, "full" if durability == "full" else "normal"


def _open_memory(url: str) -> BalanceStore:
    _memory(url)
    return MemoryStore()


def _open_sqlite(url: str) -> BalanceStore:
    path, durability = _sqlite(url)
    return SQLiteStore(path, durability=durability)


def _open_async_memory(url: str) -> AsyncBalanceStore:
    _memory(url)
    return AsyncMemoryStore()


def _open_async_sqlite(url: str) -> AsyncBalanceStore:
    path, durability = _sqlite(url)
    return AsyncSQLiteStore(path, durability=durability)


def _open_redis(url: str) -> BalanceStore:
    store: BalanceStore = _redis().RedisStore(url)
    return store


def _open_async_redis(url: str) -> AsyncBalanceStore:
    store: AsyncBalanceStore = _redis().AsyncRedisStore(url)
    return store


def _postgres_options(url: str) -> tuple[str, dict[str, Any]]:
    """Split creditmeter's own options (``prefix``, ``schema``) off a PostgreSQL URL."""
    parts = urlsplit(url)
    query = parse_qs(parts.query, keep_blank_values=True)
    options: dict[str, Any] = {}
    for name in ("prefix", "schema"):
        if name in query:
            options[name] = query.pop(name)[-1]
    rest = "&".join(f"{key}={value}" for key, values in query.items() for value in values)
    return urlunsplit(parts._replace(query=rest)), options


def _open_postgres(url: str) -> BalanceStore:
    dsn, options = _postgres_options(url)
    store: BalanceStore = _postgres().PostgresStore(dsn, **options)
    return store


def _open_async_postgres(url: str) -> AsyncBalanceStore:
    dsn, options = _postgres_options(url)
    store: AsyncBalanceStore = _postgres().AsyncPostgresStore(dsn, **options)
    return store


def _redis() -> Any:
    try:
        from creditmeter.stores import redis  # noqa: PLC0415 - needs the [redis] extra
    except ImportError as exc:
        raise ConfigError(
            f"the Redis store needs: pip install 'creditmeter[redis]' ({exc})"
        ) from None
    return redis


def _postgres() -> Any:
    try:
        from creditmeter.stores import postgres  # noqa: PLC0415 - needs the [postgres] extra
    except ImportError as exc:
        raise ConfigError(
            f"the PostgreSQL store needs: pip install 'creditmeter[postgres]' ({exc})"
        ) from None
    return postgres


# scheme -> (sync opener, async opener)
_OPENERS: dict[str, tuple[Callable[[str], BalanceStore], Callable[[str], AsyncBalanceStore]]] = {
    "memory": (_open_memory, _open_async_memory),
    "sqlite": (_open_sqlite, _open_async_sqlite),
    "redis": (_open_redis, _open_async_redis),
    "rediss": (_open_redis, _open_async_redis),
    "postgresql": (_open_postgres, _open_async_postgres),
    "postgres": (_open_postgres, _open_async_postgres),
}

_LAZY = {
    "RedisStore": _redis,
    "AsyncRedisStore": _redis,
    "PostgresStore": _postgres,
    "AsyncPostgresStore": _postgres,
}


def __getattr__(name: str) -> Any:
    """The Redis and PostgreSQL classes, imported on first use (their drivers are extras)."""
    loader = _LAZY.get(name)
    if loader is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(loader(), name)


def redact(url: str) -> str:
    """The URL with any password replaced by ``***``, for messages."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if not password:
        return url
    return url.replace(f":{password}@", ":***@", 1)


def _scheme(url: object) -> str:
    if not isinstance(url, str):
        raise ConfigError(f"a store URL must be a str, got {type(url).__name__}")
    scheme = url.partition(":")[0].lower()
    if scheme not in _OPENERS or ":" not in url:
        known = ", ".join(f"{name}://" for name in sorted(_OPENERS))
        raise ConfigError(f"unknown store URL {redact(url)!r}; known schemes: {known}")
    return scheme


def open_store(url: str) -> BalanceStore:
    """Open the store a URL names: ``memory://`` or ``sqlite:///path.db[?durability=normal]``."""
    return _OPENERS[_scheme(url)][0](url)


def open_async_store(url: str) -> AsyncBalanceStore:
    """Open the async store a URL names (the same URLs as ``open_store``)."""
    return _OPENERS[_scheme(url)][1](url)
