"""The local Redis Cluster the cluster tests run on (``tools/redis-cluster`` starts it).

Six nodes on 127.0.0.1:7000-7005: three masters, a replica each. Tests that
fail a master over or move slots put things back (``restore``) so that the
next test finds 7000-7002 masters of the slots ``redis-cli --cluster create``
gave them; without the cluster they skip, or fail under
CREDITMETER_REQUIRE_SERVICES=1 (``services.need``).
"""

from __future__ import annotations

import gc
import os
import re
import time
from collections.abc import Iterator
from typing import Any

import tenacity
from services import need, unique

CLUSTER_URL = os.environ.get("CREDITMETER_TEST_CLUSTER", "redis+cluster://127.0.0.1:7000")
HOST = "127.0.0.1"
PORTS = range(7000, 7006)
FIRST_MASTERS = (7000, 7001, 7002)
SETTLE = 30.0  # seconds the cluster may take to settle after a failover or a slot move


def node(port: int) -> Any:
    """A plain client of one node."""
    import redis  # noqa: PLC0415 - the [redis] extra

    return redis.Redis(host=HOST, port=port, socket_timeout=5, socket_connect_timeout=2)


def reach_cluster() -> None:
    """Raise unless the test cluster answers with ``cluster_state:ok`` (a probe for ``need``)."""
    with node(7000) as client:
        if client.cluster("info").get("cluster_state") != "ok":
            raise RuntimeError("cluster_state is not ok")


def nodes(port: int = 7000) -> list[dict[str, Any]]:
    """``CLUSTER NODES`` of one node (7000), parsed: id, port, master (bool), master_id, slots."""
    with node(port) as client:
        parsed = client.execute_command("CLUSTER NODES")  # redis-py parses it into a dict
    found = []
    for address, fields in parsed.items():
        found.append(
            {
                "id": fields["node_id"],
                "port": int(address.rsplit(":", 1)[1].split("@")[0]),
                "master": "master" in fields["flags"],
                "failed": "fail" in fields["flags"],
                "master_id": fields["master_id"],
                "slots": [(int(spec[0]), int(spec[-1])) for spec in fields["slots"]],
            }
        )
    return found


def master_of_slot(slot: int) -> dict[str, Any]:
    """The node serving ``slot``."""
    for found in nodes():
        if found["master"] and any(low <= slot <= high for low, high in found["slots"]):
            return found
    raise AssertionError(f"no master serves slot {slot}")


def replica_of(master_port: int) -> dict[str, Any]:
    """A replica of the master on ``master_port`` (waiting for the cluster to list one)."""
    end = time.monotonic() + SETTLE
    while True:
        listed = nodes()
        master = next(found for found in listed if found["port"] == master_port)
        for found in listed:
            if found["master_id"] == master["id"]:
                return found
        if time.monotonic() > end:
            raise AssertionError(f"{master_port} has no replica")
        time.sleep(0.05)


def wait_replicated(master_port: int) -> None:
    """Wait until the master on ``master_port`` has a replica online (resynced after a failover)."""
    end = time.monotonic() + SETTLE
    while True:
        with node(master_port) as client:
            info = client.info("replication")
        if any(
            isinstance(value, dict) and value.get("state") == "online"
            for name, value in info.items()
            if name.startswith("slave")
        ):
            return
        if time.monotonic() > end:
            raise AssertionError(f"{master_port} has no replica online")
        time.sleep(0.05)


def _view(port: int) -> tuple[Any, ...]:
    """What one node believes: its state and epoch, and each node's role, master and slots."""
    with node(port) as client:
        info = client.cluster("info")
    listed = sorted(
        (found["id"], found["master"], found["failed"], found["master_id"], str(found["slots"]))
        for found in nodes(port)
    )
    return info.get("cluster_state"), info.get("cluster_current_epoch"), tuple(listed)


def wait_ok(deadline: float = SETTLE) -> None:
    """Wait until every node reports ``cluster_state:ok`` and all hold the same view.

    The same view: one current epoch, and the same role, master and slots
    for every node, with three masters serving slots and none failed. A
    failover started before gossip has carried the last one to every node
    can win its election and be undone at once by a node with the newer
    configuration (seen on CI), so tests that disturb the cluster wait for this.
    """
    end = time.monotonic() + deadline
    while True:
        try:
            views = {_view(port) for port in PORTS}
            (state, _, listed), *others = views
            masters = [entry for entry in listed if entry[1] and entry[4] != "[]"]
            failed = [entry for entry in listed if entry[2]]
            if not others and state == "ok" and len(masters) == 3 and not failed:
                return
        except Exception:
            pass
        if time.monotonic() > end:
            raise AssertionError(f"the cluster did not settle within {deadline} s")
        time.sleep(0.1)


def failover(replica_port: int, *, force: bool = False) -> None:
    """Make the replica on ``replica_port`` its master's master (``CLUSTER FAILOVER``).

    Returns once the replica is a master in 7000's view; ``wait_ok`` then
    tells when every node agrees.
    """
    with node(replica_port) as client:
        if force:
            client.execute_command("CLUSTER FAILOVER FORCE")
        else:
            client.execute_command("CLUSTER FAILOVER")
    end = time.monotonic() + SETTLE
    while not next(found for found in nodes() if found["port"] == replica_port)["master"]:
        if time.monotonic() > end:
            raise AssertionError(f"{replica_port} did not become a master")
        time.sleep(0.05)


