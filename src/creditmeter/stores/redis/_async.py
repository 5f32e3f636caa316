# unasync-target: _sync.py
# unasync-rename: AsyncRedisStore -> RedisStore
# unasync-rename: redis.asyncio -> redis
# unasync-rename: _ConnectionPool -> redis.ConnectionPool
# unasync-rename: TaskHolds -> ThreadHolds
# unasync-rename: _let_go -> _release
"""The Redis store's I/O: its client, its scripts' round trips, and the lock of ``exclusive()``.

``_async.py`` is written by hand; ``_sync.py`` is generated from it by
``tools/unasync.py``. The package docstring describes the design.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from decimal import Decimal
from types import TracebackType
from typing import Any, TypeVar

import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
from redis.backoff import NoBackoff
from redis.exceptions import AskError, MovedError, NoScriptError

from creditmeter._compat import async_sleep
from creditmeter._ids import new_id
from creditmeter.exceptions import (
    ConfigError,
    DuplicateRequest,
    ReplicationTimeout,
    StoreError,
    VersionConflict,
)
from creditmeter.models import Account, LedgerEntry
from creditmeter.queries import EntryQuery, Scan, UsageQuery, UsageRow
from creditmeter.rules import Tally
from creditmeter.serde import account_from_json, entry_from_json
from creditmeter.stores.base import Write, WriteOutcome
from creditmeter.stores.redis._shared import (
    ERRORS,
    FORK_LOCK,
    LEFT_TO_PARENT,
    TaskHolds,
    check_limit,
    covers,
    failed,
    made_before_fork,
)
from creditmeter.stores.redis.cluster import (
    ClusterOptions,
    LogCursor,
    is_cluster_url,
    node_options,
    not_applied,
    split_cluster_options,
)
from creditmeter.stores.redis.layout import (
    DATA,
    NO_TOKEN,
    GlobalKeys,
    Held,
    Keys,
    Layout,
    LogPage,
    LogRange,
    usage_values,
)
from creditmeter.stores.redis.options import (
    DEFAULT_PREFIX,
    SOCKET_TIMEOUT,
    check_prefix,
    socket_timeout,
    split_url,
)
from creditmeter.stores.redis.scripts import (
    ACQUIRE_SCRIPT,
    CLUSTER_COMMIT_SCRIPT,
    CLUSTER_DELTA_SCRIPT,
    CLUSTER_LOG_PAGE_SCRIPT,
    COMMIT_SCRIPT,
    DELTA_SCRIPT,
    LOG_PAGE_SCRIPT,
    RECHECK_SCRIPT,
    RELEASE_SCRIPT,
)

__all__ = ["AsyncRedisStore"]

_T = TypeVar("_T")
_Address = tuple[str, int]  # a node of a cluster

_SCAN_COUNT = 1000
_FILTERED_BATCH = 1000  # log items or ledger entries a filtered scan reads at a time, at least
_SUM_BATCH = 2000  # the most log items or ledger entries read at a time (a log read of 2,000
# items takes Redis about 3 ms; sum_usage reads this many)
_SUM_FETCH = 10_000  # log items whose entries sum_usage fetches at a time (one LRANGE per user)
_FIRST_RETRY_NAP = 0.01  # seconds a cluster commit first waits for a slot that moves
_LONGEST_RETRY_NAP = 0.2
_FIRST_NAP = 0.0002  # seconds a commit held off by another writer's lock first waits
_LONGEST_NAP = 0.004


class AsyncRedisStore:
    """Accounts and ledgers in Redis: one Lua script per commit, keys hash-tagged per user.

    Give a URL (``redis://host:6379/0``, ``rediss://...``, ``unix:///path``;
    ``?prefix=...`` sets the key prefix) or an existing ``redis.asyncio.Redis``
    as ``client``. Extra keyword arguments go to the client, as with
    ``redis.asyncio.Redis.from_url``; a client the store creates waits at most
    5 s to connect and for each reply unless told otherwise (``socket_timeout``,
    ``socket_connect_timeout``), and never hands out a pooled connection the
    server has closed (redis-py 8.1's async pool does, with RESP3). The store
    closes (``aclose``) only a client it created. The sync store is safe to
    share between threads; the async one is for one event loop.

    In the async store, every call may be cancelled at any await: it then
    holds no connection and no lock (a lock it held or was queued for is let
    go before the cancellation goes on), and the next call works. (On Python
    3.10 a cancellation that arrives just as redis-py finishes sending a
    command can still be lost inside redis-py; the call then runs to its end.)

    A store made before ``os.fork()`` (gunicorn ``--preload``, multiprocessing's
    fork) may be used by parent and child (the async store on the child's own
    event loop): on its first call in the child it creates a client of its
    own there, never using or closing the parent's connections. A store on a
    client given relies on that client: in a child, the sync store uses it
    (redis-py's sync pools follow a fork) unless it is a single-connection
    client, and the async store never does (redis-py's async pools do not
    check for a fork); either raises ``StoreError`` instead.

    ``exclusive(user_id)`` queues writers of a contended user in turn (see
    the package docstring); ``lock_lease`` bounds how long a vanished holder
    can keep the others waiting, ``lock_wait`` how long a writer waits. A
    commit that meets another writer's lock waits for it (at most
    ``lock_wait``) and is sent again, so a manager retries a lost
    compare-and-set at once ``contention_retries`` times before it queues.
    A plain charge that lost goes first as ``commit_delta``, which cannot
    lose to another writer; the retries and the queue serve what is left
    (holds, settles, grants, a delta whose guard failed).

    On Redis Cluster: a ``redis+cluster://host:port`` (``rediss+cluster://``)
    URL or a ``redis.asyncio.cluster.RedisCluster`` client. The keys of the
    whole store are sharded (see ``creditmeter.stores.redis.cluster``), each
    commit runs on a connection of the store's own to the user's master and
    is sent again (for at most ``retry_timeout`` seconds, 10 by default)
    while the cluster answers MOVED, ASK, TRYAGAIN or CLUSTERDOWN, or the
    master cannot be reached; NOSCRIPT (a replica promoted) loads the script
    there. So are the lock scripts of ``exclusive()`` and the reads of a
    user's keys (redis-py itself gives up on a migrating slot after about
    0.4 s). ``min_replicas=N`` (in the URL or as a keyword; 0 by default)
    follows each commit with ``WAIT N`` on the same connection and raises
    ``ReplicationTimeout`` when fewer replicas confirm within
    ``replica_timeout`` seconds (1 by default): the commit was applied, but a
    failover may lose it.
    """

    contention_retries = 8
    """Lost compare-and-sets in a row a manager retries at once before ``exclusive()``.

    Four writers of one user on this 2-core test machine: 4 kept 65-69% of one
    writer's throughput, 8 kept 85-96% with p99 under 10 ms and every writer
    progressing (a queued turn costs more round trips than a retry).
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
        cluster = isinstance(client, redis.asyncio.cluster.RedisCluster) or is_cluster_url(url)
        self._cluster = ClusterOptions()
        if cluster:
            url, self._cluster = split_cluster_options(url, options)
        if client is not None:
            if not isinstance(client, (redis.asyncio.Redis, redis.asyncio.cluster.RedisCluster)):
                raise ConfigError(
                    "client must be a redis.asyncio.Redis or redis.asyncio.cluster.RedisCluster, "
                    f"got {type(client).__name__}"
                )
            if options:
                raise ConfigError(
                    f"options {sorted(options)} apply to a URL, not to a client given ready-made"
                )
            chosen = check_prefix(DEFAULT_PREFIX if prefix is None else prefix)
            self._connect: Callable[[], redis.asyncio.Redis] | None = None
        else:
            url, chosen = split_url(url, prefix)
            # A commit whose connection fails is never sent again (see the package docstring);
            # on a cluster, commits go through connections of the store's own (_node).
            if not cluster:
                options.setdefault("retry", redis.asyncio.retry.Retry(NoBackoff(), 0))
            options.setdefault("socket_timeout", SOCKET_TIMEOUT)
            options.setdefault("socket_connect_timeout", SOCKET_TIMEOUT)
            single = bool(options.pop("single_connection_client", False))

            def connect() -> Any:
                if cluster:
                    return _cluster_client(url, options)
                # As redis.asyncio.Redis.from_url, on a _ConnectionPool (which checks connections).
                try:
                    pool = _ConnectionPool.from_url(url, **options)
                    made = redis.asyncio.Redis(
                        connection_pool=pool, single_connection_client=single
                    )
                except (ValueError, TypeError) as exc:
                    raise ConfigError(f"bad Redis URL or option: {exc}") from exc
                made.auto_close_connection_pool = True
                return made

            client = connect()
            self._connect = connect
        self._owned = self._connect is not None
        self._layout = Layout(chosen, lock_lease, lock_wait, cluster=cluster)
        self._layout.fit_poll(socket_timeout(getattr(client, "connection_pool", None)))
        self._nodes: dict[tuple[str, int], redis.asyncio.Redis] = {}
        self._ready_lock = asyncio.Lock()  # async-only
        self._ready = not cluster  # async-only
        self.prefix = chosen
        self._use(client)
        self._holds = TaskHolds()
        self._pid = os.getpid()
        self._closed = False

    def _use(self, client: Any) -> None:
        self.client = client
        self._nodes = {}
        cluster = isinstance(client, redis.asyncio.cluster.RedisCluster)
        self._commit_text = CLUSTER_COMMIT_SCRIPT if cluster else COMMIT_SCRIPT
        self._commit_script = client.register_script(self._commit_text)
        self._delta_script = client.register_script(
            CLUSTER_DELTA_SCRIPT if cluster else DELTA_SCRIPT
        )
        self._acquire_script = client.register_script(ACQUIRE_SCRIPT)
        self._recheck_script = client.register_script(RECHECK_SCRIPT)
        self._release_script = client.register_script(RELEASE_SCRIPT)
        self._log_page_script = client.register_script(
            CLUSTER_LOG_PAGE_SCRIPT if cluster else LOG_PAGE_SCRIPT
        )

    # --- the contract -------------------------------------------------------

    async def load(self, user_id: str) -> Account | None:
        """Return the stored account, or ``None``."""
        layout = self._open_layout()
        held = self._holds.get(user_id)
        if held is not None and not held.released:
            return held.account  # read with the lock, which no other writer can pass
        key = layout.keys(user_id).account
        await self._start()  # async-only
        cancels = _cancel_requests()  # async-only
        try:
            data = await self._on_cluster(lambda _: self.client.hget(key, DATA))
            await _honour_cancel(cancels)  # async-only
        except ERRORS as exc:
            raise failed("load", exc) from exc
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
        held = self._holds.get(account.user_id)
        token = NO_TOKEN if held is None or held.released else held.token
        keys, args = layout.commit_call(account, entries, expected_version, token)
        await self._start()  # async-only
        cancels = _cancel_requests()  # async-only
        try:
            reply = await self._send_commit(keys, args, account.user_id)
            await _honour_cancel(cancels)  # async-only
            if Layout.held_off(reply):
                reply = await self._send_again(layout, keys, args, account.user_id)
        except ERRORS as exc:
            raise failed("commit", exc) from exc
        if reply != 0:
            Layout.commit_outcome(reply, account, entries, expected_version)
        if held is not None:
            held.released = True  # the script passed the lock on with the new account

    async def _send_commit(
        self, keys: list[bytes], args: list[bytes], user_id: str, script: Any = None
    ) -> Any:
        """Run the commit script (or ``script``, the delta script) once; its reply."""
        if script is None:
            script = self._commit_script
        if self._layout.cluster:
            return await self._send_to_master(keys, args, user_id, script)
        try:  # EVALSHA by hand: calling the script object costs more (sync: 4 µs a commit)
            return await self.client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:  # flushed, or another server: redis-py loads it and runs it
            return await script(keys, args)

    async def _send_to_master(
        self, keys: list[bytes], args: list[bytes], user_id: str, script: Any
    ) -> Any:
        """Run a commit's script on the user's master (Redis Cluster), then WAIT if asked.

        On a connection of the store's own to that master, as a pipeline
        (not a transaction: WAIT returns 0 inside MULTI) of EVALSHA and, with
        ``min_replicas``, WAIT, which then counts the replicas that have the
        commit. Sent again while an answer proves it was not run (see
        ``_on_cluster``); NOSCRIPT loads the script on that node (scripts are
        not replicated: a promoted replica lacks it).
        """
        options = self._cluster
        replies = await self._on_cluster(
            lambda asking: self._commit_on_node(keys, args, asking, script)
        )
        reply = replies[0]
        if options.min_replicas and Layout.written(reply):
            confirmed = replies[-1]
            if isinstance(confirmed, Exception):
                raise confirmed
            if int(confirmed) < options.min_replicas:
                raise ReplicationTimeout(
                    user_id, wanted=options.min_replicas, confirmed=int(confirmed)
                )
        return reply

    async def _on_cluster(
        self,
        send: Callable[[_Address | None], Awaitable[_T]],  # async-only
        # sync-only: send: Callable[[_Address | None], _T],
    ) -> _T:
        """``send(asking)`` once, and on Redis Cluster again while an error proves it did not run.

        Such errors (``cluster.not_applied``): MOVED, ASK, TRYAGAIN, redis-py
        giving up after too many of those (it tries a migrating slot for about
        0.4 s only), CLUSTERDOWN, a slot not covered, a node that could not be
        reached. ``asking`` is None, or the node an ASK sent the call to (a
        call on the store's own node connections then sends ASKING first;
        calls through the cluster client follow ASK themselves). MOVED and the
        other errors but ASK refresh the client's map of the slots; all but
        MOVED and ASK nap first, from 10 ms doubling to 200 ms. The naps and
        sends stop once ``retry_timeout`` seconds have passed: the last error
        is raised. Any other error, or one after a send that may have run, is
        raised at once.
        """
        if not self._layout.cluster:
            return await send(None)
        deadline = time.monotonic() + self._cluster.retry_timeout
        nap = _FIRST_RETRY_NAP
        asking: _Address | None = None
        while True:
            try:
                return await send(asking)
            except ERRORS as exc:  # noqa: PERF203 - rare; the loop is the point
                left = deadline - time.monotonic()
                if not not_applied(exc) or left <= 0:
                    raise
                asking = None
                if isinstance(exc, MovedError) or not isinstance(exc, AskError):
                    if not isinstance(exc, MovedError):
                        await async_sleep(min(nap, left))
                        nap = min(nap * 2, _LONGEST_RETRY_NAP)
                    await self._refresh_slots()
                else:
                    asking = (str(exc.host), int(exc.port))

    async def _commit_on_node(
        self, keys: list[bytes], args: list[bytes], asking: _Address | None, script: Any
    ) -> list[Any]:
        """EVALSHA (after ASKING when redirected) and WAIT if asked, in one pipeline.

        Its replies from EVALSHA on. An error reply of EVALSHA is raised; on
        NOSCRIPT the script is loaded on that node and the pipeline sent once
        more.
        """
        if asking is None:
            node = self.client.get_node_from_key(keys[0])
            address = (str(node.host), int(node.port))
        else:
            address = asking
        client = self._node(address)
        options = self._cluster
        for loaded in (False, True):
            async with client.pipeline(transaction=False) as pipe:
                command: Any = pipe.execute_command  # the sync pipeline's is not annotated
                if asking is not None:
                    command("ASKING")
                pipe.evalsha(script.sha, len(keys), *keys, *args)
                if options.min_replicas:
                    command("WAIT", options.min_replicas, options.wait_ms)
                replies = list(await pipe.execute(raise_on_error=False))
            if asking is not None:
                replies = replies[1:]
            if isinstance(replies[0], NoScriptError) and not loaded:
                await client.script_load(script.script)
                continue
            if isinstance(replies[0], Exception):
                raise replies[0]
            break
        return replies

    def _node(self, address: tuple[str, int]) -> redis.asyncio.Redis:
        """The store's own client of one node of the cluster (made on first use)."""
        client = self._nodes.get(address)
        if client is None:
            given = getattr(self.client, "connection_kwargs", None)
            if given is None:  # the sync RedisCluster keeps them with its nodes
                given = self.client.nodes_manager.connection_kwargs
            client = redis.asyncio.Redis(
                host=address[0],
                port=address[1],
                retry=redis.asyncio.retry.Retry(NoBackoff(), 0),
                **node_options(given),
            )
            self._nodes[address] = client
        return client

    async def _refresh_slots(self) -> None:
        """Have the cluster client read which node serves which slot again (best effort)."""
        with contextlib.suppress(*ERRORS):
            await self.client.nodes_manager.initialize()

    async def _send_again(
        self,
        layout: Layout,
        keys: list[bytes],
        args: list[bytes],
        user_id: str,
        script: Any = None,
    ) -> Any:
        """Send a commit held off by another writer's lock again until that writer is done.

        The commit is still good while the version it expects stays stored,
        so it waits (naps from 0.2 ms, doubling up to 4 ms: a holder's turn
        is two round trips) rather than losing and queueing for the lock
        itself; at most ``lock_wait`` seconds. The reply that is not held
        off is returned: written, lost or a duplicate.
        """
        cancels = _cancel_requests()  # async-only
        deadline = time.monotonic() + layout.wait
        nap = _FIRST_NAP
        while True:
            if time.monotonic() > deadline:
                raise StoreError(f"waited over {layout.wait:g} s for a user's writer lock")
            await async_sleep(nap)
            nap = min(nap * 2, _LONGEST_NAP)
            reply = await self._send_commit(keys, args, user_id, script)
            await _honour_cancel(cancels)  # async-only
            if not Layout.held_off(reply):
                return reply

    async def commit_delta(
        self, account: Account, entry: LedgerEntry, *, floor: Decimal | None
    ) -> tuple[Decimal, int, datetime]:
        """Add the entry's amount to the stored balance in one script run, if guarded.

        See ``DeltaStore``. The script adds the decimal text exactly (digit
        by digit: Lua's numbers are doubles) and compares the stored
        account's JSON with the planned one's around the three values a
        delta may find moved. While another writer holds ``exclusive()`` it
        is held off and sent again once that writer is done, as ``commit()``
        is: writers of a hot user stop losing compare-and-sets to each other.
        """
        layout = self._open_layout()
        held = self._holds.get(account.user_id)
        token = NO_TOKEN if held is None or held.released else held.token
        keys, args = layout.delta_call(account, entry, floor, token)
        script = self._delta_script
        await self._start()  # async-only
        cancels = _cancel_requests()  # async-only
        try:
            reply = await self._send_commit(keys, args, account.user_id, script)
            await _honour_cancel(cancels)  # async-only
            if Layout.held_off(reply):
                reply = await self._send_again(layout, keys, args, account.user_id, script)
        except ERRORS as exc:
            raise failed("commit", exc) from exc
        reached = Layout.delta_outcome(reply, account, entry)
        if held is not None:
            held.released = True  # the script passed the lock on with the new account
        return reached

    async def commit_many(self, writes: Sequence[Write]) -> list[WriteOutcome]:
        """Commit each write as ``commit()`` would: the commit script once per write, pipelined.

        One round trip (a pipeline, not a transaction): each script run is
        atomic on its own, and one that meets a ``VersionConflict`` or a
        ``DuplicateRequest`` (returned in its slot) writes nothing while the
        others apply. A failure of the server or the link raises
        ``StoreError``; the writes sent before it may have applied.
        """
        layout = self._open_layout()
        if not writes:
            return []
        if layout.cluster:  # a pipeline would not wait for replicas nor retry a moved slot
            outcomes: list[WriteOutcome] = []
            for account, entries, expected_version in writes:
                try:
                    await self.commit(account, entries, expected_version=expected_version)
                    outcomes.append(None)
                except (VersionConflict, DuplicateRequest) as met:  # noqa: PERF203
                    outcomes.append(met)
            return outcomes
        calls = []
        holds = []
        for account, entries, expected_version in writes:
            held = self._holds.get(account.user_id)
            token = NO_TOKEN if held is None or held.released else held.token
            calls.append(layout.commit_call(account, entries, expected_version, token))
            holds.append(held)
        cancels = _cancel_requests()  # async-only
        try:
            replies = await self._pipelined(calls)
            missing = [n for n, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if missing:  # flushed, or another server: load the script, send those again
                await self.client.script_load(COMMIT_SCRIPT)
                again = await self._pipelined([calls[n] for n in missing])
                for n, reply in zip(missing, again, strict=True):
                    replies[n] = reply
            await _honour_cancel(cancels)  # async-only
        except ERRORS as exc:
            raise failed("commit", exc) from exc
        return self._outcomes(writes, replies, holds)

    @staticmethod
    def _outcomes(
        writes: Sequence[Write], replies: list[Any], holds: list[Held | None]
    ) -> list[WriteOutcome]:
        """What each write of ``commit_many`` met, from the script's replies (as ``commit()``)."""
        outcomes: list[WriteOutcome] = []
        for write, reply, held in zip(writes, replies, holds, strict=True):
            account, entries, expected_version = write
            if isinstance(reply, Exception):
                raise failed("commit", reply)
            if reply == 0:
                outcomes.append(None)
                if held is not None:
                    held.released = True  # the script passed the lock on with the new account
                continue
            try:
                Layout.commit_outcome(reply, account, entries, expected_version)
            except (VersionConflict, DuplicateRequest) as met:
                outcomes.append(met)
        return outcomes

    async def _pipelined(self, calls: list[tuple[list[bytes], list[bytes]]]) -> list[Any]:
        """Run the commit script once per call in one pipeline; the replies (errors as values)."""
        sha = self._commit_script.sha
        async with self.client.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                pipe.evalsha(sha, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))

    async def find_request(self, user_id: str, request_id: str) -> LedgerEntry | None:
        """Return the entry recorded under ``request_id``, if any."""
        key = self._open_layout().keys(user_id).requests
        await self._start()  # async-only
        cancels = _cancel_requests()  # async-only
        try:
            field = request_id.encode()
            data = await self._on_cluster(lambda _: self.client.hget(key, field))
            await _honour_cancel(cancels)  # async-only
        except ERRORS as exc:
            raise failed("read", exc) from exc
        return None if data is None else entry_from_json(data, user_id=user_id)

    async def ledger(self, user_id: str, *, limit: int | None = None) -> list[LedgerEntry]:
        """Return the user's entries, oldest first (the newest ``limit`` if given)."""
        key = self._open_layout().keys(user_id).ledger
        bounds = Layout.tail(limit)
        if bounds is None:
            return []
        await self._start()  # async-only
        cancels = _cancel_requests()  # async-only
        try:
            rows = await self._lrange(key, *bounds)
            await _honour_cancel(cancels)  # async-only
        except ERRORS as exc:
            raise failed("read", exc) from exc
        return [entry_from_json(row, user_id=user_id) for row in rows]

    async def _lrange(self, key: bytes, low: int, high: int) -> list[Any]:
        """LRANGE of a user's list (sent again on Redis Cluster as ``_on_cluster`` says)."""
        return list(await self._on_cluster(lambda _: self.client.lrange(key, low, high)))

    async def users(self) -> list[str]:
        """Return every user id, sorted (read with SSCAN, never KEYS)."""
        layout = self._open_layout()
        await self._start()  # async-only
        cancels = _cancel_requests()  # async-only
        members: set[bytes | str] = set()
        try:
            for shard in layout.shards:  # one on a single server
                scan = self.client.sscan_iter(shard.users, count=_SCAN_COUNT)
                members.update({member async for member in scan})  # async-only
                # sync-only: members.update(scan)
            await _honour_cancel(cancels)  # async-only
        except ERRORS as exc:
            raise failed("read", exc) from exc
        return layout.user_ids(members)

    # --- reports (ReportStore) ---------------------------------------------

    async def scan_entries(self, query: EntryQuery, *, after: str | None, limit: int) -> Scan:
        """Up to ``limit`` entries the query covers, in commit order, after position ``after``.

        Of every user: read from the log, whose stream ids are the positions;
        a page's entries are fetched with one LRANGE per user, pipelined. Of
        one user: read from that user's ledger, whose indexes are the
        positions (it also holds entries committed before the log existed).
        A malformed position raises ``InvalidInput``.
        """
        layout = self._open_layout()
        check_limit(limit)
        await self._start()  # async-only
        if query.user_id is not None:
            return await self._scan_ledger(layout, query, after, limit)
        if layout.cluster:
            try:
                return await self._scan_shards(layout, query, LogCursor.parse(after), limit)
            except ERRORS as exc:
                raise failed("read", exc) from exc
        first = Layout.log_start(after)
        batch = min(limit if query.kinds is None else max(limit, _FILTERED_BATCH), _SUM_BATCH)
        found: list[LedgerEntry] = []
        cancels = _cancel_requests()  # async-only
        try:
            span = await self._log_range(layout, first, query.since, query.until, layout.globals)
            await _honour_cancel(cancels)  # async-only
            while span is not None:
                page = LogPage()
                page.add((await self._log_page(span, batch, layout.globals))[1])
                await _honour_cancel(cancels)  # async-only
                texts = await self._entry_texts(layout, page)
                await _honour_cancel(cancels)  # async-only
                for number, text in enumerate(texts):
                    entry = entry_from_json(text, user_id=page.users[number])
                    if covers(query, entry):
                        found.append(entry)
                        if len(found) == limit:
                            more = number + 1 < len(texts) or len(texts) == batch
                            return Scan(found, page.ids[number] if more else None)
                if len(texts) < batch:
                    break
                span = span.after(page.ids[-1])
        except ERRORS as exc:
            raise failed("read", exc) from exc
        return Scan(found, None)

    async def _scan_ledger(
        self, layout: Layout, query: EntryQuery, after: str | None, limit: int
    ) -> Scan:
        """``scan_entries`` of one user: positions are indexes into the user's ledger."""
        index = Layout.ledger_index(after)
        user_id = query.user_id or ""
        key = layout.keys(user_id).ledger
        filtered = query.kinds is not None or query.since is not None or query.until is not None
        batch = min(max(limit, _FILTERED_BATCH) if filtered else limit, _SUM_BATCH)
        found: list[LedgerEntry] = []
        cancels = _cancel_requests()  # async-only
        try:
            while True:
                rows = await self._lrange(key, index, index + batch - 1)
                await _honour_cancel(cancels)  # async-only
                for number, row in enumerate(rows):
                    entry = entry_from_json(row, user_id=user_id)
                    if covers(query, entry):
                        found.append(entry)
                        if len(found) == limit:
                            more = number + 1 < len(rows) or len(rows) == batch
                            return Scan(found, str(index + number + 1) if more else None)
                if len(rows) < batch:
                    return Scan(found, None)
                index += batch
        except ERRORS as exc:
            raise failed("read", exc) from exc

    async def sum_usage(self, query: UsageQuery) -> list[UsageRow]:
        """The query's charges summed per group with ``rules.Tally`` (exact), in any order.

        Of every user: the log's range of ids that can hold ``[since, until)``
        (see ``layout``), its entries read a page at a time. Of one user: that
        user's whole ledger, a page at a time.
        """
        layout = self._open_layout()
        tally = Tally(query)
        await self._start()  # async-only
        try:
            if query.user_id is None:
                for shard in layout.shards:  # one on a single server
                    await self._sum_log(layout, tally, shard)
            else:
                await self._sum_ledger(layout, query.user_id, tally)
        except ERRORS as exc:
            raise failed("read", exc) from exc
        return tally.rows()

    async def _sum_ledger(self, layout: Layout, user_id: str, tally: Tally) -> None:
        add = tally.add_values
        key = layout.keys(user_id).ledger
        index = 0
        cancels = _cancel_requests()  # async-only
        while True:
            rows = await self._lrange(key, index, index + _SUM_BATCH - 1)
            await _honour_cancel(cancels)  # async-only
            for row in rows:
                values = usage_values(row, user_id)
                if values is not None:
                    add(*values)
            if len(rows) < _SUM_BATCH:
                return
            index += _SUM_BATCH

    async def _sum_log(self, layout: Layout, tally: Tally, shard: GlobalKeys) -> None:
        add = tally.add_values
        query = tally.query
        cancels = _cancel_requests()  # async-only
        span = await self._log_range(layout, (0, 0), query.since, query.until, shard)
        await _honour_cancel(cancels)  # async-only
        while span is not None:
            # Several reads of the log, then their entries at once: a user then has
            # more entries per LRANGE (each command costs redis-py some 10 µs).
            page = LogPage()
            while span is not None and len(page.ids) < _SUM_FETCH:
                read = page.add((await self._log_page(span, _SUM_BATCH, shard))[1])
                await _honour_cancel(cancels)  # async-only
                span = None if read < _SUM_BATCH else span.after(page.ids[-1])
            texts = await self._entry_texts(layout, page)
            await _honour_cancel(cancels)  # async-only
            for user_id, text in zip(page.users, texts, strict=True):
                values = usage_values(text, user_id)
                if values is not None:
                    add(*values)

    async def _log_range(
        self,
        layout: Layout,
        first: tuple[int, int] | None,
        since: datetime | None,
        until: datetime | None,
        shard: GlobalKeys,
    ) -> LogRange | None:
        """The ids of a log to read from ``first`` for ``[since, until)`` (skew read if needed)."""
        del layout  # the shard names the keys
        skew = None
        if first is not None and (since is not None or until is not None):
            skew = await self.client.hmget(shard.skew, [b"ahead", b"behind"])
        return Layout.log_range(first, since, until, skew)

    async def _log_page(
        self, span: LogRange, count: int, shard: GlobalKeys
    ) -> tuple[bytes | None, bytes | str]:
        """Up to ``count`` items of a log in ``span``, read with ``log_page.lua`` (its reply).

        On Redis Cluster, also the stream id of the server's time at the read.
        """
        keys = [shard.log]
        args = [span.start(), span.end(), b"%d" % count]
        script = self._log_page_script
        try:
            reply = await self.client.evalsha(script.sha, 1, *keys, *args)
        except NoScriptError:  # flushed, or another server: redis-py loads it and runs it
            reply = await script(keys, args)
        if not isinstance(reply, (bytes, str)):
            raise StoreError(f"unexpected reply from the Redis log script: {reply!r}")
        if not self._layout.cluster:
            return None, reply
        text = reply.encode() if isinstance(reply, str) else reply
        head, _, items = text.partition(b" ")
        return head, items

    async def _scan_shards(
        self, layout: Layout, query: EntryQuery, cursor: LogCursor | None, limit: int
    ) -> Scan:
        """``scan_entries`` of every user on Redis Cluster: the shards' logs merged.

        Merged order is (stream id, shard). Each round reads up to a batch of
        each shard's log and passes on only the items that no unread one can
        precede: before the last item of each shard read in full, and older
        than the earliest of the shards' times at the read (a commit made
        after a shard was read gets a later id; see ``cluster``). A page may
        so end early, with a position to go on from.
        """
        batch = min(limit if query.kinds is None else max(limit, _FILTERED_BATCH), _SUM_BATCH)
        spans: list[LogRange | None] = []
        for number, shard in enumerate(layout.shards):
            first = (0, 0) if cursor is None else cursor.start(number)
            spans.append(await self._log_range(layout, first, query.since, query.until, shard))
        found: list[LedgerEntry] = []
        cancels = _cancel_requests()  # async-only
        while True:
            items, safe, bound = await self._read_shards(layout, spans, batch)
            await _honour_cancel(cancels)  # async-only
            ready = _ready(items, safe, bound)
            if ready:
                page = LogPage()
                for _, stream_id, user, index in ready:
                    page.append(stream_id, user, index)
                texts = await self._entry_texts(layout, page)
                await _honour_cancel(cancels)  # async-only
                for number, text in enumerate(texts):
                    entry = entry_from_json(text, user_id=page.users[number])
                    if covers(query, entry):
                        found.append(entry)
                        if len(found) == limit:
                            more = (
                                number + 1 < len(ready)
                                or len(items) > len(ready)
                                or bound is not None
                            )
                            return Scan(found, ready[number][0].text() if more else None)
                cursor = ready[-1][0]
            held = len(ready) < len(items)  # items newer than a shard's read wait
            if bound is None or (held and not ready):  # else: the next round
                return Scan(found, (cursor or LogCursor(0, 0, 0)).text() if held else None)
            spans = _spans_after(spans, cursor)

    async def _read_shards(
        self, layout: Layout, spans: list[LogRange | None], batch: int
    ) -> tuple[list[_Item], tuple[int, int] | None, LogCursor | None]:
        """A batch of each shard's log in its span, merged, and what bounds what may pass.

        Also the earliest of the shards' times at their reads, and the first
        of the last items of the shards that had more than a batch (None if
        none had).
        """
        safe: tuple[int, int] | None = None
        bound: LogCursor | None = None
        items: list[_Item] = []
        for number, shard in enumerate(layout.shards):
            span = spans[number]
            if span is None:
                continue
            head, reply = await self._log_page(span, batch, shard)
            now = _id_of(head)
            safe = now if safe is None else min(safe, now)
            page = LogPage()
            page.add(reply)
            for stream_id, user, index in zip(page.ids, page.users, page.indexes, strict=True):
                ms, seq = _id_of(stream_id)
                items.append((LogCursor(ms, seq, number), stream_id, user, index))
            if len(page.ids) == batch:
                last = items[-1][0]
                bound = last if bound is None else min(bound, last)
        items.sort()
        return items, safe, bound

    async def _entry_texts(self, layout: Layout, page: LogPage) -> list[bytes | str]:
        """The JSON of each entry a page of the log refers to: one LRANGE per user, pipelined."""
        reads = page.reads(layout)
        if not reads:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for key, low, high in reads:
                pipe.lrange(key, low, high)
            rows = await pipe.execute()
        return page.texts(rows)

    async def users_page(self, *, after: str | None, limit: int) -> list[str]:
        """Up to ``limit`` user ids after ``after``, sorted (ZRANGEBYLEX of the sorted ids).

        UTF-8 bytes sort as code points do. When the users set holds more ids
        than the sorted ids (users created before the sorted ids existed, or
        by an earlier version still running), the sorted ids are completed
        from the set first: once, a full SSCAN.
        """
        layout = self._open_layout()
        check_limit(limit)
        start = Layout.lex_after(after)
        found = layout.globals
        await self._start()  # async-only
        cancels = _cancel_requests()  # async-only
        if layout.cluster:  # each shard's first ids, merged
            try:
                merged: list[bytes | str] = []
                for shard in layout.shards:
                    merged += await self.client.zrangebylex(
                        shard.sorted_users, start, b"+", 0, limit
                    )
                await _honour_cancel(cancels)  # async-only
            except ERRORS as exc:
                raise failed("read", exc) from exc
            return sorted(Layout.user_page(merged))[:limit]
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.zrangebylex(found.sorted_users, start, b"+", 0, limit)
                pipe.scard(found.users)
                pipe.zcard(found.sorted_users)
                page, users, indexed = await pipe.execute()
            await _honour_cancel(cancels)  # async-only
            if users > indexed:  # more only after a commit that did not add to both
                await self._index_users(layout)
                page = await self.client.zrangebylex(found.sorted_users, start, b"+", 0, limit)
                await _honour_cancel(cancels)  # async-only
        except ERRORS as exc:
            raise failed("read", exc) from exc
        return Layout.user_page(page)

    async def _index_users(self, layout: Layout) -> None:
        """Add every id of the users set to the sorted ids (ZADD: adding one twice is harmless)."""
        found = layout.globals
        batch: list[bytes] = []
        async for member in self.client.sscan_iter(found.users, count=_SCAN_COUNT):
            batch.append(member.encode() if isinstance(member, str) else member)
            if len(batch) >= _SCAN_COUNT:
                await self.client.zadd(found.sorted_users, dict.fromkeys(batch, 0))
                batch = []
        if batch:
            await self.client.zadd(found.sorted_users, dict.fromkeys(batch, 0))

    # --- writers in turn ----------------------------------------------------

    @asynccontextmanager
    async def exclusive(self, user_id: str) -> AsyncIterator[None]:
        """Keep every other writer of ``user_id`` (any process, any host) out until the block ends.

        Managers use it for a user whose compare-and-set they recently lost:
        writers queue for the user's lock and are served in turn, each handed
        the account by the one before, so none loses again; a commit passes
        the lock on in the same script. Re-entering it in the same thread (in
        the async store: the same task) is a no-op.
        """
        layout = self._open_layout()
        if self._holds.get(user_id) is not None:
            yield
            return
        keys = layout.keys(user_id)
        await self._start()  # async-only
        held = await self._acquire(layout, keys)
        body_failed = True
        try:
            with self._holds.holding(user_id, held):
                yield
            body_failed = False
        finally:
            if not held.released and held.pid == os.getpid():
                # A cancelled caller lets go of the lock too.  # async-only
                # After a failure (the server gone?) the lease frees the lock; keep that error.
                with contextlib.suppress(*((StoreError,) if body_failed else ())):
                    await self._let_go(layout, keys, held.token)

    async def _acquire(self, layout: Layout, keys: Keys) -> Held:
        token = new_id().encode()
        cancels = _cancel_requests()  # async-only
        try:
            acquire = layout.acquire_call(keys, token)
            reply = await self._on_cluster(lambda _: self._acquire_script(*acquire))
            await _honour_cancel(cancels)  # async-only
            held = Layout.taken(reply, token)
            deadline = time.monotonic() + layout.wait
            wake = [keys.wake + token]
            recheck = layout.recheck_call(keys, token)
            while held is None:
                popped = await self._on_cluster(
                    lambda _: self.client.blpop(wake, timeout=layout.poll)
                )
                await _honour_cancel(cancels)  # async-only
                if popped is not None:
                    return Held(token, popped[1])
                reply = await self._on_cluster(lambda _: self._recheck_script(*recheck))
                await _honour_cancel(cancels)  # async-only
                held = Layout.taken(reply, token)
                if held is None and time.monotonic() > deadline:
                    raise StoreError(f"waited over {layout.wait:g} s for a user's writer lock")
        except BaseException as exc:
            with contextlib.suppress(StoreError):
                await self._let_go(layout, keys, token)
            if isinstance(exc, ERRORS):
                raise failed("lock", exc) from exc
            raise
        return held

    # async-only: begin
    async def _start(self) -> None:
        """Initialise a cluster client once, under a lock, before its first command.

        Concurrent first commands on a ``redis.asyncio.cluster.RedisCluster``
        each start initialising it and race (redis-py 8.1 then raises
        ``AttributeError``). A single server's client needs no start.
        """
        if self._ready:
            return
        async with self._ready_lock:
            if self._ready:
                return
            try:
                await self.client.initialize()
            except ERRORS as exc:
                raise failed("connect", exc) from exc
            self._ready = True

    async def _let_go(self, layout: Layout, keys: Keys, token: bytes) -> None:
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

    # async-only: end
    async def _release(self, layout: Layout, keys: Keys, token: bytes) -> None:
        """Run the release script, again as ``_on_cluster`` says (it acts on ``token`` only)."""
        release = layout.release_call(keys, token)
        try:
            await self._on_cluster(lambda _: self._release_script(*release))
        except ERRORS as exc:
            raise failed("unlock", exc) from exc

    # --- lifecycle ----------------------------------------------------------

    async def aclose(self) -> None:
        """Close the client if this store created it; further use raises ``StoreError``."""
        if self._closed:
            return
        self._closed = True
        if self._owned and self._pid != os.getpid():
            LEFT_TO_PARENT.append(self.client)  # made before a fork: the parent's to close
        elif self._pid != os.getpid():
            LEFT_TO_PARENT.extend(self._nodes.values())
        else:
            try:
                for node in self._nodes.values():
                    await node.aclose()
                if self._owned:
                    await self.client.aclose()
            except ERRORS as exc:
                raise failed("close", exc) from exc

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

    def _open_layout(self) -> Layout:
        if self._closed:
            raise StoreError("the store is closed")
        if self._pid != os.getpid():
            self._after_fork()
        return self._layout

    def _after_fork(self) -> None:
        """Switch to connections of this process's own (see the class docstring)."""
        with FORK_LOCK[0]:
            if self._pid == os.getpid():
                return  # another thread switched
            LEFT_TO_PARENT.extend(self._nodes.values())
            if self._connect is not None:
                self._ready = not self._layout.cluster  # async-only
                self._ready_lock = asyncio.Lock()  # async-only
                LEFT_TO_PARENT.append(self.client)
                self._use(self._connect())
            # sync-only: elif getattr(self.client, "connection", None) is not None:
            else:  # async-only
                raise made_before_fork("AsyncRedisStore", self._pid)
            self._holds = TaskHolds()  # the parent's locks are not this process's
            self._pid = os.getpid()


