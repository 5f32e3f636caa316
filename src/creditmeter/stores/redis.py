"""Balances in Redis, shared by every process and host that reaches the server.

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

A commit is one Lua script (``COMMIT_SCRIPT``), sent with EVALSHA and loaded
again if the server answers NOSCRIPT: it checks the request ids, compares the
stored version with the expected one, then writes the account, appends the
ledger entries, records the request ids and, when the account is new, adds the
user to the users set. Values travel only as KEYS and ARGV. A lost
compare-and-set returns the stored account and a repeated request id returns
the entry applied first. An uncontended commit is one round trip.

Contended writers are served in turn. Retrying from the reported account
alone starves some writers: measured with four processes charging one user
and the default ``RetryPolicy``, about 4 charges in 1,000 lost ten times in a
row and failed (p99 near 200 ms). So the store offers ``exclusive(user_id)``,
which managers use after losing a compare-and-set: the writer takes the user's
lock, or queues for it (``BLPOP`` on its own wake-up list, so waiting costs
no polling); the lock comes with the account as it stands, so taking it is
the read; and the writer's commit passes the lock, with the new account, to
the next in line in the same script. While the lock is held, every other
commit loses its compare-and-set, so a writer holding it cannot lose. A lock
whose holder vanished is taken over when its lease (``lock_lease``) runs out.
A waiting writer renews a heartbeat key each time its ``BLPOP`` times out,
and the handover skips a writer whose heartbeat has expired (one killed while
queued, or stalled for a lease; a stalled one queues again when it runs). So
writers that died queued cost the others about one lease in all, not one
each: with 15 waiters SIGKILLed and a 1 s lease, the next writer's 16 writes
took 18.1 s before (with the default 2 s lease, past ``lock_wait``) and 1.2 s
after.

A connection that fails after a commit was sent leaves its outcome unknown.
A client this store creates never sends a command twice (``Retry(NoBackoff(),
0)``, as ``redis.Redis.from_url`` also defaults to): the commit fails with
``StoreError`` and the caller decides, ideally by repeating the operation with
the same ``request_id``. A client passed in may re-send (``redis.Redis(host=...)``
retries ten times by default), so each commit carries a token: a re-sent
commit that finds its own token on the account reports success instead of
losing its compare-and-set to itself (which the manager would have retried,
applying the operation twice). If another writer committed between the two
sends the token is gone, and only a ``request_id`` keeps the operation from
applying twice.

Every wait has a bound: a client the store creates waits at most 5 s to
connect and for each reply (as redis-py 8 does; redis-py 5 to 7 waited for
ever), a queued writer at most ``lock_wait``, and a ``BLPOP`` well under the
socket timeout. Both stores follow a fork (see their docstrings), and every
await of ``AsyncRedisStore`` may be cancelled.

The users set is the one key outside the user's slot, and only the commit
that creates an account touches it: the store runs on one Redis server (or a
primary with replicas), not yet on Redis Cluster. It needs Redis 6.0 or later
(``BLPOP`` with a fractional timeout, ``SET ... PX`` with ``NX`` or ``XX``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextvars import ContextVar
from types import TracebackType
from typing import Any, NamedTuple, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from creditmeter._ids import new_id
from creditmeter.exceptions import (
    ConfigError,
    DuplicateRequest,
    InvalidInput,
    StoreError,
    VersionConflict,
)
from creditmeter.models import Account, LedgerEntry
from creditmeter.serde import account_from_json, account_to_json, entry_from_json, entry_to_json

__all__ = [
    "ACQUIRE_SCRIPT",
    "COMMIT_SCRIPT",
    "DEFAULT_PREFIX",
    "RECHECK_SCRIPT",
    "RELEASE_SCRIPT",
    "AsyncRedisStore",
    "RedisStore",
]

DEFAULT_PREFIX = "creditmeter:"

# Passes the user's lock to the next writer queued for it (FIFO), or frees it; the
# next writer is sent the account as it now stands, so it need not read it. A
# queued writer whose heartbeat has lapsed (killed, or stalled for a lease) is
# dropped from the queue instead of being handed a lock it would keep for a lease.
_HAND_OVER = """
local function hand_over(lock, queue, wake_prefix, alive_prefix, lease, data)
  while true do
    local next_token = redis.call('LPOP', queue)
    if not next_token then
      redis.call('DEL', lock)
      return
    end
    if redis.call('DEL', alive_prefix .. next_token) == 1 then
      redis.call('SET', lock, next_token, 'PX', lease)
      local wake = wake_prefix .. next_token
      redis.call('RPUSH', wake, data)
      redis.call('PEXPIRE', wake, lease * 2)
      return
    end
  end
end
"""

COMMIT_SCRIPT = (
    """\
