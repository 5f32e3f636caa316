"""Checking a caller's report arguments, and the cursors of ``entries()``.

Everything here is the same for both managers and does no I/O.

A cursor is opaque text: ``cm1.`` and URL-safe base64 of a JSON list
``[origin, query digest, position]``. The origin names the kind of store (or
``generic`` for the fallback) and the digest the query's filters, so that a
cursor passed with another query, or to another kind of store, is refused
with ``InvalidInput`` instead of reading from a position that means
something else there.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import cast

from creditmeter import _validate
from creditmeter.exceptions import InvalidInput
from creditmeter.models import EntryKind
from creditmeter.queries import (
    GROUP_KEYS,
    PERIODS,
    EntryQuery,
    GroupKey,
    UsageQuery,
)

__all__ = [
    "MAX_LIMIT",
    "decode_cursor",
    "encode_cursor",
    "entry_query",
    "page_size",
    "store_origin",
    "usage_query",
]

MAX_LIMIT = 10_000
"""The most entries (or user ids) one page may ask for."""

_PREFIX = "cm1."
_MAX_CURSOR = 4096


def _time(value: object, name: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise InvalidInput(f"{name} must be an aware datetime or None, got {value!r}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput(f"{name} must be an aware datetime (UTC), got naive {value!r}")
    return value.astimezone(timezone.utc)


def _range(since: object, until: object) -> tuple[datetime | None, datetime | None]:
    start, end = _time(since, "since"), _time(until, "until")
    if start is not None and end is not None and start >= end:
        raise InvalidInput(f"since must be before until, got {start} and {end}")
    return start, end


def _user(user: object) -> str | None:
    return None if user is None else _validate.user_id(user)


def usage_query(
    user: object, since: object, until: object, by: object, period: object
) -> UsageQuery:
    """Check ``usage()``'s arguments; ``by`` may be one key or a sequence of them."""
    keys: tuple[object, ...]
    if isinstance(by, str):
        keys = (by,)
    elif isinstance(by, (list, tuple)):
        keys = tuple(by)
    else:
        raise InvalidInput(f"by must be a key or a list of keys of {GROUP_KEYS}, got {by!r}")
    for key in keys:
        if key not in GROUP_KEYS:
            raise InvalidInput(f"by keys must be among {', '.join(GROUP_KEYS)}, got {key!r}")
    if len(set(keys)) != len(keys):
        raise InvalidInput(f"by repeats a key: {keys!r}")
    if period is not None and period not in PERIODS:
        raise InvalidInput(f"period must be one of {', '.join(PERIODS)} or None, got {period!r}")
    if "period" in keys and period is None:
        raise InvalidInput('by "period" needs period= ("hour", "day", "week" or "month")')
    if period is not None and "period" not in keys:
        raise InvalidInput('period= splits rows by period: add "period" to by')
    start, end = _range(since, until)
    return UsageQuery(_user(user), start, end, cast("tuple[GroupKey, ...]", keys), period)


def entry_query(user: object, since: object, until: object, kinds: object) -> EntryQuery:
    """Check ``entries()``'s filters; ``kinds`` is ``None`` or entry kinds (or their names)."""
    start, end = _range(since, until)
    chosen: frozenset[EntryKind] | None = None
    if kinds is not None:
        if isinstance(kinds, (str, EntryKind)) or not isinstance(kinds, Iterable):
            kinds = (kinds,)
        known = {member.value: member for member in EntryKind}
        found: set[EntryKind] = set()
        for kind in cast("Iterable[object]", kinds):
            member = known.get(kind) if isinstance(kind, str) else None
            if member is None:
                raise InvalidInput(f"kinds must be among {', '.join(known)}, got {kind!r}")
            found.add(member)
        if not found:
            raise InvalidInput("kinds must name at least one kind, or be None for all")
        chosen = frozenset(found)
    return EntryQuery(_user(user), start, end, chosen)


def page_size(value: object, name: str = "limit") -> int:
    """Check a page size: an int in 1..10,000."""
    if type(value) is not int or not 1 <= value <= MAX_LIMIT:
        raise InvalidInput(f"{name} must be an int in 1..{MAX_LIMIT:,}, got {value!r}")
    return value


def store_origin(store: object) -> str:
    """What a store's cursors are tagged with: its class, the same for its async twin."""
    name = type(store).__name__
    return name.removeprefix("Async")


def _digest(query: EntryQuery) -> str:
    kinds = None if query.kinds is None else sorted(kind.value for kind in query.kinds)
    text = json.dumps(
        [
            query.user_id,
            None if query.since is None else query.since.isoformat(),
            None if query.until is None else query.until.isoformat(),
            kinds,
        ]
    )
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def encode_cursor(origin: str, query: EntryQuery, position: str) -> str:
    """The cursor of the page that starts at ``position`` of a store of ``origin``."""
    text = json.dumps([origin, _digest(query), position], separators=(",", ":"))
    return _PREFIX + base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: object, origin: str, query: EntryQuery) -> str | None:
    """The store position in ``cursor`` (``None``: none given), if it fits this store and query."""
    if cursor is None:
        return None
    if type(cursor) is not str or not cursor.startswith(_PREFIX) or len(cursor) > _MAX_CURSOR:
        raise InvalidInput(f"after must be a cursor from EntryPage.next, got {cursor!r:.80}")
    body = cursor[len(_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        decoded = json.loads(raw)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"after is not a cursor from EntryPage.next: {cursor!r:.80}") from None
    if (
        not isinstance(decoded, list)
        or len(decoded) != 3  # origin, digest, position
        or not all(isinstance(part, str) for part in decoded)
    ):
        raise InvalidInput(f"after is not a cursor from EntryPage.next: {cursor!r:.80}")
    found_origin, digest, position = decoded
    if found_origin != origin:
        raise InvalidInput(f"after is a cursor of another kind of store ({found_origin})")
    if digest != _digest(query):
        raise InvalidInput(
            "after is a cursor of another query: pass the same user, since, until and kinds"
        )
    return cast("str", position)
