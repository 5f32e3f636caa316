"""Storage backends, and ``open_store(url)`` to pick one by URL.

``memory://``, ``sqlite:///relative.db`` / ``sqlite:////absolute.db``
(SQLAlchemy's convention; ``?durability=normal``; the path is percent-decoded,
so ``#``, ``?`` and ``%`` in a file name are ``%23``, ``%3F``, ``%25``),
``redis://host:6379/0[?prefix=...]`` (``rediss://`` with TLS;
``redis+cluster://host:7000[?min_replicas=1]`` for Redis Cluster) and
``postgresql://user@host/db[?prefix=...&schema=...]`` (``postgres://`` too).
An unknown scheme is a ``ConfigError`` naming the known ones, with any
password in the URL hidden. The Redis and PostgreSQL classes are imported
only when used: their drivers are the ``[redis]`` and ``[postgres]`` extras.

A third-party store opens by URL too once its scheme is registered with
``register_store``; the bundled schemes are registered the same way, below.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from creditmeter._urls import memory_url, postgres_url, redact, sqlite_url
from creditmeter.exceptions import ConfigError
from creditmeter.stores.base import AsyncBalanceStore, BalanceStore
from creditmeter.stores.memory import AsyncMemoryStore, MemoryStore
from creditmeter.stores.sqlite import AsyncSQLiteStore, SQLiteStore

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
    "register_store",
]

_Opener = Callable[[str], BalanceStore]
_AsyncOpener = Callable[[str], AsyncBalanceStore]

# scheme (lowercase) -> (sync opener, async opener); either may be None
_OPENERS: dict[str, tuple[_Opener | None, _AsyncOpener | None]] = {}

# RFC 3986's scheme syntax, lowercase only: a letter, then letters, digits, "+", "-", ".".
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")


def register_store(
    scheme: str,
    opener: Callable[[str], BalanceStore] | None,
    async_opener: Callable[[str], AsyncBalanceStore] | None,
    *,
    replace: bool = False,
) -> None:
    """Make ``open_store`` and ``open_async_store`` open ``scheme://...`` URLs.

    ``opener(url)`` returns a ``BalanceStore`` and ``async_opener(url)`` an
    ``AsyncBalanceStore``; each gets the whole URL as the caller wrote it and
    raises ``ConfigError`` for one it cannot use. Either may be ``None`` when
    the store has no such flavour: opening the scheme that way is then a
    ``ConfigError`` saying so. ``scheme`` is written in lowercase (a letter,
    then letters, digits, ``+``, ``-`` or ``.``); URLs match it in any case.

    A scheme already registered, bundled (``memory``, ``sqlite``, ``redis``,
    ``rediss``, ``postgresql``, ``postgres``) or not, is refused with
    ``ConfigError`` unless ``replace=True``. So is a scheme that is not valid,
    an opener that is not callable, or two ``None`` openers.
    """
    if not isinstance(scheme, str) or _SCHEME.fullmatch(scheme) is None:
        raise ConfigError(
            "a store URL scheme is a lowercase letter, then lowercase letters, digits, "
            f"'+', '-' or '.', got {scheme!r}"
        )
    for name, value in (("opener", opener), ("async_opener", async_opener)):
        if value is not None and not callable(value):
            raise ConfigError(f"{name} for {scheme}:// must be callable or None, got {value!r}")
    if opener is None and async_opener is None:
        raise ConfigError(f"register_store({scheme!r}) needs an opener, an async_opener or both")
    if scheme in _OPENERS and not replace:
        raise ConfigError(
            f"the store URL scheme {scheme}:// is already registered; pass replace=True "
            "to register another store in its place"
        )
    _OPENERS[scheme] = (opener, async_opener)


def open_store(url: str) -> BalanceStore:
    """Open the store a URL names, such as ``memory://`` or ``sqlite:///path.db``."""
    scheme = _scheme(url)
    opener = _OPENERS[scheme][0]
    if opener is None:
        raise ConfigError(f"the {scheme}:// store has no sync flavour: use open_async_store")
    return opener(url)


def open_async_store(url: str) -> AsyncBalanceStore:
    """Open the async store a URL names (the same URLs as ``open_store``)."""
    scheme = _scheme(url)
    opener = _OPENERS[scheme][1]
    if opener is None:
        raise ConfigError(f"the {scheme}:// store has no async flavour: use open_store")
    return opener(url)


def _scheme(url: object) -> str:
    """The registered scheme of ``url``, lowercased; ``ConfigError`` if it has none."""
    if not isinstance(url, str):
        raise ConfigError(f"a store URL must be a str, got {type(url).__name__}")
    scheme = url.partition(":")[0].lower()
    if scheme not in _OPENERS or ":" not in url:
        known = ", ".join(f"{name}://" for name in sorted(_OPENERS))
        raise ConfigError(f"unknown store URL {redact(url)!r}; known schemes: {known}")
    return scheme


# --- the bundled stores -----------------------------------------------------------------


def _open_memory(url: str) -> BalanceStore:
    memory_url(url)
    return MemoryStore()


def _open_async_memory(url: str) -> AsyncBalanceStore:
    memory_url(url)
    return AsyncMemoryStore()


def _open_sqlite(url: str) -> BalanceStore:
    path, durability = sqlite_url(url)
    return SQLiteStore(path, durability=durability)


def _open_async_sqlite(url: str) -> AsyncBalanceStore:
    path, durability = sqlite_url(url)
    return AsyncSQLiteStore(path, durability=durability)


def _open_redis(url: str) -> BalanceStore:
    store: BalanceStore = _redis().RedisStore(url)
    return store


def _open_async_redis(url: str) -> AsyncBalanceStore:
    store: AsyncBalanceStore = _redis().AsyncRedisStore(url)
    return store


def _open_postgres(url: str) -> BalanceStore:
    dsn, options = postgres_url(url)
    store: BalanceStore = _postgres().PostgresStore(dsn, **options)
    return store


def _open_async_postgres(url: str) -> AsyncBalanceStore:
    dsn, options = postgres_url(url)
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


register_store("memory", _open_memory, _open_async_memory)
register_store("sqlite", _open_sqlite, _open_async_sqlite)
register_store("redis", _open_redis, _open_async_redis)
register_store("rediss", _open_redis, _open_async_redis)
register_store("redis+cluster", _open_redis, _open_async_redis)  # Redis Cluster: the same stores
register_store("rediss+cluster", _open_redis, _open_async_redis)
register_store("postgresql", _open_postgres, _open_async_postgres)
register_store("postgres", _open_postgres, _open_async_postgres)

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