-- creditmeter: compare-and-set one account and append its ledger entries, atomically.
-- KEYS[1] account hash (v version, d account JSON, t token of the commit that wrote it)
-- KEYS[2] ledger list   KEYS[3] request-id hash   KEYS[4] the user's lock (a writer's token)
-- KEYS[5] lock queue   KEYS[6] prefix of the queued writers' wake-up lists
-- KEYS[7] prefix of the queued writers' heartbeats   KEYS[8] users set, given only on creation
-- ARGV[1] expected version ('' = the account must not exist)   ARGV[2] new version
-- ARGV[3] account JSON   ARGV[4] commit token   ARGV[5] user id
-- ARGV[6] the committer's lock token ('' = none)   ARGV[7] lock lease in ms
-- ARGV[8], ARGV[9], ...: per entry, a request-id mark ('' or '=' .. id), then the entry JSON
-- Returns 0 when written (or already written by this same commit, re-sent),
-- {1[, stored account JSON]} on a lost compare-and-set (or while another writer holds the lock),
-- {2, entry number, entry JSON} when an entry's request id was applied before."""
    + _HAND_OVER
    + """
local account = KEYS[1]
local head = redis.call('HMGET', account, 'v', 't')
local stored = head[1]
if stored and head[2] == ARGV[4] then
  return 0
end
local holder = redis.call('GET', KEYS[4])
if holder and holder ~= ARGV[6] then
  if stored then
    return {1, redis.call('HGET', account, 'd')}
  end
  return {1}
end
local seen = {}
for i = 8, #ARGV, 2 do
  local mark = ARGV[i]
  if mark ~= '' then
    local id = string.sub(mark, 2)
    local first = seen[id] or redis.call('HGET', KEYS[3], id)
    if first then
      return {2, (i - 6) / 2, first}
    end
    seen[id] = ARGV[i + 1]
  end
end
local expected = ARGV[1]
if (expected == '' and stored) or (expected ~= '' and stored ~= expected) then
  if stored then
    return {1, redis.call('HGET', account, 'd')}
  end
  return {1}
end
-- Raise WRONGTYPE (if anything else holds these keys) before the first write.
redis.call('LLEN', KEYS[2])
if holder then
  redis.call('LLEN', KEYS[5])
end
if #KEYS > 7 then
  redis.call('SCARD', KEYS[8])
end
redis.call('HSET', account, 'v', ARGV[2], 'd', ARGV[3], 't', ARGV[4])
for i = 8, #ARGV, 2 do
  local mark = ARGV[i]
  redis.call('RPUSH', KEYS[2], ARGV[i + 1])
  if mark ~= '' then
    redis.call('HSET', KEYS[3], string.sub(mark, 2), ARGV[i + 1])
  end
end
if #KEYS > 7 then
  redis.call('SADD', KEYS[8], ARGV[5])
end
if holder then
  hand_over(KEYS[4], KEYS[5], KEYS[6], KEYS[7], ARGV[7], ARGV[3])
end
return 0
"""
)

ACQUIRE_SCRIPT = """\
-- creditmeter: take a user's lock, or queue for it (with a heartbeat that the wait renews).
-- KEYS[1] lock   KEYS[2] lock queue   KEYS[3] account hash   KEYS[4] writer's heartbeat
-- ARGV[1] writer's token   ARGV[2] lease in ms   ARGV[3] heartbeat lifetime in ms
-- Returns {1[, account JSON]} when taken, {0} when queued.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local data = redis.call('HGET', KEYS[3], 'd')
  if data then
    return {1, data}
  end
  return {1}
end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('SET', KEYS[4], '1', 'PX', ARGV[3])
return {0}
"""

RECHECK_SCRIPT = """\
-- creditmeter: a queued writer that waited a while looks again: was the lock handed to it,
-- or did its holder vanish (the lease ran out)? Then it is the writer's. Else it renews
-- its heartbeat; if that had lapsed (the writer stalled), a handover may have dropped it
-- from the queue, and it queues again.
-- KEYS[1] lock   KEYS[2] lock queue   KEYS[3] account hash   KEYS[4] writer's wake-up list
-- KEYS[5] writer's heartbeat   ARGV[1] writer's token   ARGV[2] lease in ms
-- ARGV[3] heartbeat lifetime in ms
-- Returns {1[, account JSON]} when the lock is the writer's, {0} to wait on.
local holder = redis.call('GET', KEYS[1])
if holder ~= ARGV[1] then
  if holder then
    if not redis.call('SET', KEYS[5], '1', 'PX', ARGV[3], 'XX') then
      redis.call('SET', KEYS[5], '1', 'PX', ARGV[3])
      local queued = false
      for _, token in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
        if token == ARGV[1] then
          queued = true
          break
        end
      end
      if not queued then
        redis.call('RPUSH', KEYS[2], ARGV[1])
      end
    end
    return {0}
  end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('LREM', KEYS[2], 0, ARGV[1])
end
redis.call('DEL', KEYS[4], KEYS[5])
local data = redis.call('HGET', KEYS[3], 'd')
if data then
  return {1, data}
end
return {1}
"""