_Item = tuple[LogCursor, str, str, int]  # a merged log item: position, stream id, user, index


def _ready(
    items: list[_Item], safe: tuple[int, int] | None, bound: LogCursor | None
) -> list[_Item]:
    """The merged items no unread one can precede: older than ``safe``, up to ``bound``."""
    return [
        item
        for item in items
        if (safe is None or (item[0].ms, item[0].seq) < safe)
        and (bound is None or item[0] <= bound)
    ]


def _spans_after(spans: list[LogRange | None], cursor: LogCursor | None) -> list[LogRange | None]:
    """The shards' spans left to read past ``cursor``."""
    if cursor is None:
        return spans
    left: list[LogRange | None] = []
    for number, span in enumerate(spans):
        first = None if span is None else max(span.first, cursor.start(number))
        if span is None or first is None or (span.last is not None and first[0] > span.last):
            left.append(None)
        else:
            left.append(LogRange(first, span.last))
    return left


def _id_of(stream_id: bytes | str | None) -> tuple[int, int]:
    """A stream id ``<ms>-<seq>`` as two ints."""
    text = stream_id.decode() if isinstance(stream_id, bytes) else str(stream_id)
    ms, _, seq = text.partition("-")
    try:
        return int(ms), int(seq)
    except ValueError as exc:
        raise StoreError(f"bad stream id from a Redis log script: {text!r}") from exc


