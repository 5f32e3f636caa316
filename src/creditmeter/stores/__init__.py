"""Storage backends, and ``open_store(url)`` to pick one by URL.

``memory://`` and ``sqlite:///relative.db`` / ``sqlite:////absolute.db``
(SQLAlchemy's convention). An unknown scheme is a ``ConfigError`` naming the
known ones.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import parse_qs, unquote, urlsplit

from creditmeter.exceptions import ConfigError
from creditmeter.stores.base import BalanceStore
from creditmeter.stores.memory import MemoryStore
from creditmeter.stores.sqlite import SQLiteStore

__all__ = ["BalanceStore", "MemoryStore", "SQLiteStore", "open_store"]


def _memory(url: str) -> BalanceStore:
    if url not in ("memory://", "memory:"):
        raise ConfigError(f"a memory store URL takes nothing after 'memory://', got {url!r}")
    return MemoryStore()


def _sqlite(url: str) -> BalanceStore:
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
    return SQLiteStore(path, durability="full" if durability == "full" else "normal")


_OPENERS: dict[str, Callable[[str], BalanceStore]] = {
    "memory": _memory,
    "sqlite": _sqlite,
}


def open_store(url: str) -> BalanceStore:
    """Open the store a URL names: ``memory://`` or ``sqlite:///path.db[?durability=normal]``."""
    if not isinstance(url, str):
        raise ConfigError(f"a store URL must be a str, got {type(url).__name__}")
    scheme = url.partition(":")[0].lower()
    opener = _OPENERS.get(scheme)
    if opener is None or ":" not in url:
        known = ", ".join(f"{name}://" for name in sorted(_OPENERS))
        raise ConfigError(f"unknown store URL {url!r}; known schemes: {known}")
    return opener(url)