RELEASE_SCRIPT = (
    """\
-- creditmeter: leave a user's lock (or its queue): pass it on if it is the writer's.
-- KEYS[1] lock   KEYS[2] lock queue   KEYS[3] account hash   KEYS[4] wake-up list prefix
-- KEYS[5] writer's wake-up list   KEYS[6] heartbeat prefix   KEYS[7] writer's heartbeat
-- ARGV[1] writer's token   ARGV[2] lease in ms"""
    + _HAND_OVER
    + """
redis.call('LREM', KEYS[2], 0, ARGV[1])
redis.call('DEL', KEYS[5], KEYS[7])
if redis.call('GET', KEYS[1]) == ARGV[1] then
  hand_over(KEYS[1], KEYS[2], KEYS[4], KEYS[6], ARGV[2], redis.call('HGET', KEYS[3], 'd') or '')
end
return 0
"""
)

_DATA = b"d"
_NO_VERSION = b""
_NO_TOKEN = b""
_KEY_CACHE_LIMIT = 4096
_MAX_RANGE = 2**62  # LRANGE takes a signed 64-bit index
_SCAN_COUNT = 1000
_CONFLICT = 1
_DUPLICATE = 2
_TAKEN = 1
_MAX_SECONDS = 86_400.0
_TICK = 0.1  # how late Redis may time out a BLPOP: its timer runs at hz = 10 by default


class _Keys(NamedTuple):
    """Every key of one user; all share the hash tag ``{u<hex of the id>}``."""

    account: bytes
    ledger: bytes
    requests: bytes
    lock: bytes
    queue: bytes
    wake: bytes  # the prefix of each queued writer's wake-up list: wake + token
    alive: bytes  # the prefix of each queued writer's heartbeat: alive + token


def _check_prefix(prefix: object) -> str:
    if not isinstance(prefix, str) or not prefix:
        raise ConfigError(f"the Redis key prefix must be a non-empty str, got {prefix!r}")
    if "{" in prefix or "}" in prefix:
        raise ConfigError(
            f"the Redis key prefix must not contain braces (they mark hash tags), got {prefix!r}"
        )
    return prefix


def _split_url(url: object, prefix: str | None) -> tuple[str, str]:
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
    return url, _check_prefix(DEFAULT_PREFIX if prefix is None else prefix)


def _check_lock_times(lock_lease: float, lock_wait: float) -> tuple[int, float, float]:
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


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _Held:
    """A user's lock held by one ``exclusive()`` block, and the account read when it was taken."""

    __slots__ = ("account", "pid", "released", "token")

    def __init__(self, token: bytes, data: bytes | str | None) -> None:
        self.token = token
        self.account = account_from_json(data) if data else None
        self.released = False  # True once a commit has passed the lock on
        self.pid = os.getpid()  # a forked child never lets go of its parent's lock


class _Layout:
    """The keys, script arguments and replies shared by the sync and async stores."""

    def __init__(self, prefix: str, lock_lease: float, lock_wait: float) -> None:
        self.prefix = prefix
        self._prefix = prefix.encode()
        self.users_key = self._prefix + b"users"
        self.lease_ms, self.poll, self.wait = _check_lock_times(lock_lease, lock_wait)
        self._lease = b"%d" % self.lease_ms
        # A queued writer renews its heartbeat every poll; one not heard of for a lease
        # is skipped at handover, so writers that died queued cost one lease in all. A
        # poll lasts up to 0.1 s more than asked: Redis times out a BLPOP on its 10 Hz
        # timer (hz 10, the default); a heartbeat outlives two polls.
        self._heartbeat = b"%d" % max(self.lease_ms, math.ceil((self.poll + _TICK) * 2000))
        self._keys: dict[str, _Keys] = {}

    def fit_poll(self, socket_timeout: float | None) -> None:
        """Block on a wake-up list for well under the client's reply timeout, or it expires."""
        if socket_timeout is not None:
            self.poll = max(0.01, min(self.poll, (socket_timeout - _TICK) / 2))

    def keys(self, user_id: str) -> _Keys:
        """Every key of a user (one hash tag, so one Redis Cluster slot)."""
        found = self._keys.get(user_id)
        if found is not None:
            return found
        try:
            encoded = user_id.encode()
        except (UnicodeEncodeError, AttributeError) as exc:
            raise InvalidInput(f"user id {user_id!r} is not a str of valid Unicode") from exc
        base = b"%s{u%s}:" % (self._prefix, encoded.hex().encode())
        keys = _Keys(
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
        lock_token: bytes = _NO_TOKEN,
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
            if code == _CONFLICT:
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

    # The lock behind exclusive(): three scripts' KEYS and ARGV.

    def acquire_call(self, keys: _Keys, token: bytes) -> tuple[list[bytes], list[bytes]]:
        return (
            [keys.lock, keys.queue, keys.account, keys.alive + token],
            [token, self._lease, self._heartbeat],
        )

    def recheck_call(self, keys: _Keys, token: bytes) -> tuple[list[bytes], list[bytes]]:
        return (
            [keys.lock, keys.queue, keys.account, keys.wake + token, keys.alive + token],
            [token, self._lease, self._heartbeat],
        )

    def release_call(self, keys: _Keys, token: bytes) -> tuple[list[bytes], list[bytes]]:
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
    def taken(reply: Any, token: bytes) -> _Held | None:
        """The lock taken, from an acquire or recheck reply; None while queued."""
        if not isinstance(reply, list) or not reply:
            raise StoreError(f"unexpected reply from the Redis lock script: {reply!r}")
        if reply[0] != _TAKEN:
            return None
        return _Held(token, reply[1] if len(reply) > 1 else None)

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
        try:
            return sorted(_text(member) for member in members)
        except UnicodeDecodeError as exc:
            raise StoreError(
                f"the Redis users set holds a member that is not UTF-8: {exc}"
            ) from exc


def _failed(what: str, exc: BaseException) -> StoreError:
    return StoreError(f"Redis {what} failed: {type(exc).__name__}: {exc}")


_ERRORS = (RedisError, OSError)

# The locks each task holds through AsyncRedisStore.exclusive(): (store, user id) -> lock.
_TASK_HELD: ContextVar[dict[tuple[str, str], _Held] | None] = ContextVar(
    "creditmeter_redis_held", default=None
)

# What a client this store creates waits at most for a connection and for each reply
# (redis-py 8 has the same defaults; before it, a server that stopped answering hung
# the caller for ever). The URL's own ?socket_timeout=... or an option given wins.
_SOCKET_TIMEOUT = 5.0

# The clients a forked child stopped using. Their sockets are the parent's too, and so,
# for redis.asyncio, is the selector of the event loop they are registered with: closing
# them in the child would unregister the parent's sockets from it. So the child never
# closes them, and keeps them referenced so that no finalizer does either (one set of
# connections per store and fork).
_LEFT_TO_PARENT: list[object] = []

# Serializes a sync store's switch to new connections after a fork; a new lock in each
# child, as a thread of the parent may have held this one at the fork.
_FORK_LOCK = [threading.Lock()]


def _renew_fork_lock() -> None:
    _FORK_LOCK[0] = threading.Lock()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_renew_fork_lock)


