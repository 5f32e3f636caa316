"""What happened, as typed events: pass ``on_event=`` to a manager to hear them.

Each event is a frozen attrs record. A manager calls ``on_event(event)``
after the change it reports was committed (or, for ``Denied``, refused) and
after it has let go of the user's lock, in the order the call produced them,
so a callback may call the manager itself (a top-up on ``LowBalance``). An
``AsyncBalanceManager`` awaits a callback that is an ``async def``. A
callback that raises is logged on the ``creditmeter`` logger and never
breaks the operation. ``duration`` is the seconds the operation took.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal, Union

import attrs

from creditmeter.models import LedgerEntry
from creditmeter.usage import TokenUsage

__all__ = [
    "Charged",
    "ConflictRetried",
    "Denied",
    "Event",
    "Expired",
    "Granted",
    "LowBalance",
    "Refilled",
    "Unmetered",
]


@attrs.frozen(kw_only=True)
class Charged:
    """A charge (or a hold's settlement) was committed."""

    user_id: str
    entry: LedgerEntry
    duration: float = 0.0


@attrs.frozen(kw_only=True)
class Granted:
    """Credits were granted."""

    user_id: str
    entry: LedgerEntry
    duration: float = 0.0


@attrs.frozen(kw_only=True)
class Expired:
    """A credit block reached its expiry: its ``EXPIRE`` entry (minus what was left) was written.

    ``entry.drawn`` names the block and the credits it still held.
    """

    user_id: str
    entry: LedgerEntry
    duration: float = 0.0


@attrs.frozen(kw_only=True)
class Refilled:
    """A due refill was applied."""

    user_id: str
    entry: LedgerEntry
    duration: float = 0.0


@attrs.frozen(kw_only=True)
class Denied:
    """A check, strict charge or hold was refused for want of credits."""

    user_id: str
    balance: Decimal
    available: Decimal
    cost: Decimal | None
    duration: float = 0.0


@attrs.frozen(kw_only=True)
class LowBalance:
    """A balance went from at or above ``threshold`` to below it.

    Fired once per crossing: it fires again only after the balance has risen
    to the threshold or above and fallen below it again.
    """

    user_id: str
    balance: Decimal
    threshold: Decimal


@attrs.frozen(kw_only=True)
class ConflictRetried:
    """A write lost a compare-and-set to another writer and is being retried."""

    user_id: str


@attrs.frozen(kw_only=True)
class Unmetered:
    """A call was served but its charge could not be recorded: the store failed.

    Sent by the ``metered`` decorator, the ASGI middleware and the LiteLLM
    logger (not by a manager's own methods, which raise ``StoreError``).
    ``operation`` is the write that failed (``"charge"``, or ``"settle"`` of
    the call's hold); ``error`` is the store's message. ``model``, ``usage``
    and ``amount`` (credits, when the amount was given rather than priced)
    are what would have been charged, so the charge can be replayed once the
    store is back: with ``request_id`` when there is one, that replay
    charges once.
    """

    user_id: str
    operation: Literal["charge", "settle"]
    error: str
    model: str | None = None
    usage: TokenUsage | None = None
    amount: Decimal | None = None
    incomplete: bool = False
    request_id: str | None = None


Event = Union[  # noqa: UP007
    Charged, Granted, Refilled, Expired, Denied, LowBalance, ConflictRetried, Unmetered
]