def _cluster_client(url: str, options: dict[str, Any]) -> redis.asyncio.cluster.RedisCluster:
    """A cluster client from a ``redis://`` URL (the store's options already taken out)."""
    try:
        return redis.asyncio.cluster.RedisCluster.from_url(url, **options)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"bad Redis URL or option: {exc}") from exc
    except ERRORS as exc:  # the sync client connects at once
        raise failed("connect", exc) from exc


# async-only: begin
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


def _cancel_requests() -> int:
    """How many times the current task has been asked to cancel (0 before Python 3.11)."""
    counter = getattr(asyncio.current_task(), "cancelling", None)
    return int(counter()) if counter is not None else 0


async def _honour_cancel(before: int) -> None:
    """Raise the task's cancellation if one was requested since ``before`` and then dropped.

    redis-py sends each command under ``asyncio.wait_for(send, socket_timeout)``,
    and before Python 3.12 ``wait_for`` returns the result and drops the
    cancellation when the task is cancelled just as the send completes
    (CPython gh-86296): the cancelled call went on, queued for the user's
    lock and took it. The task's count of cancellation requests (3.11+)
    shows such a request. One still pending is raised at the next suspension,
    which ``sleep(0)`` is; if that passes, the request was dropped.
    """
    if _cancel_requests() > before:
        await asyncio.sleep(0)
        raise asyncio.CancelledError


# async-only: end
