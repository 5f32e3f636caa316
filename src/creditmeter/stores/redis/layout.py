"""Where a Redis store keeps each user's data, and what its scripts are sent and answer.

No I/O here: both stores build their keys, their scripts' KEYS and ARGV, and
the meaning of the scripts' replies with ``Layout``.

Key layout, for a key prefix ``P`` (default ``creditmeter:``) and a user whose
id's UTF-8 bytes are ``H`` in hex::

    P{uH}:account      hash: v = version, d = account JSON, t = token of the commit that wrote it
    P{uH}:ledger       list: entry JSON, oldest first
    P{uH}:requests     hash: request id -> entry JSON
    P{uH}:lock         string: the token of the writer holding the user's lock (with a lease)
    P{uH}:lock-queue   list: tokens of the writers waiting for it, in order
    P{uH}:wake:<tok>   list: where a waiting writer is handed the lock and the account
    P{uH}:alive:<tok>  string: a waiting writer's heartbeat, which expires unless renewed

and the keys of the whole store, outside every user's slot (``GlobalKeys``, the
one place that names them)::

    Pusers             set: the user ids (as given) of every account
    Pusers-sorted      sorted set, every score 0: the same ids, for paging them in order
    Plog               stream: one item per ledger entry, in commit order (u = user id,
                       i = the entry's index in that user's ledger list)
    Plog-skew          hash: ahead, behind = how far (ms) an entry's time was seen ahead
                       of, or behind, the time of its stream id

The ``{uH}`` hash tag puts every key of a user in one Redis Cluster slot, and
hex leaves nothing of the id (``:``, ``{``, ``}``, quotes, ...) to collide with
or escape into another key; the tag is never empty, even for ``""``. The prefix
may not contain braces, so the tag is always the first brace pair. The lock
keys exist only while writers contend.

The log is what reports of every user read (``scan_entries``, ``sum_usage``).
The commit script appends to it in the same run that appends to the ledger,
so its order is commit order, and its items refer to ledger entries rather
than copy them. Measured with ``MEMORY USAGE`` over 100,000 entries (priced
charges, 10-character user ids): an item takes 31 bytes, the ledger's copy of
the entry 320, and a copy of the JSON in the stream would take about 400; so
the log adds a tenth to the ledger's memory instead of more than doubling it.
Reading costs one ``LRANGE`` per user of a page (a page's entries of one user
are consecutive in that user's ledger), pipelined; ``log_page.lua`` hands a
page of items over as one string, which redis-py parses far faster than an
``XRANGE`` reply. Ledger lists must therefore stay append-only.

Stream ids carry the Redis server's clock, entries their writer's (``at``).
Each commit records in ``Plog-skew`` the most an entry's ``at`` ran ahead of
its id's time and the most it lagged behind it (clocks apart, a commit
retried or queued), so the entries of ``since <= at < until`` all lie between
the ids of ``since - ahead`` and ``until + behind``: reads narrow the log to
those ids and then filter by ``at`` exactly, and no entry is missed whatever
the clocks did. A writer whose clock is far off only widens later reads (for
good: the skew never shrinks, and must not be lowered by hand).

Entries committed before the log existed (by an earlier version) are not in
it: reports of every user start at the upgrade, while reports of one user
read that user's ledger and see them all. ``Pusers-sorted`` is built once from
``Pusers`` when the set holds more ids (data from before it existed).

On Redis Cluster (``Layout(..., cluster=True)``; see ``cluster``) each of the
``cluster.SHARDS`` shards has its own global keys, ``P{<shard tag>}:users`` and
so on, and a user's keys are ``P{<tag of the user's shard>}:u<hex>:account``
and so on: a commit writes one slot.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, NamedTuple

from creditmeter._ids import new_id
from creditmeter.exceptions import DuplicateRequest, InvalidInput, StoreError, VersionConflict
from creditmeter.models import Account, LedgerEntry
from creditmeter.serde import (
    SCHEMA_VERSION,
    account_from_json,
    account_split,
    account_to_json,
    entry_from_json,
    entry_split,
    entry_to_json,
)
from creditmeter.stores.redis.cluster import shard_of, shard_tags
from creditmeter.stores.redis.options import check_lock_times

__all__ = [
    "DATA",
    "NO_TOKEN",
    "GlobalKeys",
    "Held",
    "Keys",
    "Layout",
    "LogPage",
    "LogRange",
    "UsageValues",
    "at_ms",
    "usage_values",
]

DATA = b"d"  # the field of the account hash that holds the account JSON
NO_TOKEN = b""  # a commit made without holding the user's lock

_NO_VERSION = b""
_KEY_CACHE_LIMIT = 4096
_MAX_RANGE = 2**62  # LRANGE takes a signed 64-bit index
_CONFLICT = 1
_DUPLICATE = 2
_HELD_OFF = 3  # the commit met another writer's lock, from the version stored
_TAKEN = 1
_TICK = 0.1  # how late Redis may time out a BLPOP: its timer runs at hz = 10 by default
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MS = timedelta(milliseconds=1)
_MAX_U64 = 2**64 - 1  # a stream id is two unsigned 64-bit numbers
_STREAM_ID = re.compile(r"\A([0-9]{1,20})-([0-9]{1,20})\Z")
_INDEX = re.compile(r"\A[0-9]{1,19}\Z")  # a ledger index (at most _MAX_RANGE)
_NOT_A_POSITION = "after is not a cursor of this store"
_CHARGE = "charge"  # EntryKind.CHARGE's value: what rules.counts_as_usage counts

UsageValues = tuple[
    str, str, datetime, Decimal, "Decimal | None", "str | None", "tuple[int, int, int, int] | None"
]
"""A stored entry's values as ``rules.Tally.add_values`` takes them."""


