"""The Lua scripts of the Redis stores, read from the ``lua`` folder beside this module.

Each constant is a script's whole text, as sent to Redis (which names it by
its SHA1). A line ``-- include: <file>`` stands for that file of the folder,
less the comment lines it starts with: ``commit.lua``, ``delta.lua`` and
``release.lua`` end a writer's turn with ``hand_over.lua``; ``commit.lua`` and
``delta.lua`` append entries with ``entries.lua``; ``delta.lua`` adds
balances with ``decimal.lua``.
"""

from __future__ import annotations

import re
from importlib import resources

__all__ = [
    "ACQUIRE_SCRIPT",
    "CLUSTER_COMMIT_SCRIPT",
    "CLUSTER_DELTA_SCRIPT",
    "CLUSTER_LOG_PAGE_SCRIPT",
    "COMMIT_SCRIPT",
    "DELTA_SCRIPT",
    "LOG_PAGE_SCRIPT",
    "RECHECK_SCRIPT",
    "RELEASE_SCRIPT",
]

_INCLUDE = re.compile(r"^-- include: (\S+)\n", re.MULTILINE)


def _read(name: str) -> str:
    return resources.files(__package__).joinpath("lua").joinpath(name).read_text(encoding="utf-8")


def _included(name: str) -> str:
    lines = _read(name).splitlines(keepends=True)
    while lines and lines[0].startswith("--"):
        del lines[0]
    return "".join(lines)


def _script(name: str) -> str:
    return _INCLUDE.sub(lambda include: _included(include.group(1)), _read(name))


COMMIT_SCRIPT = _script("commit.lua")
DELTA_SCRIPT = _script("delta.lua")
ACQUIRE_SCRIPT = _script("acquire.lua")
RECHECK_SCRIPT = _script("recheck.lua")
RELEASE_SCRIPT = _script("release.lua")
LOG_PAGE_SCRIPT = _script("log_page.lua")  # read-only: reports read the log with it


def _replaced(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:  # pragma: no cover - a script edited out of step with this
        raise AssertionError(f"expected {old!r} once in a Redis script")
    return text.replace(old, new)


# On Redis Cluster (see ``cluster``): log ids from the server's clock in microseconds, and
# log pages that start with the server's time.
def _on_cluster(script: str) -> str:
    return _replaced(
        _included("cluster_id.lua") + script,
        "redis.call('XADD', keys[8], '*',",
        "redis.call('XADD', keys[8], next_id(keys[8]),",
    )


CLUSTER_COMMIT_SCRIPT = _on_cluster(COMMIT_SCRIPT)
CLUSTER_DELTA_SCRIPT = _on_cluster(DELTA_SCRIPT)
CLUSTER_LOG_PAGE_SCRIPT = _replaced(
    _script("cluster_log_page.lua"),
    "return table.concat(out)",
    "return head .. table.concat(out)",
)