def move_slot(slot: int, target_port: int) -> None:
    """Move ``slot``, its keys too, to the master on ``target_port`` (SETSLOT, MIGRATE)."""
    source = master_of_slot(slot)
    if source["port"] == target_port:
        return
    target = next(found for found in nodes() if found["port"] == target_port)
    with node(source["port"]) as src, node(target_port) as dst:
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source["id"])
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target["id"])
        while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 50):
            src.execute_command("MIGRATE", HOST, target_port, "", 0, 5000, "KEYS", *keys)
        for master in (dst, src):
            master.execute_command("CLUSTER SETSLOT", slot, "NODE", target["id"])
    for found in nodes():  # the other masters learn it by gossip; tell them at once
        if found["master"] and found["port"] not in (source["port"], target_port):
            with node(found["port"]) as other:
                other.execute_command("CLUSTER SETSLOT", slot, "NODE", target["id"])


# The slots `redis-cli --cluster create` gives the three masters.
FIRST_SLOTS = {7000: (0, 5460), 7001: (5461, 10922), 7002: (10923, 16383)}


RESTORE_ATTEMPTS = 3


def restore() -> None:
    """Put 7000-7002 back as the masters of their first slots, once the cluster is ok.

    A failover that a test started can still be carried out after the
    cluster looked settled (seen on CI: 7000 became a replica again between
    ``wait_ok`` and the slot moves, and SETSLOT on it was refused). Then the
    cluster is waited for and put back again, up to ``RESTORE_ATTEMPTS`` times.
    """
    import redis  # noqa: PLC0415 - the [redis] extra

    again = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(RESTORE_ATTEMPTS),
        retry=tenacity.retry_if_exception_type((redis.ResponseError, AssertionError)),
        reraise=True,
    )
    again(_restore_once)


def _restore_once() -> None:
    wait_ok()
    for port in FIRST_MASTERS:
        if not next(found for found in nodes() if found["port"] == port)["master"]:
            failover(port)
    wait_ok()
    for found in nodes():
        if not found["master"]:
            continue
        low, high = FIRST_SLOTS.get(found["port"], (0, -1))
        for first, last in found["slots"]:
            for slot in range(first, last + 1):
                if not low <= slot <= high:
                    owner = next(port for port, (a, b) in FIRST_SLOTS.items() if a <= slot <= b)
                    move_slot(slot, owner)
    wait_ok()


def drop_cluster_keys(prefix: str) -> int:
    """Unlink every key under ``prefix`` on every master (SCAN + UNLINK, slot by slot)."""
    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + "*"
    import redis.cluster  # noqa: PLC0415 - the [redis] extra

    dropped = 0
    with redis.cluster.RedisCluster(host=HOST, port=7000) as client:
        for found in nodes():
            if not (found["master"] and found["slots"]):
                continue
            with node(found["port"]) as one:
                keys = list(one.scan_iter(match=pattern, count=1000))
            for key in keys:  # through the cluster client: a slot may have moved meanwhile
                dropped += client.unlink(key)
    return dropped


def begin_move(slot: int, target_port: int, keys: list[bytes]) -> tuple[int, str]:
    """Start moving ``slot`` to ``target_port`` and move only ``keys`` (those that exist).

    The slot is left MIGRATING on its master and IMPORTING on the target, so
    that commands on it meet ASK and, naming keys on both sides or missing,
    TRYAGAIN, until ``end_move``. Returns what ``end_move`` takes.
    """
    source = master_of_slot(slot)
    target = next(found for found in nodes() if found["port"] == target_port)
    with node(source["port"]) as src, node(target_port) as dst:
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", source["id"])
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", target["id"])
        present = [key for key in keys if src.exists(key)]
        if present:
            src.execute_command("MIGRATE", HOST, target_port, "", 0, 5000, "KEYS", *present)
    return source["port"], target["id"]


def end_move(slot: int, target_port: int, started: tuple[int, str]) -> None:
    """Finish what ``begin_move`` started: the slot's other keys, then SETSLOT NODE everywhere."""
    source_port, target_id = started
    with node(source_port) as src, node(target_port) as dst:
        while keys := src.execute_command("CLUSTER GETKEYSINSLOT", slot, 50):
            src.execute_command("MIGRATE", HOST, target_port, "", 0, 5000, "KEYS", *keys)
        for master in (dst, src):
            master.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)
    for found in nodes():
        if found["master"] and found["port"] not in (source_port, target_port):
            with node(found["port"]) as other:
                other.execute_command("CLUSTER SETSLOT", slot, "NODE", target_id)


def fresh_prefix(*, restored: bool) -> Iterator[str]:
    """A key prefix of a test's own on the cluster (skip without it), its keys dropped after.

    ``restored``: the cluster is put back as ``restore`` leaves it before and
    after (for tests that move slots or fail masters over). After the test the
    garbage is collected, so that a client it left unclosed is reported
    (ResourceWarning, an error here) against it, not against a later test
    that happens to trigger the collection (or forks with it).
    """
    need("redis-cluster", reach_cluster)
    if restored:
        restore()
    chosen = unique("cmtest:") + ":"
    yield chosen
    if restored:
        restore()
    drop_cluster_keys(chosen)
    gc.collect()