class GlobalKeys(NamedTuple):
    """The keys of the whole store (not of one user): the one place that names them.

    On one server, one set for the whole store; on Redis Cluster, one set
    per shard, under the shard's hash tag (``Layout.shards``).
    """

    users: bytes  # set of user ids
    sorted_users: bytes  # sorted set of the same ids, score 0: paged BYLEX
    log: bytes  # stream: (user id, ledger index) of every entry, in commit order
    skew: bytes  # hash: ahead, behind (ms) between entries' times and their stream ids'


class LogRange(NamedTuple):
    """The stream ids a log read covers: ``first`` ``(ms, seq)`` to ``last`` ms, inclusive."""

    first: tuple[int, int]
    last: int | None  # None: to the end of the log

    def start(self) -> bytes:
        """XRANGE's start."""
        return b"%d-%d" % self.first

    def end(self) -> bytes:
        """XRANGE's end (every sequence number of the last millisecond)."""
        return b"+" if self.last is None else b"%d" % self.last

    def after(self, stream_id: str) -> LogRange | None:
        """The rest of the range, past ``stream_id`` (one the range held); None if nothing is."""
        following = _following(_stream_id(stream_id, StoreError))
        if following is None or (self.last is not None and following[0] > self.last):
            return None
        return LogRange(following, self.last)


def at_ms(at: datetime) -> int:
    """A time as whole milliseconds since the epoch, rounded down (exact: no float)."""
    return (at - _EPOCH) // _MS


def _stream_id(text: str, error: type[Exception]) -> tuple[int, int]:
    match = _STREAM_ID.match(text)
    if match is None:
        raise error(_NOT_A_POSITION if error is InvalidInput else f"bad stream id {text!r}")
    ms, seq = int(match[1]), int(match[2])
    if ms > _MAX_U64 or seq > _MAX_U64:
        raise error(_NOT_A_POSITION if error is InvalidInput else f"bad stream id {text!r}")
    return ms, seq


def _following(stream_id: tuple[int, int]) -> tuple[int, int] | None:
    ms, seq = stream_id
    if seq < _MAX_U64:
        return ms, seq + 1
    if ms < _MAX_U64:
        return ms + 1, 0
    return None


class Keys(NamedTuple):
    """Every key of one user; all share the hash tag ``{u<hex of the id>}``."""

    account: bytes
    ledger: bytes
    requests: bytes
    lock: bytes
    queue: bytes
    wake: bytes  # the prefix of each queued writer's wake-up list: wake + token
    alive: bytes  # the prefix of each queued writer's heartbeat: alive + token


