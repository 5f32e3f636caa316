"""What a Redis store does differently on Redis Cluster, without I/O.

On a cluster a script may touch keys of one slot only. A commit writes the
user's keys and appends to the log (and, for a new user, to the users set
and the sorted ids), so the keys of the whole store are split into
``SHARDS`` shards, each under a hash tag of its own, and a user's keys carry
their shard's tag (``P{sNN}:u<hex>:account``...): a commit writes one slot.
A user's shard is a stable hash of the id (CRC-32 of its UTF-8 bytes), the
shards' tags are chosen so that their slots spread evenly over the 16,384
(three masters holding a third of the slots each hold about a third of the
shards), and readers merge the shards: ``users()`` unites their sets,
``users_page`` merges their sorted ids, ``sum_usage`` adds up their logs,
and ``scan_entries`` merges their logs in stream-id order.

Stream ids on a cluster are not left to ``XADD *``: that gives ids of whole
milliseconds, so two commits in a row on two masters could get one id and be
read in the wrong order. The commit script builds each id from the server's
clock in microseconds (``<ms>-<µs of the ms * 1000 + n>``, above the stream's
last id), and a log read returns the server's time with its items. A merged
page gives only items older than the earliest of those times: a commit that
a shard had not yet made when it was read gets a later id, so paging while
others write misses nothing. This holds for masters whose clocks agree (NTP
keeps them within a millisecond or so); a master running ahead delays its
entries in scans until the others' clocks pass them.

The cluster store's options (``RedisCluster`` drops keyword arguments it does
not know, so the store reads its own from the URL and keywords first):

- ``min_replicas`` (0): replicas that must confirm each commit (``WAIT``)
  within ``replica_timeout`` seconds (1.0), else ``ReplicationTimeout``;
- ``retry_timeout`` (10.0): how long a commit is sent again while the
  cluster answers that it moved, is migrating or is failing over.
"""

from __future__ import annotations

import binascii
import zlib
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)

from creditmeter.exceptions import ConfigError, InvalidInput

__all__ = [
    "CLUSTER_SCHEMES",
    "SHARDS",
    "SLOTS",
    "ClusterOptions",
    "LogCursor",
    "is_cluster_url",
    "not_applied",
    "shard_of",
    "shard_tags",
    "split_cluster_options",
]

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SHARDS = 16  # fixed: a user's shard, so where its keys live, follows from it
SLOTS = 16384
_MAX_SECONDS = 86_400.0
_MAX_REPLICAS = 1000
_OPTION_NAMES = ("min_replicas", "replica_timeout", "retry_timeout")


class ClusterOptions(NamedTuple):
    """The options a cluster store reads itself, checked."""

    min_replicas: int = 0
    replica_timeout: float = 1.0
    retry_timeout: float = 10.0

    @property
    def wait_ms(self) -> int:
        """WAIT's timeout in milliseconds (never 0, which would wait for ever)."""
        return max(int(self.replica_timeout * 1000), 1)


def is_cluster_url(url: object) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://``, ``rediss+cluster://``)."""
    return isinstance(url, str) and url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def _min_replicas(value: object, where: str) -> int:
    if isinstance(value, str):
        text = value.strip()
        if not (text.isascii() and text.isdigit()):
            raise ConfigError(f"min_replicas {where} must be a whole number >= 0, got {value!r}")
        value = int(text)
    if type(value) is not int or not 0 <= value <= _MAX_REPLICAS:
        raise ConfigError(
            f"min_replicas {where} must be an int from 0 to {_MAX_REPLICAS}, got {value!r}"
        )
    return value


def _seconds(name: str, value: object, where: str) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(
                f"{name} {where} must be a positive number of seconds, got {value!r}"
            ) from None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 < value < _MAX_SECONDS
    ):
        raise ConfigError(f"{name} {where} must be a positive number of seconds, got {value!r}")
    return float(value)


def split_cluster_options(
    url: str | None, options: dict[str, Any]
) -> tuple[str | None, ClusterOptions]:
    """Take the store's own options out of ``url`` and ``options`` (which it edits).

    Returns the URL with a plain ``redis``/``rediss`` scheme and without those
    options, and the options checked (``ConfigError`` names a bad one; one
    given both in the URL and as a keyword must agree).
    """
    found: dict[str, object] = {}
    if url is not None:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        found = {name: value for name, value in query if name in _OPTION_NAMES}
        query = [(name, value) for name, value in query if name not in _OPTION_NAMES]
        scheme = parts.scheme.lower().removesuffix("+cluster")
        url = urlunsplit(parts._replace(scheme=scheme, query=urlencode(query)))
    checked: dict[str, Any] = {}
    for name in _OPTION_NAMES:
        in_url = found.get(name)
        given = options.pop(name, None)
        candidates = [
            (value, where)
            for value, where in ((in_url, "in the URL"), (given, ""))
            if value is not None
        ]
        values: list[int | float] = []
        for value, where in candidates:
            if name == "min_replicas":
                values.append(_min_replicas(value, where))
            else:
                values.append(_seconds(name, value, where))
        if len(values) == 2 and values[0] != values[1]:
            raise ConfigError(f"{name} is given twice: {values[0]!r} in the URL and {values[1]!r}")
        if values:
            checked[name] = values[0]
    return url, ClusterOptions(**checked)


