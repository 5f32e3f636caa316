"""Unique ids for ledger entries and holds, cheap enough for the hot path.

An id is one 128-bit number in hex: a random 64-bit prefix drawn once per
process (and again in a forked child) above a 64-bit counter. Unique across
processes and hosts without paying for a UUID per entry, and built by one
``hex()`` of the counter's next value, at half the cost of formatting a
prefix and a counter into one string.
"""

from __future__ import annotations

import itertools
import os

__all__ = ["new_id"]

_COUNTER_BITS = 64  # a process would need 2**64 ids to carry into its prefix


def _start(prefix: int) -> None:
    """Draw this process's next ids under ``prefix`` (a 64-bit number), from a new counter."""
    global _counter  # noqa: PLW0603 - process-wide state by design
    _counter = itertools.count((prefix << _COUNTER_BITS) + 1)


def _reseed() -> None:
    _start(int.from_bytes(os.urandom(8), "big"))


_counter = itertools.count(1)
_reseed()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed)


def new_id() -> str:
    """Return a new id, unique across threads, processes and hosts."""
    # next() on itertools.count is atomic under the GIL: no lock is needed.
    return hex(next(_counter))
