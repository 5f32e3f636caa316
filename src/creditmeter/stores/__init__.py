"""Storage backends, and ``open_store(url)`` to pick one by URL.

``memory://``, ``sqlite:///relative.db`` / ``sqlite:////absolute.db``
(SQLAlchemy's convention; ``?durability=normal``; the path is percent-decoded,
so ``#``, ``?`` and ``%`` in a file name are ``%23``, ``%3F``, ``%25``),
``redis://host:6379/0[?prefix=...]`` and
``postgresql://user@host/db[?prefix=...&schema=...]``. An unknown scheme is a
``ConfigError`` naming the known ones. The Redis and PostgreSQL classes are
imported only when used: their drivers are the ``[redis]`` and ``[postgres]``
extras.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

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
    """The file path and durability of ``sqlite:///path[?durability=full|normal]``.

    The path is percent-decoded and otherwise taken literally: a ``#``, ``?``
    or ``%`` in a file name is written ``%23``, ``%3F``, ``%25``. Anything
    else is a ``ConfigError``, never a silently different file: a fragment
    (``#``), an empty query, an option without ``=`` or with an empty value,
    a repeated or unknown option, a raw control character, ``%00``, or a
    percent-encoding that is not UTF-8. The value of ``durability`` is
    case-insensitive.
    """
    prefix = "sqlite:///"
    if url[: len(prefix)].lower() != prefix:
        raise ConfigError(
            "an SQLite URL is sqlite:///relative/path.db or sqlite:////absolute/path.db, "
            f"got {url!r}"
        )
    rest = url[len(prefix) :]  # the third slash only separates the (empty) host
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in rest):
        raise ConfigError(f"a control character in SQLite URL {url!r}: percent-encode it")
    if "#" in rest:
        raise ConfigError(
            f"an SQLite URL has no fragment, got {url!r}; write a '#' in a file name as %23"
        )
    raw_path, has_query, query = rest.partition("?")
    try:
        path = unquote(raw_path, errors="strict")
    except UnicodeDecodeError:
        raise ConfigError(f"SQLite URL {url!r}: a percent-encoding that is not UTF-8") from None
    if not path or "\x00" in path:
        raise ConfigError(f"an SQLite URL needs a file path (and no NUL), got {url!r}")
    durability = "full"
    seen: set[str] = set()
    for field in query.split("&") if has_query else ():
        raw_name, has_value, raw_value = field.partition("=")
        name, value = unquote(raw_name), unquote(raw_value)
        if name != "durability" or not has_value:
            raise ConfigError(
                f"unknown SQLite URL option {field!r} in {url!r}: the one option is "
                "durability=full|normal, and a '?' in a file name is written %3F"
            )
        if name in seen:
            raise ConfigError(f"SQLite URL option {name!r} given twice in {url!r}")
        seen.add(name)
        durability = value.lower()
        if durability not in ("full", "normal"):
            raise ConfigError(f"durability must be 'full' or 'normal', got {value!r}")
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


_POSTGRES_OWN = ("prefix", "schema", "lock_timeout")


def _postgres_options(url: str) -> tuple[str, dict[str, Any]]:
    """Split creditmeter's own options off a PostgreSQL URL; the rest goes to libpq as written.

    Ours are ``prefix``, ``schema`` and ``lock_timeout`` (seconds). Every other
    query option keeps its percent-encoding, so libpq decodes it exactly once
    (``options=-c%20lock_timeout%3D5s``, ``application_name=a%26b``).
    """
    try:
        urlsplit(url)
    except ValueError as exc:  # e.g. an unclosed [ in the host; the URL may hold a password
        raise ConfigError(f"not a valid PostgreSQL URL: {exc}") from None
    base, _, query = url.partition("?")  # libpq reads a "#" as part of a value
    kept: list[str] = []
    options: dict[str, Any] = {}
    for piece in query.split("&"):
        raw_name, equals, raw_value = piece.partition("=")
        name = unquote(raw_name)
        if name not in _POSTGRES_OWN:
            if piece:
                kept.append(piece)
            continue
        if not equals:
            raise ConfigError(f"the PostgreSQL URL option {name!r} needs a value")
        if name in options:
            raise ConfigError(f"the PostgreSQL URL option {name!r} is given twice")
        options[name] = unquote(raw_value)
    if "lock_timeout" in options:
        try:
            options["lock_timeout"] = float(options["lock_timeout"])
        except ValueError:
            raise ConfigError(
                f"lock_timeout must be a number of seconds, got {options['lock_timeout']!r}"
            ) from None
    return base + ("?" + "&".join(kept) if kept else ""), options


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
        password = urlsplit(url).password
    except ValueError:  # unparsable: hide whatever stands between "user:" and "@"
        return re.sub(r"(//[^/@:]*:)[^@/]*@", r"\1***@", url, count=1)
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
