"""Balances in Redis, shared by every process and host that reaches the server.

``RedisStore`` and ``AsyncRedisStore`` keep the same keys and run the same
scripts. What does no I/O is kept apart from the two transports:

- ``options``: the URL, key prefix and lock times, checked;
- ``layout``: each user's keys, all in one Redis Cluster slot (the key layout
  is drawn there), the scripts' KEYS and ARGV, and what their replies mean;
- ``scripts``: the Lua scripts, kept as ``lua/*.lua``;
- ``_async``: ``AsyncRedisStore``, written by hand; ``_sync``: ``RedisStore``,
  generated from it by ``tools/unasync.py``; ``_shared``: what both use at
  run time.

A commit is one Lua script (``COMMIT_SCRIPT``), sent with EVALSHA and loaded
again if the server answers NOSCRIPT: it checks the request ids, compares the
stored version with the expected one, then writes the account, appends the
ledger entries, records the request ids, appends a reference to each entry to
the log (what ``scan_entries`` and ``sum_usage`` read, in commit order) and,
when the account is new, adds the user to the users set and the sorted ids.
Values travel only as KEYS and ARGV. A lost compare-and-set returns the stored
account and a repeated request id returns the entry applied first. An
uncontended commit is one round trip.

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

A lost compare-and-set of a plain charge is retried as a delta
(``DELTA_SCRIPT``, ``commit_delta``), and so is every charge of a user
whose writers keep losing: the script adds the cost to the balance it holds,
exactly (decimal digits as text: Lua's numbers are doubles), if the stored
account is the planned one but for its balance, version and ``updated_at``
and the balance is at least the floor the rules gave. Such a charge cannot
lose to another writer, so hot users rarely queue for the lock at all.

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

On one Redis server the global keys (the users set, the sorted ids, the log
and its clock skew; ``layout.GlobalKeys``) are one set, outside the users'
slots. On Redis Cluster (``redis+cluster://``, ``cluster``) they are split
into shards, a user's keys share the slot of the user's shard, and readers
merge the shards. Entries committed before the log existed (an upgrade
from 0.1) are not in it: reports over all users start at the upgrade, while a
report of one user reads that user's whole ledger. It needs Redis 6.0 or later
(``BLPOP`` with a fractional timeout, ``SET ... PX`` with ``NX`` or ``XX``).
"""

from __future__ import annotations

from creditmeter.stores.redis._async import AsyncRedisStore
from creditmeter.stores.redis._sync import RedisStore
from creditmeter.stores.redis.options import DEFAULT_PREFIX
from creditmeter.stores.redis.scripts import (
    ACQUIRE_SCRIPT,
    COMMIT_SCRIPT,
    DELTA_SCRIPT,
    RECHECK_SCRIPT,
    RELEASE_SCRIPT,
)

__all__ = [
    "ACQUIRE_SCRIPT",
    "COMMIT_SCRIPT",
    "DEFAULT_PREFIX",
    "DELTA_SCRIPT",
    "RECHECK_SCRIPT",
    "RELEASE_SCRIPT",
    "AsyncRedisStore",
    "RedisStore",
]
