"""Balances in Redis, shared by every process and host that reaches the server.

Key layout, for a key prefix ``P`` (default ``creditmeter:``) and a user whose
id's UTF-8 bytes are ``H`` in hex::

    P{uH}:account      hash: v = version, d = account JSON, t = token of the commit that wrote it
    P{uH}:ledger       list: entry JSON, oldest first
    P{uH}:requests     hash: request id -> entry JSON
    P{uH}:lock         string: the token of the writer holding the user's lock (with a lease)
    P{uH}:lock-queue   list: tokens of the writers waiting for it, in order
    P{uH}:wake:<tok>   list: where a waiting writer is handed the lock and the account
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

The users set is the one key outside the user's slot, and only the commit
that creates an account touches it: the store runs on one Redis server (or a
primary with replicas), not yet on Redis Cluster. It needs Redis 6.0 or later
(``BLPOP`` with a fractional timeout, ``SET ... PX`` with ``NX``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextvars import ContextVar
from types import TracebackType
from typing import Any, NamedTuple
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
# next writer is sent the account as it now stands, so it need not read it.
_HAND_OVER = """
local function hand_over(lock, queue, wake_prefix, lease, data)
  local next_token = redis.call('LPOP', queue)
  if next_token then
    redis.call('SET', lock, next_token, 'PX', lease)
    local wake = wake_prefix .. next_token
    redis.call('RPUSH', wake, data)
    redis.call('PEXPIRE', wake, lease * 2)
  else
    redis.call('DEL', lock)
  end
end
"""

COMMIT_SCRIPT = (
    """\
-- creditmeter: compare-and-set one account and append its ledger entries, atomically.
-- KEYS[1] account hash (v version, d account JSON, t token of the commit that wrote it)
-- KEYS[2] ledger list   KEYS[3] request-id hash   KEYS[4] the user's lock (a writer's token)
-- KEYS[5] lock queue   KEYS[6] prefix of the queued writers' wake-up lists
-- KEYS[7] users set, given only when the account is created
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
if #KEYS > 6 then
  redis.call('SCARD', KEYS[7])
end
redis.call('HSET', account, 'v', ARGV[2], 'd', ARGV[3], 't', ARGV[4])
for i = 8, #ARGV, 2 do
  local mark = ARGV[i]
  redis.call('RPUSH', KEYS[2], ARGV[i + 1])
  if mark ~= '' then
    redis.call('HSET', KEYS[3], string.sub(mark, 2), ARGV[i + 1])
  end
end
if #KEYS > 6 then
  redis.call('SADD', KEYS[7], ARGV[5])
end
if holder then
  hand_over(KEYS[4], KEYS[5], KEYS[6], ARGV[7], ARGV[3])
end
return 0
"""
)

ACQUIRE_SCRIPT = """\
-- creditmeter: take a user's lock, or queue for it.
-- KEYS[1] lock   KEYS[2] lock queue   KEYS[3] account hash
-- ARGV[1] writer's token   ARGV[2] lease in ms
-- Returns {1[, account JSON]} when taken, {0} when queued.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local data = redis.call('HGET', KEYS[3], 'd')
  if data then
    return {1, data}
  end
  return {1}
end
redis.call('RPUSH', KEYS[2], ARGV[1])
return {0}
"""

RECHECK_SCRIPT = """\
-- creditmeter: a queued writer that waited a while looks again: was the lock handed to it,
-- or did its holder vanish (the lease ran out)? Then it is the writer's.
-- KEYS[1] lock   KEYS[2] lock queue   KEYS[3] account hash   KEYS[4] writer's wake-up list
-- ARGV[1] writer's token   ARGV[2] lease in ms
-- Returns {1[, account JSON]} when the lock is the writer's, {0} to wait on.
local holder = redis.call('GET', KEYS[1])
if holder ~= ARGV[1] then
  if holder then
    return {0}
  end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  redis.call('LREM', KEYS[2], 0, ARGV[1])
end
redis.call('DEL', KEYS[4])
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
-- KEYS[5] writer's wake-up list   ARGV[1] writer's token   ARGV[2] lease in ms"""
    + _HAND_OVER
    + """