class Held:
    """A user's lock held by one ``exclusive()`` block, and the account read when it was taken."""

    __slots__ = ("account", "pid", "released", "token")

    def __init__(self, token: bytes, data: bytes | str | None) -> None:
        self.token = token
        self.account = account_from_json(data) if data else None
        self.released = False  # True once a commit has passed the lock on
        self.pid = os.getpid()  # a forked child never lets go of its parent's lock


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Layout:
    """The keys, script arguments and replies of one store (one prefix, one lock lease)."""

    def __init__(
        self, prefix: str, lock_lease: float, lock_wait: float, *, cluster: bool = False
    ) -> None:
        self.prefix = prefix
        self._prefix = prefix.encode()
        self.cluster = cluster
        # On Redis Cluster, one set of global keys per shard, under the shard's hash tag,
        # and each user's keys under the tag of the user's shard (see ``cluster``).
        self._tags = [b"{%s}:" % tag for tag in shard_tags()] if cluster else [b""]
        self.shards = [
            GlobalKeys(
                self._prefix + tag + b"users",
                self._prefix + tag + b"users-sorted",
                self._prefix + tag + b"log",
                self._prefix + tag + b"log-skew",
            )
            for tag in self._tags
        ]
        self.globals = self.shards[0]  # the only one, on one Redis server
        self.users_key = self.globals.users
        self.lease_ms, self.poll, self.wait = check_lock_times(lock_lease, lock_wait)
        self._lease = b"%d" % self.lease_ms
        # A queued writer renews its heartbeat every poll; one not heard of for a lease
        # is skipped at handover, so writers that died queued cost one lease in all. A
        # poll lasts up to 0.1 s more than asked: Redis times out a BLPOP on its 10 Hz
        # timer (hz 10, the default); a heartbeat outlives two polls.
        self._heartbeat = b"%d" % max(self.lease_ms, math.ceil((self.poll + _TICK) * 2000))
        self._keys: dict[str, Keys] = {}

    def fit_poll(self, socket_timeout: float | None) -> None:
        """Block on a wake-up list for well under the client's reply timeout, or it expires."""
        if socket_timeout is not None:
            self.poll = max(0.01, min(self.poll, (socket_timeout - _TICK) / 2))

    def keys(self, user_id: str) -> Keys:
        """Every key of a user (one hash tag, so one Redis Cluster slot)."""
        found = self._keys.get(user_id)
        if found is not None:
            return found
        try:
            encoded = user_id.encode()
        except (UnicodeEncodeError, AttributeError) as exc:
            raise InvalidInput(f"user id {user_id!r} is not a str of valid Unicode") from exc
        if self.cluster:
            base = b"%s%su%s:" % (
                self._prefix,
                self._tags[shard_of(user_id)],
                encoded.hex().encode(),
            )
        else:
            base = b"%s{u%s}:" % (self._prefix, encoded.hex().encode())
        keys = Keys(
            base + b"account",
            base + b"ledger",
            base + b"requests",
            base + b"lock",
            base + b"lock-queue",
            base + b"wake:",
            base + b"alive:",
        )
        if len(self._keys) >= _KEY_CACHE_LIMIT:
            self._keys.clear()
        self._keys[user_id] = keys
        return keys

    def globals_of(self, user_id: str) -> GlobalKeys:
        """The global keys a commit of ``user_id`` writes (its shard's, on Redis Cluster)."""
        return self.shards[shard_of(user_id)] if self.cluster else self.globals

    def commit_call(
        self,
        account: Account,
        entries: Sequence[LedgerEntry],
        expected_version: int | None,
        lock_token: bytes = NO_TOKEN,
    ) -> tuple[list[bytes], list[bytes]]:
        """KEYS and ARGV of the commit script."""
        user_id = account.user_id
        found = self.globals_of(user_id)
        keys = [*self.keys(user_id), found.log, found.skew]
        if expected_version is None:
            keys.append(found.users)
            keys.append(found.sorted_users)
            expected = _NO_VERSION
        else:
            expected = b"%d" % expected_version
        args = [
            expected,
            b"%d" % account.version,
            account_to_json(account).encode(),
            new_id().encode(),
            user_id.encode(),
            lock_token,
            self._lease,
        ]
        for entry in entries:
            request_id = entry.request_id
            args.append(b"" if request_id is None else b"=" + request_id.encode())
            args.append(entry_to_json(entry).encode())
            args.append(b"%d" % at_ms(entry.at))
        return keys, args

    @staticmethod
    def commit_outcome(
        reply: Any,
        account: Account,
        entries: Sequence[LedgerEntry],
        expected_version: int | None,
    ) -> None:
        """Raise what a non-zero reply of the commit script means."""
        if isinstance(reply, list) and reply:
            code = reply[0]
            if code in (_CONFLICT, _HELD_OFF):
                current = (
                    account_from_json(reply[1], user_id=account.user_id) if len(reply) > 1 else None
                )
                raise VersionConflict(account.user_id, expected=expected_version, current=current)
            if code == _DUPLICATE and len(reply) == 3:
                request_id = entries[int(reply[1]) - 1].request_id
                if request_id is not None:
                    raise DuplicateRequest(
                        account.user_id,
                        request_id,
                        entry=entry_from_json(reply[2], user_id=account.user_id),
                    )
        raise StoreError(f"unexpected reply from the Redis commit script: {reply!r}")

    def delta_call(
        self,
        account: Account,
        entry: LedgerEntry,
        floor: Decimal | None,
        lock_token: bytes = NO_TOKEN,
    ) -> tuple[list[bytes], list[bytes]]:
        """KEYS and ARGV of the delta script (see ``DeltaStore.commit_delta``)."""
        user_id = account.user_id
        found = self.globals_of(user_id)
        a, b, c, updated, d = account_split(account)
        ea, eb = entry_split(entry)
        request_id = entry.request_id
        return [*self.keys(user_id), found.log, found.skew], [
            a.encode(),
            b.encode(),
            c.encode(),
            d.encode(),
            updated.encode(),
            str(entry.amount).encode(),
            b"" if floor is None else str(floor).encode(),
            new_id().encode(),
            user_id.encode(),
            lock_token,
            self._lease,
            b"" if request_id is None else b"=" + request_id.encode(),
            ea.encode(),
            eb.encode(),
            b"%d" % at_ms(entry.at),
        ]

    @staticmethod
    def delta_outcome(
        reply: Any, account: Account, entry: LedgerEntry
    ) -> tuple[Decimal, int, datetime]:
        """What the delta script wrote, ``(balance, version, updated_at)``; or raise what it met."""
        user_id = account.user_id
        if isinstance(reply, list) and reply:
            code = reply[0]
            if code == 0 and len(reply) == 4:
                try:
                    updated = datetime.fromisoformat(_text(reply[3])).astimezone(timezone.utc)
                    return Decimal(_text(reply[1])), int(reply[2]), updated
                except (ArithmeticError, ValueError):
                    pass
            elif code in (_CONFLICT, _HELD_OFF):
                current = account_from_json(reply[1], user_id=user_id) if len(reply) > 1 else None
                raise VersionConflict(user_id, expected=account.version - 1, current=current)
            elif code == _DUPLICATE and len(reply) == 3 and entry.request_id is not None:
                first = entry_from_json(reply[2], user_id=user_id)
                raise DuplicateRequest(user_id, entry.request_id, entry=first)
        raise StoreError(f"unexpected reply from the Redis delta script: {reply!r}")

    @staticmethod
    def written(reply: Any) -> bool:
        """Tell whether a reply of the commit or delta script says it wrote."""
        return reply == 0 or (isinstance(reply, list) and bool(reply) and reply[0] == 0)

    @staticmethod
    def held_off(reply: Any) -> bool:
        """Tell whether a commit was held off by another writer's lock (to be sent again)."""
        return isinstance(reply, list) and bool(reply) and reply[0] == _HELD_OFF

    # The lock behind exclusive(): three scripts' KEYS and ARGV.

    def acquire_call(self, keys: Keys, token: bytes) -> tuple[list[bytes], list[bytes]]:
        """KEYS and ARGV of the acquire script, for the writer ``token``."""
        return (
            [keys.lock, keys.queue, keys.account, keys.alive + token],
            [token, self._lease, self._heartbeat],
        )

    def recheck_call(self, keys: Keys, token: bytes) -> tuple[list[bytes], list[bytes]]:
        """KEYS and ARGV of the recheck script, for the writer ``token``."""
        return (
            [keys.lock, keys.queue, keys.account, keys.wake + token, keys.alive + token],
            [token, self._lease, self._heartbeat],
        )

    def release_call(self, keys: Keys, token: bytes) -> tuple[list[bytes], list[bytes]]:
        """KEYS and ARGV of the release script, for the writer ``token``."""
        return (
            [
                keys.lock,
                keys.queue,
                keys.account,
                keys.wake,
                keys.wake + token,
                keys.alive,
                keys.alive + token,
            ],
            [token, self._lease],
        )

    @staticmethod
    def taken(reply: Any, token: bytes) -> Held | None:
        """The lock taken, from an acquire or recheck reply; None while queued."""
        if not isinstance(reply, list) or not reply:
            raise StoreError(f"unexpected reply from the Redis lock script: {reply!r}")
        if reply[0] != _TAKEN:
            return None
        return Held(token, reply[1] if len(reply) > 1 else None)

    @staticmethod
    def tail(limit: int | None) -> tuple[int, int] | None:
        """The LRANGE bounds of the newest ``limit`` entries; None when there are none to read."""
        if limit is None:
            return 0, -1
        if limit <= 0:
            return None
        return -min(limit, _MAX_RANGE), -1

    @staticmethod
    def user_ids(members: set[bytes | str]) -> list[str]:
        """The users set's members as sorted user ids."""
        try:
            return sorted(_text(member) for member in members)
        except UnicodeDecodeError as exc:
            raise StoreError(
                f"the Redis users set holds a member that is not UTF-8: {exc}"
            ) from exc

    # --- reports: the log, the ledgers read in pages, the sorted user ids -------------

    @staticmethod
    def log_start(after: str | None) -> tuple[int, int] | None:
        """The first stream id a read past position ``after`` may hold (None: none can follow).

        A malformed position raises ``InvalidInput``.
        """
        if after is None:
            return 0, 0
        return _following(_stream_id(after, InvalidInput))

    @staticmethod
    def log_range(
        first: tuple[int, int] | None,
        since: datetime | None,
        until: datetime | None,
        skew: Sequence[bytes | str | None] | None,
    ) -> LogRange | None:
        """The stream ids to read from ``first`` on for ``[since, until)``; None: none.

        ``skew`` is the ``Plog-skew`` hash's (ahead, behind); an entry's id
        lies within them of its time, so the range holds every entry whose
        time is in ``[since, until)``, and a few more (filter them by time).
        """
        if first is None:
            return None
        ahead, behind = Layout._skew(skew)
        if since is not None:
            first = max(first, (max(at_ms(since) - ahead, 0), 0))
        last = None
        if until is not None:
            last = at_ms(until) + behind
            if last < first[0]:
                return None
        return LogRange(first, last)

    @staticmethod
    def _skew(reply: Sequence[bytes | str | None] | None) -> tuple[int, int]:
        if reply is None:
            return 0, 0
        try:
            ahead, behind = (0 if value is None else int(value) for value in reply)
        except ValueError as exc:
            raise StoreError(f"the Redis log's skew is corrupt: {reply!r}") from exc
        return max(ahead, 0), max(behind, 0)

    @staticmethod
    def ledger_index(after: str | None) -> int:
        """The ledger index a one-user scan starts at, from its position; InvalidInput if bad."""
        if after is None:
            return 0
        if _INDEX.match(after) is None or int(after) > _MAX_RANGE:
            raise InvalidInput(_NOT_A_POSITION)
        return int(after)

    @staticmethod
    def lex_after(after: str | None) -> bytes:
        """ZRANGEBYLEX's start for the user ids after ``after`` (UTF-8 sorts as code points)."""
        if after is None:
            return b"-"
        try:
            return b"(" + after.encode()
        except (UnicodeEncodeError, AttributeError) as exc:
            raise InvalidInput(f"after {after!r} is not a str of valid Unicode") from exc

    @staticmethod
    def user_page(members: Iterable[bytes | str]) -> list[str]:
        """The members of a ZRANGEBYLEX of the sorted user ids, as user ids."""
        try:
            return [_text(member) for member in members]
        except UnicodeDecodeError as exc:
            raise StoreError(
                f"the Redis sorted users hold a member that is not UTF-8: {exc}"
            ) from exc


