"""What a Redis store is given, checked: its URL, key prefix, lock times and timeouts.

No I/O here: a value that cannot work is a ``ConfigError`` naming it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from creditmeter.exceptions import ConfigError

__all__ = [
    "DEFAULT_PREFIX",
    "SOCKET_TIMEOUT",
    "check_lock_times",
    "check_prefix",
    "socket_timeout",
    "split_url",
]

DEFAULT_PREFIX = "creditmeter:"

# What a client the store creates waits at most for a connection and for each reply
# (redis-py 8 has the same defaults; before it, a server that stopped answering hung
# the caller for ever). The URL's own ?socket_timeout=... or an option given wins.
SOCKET_TIMEOUT = 5.0

_MAX_SECONDS = 86_400.0


def check_prefix(prefix: object) -> str:
    """Return the key prefix if it is a non-empty str without braces."""
    if not isinstance(prefix, str) or not prefix:
        raise ConfigError(f"the Redis key prefix must be a non-empty str, got {prefix!r}")
    if "{" in prefix or "}" in prefix:
        raise ConfigError(
            f"the Redis key prefix must not contain braces (they mark hash tags), got {prefix!r}"
        )
    return prefix


def split_url(url: object, prefix: str | None) -> tuple[str, str]:
    """Return the URL without a ``prefix=`` query option, and the prefix to use."""
    if not isinstance(url, str) or not url:
        raise ConfigError(f"a Redis URL must be a non-empty str, got {url!r}")
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unclosed [ in the host; the URL may hold a password
        raise ConfigError(f"not a valid Redis URL: {exc}") from None
    if (
        parts.scheme in ("redis", "rediss")
        and parts.path.strip("/")
        and not (parts.path.strip("/").isdigit() and parts.path.strip("/").isascii())
    ):
        # redis-py reads a path that is not a number as database 0, silently.
        raise ConfigError(f"the database in a Redis URL is a number, got {parts.path[1:]!r}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    given = [value for name, value in query if name == "prefix"]
    if given:
        if prefix is not None and given[-1] != prefix:
            raise ConfigError(
                f"the key prefix is given twice: {given[-1]!r} in the URL and {prefix!r}"
            )
        prefix = given[-1]
        query = [(name, value) for name, value in query if name != "prefix"]
        url = urlunsplit(parts._replace(query=urlencode(query)))
    return url, check_prefix(DEFAULT_PREFIX if prefix is None else prefix)


def check_lock_times(lock_lease: float, lock_wait: float) -> tuple[int, float, float]:
    """Return the lease in ms, the poll interval and the longest wait, checked."""
    for name, value in (("lock_lease", lock_lease), ("lock_wait", lock_wait)):
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 0 < value < _MAX_SECONDS
        ):
            raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
    lease_ms = max(int(lock_lease * 1000), 1)
    return lease_ms, min(0.25, max(lock_lease / 4, 0.01)), float(lock_wait)


def socket_timeout(pool: Any) -> float | None:
    """The reply timeout a client's connection pool gives its connections, if any."""
    value = getattr(pool, "connection_kwargs", {}).get("socket_timeout")
    return float(value) if isinstance(value, (int, float)) and value > 0 else None
