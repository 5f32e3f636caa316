"""Storage backends, and ``open_store(url)`` to pick one by URL.

``memory://`` and ``sqlite:///relative.db`` / ``sqlite:////absolute.db``
(SQLAlchemy's convention). An unknown scheme is a ``ConfigError`` naming the
known ones.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qs, unquote, urlsplit

from creditmeter.exceptions import ConfigError
from creditmeter.stores.base import AsyncBalanceStore, BalanceStore
from creditmeter.stores.memory import AsyncMemoryStore, MemoryStore
from creditmeter.stores.sqlite import AsyncSQLiteStore, Durability, SQLiteStore

__all__ = [
    "AsyncBalanceStore",
    "AsyncMemoryStore",
    "AsyncSQLiteStore",
    "BalanceStore",
    "MemoryStore",
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


# scheme -> (sync opener, async opener); later stores register here too.
_OPENERS: dict[str, tuple[Callable[[str], BalanceStore], Callable[[str], AsyncBalanceStore]]] = {
    "memory": (_open_memory, _open_async_memory),
    "sqlite": (_open_sqlite, _open_async_sqlite),
}


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