class LogPage:
    """Items read from the log, and the ledger ranges (one per user) that hold their entries.

    Read from replies of ``log_page.lua`` (consecutive reads: the page is a
    stretch of the log). A page's entries of one user are consecutive in that
    user's ledger (the log and the ledger are appended to in the same
    script), so one ``LRANGE`` per user reads them.
    """

    __slots__ = ("ids", "indexes", "spans", "users")

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.users: list[str] = []
        self.indexes: list[int] = []
        self.spans: dict[str, list[int]] = {}  # user id -> [lowest index, highest index]

    def add(self, reply: bytes | str) -> int:
        """Add the items of a reply of ``log_page.lua`` (the next ones in the log); their count."""
        text = reply.encode() if isinstance(reply, str) else reply  # a client that decodes
        find = text.index
        position, end = 0, len(text)
        ids, users, indexes, spans = self.ids, self.users, self.indexes, self.spans
        before = len(ids)
        try:
            while position < end:
                after_id = find(b" ", position)
                after_index = find(b" ", after_id + 1)
                after_size = find(b" ", after_index + 1)
                user_end = after_size + 1 + int(text[after_index + 1 : after_size])
                if text[user_end : user_end + 1] != b" ":
                    raise ValueError("a user id overruns its item")
                index = int(text[after_id + 1 : after_index])
                user_id = text[after_size + 1 : user_end].decode()
                ids.append(text[position:after_id].decode())
                users.append(user_id)
                indexes.append(index)
                span = spans.get(user_id)
                if span is None:
                    spans[user_id] = [index, index]
                elif index > span[1]:
                    span[1] = index
                elif index < span[0]:
                    span[0] = index
                position = user_end + 1
        except ValueError as exc:  # UnicodeDecodeError is one
            raise StoreError(f"the Redis log holds a malformed item: {exc}") from exc
        return len(ids) - before

    def append(self, stream_id: str, user_id: str, index: int) -> None:
        """Add one item (the next one of a merged read of the shards' logs)."""
        self.ids.append(stream_id)
        self.users.append(user_id)
        self.indexes.append(index)
        span = self.spans.get(user_id)
        if span is None:
            self.spans[user_id] = [index, index]
        else:
            span[0], span[1] = min(span[0], index), max(span[1], index)

    def reads(self, layout: Layout) -> list[tuple[bytes, int, int]]:
        """The LRANGEs (ledger key, first, last) that read the page's entries, one per user."""
        return [(layout.keys(user).ledger, low, high) for user, (low, high) in self.spans.items()]

    def texts(self, rows: Sequence[Sequence[bytes | str]]) -> list[bytes | str]:
        """Each item's entry JSON, from the replies of ``reads()`` (in its order)."""
        found = dict(zip(self.spans, rows, strict=True))
        texts: list[bytes | str] = []
        for user, index in zip(self.users, self.indexes, strict=True):
            low = self.spans[user][0]
            got = found[user]
            if index - low >= len(got):
                raise StoreError(
                    f"the Redis log refers to entry {index} of user {user!r}, "
                    "which is not in that user's ledger"
                )
            texts.append(got[index - low])
        return texts