def _made_before_fork(kind: str, pid: int) -> StoreError:
    return StoreError(
        f"this {kind} uses a client made in process {pid}, before os.fork(), that it cannot "
        "replace in this process: make the client (and the store) after the fork, or give "
        "the store a URL"
    )


def _socket_timeout(pool: Any) -> float | None:
    value = getattr(pool, "connection_kwargs", {}).get("socket_timeout")
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


_T = TypeVar("_T")


def _cancel_requests(task: asyncio.Task[Any] | None) -> int:
    counter = getattr(task, "cancelling", None)  # Python 3.11+
    return int(counter()) if counter is not None else 0


async def _honour_cancel(call: Awaitable[_T]) -> _T:
    """Await one redis.asyncio call; raise the task's cancellation if the call dropped it.

    redis-py sends each command under ``asyncio.wait_for(send, socket_timeout)``,
    and before Python 3.12 ``wait_for`` returns the result and drops the
    cancellation when the task is cancelled just as the send completes
    (CPython gh-86296): the cancelled call went on, queued for the user's
    lock and took it. The task's count of cancellation requests (3.11+)
    shows such a request. One still pending is raised at the next suspension,
    which ``sleep(0)`` is; if that passes, the request was dropped.
    """
    task = asyncio.current_task()
    before = _cancel_requests(task)
    result = await call
    if _cancel_requests(task) > before:
        await asyncio.sleep(0)
        raise asyncio.CancelledError
    return result


