"""Store URLs: reading the bundled stores' options, and printing any URL without its secrets.

``redact(url)`` is the one way a store URL reaches a message, a table or a
suggested command. It works on the text as written, never on what
``urllib.parse`` makes of it, so it also hides the password of a URL too
malformed to parse (``redis://u:pw@[x``) and never rewrites the rest.

A password is hidden where either reader of URLs would find one after the
first ``//``: Python's ``urlsplit`` (redis-py) takes the user info up to the
last ``@`` before the first ``/``, ``?`` or ``#``; libpq takes it up to the
first ``@`` before the first ``/``, ``?`` and ``#`` included. The value of a
``password=`` query option (libpq reads one) is hidden too.
"""

from __future__ import annotations

import re
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from creditmeter.exceptions import ConfigError

__all__ = ["memory_url", "passwords", "postgres_url", "redact", "sqlite_url"]

HIDDEN = "***"

# The "user:password@" after the first "//" (where the host part starts), as urlsplit reads
# it (the user name may hold an "@") and as libpq reads it (up to the first "@"; "?" and
# "#" do not end it); and a password= query option. Each pattern is (what comes before)
# (the password)(what comes after).
_PASSWORDS = (
    re.compile(r"^([^/]*//[^/?#:]*:)([^/?#]+)(@)"),
    re.compile(r"^([^/]*//[^/@:]*:)([^/@]+)(@)"),
    re.compile(r"([?&]password=)([^&]+)()"),
)


def passwords(url: str) -> list[str]:
    """Every secret ``redact`` hides in ``url``, as written there, in order, without repeats."""
    found = [match[2] for pattern in _PASSWORDS for match in pattern.finditer(url)]
    return list(dict.fromkeys(found))


def redact(url: str) -> str:
    """``url`` fit to print: every password in it replaced by ``***``, the rest as written."""
    for pattern in _PASSWORDS:
        url = pattern.sub(rf"\g<1>{HIDDEN}\g<3>", url)
    return url


# --- the bundled stores' URLs ---------------------------------------------------------


def memory_url(url: str) -> None:
    """Check that ``url`` is ``memory://`` (or ``memory:``): the memory store takes no option."""
    if url not in ("memory://", "memory:"):
        raise ConfigError(f"a memory store URL takes nothing after 'memory://', got {url!r}")


def sqlite_url(url: str) -> tuple[str, Literal["full", "normal"]]:
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


_POSTGRES_OWN = ("prefix", "schema", "lock_timeout")


def postgres_url(url: str) -> tuple[str, dict[str, Any]]:
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
