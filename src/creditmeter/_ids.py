"""Unique ids for ledger entries and holds, cheap enough for the hot path.

An id is a random 64-bit prefix drawn once per process (and again in a forked
child) followed by a counter: unique across processes and hosts without
paying for a UUID per entry.
"""

from __future__ import annotations

import itertools
import os

__all__ = ["new_id"]


def _reseed() -> None:
    global _prefix, _counter  # noqa: PLW0603 - process-wide state by design
    _prefix = os.urandom(8).hex()
    _counter = itertools.count(1)


_prefix = ""
_counter = itertools.count(1)
_reseed()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed)


def new_id() -> str:
    """Return a new id, unique across threads, processes and hosts."""
    # next() on itertools.count is atomic under the GIL: no lock is needed.
    return f"{_prefix}-{next(_counter):x}"