class RedisStore:
    """Accounts and ledgers in Redis: one Lua script per commit, keys hash-tagged per user.

    Give a URL (``redis://host:6379/0``, ``rediss://...``, ``unix:///path``;
    ``?prefix=...`` sets the key prefix) or an existing ``redis.Redis`` as
    ``client``. Extra keyword arguments go to ``redis.Redis.from_url``; a
    client the store creates waits at most 5 s to connect and for each reply
    unless told otherwise (``socket_timeout``, ``socket_connect_timeout``). The
    store closes only a client it created. It is safe to share between
    threads.

    A store made before ``os.fork()`` (gunicorn ``--preload``, multiprocessing's
    fork) may be used by parent and child: on its first call in the child it
    creates a client of its own there and leaves the parent's connections
    alone (redis-py's pools do as much, but not a ``single_connection_client``).
    A store on a client given relies on that client's pool, and in a child
    raises ``StoreError`` if the client is a single-connection one.

    ``exclusive(user_id)`` queues writers of a contended user in turn (see
    the module docstring); ``lock_lease`` bounds how long a vanished holder
    can keep the others waiting, ``lock_wait`` how long a writer waits.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        prefix: str | None = None,
        client: redis.Redis | None = None,
        lock_lease: float = 2.0,
        lock_wait: float = 30.0,
        **options: Any,
    ) -> None:
        if (url is None) == (client is None):
            raise ConfigError("give RedisStore either a URL or a client, not both or neither")
        if client is not None:
            if not isinstance(client, redis.Redis):
                raise ConfigError(f"client must be a redis.Redis, got {type(client).__name__}")
            if options:
                raise ConfigError(
                    f"options {sorted(options)} apply to a URL, not to a client given ready-made"
                )
            chosen = _check_prefix(DEFAULT_PREFIX if prefix is None else prefix)
            self._connect: Callable[[], redis.Redis] | None = None
        else:
            url, chosen = _split_url(url, prefix)
            # A commit whose connection fails is never sent again (see the module docstring).
            options.setdefault("retry", redis.retry.Retry(NoBackoff(), 0))
            options.setdefault("socket_timeout", _SOCKET_TIMEOUT)
            options.setdefault("socket_connect_timeout", _SOCKET_TIMEOUT)

            def connect() -> redis.Redis:
                try:
                    return redis.Redis.from_url(url, **options)
                except (ValueError, TypeError) as exc:
                    raise ConfigError(f"bad Redis URL or option: {exc}") from exc

            client = connect()
            self._connect = connect
        self._owned = self._connect is not None
        self._layout = _Layout(chosen, lock_lease, lock_wait)
        self._layout.fit_poll(_socket_timeout(client.connection_pool))
        self.prefix = chosen
        self._use(client)
        self._local = threading.local()  # .held: user id -> _Held, this thread's locks
        self._pid = os.getpid()
        self._closed = False

    def _use(self, client: redis.Redis) -> None:
        self.client = client
        self._commit_script = client.register_script(COMMIT_SCRIPT)
        self._acquire_script = client.register_script(ACQUIRE_SCRIPT)
        self._recheck_script = client.register_script(RECHECK_SCRIPT)
        self._release_script = client.register_script(RELEASE_SCRIPT)

    # --- the contract -------------------------------------------------------

    def load(self, user_id: str) -> Account | None:
        """Return the stored account, or ``None``."""
        layout = self._open_layout()
        held = self._held(user_id)
        if held is not None and not held.released:
            return held.account  # read with the lock, which no other writer can pass
        try:
            data = self.client.hget(layout.keys(user_id).account, _DATA)
        except _ERRORS as exc:
            raise _failed("load", exc) from exc
        return None if data is None else account_from_json(data, user_id=user_id)

    def commit(
        self,
        account: Account,
        entries: Sequence[LedgerEntry],
        *,
        expected_version: int | None,
    ) -> None:
        """Store the account and entries in one script run if the version still matches."""
        layout = self._open_layout()
        held = self._held(account.user_id)
        token = _NO_TOKEN if held is None or held.released else held.token
        keys, args = layout.commit_call(account, entries, expected_version, token)
        script = self._commit_script
        try:
            try:  # EVALSHA by hand: Script.__call__ costs 4 µs more per commit
                reply = self.client.evalsha(script.sha, len(keys), *keys, *args)
            except NoScriptError:  # flushed, or another server: redis-py loads it and runs it
                reply = script(keys, args)
        except _ERRORS as exc:
            raise _failed("commit", exc) from exc
        if reply != 0:
            _Layout.commit_outcome(reply, account, entries, expected_version)
        if held is not None:
            held.released = True  # the script passed the lock on with the new account

    def find_request(self, user_id: str, request_id: str) -> LedgerEntry | None:
        """Return the entry recorded under ``request_id``, if any."""
        key = self._open_layout().keys(user_id).requests
        try:
            data = self.client.hget(key, request_id.encode())
        except _ERRORS as exc:
            raise _failed("read", exc) from exc
        return None if data is None else entry_from_json(data, user_id=user_id)

    def ledger(self, user_id: str, *, limit: int | None = None) -> list[LedgerEntry]:
        """Return the user's entries, oldest first (the newest ``limit`` if given)."""
        key = self._open_layout().keys(user_id).ledger
        bounds = _Layout.tail(limit)
        if bounds is None:
            return []
        try:
            rows = self.client.lrange(key, *bounds)
        except _ERRORS as exc:
            raise _failed("read", exc) from exc
        return [entry_from_json(row, user_id=user_id) for row in rows]

    def users(self) -> list[str]:
        """Return every user id, sorted (read with SSCAN, never KEYS)."""
        layout = self._open_layout()
        try:
            members = set(self.client.sscan_iter(layout.users_key, count=_SCAN_COUNT))
        except _ERRORS as exc:
            raise _failed("read", exc) from exc
        return layout.user_ids(members)

    # --- writers in turn ----------------------------------------------------

    @contextlib.contextmanager
    def exclusive(self, user_id: str) -> Iterator[None]:
        """Keep every other writer of ``user_id`` (any process, any host) out until the block ends.

        Managers use it for a user whose compare-and-set they recently lost:
        writers queue for the user's lock and are served in turn, each handed
        the account by the one before, so none loses again; a commit passes
        the lock on in the same script. Re-entering it in one thread is a no-op.
        """
        layout = self._open_layout()
        held_by_thread: dict[str, _Held] = self._local.__dict__.setdefault("held", {})
        if user_id in held_by_thread:
            yield
            return
        keys = layout.keys(user_id)
        held = self._acquire(layout, keys)
        held_by_thread[user_id] = held
        body_failed = True
        try:
            yield
            body_failed = False
        finally:
            del held_by_thread[user_id]
            if not held.released and held.pid == os.getpid():
                # After a failure (the server gone?) the lease frees the lock; keep that error.
                with contextlib.suppress(*((StoreError,) if body_failed else ())):
                    self._release(layout, keys, held.token)

    def _held(self, user_id: str) -> _Held | None:
        held_by_thread: dict[str, _Held] | None = getattr(self._local, "held", None)
        return held_by_thread.get(user_id) if held_by_thread else None

    def _acquire(self, layout: _Layout, keys: _Keys) -> _Held:
        token = new_id().encode()
        try:
            held = _Layout.taken(self._acquire_script(*layout.acquire_call(keys, token)), token)
            deadline = time.monotonic() + layout.wait
            wake = [keys.wake + token]
            while held is None:
                popped = self.client.blpop(wake, timeout=layout.poll)
                if popped is not None:
                    return _Held(token, popped[1])
                reply = self._recheck_script(*layout.recheck_call(keys, token))
                held = _Layout.taken(reply, token)
                if held is None and time.monotonic() > deadline:
                    raise StoreError(f"waited over {layout.wait:g} s for a user's writer lock")
        except BaseException as exc:
            with contextlib.suppress(StoreError):
                self._release(layout, keys, token)
            if isinstance(exc, _ERRORS):
                raise _failed("lock", exc) from exc
            raise
        return held

    def _release(self, layout: _Layout, keys: _Keys, token: bytes) -> None:
        try:
            self._release_script(*layout.release_call(keys, token))
        except _ERRORS as exc:
            raise _failed("unlock", exc) from exc

    # --- lifecycle ----------------------------------------------------------

    def close(self) -> None:
        """Close the client if this store created it; further use raises ``StoreError``."""
        if self._closed:
            return
        self._closed = True
        if self._owned and self._pid != os.getpid():
            _LEFT_TO_PARENT.append(self.client)  # made before a fork: the parent's to close
        elif self._owned:
            try:
                self.client.close()
            except _ERRORS as exc:
                raise _failed("close", exc) from exc

    def __enter__(self) -> RedisStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RedisStore(prefix={self.prefix!r})"

    def _open_layout(self) -> _Layout:
        if self._closed:
            raise StoreError("the store is closed")
        if self._pid != os.getpid():
            self._after_fork()
        return self._layout

    def _after_fork(self) -> None:
        """Switch to connections of this process's own (see the class docstring)."""
        with _FORK_LOCK[0]:
            if self._pid == os.getpid():
                return  # another thread switched
            if self._connect is not None:
                _LEFT_TO_PARENT.append(self.client)
                self._use(self._connect())
            elif getattr(self.client, "connection", None) is not None:
                raise _made_before_fork("RedisStore", self._pid)
            self._local = threading.local()  # the parent's locks are not this process's
            self._pid = os.getpid()