redis.call('LREM', KEYS[2], 0, ARGV[1])
redis.call('DEL', KEYS[5])
if redis.call('GET', KEYS[1]) == ARGV[1] then
  hand_over(KEYS[1], KEYS[2], KEYS[4], ARGV[2], redis.call('HGET', KEYS[3], 'd') or '')
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


class _Keys(NamedTuple):
    """Every key of one user; all share the hash tag ``{u<hex of the id>}``."""

    account: bytes
    ledger: bytes
    requests: bytes
    lock: bytes
    queue: bytes
    wake: bytes  # the prefix of each queued writer's wake-up list: wake + token


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
    parts = urlsplit(url)
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

    __slots__ = ("account", "released", "token")

    def __init__(self, token: bytes, data: bytes | str | None) -> None:
        self.token = token
        self.account = account_from_json(data) if data else None
        self.released = False  # True once a commit has passed the lock on


class _Layout:
    """The keys, script arguments and replies shared by the sync and async stores."""

    def __init__(self, prefix: str, lock_lease: float, lock_wait: float) -> None:
        self.prefix = prefix
        self._prefix = prefix.encode()
        self.users_key = self._prefix + b"users"
        self.lease_ms, self.poll, self.wait = _check_lock_times(lock_lease, lock_wait)
        self._lease = b"%d" % self.lease_ms
        self._keys: dict[str, _Keys] = {}

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
                current = account_from_json(reply[1]) if len(reply) > 1 else None
                raise VersionConflict(account.user_id, expected=expected_version, current=current)
            if code == _DUPLICATE and len(reply) == 3:
                request_id = entries[int(reply[1]) - 1].request_id
                if request_id is not None:
                    raise DuplicateRequest(
                        account.user_id, request_id, entry=entry_from_json(reply[2])
                    )
        raise StoreError(f"unexpected reply from the Redis commit script: {reply!r}")

    # The lock behind exclusive(): three scripts' KEYS and ARGV.

    def acquire_call(self, keys: _Keys, token: bytes) -> tuple[list[bytes], list[bytes]]:
        return [keys.lock, keys.queue, keys.account], [token, self._lease]

    def recheck_call(self, keys: _Keys, token: bytes) -> tuple[list[bytes], list[bytes]]:
        return [keys.lock, keys.queue, keys.account, keys.wake + token], [token, self._lease]

    def release_call(self, keys: _Keys, token: bytes) -> tuple[list[bytes], list[bytes]]:
        wake = keys.wake + token
        return [keys.lock, keys.queue, keys.account, keys.wake, wake], [token, self._lease]

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


