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
    Pusers             set: the user ids (as given) of every account

The ``{uH}`` hash tag puts every key of a user in one Redis Cluster slot, and
hex leaves nothing of the id (``:``, ``{``, ``}``, quotes, ...) to collide with
or escape into another key; the tag is never empty, even for ``""``. The prefix
may not contain braces, so the tag is always the first brace pair. The lock
keys exist only while writers contend.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

from creditmeter._ids import new_id
from creditmeter.exceptions import DuplicateRequest, InvalidInput, StoreError, VersionConflict
from creditmeter.models import Account, LedgerEntry
from creditmeter.serde import account_from_json, account_to_json, entry_from_json, entry_to_json
from creditmeter.stores.redis.options import check_lock_times

__all__ = ["DATA", "NO_TOKEN", "Held", "Keys", "Layout"]

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

    def __init__(self, prefix: str, lock_lease: float, lock_wait: float) -> None:
        self.prefix = prefix
        self._prefix = prefix.encode()
        self.users_key = self._prefix + b"users"
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

    def commit_call(
        self,
        account: Account,
        entries: Sequence[LedgerEntry],
        expected_version: int | None,
        lock_token: bytes = NO_TOKEN,
    ) -> tuple[list[bytes], list[bytes]]:
        """KEYS and ARGV of the commit script."""
        user_id = account.user_id
        keys = list(self.keys(user_id))
        if expected_version is None:
            keys.append(self.users_key)
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