class _ConnectionPool(redis.asyncio.ConnectionPool):
    """redis-py's async pool, except that a connection the server closed is never handed out.

    redis-py 8.1.0 with RESP3 (its default protocol) no longer checks a
    pooled connection at checkout (redis/redis-py#4252): after a server
    restart, its idle ``timeout`` or a ``CLIENT KILL``, the next command on
    each pooled connection failed with "Connection closed by server". A
    connection whose stream has met end of file is connected again first, as
    redis-py's sync pool (and earlier versions of the async one) do.
    """

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        pool: Any = super()  # redis-py leaves get_connection unannotated
        connection = await pool.get_connection(*args, **kwargs)
        reader = getattr(connection, "_reader", None)
        if reader is not None and reader.at_eof():
            try:
                await connection.disconnect()
                await connection.connect()
            except BaseException:
                await self.release(connection)
                raise
        return connection


class AsyncRedisStore:
    """``RedisStore`` for asyncio, on ``redis.asyncio``: the same keys, scripts and lock.

    Give a URL or an existing ``redis.asyncio.Redis`` as ``client``; the store
    closes (``aclose``) only a client it created. Use it from one event loop.
    A client it creates never hands out a pooled connection the server has
    closed (redis-py 8.1's async pool does, with RESP3), and waits at most 5 s
    to connect and for each reply unless told otherwise; a client given is
    used as it is.

    Every call may be cancelled at any await: it then holds no connection
    and no lock (a lock it held or was queued for is let go before the
    cancellation goes on), and the next call works. (On Python 3.10 a
    cancellation that arrives just as redis-py finishes sending a command can
    still be lost inside redis-py; the call then runs to its end.)

    A store made before ``os.fork()`` and then used in the child (on the
    child's own event loop) creates a client of its own there, never using
    or closing the parent's connections, which redis.asyncio does not check
    for; a store on a client given raises ``StoreError`` in the child.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        prefix: str | None = None,
        client: redis.asyncio.Redis | None = None,
        lock_lease: float = 2.0,
        lock_wait: float = 30.0,
        **options: Any,
    ) -> None:
        if (url is None) == (client is None):
            raise ConfigError("give AsyncRedisStore either a URL or a client, not both or neither")
        if client is not None:
            if not isinstance(client, redis.asyncio.Redis):
                raise ConfigError(
                    f"client must be a redis.asyncio.Redis, got {type(client).__name__}"
                )
            if options:
                raise ConfigError(
                    f"options {sorted(options)} apply to a URL, not to a client given ready-made"
                )
            chosen = _check_prefix(DEFAULT_PREFIX if prefix is None else prefix)
            self._connect: Callable[[], redis.asyncio.Redis] | None = None
        else:
            url, chosen = _split_url(url, prefix)
            options.setdefault("retry", redis.asyncio.retry.Retry(NoBackoff(), 0))
            options.setdefault("socket_timeout", _SOCKET_TIMEOUT)
            options.setdefault("socket_connect_timeout", _SOCKET_TIMEOUT)
            single = bool(options.pop("single_connection_client", False))

            def connect() -> redis.asyncio.Redis:
                try:
                    # As redis.asyncio.Redis.from_url, with a pool that checks its connections.
                    pool = _ConnectionPool.from_url(url, **options)
                except (ValueError, TypeError) as exc:
                    raise ConfigError(f"bad Redis URL or option: {exc}") from exc
                made = redis.asyncio.Redis(connection_pool=pool, single_connection_client=single)
                made.auto_close_connection_pool = True
                return made

            client = connect()
            self._connect = connect
        self._owned = self._connect is not None
        self._layout = _Layout(chosen, lock_lease, lock_wait)
        self._layout.fit_poll(_socket_timeout(client.connection_pool))
        self.prefix = chosen
        self._use(client)
        self._ident = new_id()  # names this store's locks in _TASK_HELD
        self._pid = os.getpid()
        self._closed = False

    def _use(self, client: redis.asyncio.Redis) -> None:
        self.client = client
        self._commit_script = client.register_script(COMMIT_SCRIPT)
        self._acquire_script = client.register_script(ACQUIRE_SCRIPT)
        self._recheck_script = client.register_script(RECHECK_SCRIPT)
        self._release_script = client.register_script(RELEASE_SCRIPT)

    # --- the contract -------------------------------------------------------

    async def load(self, user_id: str) -> Account | None:
        """Return the stored account, or ``None``."""
        layout = self._open_layout()
        held = self._held(user_id)
        if held is not None and not held.released:
            return held.account  # read with the lock, which no other writer can pass
        try:
            data = await _honour_cancel(self.client.hget(layout.keys(user_id).account, _DATA))
        except _ERRORS as exc:
            raise _failed("load", exc) from exc
        return None if data is None else account_from_json(data, user_id=user_id)

    async def commit(
        self,
        account: Account,
        entries: Sequence[LedgerEntry],
        *,
        expected_version: int | None,
    ) -> None:
        """Store the account and entries in one script run if the version still matches."""
        layout = self._open_layout()
        held = self._held(account.user_id)
        token = _NO_TOKEN if held is None or held.released else held.token
        keys, args = layout.commit_call(account, entries, expected_version, token)
        script = self._commit_script
        try:
            try:  # EVALSHA by hand: AsyncScript.__call__ costs more per commit
                reply = await _honour_cancel(
                    self.client.evalsha(script.sha, len(keys), *keys, *args)
                )
            except NoScriptError:  # flushed, or another server: redis-py loads it and runs it
                reply = await _honour_cancel(script(keys, args))
        except _ERRORS as exc:
            raise _failed("commit", exc) from exc
        if reply != 0:
            _Layout.commit_outcome(reply, account, entries, expected_version)
        if held is not None:
            held.released = True  # the script passed the lock on with the new account

    async def find_request(self, user_id: str, request_id: str) -> LedgerEntry | None:
        """Return the entry recorded under ``request_id``, if any."""
        key = self._open_layout().keys(user_id).requests
        try:
            data = await _honour_cancel(self.client.hget(key, request_id.encode()))
        except _ERRORS as exc:
            raise _failed("read", exc) from exc
        return None if data is None else entry_from_json(data, user_id=user_id)

    async def ledger(self, user_id: str, *, limit: int | None = None) -> list[LedgerEntry]:
        """Return the user's entries, oldest first (the newest ``limit`` if given)."""
        key = self._open_layout().keys(user_id).ledger
        bounds = _Layout.tail(limit)
        if bounds is None:
            return []
        try:
            rows = await _honour_cancel(self.client.lrange(key, *bounds))
        except _ERRORS as exc:
            raise _failed("read", exc) from exc
        return [entry_from_json(row, user_id=user_id) for row in rows]

    async def users(self) -> list[str]:
        """Return every user id, sorted (read with SSCAN, never KEYS)."""
        layout = self._open_layout()

        async def scan() -> set[bytes | str]:
            return {
                member
                async for member in self.client.sscan_iter(layout.users_key, count=_SCAN_COUNT)
            }

        try:
            members = await _honour_cancel(scan())
        except _ERRORS as exc:
            raise _failed("read", exc) from exc
        return layout.user_ids(members)

    # --- writers in turn ----------------------------------------------------

    @contextlib.asynccontextmanager
    async def exclusive(self, user_id: str) -> AsyncIterator[None]:
        """Keep every other writer of ``user_id`` out until the block ends (see ``RedisStore``)."""
        layout = self._open_layout()
        name = (self._ident, user_id)
        held_by_task = _TASK_HELD.get()
        if held_by_task and name in held_by_task:
            yield
            return
        keys = layout.keys(user_id)
        held = await self._acquire(layout, keys)
        reset = _TASK_HELD.set({**(held_by_task or {}), name: held})
        body_failed = True
        try:
            yield
            body_failed = False
        finally:
            # A block never left is closed by the loop's finalizer, in another context.
            with contextlib.suppress(ValueError):
                _TASK_HELD.reset(reset)
            if not held.released and held.pid == os.getpid():
                # A cancelled caller lets go of the lock too. After a failure (the
                # server gone?) the lease frees it; keep that error.
                with contextlib.suppress(*((StoreError,) if body_failed else ())):
                    await self._let_go(layout, keys, held.token)

    def _held(self, user_id: str) -> _Held | None:
        held_by_task = _TASK_HELD.get()
        return held_by_task.get((self._ident, user_id)) if held_by_task else None

    async def _acquire(self, layout: _Layout, keys: _Keys) -> _Held:
        token = new_id().encode()
        try:
            reply = await _honour_cancel(self._acquire_script(*layout.acquire_call(keys, token)))
            held = _Layout.taken(reply, token)
            deadline = time.monotonic() + layout.wait
            wake = [keys.wake + token]
            while held is None:
                popped = await _honour_cancel(self.client.blpop(wake, timeout=layout.poll))
                if popped is not None:
                    return _Held(token, popped[1])
                reply = await _honour_cancel(
                    self._recheck_script(*layout.recheck_call(keys, token))
                )
                held = _Layout.taken(reply, token)
                if held is None and time.monotonic() > deadline:
                    raise StoreError(f"waited over {layout.wait:g} s for a user's writer lock")
        except BaseException as exc:
            with contextlib.suppress(StoreError):
                await self._let_go(layout, keys, token)
            if isinstance(exc, _ERRORS):
                raise _failed("lock", exc) from exc
            raise
        return held

    async def _let_go(self, layout: _Layout, keys: _Keys, token: bytes) -> None:
        """Release the lock or leave its queue before returning, even if cancelled meanwhile.

        The release runs as a task of its own. A cancellation that comes
        while it runs waits for it (one round trip, bounded by the socket
        timeout) and is raised after it, so that a cancelled call never
        returns still holding the lock or queued for it.
        """
        release = asyncio.ensure_future(self._release(layout, keys, token))
        cancelled: asyncio.CancelledError | None = None
        while not release.done():
            try:
                await asyncio.wait([release])
            except asyncio.CancelledError as exc:  # noqa: PERF203 - rare; the loop is the point
                cancelled = exc
        if cancelled is not None:
            if not release.cancelled():
                release.exception()  # retrieved: the cancellation goes on instead
            raise cancelled
        release.result()

    async def _release(self, layout: _Layout, keys: _Keys, token: bytes) -> None:
        try:
            await self._release_script(*layout.release_call(keys, token))
        except _ERRORS as exc:
            raise _failed("unlock", exc) from exc

    # --- lifecycle ----------------------------------------------------------

    async def aclose(self) -> None:
        """Close the client if this store created it; further use raises ``StoreError``."""
        if self._closed:
            return
        self._closed = True
        if self._owned and self._pid != os.getpid():
            _LEFT_TO_PARENT.append(self.client)  # made before a fork: the parent's to close
        elif self._owned:
            try:
                await self.client.aclose()
            except _ERRORS as exc:
                raise _failed("close", exc) from exc

    async def __aenter__(self) -> AsyncRedisStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncRedisStore(prefix={self.prefix!r})"

    def _open_layout(self) -> _Layout:
        if self._closed:
            raise StoreError("the store is closed")
        if self._pid != os.getpid():
            self._after_fork()
        return self._layout

    def _after_fork(self) -> None:
        """Switch to a client of this process's own (see the class docstring)."""
        if self._connect is None:
            raise _made_before_fork("AsyncRedisStore", self._pid)
        _LEFT_TO_PARENT.append(self.client)
        self._use(self._connect())
        self._ident = new_id()  # the parent's locks are not this process's
        self._pid = os.getpid()