def usage_values(text: bytes | str, user_id: str) -> UsageValues | None:
    """A stored entry's values for ``Tally.add_values``; None if it is not a charge.

    Reads the JSON ``entry_to_json`` wrote without building a ``LedgerEntry``
    (sums read many): the same fields, the same exact values. ``user_id``
    names the ledger in an error.
    """
    try:
        data = _decode(text if isinstance(text, str) else text.decode())
        if data["schema"] != SCHEMA_VERSION:
            msg = f"unknown schema {data['schema']!r}"
            raise ValueError(msg)
        kind = data["kind"]
        if kind != _CHARGE:  # only charges are usage: skip the rest unparsed
            return None
        at = datetime.fromisoformat(data["at"])
        if at.tzinfo is not timezone.utc:  # always UTC as written; else as entry_from_json reads
            if at.tzinfo is None:
                msg = f"expected an aware datetime, got {data['at']!r}"
                raise ValueError(msg)
            at = at.astimezone(timezone.utc)
        cost = data.get("cost")
        usage = data.get("usage")
        values: UsageValues = (
            data["user_id"],
            kind,
            at,
            _decimal(data["amount"]),
            None if cost is None else _decimal(cost),
            data.get("model"),
            None
            if usage is None
            else (
                _count(usage.get("input", 0)),
                _count(usage.get("output", 0)),
                _count(usage.get("cache_write", 0)),
                _count(usage.get("cache_read", 0)),
            ),
        )
    except Exception as exc:
        raise StoreError(f"stored LedgerEntry of user {user_id!r} is corrupt: {exc!r}") from exc
    return values


_decode = json.JSONDecoder().decode  # str in: json.loads of bytes costs a third more


def _decimal(value: Any) -> Decimal:
    if type(value) is not str:
        msg = f"expected a decimal string, got {value!r}"
        raise TypeError(msg)
    result = Decimal(value)
    if not result.is_finite():
        msg = f"expected a finite decimal, got {value!r}"
        raise ValueError(msg)
    return result


def _count(value: Any) -> int:
    if type(value) is not int or value < 0:
        msg = f"expected a token count, got {value!r}"
        raise ValueError(msg)
    return value