class RedisStore:
    """Accounts and ledgers in Redis: one Lua script per commit, keys hash-tagged per user.

    Give a URL (``redis://host:6379/0``, ``rediss://...``, ``unix:///path``;
    ``?prefix=...`` sets the key prefix) or an existing ``redis.Redis`` as
    ``client``. Extra keyword arguments go to ``redis.Redis.from_url``. The
    store closes only a client it created. It is safe to share between
    threads, and a forked child reconnects on its own (redis-py's pools do).

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
            self._layout = _Layout(chosen, lock_lease, lock_wait)
            self._owned = False
        else:
            url, chosen = _split_url(url, prefix)
            self._layout = _Layout(chosen, lock_lease, lock_wait)
            # A commit whose connection fails is never sent again (see the module docstring).
            options.setdefault("retry", redis.retry.Retry(NoBackoff(), 0))
            try:
                client = redis.Redis.from_url(url, **options)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"bad Redis URL or option: {exc}") from exc
            self._owned = True
        self.client = client
        self.prefix = chosen
        self._commit_script = client.register_script(COMMIT_SCRIPT)
        self._acquire_script = client.register_script(ACQUIRE_SCRIPT)
        self._recheck_script = client.register_script(RECHECK_SCRIPT)
        self._release_script = client.register_script(RELEASE_SCRIPT)
        self._local = threading.local()  # .held: user id -> _Held, this thread's locks
        self._closed = False

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
        return None if data is None else account_from_json(data)

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
        return None if data is None else entry_from_json(data)

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
        return [entry_from_json(row) for row in rows]

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
            if not held.released:
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
        if self._owned:
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
        return self._layout


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
    closed (redis-py 8.1's async pool does, with RESP3); a client given is
    used as it is.
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
            self._layout = _Layout(chosen, lock_lease, lock_wait)
            self._owned = False
        else:
            url, chosen = _split_url(url, prefix)
            self._layout = _Layout(chosen, lock_lease, lock_wait)
            options.setdefault("retry", redis.asyncio.retry.Retry(NoBackoff(), 0))
            single = bool(options.pop("single_connection_client", False))
            try:
                # As redis.asyncio.Redis.from_url, with a pool that checks its connections.
                pool = _ConnectionPool.from_url(url, **options)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"bad Redis URL or option: {exc}") from exc
            client = redis.asyncio.Redis(connection_pool=pool, single_connection_client=single)
            client.auto_close_connection_pool = True
            self._owned = True
        self.client = client
        self.prefix = chosen
        self._commit_script = client.register_script(COMMIT_SCRIPT)
        self._acquire_script = client.register_script(ACQUIRE_SCRIPT)
        self._recheck_script = client.register_script(RECHECK_SCRIPT)
        self._release_script = client.register_script(RELEASE_SCRIPT)
        self._ident = new_id()  # names this store's locks in _TASK_HELD
        self._closed = False

    # --- the contract -------------------------------------------------------

    async def load(self, user_id: str) -> Account | None:
        """Return the stored account, or ``None``."""
        layout = self._open_layout()
        held = self._held(user_id)
        if held is not None and not held.released:
            return held.account  # read with the lock, which no other writer can pass
        try:
            data = await self.client.hget(layout.keys(user_id).account, _DATA)
        except _ERRORS as exc:
            raise _failed("load", exc) from exc
        return None if data is None else account_from_json(data)

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
                reply = await self.client.evalsha(script.sha, len(keys), *keys, *args)
            except NoScriptError:  # flushed, or another server: redis-py loads it and runs it
                reply = await script(keys, args)
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
            data = await self.client.hget(key, request_id.encode())
        except _ERRORS as exc:
            raise _failed("read", exc) from exc
        return None if data is None else entry_from_json(data)

    async def ledger(self, user_id: str, *, limit: int | None = None) -> list[LedgerEntry]:
        """Return the user's entries, oldest first (the newest ``limit`` if given)."""
        key = self._open_layout().keys(user_id).ledger
        bounds = _Layout.tail(limit)
        if bounds is None:
            return []
        try:
            rows = await self.client.lrange(key, *bounds)
        except _ERRORS as exc:
            raise _failed("read", exc) from exc
        return [entry_from_json(row) for row in rows]

    async def users(self) -> list[str]:
        """Return every user id, sorted (read with SSCAN, never KEYS)."""
        layout = self._open_layout()
        try:
            members = {
                member
                async for member in self.client.sscan_iter(layout.users_key, count=_SCAN_COUNT)
            }
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
            _TASK_HELD.reset(reset)
            if not held.released:
                # Shielded: a cancelled caller must still let go of the lock. After a
                # failure (the server gone?) the lease frees it; keep that error.
                with contextlib.suppress(*((StoreError,) if body_failed else ())):
                    await asyncio.shield(self._release(layout, keys, held.token))

    def _held(self, user_id: str) -> _Held | None:
        held_by_task = _TASK_HELD.get()
        return held_by_task.get((self._ident, user_id)) if held_by_task else None

    async def _acquire(self, layout: _Layout, keys: _Keys) -> _Held:
        token = new_id().encode()
        try:
            reply = await self._acquire_script(*layout.acquire_call(keys, token))
            held = _Layout.taken(reply, token)
            deadline = time.monotonic() + layout.wait
            wake = [keys.wake + token]
            while held is None:
                popped = await self.client.blpop(wake, timeout=layout.poll)
                if popped is not None:
                    return _Held(token, popped[1])
                reply = await self._recheck_script(*layout.recheck_call(keys, token))
                held = _Layout.taken(reply, token)
                if held is None and time.monotonic() > deadline:
                    raise StoreError(f"waited over {layout.wait:g} s for a user's writer lock")
        except BaseException as exc:
            with contextlib.suppress(StoreError):
                await asyncio.shield(self._release(layout, keys, token))
            if isinstance(exc, _ERRORS):
                raise _failed("lock", exc) from exc
            raise
        return held

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
        if self._owned:
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
        return self._layout
