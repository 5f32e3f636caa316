"""What a PostgreSQL store is given, checked before anything connects.

Table names (a prefix, an optional schema), the DSN or pool, pool sizes and
waits, and ``lock_timeout`` as the server setting. Every bad value is a
``ConfigError`` naming it.
"""

from __future__ import annotations

import re
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from creditmeter.exceptions import ConfigError

__all__ = ["DEFAULT_LOCK_TIMEOUT", "DEFAULT_PREFIX", "Options", "check_names"]

DEFAULT_PREFIX = "creditmeter_"
"""The table prefix used unless another is given: tables creditmeter_accounts, ..."""
_PREFIX = re.compile(r"[a-z_][a-z0-9_]{0,40}")
_SCHEMA = re.compile(r"[a-z_][a-z0-9_]{0,62}")

DEFAULT_LOCK_TIMEOUT = 30.0
"""Seconds a call waits for a user's lock held by another session before ``StoreError``."""
_MAX_LOCK_TIMEOUT = (2**31 - 1) / 1000  # the server's limit, in seconds


def check_names(prefix: object, schema: object) -> tuple[str, str | None]:
    """The table prefix and schema, if they are safe names; else ``ConfigError``."""
    if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
        raise ConfigError(
            "prefix must be 1-41 characters of a-z, 0-9 and _, not starting with a digit, "
            f"got {prefix!r}"
        )
    if schema is not None and (not isinstance(schema, str) or not _SCHEMA.fullmatch(schema)):
        raise ConfigError(
            "schema must be None or 1-63 characters of a-z, 0-9 and _, "
            f"not starting with a digit, got {schema!r}"
        )
    return prefix, schema


def _pool_settings(min_size: object, max_size: object, timeout: object) -> tuple[int, int, float]:
    if type(min_size) is not int or type(max_size) is not int or not 0 <= min_size <= max_size:
        raise ConfigError(
            f"need 0 <= min_size <= max_size (whole numbers), got {min_size!r}, {max_size!r}"
        )
    if max_size < 1:
        raise ConfigError("max_size must be at least 1")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return min_size, max_size, float(timeout)


def _lock_setting(lock_timeout: object) -> str | None:
    """``lock_timeout`` seconds as the server setting (``"250ms"``); ``None`` stays ``None``."""
    if lock_timeout is None:
        return None
    if (
        isinstance(lock_timeout, bool)
        or not isinstance(lock_timeout, (int, float))
        or not 0 < lock_timeout <= _MAX_LOCK_TIMEOUT  # also refuses NaN
    ):
        raise ConfigError(
            f"lock_timeout must be None or a number of seconds above 0 and at most "
            f"{_MAX_LOCK_TIMEOUT}, got {lock_timeout!r}"
        )
    return f"{max(1, round(lock_timeout * 1000))}ms"


class Options:
    """What both stores take: table names, connection settings, and their checks.

    The DSN reaches libpq as given. Beside it go autocommit,
    ``application_name`` (the argument, else "creditmeter" unless the DSN
    names one) and ``connect_timeout`` (10 s unless the DSN says).
    """

    def __init__(
        self,
        target: object,
        *,
        pool_class: type[Any],
        prefix: object,
        schema: object,
        create_schema: object,
        min_size: object,
        max_size: object,
        timeout: object,
        application_name: object,
        lock_timeout: object,
    ) -> None:
        self.prefix, self.schema = check_names(prefix, schema)
        if type(create_schema) is not bool:
            raise ConfigError(f"create_schema must be True or False, got {create_schema!r}")
        self.create_schema = create_schema
        self.lock_timeout = _lock_setting(lock_timeout)
        if isinstance(target, pool_class):
            self.dsn: str | None = None
            self.pool: Any = target
            return
        if not isinstance(target, str):
            raise ConfigError(
                f"a PostgreSQL store needs a DSN or a {pool_class.__name__}, "
                f"got {type(target).__name__}"
            )
        try:
            given = conninfo_to_dict(target)
        except psycopg.Error as exc:
            raise ConfigError(f"not a PostgreSQL DSN: {exc}") from None
        self.min_size, self.max_size, self.timeout = _pool_settings(min_size, max_size, timeout)
        if application_name is not None and not isinstance(application_name, str):
            raise ConfigError(f"application_name must be a str, got {application_name!r}")
        self.dsn = target
        self.pool = None
        self.kwargs: dict[str, Any] = {"autocommit": True}
        if application_name is not None or "application_name" not in given:
            self.kwargs["application_name"] = application_name or "creditmeter"
        if "connect_timeout" not in given:
            self.kwargs["connect_timeout"] = 10
        self.where = f"{given.get('host', 'localhost')}/{given.get('dbname', '')}"