def shard_of(user_id: str) -> int:
    """The shard of a user: CRC-32 of the id's UTF-8 bytes, modulo ``SHARDS``."""
    try:
        encoded = user_id.encode()
    except (UnicodeEncodeError, AttributeError) as exc:
        raise InvalidInput(f"user id {user_id!r} is not a str of valid Unicode") from exc
    return zlib.crc32(encoded) % SHARDS


def key_slot(tag: bytes) -> int:
    """The cluster slot of a key whose hash tag is ``tag`` (CRC16-XMODEM, as Redis)."""
    return binascii.crc_hqx(tag, 0) % SLOTS


def shard_tags(count: int = SHARDS) -> list[bytes]:
    """A hash tag per shard, the n-th landing in the n-th of ``count`` stretches of the slots.

    Each is ``s<n>.<k>`` for the first ``k`` that lands there, so any split
    of the slots into ranges splits the shards about as evenly.
    """
    tags = []
    width = SLOTS / count
    for shard in range(count):
        low, high = int(shard * width), int((shard + 1) * width)
        for attempt in range(1_000_000):  # about `count` tries each
            tag = b"s%d.%d" % (shard, attempt)
            if low <= key_slot(tag) < high:
                tags.append(tag)
                break
    return tags


def not_applied(exc: BaseException) -> bool:
    """Whether an error proves the command it answers was not run, so it may be sent again.

    A slot that moved or is migrating (MOVED, ASK, TRYAGAIN, or redis-py
    giving up after too many of those), a cluster that is failing over
    (CLUSTERDOWN, a slot not covered), and a connection that could not be
    made (redis-py says "connecting to" only then). A connection lost after
    the command was sent is not one: the command may have run.
    """
    if isinstance(exc, (AskError, TryAgainError, ClusterDownError, SlotNotCoveredError)):
        return True  # MovedError is an AskError
    if isinstance(exc, ClusterError) and "TTL exhausted" in str(exc):
        return True
    return isinstance(exc, RedisConnectionError) and "connecting to" in str(exc)


class LogCursor(NamedTuple):
    """A position in the merged logs of the shards: after stream id (ms, seq) of shard ``shard``.

    Written ``<ms>-<seq>-<shard>``; merged order is (ms, seq, shard).
    """

    ms: int
    seq: int
    shard: int

    def text(self) -> str:
        """The cursor as ``scan_entries`` hands it out."""
        return f"{self.ms}-{self.seq}-{self.shard}"

    @staticmethod
    def parse(text: str | None) -> LogCursor | None:
        """A cursor read back; ``InvalidInput`` if this store could not have written it."""
        if text is None:
            return None
        parts = text.split("-") if isinstance(text, str) else []
        if (
            len(parts) != 3
            or not all(part.isascii() and part.isdigit() and len(part) <= 20 for part in parts)
            or int(parts[2]) >= SHARDS
        ):
            raise InvalidInput("after is not a cursor of this store")
        return LogCursor(int(parts[0]), int(parts[1]), int(parts[2]))

    def start(self, shard: int) -> tuple[int, int]:
        """The first stream id of ``shard`` that comes after the cursor in merged order."""
        if shard > self.shard:
            return self.ms, self.seq
        return self.ms, self.seq + 1


# What a connection to one node of a cluster takes from the cluster client's options.
_NODE_OPTIONS = frozenset(
    {
        "username",
        "password",
        "credential_provider",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "decode_responses",
        "encoding",
        "encoding_errors",
        "protocol",
        "client_name",
        "ssl",
    }
)


def node_options(given: dict[str, Any]) -> dict[str, Any]:
    """The options of a client of one node, from a cluster client's connection options.

    A commit that waits for replicas runs on a connection of its own to the
    user's master (``WAIT`` counts the writes of its connection only), made
    with the cluster's credentials, TLS and timeouts.
    """
    options = {
        name: value
        for name, value in given.items()
        if name in _NODE_OPTIONS or name.startswith("ssl_")
    }
    connection_class = given.get("connection_class")
    if connection_class is not None and "SSL" in getattr(connection_class, "__name__", ""):
        options["ssl"] = True
    return options
